"""The one scorer: per-token log-probs of a causal LM over a rollout, without ``[B, T, V]`` logits.

Teacher, reference model and student (with gradients, for the loss) all go through
:func:`score_tokens`. The model's backbone runs once over ``[prompt | response]``; then only
the hidden states that predict response tokens are kept, packed over the valid (unmasked)
positions, and pushed through ``lm_head -> log_softmax -> gather`` a chunk of positions at a
time. Peak extra memory is one ``[chunk, V]`` float32 block instead of ``[B, T, V]``: without
gradients (teacher, reference, the student's rollout scoring) the chunk's log-sum-exp and
entropy are computed in place on that block. With gradients, each chunk is checkpointed, so
its logits are recomputed in the backward pass instead of being kept alive.

:func:`fused_logprob_loss` is the student's loss path when the per-token loss coefficients
are known before the forward (on-policy policy gradient: ``-w_t A_t / N``): like Liger's
fused linear cross-entropy, it computes the lm_head gradients chunk by chunk *during* the
forward, so nothing is recomputed (3 lm_head matmuls per chunk, as with full logits, instead
of 4 with checkpointing) and no ``[B, T, V]`` block is ever alive.
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


@torch.no_grad()
def _chunk_stats_inplace(
    hidden: torch.Tensor,  # [N, H]
    weight: torch.Tensor,  # [V, H]
    bias: torch.Tensor | None,  # [V]
    targets: torch.Tensor,  # [N]
    gather_ids: torch.Tensor,  # [N, K] (K may be 0)
    own_topk: int,
    want_entropy: bool,
) -> tuple[torch.Tensor, ...]:
    """:func:`_chunk_stats` without autograd: one ``[N, V]`` float32 block, reused in place.

    The gathers and top-K are read first; then the block is shifted by its row max and
    exponentiated in place for the log-sum-exp. The entropy, when asked, needs one more
    block (``exp`` of the shifted logits): ``H = log Z - Σ e·s / Z`` with ``s`` the shifted
    logits, ``e = exp(s)``, ``Z = Σ e``.
    """
    logits = nn.functional.linear(hidden, weight, bias)
    if logits.dtype != torch.float32:
        logits = logits.float()
    target_logits = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [N]
    extra: list[torch.Tensor] = []
    if own_topk > 0:
        top_logits, top_ids = logits.topk(own_topk, dim=-1)  # [N, K]
    elif gather_ids.shape[-1] > 0:
        picked = logits.gather(-1, gather_ids)  # [N, K]
    row_max = logits.amax(dim=-1, keepdim=True)  # [N, 1]
    logits.sub_(row_max)  # shifted logits s
    if want_entropy:
        e = logits.exp()
        z = e.sum(-1)  # [N]
        es = torch.bmm(e.unsqueeze(1), logits.unsqueeze(2)).reshape(-1)  # Σ e·s, no [N, V] temp
        del e
        log_z = z.log()
        extra.append(log_z - es / z)
    else:
        log_z = logits.exp_().sum(-1).log()
    lse = row_max.squeeze(-1) + log_z  # [N]
    outs: list[torch.Tensor] = [target_logits - lse]
    if own_topk > 0:
        outs += [top_ids, top_logits - lse.unsqueeze(-1)]
    elif gather_ids.shape[-1] > 0:
        outs += [picked - lse.unsqueeze(-1)]
    return tuple(outs + extra)


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
    if use_ckpt and k == 0 and not entropy:
        # The loss path (log-probs only, with gradients): recompute-in-backward, in place.
        pieces.append((_ChunkedLinearLogprob.apply(rows, weight, bias, targets, chunk_size),))
    for start in range(0, 0 if pieces else rows.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        args = (rows[sl], weight, bias, targets[sl], ids[sl], topk, entropy)
        if use_ckpt:
            pieces.append(checkpoint(_chunk_stats, *args, use_reentrant=False))
        elif torch.is_grad_enabled() and (weight.requires_grad or rows.requires_grad):
            pieces.append(_chunk_stats(*args))  # gradients without checkpointing (rare)
        else:
            pieces.append(_chunk_stats_inplace(*args))

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


def _softmax_grad_(logits: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """In place: ``logits [n, V]`` -> ``coef · (onehot(targets) − softmax)``, the gradient of
    ``Σ coef · log softmax(logits)[targets]`` with respect to the logits."""
    probs = logits.sub_(lse.unsqueeze(-1)).exp_()
    grad = probs.mul_((-coef).unsqueeze(-1))
    return grad.scatter_add_(-1, targets.unsqueeze(-1), coef.unsqueeze(-1))


class _ChunkedLinearLogprob(torch.autograd.Function):
    """``log softmax(h Wᵀ + b)[y]`` per row, a chunk of rows at a time, for the loss path.

    Forward: one ``[chunk, V]`` float32 block per chunk, in place; only the per-row
    log-sum-exp is kept. Backward: the chunk's logits are recomputed once and turned in place
    into ``g · (onehot − p)``, which gives ``∂h`` and accumulates ``∂W`` (float32). Same
    lm_head matmuls as checkpointing (4 per chunk) with far fewer ``[chunk, V]`` passes and
    temporaries than autograd through a checkpointed ``log_softmax``.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size):
        n_rows = hidden.shape[0]
        logprobs = torch.zeros(n_rows, dtype=torch.float32, device=hidden.device)
        lse = torch.zeros(n_rows, dtype=torch.float32, device=hidden.device)
        for start in range(0, n_rows, chunk_size):
            sl = slice(start, start + chunk_size)
            logits = nn.functional.linear(hidden[sl], weight, bias)
            if logits.dtype != torch.float32:
                logits = logits.float()
            target_logits = logits.gather(-1, targets[sl].unsqueeze(-1)).squeeze(-1)
            row_max = logits.amax(dim=-1, keepdim=True)
            lse[sl] = row_max.squeeze(-1) + logits.sub_(row_max).exp_().sum(-1).log()
            logprobs[sl] = target_logits - lse[sl]
            del logits
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk_size = chunk_size
        return logprobs

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b and bias is not None else None
        g_all = grad_out.float()
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            sl = slice(start, start + ctx.chunk_size)
            h = hidden[sl]
            logits = nn.functional.linear(h, weight, bias)
            if logits.dtype != torch.float32:
                logits = logits.float()
            g = _softmax_grad_(logits, lse[sl], targets[sl], g_all[sl])
            if need_h:
                grad_h[sl] = (g.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_w:
                grad_w.addmm_(g.t(), h.float())
            if grad_b is not None:
                grad_b += g.sum(0)
            del g, logits
        return (
            grad_h,
            grad_w.to(weight.dtype) if grad_w is not None else None,
            grad_b.to(bias.dtype) if grad_b is not None else None,
            None,
            None,
        )


class _FusedLinearLogprobLoss(torch.autograd.Function):
    """``loss = Σ_n coef_n · log softmax(h_n Wᵀ + b)[y_n]`` with its gradients computed in the
    forward pass, a chunk of rows at a time (the coefficients are constants).

    For one chunk with probabilities ``p`` and one-hot targets ``o``, ``∂loss/∂logits =
    coef · (o − p)``; that ``[n, V]`` block gives ``∂h = G W`` and ``∂W += Gᵀ h`` and is freed.
    The backward only scales the stored ``∂h`` (``[N, H]``), ``∂W`` (``[V, H]`` float32) and
    ``∂b`` by the incoming scalar gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, coef, chunk_size):
        n_rows = hidden.shape[0]
        logprobs = torch.zeros(n_rows, dtype=torch.float32, device=hidden.device)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        for start in range(0, n_rows, chunk_size):
            sl = slice(start, start + chunk_size)
            h, y, c = hidden[sl], targets[sl], coef[sl].float()
            logits = nn.functional.linear(h, weight, bias)
            if logits.dtype != torch.float32:
                logits = logits.float()
            target_logits = logits.gather(-1, y.unsqueeze(-1)).squeeze(-1)
            row_max = logits.amax(dim=-1, keepdim=True)
            probs = logits.sub_(row_max).exp_()  # unnormalised, in place
            z = probs.sum(-1, keepdim=True)
            logprobs[sl] = target_logits - row_max.squeeze(-1) - z.squeeze(-1).log()
            if not (need_h or need_w or need_b):
                continue
            g = probs.mul_((-c).unsqueeze(-1) / z)  # −coef·p
            g.scatter_add_(-1, y.unsqueeze(-1), c.unsqueeze(-1))  # + coef·onehot
            if need_h:
                grad_h[sl] = (g.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_w:
                grad_w.addmm_(g.t(), h.float())
            if need_b:
                grad_b += g.sum(0)
            del g, probs, logits
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        ctx.mark_non_differentiable(logprobs)
        loss = (coef.float() * logprobs).sum()
        return loss, logprobs

    @staticmethod
    def backward(ctx, grad_loss, _grad_logprobs):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        out_h = grad_h * grad_loss.to(grad_h.dtype) if grad_h is not None else None
        out_w = (grad_w * grad_loss).to(w_dtype) if grad_w is not None else None
        out_b = (grad_b * grad_loss).to(b_dtype) if grad_b is not None else None
        return out_h, out_w, out_b, None, None, None


def fused_logprob_loss(
    model: nn.Module,
    input_ids: torch.Tensor,  # [B, P+T]  [left-padded prompt | right-padded response]
    attention_mask: torch.Tensor,  # [B, P+T]
    response_ids: torch.Tensor,  # [B, T]
    response_mask: torch.Tensor,  # [B, T]
    coef: torch.Tensor,  # [B, T]  constant per-token coefficients (detached)
    *,
    chunk_size: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, logprobs)`` with ``loss = Σ_t coef_t · log π(y_t)`` over response positions.

    The on-policy policy-gradient loss is this with ``coef = −w·A / N``. Same inputs and
    layout as :func:`score_tokens`; ``logprobs [B, T]`` is detached (0 on padding). The lm_head
    part runs chunk by chunk with its gradients computed in the forward pass (see
    :class:`_FusedLinearLogprobLoss`), so it costs what full logits cost in lm_head matmuls
    while keeping one ``[chunk, V]`` block alive; gradients reach the backbone through the
    hidden states as usual.
    """
    bsz, width = response_ids.shape
    prompt_width = input_ids.shape[1] - width
    if prompt_width < 1:
        raise ValueError(
            f"every sequence needs at least one prompt token before the response "
            f"(input width {input_ids.shape[1]}, response width {width})"
        )
    hidden = backbone_hidden(model, input_ids, attention_mask)
    hidden = hidden[:, prompt_width - 1 : prompt_width - 1 + width]
    valid = response_mask > 0
    head = model.get_output_embeddings()
    loss, lp = _FusedLinearLogprobLoss.apply(
        hidden[valid], head.weight, getattr(head, "bias", None), response_ids[valid],
        coef[valid].detach(), chunk_size,
    )
    logprobs = torch.zeros((bsz, width), dtype=torch.float32, device=response_ids.device)
    logprobs[valid] = lp
    return loss, logprobs
