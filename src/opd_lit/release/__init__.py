"""Suffix release: supervise the prefix of a response, release its suffix.

Teacher margins (top-1 minus top-2 teacher log-prob among the student's top-K
candidates) are averaged per sentence; a one-drop profiled RSS-BIC test on the
sentence scores finds where the teacher stops being decisive, and the tokens
from that sentence on are released (weight 0) while the kept prefix is
rescaled to preserve the sample's loss mass.

Single sample: :func:`teacher_margin`, :func:`segment_scores`,
:func:`segment_adv_std_scores`, :func:`bic_change_point`,
:func:`release_weights`. Training (batched, loop-free):
:func:`release_weights_batch`, :func:`apply_release_tokens`. Segmentation:
:func:`sentence_segments`, :func:`segment_ids_batch` (``segmenter``: one of
:data:`SEGMENTERS`, lines + sentences + display math by default),
:func:`segment_starts`, :func:`segment_count_stats` (the segments-per-response metrics),
:func:`ensure_punkt` (imported lazily, so ``python -m opd_lit.release.segment`` runs
cleanly).
"""

from __future__ import annotations

from typing import Any

from . import rule as _rule
from .rule import (  # noqa: F401 - re-exported through __all__
    BIC_TIE_RTOL,
    LOGPROB_FLOOR,
    MASS_EPS,
    MEAN_TIE_RTOL,
    RSS_EPS,
    SIGNALS,
    BatchRelease,
    ChangePoint,
    ReleaseResult,
    apply_release_tokens,
    bic_change_point,
    release_weights,
    release_weights_batch,
    segment_adv_std_scores,
    segment_scores,
    teacher_margin,
)

_SEGMENT_NAMES = (
    "DEFAULT_SEGMENTER",
    "DISPLAY_ENVIRONMENTS",
    "PUNKT_RESOURCE",
    "SEGMENTERS",
    "SEGMENT_COUNT_QUANTILES",
    "check_segmenter",
    "ensure_punkt",
    "segment_count_stats",
    "segment_ids_batch",
    "segment_starts",
    "sentence_segments",
    "sentence_spans",
)

__all__ = sorted([*_rule.__all__, *_SEGMENT_NAMES])


def __getattr__(name: str) -> Any:
    if name in _SEGMENT_NAMES:
        from . import segment

        return getattr(segment, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SEGMENT_NAMES))
