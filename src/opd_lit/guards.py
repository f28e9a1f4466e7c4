"""Divergence detection for a training run: pure, one step at a time, no Lightning.

A step *diverged* when (the ``divergence.*`` keys, defaults in :class:`DivergenceSpec`):

- **zero gradients**: the gradient norm is at most ``zero_grad_norm`` on ``zero_grad_steps``
  steps in a row that supervised at least one token (a collapsed student: the loss stays put
  and nothing learns; seen on the toy at ``optim.lr=1e3``, grad norm exactly 0 from step 1);
- **loss out of range**: ``|loss| > loss_ratio × max(median |loss|, loss_floor)`` over the last
  ``window`` sane steps (once ``min_history`` are known), or ``|loss| > max_abs_loss`` when set;
- **gradient spike**: ``grad_norm > grad_ratio × median grad_norm`` over the same window, or
  ``> max_grad_norm`` when set.

Non-finite values are the non-finite guard's (the step is skipped and counted in
``train/skipped_steps``) and are left out here. A diverged step does not enter the window,
so a run that stays diverged keeps being flagged instead of becoming the new normal.

Every step's verdict carries ``train/diverged`` (1.0 or 0.0) for the logger; a diverged
step is also a warning in the log naming the rule and its key. ``stop_after = N > 0`` stops
the run (:class:`DivergenceError`) after N diverged steps in a row; 0 only warns.

Use from the training step (``loss`` and ``grad_norm`` the global values, equal on every rank,
so all ranks stop together)::

    verdict = guard.update(step, loss=loss, grad_norm=grad_norm, tokens=supervised_tokens)
    metrics.update(verdict.metrics)
    if verdict.stop:
        raise DivergenceError(verdict.message)
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import deque
from dataclasses import asdict, dataclass, field, fields
from typing import Any

log = logging.getLogger(__name__)

METRIC = "train/diverged"


class DivergenceError(RuntimeError):
    """The run diverged for ``divergence.stop_after`` steps in a row."""


@dataclass
class DivergenceSpec:
    """The ``divergence`` config section (README "Numeric guards")."""

    window: int = 20  # sane steps remembered for the relative rules
    min_history: int = 3  # the relative rules start once this many are known
    loss_ratio: float = 10.0  # |loss| above ratio × max(median |loss|, loss_floor); 0: off
    loss_floor: float = 1.0  # the scale below which a loss counts as small
    grad_ratio: float = 20.0  # grad norm above ratio × median grad norm; 0: off
    zero_grad_norm: float = 1.0e-12  # a gradient norm at or below this is zero
    zero_grad_steps: int = 2  # zero gradients on this many supervised steps in a row; 0: off
    max_abs_loss: float | None = None  # absolute bound on |loss| (null: none)
    max_grad_norm: float | None = None  # absolute bound on the gradient norm (null: none)
    stop_after: int = 0  # stop after this many diverged steps in a row; 0: warn only

    def problems(self) -> list[tuple[str, Any, str]]:
        """``(key, value, allowed)`` for each bad setting."""
        out = []
        for name in ("window", "min_history", "zero_grad_steps", "stop_after"):
            v = getattr(self, name)
            low = 1 if name in ("window", "min_history") else 0
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                out.append((name, v, f"an integer >= {low}" + (" (0: off)" if low == 0 else "")))
        for name in ("loss_ratio", "loss_floor", "grad_ratio", "zero_grad_norm"):
            v = getattr(self, name)
            if not _number(v) or v < 0:
                out.append((name, v, "a number >= 0" + (" (0: off)" if name.endswith("ratio") else "")))
        for name in ("max_abs_loss", "max_grad_norm"):
            v = getattr(self, name)
            if v is not None and (not _number(v) or v <= 0):
                out.append((name, v, "null (no bound) or a number > 0"))
        if isinstance(self.window, int) and isinstance(self.min_history, int) and self.min_history > self.window:
            out.append(("min_history", self.min_history, f"at most divergence.window={self.window}"))
        return out


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def spec_from_config(values: dict[str, Any] | None) -> DivergenceSpec:
    """``DivergenceSpec`` from the config section; unknown keys name the allowed ones."""
    values = dict(values or {})
    known = {f.name for f in fields(DivergenceSpec)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"divergence: unknown key(s) {unknown}; allowed: {sorted(known)}")
    spec = DivergenceSpec(**values)
    bad = spec.problems()
    if bad:
        raise ValueError("; ".join(f"divergence.{k}={v!r}: {allowed}" for k, v, allowed in bad))
    return spec


@dataclass
class Verdict:
    """One step's outcome: the metrics to log, why it diverged, whether to stop."""

    step: int
    diverged: bool
    reasons: list[str] = field(default_factory=list)
    stop: bool = False
    message: str = ""

    @property
    def metrics(self) -> dict[str, float]:
        return {METRIC: 1.0 if self.diverged else 0.0}


