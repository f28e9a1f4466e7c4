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

One owner per job (:mod:`opd_lit.locks` holds the lock): :func:`check_checkpoint_dir` refuses
a ``checkpoint.dir`` that holds another job's checkpoints (naming the config keys that
differ, from the ``job.json`` every job writes there), :func:`claim_output_dir` refuses an
output directory that holds another job's outputs, and :func:`settle_stale_runs` gives a
final status only to RUNNING runs of this job whose process is gone (FAILED and KILLED runs
keep theirs). :func:`end_own_runs` ends whatever MLflow run this process left RUNNING.

``${job_key:}`` is an OmegaConf resolver registered when this module is imported.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
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
    "divergence",  # how a run is watched (opd_lit.guards), not what it computes
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
    """MLflow runs of ``experiment_name`` tagged ``job_key=key``, newest first.

    A store that cannot be opened or read raises
    :class:`opd_lit.tracking.TrackingStoreError` naming the URI and its file.
    """
    from opd_lit.tracking import TrackingStoreError, describe_store_failure, mlflow_client

    try:
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
    except Exception as e:  # noqa: BLE001 - SQLAlchemy, MLflow, OS errors alike: name the store
        raise TrackingStoreError(describe_store_failure(tracking_uri, e)) from e


def set_run_status(tracking_uri: str, run_id: str, status: str, error: str | None = None) -> None:
    """Set a run's status; ``error`` (a final status's cause) goes into the tag ``error``."""
    from opd_lit.tracking import mlflow_client, set_error_tag

    client = mlflow_client(tracking_uri)
    if status == "RUNNING":
        client.update_run(run_id, status="RUNNING")
    else:
        if error:
            set_error_tag(client, run_id, error)
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
    runs: dict[str, Any] = field(default_factory=dict)  # the job's unfinished MLflow runs by id
    orphan_checkpoint: Any = None  # this job's checkpoint whose MLflow run is not in this store


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
    orphan = None
    if latest is not None:
        run_id = latest.run_id
        if mlflow:
            if run_id in unfinished:
                return JobPlan(
                    "resume", key,
                    f"job {key}: MLflow run {run_id} is {unfinished[run_id].info.status}; resuming "
                    f"it from the checkpoint at step {latest.step} ({latest.path})",
                    run_id=run_id, checkpoint=latest,
                    stale_runs=[r for r in unfinished if r != run_id], runs=unfinished,
                )
            if mode is True:
                return JobPlan(
                    "resume", key,
                    f"job {key}: resume=true, resuming the checkpoint at step {latest.step} "
                    f"({latest.path}) into a new MLflow run (its run {run_id} is not in "
                    f"experiment {cfg.logger.experiment_name!r} of this tracking store)",
                    checkpoint=latest, stale_runs=list(unfinished), runs=unfinished,
                )
            # This job's checkpoint, written by an MLflow run that is not here (another
            # tracking store, or a run since deleted): not ours to continue by default.
            orphan = latest
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
        f"its checkpoint at step {orphan.step} was written by MLflow run {orphan.run_id}, which is "
        f"not a run of this job in experiment {cfg.logger.experiment_name!r} of this tracking store; "
        "starting afresh" if orphan is not None else
        "no finished run and no checkpoint to resume; running it"
    )
    return JobPlan("run", key, reason, stale_runs=list(unfinished), runs=unfinished, orphan_checkpoint=orphan)


# ---- one owner per job: checkpoint directory, output directory, stale runs -----------------

JOB_FILE = "job.json"  # in checkpoint.dir: the key and config of the job whose state it holds
OUTPUT_MARKER = "opd_lit_job.json"  # in the output directory: the job whose outputs it holds
_ABSENT = object()


def config_diff(old: dict[str, Any], new: dict[str, Any], limit: int = 8) -> list[str]:
    """``key: old -> new`` for each dotted key whose value differs (at most ``limit``, then a count)."""
    from opd_lit.tracking import flatten

    a, b = flatten(old or {}), flatten(new or {})
    lines = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k, _ABSENT), b.get(k, _ABSENT)
        if va != vb:
            show = lambda v: "(absent)" if v is _ABSENT else json.dumps(v, default=str)  # noqa: E731
            lines.append(f"{k}: {show(va)} -> {show(vb)}")
    if len(lines) > limit:
        lines = lines[:limit] + [f"... and {len(lines) - limit} more"]
    return lines


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        return {"unreadable": f"{type(e).__name__}: {e}"}
    return data if isinstance(data, dict) else {"unreadable": "not a JSON object"}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    from opd_lit.checkpoint import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write(json.dumps(data, indent=1, sort_keys=True, default=str).encode()))


