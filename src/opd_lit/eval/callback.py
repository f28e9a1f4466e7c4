"""EvalCallback: the configured benchmarks at the start (if asked), every N steps, and at the end.

Built from the ``eval`` config node as it is (``EvalCallback(**cfg.eval)``): the run settings
of :class:`~opd_lit.eval.harness.EvalSettings` plus one node per benchmark. The benchmark
files are loaded when the callback is built, so a missing file fails the run before any
model is loaded.

It samples with the run's own rollout engine (so evaluation samples exactly like training)
and logs ``eval/<benchmark>/score`` and the other metrics of :mod:`opd_lit.eval.harness`
(the toy also as ``eval/toy/accuracy``). With ``teacher_at_start`` it measures the teacher
once (``eval/<benchmark>/teacher_score``, ``eval/toy/teacher_accuracy``), so every run
records the size of the gap. With ``save_samples`` each evaluation's per-sample records go
to the run as ``eval/<benchmark>/samples-step<step>.jsonl`` (``...-teacher.jsonl``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning as L

from opd_lit.eval.harness import EvalResult, Evaluator, parse_eval_config
from opd_lit.models import end_of_turn_ids
from opd_lit.progress import set_stage
from opd_lit.rollout import HFEngine
from opd_lit.tracking import log_metrics, log_text

log = logging.getLogger(__name__)


class EvalCallback(L.Callback):
    def __init__(self, **eval_config: Any):
        self.config = parse_eval_config(eval_config)
        s = self.config.settings
        self.settings = s
        self.benchmarks = list(s.benchmarks)
        self.every_n_steps = s.every_n_steps
        self.at_start, self.at_end = s.at_start, s.at_end
        self.teacher_at_start = s.teacher_at_start
        self.evaluator = Evaluator(self.config)
        self.history: list[dict] = []

    @property
    def max_new_tokens(self) -> int:
        """The longest response budget among the selected benchmarks (after ``eval.max_new_tokens``)."""
        return max(self.settings.max_new_tokens or spec.max_new_tokens for spec in self.config.selected)

    def on_train_start(self, trainer, pl_module) -> None:
        if self.teacher_at_start:
            self._teacher(trainer, pl_module)
        if self.at_start:
            self.evaluate(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and step < trainer.max_steps:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.at_end:
            self.evaluate(trainer, pl_module)

    def evaluate(self, trainer, pl_module) -> dict[str, float]:
        set_stage(trainer, "eval")
        dm = trainer.datamodule
        dm.prepare_tokenizers()
        t0 = time.perf_counter()
        result = self.evaluator.evaluate(
            pl_module.parts.engine, dm.student_tokenizer, dm.eos_ids, dm.student_template_kwargs
        )
        step = trainer.global_step
        metrics = result.metrics()
        log_metrics(trainer, metrics, step)
        self._save(trainer, result, f"step{step:06d}")
        headline = result.headline()
        self.history.append({"step": step, **headline})
        log.debug("step %d: %s (%.1fs)", step, headline, time.perf_counter() - t0)
        return metrics

    def _teacher(self, trainer, pl_module) -> dict[str, float] | None:
        from opd_lit.teacher import TeacherCallback

        teacher_cb = next((c for c in trainer.callbacks if isinstance(c, TeacherCallback)), None)
        if teacher_cb is None or teacher_cb.teacher is None:
            return None
        set_stage(trainer, "eval")
        dm = trainer.datamodule
        dm.prepare_tokenizers()
        engine = HFEngine(
            teacher_cb.teacher, pad_id=dm.teacher_tokenizer.pad_token_id,
            eos_ids=end_of_turn_ids(dm.teacher_tokenizer, dm.teacher_path),
            batch_size=dm.spec.gen_batch_size,
        )
        result = self.evaluator.evaluate(
            engine, dm.teacher_tokenizer, engine.eos_ids, dm.teacher_template_kwargs
        )
        metrics = result.metrics(teacher=True)
        log_metrics(trainer, metrics, trainer.global_step)
        self._save(trainer, result, "teacher")
        self.history.append({"step": trainer.global_step, **metrics})
        log.debug("teacher: %s", metrics)
        return metrics

    def _save(self, trainer, result: EvalResult, tag: str) -> None:
        if not self.settings.save_samples:
            return
        for name, r in result.results.items():
            for logger in trainer.loggers:
                try:
                    log_text(logger, r.samples_jsonl(), f"eval/{name}/samples-{tag}.jsonl")
                except Exception as e:  # noqa: BLE001 - an artifact store hiccup must not stop training
                    log.warning("could not store eval/%s/samples-%s.jsonl: %r", name, tag, e)
