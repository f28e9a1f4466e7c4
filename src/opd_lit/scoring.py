"""The one scorer: per-token log-probs of a causal LM over a rollout, without ``[B, T, V]`` logits.

Teacher, reference model and student (with gradients, for the loss) all go through
:func:`score_tokens`. The model's backbone runs once over ``[prompt | response]``; then only
the hidden states that predict response tokens are kept, packed over the valid (unmasked)
positions, and pushed through ``lm_head -> log_softmax -> gather`` a chunk of positions at a
time. Without gradients (teacher, reference, the student's rollout scoring) and for the
student's loss (log-probs with gradients), each chunk also goes through the vocabulary in
tiles of ``vocab_chunk_size`` (32,768) with a streaming log-sum-exp, so the peak extra memory
is one ``[chunk, vocab_chunk]`` float32 tile, computed in place, instead of ``[B, T, V]``; the
loss path recomputes each tile in its backward. Other requests with gradients (top-K, gathered
candidates, entropy) checkpoint each ``[chunk, V]`` block and recompute it in the backward.

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
# Vocabulary tile of the no-grad and loss paths: one [chunk, VOCAB_CHUNK] float32 block at a
# time (512 MiB at 4096 positions), whatever the vocabulary size.
VOCAB_CHUNK = 32768


@dataclass
class TokenScores:
    """What :func:`score_tokens` returns; fields not asked for are ``None``."""

    logprobs: torch.Tensor  # [B, T]  log p(y_t | y_<t); 0 on padding
    topk_ids: torch.Tensor | None = None  # [B, T, K]  the model's own top-K ids (when asked)
    topk_logprobs: torch.Tensor | None = None  # [B, T, K]  log p at topk ids (own or given)
    entropy: torch.Tensor | None = None  # [B, T]  entropy of p(· | y_<t)
    hidden: torch.Tensor | None = None  # [N, H]  final hidden states predicting the N valid tokens


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


def _vocab_tiles(vocab: int, tile: int | None):
    tile = vocab if not tile or tile <= 0 else tile
    return [(v0, min(vocab, v0 + tile)) for v0 in range(0, vocab, tile)]


def _tile_logits(hidden, weight, bias, v0: int, v1: int) -> torch.Tensor:
    """Float32 logits ``[N, v1 - v0]`` of one vocabulary tile (the weight rows are a view)."""
    x = nn.functional.linear(hidden, weight[v0:v1], None if bias is None else bias[v0:v1])
    return x if x.dtype == torch.float32 else x.float()


def _gather_in_tile(x: torch.Tensor, ids: torch.Tensor, v0: int, v1: int, into: torch.Tensor) -> torch.Tensor:
    """``into`` with the entries whose id falls in ``[v0, v1)`` replaced by ``x``'s values."""
    inside = (ids >= v0) & (ids < v1)
    vals = x.gather(-1, (ids - v0).clamp(0, v1 - v0 - 1))
    return torch.where(inside, vals, into)


