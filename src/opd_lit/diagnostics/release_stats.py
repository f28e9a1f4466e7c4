"""Release statistics (Figure 3): what the BIC release rule decided on each rollout. Pure.

From a :class:`~opd_lit.release.BatchRelease` (the rule's output on one batch) this makes one
row per non-empty response: its BIC gain (``BIC0 - BIC1`` of the accepted split, 0 when not
accepted), whether a release was accepted, the mean segment score before and after the
change point, and where the release falls (``release_pos_frac`` = first released token /
response length; 1.0 = nothing released). :func:`release_summary` turns rows into the
numbers quoted with the figure (acceptance rate, mean gain, pre/post means, positions).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

SAMPLE_COLUMNS = (
    "step", "step_from", "train_step", "sample", "length", "num_segments", "accepted", "bic_gain",
    "pre_mean", "post_mean",
    "release_segment", "release_token", "release_pos_frac",
)


def release_sample_rows(release, mask: Tensor, train_step: int, sample_offset: int = 0) -> list[dict]:
    """``release``: BatchRelease of a batch, ``mask [B, T]`` -> one row per non-empty response.

    ``step``/``step_from`` (the diagnostics window the row is reported in) start equal to
    ``train_step``; the training callback sets them to its window when it writes the table.
    """
    lengths = (mask > 0).sum(-1).cpu()  # [B]
    accepted = release.accepted.cpu()
    released_at = torch.minimum(release.release_token.cpu().to(lengths.dtype), lengths)  # [B]
    rows = []
    for i in range(int(lengths.shape[0])):
        n = int(lengths[i])
        if n == 0:
            continue
        acc = bool(accepted[i])
        rows.append({
            "step": train_step,
            "step_from": train_step,
            "train_step": train_step,
            "sample": sample_offset + i,
            "length": n,
            "num_segments": int(release.num_segments[i]),
            "accepted": int(acc),
            "bic_gain": float(release.bic_gain[i]),
            "pre_mean": float(release.pre_mean[i]) if acc else math.nan,
            "post_mean": float(release.post_mean[i]) if acc else math.nan,
            "release_segment": int(release.release_segment[i]),
            "release_token": int(released_at[i]),
            "release_pos_frac": float(released_at[i]) / n,
        })
    return rows


def _floats(rows: Iterable[dict], key: str) -> list[float]:
    out = []
    for r in rows:
        v = float(r[key])
        if math.isfinite(v):
            out.append(v)
    return out


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def release_summary(rows: Sequence[dict]) -> dict[str, float]:
    """The Figure 3 numbers over ``rows`` (strings from a CSV are fine).

    ``acceptance_rate``; over accepted releases: ``bic_gain_mean``/``bic_gain_median``,
    ``pre_mean``/``post_mean`` (means of the per-sample segment-score means), ``drop_mean``
    (pre - post), ``downward_frac`` (share with post < pre: 1.0 by construction of the rule),
    ``release_pos_frac_mean``/``_median``/``_std``; over all responses: ``kept_frac_mean``
    (the release position with 1.0 for non-accepted samples).
    """
    n = len(rows)
    acc = [r for r in rows if int(float(r["accepted"])) == 1]
    pos = _floats(acc, "release_pos_frac")
    gains = _floats(acc, "bic_gain")
    pre, post = _floats(acc, "pre_mean"), _floats(acc, "post_mean")
    pairs = [(float(r["pre_mean"]), float(r["post_mean"])) for r in acc]
    pairs = [(a, b) for a, b in pairs if math.isfinite(a) and math.isfinite(b)]
    return {
        "samples": float(n),
        "accepted": float(len(acc)),
        "acceptance_rate": len(acc) / n if n else math.nan,
        "bic_gain_mean": _mean(gains),
        "bic_gain_median": statistics.median(gains) if gains else math.nan,
        "pre_mean": _mean(pre),
        "post_mean": _mean(post),
        "drop_mean": _mean([a - b for a, b in pairs]),
        "downward_frac": _mean([float(b < a) for a, b in pairs]),
        "release_pos_frac_mean": _mean(pos),
        "release_pos_frac_median": statistics.median(pos) if pos else math.nan,
        "release_pos_frac_std": statistics.pstdev(pos) if len(pos) > 1 else math.nan,
        "kept_frac_mean": _mean(_floats(rows, "release_pos_frac")),
    }


def release_metric_sums(release, mask: Tensor) -> dict[str, tuple[float, float]]:
    """The per-step ``release/*`` metrics as ``{name: (numerator, denominator)}`` over the
    batch's non-empty responses, so that ranks can add them up before dividing.

    ``release/accepted_frac`` (share of responses with an accepted release),
    ``release/release_segment_mean``, ``release/num_segments_mean``, ``release/bic_gain_mean``,
    ``release/release_pos_frac`` (first released token / length; 1.0 = nothing released).
    """
    lengths = (mask > 0).sum(-1)  # [B]
    nonempty = lengths > 0
    n = float(nonempty.sum())
    released_at = torch.minimum(release.release_token.to(lengths.dtype), lengths)  # [B]
    pos = released_at[nonempty].float() / lengths[nonempty].clamp(min=1).float()

    def total(x: Tensor) -> float:
        return float(x[nonempty].float().sum())

    return {
        "release/accepted_frac": (total(release.accepted), n),
        "release/release_segment_mean": (total(release.release_segment), n),
        "release/num_segments_mean": (total(release.num_segments), n),
        "release/bic_gain_mean": (total(release.bic_gain), n),
        "release/release_pos_frac": (float(pos.sum()), n),
    }

