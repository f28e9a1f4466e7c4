"""Storing diagnostics files with a run and reading their files back (MLflow or a ``logger=csv`` dir).

:mod:`opd_lit.tracking` writes runs and holds the MLflow readers (client, run search,
metric histories); this module adds the diagnostics' files: logging them
with a run, downloading an artifact directory, reading a CSV run's metrics. It follows tracking's
convention: a logger with ``run_id`` and ``experiment`` is MLflow, anything else writes into
its ``log_dir``.
"""

from __future__ import annotations

import csv
from pathlib import Path

# ---- writing: files with a run -----------------------------------------------------------


def is_mlflow(logger) -> bool:
    return hasattr(logger, "run_id") and hasattr(logger, "experiment")


def local_run_dir(loggers, output_dir: str | Path) -> Path:
    """Where a run's own files go on disk: a CSV logger's log directory (beside its
    ``metrics.csv``), else the run's output directory (MLflow runs also upload them)."""
    for logger in loggers:
        if not is_mlflow(logger) and getattr(logger, "log_dir", None):
            return Path(logger.log_dir)
    return Path(output_dir)


def log_files(loggers, paths, root: Path, artifact_root: str) -> None:
    """Store local files with the run: for each MLflow logger, as artifacts under
    ``artifact_root/<path relative to root>`` (an artifact of the same name is replaced); a
    CSV run already has them in its directory."""
    for logger in loggers:
        if not is_mlflow(logger):
            continue
        for path in paths:
            rel = Path(path).resolve().relative_to(Path(root).resolve()).parent.as_posix()
            dest = artifact_root if rel == "." else f"{artifact_root}/{rel}"
            logger.experiment.log_artifact(logger.run_id, str(path), dest)


def set_run_tag(loggers, key: str, value: str) -> None:
    for logger in loggers:
        if is_mlflow(logger):
            logger.experiment.set_tag(logger.run_id, key, value)


# ---- reading: MLflow -----------------------------------------------------------------------


def download_artifact_dir(client, run_id: str, path: str, dst: str | Path) -> Path | None:
    """Download the run's artifact directory ``path`` into ``dst``; None if the run has none."""
    if not client.list_artifacts(run_id, path):
        return None
    Path(dst).mkdir(parents=True, exist_ok=True)
    return Path(client.download_artifacts(run_id, path, str(dst)))


# ---- reading: logger=csv -------------------------------------------------------------------


def csv_run_metrics(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Metric histories of a ``logger=csv`` run from its ``metrics.csv``."""
    path = Path(run_dir) / "metrics.csv"
    out: dict[str, list[tuple[int, float]]] = {}
    if not path.exists():
        return out
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            step = int(float(row.get("step") or 0))
            for key, value in row.items():
                if key in ("step", "epoch") or value in (None, ""):
                    continue
                out.setdefault(key, []).append((step, float(value)))
    return out
