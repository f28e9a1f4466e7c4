"""Diagnostics: the paper's figures (1-8) from any run, as CSV + PNG + HTML.

Pure numbers (torch, no Lightning, no plotting): :mod:`.by_position` (Figures 1, 2, 5),
:mod:`.release_stats` (Figure 3), :mod:`.case_study` (Figure 6), :mod:`.cross_run`
(Figures 7, 8). Drawing: :mod:`.plots` (matplotlib, Agg) and the HTML of :mod:`.case_study`.
Where each figure lands and what it needs: :mod:`.figures`. During training:
:class:`DiagnosticsCallback`; afterwards: ``python -m opd_lit.diagnose``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DiagnosticsCallback", "diagnostics_callbacks"]


def diagnostics_callbacks(cfg: Any) -> list:
    """``[DiagnosticsCallback(**cfg)]`` when ``cfg.enabled`` (a ``diagnostics`` config node), else ``[]``."""
    if cfg is None:
        return []
    from omegaconf import DictConfig, OmegaConf

    values = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    if not values.get("enabled", False):
        return []
    from opd_lit.diagnostics.callback import DiagnosticsCallback

    return [DiagnosticsCallback(**values)]


def __getattr__(name: str):
    if name == "DiagnosticsCallback":
        from opd_lit.diagnostics.callback import DiagnosticsCallback

        return DiagnosticsCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