@torch.no_grad()
def _chunk_stats_inplace(
    hidden: torch.Tensor,  # [N, H]
    weight: torch.Tensor,  # [V, H]
    bias: torch.Tensor | None,  # [V]
    targets: torch.Tensor,  # [N]
    gather_ids: torch.Tensor,  # [N, K] (K may be 0)
    own_topk: int,
    want_entropy: bool,
    vocab_chunk: int | None = None,
) -> tuple[torch.Tensor, ...]:
    """:func:`_chunk_stats` without autograd, one ``[N, vocab_chunk]`` float32 tile at a time.

    Streaming (online) log-sum-exp over vocabulary tiles: per row, a running max ``m``,
    ``A = Σ e^(x-m)`` and, for the entropy, ``B = Σ e^(x-m)·(x-m)``; both are rescaled when
    ``m`` grows. Then ``lse = m + log A`` and ``H = log A − B / A``. The sampled token's and the
    candidates' logits are read from the tile that holds them, the top-K is merged tile by
    tile. Each tile is exponentiated in place (the entropy needs one more tile-sized block).
    """
    n, dev = hidden.shape[0], hidden.device
    f32 = torch.float32
    run_max = torch.full((n,), -math.inf, dtype=f32, device=dev)
    acc = torch.zeros(n, dtype=f32, device=dev)  # A
    ent = torch.zeros(n, dtype=f32, device=dev) if want_entropy else None  # B
    target_logits = torch.zeros(n, dtype=f32, device=dev)
    k = gather_ids.shape[-1]
    picked = torch.zeros((n, k), dtype=f32, device=dev) if (k and not own_topk) else None
    top_vals = top_ids = None
    for v0, v1 in _vocab_tiles(weight.shape[0], vocab_chunk):
        x = _tile_logits(hidden, weight, bias, v0, v1)
        target_logits = _gather_in_tile(x, targets.unsqueeze(-1), v0, v1, target_logits.unsqueeze(-1)).squeeze(-1)
        if picked is not None:
            picked = _gather_in_tile(x, gather_ids, v0, v1, picked)
        if own_topk > 0:
            tv, ti = x.topk(min(own_topk, v1 - v0), dim=-1)
            ti = ti + v0
            if top_vals is not None:
                tv, order = torch.cat([top_vals, tv], -1).topk(own_topk, dim=-1)
                ti = torch.cat([top_ids, ti], -1).gather(-1, order)
            top_vals, top_ids = tv, ti
        new_max = torch.maximum(run_max, x.amax(dim=-1))
        scale = torch.exp(run_max - new_max)  # 0 on the first tile
        x.sub_(new_max.unsqueeze(-1))  # s = x − m', in place
        if ent is not None:
            shift = torch.where(acc > 0, (run_max - new_max) * acc, torch.zeros_like(acc))
            e = x.exp()
            ent = scale * (ent + shift) + torch.bmm(e.unsqueeze(1), x.unsqueeze(2)).reshape(-1)
            acc = scale * acc + e.sum(-1)
            del e
        else:
            acc = scale * acc + x.exp_().sum(-1)
        run_max = new_max
        del x
    log_a = acc.log()
    lse = run_max + log_a
    outs: list[torch.Tensor] = [target_logits - lse]
    if own_topk > 0:
        outs += [top_ids, top_vals - lse.unsqueeze(-1)]
    elif picked is not None:
        outs += [picked - lse.unsqueeze(-1)]
    if ent is not None:
        outs.append(log_a - ent / acc)
    return tuple(outs)


