"""The suffix-release rule ("Prefix Teach, Suffix Fade", appendix A.11).

For every response token the teacher scores the student's top-K candidate ids.
The rule turns those scores into a per-token weight in five steps:

1. ``teacher_margin``: the teacher's top-1 minus top-2 log-prob among the K
   candidates (log-probs clamped below at ``log(1e-12)``).
2. Sentence segments of the response (see :mod:`opd_lit.release.segment`).
3. ``segment_scores``: ``S_i = log1p(mean margin of segment i)``.
4. ``bic_change_point``: profiled RSS-BIC test of "no change" (k=1) against
   "one downward shift at tau" (k=3); the best tau is accepted only when it
   beats the no-change model.
5. ``apply_release_tokens``: tokens of the segments before the change point are
   kept, the suffix is released, and the kept tokens are rescaled so that the
   sample's loss mass is unchanged.

Every function comes in a single-sample form (lists of token positions) and the
training path uses the batched, loop-free :func:`release_weights_batch`
(``segment_ids [B, T]``), which takes exactly the same decisions.

Numerics. The change-point scan is done in float64 with prefix/suffix cumulative
sums. The left part of every split is centred on the first score and the right
part on the last score, so a constant run touching either end has an RSS of
exactly zero and the rounding error of every other RSS is relative to that RSS
(not to the raw sum of squares). Comparisons that the specification states as
exact (``mean(right) < mean(left)``, ``bic1 < best``, ``bic1 < bic0``) are made
with a tiny tolerance (:data:`MEAN_TIE_RTOL`, :data:`BIC_TIE_RTOL`), so that
mathematically equal quantities compare equal whatever the summation order:
a drop smaller than ``MEAN_TIE_RTOL * (1 + max|S|)`` is not a drop, two BIC values
closer than ``BIC_TIE_RTOL * (n + |BIC0|)`` are a tie (the smallest tau wins), and
the one-drop model must beat BIC0 by more than that. These tolerances are many
orders of magnitude below any difference that can change a real decision.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "BIC_TIE_RTOL",
    "LOGPROB_FLOOR",
    "MASS_EPS",
    "MEAN_TIE_RTOL",
    "RSS_EPS",
    "SIGNALS",
    "BatchRelease",
    "ChangePoint",
    "ReleaseResult",
    "apply_release_tokens",
    "bic_change_point",
    "release_weights",
    "release_weights_batch",
    "segment_adv_std_scores",
    "segment_scores",
    "teacher_margin",
]

#: Teacher log-probs are clamped below at log(1e-12) before ranking.
LOGPROB_FLOOR: float = math.log(1e-12)
#: Added to every RSS inside the BIC's log.
RSS_EPS: float = 1e-12
#: Denominator floor of the mass-preserving rescale.
MASS_EPS: float = 1e-8
#: Relative tolerance of the BIC comparisons (ties, acceptance); scale n + |BIC0|.
BIC_TIE_RTOL: float = 1e-9
#: Relative tolerance of the "strictly downward" test; scale 1 + max|S|.
MEAN_TIE_RTOL: float = 1e-9
#: The segment signals: mean teacher margin (the method) or std of the advantage.
SIGNALS: tuple[str, ...] = ("margin", "adv_std")

_F64 = torch.float64


# ---------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ChangePoint:
    """Outcome of the one-drop BIC test on ``n`` segment scores.

    ``release_segment`` is the first released segment (``n`` when nothing is
    released), ``accepted`` whether a downward change point beat the no-change
    model, ``bic_gain`` = ``BIC0 - BIC1`` of the accepted split (0.0 otherwise).
    """

    release_segment: int
    accepted: bool
    bic_gain: float


@dataclass(frozen=True)
class ReleaseResult:
    """Single-sample release (all tensors ``[T]``)."""

    keep_mask: Tensor  # [T] float 0/1: 1 for t < release_token
    scale: float  # total loss mass / kept loss mass
    reweighted_advantages: Tensor  # [T] advantages * keep * scale
    change_point: ChangePoint
    release_token: int  # first released token position; T when nothing is released
    weight: Tensor  # [T] loss_mask * keep * scale
    segment_scores: Tensor  # [S] float64


@dataclass(frozen=True)
class BatchRelease:
    """Batched release; ``S`` is the largest number of segments in the batch."""

    weight: Tensor  # [B, T] loss_mask * keep * scale
    keep_mask: Tensor  # [B, T] float 0/1
    scale: Tensor  # [B]
    release_segment: Tensor  # [B] long, num_segments when not accepted
    num_segments: Tensor  # [B] long
    accepted: Tensor  # [B] bool
    bic_gain: Tensor  # [B] float64
    release_token: Tensor  # [B] long, T when not accepted
    segment_scores: Tensor  # [B, S] float64, NaN past num_segments
    pre_mean: Tensor  # [B] float64 mean score of segments < release_segment (NaN if not accepted)
    post_mean: Tensor  # [B] float64 mean score of segments >= release_segment (NaN if not accepted)


# ---------------------------------------------------------------------------
# step 1: margins
# ---------------------------------------------------------------------------


def teacher_margin(teacher_topk_logprobs: Tensor) -> Tensor:
    """Teacher top-1 minus top-2 log-prob among the K candidates.

    ``teacher_topk_logprobs``: ``[..., K]`` -> ``[...]`` (>= 0). Log-probs are
    clamped below at ``log(1e-12)`` before ranking; half precision is upcast to
    float32. ``K < 2`` raises ``ValueError``.
    """
    x = torch.as_tensor(teacher_topk_logprobs)
    if x.dim() == 0 or x.shape[-1] < 2:
        k = 0 if x.dim() == 0 else x.shape[-1]
        raise ValueError(f"teacher_margin needs at least 2 candidates per token, got K={k}")
    if not torch.is_floating_point(x) or x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    x = x.clamp_min(LOGPROB_FLOOR)
    # two max passes instead of topk(2): same values, several times faster on CPU
    top1, arg1 = x.max(dim=-1, keepdim=True)  # [..., 1]
    others = x.scatter(-1, arg1, float("-inf"))  # a tie at the top keeps its twin
    top2 = others.amax(dim=-1, keepdim=True)
    return (top1 - top2).squeeze(-1)


# ---------------------------------------------------------------------------
# step 3: segment scores (shared scatter kernels)
# ---------------------------------------------------------------------------


def _segment_sums(values: Tensor, segment_ids: Tensor, num_segments: int) -> tuple[Tensor, Tensor]:
    """Per-segment sums and token counts.

    ``values [B, T]`` (any float), ``segment_ids [B, T]`` long (-1 = no segment)
    -> ``(sums [B, S], counts [B, S])`` float64. Tokens with id -1 never touch a
    sum, whatever their value (NaN padding included).
    """
    b = segment_ids.shape[0]
    s = int(num_segments)
    valid = segment_ids >= 0  # [B, T]
    # one extra dump bucket per row for the invalid tokens
    bucket = torch.where(valid, segment_ids, torch.full_like(segment_ids, s))
    flat = bucket + torch.arange(b, device=segment_ids.device).unsqueeze(1) * (s + 1)  # [B, T]
    vals = torch.where(valid, values.to(_F64), torch.zeros((), dtype=_F64, device=values.device))
    sums = torch.zeros(b * (s + 1), dtype=_F64, device=values.device)
    sums.scatter_add_(0, flat.reshape(-1), vals.reshape(-1))
    counts = torch.zeros(b * (s + 1), dtype=_F64, device=values.device)
    counts.scatter_add_(0, flat.reshape(-1), valid.to(_F64).reshape(-1))
    return sums.view(b, s + 1)[:, :s], counts.view(b, s + 1)[:, :s]


def _segment_mean(values: Tensor, segment_ids: Tensor, num_segments: int) -> Tensor:
    """``[B, T]`` -> ``[B, S]`` float64 mean per segment (NaN for an empty segment)."""
    sums, counts = _segment_sums(values, segment_ids, num_segments)
    return sums / counts


def _segment_std(values: Tensor, segment_ids: Tensor, num_segments: int) -> Tensor:
    """``[B, T]`` -> ``[B, S]`` float64 population std (ddof=0) per segment, two-pass."""
    mean = _segment_mean(values, segment_ids, num_segments)  # [B, S]
    valid = segment_ids >= 0
    if mean.shape[1] == 0:
        return mean
    tok_mean = mean.gather(1, segment_ids.clamp(0, mean.shape[1] - 1))  # [B, T]
    zero = torch.zeros((), dtype=_F64, device=values.device)
    dev = torch.where(valid, values.to(_F64) - tok_mean, zero)
    sq, counts = _segment_sums(dev * dev, segment_ids, num_segments)
    return torch.sqrt(sq / counts)


def _signal_scores(values: Tensor, segment_ids: Tensor, num_segments: int, signal: str) -> Tensor:
    """``[B, T]`` per-token values -> ``[B, S]`` float64 segment scores."""
    if signal == "margin":
        stat = _segment_mean(values, segment_ids, num_segments)
    elif signal == "adv_std":
        stat = _segment_std(values, segment_ids, num_segments)
    else:
        raise ValueError(f"unknown release signal {signal!r}; expected one of {SIGNALS}")
    return torch.log1p(stat)


def _segments_to_ids(segments: Sequence[Sequence[int]], length: int, device) -> Tensor:
    """List of token-position lists -> ``[T]`` long segment id per token (-1 = none)."""
    ids = torch.full((length,), -1, dtype=torch.long, device=device)
    for k, seg in enumerate(segments):
        pos = torch.as_tensor(list(seg), dtype=torch.long)
        if pos.numel() == 0:
            raise ValueError(f"segment {k} is empty; segments must be non-empty")
        if int(pos.min()) < 0 or int(pos.max()) >= length:
            raise ValueError(f"segment {k} has a position outside [0, {length})")
        pos = pos.to(device)
        if bool((ids[pos] >= 0).any()) or pos.unique().numel() != pos.numel():
            raise ValueError(f"segment {k} repeats a token position")
        ids[pos] = k
    return ids


def segment_scores(margins: Tensor, segments: Sequence[Sequence[int]]) -> Tensor:
    """``S_i = log1p(mean margin over segment i)``.

    ``margins [T]``, ``segments`` = list of non-empty lists of token positions
    -> ``[S]`` float64.
    """
    margins = torch.as_tensor(margins)
    if margins.dim() != 1:
        raise ValueError(f"margins must be 1-D [T], got shape {tuple(margins.shape)}")
    ids = _segments_to_ids(segments, margins.shape[0], margins.device)
    return _signal_scores(margins.unsqueeze(0), ids.unsqueeze(0), len(segments), "margin")[0]


def segment_adv_std_scores(advantages: Tensor, segments: Sequence[Sequence[int]]) -> Tensor:
    """``S_i = log1p(std(A_t over segment i))`` (population std, ddof=0).

    ``advantages [T]``, ``segments`` = list of non-empty lists -> ``[S]`` float64.
    """
    advantages = torch.as_tensor(advantages)
    if advantages.dim() != 1:
        raise ValueError(f"advantages must be 1-D [T], got shape {tuple(advantages.shape)}")
    ids = _segments_to_ids(segments, advantages.shape[0], advantages.device)
    return _signal_scores(advantages.unsqueeze(0), ids.unsqueeze(0), len(segments), "adv_std")[0]


# ---------------------------------------------------------------------------
# step 4: one-drop profiled RSS-BIC, all change points at once
# ---------------------------------------------------------------------------


def _bic_scan(scores: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Vectorised change-point test for a padded batch of score rows.

    ``scores [B, S]`` (entries at columns >= lengths are ignored),
    ``lengths [B]`` long -> ``(release_segment [B] long, accepted [B] bool,
    bic_gain [B] float64)``. A row with n < 2, or with a non-finite score among
    its first n, is not accepted (release_segment = n, gain 0).
    """
    x = scores.to(_F64)
    device = x.device
    b, s = x.shape
    n = lengths.to(device=device, dtype=torch.long)
    release = n.clone()
    accepted = torch.zeros(b, dtype=torch.bool, device=device)
    gain = torch.zeros(b, dtype=_F64, device=device)
    if s < 2 or b == 0:
        return release, accepted, gain

    zero = torch.zeros((), dtype=_F64, device=device)
    cols = torch.arange(s, device=device)
    valid = cols.unsqueeze(0) < n.unsqueeze(1)  # [B, S]
    finite = torch.isfinite(x)
    ok = (finite | ~valid).all(dim=1) & (n >= 2)  # [B]
    x = torch.where(valid & finite, x, zero)
    nf = n.to(_F64).clamp_min(1.0)  # [B]
    last = (n - 1).clamp_min(0).unsqueeze(1)  # [B, 1]

    # left parts start at column 0: centre on the first score; right parts end at
    # column n-1: centre on the last score (padding stays exactly 0)
    c_left = x[:, :1]  # [B, 1]
    c_right = x.gather(1, last)  # [B, 1]
    dl = torch.where(valid, x - c_left, zero)
    dr = torch.where(valid, x - c_right, zero)
    sl = dl.cumsum(1)  # [B, S] sum over columns 0..j
    ql = (dl * dl).cumsum(1)
    sr = dr.flip(1).cumsum(1).flip(1)  # [B, S] sum over columns j..S-1
    qr = (dr * dr).flip(1).cumsum(1).flip(1)

    # no-change model (k0 = 1)
    s_all = sl.gather(1, last).squeeze(1)
    q_all = ql.gather(1, last).squeeze(1)
    rss0 = (q_all - s_all * s_all / nf).clamp_min(0.0)
    bic0 = nf * torch.log((rss0 + RSS_EPS) / nf) + torch.log(nf)  # [B]

    # one-drop model at tau = 1..S-1 (k1 = 3); column j <-> tau = j + 1
    tau = torch.arange(1, s, device=device, dtype=_F64).unsqueeze(0)  # [1, S-1]
    n_right = nf.unsqueeze(1) - tau  # [B, S-1]
    cand = (n_right >= 1.0) & ok.unsqueeze(1)
    n_right = n_right.clamp_min(1.0)
    s_l, q_l = sl[:, :-1], ql[:, :-1]
    s_r, q_r = sr[:, 1:], qr[:, 1:]
    rss_l = (q_l - s_l * s_l / tau).clamp_min(0.0)
    rss_r = (q_r - s_r * s_r / n_right).clamp_min(0.0)
    mean_l = c_left + s_l / tau
    mean_r = c_right + s_r / n_right
    tol_mean = MEAN_TIE_RTOL * (1.0 + x.abs().amax(dim=1, keepdim=True))  # [B, 1]
    down = cand & (mean_r < mean_l - tol_mean)  # strictly downward
    n1 = nf.unsqueeze(1)
    bic1 = n1 * torch.log((rss_l + rss_r + RSS_EPS) / n1) + 3.0 * torch.log(n1)
    bic1 = torch.where(down, bic1, torch.full_like(bic1, math.inf))

    # first tau whose BIC is (within tolerance) the minimum
    tol_bic = BIC_TIE_RTOL * (nf + bic0.abs())  # [B]
    best = bic1.amin(dim=1)  # [B]
    near = down & (bic1 <= (best + tol_bic).unsqueeze(1))
    sentinel = s - 1
    first = torch.where(
        near, cols[: s - 1].unsqueeze(0), torch.full_like(cols[: s - 1], sentinel).unsqueeze(0)
    )
    idx = first.amin(dim=1)  # [B]
    found = idx < sentinel
    bic_at = bic1.gather(1, idx.clamp_max(s - 2).unsqueeze(1)).squeeze(1)
    accepted = found & (bic_at < bic0 - tol_bic)
    release = torch.where(accepted, idx + 1, n)
    gain = torch.where(accepted, (bic0 - bic_at).clamp_min(0.0), zero)
    return release, accepted, gain


