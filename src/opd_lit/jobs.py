"""Job identity for runs and sweeps: a stable key per configuration, and what to do with it.

A *job* is one resolved configuration. Its key, :func:`job_key`, is a short hash of the
resolved config minus the keys that do not change what is computed (:data:`VOLATILE_KEYS`:
where things are written, the progress bar, the resume switches, Hydra's own node). The same
job gets the same key in any run directory, on any day, from a single run or a sweep, so

- its checkpoints live in one stable directory, ``checkpoint.dir`` (default
  ``checkpoints/${job_key:}``), and
- its MLflow run carries the tag ``job_key``, which :func:`plan_job` looks up at start:
  a FINISHED run → skip the job (``force=true`` runs it again); an unfinished one
  (RUNNING, FAILED, KILLED) whose checkpoint is on disk → resume it into the same MLflow
  run; otherwise → run it from the start.

``${job_key:}`` is an OmegaConf resolver registered when this module is imported.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)

# Dotted keys left out of the job key: they decide where and how a run is recorded or
# resumed, never what it computes.
VOLATILE_KEYS = (
    "output_dir",
    "progress",
    "logger.tracking_uri",
    "checkpoint",
    "resume",
    "force",
    "dry_run",
    "hydra",
)
KEY_LENGTH = 16
RESUME_MODES = ("auto", True, False)
FINISHED, UNFINISHED = "FINISHED", ("RUNNING", "FAILED", "KILLED", "SCHEDULED")


def _drop(node: DictConfig, dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    for name in parents:
        if not isinstance(node, DictConfig) or name not in node:
            return
        node = node[name]
    if isinstance(node, DictConfig) and leaf in node:
        with open_dict(node):
            node.pop(leaf)


def job_config(cfg: DictConfig | dict) -> dict[str, Any]:
    """The resolved configuration that defines the job (``cfg`` minus :data:`VOLATILE_KEYS`)."""
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(cfg)
    c = copy.deepcopy(cfg)
    OmegaConf.set_readonly(c, False)
    OmegaConf.set_struct(c, False)
    for key in VOLATILE_KEYS:
        _drop(c, key)
    return OmegaConf.to_container(c, resolve=True, throw_on_missing=False)


def job_key(cfg: DictConfig | dict) -> str:
    """A stable 16-hex-digit hash of :func:`job_config` (sorted keys, JSON)."""
    text = json.dumps(job_config(cfg), sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:KEY_LENGTH]


def _resolve_job_key(*, _root_: DictConfig) -> str:
    return job_key(_root_)


if not OmegaConf.has_resolver("job_key"):
    OmegaConf.register_new_resolver("job_key", _resolve_job_key)


def resume_mode(cfg: DictConfig) -> str | bool:
    """``resume``: ``auto`` (default), ``true`` or ``false`` (strings "true"/"false" accepted)."""
    value = cfg.get("resume", "auto")
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return value


# ---- MLflow look-up ------------------------------------------------------------------


def find_job_runs(tracking_uri: str, experiment_name: str, key: str) -> list:
    """MLflow runs of ``experiment_name`` tagged ``job_key=key``, newest first."""
    from opd_lit.tracking import mlflow_client

    client = mlflow_client(tracking_uri)
    exp = client.get_experiment_by_name(experiment_name)
    if exp is None or exp.lifecycle_stage == "deleted":
        return []
    return list(
        client.search_runs(
            [exp.experiment_id],
            filter_string=f"tags.job_key = '{key}'",
            order_by=["attributes.start_time DESC"],
        )
    )


def set_run_status(tracking_uri: str, run_id: str, status: str) -> None:
    from opd_lit.tracking import mlflow_client

    client = mlflow_client(tracking_uri)
    if status == "RUNNING":
        client.update_run(run_id, status="RUNNING")
    else:
        client.set_terminated(run_id, status)


def run_summary(run) -> dict[str, Any]:
    """What :func:`opd_lit.train.run` returns for a job it skips: read back from MLflow."""
    tags, metrics = run.data.tags, run.data.metrics
    evals = {k: v for k, v in metrics.items() if k.startswith("eval/")}
    return {
        "method": tags.get("method"),
        "seed": int(tags["seed"]) if tags.get("seed", "").isdigit() else tags.get("seed"),
        "job_key": tags.get("job_key"),
        "mlflow_run_id": run.info.run_id,
        "status": run.info.status,
        "steps": int(tags["steps"]) if tags.get("steps", "").isdigit() else None,
        "metrics": dict(metrics),
        "eval": [evals] if evals else [],
        "skipped": True,
    }


# ---- the decision --------------------------------------------------------------------


@dataclass
class JobPlan:
    """What :func:`opd_lit.train.run` does with a job, and why."""

    action: str  # "run" | "resume" | "skip"
    key: str
    reason: str
    run_id: str | None = None  # the MLflow run to continue (resume) or the finished one (skip)
    checkpoint: Any = None  # opd_lit.checkpoint.CheckpointInfo when resuming
    summary: dict[str, Any] | None = None  # skip: the finished run's summary
    stale_runs: list[str] = field(default_factory=list)  # unfinished runs nobody can resume


class ResumeError(RuntimeError):
    """``resume=true`` but there is nothing valid to resume."""


def plan_job(cfg: DictConfig, key: str | None = None) -> JobPlan:
    """Skip, resume or run this job (see the module docstring for the rules)."""
    from opd_lit.checkpoint import CheckpointStore
    from opd_lit.tracking import tracking_uri

    key = key or job_key(cfg)
    mode = resume_mode(cfg)
    force = bool(cfg.get("force", False))
    ckpt_cfg = cfg.get("checkpoint") or {}
    store = CheckpointStore(ckpt_cfg.get("dir") or f"checkpoints/{key}", key)
    mlflow = cfg.logger.kind == "mlflow"

    runs = []
    if mlflow:
        uri = tracking_uri(cfg.logger.get("tracking_uri"))
        runs = find_job_runs(uri, cfg.logger.experiment_name, key)
    finished = [r for r in runs if r.info.status == FINISHED]
    unfinished = {r.info.run_id: r for r in runs if r.info.status in UNFINISHED}

    if finished and not force:
        run = finished[0]
        return JobPlan(
            "skip", key,
            f"job {key} already has a FINISHED MLflow run {run.info.run_id} in experiment "
            f"{cfg.logger.experiment_name!r} (force=true runs it again)",
            run_id=run.info.run_id, summary=run_summary(run),
        )
    if not mlflow and store.finished() and not force:
        summary = dict(store.finished() or {})
        summary.setdefault("skipped", True)
        return JobPlan(
            "skip", key,
            f"job {key} finished before (marker {store.finished_path}; force=true runs it again)",
            summary=summary,
        )

    latest = None if (force or mode is False) else store.latest()
    if latest is not None:
        run_id = latest.run_id
        if mlflow:
            if run_id in unfinished:
                return JobPlan(
                    "resume", key,
                    f"job {key}: MLflow run {run_id} is {unfinished[run_id].info.status}; resuming "
                    f"it from the checkpoint at step {latest.step} ({latest.path})",
                    run_id=run_id, checkpoint=latest,
                    stale_runs=[r for r in unfinished if r != run_id],
                )
            if mode is True:
                return JobPlan(
                    "resume", key,
                    f"job {key}: resume=true, resuming the checkpoint at step {latest.step} "
                    f"({latest.path}) into a new MLflow run (its run {run_id} is not in "
                    f"experiment {cfg.logger.experiment_name!r} of this tracking store)",
                    checkpoint=latest, stale_runs=list(unfinished),
                )
            # A checkpoint whose MLflow run is not here (another tracking store, or left over
            # from an attempt of a run that no longer exists): not ours to continue.
            log.warning(
                "checkpoint %s (step %d) belongs to MLflow run %s, which is not an unfinished run "
                "of this job in this tracking store; starting afresh (resume=true would use it)",
                latest.path, latest.step, run_id,
            )
        else:
            return JobPlan(
                "resume", key,
                f"job {key}: resuming from the checkpoint at step {latest.step} ({latest.path})",
                checkpoint=latest,
            )
    if mode is True:
        raise ResumeError(
            f"resume=true: no valid checkpoint of job {key} in checkpoint.dir={str(store.root)!r}"
            + (f" ({store.describe_invalid()})" if store.describe_invalid() else "")
            + ". Run without resume=true to start it, or point checkpoint.dir at the checkpoints."
        )
    reason = f"job {key}: " + (
        "force=true, running it again" if force and finished else
        "resume=false, starting afresh" if mode is False else
        "no finished run and no checkpoint to resume; running it"
    )
    return JobPlan("run", key, reason, stale_runs=list(unfinished))