def _lse_and_target(hidden, weight, bias, targets, vocab_chunk) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: log-sum-exp over the vocabulary and the target's logit, tile by tile (no grad)."""
    n, dev = hidden.shape[0], hidden.device
    run_max = torch.full((n,), -math.inf, dtype=torch.float32, device=dev)
    acc = torch.zeros(n, dtype=torch.float32, device=dev)
    target = torch.zeros(n, 1, dtype=torch.float32, device=dev)
    for v0, v1 in _vocab_tiles(weight.shape[0], vocab_chunk):
        x = _tile_logits(hidden, weight, bias, v0, v1)
        target = _gather_in_tile(x, targets.unsqueeze(-1), v0, v1, target)
        new_max = torch.maximum(run_max, x.amax(dim=-1))
        acc = torch.exp(run_max - new_max) * acc + x.sub_(new_max.unsqueeze(-1)).exp_().sum(-1)
        run_max = new_max
        del x
    return run_max + acc.log(), target.squeeze(-1)


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
    vocab_chunk_size: int | None = VOCAB_CHUNK,  # vocabulary tile (None: the whole vocabulary)
    return_hidden: bool = False,  # also keep the [N, H] hidden rows (the full-vocabulary loss)
) -> TokenScores:
    """Log-probs of the response tokens (and optionally top-K, entropy) of ``model``.

    Gradients flow when enabled by the caller (the student's loss); teacher and reference
    calls run under ``torch.no_grad()``. Padding positions get 0 (log-probs, entropy) and
    id 0 / log-prob 0 (top-K); only positions with ``response_mask > 0`` are computed.
    """
    if topk and gather_ids is not None:
        raise ValueError("pass either gather_ids or topk, not both")
    bsz, width = response_ids.shape
    rows, valid = response_hidden(model, input_ids, attention_mask, response_mask)  # [N, H], [B, T]
    targets = response_ids[valid]  # [N]
    k = topk if topk else (gather_ids.shape[-1] if gather_ids is not None else 0)
    ids = gather_ids[valid] if gather_ids is not None else targets.new_zeros((targets.shape[0], 0))

    head = model.get_output_embeddings()
    weight, bias = head.weight, getattr(head, "bias", None)
    use_ckpt = torch.is_grad_enabled() and rows.requires_grad
    pieces: list[tuple[torch.Tensor, ...]] = []
    if use_ckpt and k == 0 and not entropy:
        # The loss path (log-probs only, with gradients): recompute-in-backward, in place.
        pieces.append(
            (_ChunkedLinearLogprob.apply(rows, weight, bias, targets, chunk_size, vocab_chunk_size),)
        )
    for start in range(0, 0 if pieces else rows.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        args = (rows[sl], weight, bias, targets[sl], ids[sl], topk, entropy)
        if use_ckpt:
            pieces.append(checkpoint(_chunk_stats, *args, use_reentrant=False))
        elif torch.is_grad_enabled() and (weight.requires_grad or rows.requires_grad):
            pieces.append(_chunk_stats(*args))  # gradients without checkpointing (rare)
        else:
            pieces.append(_chunk_stats_inplace(*args, vocab_chunk=vocab_chunk_size))

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
    if return_hidden:
        result.hidden = rows
    return result


def response_hidden(
    model: nn.Module,
    input_ids: torch.Tensor,  # [B, P+T]
    attention_mask: torch.Tensor,  # [B, P+T]
    response_mask: torch.Tensor,  # [B, T]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows [N, H], valid [B, T])``: the final hidden states that predict the N response
    tokens with ``response_mask > 0`` (row order = ``valid``'s row-major order)."""
    width = response_mask.shape[1]
    prompt_width = input_ids.shape[1] - width
    if prompt_width < 1:
        raise ValueError(
            f"every sequence needs at least one prompt token before the response "
            f"(input width {input_ids.shape[1]}, response width {width})"
        )
    hidden = backbone_hidden(model, input_ids, attention_mask)  # [B, P+T, H]
    hidden = hidden[:, prompt_width - 1 : prompt_width - 1 + width]  # [B, T, H] predicts y_t
    valid = response_mask > 0  # [B, T]
    return hidden[valid], valid


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


class _ChunkedLinearLogprob(torch.autograd.Function):
    """``log softmax(h Wᵀ + b)[y]`` per row for the loss path, never more than one
    ``[chunk, vocab_chunk]`` float32 tile alive.

    Forward (no autograd graph): streaming log-sum-exp over vocabulary tiles, a chunk of rows
    at a time; only the per-row log-sum-exp is kept. Backward: each tile's logits are
    recomputed once and turned in place into ``g · (onehot − p)``, which adds to ``∂h`` and
    to the tile's rows of ``∂W`` (float32). The lm_head matmuls are those of checkpointing
    (4 per tile), with far fewer tile passes and temporaries than autograd through a
    checkpointed ``log_softmax``.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, vocab_chunk):
        n_rows = hidden.shape[0]
        logprobs = torch.zeros(n_rows, dtype=torch.float32, device=hidden.device)
        lse = torch.zeros(n_rows, dtype=torch.float32, device=hidden.device)
        for start in range(0, n_rows, chunk_size):
            sl = slice(start, start + chunk_size)
            lse[sl], target = _lse_and_target(hidden[sl], weight, bias, targets[sl], vocab_chunk)
            logprobs[sl] = target - lse[sl]
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk_size, ctx.vocab_chunk = chunk_size, vocab_chunk
        return logprobs

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros_like(hidden, dtype=torch.float32) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = (torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
                  if need_b and bias is not None else None)
        g_all = grad_out.float()
        tiles = _vocab_tiles(weight.shape[0], ctx.vocab_chunk)
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            sl = slice(start, start + ctx.chunk_size)
            h, y, g_rows, lse_rows = hidden[sl], targets[sl], g_all[sl], lse[sl]
            for v0, v1 in tiles:
                x = _tile_logits(h, weight, bias, v0, v1)
                g = x.sub_(lse_rows.unsqueeze(-1)).exp_().mul_((-g_rows).unsqueeze(-1))  # −g·p
                inside = (y >= v0) & (y < v1)
                g.scatter_add_(-1, (y - v0).clamp(0, v1 - v0 - 1).unsqueeze(-1),
                               torch.where(inside, g_rows, torch.zeros_like(g_rows)).unsqueeze(-1))
                if need_h:
                    grad_h[sl] += g.to(weight.dtype) @ weight[v0:v1]
                if need_w:
                    grad_w[v0:v1].addmm_(g.t(), h.float())
                if grad_b is not None:
                    grad_b[v0:v1] += g.sum(0)
                del g, x
        return (
            grad_h.to(hidden.dtype) if grad_h is not None else None,
            grad_w.to(weight.dtype) if grad_w is not None else None,
            grad_b.to(bias.dtype) if grad_b is not None else None,
            None,
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


# ---------------------------------------------------------------------------
# the exact per-token reverse KL over the vocabulary (loss.estimator=full)
# ---------------------------------------------------------------------------


def _stream_lse(hidden, weight, bias, vocab_chunk) -> torch.Tensor:
    """``[N]`` log-sum-exp of ``hidden @ weight.T + bias`` over vocabulary tiles (no grad)."""
    n, dev = hidden.shape[0], hidden.device
    run_max = torch.full((n,), -math.inf, dtype=torch.float32, device=dev)
    acc = torch.zeros(n, dtype=torch.float32, device=dev)
    for v0, v1 in _vocab_tiles(weight.shape[0], vocab_chunk):
        x = _tile_logits(hidden, weight, bias, v0, v1)
        new_max = torch.maximum(run_max, x.amax(dim=-1))
        acc = torch.exp(run_max - new_max) * acc + x.sub_(new_max.unsqueeze(-1)).exp_().sum(-1)
        run_max = new_max
        del x
    return run_max + acc.log()


def _target_tile(targets, lses, v0: int, v1: int) -> torch.Tensor:
    """``[n, v1-v0]``: Σ_m c_m · log p_m over one tile (the target log-probs, unnormalised)."""
    out = None
    for (h, w, b, c), lse in zip(targets, lses):
        x = _tile_logits(h, w, b, v0, v1).sub_(lse.unsqueeze(-1)).mul_(c)
        out = x if out is None else out.add_(x)
    return out


class _ChunkedReverseKL(torch.autograd.Function):
    """Per row ``n``: ``KL_n = Σ_v π(v) (log π(v) − log q(v))`` with ``π = softmax(h_n W_sᵀ + b_s)``
    and ``log q = Σ_m c_m log softmax(g_{m,n} W_mᵀ + b_m)`` (teacher, optionally reference).

    Never more than one ``[chunk, vocab_chunk]`` float32 tile per model alive. Forward: a
    streaming log-sum-exp per model, then the KL, tile by tile. Backward (only the student
    side has gradients): ``∂KL_n/∂x_{n,v} = π(v) (log π(v) − log q(v) − KL_n)``, recomputed tile
    by tile and pushed into ``∂h`` and ``∂W_s``.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, vocab_chunk):
        n_rows = hidden.shape[0]
        kl = torch.zeros(n_rows, dtype=torch.float32, device=hidden.device)
        lse_s = torch.zeros_like(kl)
        lse_m = [torch.zeros_like(kl) for _ in targets]
        tiles = _vocab_tiles(weight.shape[0], vocab_chunk)
        for start in range(0, n_rows, chunk_size):
            sl = slice(start, start + chunk_size)
            h = hidden[sl]
            tg = [(g[sl], w, b, c) for g, w, b, c in targets]
            lse_s[sl] = _stream_lse(h, weight, bias, vocab_chunk)
            for i, (g, w, b, _) in enumerate(tg):
                lse_m[i][sl] = _stream_lse(g, w, b, vocab_chunk)
            acc = torch.zeros(h.shape[0], dtype=torch.float32, device=h.device)
            for v0, v1 in tiles:
                s = _tile_logits(h, weight, bias, v0, v1).sub_(lse_s[sl].unsqueeze(-1))
                q = _target_tile(tg, [m[sl] for m in lse_m], v0, v1)
                acc += (s.exp() * (s - q)).sum(-1)
                del s, q
            kl[sl] = acc
        ctx.save_for_backward(hidden, weight, bias, lse_s, kl, *lse_m)
        ctx.targets = targets
        ctx.chunk_size, ctx.vocab_chunk = chunk_size, vocab_chunk
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        hidden, weight, bias, lse_s, kl, *lse_m = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros_like(hidden, dtype=torch.float32) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = (torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
                  if need_b and bias is not None else None)
        g_all = grad_kl.float()
        tiles = _vocab_tiles(weight.shape[0], ctx.vocab_chunk)
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            sl = slice(start, start + ctx.chunk_size)
            h = hidden[sl]
            tg = [(g[sl], w, b, c) for g, w, b, c in ctx.targets]
            for v0, v1 in tiles:
                s = _tile_logits(h, weight, bias, v0, v1).sub_(lse_s[sl].unsqueeze(-1))
                q = _target_tile(tg, [m[sl] for m in lse_m], v0, v1)
                # g · π · (s − q − KL), in place in s's storage
                g = s.exp() * (s - q - kl[sl].unsqueeze(-1)) * g_all[sl].unsqueeze(-1)
                if need_h:
                    grad_h[sl] += g.to(weight.dtype) @ weight[v0:v1]
                if need_w:
                    grad_w[v0:v1].addmm_(g.t(), h.float())
                if grad_b is not None:
                    grad_b[v0:v1] += g.sum(0)
                del g, s, q
        return (
            grad_h.to(hidden.dtype) if grad_h is not None else None,
            grad_w.to(weight.dtype) if grad_w is not None else None,
            grad_b.to(bias.dtype) if grad_b is not None else None,
            None,
            None,
            None,
        )


def chunked_reverse_kl(
    hidden: torch.Tensor,  # [N, H]  student hidden rows (with gradients)
    head: nn.Module,  # the student's LM head
    targets: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float]],
    # [(g [N, H_m], W_m [V, H_m], b_m [V] | None, c_m)]: log q = Σ_m c_m log softmax(g W_mᵀ + b_m)
    *,
    chunk_size: int = 4096,
    vocab_chunk_size: int | None = VOCAB_CHUNK,
) -> torch.Tensor:
    """``[N]`` exact reverse KL ``KL(π_θ(·|y_<t) ‖ q)`` per row, differentiable in the student.

    Chunked over rows and tiled over the vocabulary (never ``[N, V]`` float32 logits); the
    target models' rows and weights are constants. ``KL_n`` is ``Σ_v π log π − Σ_v π log q``,
    so a ``q`` that is not normalised (ExOPD's mixture) shifts it by a constant per row.
    """
    if hidden.shape[0] == 0:
        return hidden.new_zeros((0,), dtype=torch.float32) + 0 * hidden.sum()
    targets = [(g.detach(), w.detach(), None if b is None else b.detach(), float(c)) for g, w, b, c in targets]
    return _ChunkedReverseKL.apply(
        hidden, head.weight, getattr(head, "bias", None), targets, chunk_size, vocab_chunk_size
    )