def bic_change_point(scores: Sequence[float] | Tensor) -> ChangePoint:
    """One-drop change point of a 1-D score sequence (float64, O(n), no loop over tau).

    BIC(values, k) = n * log((RSS + 1e-12) / n) + k * log(n); no-change k0 = 1,
    one downward shift at tau in 1..n-1 k1 = 3. Returns
    ``ChangePoint(release_segment, accepted, bic_gain)``; n < 2 (or a non-finite
    score) gives ``(n, False, 0.0)``.
    """
    x = torch.as_tensor(scores, dtype=_F64)
    if x.dim() != 1:
        raise ValueError(f"scores must be 1-D, got shape {tuple(x.shape)}")
    n = x.shape[0]
    release, accepted, gain = _bic_scan(x.unsqueeze(0), torch.tensor([n], device=x.device))
    return ChangePoint(int(release[0]), bool(accepted[0]), float(gain[0]))


# ---------------------------------------------------------------------------
# step 5: keep the prefix, rescale to preserve the loss mass
# ---------------------------------------------------------------------------


def apply_release_tokens(loss_mask: Tensor, release_token: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Keep tokens ``t < release_token[b]`` and rescale to preserve each sample's mass.

    ``loss_mask [B, T]``, ``release_token [B]`` long -> ``(weight [B, T],
    keep [B, T], scale [B])`` with ``weight = loss_mask * keep * scale`` and
    ``scale = sum(loss_mask) / max(sum(loss_mask * keep), 1e-8)``. A sample with
    no kept mass (empty response, or a release before its first masked token)
    gets scale 1.0 and zero weights. Outputs are in the mask's float dtype
    (float32 for bool/integer masks).
    """
    if loss_mask.dim() != 2:
        raise ValueError(f"loss_mask must be [B, T], got shape {tuple(loss_mask.shape)}")
    dtype = loss_mask.dtype if torch.is_floating_point(loss_mask) else torch.float32
    b, t = loss_mask.shape
    rt = torch.as_tensor(release_token, device=loss_mask.device).to(torch.long).reshape(b)
    positions = torch.arange(t, device=loss_mask.device)
    keep = positions.unsqueeze(0) < rt.unsqueeze(1)  # [B, T]
    mask = loss_mask.to(_F64)
    kept_mask = mask * keep.to(_F64)
    total = mask.sum(dim=1)  # [B]
    kept = kept_mask.sum(dim=1)
    scale = torch.where(kept > 0, total / kept.clamp_min(MASS_EPS), torch.ones_like(total))
    weight = kept_mask * scale.unsqueeze(1)
    return weight.to(dtype), keep.to(dtype), scale.to(dtype)


# ---------------------------------------------------------------------------
# the whole rule
# ---------------------------------------------------------------------------


def release_weights(
    advantages: Tensor,
    loss_mask: Tensor,
    teacher_topk_logprobs: Tensor | None,
    segments: Sequence[Sequence[int]],
    signal: str = "margin",
) -> ReleaseResult:
    """Suffix release for one sample.

    ``advantages [T]``, ``loss_mask [T]``, ``teacher_topk_logprobs [T, K]``
    (may be None for ``signal="adv_std"``), ``segments`` = ordered, contiguous,
    non-empty lists of token positions (the response's sentences).
    """
    advantages = torch.as_tensor(advantages)
    loss_mask = torch.as_tensor(loss_mask)
    if advantages.dim() != 1 or loss_mask.shape != advantages.shape:
        raise ValueError(
            "advantages and loss_mask must both be [T], got "
            f"{tuple(advantages.shape)} and {tuple(loss_mask.shape)}"
        )
    t = advantages.shape[0]
    if signal == "margin":
        if teacher_topk_logprobs is None:
            raise ValueError('signal="margin" needs teacher_topk_logprobs [T, K]')
        topk = torch.as_tensor(teacher_topk_logprobs)
        if topk.dim() != 2 or topk.shape[0] != t:
            raise ValueError(f"teacher_topk_logprobs must be [T={t}, K], got {tuple(topk.shape)}")
        scores = segment_scores(teacher_margin(topk), segments)
    elif signal == "adv_std":
        scores = segment_adv_std_scores(advantages, segments)
    else:
        raise ValueError(f"unknown release signal {signal!r}; expected one of {SIGNALS}")
    cp = bic_change_point(scores)
    release_token = t
    if cp.accepted:
        release_token = int(min(segments[cp.release_segment]))
    weight, keep, scale = apply_release_tokens(
        loss_mask.unsqueeze(0), torch.tensor([release_token], device=loss_mask.device)
    )
    reweighted = advantages * keep[0] * scale[0]  # [T]
    return ReleaseResult(
        keep_mask=keep[0],
        scale=float(scale[0]),
        reweighted_advantages=reweighted,
        change_point=cp,
        release_token=release_token,
        weight=weight[0],
        segment_scores=scores,
    )


def release_weights_batch(
    advantages: Tensor,
    loss_mask: Tensor,
    teacher_topk_logprobs: Tensor | None,
    segment_ids: Tensor,
    signal: str = "margin",
) -> BatchRelease:
    """Suffix release for a padded batch, with no Python loop over samples or tau.

    ``advantages [B, T]``, ``loss_mask [B, T]``, ``teacher_topk_logprobs
    [B, T, K]`` (None allowed for ``signal="adv_std"``), ``segment_ids [B, T]``
    long: the sentence index of each response token, 0..S_b-1 in order, -1
    outside the response (prompt, padding). Segment statistics use every token
    with ``segment_ids >= 0``; the weights use ``loss_mask``.
    """
    if signal not in SIGNALS:
        raise ValueError(f"unknown release signal {signal!r}; expected one of {SIGNALS}")
    if segment_ids.dim() != 2:
        raise ValueError(f"segment_ids must be [B, T], got shape {tuple(segment_ids.shape)}")
    b, t = segment_ids.shape
    if advantages.shape != (b, t) or loss_mask.shape != (b, t):
        raise ValueError(
            f"advantages {tuple(advantages.shape)} and loss_mask {tuple(loss_mask.shape)} "
            f"must match segment_ids {(b, t)}"
        )
    device = segment_ids.device
    seg = segment_ids.to(torch.long)
    if t > 0:
        num_segments = (seg.amax(dim=1) + 1).clamp_min(0)  # [B]
    else:
        num_segments = torch.zeros(b, dtype=torch.long, device=device)
    s = int(num_segments.max()) if b > 0 else 0

    if signal == "margin":
        if teacher_topk_logprobs is None:
            raise ValueError('signal="margin" needs teacher_topk_logprobs [B, T, K]')
        if teacher_topk_logprobs.dim() != 3 or teacher_topk_logprobs.shape[:2] != (b, t):
            raise ValueError(
                f"teacher_topk_logprobs must be [B={b}, T={t}, K], "
                f"got {tuple(teacher_topk_logprobs.shape)}"
            )
        values = teacher_margin(teacher_topk_logprobs)  # [B, T]
    else:
        values = advantages

    _, counts = _segment_sums(torch.zeros((b, t), dtype=_F64, device=device), seg, s)
    in_range = torch.arange(s, device=device).unsqueeze(0) < num_segments.unsqueeze(1)  # [B, S]
    if bool((in_range & (counts == 0)).any()):
        raise ValueError(
            "segment_ids must number each sample's segments 0..S-1 with no empty segment"
        )

    scores = _signal_scores(values, seg, s, signal)  # [B, S]
    scores = torch.where(in_range, scores, torch.full_like(scores, math.nan))
    release_segment, accepted, gain = _bic_scan(scores, num_segments)

    positions = torch.arange(t, device=device).unsqueeze(0)  # [1, T]
    at_release = seg == release_segment.unsqueeze(1)  # [B, T]
    first_tok = (
        torch.where(at_release, positions, torch.full_like(positions, t)).amin(dim=1)
        if t > 0
        else num_segments
    )
    release_token = torch.where(accepted, first_tok, torch.full_like(num_segments, t))
    weight, keep, scale = apply_release_tokens(loss_mask, release_token)

    cols = torch.arange(s, device=device).unsqueeze(0)  # [1, S]
    before = in_range & (cols < release_segment.unsqueeze(1))
    after = in_range & ~before
    zero = torch.zeros((), dtype=_F64, device=device)
    nan = torch.full((b,), math.nan, dtype=_F64, device=device)
    pre_sum = torch.where(before, scores, zero).sum(dim=1)
    post_sum = torch.where(after, scores, zero).sum(dim=1)
    n_pre = before.sum(dim=1).to(_F64)
    n_post = after.sum(dim=1).to(_F64)
    pre_mean = torch.where(accepted, pre_sum / n_pre.clamp_min(1.0), nan)
    post_mean = torch.where(accepted, post_sum / n_post.clamp_min(1.0), nan)

    return BatchRelease(
        weight=weight,
        keep_mask=keep,
        scale=scale,
        release_segment=release_segment,
        num_segments=num_segments,
        accepted=accepted,
        bic_gain=gain,
        release_token=release_token,
        segment_scores=scores,
        pre_mean=pre_mean,
        post_mean=post_mean,
    )
