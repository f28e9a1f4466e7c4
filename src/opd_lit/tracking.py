"""Experiment tracking: MLflow by default (SQLite in the working directory), CSV as a fallback.

The one place that knows how runs are written; :mod:`opd_lit.report` and the diagnostics read
them back through :func:`tracking_uri`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
LOGGER_KINDS = ("mlflow", "csv")


def tracking_uri(configured: str | None = None) -> str:
    """``logger.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def flatten(cfg: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def run_tags(cfg: DictConfig) -> dict[str, str]:
    tags = {
        "method": str(cfg.method.name),
        "seed": str(cfg.seed),
        "student": str(cfg.student.get("name", cfg.student.path)),
        "teacher": str(cfg.teacher.get("name", cfg.teacher.path)),
        "label": str(cfg.get("label") or cfg.method.name),
    }
    if cfg.get("sweep"):
        tags["sweep"] = tags["table"] = str(cfg.sweep)
    for key, value in (cfg.logger.get("tags") or {}).items():
        tags[str(key)] = str(value)
    return tags


def build_loggers(cfg: DictConfig, output_dir: Path) -> list:
    kind = cfg.logger.kind
    if kind == "mlflow":
        from lightning.pytorch.loggers import MLFlowLogger

        uri = tracking_uri(cfg.logger.get("tracking_uri"))
        logger = MLFlowLogger(
            experiment_name=cfg.logger.experiment_name,
            run_name=cfg.logger.get("run_name"),
            tracking_uri=uri,
            tags=run_tags(cfg),
            log_model=False,
        )
    elif kind == "csv":
        from lightning.pytorch.loggers import CSVLogger

        logger = CSVLogger(save_dir=str(cfg.logger.get("save_dir") or output_dir), name="csv")
    else:
        raise ValueError(f"logger.kind={kind!r} is not one of {list(LOGGER_KINDS)}")
    resolved = OmegaConf.to_container(cfg, resolve=True)
    logger.log_hyperparams(flatten(resolved))
    log_text(logger, OmegaConf.to_yaml(cfg, resolve=True), "config.yaml", output_dir)
    return [logger]


def log_text(logger, text: str, name: str, output_dir: Path | None = None) -> None:
    """Store a text artifact with the run (MLflow artifact, or a file beside the CSV log)."""
    if hasattr(logger, "run_id") and hasattr(logger, "experiment"):
        logger.experiment.log_text(logger.run_id, text, name)
    else:
        target = Path(getattr(logger, "log_dir", None) or output_dir or ".") / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)


def log_metrics(trainer, metrics: dict[str, float], step: int) -> None:
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)
