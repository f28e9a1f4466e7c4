"""DiagnosticsCallback: the paper's rollout diagnostics, drawn while training.

After every training step it adds the step's rollouts (already scored by the student and the
teacher; no extra model call) to the statistics of the current window; every
``diagnostics.every_n_steps`` steps, and at the last step, it writes each figure of the window
(CSV of the raw numbers + PNG; case-study HTML pages) into ``<run dir>/diagnostics/`` and, for
MLflow runs, logs them as artifacts under ``diagnostics/``. A figure whose inputs the run does
not produce is skipped with a warning saying what it needs (``diagnostics/skipped.csv``); the
others still render. A figure that fails is reported and never stops training.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch

from opd_lit.batch import Needs, RolloutBatch
from opd_lit.diagnostics import figures as F
from opd_lit.diagnostics.by_position import (
    NORMALIZE,
    PositionMoments,
    advantage_moments,
    advantage_rows,
    margin_moments,
    margin_rows,
    usable_ks,
)
from opd_lit.diagnostics.case_study import (
    case_priority,
    case_study_rows,
    response_margin,
    select_case_studies,
    token_pieces,
)
from opd_lit.diagnostics.release_stats import SAMPLE_COLUMNS, release_sample_rows
from opd_lit.diagnostics.runs import local_run_dir, log_files, set_run_tag
from opd_lit.objectives import opd_advantage

log = logging.getLogger(__name__)

FIGURES = ("advantage_by_position", "margin_by_position", "release_stats", "case_studies", "response_length")


class DiagnosticsCallback(L.Callback):
    def __init__(
        self,
        enabled: bool = True,
        every_n_steps: int = 10,
        num_bins: int = 20,
        margin_ks: Sequence[int] = (2, 4, 8),
        normalize: str = "mean",
        case_studies: int = 2,
        case_max_tokens: int = 8192,
        figures: Sequence[str] | None = None,
    ):
        if every_n_steps < 0:
            raise ValueError(f"diagnostics.every_n_steps={every_n_steps}: must be >= 0 (0 = only at the end)")
        if num_bins < 1:
            raise ValueError(f"diagnostics.num_bins={num_bins}: must be >= 1")
        ks = [int(k) for k in margin_ks]
        if not ks or any(k < 2 for k in ks):
            raise ValueError(f"diagnostics.margin_ks={list(margin_ks)}: need at least one K, each >= 2")
        if normalize not in NORMALIZE:
            raise ValueError(f"diagnostics.normalize={normalize!r} is not one of {list(NORMALIZE)}")
        figures = list(FIGURES if figures is None else figures)
        unknown = sorted(set(figures) - set(FIGURES))
        if unknown:
            raise ValueError(f"diagnostics.figures: unknown {unknown}; available: {list(FIGURES)}")
        if case_studies < 0 or case_max_tokens < 1:
            raise ValueError("diagnostics.case_studies must be >= 0 and diagnostics.case_max_tokens >= 1")
        self.enabled = enabled
        self.every_n_steps = every_n_steps
        self.num_bins = num_bins
        self.margin_ks = sorted(set(ks))
        self.normalize = normalize
        self.case_studies = case_studies
        self.case_max_tokens = case_max_tokens
        self.figures = figures
        # all windows so far (the CSVs are cumulative: one block of rows per window)
        self.tables: dict[str, list[dict]] = {name: [] for name in FIGURES if name != "case_studies"}
        self.skipped: dict[str, str] = {}  # figure -> why the run cannot draw it
        self.errors: list[str] = []  # figures that failed (reported, never raised)
        self.written: set[str] = set()
        self._emitted_at = -1
        self._tokenizer = None
        self._reset_window()

    # ---- wiring ------------------------------------------------------------------------
    @property
    def needs(self) -> Needs:
        """Enough student candidates for the largest margin K (merged into the step's needs)."""
        if self.enabled and "margin_by_position" in self.figures:
            return Needs(topk=max(self.margin_ks))
        return Needs()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        batch = (outputs or {}).get("rollouts") if isinstance(outputs, dict) else None
        if not self.enabled or not isinstance(batch, RolloutBatch):
            return
        if not getattr(trainer, "is_global_zero", True):
            return  # data parallel: rank 0 draws from its own share of the rollouts
        step = int(trainer.global_step)  # optimizer steps done, this one included
        self._tokenizer = getattr(getattr(trainer, "datamodule", None), "student_tokenizer", None)
        self._accumulate(batch, pl_module, step)
        last = trainer.max_steps is not None and 0 < trainer.max_steps <= step
        due = (self.every_n_steps and step % self.every_n_steps == 0) or last
        if due and step != self._emitted_at:  # a skipped update repeats the step: emit once
            self.emit(trainer, pl_module, step)

    def on_train_end(self, trainer, pl_module) -> None:
        # stopped before the last step: flush the window
        if self.enabled and self._steps and getattr(trainer, "is_global_zero", True):
            self.emit(trainer, pl_module, int(trainer.global_step))

    # ---- resume (opd_lit.checkpoint saves and restores callback state) -------------------
    def state_dict(self) -> dict:
        """Everything drawn so far and the open window, in plain Python types."""
        if not self.enabled:
            return {}

        def moments(m: PositionMoments | None):
            if m is None:
                return None
            return {f: getattr(m, f).tolist() for f in ("count", "total", "total_sq", "within_sum", "within_n")} | {
                "rollouts": m.rollouts}

        return {
            "tables": self.tables, "skipped": self.skipped, "written": sorted(self.written),
            "emitted_at": self._emitted_at, "steps": self._steps, "adv": moments(self._adv),
            "margin": {k: moments(m) for k, m in self._margin.items()}, "release": self._release,
            "cases": [[list(key), rows] for key, rows in self._cases],
        }

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return

        def moments(d):
            if d is None:
                return None
            t = {k: torch.tensor(v, dtype=torch.float64) for k, v in d.items() if k != "rollouts"}
            return PositionMoments(**t, rollouts=int(d["rollouts"]))

        self.tables = {name: list(state["tables"].get(name, [])) for name in self.tables}
        self.skipped = dict(state["skipped"])
        self.written = set(state["written"])
        self._emitted_at = int(state["emitted_at"])
        self._steps = list(state["steps"])
        self._adv = moments(state["adv"])
        self._margin = {int(k): moments(m) for k, m in state["margin"].items()}
        self._release = list(state["release"])
        self._cases = [(tuple(key), rows) for key, rows in state["cases"]]

    # ---- per step ----------------------------------------------------------------------
    def _reset_window(self) -> None:
        self._steps: list[int] = []
        self._adv: PositionMoments | None = None
        self._margin: dict[int, PositionMoments] = {}
        self._release: list[dict] = []
        self._cases: list[tuple[tuple, list[dict]]] = []  # (priority, token rows), best first

    def _skip(self, figure: str, reason: str) -> None:
        if figure in self.figures and figure not in self.skipped:
            self.skipped[figure] = reason
            log.warning("diagnostics: %s skipped: %s", figure, reason)

    def _accumulate(self, batch: RolloutBatch, pl_module, step: int) -> None:
        mask = batch.response_mask
        self._steps.append(step)
        self.tables["response_length"].append({  # at the step rollout/response_len_mean is logged at
            "run_id": "", "run_name": "", "method": getattr(pl_module, "name", ""), "label": "",
            "step": step - 1, "response_len_mean": float((mask > 0).sum(-1).float().mean()),
        })
        with torch.no_grad():
            if "advantage_by_position" in self.figures:
                if batch.teacher_logprobs is None:
                    self._skip("advantage_by_position", "the batch has no teacher log-probs; " + F.ADVANTAGE.needs)
                else:
                    m = advantage_moments(batch.teacher_logprobs, batch.student_logprobs, mask, self.num_bins)
                    self._adv = m if self._adv is None else self._adv + m
            if "margin_by_position" in self.figures:
                self._accumulate_margin(batch, mask)
            if "release_stats" in self.figures or "case_studies" in self.figures:
                release = batch.release
                if release is None:
                    why = self._no_release(pl_module)
                    self._skip("release_stats", why)
                    self._skip("case_studies", why)
                else:
                    self._release.extend(release_sample_rows(release, mask, step))
                    if "case_studies" in self.figures and self.case_studies:
                        self._collect_cases(batch, pl_module, step)

    def _accumulate_margin(self, batch: RolloutBatch, mask: torch.Tensor) -> None:
        topk = batch.teacher_topk_logprobs
        have = 0 if topk is None else int(topk.shape[-1])
        ks, too_large = usable_ks(self.margin_ks, have)
        if not ks:
            self._skip("margin_by_position", f"the batch carries {have} teacher-scored candidates; " + F.MARGIN.needs)
            return
        if too_large and "margin_k" not in self.skipped:
            self.skipped["margin_k"] = f"K={too_large} dropped: the batch carries {have} candidates"
            log.warning("diagnostics: margin curves for K=%s dropped: the batch carries %d candidates", too_large, have)
        for k, m in margin_moments(topk, mask, ks, self.num_bins).items():
            self._margin[k] = m if k not in self._margin else self._margin[k] + m

    @staticmethod
    def _no_release(pl_module) -> str:
        method = getattr(pl_module, "name", "?")
        spec = getattr(pl_module, "release_spec", None)
        diag = getattr(spec, "diagnose", None)
        return (f"this run (method={method}, release.diagnose={str(diag).lower()}) computes no "
                f"release decisions; it needs {F.RELEASE.needs}")

    # ---- every N steps -----------------------------------------------------------------
    def emit(self, trainer, pl_module, step: int) -> list[Path]:
        """Write the figures of the current window and start a new one."""
        if not self._steps:
            return []
        root = local_run_dir(trainer.loggers, trainer.default_root_dir or ".")
        directory = root / F.ROOT
        step_from = self._steps[0]
        files: list[Path] = []
        run_id = next((lg.run_id for lg in trainer.loggers if hasattr(lg, "run_id")), "")
        for r in self.tables["response_length"]:
            r["run_id"] = r["run_id"] or (run_id or "this run")

        def attempt(name: str, fn) -> None:
            try:
                out = fn()
                if out:
                    files.extend(out)
                    self.written.add(name)
            except Exception as e:  # noqa: BLE001 - a diagnostic never stops training
                self.errors.append(f"{name} at step {step}: {e!r}")
                log.warning("diagnostics: %s failed at step %d: %s\n%s", name, step, e, traceback.format_exc())

        if self._adv is not None:
            rows = advantage_rows(self._adv, step, step_from, self.normalize)
            self.tables["advantage_by_position"].extend(rows)
            attempt("advantage_by_position", lambda: F.write_figure(
                "advantage_by_position", self.tables["advantage_by_position"], directory))
        if self._margin:
            self.tables["margin_by_position"].extend(margin_rows(self._margin, step, step_from, self.normalize))
            attempt("margin_by_position", lambda: F.write_figure(
                "margin_by_position", self.tables["margin_by_position"], directory))
        if self._release and "release_stats" in self.figures:
            for r in self._release:
                r["step"], r["step_from"] = step, step_from
            self.tables["release_stats"].extend(self._release)
            attempt("release_stats", lambda: F.write_figure(
                "release_stats", self.tables["release_stats"], directory, SAMPLE_COLUMNS))
        if self._cases:
            attempt("case_studies", lambda: [
                p for _, rows in self._cases for p in F.write_case_study(rows, directory)])
        if "response_length" in self.figures:
            attempt("response_length", lambda: F.write_figure(
                "response_length", self.tables["response_length"], directory))
        skipped = {k: v for k, v in self.skipped.items() if k in F.BY_NAME}
        if skipped:
            files.append(F.write_skipped(skipped, directory))
        try:
            log_files(trainer.loggers, files, directory, F.ROOT)
            set_run_tag(trainer.loggers, "diagnostics", ",".join(sorted(self.written)))
        except Exception as e:  # noqa: BLE001
            self.errors.append(f"upload at step {step}: {e!r}")
            log.warning("diagnostics: logging the files of step %d failed: %s", step, e)
        self._emitted_at = step
        self._reset_window()
        return files

    def _collect_cases(self, batch: RolloutBatch, pl_module, step: int) -> None:
        """Keep the window's best case studies (:func:`case_priority`: accepted releases by BIC
        gain, 3+ segments first, then the longest).

        Token rows are built only for rollouts that enter the current top ``case_studies``.
        """
        release = batch.release
        if batch.segment_ids is None:
            return
        mask = batch.response_mask
        lengths = (mask > 0).sum(-1)
        margin = adv = None
        for i in select_case_studies(release, mask, self.case_studies):
            key = (*case_priority(release, lengths, i), step)
            if len(self._cases) >= self.case_studies and key <= self._cases[-1][0]:
                continue
            if margin is None:
                spec = getattr(pl_module, "release_spec", None)
                margin = response_margin(batch.teacher_topk_logprobs, getattr(spec, "top_k", 8))
                adv = opd_advantage(batch.teacher_logprobs, batch.student_logprobs, mask)
            pos = (mask[i] > 0).nonzero().flatten()[: self.case_max_tokens].cpu()
            ids = batch.response_ids[i].cpu()[pos].tolist()
            m = margin[i].cpu()[pos] if margin is not None else torch.full((len(pos),), float("nan"))
            rows = case_study_rows(
                token_pieces(self._decode, ids), release.keep_mask[i].cpu()[pos],
                batch.segment_ids[i].cpu()[pos], release.segment_scores[i].cpu(), m, adv[i].cpu()[pos],
                step=step, sample=i, accepted=bool(release.accepted[i]),
                bic_gain=float(release.bic_gain[i]), release_segment=int(release.release_segment[i]),
                release_token=min(int(release.release_token[i]), len(pos)),
                pre_mean=float(release.pre_mean[i]), post_mean=float(release.post_mean[i]),
            )
            self._cases.append((key, rows))
            self._cases.sort(key=lambda c: c[0], reverse=True)
            del self._cases[self.case_studies:]

    def _decode(self, ids: list[int]) -> str:
        tokenizer = self._tokenizer
        if tokenizer is None:
            return "".join(f"<{i}>" for i in ids)
        return tokenizer.decode(ids, skip_special_tokens=False)
