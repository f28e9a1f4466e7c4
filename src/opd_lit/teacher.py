"""The frozen teacher (and reference model): :class:`TeacherCallback` loads them, the step
scores with them (:meth:`TeacherModels.score`).

:class:`TeacherCallback` owns the models' life: at set-up it checks that the teacher shares
the student's vocabulary (an error naming both sizes otherwise), reports how the two chat
templates render a sample conversation, loads and freezes the teacher and, for ExOPD, the
reference model; at fit start it moves them to the device, or shards them across ranks under
``trainer=fsdp`` with ``trainer.strategy.shard_teacher=true``, and logs the template report.

:meth:`TeacherModels.score` is the teacher stage of :func:`opd_lit.step.run_step`. It fills

- ``teacher_logprobs [B, T]``: log p_T of each sampled token, the teacher seeing the prompt in
  its own chat template followed by the student's response tokens;
- ``teacher_topk_logprobs [B, T, K]``: teacher log-probs at the student's top-K ids;
- ``ref_logprobs [B, T]`` (and ``ref_topk_logprobs``) when the run has a reference model;
- ``lookahead`` (:class:`~opd_lit.lookahead.LookaheadResult`) for LGR: the KV cache of the
  same teacher prefill is kept and every triggered position's K candidates are scored with a
  tree attention mask (:mod:`opd_lit.lookahead`).

All of it goes through :func:`opd_lit.scoring.score_tokens` (chunked; no ``[B, T, V]`` logits).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import lightning as L
import torch

from opd_lit.batch import Needs, RolloutBatch
from opd_lit.lookahead import (
    LookaheadResult,
    PrefillCapture,
    check_attention,
    entropy_trigger,
    lookahead_max_prob,
)
from opd_lit.models import check_same_vocabulary, freeze, load_causal_lm, template_difference
from opd_lit.parallel import forward_call, is_sharded
from opd_lit.scoring import score_tokens

log = logging.getLogger(__name__)


@dataclass
class TeacherModels:
    """The frozen models the step scores rollouts with."""

    teacher: torch.nn.Module
    reference: torch.nn.Module | None = None
    chunk_size: int = 4096  # positions per lm_head chunk
    micro_batch_size: int = 64  # rows per teacher forward

    @torch.no_grad()
    def score(self, batch: RolloutBatch, needs: Needs) -> None:
        """Fill the batch's teacher (and reference) fields that ``needs`` asks for."""
        gather = batch.student_topk_ids if needs.topk else None
        look = needs.lookahead
        if look and batch.student_entropy is None:
            raise RuntimeError("the lookahead needs the student's entropy (needs.entropy)")
        logps, topks, refs, ref_topks, triggers, r_raws = [], [], [], [], [], []
        hiddens, ref_hiddens = [], []
        calls = 0
        t_ids, t_mask = batch.teacher_inputs()
        s_ids, s_mask = batch.student_inputs()
        for start in range(0, batch.batch_size, self.micro_batch_size):
            rows = slice(start, start + self.micro_batch_size)
            resp_ids, resp_mask = batch.response_ids[rows], batch.response_mask[rows]
            cand = None if gather is None else gather[rows]
            if look:
                trig = entropy_trigger(batch.student_entropy[rows], resp_mask, look.tau)
                s, r_raw, n = forward_call(
                    self.teacher, _score_and_look_ahead, t_ids[rows], t_mask[rows], resp_ids, resp_mask,
                    cand, trig, batch.student_topk_ids[rows, :, : look.k], look.segments, self.chunk_size,
                    needs.hidden,
                )
                calls += n
                triggers.append(trig)
                r_raws.append(r_raw)
            else:
                s = forward_call(
                    self.teacher, score_tokens, t_ids[rows], t_mask[rows], resp_ids, resp_mask,
                    gather_ids=cand, chunk_size=self.chunk_size, return_hidden=needs.hidden,
                )
            calls += 1
            logps.append(s.logprobs)
            if needs.hidden:
                hiddens.append(s.hidden)
            if cand is not None:
                topks.append(s.topk_logprobs)
            if self.reference is not None:
                r = forward_call(
                    self.reference, score_tokens, s_ids[rows], s_mask[rows], resp_ids, resp_mask,
                    gather_ids=cand, chunk_size=self.chunk_size, return_hidden=needs.hidden,
                )
                refs.append(r.logprobs)
                if needs.hidden:
                    ref_hiddens.append(r.hidden)
                if cand is not None:
                    ref_topks.append(r.topk_logprobs)
        batch.teacher_logprobs = torch.cat(logps)
        if topks:
            batch.teacher_topk_logprobs = torch.cat(topks)
        if refs:
            batch.ref_logprobs = torch.cat(refs)
        if ref_topks:
            batch.ref_topk_logprobs = torch.cat(ref_topks)
        if hiddens:  # packed over valid tokens, row-major over the whole batch
            batch.teacher_hidden = torch.cat(hiddens)
        if ref_hiddens:
            batch.ref_hidden = torch.cat(ref_hiddens)
        if look:
            trigger = torch.cat(triggers)
            batch.lookahead = LookaheadResult(
                trigger=trigger, r_raw=torch.cat(r_raws), teacher_calls=calls,
                branch_tokens=int(trigger.sum()) * look.k,
            )


