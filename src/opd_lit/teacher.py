"""TeacherCallback: scores every rollout once with the frozen teacher (and reference model).

At fit start it loads the teacher, checks that it shares the student's vocabulary (error
naming both sizes otherwise) and reports how the two chat templates render a sample
conversation. Before each training step it fills the batch with

- ``teacher_logprobs [B, T]``: log p_T of each sampled token, the teacher seeing the prompt in
  its own chat template followed by the student's response tokens;
- ``teacher_topk_logprobs [B, T, K]``: teacher log-probs at the student's top-K ids;
- ``ref_logprobs [B, T]`` when the method asks for a reference model (ExOPD);
- ``extras["lookahead"]`` (:class:`~opd_lit.lookahead.LookaheadResult`) when the method asks
  for LGR's lookahead: the KV cache of the same teacher prefill is kept and every triggered
  position's K candidates are scored with a tree attention mask (:mod:`opd_lit.lookahead`).

All of it goes through :func:`opd_lit.scoring.score_tokens` (chunked; no ``[B, T, V]`` logits).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning as L
import torch

from opd_lit.lookahead import (
    LookaheadResult,
    PrefillCapture,
    check_attention,
    entropy_trigger,
    lookahead_max_prob,
)
from opd_lit.models import (
    check_same_vocabulary,
    freeze,
    load_causal_lm,
    template_difference,
)
from opd_lit.progress import set_stage
from opd_lit.scoring import score_tokens

log = logging.getLogger(__name__)


class TeacherCallback(L.Callback):
    def __init__(
        self,
        path: str,
        dtype: str = "float32",
        attn_implementation: str = "sdpa",
        chunk_size: int = 4096,
        micro_batch_size: int = 64,
        name: str | None = None,
    ):
        self.path = path
        self.dtype = dtype
        self.attn_implementation = attn_implementation
        self.chunk_size = chunk_size
        self.micro_batch_size = micro_batch_size
        self.name = name or str(path)
        self.teacher: torch.nn.Module | None = None
        self.reference: torch.nn.Module | None = None
        self.template_report = ""

    # ---- start-up ----------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.teacher is not None:
            return
        dm = trainer.datamodule
        dm.prepare_tokenizers()
        # Tokenizers first: a vocabulary mismatch is reported before any weights load.
        check_same_vocabulary(
            dm.student_tokenizer, dm.teacher_tokenizer,
            student_name=f"student ({dm.student_path})", teacher_name=f"teacher ({self.path})",
        )
        self.template_report = template_difference(
            dm.student_tokenizer, dm.teacher_tokenizer,
            student_kwargs=dm.student_template_kwargs, teacher_kwargs=dm.teacher_template_kwargs,
        )
        log.info(self.template_report)
        self.teacher = freeze(
            load_causal_lm(
                self.path, dtype=self.dtype, attn_implementation=self.attn_implementation,
                key="teacher.path",
            )
        )
        if pl_module.needs.lookahead:
            check_attention(self.teacher)  # before any rollout
        ref = pl_module.needs.reference
        if ref:
            # "student_init" reloads the initial student from its path (not a copy of the
            # module), so a resumed run gets the same reference as a fresh one.
            path, key = (dm.student_path, "student.path") if ref == "student_init" else (ref, "method.reference")
            self.reference = freeze(load_causal_lm(path, dtype=self.dtype, key=key))

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = trainer.datamodule
        check_same_vocabulary(
            dm.student_tokenizer, dm.teacher_tokenizer, pl_module.student, self.teacher,
            student_name=f"student ({dm.student_path})", teacher_name=f"teacher ({self.path})",
        )
        self.teacher.to(pl_module.device)
        if self.reference is not None:
            self.reference.to(pl_module.device)
        for lg in trainer.loggers:
            if hasattr(lg, "experiment") and hasattr(lg, "run_id"):
                lg.experiment.log_text(lg.run_id, self.template_report, "chat_templates.txt")

    # ---- every step --------------------------------------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        set_stage(trainer, "teacher")
        t0 = time.perf_counter()
        self.score_batch(batch, pl_module.needs)
        batch.timings["teacher_s"] = time.perf_counter() - t0

    @torch.no_grad()
    def score_batch(self, batch, needs) -> None:
        gather = batch.student_topk_ids if needs.topk else None
        look = needs.lookahead
        if look and batch.student_entropy is None:
            raise RuntimeError("the lookahead needs the student's entropy (set needs.entropy)")
        logps, topks, refs, triggers, r_raws = [], [], [], [], []
        calls = 0
        t_ids, t_mask = batch.teacher_inputs()
        if self.reference is not None:
            s_ids, s_mask = batch.student_inputs()
        for start in range(0, batch.batch_size, self.micro_batch_size):
            rows = slice(start, start + self.micro_batch_size)
            resp_ids, resp_mask = batch.response_ids[rows], batch.response_mask[rows]
            # with a lookahead, keep the KV cache of this (single) teacher prefill
            model = PrefillCapture(self.teacher) if look else self.teacher
            s = score_tokens(
                model, t_ids[rows], t_mask[rows], resp_ids, resp_mask,
                gather_ids=None if gather is None else gather[rows], chunk_size=self.chunk_size,
            )
            calls += 1
            logps.append(s.logprobs)
            if gather is not None:
                topks.append(s.topk_logprobs)
            if look:
                trig = entropy_trigger(batch.student_entropy[rows], resp_mask, look.tau)
                r_raw, n = lookahead_max_prob(
                    self.teacher, model.cache, t_mask[rows], trig,
                    batch.student_topk_ids[rows, :, : look.k],
                    segments=look.segments, chunk_size=self.chunk_size,
                )
                del model  # frees the KV cache
                calls += n
                triggers.append(trig)
                r_raws.append(r_raw)
            if self.reference is not None:
                r = score_tokens(
                    self.reference, s_ids[rows], s_mask[rows], resp_ids, resp_mask,
                    chunk_size=self.chunk_size,
                )
                refs.append(r.logprobs)
        batch.teacher_logprobs = torch.cat(logps)
        if topks:
            batch.teacher_topk_logprobs = torch.cat(topks)
        if refs:
            batch.ref_logprobs = torch.cat(refs)
        if look:
            trigger = torch.cat(triggers)
            batch.extras["lookahead"] = LookaheadResult(
                trigger=trigger, r_raw=torch.cat(r_raws), teacher_calls=calls,
                branch_tokens=int(trigger.sum()) * look.k,
            )