def check_checkpoint_dir(store, key: str, config: dict[str, Any]) -> None:
    """Refuse a ``checkpoint.dir`` holding another job's checkpoints or finished marker.

    Nothing is changed. The message names the other job, its MLflow run and newest step, and
    the config keys that differ (from the ``job.json`` the other job wrote there).
    """
    from opd_lit.locks import JobConflictError

    root = Path(store.root)
    if not root.is_dir():
        return
    recorded = _read_json(root / JOB_FILE)
    foreign: dict[str, tuple[int, str | None]] = {}  # key -> (newest step, its MLflow run)
    for meta in sorted(root.glob("step-*.json")):
        m = _read_json(meta) or {}
        other = m.get("job_key")
        if other and other != key:
            foreign[other] = (int(m.get("step", -1)), m.get("mlflow_run_id"))
    done = store.finished()
    if done and done.get("job_key") not in (None, key):
        foreign.setdefault(done["job_key"], (-1, done.get("mlflow_run_id")))
    has_state = bool(foreign) or store.has_any() or bool(done)
    rec_key = (recorded or {}).get("job_key")
    if rec_key and rec_key != key and has_state:
        foreign.setdefault(rec_key, (-1, None))
    if not foreign:
        return
    other, (step, run) = next(iter(foreign.items()))
    where = []
    if step >= 0:
        where.append(f"checkpoint at step {step}")
    if run:
        where.append(f"MLflow run {run}")
    if done and done.get("job_key") == other:
        where.append("finished")
    if recorded and rec_key == other and isinstance(recorded.get("config"), dict):
        diff = config_diff(recorded["config"], config)
        differs = "; this job differs in " + ", ".join(diff) if diff else ""
    else:
        differs = f" (it has no {JOB_FILE}, so the differing keys cannot be listed)"
    raise JobConflictError(
        f"checkpoint.dir={str(store.root)!r} holds the state of another job, {other}"
        + (f" ({', '.join(where)})" if where else "")
        + f", and this job is {key}{differs}. Nothing was changed. Give this job its own "
        "checkpoint.dir (the default checkpoints/${job_key:} gives every job one), finish the "
        f"other job with its own command, or delete {store.root} if its work is not wanted."
    )


def write_job_file(store, key: str, config: dict[str, Any]) -> None:
    """Record which job owns ``checkpoint.dir`` (read by :func:`check_checkpoint_dir`)."""
    from opd_lit.locks import process_owner

    _write_json(Path(store.root) / JOB_FILE, {"job_key": key, "config": config, "owner": process_owner()})


def release_checkpoint_dir(store) -> None:
    """After the job finished: drop its ``job.json`` and the directory if nothing else is left."""
    root = Path(store.root)
    if store.has_any() or store.finished():
        return
    (root / JOB_FILE).unlink(missing_ok=True)
    try:
        root.rmdir()
    except OSError:
        pass


def _run_status(tracking_uri: str | None, run_id: str | None) -> str | None:
    if not tracking_uri or not run_id:
        return None
    from opd_lit.tracking import mlflow_client

    try:
        return mlflow_client(tracking_uri).get_run(run_id).info.status
    except Exception:  # noqa: BLE001 - a run of another store: unknown
        return None


def claim_output_dir(out: Path, key: str, config: dict[str, Any], run_id: str | None = None,
                     tracking_uri: str | None = None) -> Path:
    """Make ``out`` this job's output directory, or refuse naming the job whose outputs it holds.

    ``run_id``: the MLflow run this attempt continues (resume), None for a new run. Refused:
    another job's directory; this job's directory holding a FINISHED run other than
    ``run_id`` (``force=true`` would overwrite the model that run exported). Returns the
    marker file.
    """
    from opd_lit.locks import JobConflictError, describe_owner, process_owner

    marker = Path(out) / OUTPUT_MARKER
    record = {"job_key": key, "config": config, "mlflow_run_id": run_id, "owner": process_owner()}
    Path(out).mkdir(parents=True, exist_ok=True)
    try:  # exclusive create: of two jobs started together on one directory, one wins
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        existing = _read_json(marker) or {}
    else:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=1, sort_keys=True, default=str)
        return marker
    where = f"output_dir={str(out)!r}"
    if "unreadable" in existing:
        raise JobConflictError(
            f"{where}: its marker {marker} cannot be read ({existing['unreadable']}), so whose "
            "outputs it holds is unknown. Give this run another output_dir, or remove the marker."
        )
    other, other_run = existing.get("job_key"), existing.get("mlflow_run_id")
    if other != key:
        status = _run_status(tracking_uri, other_run)
        diff = config_diff(existing.get("config") or {}, config)
        raise JobConflictError(
            f"{where} holds the outputs of another job, {other} (MLflow run "
            f"{other_run or 'unknown'}{', ' + status if status else ''}; written by "
            f"{describe_owner(existing.get('owner'))}), and this job is {key}"
            + (f"; it differs in {', '.join(diff)}" if diff else "")
            + ". Nothing was written. Give each job its own output_dir (or leave output_dir "
            "unset: Hydra's run directory is new for every run)."
        )
    if other_run and other_run != run_id and _run_status(tracking_uri, other_run) == FINISHED:
        raise JobConflictError(
            f"{where} holds the outputs of FINISHED MLflow run {other_run} of this job ({key}); "
            "running it again here (force=true) would overwrite the model that run exported and "
            "points at. Nothing was written. Give this run another output_dir."
        )
    _write_json(marker, record)
    return marker


