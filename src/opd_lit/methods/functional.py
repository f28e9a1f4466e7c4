"""Pure tensor functions behind ``exopd``, ``fixed_prefix`` and ``release_random``.

No Lightning, no models: each method's ``supervise()`` only calls these. LGR's math lives
with its teacher lookahead in :mod:`opd_lit.lookahead`. The kept-mass rescaling is the
release rule's own :func:`opd_lit.release.apply_release_tokens` (one implementation).
"""

from __future__ import annotations

import math

import torch

from opd_lit.release import apply_release_tokens

SCHEDULES = ("constant", "linear")


# ---------------------------------------------------------------------------
# exopd
# ---------------------------------------------------------------------------


def exopd_advantage(
    teacher_logprobs: torch.Tensor,  # [B, T]  log p_T(y_t)
    ref_logprobs: torch.Tensor,  # [B, T]  log p_ref(y_t)
    student_logprobs: torch.Tensor,  # [B, T]  log p_S(y_t)
    mask: torch.Tensor,  # [B, T]
    lam: float,
) -> torch.Tensor:
    """``[B, T]``: ``A_t = λ·log p_T + (1 − λ)·log p_ref − log p_S`` on response tokens, else 0.

    λ = 1 is OPD bit for bit (``1·a + 0·b = a`` exactly for finite ``b``); λ = 0 is
    ``log p_ref − log p_S``; λ > 1 extrapolates the teacher's reward past the reference.
    """
    lam = float(lam)
    mixed = lam * teacher_logprobs + (1.0 - lam) * ref_logprobs  # [B, T]
    return (mixed - student_logprobs.detach()) * (mask > 0)


# ---------------------------------------------------------------------------
# fixed_prefix
# ---------------------------------------------------------------------------


def scheduled_prefix_len(
    step: int, total_steps: int, start_len: int, end_len: int, schedule: str
) -> int:
    """Prefix length ``L`` at optimizer step ``step`` (0-based) of ``total_steps``.

    ``constant``: ``end_len``. ``linear``: ``start_len`` at step 0, ``end_len`` at the last
    step (``total_steps − 1``) and after, linear (rounded to the nearest token) in between.
    """
    if schedule == "constant":
        return int(end_len)
    if schedule != "linear":
        raise ValueError(f"unknown prefix schedule {schedule!r}; expected one of {list(SCHEDULES)}")
    span = max(1, int(total_steps) - 1)
    frac = min(1.0, max(0.0, step / span))
    return math.floor(start_len + (end_len - start_len) * frac + 0.5)


def prefix_weight(
    mask: torch.Tensor,  # [B, T]  response mask
    prefix_len: int,
    rescale: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Supervise response tokens ``t < prefix_len``: ``(weight [B, T], scale [B])``.

    ``rescale=True``: kept tokens are scaled by ``total mass / kept mass`` per sample (the
    release rule's rescaling, so each sample keeps its loss mass); ``False``: the plain
    ``mask · [t < L]`` with scale 1.
    """
    b = mask.shape[0]
    release = torch.full((b,), int(prefix_len), dtype=torch.long, device=mask.device)  # [B]
    weight, keep, scale = apply_release_tokens(mask, release)
    if rescale:
        return weight, scale
    plain = mask.to(weight.dtype) * keep  # [B, T]
    return plain, torch.ones_like(scale)


# ---------------------------------------------------------------------------
# release_random
# ---------------------------------------------------------------------------


def derive_seed(base_seed: int, step: int) -> int:
    """A generator seed for ``(base_seed, step)``, decorrelated from the prompt sampler's."""
    mix = int(base_seed) * 0x9E3779B97F4A7C15 + int(step) * 0xBF58476D1CE4E5B9 + 0x5EED
    return mix % (1 << 63)


def permute_release_tokens(
    release_token: torch.Tensor,  # [B] long  first released token per sample
    generator: torch.Generator,
) -> torch.Tensor:
    """``[B]``: the same release positions, randomly reassigned across the batch's samples."""
    perm = torch.randperm(release_token.shape[0], generator=generator)  # [B] on the CPU
    return release_token[perm.to(release_token.device)]


def clip_release_tokens(
    release_token: torch.Tensor,  # [B] long
    lengths: torch.Tensor,  # [B]  response lengths
) -> torch.Tensor:
    """``[B]`` long: ``min(release_token, length)`` (at or past the end: nothing released)."""
    return torch.minimum(release_token.long(), lengths.long().to(release_token.device))
