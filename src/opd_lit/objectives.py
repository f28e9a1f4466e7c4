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


#: ``loss.estimator``: how the per-token reverse KL to the teacher becomes a loss.
ESTIMATORS = ("sampled", "topk", "full")


def topk_reverse_kl(
    student_logprobs: torch.Tensor,  # [N, K]  log π_θ at the student's top-K ids (with gradient)
    target_logprobs: torch.Tensor,  # [N, K]  log q at the same ids (teacher, or ExOPD's mixture)
    renorm: bool = True,
) -> torch.Tensor:
    """``[N]`` reverse KL restricted to the student's top-K candidates.

    ``renorm=True``: both distributions renormalised over the K ids,
    ``KL(π̄ ‖ q̄) = Σ_k π̄_k (log π̄_k − log q̄_k)``; ``False``: the partial sum of the full KL,
    ``Σ_k π_k (log π_k − log q_k)`` (the LGR paper's "OPD (topk)" without renormalisation).
    With K = V both equal the full-vocabulary reverse KL.
    """
    s = student_logprobs.float()
    q = target_logprobs.detach().float()
    if renorm:
        s = s - torch.logsumexp(s, dim=-1, keepdim=True)
        q = q - torch.logsumexp(q, dim=-1, keepdim=True)
    return (s.exp() * (s - q)).sum(-1)


def weighted_token_loss(
    per_token: torch.Tensor,  # [B, T]  loss of each token (with gradient)
    weight: torch.Tensor,  # [B, T]  the method's weight (0 off the response)
    num_tokens: torch.Tensor | float,  # Σ_t mask_t over the whole (global) batch
) -> torch.Tensor:
    """``Σ_t w_t · ℓ_t / Σ_t mask_t``: the token-mean every estimator shares."""
    denom = torch.as_tensor(num_tokens, dtype=per_token.dtype, device=per_token.device).clamp(min=1.0)
    return (weight.detach().to(per_token.dtype) * per_token).sum() / denom


def truncated_is_weight(
    train_logprobs: torch.Tensor,  # [B, T]  log π_θ(y_t) of the training model
    rollout_logprobs: torch.Tensor,  # [B, T]  log π(y_t) of the engine that sampled y_t
    cap: float,
) -> torch.Tensor:
    """``[B, T]`` token-level truncated importance weight ``min(π_θ / π_rollout, cap)`` (detached)."""
    return torch.exp(train_logprobs.detach() - rollout_logprobs.detach()).clamp(max=cap)
