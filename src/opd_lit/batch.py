"""The rollout batch: what flows from the DataModule through the teacher to a method.

Layout. Every sequence a model scores is ``[left-padded prompt | right-padded response]``:
the prompt block has a fixed width per batch (``P`` for the student's chat template, ``Pt``
for the teacher's), so response token ``t`` always sits at column ``P + t`` and is predicted
by the hidden state at column ``P + t - 1``. The response block is shared by student,
teacher and reference model; only the prompt block differs between them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch


@dataclass
class RolloutBatch:
    """One training step's rollouts. ``B`` = prompts × samples per prompt, ``T`` = max response length."""

    records: list[dict[str, Any]]  # the prompt records, one per row (repeated for n samples)
    prompt_ids: torch.Tensor  # [B, P]  student chat template, left-padded
    prompt_mask: torch.Tensor  # [B, P]  1 on real prompt tokens
    response_ids: torch.Tensor  # [B, T]  sampled tokens, right-padded with pad id
    response_mask: torch.Tensor  # [B, T]  float, 1 on sampled tokens
    student_logprobs: torch.Tensor  # [B, T]  log π_θ(y_t) at rollout time (on-policy, detached)
    student_topk_ids: torch.Tensor  # [B, T, K]  the student's top-K candidate ids per position
    student_entropy: torch.Tensor | None = None  # [B, T]  entropy of π_θ(· | y_<t)
    teacher_prompt_ids: torch.Tensor | None = None  # [B, Pt]  teacher chat template, left-padded
    teacher_prompt_mask: torch.Tensor | None = None  # [B, Pt]
    teacher_logprobs: torch.Tensor | None = None  # [B, T]  log p_T(y_t)
    teacher_topk_logprobs: torch.Tensor | None = None  # [B, T, K]  log p_T at the student's top-K ids
    ref_logprobs: torch.Tensor | None = None  # [B, T]  frozen reference model (ExOPD)
    segment_ids: torch.Tensor | None = None  # [B, T]  sentence segment of each token, -1 outside
    group_ids: torch.Tensor | None = None  # [B]  index of the prompt each row was sampled from
    extras: dict[str, Any] = field(default_factory=dict)  # method-specific teacher outputs
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage, token counts

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
        if self.teacher_prompt_ids is None or self.teacher_prompt_mask is None:
            raise RuntimeError("the teacher prompt was not rendered for this batch")
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
