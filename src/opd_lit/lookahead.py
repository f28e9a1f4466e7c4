"""Lookahead Group Reward (LGR): the teacher's tree-attention lookahead and its pure math.

At a position ``t`` where the student is uncertain (entropy of π_S(· | y_<t) above ``τ``), LGR
asks, for each of the student's top-K candidates ``c`` for ``y_t``: how confident is the
teacher about the *next* token once ``c`` is appended to the prefix?

    r_raw(c)  = max_v p_T(v | x, y_<t, c)                       (one branch token per candidate)
    r_conf(c) = (r_raw(c) − mean_K r_raw) / (std_K r_raw + ε)   (normalised within the K group)

Cost. The teacher scores the response once (one prefill, :func:`opd_lit.scoring.score_tokens`)
and :class:`PrefillCapture` keeps that pass's KV cache. All triggered positions' K branch
tokens are then scored against the cache with a *tree attention mask*: branch token
``(t, k)`` sits at the position of ``y_t``, attends to the prompt and ``y_<t`` in the cache and
to itself, never to its siblings or to other positions' branches. The triggered positions are
split into ``segments`` groups (one extra forward each) to bound the size of the mask and of
the branch activations; :func:`lookahead_max_prob_reference` is the same quantity with K
separate plain forwards (the test oracle).

Everything here is a pure function of tensors and a model (no Lightning).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

#: ε of the group normalisation: when all K candidates induce the same confidence
#: (std → 0), r_conf → 0 instead of blowing up.
GROUP_EPS: float = 1e-6


# ---------------------------------------------------------------------------
# what the TeacherCallback hands to the method
# ---------------------------------------------------------------------------


@dataclass
class LookaheadResult:
    """Teacher lookahead of one rollout batch (``batch.extras["lookahead"]``)."""

    trigger: torch.Tensor  # [B, T] bool  positions that were branched (entropy > τ)
    r_raw: torch.Tensor  # [B, T, K] float32  teacher's max next-token prob after each candidate
    teacher_calls: int  # teacher forward passes: prefills + branch forwards
    branch_tokens: int  # branch tokens scored (triggered positions × K)


# ---------------------------------------------------------------------------
# pure LGR math
# ---------------------------------------------------------------------------


def entropy_trigger(
    entropy: torch.Tensor,  # [B, T]  student entropy at each position
    mask: torch.Tensor,  # [B, T]  response mask
    tau: float,
) -> torch.Tensor:
    """``[B, T]`` bool: response positions whose student entropy exceeds ``tau``."""
    return (entropy > tau) & (mask > 0)


def group_normalise(r_raw: torch.Tensor, eps: float = GROUP_EPS) -> torch.Tensor:
    """``[..., K] -> [..., K]``: ``(r − mean_K) / (std_K + eps)``, population std (ddof = 0)."""
    r = r_raw.float()
    mean = r.mean(dim=-1, keepdim=True)  # [..., 1]
    std = r.std(dim=-1, keepdim=True, unbiased=False)  # [..., 1]
    return (r - mean) / (std + eps)


def sampled_candidate_reward(
    r_conf: torch.Tensor,  # [B, T, K]
    candidate_ids: torch.Tensor,  # [B, T, K]
    response_ids: torch.Tensor,  # [B, T]
    trigger: torch.Tensor,  # [B, T] bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``r_conf(y_t)`` of the sampled token when it is one of the candidates.

    Returns ``(reward [B, T], hit [B, T] bool)``: ``reward`` is ``r_conf`` at the candidate
    equal to ``y_t`` on triggered positions where ``y_t`` is a candidate (``hit``), else 0.
    """
    match = candidate_ids == response_ids.unsqueeze(-1)  # [B, T, K]
    hit = match.any(-1) & trigger  # [B, T]
    reward = (r_conf * match.to(r_conf.dtype)).sum(-1)  # [B, T] (candidates are distinct)
    return reward * hit.to(r_conf.dtype), hit


