"""Experiment tracking: MLflow by default (SQLite in the working directory), CSV as a fallback.

The one place that knows how runs are written and read back: :func:`mlflow_client`,
:func:`find_runs`, :func:`experiment_runs` (all pages) and :func:`metric_history` serve
:mod:`opd_lit.report`, :mod:`opd_lit.diagnose`, :mod:`opd_lit.evaluate` and :mod:`opd_lit.jobs`.

Failure handling:

- :func:`check_tracking_reachable` runs before any model loads (the ``tracking_store`` check of
  :mod:`opd_lit.validate`): an MLflow server that does not answer, a SQLite file that is not a
  database (corrupted), cannot be written (read-only) or whose directory does not exist, is a
  clear error naming the URI, where it came from and the file. A store that fails later, when
  the job's runs are looked up, raises :class:`TrackingStoreError` the same way.
- :class:`BufferedMLFlowLogger`: when sending metrics fails mid-run, they are kept in memory
  with a warning (no crash), re-sent with their original timestamps once the store answers
  again (tried at most every ``retry_interval_s``), and written to a CSV file in the run
  directory at the end if it never does. The run's final status is set only when
  :func:`opd_lit.train.run` has finished everything (``close``), so FINISHED means complete.
"""

from __future__ import annotations

import csv
import logging
import os
import re
import socket
import time
import warnings
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlparse

from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
LOGGER_KINDS = ("mlflow", "csv")
FALLBACK_CSV = "mlflow_unsent_metrics.csv"


ERROR_TAG = "error"  # the cause of a FAILED / KILLED run, as an MLflow tag


class TrackingStoreError(ConnectionError):
    """The configured MLflow tracking store cannot be opened or used."""


class TrackingUnreachableError(TrackingStoreError):
    """The configured MLflow tracking store cannot be reached."""


def tracking_uri(configured: str | None = None) -> str:
    """``logger.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def uri_source(configured: str | None = None) -> str:
    """Where the tracking URI comes from, for messages."""
    if configured:
        return "logger.tracking_uri"
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return "$MLFLOW_TRACKING_URI"
    return "the default tracking URI"


def store_file(uri: str) -> Path | None:
    """The local file (SQLite) or directory (file store) behind ``uri``; None for a server."""
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        path = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else parsed.path
        return None if not path or path == ":memory:" else Path(path).expanduser().resolve()
    if parsed.scheme in ("", "file"):
        return Path(parsed.path if parsed.scheme == "file" else uri).expanduser().resolve()
    return None


def describe_store_failure(uri: str, exc: BaseException, configured: str | None = None) -> str:
    """One line: the URI, where it came from, its file, and the failure's first line."""
    path = store_file(uri)
    first = (str(exc).strip().splitlines() or [""])[0][:300]  # SQLAlchemy: "(sqlite3.X) why"
    source = f"{uri_source(configured)}=" if configured is not None else "the MLflow tracking store "
    return (
        f"{source}{uri!r}"
        + (f" (file {path})" if path is not None else "")
        + f" cannot be used ({type(exc).__name__}: {first}). Fix or move the "
        "file, point logger.tracking_uri / $MLFLOW_TRACKING_URI at another store, or use logger=csv."
    )


def set_error_tag(client, run_id: str, error: str) -> None:
    from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

    client.set_tag(run_id, ERROR_TAG, str(error)[: min(MAX_TAG_VAL_LENGTH, 4000)])


def describe_exception(exc: BaseException) -> str:
    """``Type: message`` of an exception (the ``error`` tag of a run that ended with it)."""
    if isinstance(exc, SystemExit):
        return {130: "stopped by SIGINT (exit 130)", 143: "stopped by SIGTERM (exit 143)"}.get(
            exc.code, f"SystemExit({exc.code})")
    if isinstance(exc, KeyboardInterrupt):
        return "KeyboardInterrupt (Ctrl-C)"
    return f"{type(exc).__name__}: {exc}"


# ---- reading runs back (report, diagnose, evaluate, job planning) -------------------------

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


