"""Pure tensor functions of the OPD objective (no Lightning)."""

from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ``mask > 0`` (any shape); 0 when the mask is empty."""
    m = (mask > 0).to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1.0)


def opd_advantage(
    teacher_logprobs: torch.Tensor,  # [B, T]
    student_logprobs: torch.Tensor,  # [B, T]
    mask: torch.Tensor,  # [B, T]
) -> torch.Tensor:
    """``A_t = log p_T(y_t) − log p_S(y_t)`` on response tokens, 0 elsewhere. ``[B, T]``."""
    return (teacher_logprobs - student_logprobs.detach()) * (mask > 0)


def policy_gradient_loss(
    logprobs: torch.Tensor,  # [B, T]  log π_θ(y_t), with gradient
    advantage: torch.Tensor,  # [B, T]
    weight: torch.Tensor,  # [B, T]
    num_tokens: torch.Tensor | float,  # Σ_t mask_t over the whole batch (not just this slice)
) -> torch.Tensor:
    """On-policy policy gradient, token-mean: ``−Σ_t w_t·A_t·log π_θ(y_t) / Σ_t mask_t``.

    On policy the importance ratio is 1, so its gradient is ``−Σ w·A·∇log π / N``. ``A`` and
    ``w`` are treated as constants. Passing the full batch's token count lets micro-batches
    add up to exactly the full-batch loss.
    """
    coef = (advantage * weight).detach()
    denom = torch.as_tensor(num_tokens, dtype=logprobs.dtype, device=logprobs.device).clamp(min=1.0)
    return -(coef * logprobs).sum() / denom