def expected_group_reward_loss(
    candidate_logprobs: torch.Tensor,  # [B, T, K]  log π_θ(c_k | y_<t), with gradient
    reward: torch.Tensor,  # [B, T, K]  γ · r_conf(c_k) (constant)
    weight: torch.Tensor,  # [B, T]
    num_tokens: torch.Tensor | float,  # Σ_t mask_t over the whole batch
) -> torch.Tensor:
    """LGR ``variant=topk``: ``−Σ_t w_t Σ_k π̄_θ(c_k)·R_k / Σ_t mask_t``.

    ``π̄_θ(c_k) = softmax_k(log π_θ(c_j))`` is the student's distribution renormalised over
    its K candidates, so the gradient is ``Σ_k π̄_k R_k ∇log π̄_k``: every candidate is
    pushed up or down by its group reward, weighted by the student's own probability
    (the exact expectation over the K candidates instead of the single sampled token).
    """
    probs = candidate_logprobs.float().softmax(dim=-1)  # [B, T, K]
    per_token = (probs * reward.detach().float()).sum(-1)  # [B, T]
    denom = torch.as_tensor(num_tokens, dtype=per_token.dtype, device=per_token.device)
    denom = denom.clamp(min=1.0)
    return -(weight.detach().float() * per_token).sum() / denom


# ---------------------------------------------------------------------------
# the single teacher prefill, with its KV cache kept
# ---------------------------------------------------------------------------


class _CachingDecoder:
    def __init__(self, decoder: nn.Module):
        self.decoder = decoder
        self.cache: Any = None

    def __call__(self, **kwargs):
        kwargs["use_cache"] = True
        out = self.decoder(**kwargs)
        self.cache = out.past_key_values
        return out


class PrefillCapture:
    """Hand this to :func:`~opd_lit.scoring.score_tokens` instead of the model to keep the KV
    cache of its single backbone pass (``.cache``), so the lookahead needs no second prefill."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._decoder = _CachingDecoder(_decoder_of(model))

    def get_decoder(self) -> _CachingDecoder:
        return self._decoder

    def get_output_embeddings(self) -> nn.Module:
        return self.model.get_output_embeddings()

    @property
    def cache(self) -> Any:
        return self._decoder.cache


def _decoder_of(model: nn.Module) -> nn.Module:
    return model.get_decoder() if hasattr(model, "get_decoder") else model.model


# ---------------------------------------------------------------------------
# tree attention
# ---------------------------------------------------------------------------


def split_positions(trigger: torch.Tensor, segments: int) -> list[list[torch.Tensor]]:
    """``trigger [B, T]`` -> ``groups[g][b]``: row ``b``'s triggered positions of group ``g``.

    Each row's triggered positions (in order) are split into ``segments`` near-equal
    contiguous groups, so every branch forward scores about ``1/segments`` of them.
    """
    per_row = [torch.nonzero(row, as_tuple=False).squeeze(-1) for row in trigger]  # B × [n_b]
    split = [list(torch.tensor_split(p, segments)) for p in per_row]  # B × segments × [n_bg]
    return [[split[b][g] for b in range(len(per_row))] for g in range(segments)]


def tree_branch_inputs(
    positions: list[torch.Tensor],  # B × [n_b] response positions branched in this forward
    candidate_ids: torch.Tensor,  # [B, T, K]
    attention_mask: torch.Tensor,  # [B, L]  teacher [prompt | response] mask of the cached prefill
    response_width: int,  # T
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs of one tree-attention forward over the cached prefill.

    Branch slot ``i*K + k`` of row ``b`` holds candidate ``k`` for response position
    ``t = positions[b][i]``. Returns ``(ids [B, M], position_ids [B, M], mask [B, 1, M, L+M],
    valid [B, M] bool)`` with ``M = max_b n_b · K``. The mask lets slot ``(t, k)`` see the
    cached prompt tokens and ``y_<t`` (columns ``< L − T + t`` with ``attention_mask = 1``) and
    itself; padding slots see only themselves. ``dtype=torch.bool`` gives a boolean mask
    (True = attend; SDPA), a float dtype an additive one (0 / finfo.min; eager attention).
    """
    bsz, width = attention_mask.shape
    k = candidate_ids.shape[-1]
    device = attention_mask.device
    prompt_width = width - response_width
    n_max = max((int(p.numel()) for p in positions), default=0)
    m = n_max * k
    pos = torch.zeros((bsz, n_max), dtype=torch.long, device=device)  # [B, N]
    ok = torch.zeros((bsz, n_max), dtype=torch.bool, device=device)  # [B, N]
    for b, p in enumerate(positions):
        pos[b, : p.numel()] = p.to(device)
        ok[b, : p.numel()] = True
    rows = torch.arange(bsz, device=device).unsqueeze(1)  # [B, 1]
    ids = candidate_ids[rows, pos]  # [B, N, K]
    prompt_len = attention_mask[:, :prompt_width].long().sum(-1)  # [B]
    pos_ids = (prompt_len.unsqueeze(1) + pos).unsqueeze(-1).expand(bsz, n_max, k)  # [B, N, K]
    # cache part: real tokens strictly before y_t's column
    cols = torch.arange(width, device=device)  # [L]
    see = (attention_mask.bool().unsqueeze(1)  # [B, 1, L]
           & (cols.view(1, 1, width) < (prompt_width + pos).unsqueeze(-1))  # [B, N, L]
           & ok.unsqueeze(-1))  # [B, N, L]
    see = see.unsqueeze(2).expand(bsz, n_max, k, width).reshape(bsz, m, width)  # [B, M, L]
    own = torch.eye(m, dtype=torch.bool, device=device).unsqueeze(0).expand(bsz, m, m)  # [B, M, M]
    allowed = torch.cat([see, own], dim=-1)  # [B, M, L+M]
    if dtype == torch.bool:
        mask = allowed
    else:
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    valid = ok.unsqueeze(-1).expand(bsz, n_max, k).reshape(bsz, m)  # [B, M]
    return (
        ids.reshape(bsz, m) * valid,  # padding slots get id 0
        pos_ids.reshape(bsz, m) * valid,
        mask.unsqueeze(1),
        valid,
    )