def experiment_runs(client, experiment_ids, filter_string: str = "") -> list:
    """Every run of the experiments (matching ``filter_string``), newest first, all pages."""
    out, token = [], None
    if not experiment_ids:
        return out
    while True:
        page = client.search_runs(list(experiment_ids), filter_string=filter_string, max_results=1000,
                                  page_token=token, order_by=["attributes.start_time DESC"])
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



def _check_sqlite_file(uri: str, path: Path, source: str) -> None:
    """The SQLite file opens as a database and can be written (or can be created)."""
    import sqlite3

    where = f"{source}={uri!r}: the SQLite file {path}"
    fix = "Fix or move it, point logger.tracking_uri / $MLFLOW_TRACKING_URI at another store, or use logger=csv."
    if not path.exists():
        if not os.access(path.parent, os.W_OK | os.X_OK):
            raise TrackingUnreachableError(f"{where} does not exist and its directory is read-only, so it cannot be created. {fix}")
        return
    if not path.is_file():
        raise TrackingUnreachableError(f"{where} is not a file. {fix}")
    if not os.access(path, os.R_OK):
        raise TrackingUnreachableError(f"{where} cannot be read (permission denied). {fix}")
    if not os.access(path, os.W_OK):
        raise TrackingUnreachableError(f"{where} is read-only (runs could not be written). {fix}")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise TrackingUnreachableError(
            f"{where} is in a read-only directory {path.parent} (SQLite writes its journal beside the file). {fix}"
        )
    try:
        con = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=5)
        try:
            con.execute("SELECT name FROM sqlite_master LIMIT 1").fetchall()
        finally:
            con.close()
    except sqlite3.DatabaseError as e:
        raise TrackingUnreachableError(f"{where} is not a readable SQLite database ({e}; corrupted?). {fix}") from None


def check_tracking_reachable(uri: str, timeout: float = 3.0, configured: str | None = None) -> None:
    """Raise :class:`TrackingUnreachableError` (naming ``uri``) unless the store can be used.

    ``http(s)://``: a TCP connection to the server within ``timeout`` seconds, then its
    ``/health`` endpoint. ``sqlite:///``: the directory exists; an existing file is a SQLite
    database that this process can read and write (else: corrupted / read-only, named).
    ``file:`` / plain paths: the directory exists.
    """
    source = uri_source(configured)
    parsed = urlparse(uri)
    hint = "Start the server (e.g. `make ui`), fix logger.tracking_uri, or use logger=csv."
    if parsed.scheme in ("http", "https"):
        host = parsed.hostname or "localhost"
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            with socket.create_connection((host, port), timeout=timeout):
                pass
        except OSError as e:
            raise TrackingUnreachableError(
                f"{source}={uri!r}: the MLflow tracking server is unreachable "
                f"({host}:{port}: {e.strerror or e}, timeout {timeout:g}s). {hint}"
            ) from None
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:
                if resp.status >= 500:
                    raise TrackingUnreachableError(
                        f"{source}={uri!r}: the MLflow server answered /health with "
                        f"HTTP {resp.status}. {hint}"
                    )
        except urllib.error.HTTPError as e:
            if e.code >= 500:
                raise TrackingUnreachableError(
                    f"{source}={uri!r}: the MLflow server answered /health with "
                    f"HTTP {e.code}. {hint}"
                ) from None
        except (urllib.error.URLError, OSError) as e:
            raise TrackingUnreachableError(
                f"{source}={uri!r}: the MLflow tracking server does not answer "
                f"({getattr(e, 'reason', e)}, timeout {timeout:g}s). {hint}"
            ) from None
    elif parsed.scheme == "sqlite":
        path = store_file(uri)
        if path is not None:
            if not path.parent.is_dir():
                raise TrackingUnreachableError(
                    f"{source}={uri!r}: directory {path.parent} does not exist "
                    "(the SQLite file is created, its directory is not)"
                )
            _check_sqlite_file(uri, path, source)
    elif parsed.scheme in ("", "file"):
        path = Path(parsed.path if parsed.scheme == "file" else uri).expanduser()
        if not path.resolve().parent.is_dir():
            raise TrackingUnreachableError(
                f"{source}={uri!r}: directory {path.resolve().parent} does not exist"
            )