def update_output_marker(marker: Path, run_id: str | None) -> None:
    data = _read_json(marker) or {}
    if run_id and "unreadable" not in data:
        data["mlflow_run_id"] = run_id
        _write_json(marker, data)


def settle_stale_runs(tracking_uri: str, plan: JobPlan, checkpoint_dir: str | Path) -> list[str]:
    """Give a final status to the job's unfinished runs that nothing will resume; returns them.

    Called by rank 0 holding the job's lock. FAILED and KILLED runs keep their status. A
    RUNNING run whose process (its ``owner`` tag) is alive on this host is another owner of
    this job: :class:`opd_lit.locks.JobLockedError`. A RUNNING run whose process is gone, or
    that used this ``checkpoint.dir`` (whose lock we hold), or that has no owner tag (runs
    from before the tag) is marked FAILED with the tag ``error`` saying why. A RUNNING run
    from another host with another ``checkpoint.dir`` cannot be told dead: it is left as it is.
    """
    from opd_lit.locks import (
        JobLockedError,
        describe_owner,
        owner_alive,
        owner_token,
        parse_owner_token,
    )

    here = str(Path(checkpoint_dir).expanduser().resolve())
    open_runs = [plan.runs[r] for r in plan.stale_runs
                 if r in plan.runs and plan.runs[r].info.status in ("RUNNING", "SCHEDULED")]
    for run in open_runs:  # first refuse, before anything is changed
        tags = run.data.tags
        owner = parse_owner_token(tags.get("owner"))
        if owner_alive(owner) and tags.get("owner") != owner_token():
            raise JobLockedError(
                f"job {plan.key} is already running as MLflow run {run.info.run_id}: "
                f"{describe_owner(owner)}, checkpoint.dir={tags.get('checkpoint_dir')!r}. "
                "Nothing was changed. Wait for it to finish or stop it.", owner,
            )
    ended = []
    for run in open_runs:  # FAILED / KILLED runs are not here: already final, and right
        run_id, tags = run.info.run_id, run.data.tags
        owner = parse_owner_token(tags.get("owner"))
        alive = owner_alive(owner)
        if owner is not None and alive is None and tags.get("checkpoint_dir") not in (None, here):
            log.warning(
                "MLflow run %s of job %s is RUNNING on host %s with checkpoint.dir=%s; whether it "
                "still runs cannot be told from here, so its status is left as it is",
                run_id, plan.key, owner.get("host"), tags.get("checkpoint_dir"),
            )
            continue
        why = (
            f"its process ({describe_owner(owner)}) ended without a final status (killed: "
            "SIGKILL, out of memory or node loss); found by "
            f"pid {os.getpid()} on host {socket.gethostname()}"
            if owner else "it ended without a final status (no owner recorded)"
        )
        try:
            set_run_status(tracking_uri, run_id, "FAILED", error=why)
            ended.append(run_id)
            log.warning("MLflow run %s of job %s marked FAILED: %s", run_id, plan.key, why)
        except Exception as e:  # noqa: BLE001
            log.warning("could not mark stale MLflow run %s FAILED: %s", run_id, e)
    return ended


def end_own_runs(tracking_uri: str, experiment_name: str, key: str, status: str, error: str) -> list[str]:
    """Set ``status`` (with the tag ``error``) on every run of this job this process left RUNNING.

    The net under :func:`opd_lit.train.run`: whatever failed (building the trainer, a
    misspelled Lightning key, an interrupt before training), no run of this process stays
    RUNNING.
    """
    from opd_lit.locks import owner_token

    me, ended = owner_token(), []
    try:
        runs = find_job_runs(tracking_uri, experiment_name, key)
    except Exception as e:  # noqa: BLE001 - the store itself is what failed: nothing to end
        log.warning("could not look up this process's MLflow runs to end them: %s", e)
        return ended
    for run in runs:
        if run.info.status == "RUNNING" and run.data.tags.get("owner") == me:
            try:
                set_run_status(tracking_uri, run.info.run_id, status, error=error)
                ended.append(run.info.run_id)
            except Exception as e:  # noqa: BLE001
                log.warning("could not set MLflow run %s to %s: %s", run.info.run_id, status, e)
    return ended