#: Attention implementations that take a custom 4D (tree) mask.
TREE_ATTENTION = ("sdpa", "eager")


def _attention_of(model: nn.Module) -> str:
    return getattr(getattr(model, "config", None), "_attn_implementation", None) or "sdpa"


def check_attention(model: nn.Module, key: str = "teacher.attn_implementation") -> None:
    """ValueError unless ``model`` runs an attention that accepts a custom 4D mask."""
    impl = _attention_of(model)
    if impl not in TREE_ATTENTION:
        raise ValueError(
            f"{key}={impl!r}: the LGR lookahead scores branches with a custom 4D tree attention "
            f"mask, which needs one of {list(TREE_ATTENTION)}"
        )


def _max_prob(
    hidden: torch.Tensor,  # [N, H]
    head: nn.Module,
    chunk_size: int,
) -> torch.Tensor:
    """``[N]`` max next-token probability, through the LM head ``chunk_size`` rows at a time."""
    out = []
    for start in range(0, hidden.shape[0], chunk_size):
        logits = head(hidden[start : start + chunk_size]).float()  # [n, V]
        out.append((logits.amax(-1) - torch.logsumexp(logits, dim=-1)).exp())
    return torch.cat(out) if out else hidden.new_zeros((0,), dtype=torch.float32)


