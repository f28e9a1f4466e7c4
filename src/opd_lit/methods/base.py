"""The base LightningModule shared by every supervision method.

It owns the student, the optimizer, the loss and the logging. A method subclasses it and
overrides one function, :meth:`DistillModule.supervise`, which maps a scored rollout batch to
``(advantage [B, T], weight [B, T], stats)``, and declares what it needs from the teacher
through :attr:`DistillModule.needs`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch

from opd_lit.batch import RolloutBatch
from opd_lit.models import load_causal_lm
from opd_lit.objectives import masked_mean, opd_advantage, policy_gradient_loss
from opd_lit.progress import set_stage
from opd_lit.scoring import score_tokens
from opd_lit.settings import spec_from


@dataclass(frozen=True)
class Lookahead:
    """LGR's request to the TeacherCallback: branch the student's top-``k`` candidates at
    every response position whose student entropy exceeds ``tau``, in ``segments`` forwards."""

    k: int = 8
    tau: float = 0.2
    segments: int = 8


@dataclass(frozen=True)
class Needs:
    """What a method asks of the rollout DataModule and the TeacherCallback.

    ``topk`` is the number of student candidate ids the DataModule records (sorted, most
    likely first) and the teacher scores; it is the largest K any consumer uses, and each
    consumer (the release rule, LGR) slices its own ``[..., :k]``.
    """

    topk: int = 0  # student top-K candidate ids per position, scored by the teacher
    segments: bool = False  # sentence segment ids of each response
    reference: str | None = None  # "student_init" or a model path (ExOPD)
    entropy: bool = False  # the student's entropy at each position
    lookahead: Lookahead | None = None  # LGR lookahead branches (None: no lookahead)


@dataclass
class Supervision:
    advantage: torch.Tensor  # [B, T]
    weight: torch.Tensor  # [B, T]
    stats: dict[str, float] = field(default_factory=dict)
    # Optional extra term over candidate tokens (LGR variant=topk): the loss adds
    # -Σ_t w_t Σ_k softmax_k(log π_θ(c_k)) · candidate_reward_k / Σ_t mask_t.
    candidate_ids: torch.Tensor | None = None  # [B, T, K]
    candidate_reward: torch.Tensor | None = None  # [B, T, K]


@dataclass
class StudentSpec:
    path: str = "toy:student"
    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False
    template_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimSpec:
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | cosine
    min_lr_ratio: float = 0.1  # cosine floor, as a fraction of lr
    max_grad_norm: float = 1.0


@dataclass
class LossSpec:
    micro_batch_size: int = 64  # rows per forward/backward; the loss is over the whole batch
    chunk_size: int = 4096  # positions per lm_head chunk
    max_skipped_in_a_row: int = 3  # non-finite loss/grad: skip, then stop after this many


@dataclass
class ReleaseSpec:
    top_k: int = 8  # student support size for the teacher margin
    signal: str = "margin"  # margin | adv_std
    diagnose: bool = True  # compute release statistics for every method (metrics)


SIGNALS = ("margin", "adv_std")
SCHEDULES = ("constant", "cosine")


def _spec(cls, values: dict[str, Any] | None, section: str):
    values = dict(values or {})
    if "betas" in values:
        values["betas"] = tuple(values["betas"])
    return spec_from(cls, values, section)


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


class DistillModule(L.LightningModule):
    """Base of the six methods. Subclasses set ``name`` and override :meth:`supervise`."""

    name = "base"
    uses_release = False  # the method itself needs the release rule's inputs
    diagnostic_topk = 0  # student top-K the diagnostics' margin curves ask for (DiagnosticsCallback.setup)

    def __init__(
        self,
        student: dict[str, Any] | None = None,
        optim: dict[str, Any] | None = None,
        loss: dict[str, Any] | None = None,
        release: dict[str, Any] | None = None,
        name: str | None = None,
        label: str | None = None,
    ):
        super().__init__()
        self.automatic_optimization = False
        self.student_spec: StudentSpec = _spec(StudentSpec, student, "student")
        self.optim_spec: OptimSpec = _spec(OptimSpec, optim, "optim")
        self.loss_spec: LossSpec = _spec(LossSpec, loss, "loss")
        self.release_spec: ReleaseSpec = _spec(ReleaseSpec, release, "release")
        if self.release_spec.signal not in SIGNALS:
            raise ValueError(f"release.signal={self.release_spec.signal!r} is not one of {list(SIGNALS)}")
        if self.release_spec.top_k < 2:
            raise ValueError(
                f"release.top_k={self.release_spec.top_k}: the teacher margin needs at least 2 "
                "candidates (allowed: integers >= 2)"
            )
        if self.optim_spec.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule={self.optim_spec.schedule!r} is not one of {list(SCHEDULES)}")
        self.student = load_causal_lm(
            self.student_spec.path,
            dtype=self.student_spec.dtype,
            attn_implementation=self.student_spec.attn_implementation,
            key="student.path",
        )
        if self.student_spec.gradient_checkpointing:
            self.student.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        self.student.config.use_cache = False
        self.student.train()
        self.skipped_steps = 0
        self._skipped_in_a_row = 0

    # ---- what a method overrides -------------------------------------------------------
    @property
    def needs(self) -> Needs:
        release = self.uses_release or self.release_spec.diagnose
        return Needs(
            topk=max(self.release_spec.top_k if release else 0, self.diagnostic_topk),
            segments=release,
        )

    def supervise(self, batch: RolloutBatch) -> Supervision:
        raise NotImplementedError

    def generation_limit(self, default: int) -> int:
        """Max new tokens for this step's rollouts (fixed-prefix truncation overrides it)."""
        return default

    # ---- shared pieces methods call ----------------------------------------------------
    def opd_advantage(self, batch: RolloutBatch) -> torch.Tensor:
        return opd_advantage(batch.teacher_logprobs, batch.student_logprobs, batch.response_mask)

    def release_decision(self, batch: RolloutBatch, advantage: torch.Tensor | None = None):
        """The BIC release rule on this batch (computed once per batch, then cached)."""
        if "release" not in batch.extras:
            from opd_lit.release import release_weights_batch

            if advantage is None:
                advantage = self.opd_advantage(batch)
            t0 = time.perf_counter()
            topk = batch.teacher_topk_logprobs
            if topk is not None:
                topk = topk[..., : self.release_spec.top_k]  # needs.topk may be larger (LGR)
            batch.extras["release"] = release_weights_batch(
                advantage,
                batch.response_mask,
                topk,
                batch.segment_ids,
                signal=self.release_spec.signal,
            )
            batch.timings["release_s"] = time.perf_counter() - t0
        return batch.extras["release"]

    # ---- optimisation ------------------------------------------------------------------
    def configure_optimizers(self):
        spec = self.optim_spec
        params = [p for p in self.student.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(
            params, lr=spec.lr, betas=spec.betas, eps=spec.eps, weight_decay=spec.weight_decay
        )
        total = max(1, int(self.trainer.max_steps)) if self._trainer is not None else 1

        def factor(step: int) -> float:
            if spec.warmup_steps and step < spec.warmup_steps:
                return (step + 1) / spec.warmup_steps
            if spec.schedule == "cosine":
                progress = min(1.0, (step - spec.warmup_steps) / max(1, total - spec.warmup_steps))
                cos = 0.5 * (1 + math.cos(math.pi * progress))
                return spec.min_lr_ratio + (1 - spec.min_lr_ratio) * cos
            return 1.0

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _micro_batches(self, batch: RolloutBatch):
        """Row slices of at most ``loss.micro_batch_size`` rows, trimmed to their own widths."""
        mb = max(1, self.loss_spec.micro_batch_size)
        for start in range(0, batch.batch_size, mb):
            rows = slice(start, start + mb)
            mask = batch.response_mask[rows]
            if mask.sum() == 0:
                continue
            width = int(mask.sum(-1).max().item())
            pmask = batch.prompt_mask[rows]
            first = int((pmask.sum(0) > 0).nonzero()[0].item()) if pmask.any() else pmask.shape[1] - 1
            yield rows, first, width

    def training_step(self, batch: RolloutBatch, batch_idx: int):
        set_stage(self.trainer, "update")
        t0 = time.perf_counter()
        sup = self.supervise(batch)
        advantage, weight = sup.advantage.detach(), sup.weight.detach()
        mask = batch.response_mask
        num_tokens = mask.sum()
        # Numeric guard: padding never carries a NaN/inf into the loss (NaN * 0 is NaN), and a
        # non-finite advantage or weight on a real token skips the update (no forward at all).
        valid = mask > 0
        bad_inputs = [
            name for name, x in (("advantage", advantage), ("weight", weight), ("candidate_reward", sup.candidate_reward))
            if x is not None and not bool(torch.isfinite(x[valid]).all())
        ]
        advantage = torch.where(valid, advantage, torch.zeros_like(advantage))
        weight = torch.where(valid, weight, torch.zeros_like(weight))

        opt = self.optimizers()
        sched = self.lr_schedulers()
        opt.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for rows, first, width in (self._micro_batches(batch) if not bad_inputs else ()):
            ids = torch.cat([batch.prompt_ids[rows, first:], batch.response_ids[rows, :width]], 1)
            am = torch.cat([batch.prompt_mask[rows, first:], mask[rows, :width].long()], 1)
            cand = None if sup.candidate_ids is None else sup.candidate_ids[rows, :width]
            scores = score_tokens(
                self.student, ids, am, batch.response_ids[rows, :width], mask[rows, :width],
                gather_ids=cand, chunk_size=self.loss_spec.chunk_size,
            )
            loss = policy_gradient_loss(
                scores.logprobs, advantage[rows, :width], weight[rows, :width], num_tokens
            )
            if cand is not None:
                from opd_lit.lookahead import expected_group_reward_loss

                loss = loss + expected_group_reward_loss(
                    scores.topk_logprobs, sup.candidate_reward[rows, :width],
                    weight[rows, :width], num_tokens,
                )
            self.manual_backward(loss)
            total = total + loss.detach()

        grad_norm = self._grad_norm()
        if bad_inputs:
            total = torch.full((), float("nan"), device=self.device)  # logged: no loss this step
        bad = bad_inputs or [
            name for name, ok in (("loss", bool(torch.isfinite(total))), ("gradient", math.isfinite(grad_norm)))
            if not ok
        ]
        if not bad:
            self._skipped_in_a_row = 0
            opt.step()
        else:
            opt.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            self._skipped_in_a_row += 1
            if self._skipped_in_a_row >= self.loss_spec.max_skipped_in_a_row:
                raise NonFiniteError(
                    f"{self._skipped_in_a_row} steps in a row had a non-finite "
                    f"{' / '.join(bad)} (loss={float(total)}, grad_norm={grad_norm}); stopping at "
                    f"step {self.trainer.global_step} (loss.max_skipped_in_a_row="
                    f"{self.loss_spec.max_skipped_in_a_row}; the previous updates are in the last checkpoint)"
                )
            # No gradients, so the optimizer changes nothing; the step still counts, which keeps
            # the global step equal to the data position (what a resumed run restarts from).
            opt.step()
        sched.step()
        update_s = time.perf_counter() - t0

        metrics = self._step_metrics(batch, sup, advantage, weight, total, grad_norm, update_s)
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=batch.batch_size)
        for key in ("train/loss", "train/kept_frac", "rollout/accuracy"):
            if key in metrics:
                self.log(key.split("/")[-1], metrics[key], prog_bar=True, logger=False,
                         batch_size=batch.batch_size)
        return total

    def _grad_norm(self) -> float:
        params = [p for p in self.student.parameters() if p.grad is not None]
        if not params:
            return 0.0
        clip = self.optim_spec.max_grad_norm if self.optim_spec.max_grad_norm > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
        return float(norm)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        dm = self.trainer.datamodule
        if dm is not None and hasattr(dm, "sync_weights"):
            seconds = dm.sync_weights(self.student)
            self.log("rollout/sync_s", seconds, on_step=True, batch_size=1)

    # ---- logging -----------------------------------------------------------------------
    def _step_metrics(self, batch, sup, advantage, weight, loss, grad_norm, update_s) -> dict:
        mask = batch.response_mask
        valid = mask > 0
        n_tok = max(1.0, float(mask.sum()))
        lengths = mask.sum(-1)
        t = batch.timings
        m: dict[str, float] = {
            "train/loss": float(loss),
            "train/adv_mean": float(masked_mean(advantage, mask)),
            "train/kept_frac": float(((weight > 0) & valid).sum()) / n_tok,
            "train/grad_norm": grad_norm,
            "train/lr": float(self.optimizers().param_groups[0]["lr"]),
            "train/skipped_steps": float(self.skipped_steps),
            "rollout/response_len_mean": float(lengths.mean()),
            "rollout/response_len_max": float(lengths.max()),
            "rollout/tokens_per_s": t.get("rollout_tokens", 0.0) / max(t.get("rollout_s", 0.0), 1e-9),
            "teacher/tokens_per_s": float(mask.sum()) / max(t.get("teacher_s", 0.0), 1e-9),
            "teacher/logp_mean": float(masked_mean(batch.teacher_logprobs, mask)),
            "student/logp_mean": float(masked_mean(batch.student_logprobs, mask)),
            "time/rollout_s": t.get("rollout_s", 0.0),
            "time/teacher_s": t.get("teacher_s", 0.0),
            "time/student_score_s": t.get("student_score_s", 0.0),
            "time/segment_s": t.get("segment_s", 0.0),
            "time/update_s": update_s,
        }
        if batch.student_entropy is not None:
            m["student/entropy_mean"] = float(masked_mean(batch.student_entropy, mask))
        acc = self._rollout_accuracy(batch)
        if acc is not None:
            m["rollout/accuracy"] = acc
        if self.needs.segments and batch.teacher_topk_logprobs is not None:
            rel = self.release_decision(batch)
            m["time/release_s"] = t.get("release_s", 0.0)
            nonempty = lengths > 0
            released_at = torch.minimum(rel.release_token.to(lengths.dtype), lengths)
            if nonempty.any():
                m.update({
                    "release/accepted_frac": float(rel.accepted[nonempty].float().mean()),
                    "release/release_segment_mean": float(rel.release_segment[nonempty].float().mean()),
                    "release/num_segments_mean": float(rel.num_segments[nonempty].float().mean()),
                    "release/bic_gain_mean": float(rel.bic_gain[nonempty].float().mean()),
                    # relative position of the release point (1.0 = nothing released)
                    "release/release_pos_frac": float(
                        (released_at[nonempty] / lengths[nonempty].clamp(min=1)).mean()
                    ),
                })
        m.update(sup.stats)
        return m

    def _rollout_accuracy(self, batch: RolloutBatch) -> float | None:
        answers = [r.get("answer") for r in batch.records]
        texts = batch.extras.get("response_text")
        if texts is None or any(a is None for a in answers):
            return None
        from opd_lit.eval.graders import grade_math

        return sum(grade_math(t, a) for t, a in zip(texts, answers)) / max(1, len(answers))