def _score_and_look_ahead(
    teacher, ids, mask, resp_ids, resp_mask, cand, trigger, branch_ids, segments, chunk_size, hidden,
):
    """One micro-batch: the teacher prefill (its KV cache kept) and LGR's branch forwards over
    it. Run as the teacher's forward (:func:`opd_lit.parallel.forward_call`); a sharded
    teacher runs exactly ``segments`` branch forwards on every rank."""
    capture = PrefillCapture(teacher)
    s = score_tokens(
        capture, ids, mask, resp_ids, resp_mask, gather_ids=cand, chunk_size=chunk_size, return_hidden=hidden,
    )
    r_raw, n = lookahead_max_prob(
        teacher, capture.cache, mask, trigger, branch_ids, segments=segments, chunk_size=chunk_size,
        fixed_calls=is_sharded(teacher),
    )
    return s, r_raw, n


class TeacherCallback(L.Callback):
    """Loads, freezes, places and reports the teacher and the reference model."""

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
        self.models: TeacherModels | None = None
        self.template_report = ""

    @property
    def teacher(self) -> torch.nn.Module | None:
        return None if self.models is None else self.models.teacher

    # ---- start-up ----------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.models is not None:
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
        log.debug(self.template_report)
        needs: Needs = pl_module.needs
        teacher = freeze(
            load_causal_lm(
                self.path, dtype=self.dtype, attn_implementation=self.attn_implementation,
                key="teacher.path",
            )
        )
        if needs.lookahead:
            check_attention(teacher)  # before any rollout
        reference = None
        if needs.reference:
            # "student_init" reloads the initial student from its path (not a copy of the
            # module), so a resumed run gets the same reference as a fresh one.
            ref = needs.reference
            path, key = (dm.student_path, "student.path") if ref == "student_init" else (ref, "method.reference")
            reference = freeze(load_causal_lm(path, dtype=self.dtype, key=key))
        self.models = TeacherModels(
            teacher, reference, chunk_size=self.chunk_size, micro_batch_size=self.micro_batch_size
        )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = trainer.datamodule
        models = self.models
        check_same_vocabulary(
            dm.student_tokenizer, dm.teacher_tokenizer, pl_module.student, models.teacher,
            student_name=f"student ({dm.student_path})", teacher_name=f"teacher ({self.path})",
        )
        strategy = trainer.strategy
        if getattr(strategy, "shard_teacher", False) and not is_sharded(models.teacher):
            from opd_lit.parallel import shard_model

            mesh = pl_module.device_mesh["data_parallel"]
            for name in ("teacher", "reference"):
                model = getattr(models, name)
                if model is not None:
                    model.to(pl_module.device)
                    shard_model(model, mesh, param_dtype=None, reshard_after_forward=True)
        else:
            models.teacher.to(pl_module.device)
            if models.reference is not None:
                models.reference.to(pl_module.device)
        for lg in trainer.loggers:
            if hasattr(lg, "experiment") and hasattr(lg, "run_id"):
                lg.experiment.log_text(lg.run_id, self.template_report, "chat_templates.txt")
