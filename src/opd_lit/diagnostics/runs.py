"""Storing diagnostics files with a run and reading runs back (MLflow or a ``logger=csv`` dir).

:mod:`opd_lit.tracking` writes runs; this module is where the diagnostics (and anything else
that wants a run's metric histories or artifacts back) read them. It follows tracking's
convention: a logger with ``run_id`` and ``experiment`` is MLflow, anything else writes into
its ``log_dir``.
"""

from __future__ import annotations

import csv
from pathlib import Path

from opd_lit.tracking import tracking_uri

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


def mlflow_client(uri: str | None = None):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri(uri))


def find_runs(client, run_ids=(), experiments=()) -> list:
    """MLflow runs by id and/or every run of the named experiments (in that order, no
    duplicates). An unknown id or experiment raises ``LookupError`` naming what exists."""
    from mlflow.exceptions import MlflowException

    runs, seen = [], set()
    for rid in run_ids:
        try:
            run = client.get_run(rid)
        except MlflowException as e:
            raise LookupError(f"run_id={rid}: no such run at {client.tracking_uri} ({e.error_code})") from None
        if run.info.run_id not in seen:
            seen.add(run.info.run_id)
            runs.append(run)
    for name in experiments:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            names = sorted(e.name for e in client.search_experiments())
            raise LookupError(f"experiment={name}: not found at {client.tracking_uri}; experiments: {names}")
        for run in experiment_runs(client, [exp.experiment_id]):
            if run.info.run_id not in seen:
                seen.add(run.info.run_id)
                runs.append(run)
    return runs


def experiment_runs(client, experiment_ids) -> list:
    """Every run of the experiments, newest first (all pages)."""
    out, token = [], None
    while True:
        page = client.search_runs(list(experiment_ids), max_results=1000, page_token=token,
                                  order_by=["attributes.start_time DESC"])
        out.extend(page)
        token = getattr(page, "token", None)
        if not token:
            return out


def metric_history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    """``[(step, value)]`` sorted by step (the last value logged at a step wins)."""
    by_step: dict[int, tuple[int, float]] = {}
    for m in client.get_metric_history(run_id, key):
        if m.step not in by_step or m.timestamp >= by_step[m.step][0]:
            by_step[m.step] = (m.timestamp, float(m.value))
    return [(s, v) for s, (_, v) in sorted(by_step.items())]


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