def flatten(cfg: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def owner_tags(cfg: DictConfig) -> dict[str, str]:
    """``owner`` (``pid@host:start`` of this process) and the job's ``checkpoint_dir``: what
    :func:`opd_lit.jobs.settle_stale_runs` reads to tell a live run from a dead one."""
    from opd_lit.locks import owner_token

    tags = {"owner": owner_token()}
    ckpt = (cfg.get("checkpoint") or {}).get("dir")
    if ckpt:
        tags["checkpoint_dir"] = str(Path(str(ckpt)).expanduser().resolve())
    return tags


def run_tags(cfg: DictConfig) -> dict[str, str]:
    from opd_lit.jobs import job_key

    tags = {
        "method": str(cfg.method.name),
        "seed": str(cfg.seed),
        "student": str(cfg.student.get("name", cfg.student.path)),
        "teacher": str(cfg.teacher.get("name", cfg.teacher.path)),
        "label": str(cfg.get("label") or cfg.method.name),
        "job_key": job_key(cfg),
        **owner_tags(cfg),
    }
    if cfg.get("sweep"):
        tags["sweep"] = tags["table"] = str(cfg.sweep)
    for key, value in (cfg.logger.get("tags") or {}).items():
        tags[str(key)] = str(value)
    return tags


class BufferedMLFlowLogger(MLFlowLogger):
    """MLFlowLogger that never loses metrics to a tracking-store outage (see the module doc).

    ``terminal_status``: the status ``finalize("failed")`` writes (the checkpoint callback
    sets KILLED on Ctrl-C / SIGTERM). ``finalize("success")`` does not end the run: that is
    :meth:`close`'s job, once the entry point has finished everything.
    """

    def __init__(self, *args, fallback_dir: str | Path | None = None, retry_interval_s: float = 30.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.fallback_dir = Path(fallback_dir) if fallback_dir else None
        self.retry_interval_s = retry_interval_s
        self.buffer: list[tuple[dict[str, float], int, int]] = []  # (metrics, step, timestamp ms)
        self.terminal_status = "FAILED"
        self._last_failure = 0.0
        self.failures = 0
        self.closed_with: str | None = None
        self.error_tagged = False  # the run's tag ``error`` is set

    # ---- metrics -----------------------------------------------------------------------
    def _send(self, metrics: Mapping[str, float], step: int, timestamp_ms: int) -> None:
        from mlflow.entities import Metric

        items = []
        for k, v in metrics.items():
            if isinstance(v, str):
                continue
            items.append(Metric(key=re.sub("[^a-zA-Z0-9_/. -]+", "", k), value=float(v),
                                timestamp=timestamp_ms, step=step))
        for i in range(0, len(items), 1000):
            self.experiment.log_batch(run_id=self.run_id, metrics=items[i:i + 1000], **self._log_batch_kwargs)

    def flush(self) -> bool:
        """Send the buffered metrics; True when nothing is left."""
        while self.buffer:
            metrics, step, ts = self.buffer[0]
            self._send(metrics, step, ts)
            self.buffer.pop(0)
        return True

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        entry = (dict(metrics), int(step or 0), int(time.time() * 1000))
        if self.buffer and time.monotonic() - self._last_failure < self.retry_interval_s:
            self.buffer.append(entry)
            return
        self.buffer.append(entry)
        try:
            self.flush()
            if self.failures:
                log.warning("MLflow tracking store answers again: all buffered metrics were sent")
                self.failures = 0
        except Exception as e:  # noqa: BLE001 - any tracking failure: keep the metrics
            self._last_failure = time.monotonic()
            self.failures += 1
            msg = (
                f"MLflow logging failed at step {entry[1]} ({type(e).__name__}: {str(e)[:200]}); "
                f"{len(self.buffer)} metric batch(es) kept in memory, retrying every "
                f"{self.retry_interval_s:g}s, written to {FALLBACK_CSV} in the run directory at "
                "the end if the store does not come back"
            )
            log.warning(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=2)

    def write_fallback(self) -> Path | None:
        """Write the unsent metrics to ``<fallback_dir>/mlflow_unsent_metrics.csv``."""
        if not self.buffer:
            return None
        target = (self.fallback_dir or Path(".")) / FALLBACK_CSV
        target.parent.mkdir(parents=True, exist_ok=True)
        new = not target.exists()
        with open(target, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["run_id", "step", "timestamp_ms", "key", "value"])
            for metrics, step, ts in self.buffer:
                for k, v in metrics.items():
                    w.writerow([self._run_id, step, ts, k, v])
        log.warning(
            "MLflow never came back: %d metric batch(es) of run %s written to %s",
            len(self.buffer), self._run_id, target,
        )
        self.buffer.clear()
        return target

    def has_metric_at(self, key: str, step: int) -> bool:
        try:
            return any(m.step == step for m in self.experiment.get_metric_history(self.run_id, key))
        except Exception:  # noqa: BLE001
            return False

    # ---- end of the run ----------------------------------------------------------------
    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        if not self._initialized:
            return
        if status in ("success", "finished"):
            self._flush_or_fallback()
            return  # close() sets FINISHED once the entry point is done
        self.close(self.terminal_status if status == "failed" else status)

    def _flush_or_fallback(self) -> None:
        try:
            self.flush()
        except Exception as e:  # noqa: BLE001
            log.warning("MLflow flush failed at the end (%s: %s)", type(e).__name__, e)
            self.write_fallback()

    @rank_zero_only
    def close(self, status: str = "FINISHED", error: str | None = None) -> None:
        """Flush (or write the CSV fallback) and set the run's final status, once; ``error``
        (why it FAILED or was KILLED) goes into the run's tag ``error``. Lightning ends a run
        that raised inside ``fit`` first (:meth:`finalize`, which knows no cause): the entry
        point's later call still adds the cause."""
        if not self._initialized:
            return
        if self.closed_with is not None:
            if error and not self.error_tagged:
                try:
                    set_error_tag(self.experiment, self.run_id, error)
                    self.error_tagged = True
                except Exception as e:  # noqa: BLE001
                    log.warning("could not tag MLflow run %s with its error (%s: %s)", self._run_id,
                                type(e).__name__, e)
            return
        self._flush_or_fallback()
        try:
            if error:
                set_error_tag(self.experiment, self.run_id, error)
                self.error_tagged = True
            self.experiment.set_terminated(self.run_id, status)
            self.closed_with = status
        except Exception as e:  # noqa: BLE001
            log.warning("could not set MLflow run %s to %s (%s: %s)", self._run_id, status, type(e).__name__, e)


def build_loggers(cfg: DictConfig, output_dir: Path, run_id: str | None = None) -> list:
    """The run's logger. ``run_id``: continue that MLflow run (resume) instead of a new one."""
    kind = cfg.logger.kind
    if kind == "mlflow":
        # A tracking server that goes away mid-run must not stall every step for minutes.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        uri = tracking_uri(cfg.logger.get("tracking_uri"))
        logger = BufferedMLFlowLogger(
            experiment_name=cfg.logger.experiment_name,
            run_name=cfg.logger.get("run_name"),
            tracking_uri=uri,
            tags=run_tags(cfg),
            log_model=False,
            run_id=run_id,
            fallback_dir=output_dir,
        )
        if run_id is not None:
            client = logger.experiment
            client.update_run(run_id, status="RUNNING")
            for key, value in run_tags(cfg).items():
                client.set_tag(run_id, key, value)
    elif kind == "csv":
        from lightning.pytorch.loggers import CSVLogger

        logger = CSVLogger(save_dir=str(cfg.logger.get("save_dir") or output_dir), name="csv")
    else:
        raise ValueError(f"logger.kind={kind!r} is not one of {list(LOGGER_KINDS)}")
    resolved = OmegaConf.to_container(cfg, resolve=True)
    if run_id is None:
        logger.log_hyperparams(flatten(resolved))
        log_text(logger, OmegaConf.to_yaml(cfg, resolve=True), "config.yaml", output_dir)
    else:
        # MLflow params cannot change; the resumed config is the same job (same job_key).
        log_text(logger, OmegaConf.to_yaml(cfg, resolve=True), "config_resumed.yaml", output_dir)
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
