"""Cross-run diagnostics (Figures 7 and 8): tables built from runs' logged metrics. Pure.

A run is a :class:`RunRecord` (id, method, params, metric histories), however it was read (an
MLflow run via :mod:`opd_lit.diagnostics.runs`, or a CSV-logger run directory), so these functions
never touch MLflow themselves.

- Figure 7, fixed prefix vs release: for every ``fixed_prefix`` run (a ``prefix_len`` param)
  and every release run, the mean kept-token fraction over training (``train/kept_frac``), the
  mean diagnostic release position of its rollouts (``release/release_pos_frac``: where the BIC
  rule would release, as a fraction of the response) and its final accuracy (the last value
  of ``eval/<bench>/score``, else ``eval/<bench>/accuracy``, averaged over benchmarks).
- Figure 8, response length: ``rollout/response_len_mean`` against the training step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

KEPT = "train/kept_frac"
RELEASE_POS = "release/release_pos_frac"
RESPONSE_LEN = "rollout/response_len_mean"
FIXED_PREFIX = "fixed_prefix"
RELEASE_METHODS = ("release_bic", "release_random")

FIXED_PREFIX_COLUMNS = (
    "run_id", "run_name", "method", "label", "prefix_len", "kept_frac", "release_pos_frac",
    "accuracy", "accuracy_metric",
)
RESPONSE_LENGTH_COLUMNS = ("run_id", "run_name", "method", "label", "step", "response_len_mean")


@dataclass
class RunRecord:
    run_id: str
    name: str = ""
    method: str = ""
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # key -> [(step, value)]

    @property
    def label(self) -> str:
        return self.tags.get("label") or self.method or self.run_id[:8]

    def short(self) -> str:
        return f"{self.run_id[:12]} ({self.method or '?'})"


def eval_metric_keys(keys: Sequence[str]) -> list[str]:
    """Per-benchmark score keys: ``eval/<b>/score`` where present, else ``eval/<b>/accuracy``."""
    by_bench: dict[str, str] = {}
    for key in sorted(keys):
        parts = key.split("/")
        if len(parts) != 3 or parts[0] != "eval" or parts[2] not in ("score", "accuracy"):
            continue
        if parts[2] == "score" or parts[1] not in by_bench:
            by_bench[parts[1]] = key
    return [by_bench[b] for b in sorted(by_bench)]


def prefix_len(run: RunRecord) -> float | None:
    """The run's fixed prefix length ``L`` (param ``method.prefix_len`` or any ``*prefix_len``)."""
    keys = ["method.prefix_len"] + sorted(k for k in run.params if k.endswith("prefix_len"))
    for key in keys:
        if key in run.params:
            try:
                return float(run.params[key])
            except (TypeError, ValueError):
                continue
    return None


def history_mean(history: Sequence[tuple[int, float]]) -> float:
    vals = [v for _, v in history if math.isfinite(v)]
    return sum(vals) / len(vals) if vals else math.nan


def final_value(history: Sequence[tuple[int, float]]) -> float:
    vals = [(s, v) for s, v in history if math.isfinite(v)]
    return max(vals)[1] if vals else math.nan


def final_accuracy(run: RunRecord) -> tuple[float, str]:
    """Mean over benchmarks of the last logged score; ``(nan, "")`` when the run has none."""
    keys = eval_metric_keys(list(run.metrics))
    vals = [final_value(run.metrics[k]) for k in keys]
    vals = [v for v in vals if math.isfinite(v)]
    if not vals:
        return math.nan, ""
    return sum(vals) / len(vals), "+".join(keys)


def fixed_prefix_missing(runs: Sequence[RunRecord]) -> list[str]:
    """What Figure 7 lacks in ``runs`` (empty when it can be drawn)."""
    problems = []
    fixed = [r for r in runs if r.method == FIXED_PREFIX]
    if not fixed:
        problems.append(f"no run tagged method={FIXED_PREFIX}")
    elif not any(prefix_len(r) is not None for r in fixed):
        problems.append(f"no {FIXED_PREFIX} run has a prefix_len param")
    if not any(r.method in RELEASE_METHODS for r in runs):
        problems.append(f"no release run (method in {list(RELEASE_METHODS)})")
    usable = [r for r in runs if r.method == FIXED_PREFIX or r.method in RELEASE_METHODS]
    if usable and not any(math.isfinite(final_accuracy(r)[0]) for r in usable):
        problems.append("none of them logged eval/<bench>/accuracy or eval/<bench>/score")
    return problems


def fixed_prefix_rows(runs: Sequence[RunRecord]) -> list[dict]:
    """Figure 7 table: one row per fixed-prefix or release run (fixed prefixes sorted by L)."""
    rows = []
    for r in runs:
        if r.method == FIXED_PREFIX:
            length = prefix_len(r)
            if length is None:
                continue
            label = f"L={length:g}"
        elif r.method in RELEASE_METHODS:
            length, label = math.nan, r.label
        else:
            continue
        acc, acc_key = final_accuracy(r)
        rows.append({
            "run_id": r.run_id, "run_name": r.name, "method": r.method, "label": label,
            "prefix_len": length, "kept_frac": history_mean(r.metrics.get(KEPT, [])),
            "release_pos_frac": history_mean(r.metrics.get(RELEASE_POS, [])),
            "accuracy": acc, "accuracy_metric": acc_key,
        })
    def order(d: dict):
        fixed = d["method"] == FIXED_PREFIX
        return (not fixed, d["prefix_len"] if fixed else 0.0, d["run_id"])

    rows.sort(key=order)
    return rows


def response_length_rows(runs: Sequence[RunRecord]) -> list[dict]:
    """Figure 8 table: one row per (run, step) with a logged mean response length."""
    rows = []
    for r in runs:
        for step, value in sorted(r.metrics.get(RESPONSE_LEN, [])):
            rows.append({
                "run_id": r.run_id, "run_name": r.name, "method": r.method, "label": r.label,
                "step": int(step), "response_len_mean": float(value),
            })
    return rows
