"""The one scorer: per-token log-probs of a causal LM over a rollout, without ``[B, T, V]`` logits.

Teacher, reference model and student (with gradients, for the loss) all go through
:func:`score_tokens`. The model's backbone runs once over ``[prompt | response]``; then only
the hidden states that predict response tokens are kept, packed over the valid (unmasked)
positions, and pushed through ``lm_head -> log_softmax -> gather`` a chunk of positions at a
time. Peak extra memory is one ``[chunk, V]`` float32 block instead of ``[B, T, V]``. With
gradients, each chunk is checkpointed, so its logits are recomputed in the backward pass
instead of being kept alive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

LOG_EPS = math.log(1e-12)


@dataclass
class TokenScores:
    """What :func:`score_tokens` returns; fields not asked for are ``None``."""

    logprobs: torch.Tensor  # [B, T]  log p(y_t | y_<t); 0 on padding
    topk_ids: torch.Tensor | None = None  # [B, T, K]  the model's own top-K ids (when asked)
    topk_logprobs: torch.Tensor | None = None  # [B, T, K]  log p at topk ids (own or given)
    entropy: torch.Tensor | None = None  # [B, T]  entropy of p(· | y_<t)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` positions that start at 0 on the first real token (left padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def backbone_hidden(
    model: nn.Module,
    input_ids: torch.Tensor,  # [B, L]
    attention_mask: torch.Tensor,  # [B, L]
) -> torch.Tensor:
    """Final hidden states ``[B, L, H]`` of a Hugging Face causal LM, without the LM head."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    out = decoder(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    )
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def _chunk_stats(
    hidden: torch.Tensor,  # [N, H]
    weight: torch.Tensor,  # [V, H]
    bias: torch.Tensor | None,  # [V]
    targets: torch.Tensor,  # [N]
    gather_ids: torch.Tensor,  # [N, K] (K may be 0)
    own_topk: int,
    want_entropy: bool,
) -> tuple[torch.Tensor, ...]:
    logits = nn.functional.linear(hidden, weight, bias).float()  # [N, V]
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # [N, 1]
    logprobs = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse.squeeze(-1)  # [N]
    outs: list[torch.Tensor] = [logprobs]
    if own_topk > 0:
        top_logits, top_ids = logits.topk(own_topk, dim=-1)  # [N, K]
        outs += [top_ids, top_logits - lse]
    elif gather_ids.shape[-1] > 0:
        outs += [logits.gather(-1, gather_ids) - lse]
    if want_entropy:
        log_p = logits - lse
        outs.append(-(log_p.exp() * log_p).sum(-1))  # [N]
    return tuple(outs)


def score_tokens(
    model: nn.Module,
    input_ids: torch.Tensor,  # [B, P+T]  [left-padded prompt | right-padded response]
    attention_mask: torch.Tensor,  # [B, P+T]
    response_ids: torch.Tensor,  # [B, T]
    response_mask: torch.Tensor,  # [B, T]
    *,
    gather_ids: torch.Tensor | None = None,  # [B, T, K]  score these ids (e.g. student top-K)
    topk: int = 0,  # or: return the model's own top-K ids and their log-probs
    entropy: bool = False,
    chunk_size: int = 4096,
) -> TokenScores:
    """Log-probs of the response tokens (and optionally top-K, entropy) of ``model``.

    Gradients flow when enabled by the caller (the student's loss); teacher and reference
    calls run under ``torch.no_grad()``. Padding positions get 0 (log-probs, entropy) and
    id 0 / log-prob 0 (top-K); only positions with ``response_mask > 0`` are computed.
    """
    if topk and gather_ids is not None:
        raise ValueError("pass either gather_ids or topk, not both")
    bsz, width = response_ids.shape
    prompt_width = input_ids.shape[1] - width
    if prompt_width < 1:
        raise ValueError(
            f"every sequence needs at least one prompt token before the response "
            f"(input width {input_ids.shape[1]}, response width {width})"
        )
    hidden = backbone_hidden(model, input_ids, attention_mask)  # [B, P+T, H]
    hidden = hidden[:, prompt_width - 1 : prompt_width - 1 + width]  # [B, T, H] predicts y_t
    valid = response_mask > 0  # [B, T]
    rows = hidden[valid]  # [N, H]
    targets = response_ids[valid]  # [N]
    k = topk if topk else (gather_ids.shape[-1] if gather_ids is not None else 0)
    ids = gather_ids[valid] if gather_ids is not None else targets.new_zeros((targets.shape[0], 0))

    head = model.get_output_embeddings()
    weight, bias = head.weight, getattr(head, "bias", None)
    use_ckpt = torch.is_grad_enabled() and hidden.requires_grad
    pieces: list[tuple[torch.Tensor, ...]] = []
    for start in range(0, rows.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        args = (rows[sl], weight, bias, targets[sl], ids[sl], topk, entropy)
        if use_ckpt:
            pieces.append(checkpoint(_chunk_stats, *args, use_reentrant=False))
        else:
            pieces.append(_chunk_stats(*args))

    def scatter(i: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        out = torch.zeros(shape, dtype=dtype, device=response_ids.device)
        if pieces:
            out[valid] = torch.cat([p[i] for p in pieces]).to(dtype)
        return out

    logprobs = scatter(0, (bsz, width), torch.float32)
    result = TokenScores(logprobs=logprobs)
    nxt = 1
    if topk:
        result.topk_ids = scatter(1, (bsz, width, k), torch.long)
        result.topk_logprobs = scatter(2, (bsz, width, k), torch.float32)
        nxt = 3
    elif k:
        result.topk_logprobs = scatter(1, (bsz, width, k), torch.float32)
        nxt = 2
    if entropy:
        result.entropy = scatter(nxt, (bsz, width), torch.float32)
    return result


def score_tokens_full(
    model: nn.Module,
    input_ids: torch.Tensor,  # [B, P+T]
    attention_mask: torch.Tensor,  # [B, P+T]
    response_ids: torch.Tensor,  # [B, T]
    response_mask: torch.Tensor,  # [B, T]
    *,
    gather_ids: torch.Tensor | None = None,  # [B, T, K]
) -> TokenScores:
    """Reference implementation with full ``[B, T, V]`` float32 logits (tests and benchmarks)."""
    width = response_ids.shape[1]
    prompt_width = input_ids.shape[1] - width
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    )
    logits = out.logits[:, prompt_width - 1 : prompt_width - 1 + width].float()  # [B, T, V]
    logp = logits.log_softmax(-1)
    mask = response_mask > 0
    lp = logp.gather(-1, response_ids.unsqueeze(-1)).squeeze(-1) * mask
    res = TokenScores(logprobs=lp)
    if gather_ids is not None:
        res.topk_logprobs = logp.gather(-1, gather_ids) * mask.unsqueeze(-1)
    return res
