"""EvalCallback: greedy accuracy on held-out problems at the start, every N steps, and at the end.

Uses the run's own rollout engine (so evaluation samples exactly like training) and logs
``eval/<benchmark>/accuracy``. With ``teacher_at_start`` it also measures the teacher once
(``eval/<benchmark>/teacher_accuracy``), so every run records the size of the gap.
"""

from __future__ import annotations

import logging
import time

import lightning as L

from opd_lit.eval.graders import grade_math
from opd_lit.models import end_of_turn_ids, render_prompt
from opd_lit.progress import set_stage
from opd_lit.rollout import HFEngine
from opd_lit.tracking import log_metrics

log = logging.getLogger(__name__)

BENCHMARKS = ("toy",)


def toy_problems(n: int) -> list[dict]:
    from opd_lit.toy import toy_eval_problems
    from opd_lit.toy.task import format_prompt

    return [{"id": p["id"], "messages": format_prompt(p), "answer": p["answer"]} for p in toy_eval_problems(n)]


class EvalCallback(L.Callback):
    def __init__(
        self,
        benchmarks: list[str] | tuple[str, ...] = ("toy",),
        every_n_steps: int = 0,
        at_start: bool = True,
        at_end: bool = True,
        num_problems: int = 256,
        max_new_tokens: int = 128,
        teacher_at_start: bool = False,
    ):
        unknown = [b for b in benchmarks if b not in BENCHMARKS]
        if unknown:
            raise ValueError(f"eval.benchmarks: unknown {unknown}; available: {list(BENCHMARKS)}")
        if every_n_steps < 0:
            raise ValueError(f"eval.every_n_steps={every_n_steps}: must be >= 0 (0 = never)")
        self.benchmarks = list(benchmarks)
        self.every_n_steps = every_n_steps
        self.at_start, self.at_end = at_start, at_end
        self.num_problems = num_problems
        self.max_new_tokens = max_new_tokens
        self.teacher_at_start = teacher_at_start
        self.history: list[dict] = []

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

    def _accuracy(self, engine, tokenizer, template_kwargs, dm) -> dict[str, float]:
        out = {}
        for name in self.benchmarks:
            problems = toy_problems(self.num_problems)
            prompts = [render_prompt(tokenizer, p["messages"], **template_kwargs) for p in problems]
            gen = engine.generate(prompts, 1, dm.sampling_params(self.max_new_tokens, greedy=True))
            texts = tokenizer.batch_decode(gen.response_ids, skip_special_tokens=True)
            out[name] = sum(grade_math(t, p["answer"]) for t, p in zip(texts, problems)) / len(problems)
        return out

    def evaluate(self, trainer, pl_module) -> dict[str, float]:
        set_stage(trainer, "eval")
        dm = trainer.datamodule
        t0 = time.perf_counter()
        scores = self._accuracy(dm.engine, dm.student_tokenizer, dm.student_template_kwargs, dm)
        step = trainer.global_step
        metrics = {f"eval/{k}/accuracy": v for k, v in scores.items()}
        log_metrics(trainer, metrics, step)
        self.history.append({"step": step, **metrics})
        log.info("step %d: %s (%.1fs)", step, metrics, time.perf_counter() - t0)
        return metrics

    def _teacher(self, trainer, pl_module) -> None:
        from opd_lit.teacher import TeacherCallback

        teacher_cb = next((c for c in trainer.callbacks if isinstance(c, TeacherCallback)), None)
        if teacher_cb is None or teacher_cb.teacher is None:
            return
        dm = trainer.datamodule
        engine = HFEngine(
            teacher_cb.teacher, pad_id=dm.teacher_tokenizer.pad_token_id,
            eos_ids=end_of_turn_ids(dm.teacher_tokenizer, dm.teacher_path),
        )
        scores = self._accuracy(engine, dm.teacher_tokenizer, dm.teacher_template_kwargs, dm)
        metrics = {f"eval/{k}/teacher_accuracy": v for k, v in scores.items()}
        log_metrics(trainer, metrics, trainer.global_step)
        self.history.append({"step": trainer.global_step, **metrics})
        log.info("teacher: %s", metrics)
