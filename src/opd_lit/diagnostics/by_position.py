"""Per-token signals by relative position in the response (Figures 1, 2 and 5). Pure torch.

A response of ``L`` tokens is cut into ``num_bins`` relative-position bins: its ``t``-th token
(0-based, counting only masked tokens) falls in bin ``floor(t * num_bins / L)``, i.e. bin ``k``
covers relative positions ``[k / num_bins, (k + 1) / num_bins)``. Statistics are pooled over
every token of every rollout that falls in a bin, so long and short responses are compared at
the same relative point of their solution (the paper's 20 bins).

The moments are sufficient statistics (count, sum, sum of squares; float64), so the training
callback adds them up over the steps of a diagnostics window and finalises once.

Normalisation (Figure 1(b), Figures 2 and 5). The paper plots a "normalised" std of the
advantage and "normalised" margin curves so that curves of different scale (models, support
sizes K) share one axis; its text does not spell the normaliser out. Here a curve is divided
by its own mean over the bins (``normalize="mean"``, the default): 1.0 is the curve's average
level, and a decline reads as going from above 1 to below 1. The mean is robust where the
first bin is nearly deterministic (a fixed opening phrase has std ~ 0, which would blow a
first-bin normaliser up); ``"first_bin"`` (divide by the first non-empty bin: "share of the
initial contrast left"), ``"max"`` and ``"none"`` are the alternatives. The raw values are
always written beside the normalised ones, with the normaliser in a ``normalize`` column.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from opd_lit.objectives import opd_advantage
from opd_lit.release import teacher_margin

NORMALIZE = ("first_bin", "mean", "max", "none")
_F64 = torch.float64


def relative_position_bins(mask: Tensor, num_bins: int) -> Tensor:
    """``mask [B, T]`` -> ``[B, T]`` long bin of every masked token, ``-1`` elsewhere.

    Token positions are counted over the masked tokens of each row (``cumsum(mask) - 1``), so
    the response need not start at column 0.
    """
    if num_bins < 1:
        raise ValueError(f"num_bins={num_bins}: must be >= 1")
    valid = mask > 0  # [B, T]
    pos = valid.long().cumsum(-1) - 1  # [B, T]
    length = valid.long().sum(-1, keepdim=True).clamp_min(1)  # [B, 1]
    bins = torch.div(pos * num_bins, length, rounding_mode="floor").clamp(0, num_bins - 1)
    return torch.where(valid, bins, torch.full_like(bins, -1))


def bin_edges(num_bins: int) -> list[tuple[float, float]]:
    return [(k / num_bins, (k + 1) / num_bins) for k in range(num_bins)]


@dataclass
class PositionMoments:
    """Moments of a per-token value by position bin, summed over rollouts (all ``[num_bins]``).

    ``count``/``total``/``total_sq`` pool every token of the bin; ``within_sum``/``within_n``
    add up, over rollouts with at least two tokens in the bin, the standard deviation of the
    value *along that rollout* (the realised-path dispersion of the paper's appendix A.2).
    """

    count: Tensor  # [N] float64 tokens in the bin
    total: Tensor  # [N] float64 sum of values
    total_sq: Tensor  # [N] float64 sum of squared values
    within_sum: Tensor  # [N] float64 sum over rollouts of the within-rollout std
    within_n: Tensor  # [N] float64 rollouts contributing to within_sum
    rollouts: int = 0

    @classmethod
    def zeros(cls, num_bins: int) -> PositionMoments:
        z = torch.zeros(num_bins, dtype=_F64)
        return cls(z.clone(), z.clone(), z.clone(), z.clone(), z.clone(), 0)

    @property
    def num_bins(self) -> int:
        return int(self.count.shape[0])

    def __add__(self, other: PositionMoments) -> PositionMoments:
        if other.num_bins != self.num_bins:
            raise ValueError(f"cannot add moments over {self.num_bins} and {other.num_bins} bins")
        return PositionMoments(
            self.count + other.count, self.total + other.total, self.total_sq + other.total_sq,
            self.within_sum + other.within_sum, self.within_n + other.within_n,
            self.rollouts + other.rollouts,
        )

    def mean(self) -> Tensor:
        """``[N]`` mean per bin (NaN for an empty bin)."""
        return self.total / self.count

    def std(self) -> Tensor:
        """``[N]`` population std of all tokens pooled in the bin (NaN for an empty bin)."""
        mean = self.mean()
        return (self.total_sq / self.count - mean * mean).clamp_min(0.0).sqrt()

    def within_std(self) -> Tensor:
        """``[N]`` mean over rollouts of the std along each rollout (NaN if none has 2 tokens)."""
        return self.within_sum / self.within_n


def position_moments(values: Tensor, mask: Tensor, num_bins: int) -> PositionMoments:
    """``values [B, T]``, ``mask [B, T]`` -> :class:`PositionMoments` on the CPU.

    Only masked tokens count (padding values, NaN included, are ignored).
    """
    if values.shape != mask.shape or values.dim() != 2:
        raise ValueError(f"values {tuple(values.shape)} and mask {tuple(mask.shape)} must both be [B, T]")
    b = values.shape[0]
    bins = relative_position_bins(mask, num_bins)  # [B, T]
    valid = bins >= 0
    flat = torch.where(valid, bins, torch.full_like(bins, num_bins))  # dump bucket = num_bins
    flat = flat + torch.arange(b, device=bins.device).unsqueeze(1) * (num_bins + 1)  # [B, T]
    x = torch.where(valid, values.to(_F64), torch.zeros((), dtype=_F64, device=values.device))

    def per_row_bin(v: Tensor) -> Tensor:  # [B, T] -> [B, N]
        out = torch.zeros(b * (num_bins + 1), dtype=_F64, device=values.device)
        out.scatter_add_(0, flat.reshape(-1), v.reshape(-1))
        return out.view(b, num_bins + 1)[:, :num_bins]

    n = per_row_bin(valid.to(_F64))  # [B, N]
    s = per_row_bin(x)  # [B, N]
    q = per_row_bin(x * x)  # [B, N]
    # within-rollout std (population), from rollout-bin moments with >= 2 tokens
    enough = n >= 2
    safe_n = n.clamp_min(1.0)
    row_mean = s / safe_n
    row_std = (q / safe_n - row_mean * row_mean).clamp_min(0.0).sqrt()  # [B, N]
    zero = torch.zeros((), dtype=_F64, device=values.device)
    return PositionMoments(
        count=n.sum(0).cpu(),
        total=s.sum(0).cpu(),
        total_sq=q.sum(0).cpu(),
        within_sum=torch.where(enough, row_std, zero).sum(0).cpu(),
        within_n=enough.to(_F64).sum(0).cpu(),
        rollouts=int((mask > 0).any(-1).sum()),
    )


def advantage_moments(
    teacher_logprobs: Tensor,  # [B, T]
    student_logprobs: Tensor,  # [B, T]
    mask: Tensor,  # [B, T]
    num_bins: int = 20,
) -> PositionMoments:
    """Figure 1: moments of ``A_t = log p_T(y_t) - log p_S(y_t)`` by position bin."""
    return position_moments(opd_advantage(teacher_logprobs, student_logprobs, mask), mask, num_bins)


def usable_ks(ks: Sequence[int], available: int) -> tuple[list[int], list[int]]:
    """Split the requested support sizes into ``(usable, too_large)`` for a batch carrying
    ``available`` candidates (a margin needs 2 <= K <= available)."""
    usable = sorted({int(k) for k in ks if 2 <= int(k) <= available})
    too_large = sorted({int(k) for k in ks if int(k) > available or int(k) < 2})
    return usable, too_large


def margin_moments(
    teacher_topk_logprobs: Tensor,  # [B, T, K] teacher log-probs at the student's top-K ids
    mask: Tensor,  # [B, T]
    ks: Sequence[int],
    num_bins: int = 20,
) -> dict[int, PositionMoments]:
    """Figures 2 and 5: moments of the teacher top-1/top-2 margin by position bin, per K.

    The student's top-K ids are sorted by student probability (most likely first), so the
    top-K' support of the same rollout is the first K' columns. ``ks`` larger than the
    batch's K (or < 2) raise ``ValueError``: filter them with :func:`usable_ks` first.
    """
    available = int(teacher_topk_logprobs.shape[-1])
    out: dict[int, PositionMoments] = {}
    for k in ks:
        if not 2 <= int(k) <= available:
            raise ValueError(f"margin K={k}: the batch carries {available} candidates (need 2 <= K <= {available})")
        m = teacher_margin(teacher_topk_logprobs[..., : int(k)])  # [B, T]
        out[int(k)] = position_moments(m, mask, num_bins)
    return out


def normalize_curve(values: Sequence[float] | Tensor, how: str = "mean") -> list[float]:
    """Divide a per-bin curve by its first finite value / mean / max (``how``); NaN stays NaN.

    A zero or missing reference gives an all-NaN curve (nothing to normalise by).
    """
    if how not in NORMALIZE:
        raise ValueError(f"normalize={how!r} is not one of {list(NORMALIZE)}")
    vals = [float(v) for v in (values.tolist() if isinstance(values, Tensor) else values)]
    if how == "none":
        return vals
    finite = [v for v in vals if math.isfinite(v)]
    if not finite:
        return [math.nan] * len(vals)
    ref = {"first_bin": finite[0], "mean": sum(finite) / len(finite), "max": max(finite)}[how]
    if ref == 0.0 or not math.isfinite(ref):
        return [math.nan] * len(vals)
    return [v / ref for v in vals]


# ---- rows: the raw numbers behind the plots (one row per bin) ------------------------------


def advantage_rows(m: PositionMoments, step: int, step_from: int, normalize: str = "mean") -> list[dict]:
    """Figure 1 table: one row per bin of this window (``step_from..step``, inclusive)."""
    mean, std, within = m.mean(), m.std(), m.within_std()
    std_norm = normalize_curve(std, normalize)
    within_norm = normalize_curve(within, normalize)
    rows = []
    for k, (lo, hi) in enumerate(bin_edges(m.num_bins)):
        rows.append({
            "step": step, "step_from": step_from, "rollouts": m.rollouts, "bin": k,
            "bin_lo": lo, "bin_hi": hi, "tokens": int(m.count[k]),
            "adv_mean": float(mean[k]), "adv_std": float(std[k]), "adv_std_norm": std_norm[k],
            "adv_std_within": float(within[k]), "adv_std_within_norm": within_norm[k],
            "normalize": normalize,
        })
    return rows


def margin_rows(
    ms: dict[int, PositionMoments], step: int, step_from: int, normalize: str = "mean"
) -> list[dict]:
    """Figures 2/5 table: one row per (K, bin) of this window."""
    rows = []
    for k in sorted(ms):
        m = ms[k]
        mean = m.mean()
        norm = normalize_curve(mean, normalize)
        for b, (lo, hi) in enumerate(bin_edges(m.num_bins)):
            rows.append({
                "step": step, "step_from": step_from, "rollouts": m.rollouts, "k": k, "bin": b,
                "bin_lo": lo, "bin_hi": hi, "tokens": int(m.count[b]),
                "margin_mean": float(mean[b]), "margin_std": float(m.std()[b]),
                "margin_norm": norm[b], "normalize": normalize,
            })
    return rows


def renormalize(rows: Sequence[dict], how: str) -> list[dict]:
    """Recompute the normalised columns of Figure 1 or Figure 2/5 rows (as read from their CSV)
    from the raw ones with another normaliser; one curve per window (and per K)."""
    if how not in NORMALIZE:
        raise ValueError(f"normalize={how!r} is not one of {list(NORMALIZE)}")
    pairs = {"adv_std": "adv_std_norm", "adv_std_within": "adv_std_within_norm", "margin_mean": "margin_norm"}
    out = [dict(r) for r in rows]
    curves: dict[tuple, list[dict]] = {}
    for r in out:
        curves.setdefault((r["step"], r.get("k")), []).append(r)
    for curve in curves.values():
        curve.sort(key=lambda r: int(float(r["bin"])))
        for raw, norm in pairs.items():
            if raw in curve[0]:
                vals = normalize_curve([float(r[raw]) for r in curve], how)
                for r, v in zip(curve, vals):
                    r[norm] = v
        for r in curve:
            r["normalize"] = how
    return out