@torch.no_grad()
def lookahead_max_prob(
    model: nn.Module,
    cache: Any,  # the KV cache of the prefill of [prompt | response] (PrefillCapture.cache)
    attention_mask: torch.Tensor,  # [B, L]  mask of that prefill
    trigger: torch.Tensor,  # [B, T] bool  positions to branch
    candidate_ids: torch.Tensor,  # [B, T, K]  candidates for y_t
    *,
    segments: int = 8,
    chunk_size: int = 4096,
    fixed_calls: bool = False,
) -> tuple[torch.Tensor, int]:
    """Tree-attention lookahead: ``(r_raw [B, T, K] float32, branch forwards)``.

    ``r_raw[b, t, k] = max_v p(v | prefix_b, y_<t, candidate_ids[b, t, k])`` on triggered
    positions, 0 elsewhere. The cache is restored to its prefill length after every forward.
    ``fixed_calls``: always run exactly ``segments`` forwards (an empty group scores one
    discarded branch token), so that every rank of a sharded teacher runs the same collectives.
    """
    bsz, width = attention_mask.shape
    resp = trigger.shape[1]
    k = candidate_ids.shape[-1]
    if cache is None or cache.get_seq_length() != width:
        got = None if cache is None else cache.get_seq_length()
        raise ValueError(f"the KV cache must hold the {width}-token prefill, got {got}")
    check_attention(model)
    r_raw = torch.zeros((bsz, resp, k), dtype=torch.float32, device=attention_mask.device)
    if not bool(trigger.any()) and not fixed_calls:
        return r_raw, 0
    decoder = _decoder_of(model)
    head = model.get_output_embeddings()
    # SDPA takes a boolean mask whatever the compute dtype (autocast included)
    dtype = torch.bool if _attention_of(model) == "sdpa" else head.weight.dtype
    calls = 0
    for group in split_positions(trigger, max(1, int(segments))):
        dummy = all(p.numel() == 0 for p in group)
        if dummy and not fixed_calls:
            continue
        if dummy:  # one branch token of row 0 at its first position, scored and discarded
            group = [torch.zeros(1, dtype=torch.long, device=trigger.device)] + list(group[1:])
        ids, pos_ids, mask, valid = tree_branch_inputs(
            group, candidate_ids, attention_mask, resp, dtype
        )
        try:
            out = decoder(
                input_ids=ids, attention_mask=mask, position_ids=pos_ids,
                past_key_values=cache, use_cache=True,
            )
        finally:
            if cache.get_seq_length() > width:
                cache.crop(-(cache.get_seq_length() - width))
        calls += 1
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # [B, M, H]
        probs = _max_prob(hidden[valid], head, chunk_size)  # [n_valid]
        if dummy:
            continue
        rows = torch.cat(
            [torch.full((p.numel() * k,), b, dtype=torch.long) for b, p in enumerate(group)]
        )
        ts = torch.cat([p.repeat_interleave(k) for p in group]).long()
        ks = torch.cat([torch.arange(k).repeat(p.numel()) for p in group])
        dev = r_raw.device
        r_raw[rows.to(dev), ts.to(dev), ks.to(dev)] = probs
    return r_raw, calls


@torch.no_grad()
def lookahead_max_prob_reference(
    model: nn.Module,
    input_ids: torch.Tensor,  # [B, L]  [left-padded prompt | right-padded response]
    attention_mask: torch.Tensor,  # [B, L]
    trigger: torch.Tensor,  # [B, T] bool
    candidate_ids: torch.Tensor,  # [B, T, K]
) -> torch.Tensor:
    """The oracle for :func:`lookahead_max_prob`: one plain forward per candidate. ``[B, T, K]``."""
    width = input_ids.shape[1]
    prompt_width = width - trigger.shape[1]
    r_raw = torch.zeros(candidate_ids.shape, dtype=torch.float32, device=input_ids.device)
    for b, t in torch.nonzero(trigger, as_tuple=False).tolist():
        cols = attention_mask[b, : prompt_width + t].bool()
        prefix = input_ids[b, : prompt_width + t][cols]  # real prompt tokens and y_<t
        for j, c in enumerate(candidate_ids[b, t].tolist()):
            seq = torch.cat([prefix, prefix.new_tensor([c])]).unsqueeze(0)  # [1, n+1]
            logits = model(input_ids=seq, use_cache=False).logits[0, -1].float()  # [V]
            r_raw[b, t, j] = logits.softmax(-1).max()
    return r_raw


__all__ = [
    "GROUP_EPS",
    "TREE_ATTENTION",
    "LookaheadResult",
    "PrefillCapture",
    "check_attention",
    "entropy_trigger",
    "expected_group_reward_loss",
    "group_normalise",
    "lookahead_max_prob",
    "lookahead_max_prob_reference",
    "sampled_candidate_reward",
    "split_positions",
    "tree_branch_inputs",
]