class DivergenceGuard:
    """Watches ``(loss, grad_norm)`` step by step (see the module docstring)."""

    def __init__(self, spec: DivergenceSpec | dict[str, Any] | None = None):
        self.spec = spec if isinstance(spec, DivergenceSpec) else spec_from_config(spec)
        self.losses: deque[float] = deque(maxlen=self.spec.window)
        self.grads: deque[float] = deque(maxlen=self.spec.window)
        self.zero_run = 0  # supervised steps in a row with zero gradients
        self.diverged_run = 0  # diverged steps in a row
        self.diverged_steps = 0  # in all

    def check(self, loss: float, grad_norm: float, tokens: int | None = None) -> list[str]:
        """Why this step diverged (empty: it did not); pure: the state is not changed."""
        s = self.spec
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return []  # the non-finite guard's case
        reasons = []
        supervised = tokens is None or tokens > 0
        if s.zero_grad_steps and supervised and grad_norm <= s.zero_grad_norm:
            if self.zero_run + 1 >= s.zero_grad_steps:
                reasons.append(
                    f"gradient norm {grad_norm:.3g} (zero) on {self.zero_run + 1} supervised step(s) in a row "
                    f"(divergence.zero_grad_steps={s.zero_grad_steps}): the student no longer learns"
                )
        if s.max_abs_loss is not None and abs(loss) > s.max_abs_loss:
            reasons.append(f"|loss| = {abs(loss):.4g} above divergence.max_abs_loss={s.max_abs_loss:g}")
        if s.max_grad_norm is not None and grad_norm > s.max_grad_norm:
            reasons.append(f"gradient norm {grad_norm:.4g} above divergence.max_grad_norm={s.max_grad_norm:g}")
        if len(self.losses) >= s.min_history:
            scale = max(statistics.median(abs(v) for v in self.losses), s.loss_floor)
            if s.loss_ratio and abs(loss) > s.loss_ratio * scale:
                reasons.append(
                    f"loss {loss:.4g} is {abs(loss) / scale:.1f}x the recent scale {scale:.3g} "
                    f"(divergence.loss_ratio={s.loss_ratio:g})"
                )
            ref = statistics.median(self.grads)
            if s.grad_ratio and ref > 0 and grad_norm > s.grad_ratio * ref:
                reasons.append(
                    f"gradient norm {grad_norm:.4g} is {grad_norm / ref:.1f}x the recent median {ref:.3g} "
                    f"(divergence.grad_ratio={s.grad_ratio:g})"
                )
        return reasons

    def update(self, step: int, loss: float, grad_norm: float, tokens: int | None = None) -> Verdict:
        """Judge one step and remember it. ``tokens``: supervised tokens of the step (None: some)."""
        loss, grad_norm = float(loss), float(grad_norm)
        reasons = self.check(loss, grad_norm, tokens)
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if finite and (tokens is None or tokens > 0):
            self.zero_run = self.zero_run + 1 if grad_norm <= self.spec.zero_grad_norm else 0
        if not reasons:
            self.diverged_run = 0
            if finite:
                self.losses.append(loss)
                self.grads.append(grad_norm)
            return Verdict(step, False)
        self.diverged_run += 1
        self.diverged_steps += 1
        stop = bool(self.spec.stop_after) and self.diverged_run >= self.spec.stop_after
        then = (
            f"stopping (divergence.stop_after={self.spec.stop_after})" if stop else
            f"continuing ({self.diverged_run} diverged step(s) in a row; divergence.stop_after="
            f"{self.spec.stop_after}{': set it to N > 0 to stop after N' if not self.spec.stop_after else ''})"
        )
        message = f"step {step}: training diverged: " + "; ".join(reasons) + f"; {then}"
        log.warning(message)
        return Verdict(step, True, reasons, stop, message)

    # ---- checkpoints -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"losses": list(self.losses), "grads": list(self.grads), "zero_run": self.zero_run,
                "diverged_run": self.diverged_run, "diverged_steps": self.diverged_steps,
                "spec": asdict(self.spec)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.losses.clear()
        self.losses.extend(state.get("losses", []))
        self.grads.clear()
        self.grads.extend(state.get("grads", []))
        self.zero_run = int(state.get("zero_run", 0))
        self.diverged_run = int(state.get("diverged_run", 0))
        self.diverged_steps = int(state.get("diverged_steps", 0))
