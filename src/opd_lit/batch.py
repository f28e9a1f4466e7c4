"""The rollout batch: what one training step builds, stage by stage (:mod:`opd_lit.step`).

Layout. Every sequence a model scores is ``[left-padded prompt | right-padded response]``:
the prompt block has a fixed width per batch (``P`` for the student's chat template, ``Pt``
for the teacher's), so response token ``t`` always sits at column ``P + t`` and is predicted
by the hidden state at column ``P + t - 1``. The response block is shared by student,
teacher and reference model; only the prompt block differs between them.

Each stage of the step fills its own fields (every optional field is ``None`` until then);
nothing travels in untyped side channels. Under data parallelism a batch holds this rank's
rows only; ``B`` is the local batch.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # imported for the annotations only
    from opd_lit.lookahead import LookaheadResult
    from opd_lit.release import BatchRelease


@dataclass(frozen=True)
class Lookahead:
    """LGR's lookahead request: branch the student's top-``k`` candidates at every response
    position whose student entropy exceeds ``tau``, in ``segments`` teacher forwards."""

    k: int = 8
    tau: float = 0.2
    segments: int = 8


@dataclass(frozen=True)
class Needs:
    """Which optional fields of a :class:`RolloutBatch` the step must fill.

    The method declares its own (:attr:`opd_lit.methods.DistillModule.needs`), the loss
    estimator, the diagnostics and the release statistics theirs; the step merges them once
    at set-up (:meth:`merge`). ``topk`` is the number of student candidate ids recorded (most
    likely first) and scored by the teacher: the largest K any consumer uses; each consumer
    (the release rule, LGR, the margin figures) slices its own ``[..., :k]``.
    """

    topk: int = 0  # student top-K candidate ids per position, scored by the teacher
    segments: bool = False  # sentence segment ids of each response
    release: bool = False  # the BIC release decision of the batch
    reference: str | None = None  # "student_init" or a model path (ExOPD)
    entropy: bool = False  # the student's entropy at each position
    lookahead: Lookahead | None = None  # LGR lookahead branches (None: no lookahead)
    hidden: bool = False  # the teacher's (and reference's) final hidden rows (full-vocabulary KL)

    def merge(self, *others: Needs) -> Needs:
        """The union of several requests (largest K; any flag; the one reference/lookahead)."""
        out = self
        for o in others:
            for name in ("reference", "lookahead"):
                a, b = getattr(out, name), getattr(o, name)
                if a is not None and b is not None and a != b:
                    raise ValueError(f"two different {name} requests: {a!r} and {b!r}")
            out = Needs(
                topk=max(out.topk, o.topk),
                segments=out.segments or o.segments or o.release,
                release=out.release or o.release,
                reference=out.reference or o.reference,
                entropy=out.entropy or o.entropy or o.lookahead is not None,
                lookahead=out.lookahead or o.lookahead,
                hidden=out.hidden or o.hidden,
            )
        return out


@dataclass
class RolloutBatch:
    """One training step's rollouts. ``B`` = prompts × samples per prompt, ``T`` = max response length."""

    # -- rollout (the engine) --------------------------------------------------------------
    records: list[dict[str, Any]]  # the prompt records, one per row (repeated for n samples)
    prompt_ids: torch.Tensor  # [B, P]  student chat template, left-padded
    prompt_mask: torch.Tensor  # [B, P]  1 on real prompt tokens
    response_ids: torch.Tensor  # [B, T]  sampled tokens, right-padded with pad id
    response_mask: torch.Tensor  # [B, T]  float, 1 on sampled tokens
    teacher_prompt_ids: torch.Tensor  # [B, Pt]  teacher chat template, left-padded
    teacher_prompt_mask: torch.Tensor  # [B, Pt]
    group_ids: torch.Tensor  # [B]  index of the prompt each row was sampled from
    response_text: list[str]  # the decoded responses (special tokens skipped)
    rollout_logprobs: torch.Tensor | None = None  # [B, T]  log π(y_t) as the engine sampled it (vllm)
    # -- student scores (engine or scoring pass) -------------------------------------------
    student_logprobs: torch.Tensor | None = None  # [B, T]  log π_θ(y_t) (detached)
    student_topk_ids: torch.Tensor | None = None  # [B, T, K]  the student's top-K ids, most likely first
    student_entropy: torch.Tensor | None = None  # [B, T]  entropy of π_θ(· | y_<t)
    # -- teacher and reference -------------------------------------------------------------
    teacher_logprobs: torch.Tensor | None = None  # [B, T]  log p_T(y_t)
    teacher_topk_logprobs: torch.Tensor | None = None  # [B, T, K]  log p_T at the student's top-K ids
    ref_logprobs: torch.Tensor | None = None  # [B, T]  frozen reference model (ExOPD)
    ref_topk_logprobs: torch.Tensor | None = None  # [B, T, K]  reference at the student's top-K ids
    lookahead: LookaheadResult | None = None  # LGR: the teacher's branch scores
    teacher_hidden: torch.Tensor | None = None  # [N, Ht]  teacher's final hidden rows (loss.estimator=full)
    ref_hidden: torch.Tensor | None = None  # [N, Hr]  the reference's (loss.estimator=full with ExOPD)
    # -- segments and release --------------------------------------------------------------
    segment_ids: torch.Tensor | None = None  # [B, T]  sentence segment of each token, -1 outside
    release: BatchRelease | None = None  # the BIC release rule on this batch (computed once)

    @property
    def batch_size(self) -> int:
        return int(self.response_ids.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.response_mask.sum().item())

    def student_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, P+T]`` ids and attention mask of the student's view of the rollouts."""
        return join_prompt_response(
            self.prompt_ids, self.prompt_mask, self.response_ids, self.response_mask
        )

    def teacher_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, Pt+T]`` ids and attention mask of the teacher's view (its own template)."""
        return join_prompt_response(
            self.teacher_prompt_ids, self.teacher_prompt_mask, self.response_ids, self.response_mask
        )

    def to(self, device: torch.device | str) -> RolloutBatch:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                setattr(self, f.name, value.to(device))
        return self


def join_prompt_response(
    prompt_ids: torch.Tensor,  # [B, P] left-padded
    prompt_mask: torch.Tensor,  # [B, P]
    response_ids: torch.Tensor,  # [B, T] right-padded
    response_mask: torch.Tensor,  # [B, T]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate into ``[B, P+T]`` ids and a long attention mask."""
    ids = torch.cat([prompt_ids, response_ids], dim=1)
    mask = torch.cat([prompt_mask.long(), response_mask.long()], dim=1)
    return ids, mask


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into ``[B, P]`` ids and mask."""
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids, mask


def right_pad(seqs: list[list[int]], pad_id: int, min_width: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists into ``[B, T]`` ids and a float mask (``T >= min_width``)."""
    width = max([min_width] + [len(s) for s in seqs])
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.float32)
    for i, s in enumerate(seqs):
        if s:
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, : len(s)] = 1.0
    return ids, mask
