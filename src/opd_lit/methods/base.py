"""The base LightningModule shared by every supervision method.

It owns the student, the optimizer and the step's set-up; the step itself, every stage of it,
is :func:`opd_lit.step.run_step`. A method subclasses the base and overrides one function,
:meth:`DistillModule.supervise`, which maps a scored rollout batch to ``(advantage [B, T],
weight [B, T], stats)``, and declares what it needs from the batch through
:attr:`DistillModule.needs`. A method with a loss term of its own (LGR's ``topk`` variant)
also overrides :meth:`DistillModule.extra_loss`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch

from opd_lit.batch import Lookahead, Needs, RolloutBatch
from opd_lit.models import load_causal_lm
from opd_lit.objectives import ESTIMATORS, opd_advantage
from opd_lit.settings import spec_from

log = logging.getLogger(__name__)

__all__ = ["DistillModule", "Lookahead", "Needs", "NonFiniteError", "Supervision"]


@dataclass
class Supervision:
    """What a method hands to the update (every tensor ``[B, T]`` unless noted)."""

    advantage: torch.Tensor  # A_t of the sampled token (the `sampled` estimator's coefficient)
    weight: torch.Tensor  # w_t ≥ 0: where, and how much, each token is supervised
    stats: dict[str, float] = field(default_factory=dict)  # the method's own metrics
    # The target of the `topk` / `full` estimators: log q = c·log p_T + (1 − c)·log p_ref
    # (ExOPD's λ; 1 = the teacher alone).
    teacher_coef: float = 1.0
    # Student candidates scored with gradients in the update, for :meth:`extra_loss`
    # (``batch.student_topk_ids[..., :candidate_k]``; 0 = none).
    candidate_k: int = 0
    # Further per-token inputs that must be finite on response tokens ([B, T] or [B, T, K]).
    checked: dict[str, torch.Tensor] = field(default_factory=dict)


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
    estimator: str = "sampled"  # sampled | topk | full (objectives.ESTIMATORS)
    topk: int = 8  # estimator=topk: the student's top-K candidates the KL runs over
    topk_renorm: bool = True  # estimator=topk: renormalise both distributions over the K
    # Which log π_θ(y_t) the sampled advantage subtracts: "trainer" (the update's own forward,
    # the training model's numerics) or "rollout" (what the scoring pass / the engine gave).
    advantage_logprobs: str = "trainer"
    rollout_is: bool = False  # token-level truncated importance weight min(π_θ/π_rollout, cap)
    rollout_is_cap: float = 5.0


@dataclass
class ReleaseSpec:
    top_k: int = 8  # student support size for the teacher margin
    signal: str = "margin"  # margin | adv_std
    diagnose: bool = True  # compute release statistics for every method (metrics)
    segmenter: str = "structured"  # structured (lines, sentences, display math) | punkt


SIGNALS = ("margin", "adv_std")
SCHEDULES = ("constant", "cosine")
ADVANTAGE_LOGPROBS = ("trainer", "rollout")


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
    uses_release = False  # the method itself needs the release rule's decision

    def __init__(
        self,
        student: dict[str, Any] | None = None,
        optim: dict[str, Any] | None = None,
        loss: dict[str, Any] | None = None,
        release: dict[str, Any] | None = None,
        divergence: dict[str, Any] | None = None,
        name: str | None = None,
        label: str | None = None,
    ):
        super().__init__()
        self.automatic_optimization = False
        self.student_spec: StudentSpec = _spec(StudentSpec, student, "student")
        self.optim_spec: OptimSpec = _spec(OptimSpec, optim, "optim")
        self.loss_spec: LossSpec = _spec(LossSpec, loss, "loss")
        self.release_spec: ReleaseSpec = _spec(ReleaseSpec, release, "release")
        self._check_specs()
        from opd_lit.guards import DivergenceGuard

        self.guard = DivergenceGuard(divergence)  # divergence.*: watches each step's loss and gradient
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
        self.parts = None  # opd_lit.step.StepParts, built in setup()

    def _check_specs(self) -> None:
        rel, loss, opt = self.release_spec, self.loss_spec, self.optim_spec
        from opd_lit.release import check_segmenter

        check_segmenter(rel.segmenter)
        if rel.signal not in SIGNALS:
            raise ValueError(f"release.signal={rel.signal!r} is not one of {list(SIGNALS)}")
        if rel.top_k < 2:
            raise ValueError(
                f"release.top_k={rel.top_k}: the teacher margin needs at least 2 "
                "candidates (allowed: integers >= 2)"
            )
        if opt.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule={opt.schedule!r} is not one of {list(SCHEDULES)}")
        if loss.estimator not in ESTIMATORS:
            raise ValueError(f"loss.estimator={loss.estimator!r} is not one of {list(ESTIMATORS)}")
        if loss.topk < 1:
            raise ValueError(f"loss.topk={loss.topk}: allowed is an integer >= 1 (candidates per position)")
        if loss.advantage_logprobs not in ADVANTAGE_LOGPROBS:
            raise ValueError(
                f"loss.advantage_logprobs={loss.advantage_logprobs!r} is not one of {list(ADVANTAGE_LOGPROBS)}"
            )
        if not (loss.rollout_is_cap > 0 and math.isfinite(loss.rollout_is_cap)):
            raise ValueError(f"loss.rollout_is_cap={loss.rollout_is_cap}: allowed is a finite number > 0")

    # ---- what a method overrides -------------------------------------------------------
    @property
    def needs(self) -> Needs:
        """What this method reads from the batch (the step adds the estimator's and the
        diagnostics' needs at set-up)."""
        if self.uses_release:
            return Needs(topk=self.release_spec.top_k, segments=True, release=True)
        return Needs()

    def supervise(self, batch: RolloutBatch) -> Supervision:
        raise NotImplementedError

    def extra_loss(self, sup: Supervision, scores, rows: slice, width: int, num_tokens) -> torch.Tensor | None:
        """A method's own loss term for one micro-batch (``scores``: the student's
        :class:`~opd_lit.scoring.TokenScores` of rows ``rows`` and ``width`` response columns,
        with gradients; ``topk_logprobs`` at the ``sup.candidate_k`` candidates). None: none."""
        return None

    def generation_limit(self, default: int) -> int:
        """Max new tokens for this step's rollouts (fixed-prefix truncation overrides it)."""
        return default

    # ---- shared pieces methods call ----------------------------------------------------
    def opd_advantage(self, batch: RolloutBatch) -> torch.Tensor:
        return opd_advantage(batch.teacher_logprobs, batch.student_logprobs, batch.response_mask)

    def release_decision(self, batch: RolloutBatch, advantage: torch.Tensor | None = None):
        """The BIC release rule on this batch (``batch.release``, computed once)."""
        if batch.release is None:
            from opd_lit.release import release_weights_batch

            if advantage is None:
                advantage = self.opd_advantage(batch)
            topk = batch.teacher_topk_logprobs
            if topk is not None:
                topk = topk[..., : self.release_spec.top_k]  # needs.topk may be larger (LGR)
            batch.release = release_weights_batch(
                advantage, batch.response_mask, topk, batch.segment_ids, signal=self.release_spec.signal,
            )
        return batch.release

    # ---- set-up ------------------------------------------------------------------------
    def step_needs(self, callbacks=()) -> Needs:
        """The method's needs merged with the estimator's, the release statistics' and those
        of any callback that declares ``needs`` (the diagnostics' margin figures)."""
        loss = self.loss_spec
        estimator = {
            "sampled": Needs(),
            "topk": Needs(topk=loss.topk),
            "full": Needs(hidden=True),
        }[loss.estimator]
        diagnose = Needs(topk=self.release_spec.top_k, release=True) if self.release_spec.diagnose else Needs()
        extra = [cb.needs for cb in callbacks if isinstance(getattr(cb, "needs", None), Needs)]
        return self.needs.merge(estimator, diagnose, *extra)

    def setup(self, stage: str) -> None:
        """Assemble the step once: the merged needs, the teacher, the rollout engine."""
        if self.parts is not None:
            return
        from opd_lit.rollout import build_engine
        from opd_lit.step import StepParts
        from opd_lit.teacher import TeacherCallback

        trainer = self.trainer
        teacher_cb = next((c for c in trainer.callbacks if isinstance(c, TeacherCallback)), None)
        if teacher_cb is None or teacher_cb.models is None:
            raise RuntimeError("the run has no TeacherCallback (train.build adds it)")
        dm = trainer.datamodule
        needs = self.step_needs(trainer.callbacks)

        def make_engine():
            return build_engine(dm.spec.engine, self.student, **dm.engine_options())

        self.parts = StepParts(
            data=dm, teacher=teacher_cb.models, needs=needs, make_engine=make_engine,
            segmenter=self.release_spec.segmenter,
        )

    def configure_model(self) -> None:
        """``trainer=fsdp``: shard the student (FSDP2, per decoder layer and root)."""
        from opd_lit.parallel import FSDP2Strategy, is_sharded, shard_model

        strategy = self._trainer.strategy if self._trainer is not None else None
        if not isinstance(strategy, FSDP2Strategy) or is_sharded(self.student):
            return
        shard_model(
            self.student, self.device_mesh["data_parallel"],
            param_dtype=strategy.param_dtype(),
            activation_checkpointing=strategy.activation_checkpointing,
            reshard_after_forward=strategy.reshard_after_forward,
        )

    def on_fit_start(self) -> None:
        for lg in self.trainer.loggers:  # rank 0 only (the others' loggers write nothing)
            if getattr(lg, "run_id", None) and self.trainer.is_global_zero:
                lg.experiment.set_tag(lg.run_id, "world_size", str(self.trainer.world_size))
        if self.trainer.world_size > 1:
            # every rank samples its own rollouts: give each its own random stream (a resumed
            # run then restores each rank's saved state)
            seed = int(getattr(self.trainer.datamodule, "seed", 0)) * 1_000_003 + self.global_rank
            torch.manual_seed(seed)

    def teardown(self, stage: str) -> None:
        if self.parts is not None:
            self.parts.close()

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

    def training_step(self, batch: list[dict[str, Any]], batch_idx: int):
        from opd_lit.step import run_step

        metrics, rollouts = run_step(self, batch)
        n = len(batch)
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=n)
        for key in ("train/loss", "train/kept_frac", "rollout/accuracy"):
            if key in metrics:
                self.log(key.split("/")[-1], metrics[key], prog_bar=True, logger=False, batch_size=n)
        return {"rollouts": rollouts}  # the scored batch, for the diagnostics

    # ---- checkpoints: the divergence guard's window travels with the run ---------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["divergence"] = self.guard.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "divergence" in checkpoint:
            self.guard.load_state_dict(checkpoint["divergence"])

    # ---- the numeric guard's bookkeeping (called by the update) ------------------------
    def record_good_step(self) -> None:
        self._skipped_in_a_row = 0

    def record_skipped_step(self, bad: list[str], loss: float, grad_norm: float) -> None:
        self.skipped_steps += 1
        self._skipped_in_a_row += 1
        if self._skipped_in_a_row >= self.loss_spec.max_skipped_in_a_row:
            raise NonFiniteError(
                f"{self._skipped_in_a_row} steps in a row had a non-finite "
                f"{' / '.join(bad)} (loss={loss}, grad_norm={grad_norm}); stopping at "
                f"step {self.trainer.global_step} (loss.max_skipped_in_a_row="
                f"{self.loss_spec.max_skipped_in_a_row}; the previous updates are in the last checkpoint)"
            )
