"""Crash-safe checkpoints of a training run, and the callback that writes and restores them.

Layout of one job's directory (``checkpoint.dir``, stable per job: ``checkpoints/<job_key>``)::

    step-00000012.ckpt    torch.save payload (below)
    step-00000012.json    {"format", "step", "sha256", "bytes", "job_key", "mlflow_run_id", ...}
    finished.json         logger=csv: written when the job finished (its summary); the checkpoints go

Writing is atomic: the payload goes to a temporary file in the same directory, is flushed and
fsync'ed, then ``os.replace``'d onto its name; its sha256 is then written the same way into
the ``.json`` beside it, and the directory is fsync'ed. A checkpoint counts only when its
``.json`` exists and the payload's size and sha256 match, so a crash (or a full disk) at any
moment leaves the previous checkpoint valid. Older checkpoints beyond ``keep_last`` are
deleted only after the new one is complete.

Multi-process runs (``trainer=ddp`` / ``trainer=fsdp``) write a *sharded* checkpoint instead:
``step-00000012.dcp/`` holds the student's weights and AdamW state through torch distributed
checkpoint (every rank writes its own shard, replicated tensors once), ``rank-<r>.pt`` each
rank's RNG states, and ``state.pt`` the rest of the payload (rank 0); the ``.json`` lists
every file with its size and sha256 (each rank hashes what it wrote). Verification and
fallback to an older checkpoint are the same as for one file.

The payload: the module's state dict (the student's weights), the optimizer and LR-scheduler
states, the RNG states (python, numpy, torch CPU and CUDA, and every ``torch.Generator`` held
by the datamodule or its rollout engine), the global step (= the data position: the
datamodule's ``start_step``), the skipped-step counters, the MLflow run id, the state of any
callback or datamodule that keeps one (``state_dict``), and the step's metrics (re-logged on
resume if the kill came before they reached the logger).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from opd_lit.settings import sha256_file

log = logging.getLogger(__name__)

FORMAT = 1
_NAME = re.compile(r"^step-(\d{8})\.json$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read."""


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    path: Path  # the payload (.ckpt)
    meta: dict[str, Any]

    @property
    def run_id(self) -> str | None:
        return self.meta.get("mlflow_run_id")


# ---- files ---------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write) -> None:
    """Call ``write(fileobj)`` on a temp file beside ``path``, fsync, then rename onto ``path``.

    On any error the temp file is removed and ``path`` (if it existed) is untouched.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, indent=1, sort_keys=True, default=str).encode()


class CheckpointStore:
    """The checkpoints of one job in one directory (see the module docstring)."""

    def __init__(self, root: str | Path, job_key: str | None = None, keep_last: int = 2):
        self.root = Path(root)
        self.job_key = job_key
        self.keep_last = max(1, int(keep_last))
        self._invalid: list[str] = []

    def payload_path(self, step: int) -> Path:
        return self.root / f"step-{step:08d}.ckpt"

    def meta_path(self, step: int) -> Path:
        return self.root / f"step-{step:08d}.json"

    def shard_dir(self, step: int) -> Path:
        return self.root / f"step-{step:08d}.dcp"

    def _remove_payload(self, step: int) -> None:
        self.payload_path(step).unlink(missing_ok=True)
        shutil.rmtree(self.shard_dir(step), ignore_errors=True)

    @property
    def finished_path(self) -> Path:
        return self.root / "finished.json"

    # ---- write -------------------------------------------------------------------------
    def save(self, step: int, payload: dict[str, Any], run_id: str | None = None) -> CheckpointInfo:
        """Write the checkpoint of ``step`` atomically; then prune old ones. Raises OSError."""
        self.root.mkdir(parents=True, exist_ok=True)
        path, meta_path = self.payload_path(step), self.meta_path(step)
        t0 = time.perf_counter()
        # A stale meta of the same step (an earlier attempt) must not vouch for a new payload.
        meta_path.unlink(missing_ok=True)
        atomic_write(path, lambda f: torch.save(payload, f))
        meta = {
            "format": FORMAT,
            "step": step,
            "file": path.name,
            "bytes": path.stat().st_size,
            "sha256": sha256_file(path),
            "job_key": self.job_key,
            "mlflow_run_id": run_id,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "write_s": round(time.perf_counter() - t0, 3),
        }
        atomic_write(meta_path, lambda f: f.write(_json_bytes(meta)))
        self.prune()
        return CheckpointInfo(step, path, meta)

    def prune(self) -> None:
        """Keep the newest ``keep_last`` complete checkpoints; drop temp files and orphans."""
        metas = self._metas()
        for step, meta_path in metas[: max(0, len(metas) - self.keep_last)]:
            meta_path.unlink(missing_ok=True)  # meta first: a half-deleted one is invalid
            self._remove_payload(step)
        kept = {s for s, _ in metas[-self.keep_last:]}
        for p in [*self.root.glob("step-*.ckpt"), *self.root.glob("step-*.dcp")]:
            step = int(p.name[5:13])
            if step not in kept and not self.meta_path(step).exists():
                self._remove_payload(step)  # payload whose meta never got written
        self.clean_temp()

    def clean_temp(self) -> None:
        for p in self.root.glob(".*.tmp-*"):
            pid = p.name.rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
                continue  # another live writer (should not happen: one writer per job)
            p.unlink(missing_ok=True)

    def clear(self) -> int:
        """Delete every checkpoint (and the finished marker) of this job; returns how many."""
        n = 0
        for step, meta_path in self._metas():
            meta_path.unlink(missing_ok=True)
            self._remove_payload(step)
            n += 1
        if self.root.exists():
            for p in [*self.root.glob("step-*.ckpt"), *self.root.glob("step-*.dcp")]:
                self._remove_payload(int(p.name[5:13]))
            self.finished_path.unlink(missing_ok=True)
            self.clean_temp()
        return n

    def has_any(self) -> bool:
        return self.root.is_dir() and any(self.root.glob("step-*"))

    def set_aside(self) -> Path:
        """Move this job's directory to ``<dir>.orphan-<time>`` (kept, never deleted)."""
        target = self.root.with_name(f"{self.root.name}.orphan-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(self.root, target)
        return target

    def mark_finished(self, summary: dict[str, Any], keep_checkpoints: bool = False,
                      marker: bool = True) -> None:
        """The job is done: drop its checkpoints (unless kept); ``marker``: write finished.json
        (what a re-run without MLflow reads); an emptied directory is removed."""
        if marker:
            self.root.mkdir(parents=True, exist_ok=True)
            atomic_write(self.finished_path, lambda f: f.write(_json_bytes({"job_key": self.job_key, **summary})))
        if not keep_checkpoints:
            for step, meta_path in self._metas():
                meta_path.unlink(missing_ok=True)
                self._remove_payload(step)
            if self.root.is_dir():
                self.clean_temp()
                try:
                    self.root.rmdir()  # only when empty
                except OSError:
                    pass

    def finished(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.finished_path.read_text())
        except (OSError, ValueError):
            return None

    # ---- read --------------------------------------------------------------------------
    def _metas(self) -> list[tuple[int, Path]]:
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            m = _NAME.match(p.name)
            if m:
                found.append((int(m.group(1)), p))
        return sorted(found)

    def verify(self, step: int) -> CheckpointInfo:
        """The checkpoint of ``step`` if complete and intact; else CheckpointError (why)."""
        meta_path, path = self.meta_path(step), self.payload_path(step)
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{meta_path}: unreadable ({e})") from e
        if meta.get("format") != FORMAT or meta.get("step") != step:
            raise CheckpointError(f"{meta_path}: not a format-{FORMAT} checkpoint of step {step}")
        if self.job_key and meta.get("job_key") not in (None, self.job_key):
            raise CheckpointError(
                f"{meta_path}: written by job {meta.get('job_key')}, not this job {self.job_key}"
            )
        if meta.get("sharded"):
            path = self.shard_dir(step)
            listed = meta.get("files") or {}
            if not listed:
                raise CheckpointError(f"{meta_path}: a sharded checkpoint that lists no files")
            for name, entry in sorted(listed.items()):
                _check_file(path / name, entry.get("bytes"), entry.get("sha256"))
            return CheckpointInfo(step, path, meta)
        _check_file(path, meta.get("bytes"), meta.get("sha256"))
        return CheckpointInfo(step, path, meta)

    def latest(self) -> CheckpointInfo | None:
        """The newest valid checkpoint; corrupted or partial ones are reported and skipped."""
        self._invalid = []
        for step, _ in reversed(self._metas()):
            try:
                return self.verify(step)
            except CheckpointError as e:
                self._invalid.append(str(e))
                log.warning("skipping invalid checkpoint: %s", e)
        return None

    def describe_invalid(self) -> str:
        return "; ".join(self._invalid)

    def load(self, info: CheckpointInfo, map_location: str | torch.device = "cpu") -> dict[str, Any]:
        """The checkpoint's payload. Sharded: the global part (``state.pt``); the weights and
        optimizer state stay on disk for :func:`load_sharded_state`, the RNG for each rank."""
        sharded = bool(info.meta.get("sharded"))
        file = info.path / SHARDED_STATE if sharded else info.path
        try:
            payload = torch.load(file, map_location=map_location, weights_only=False)
        except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
            raise CheckpointError(f"{file}: cannot be loaded ({type(e).__name__}: {e})") from e
        need = ("step", "counters") if sharded else ("step", "module", "optimizers", "rng")
        missing = [k for k in need if k not in payload]
        if missing:
            raise CheckpointError(f"{info.path}: payload lacks {missing}")
        return payload

    def latest_loaded(self) -> tuple[CheckpointInfo, dict[str, Any]] | None:
        """The newest checkpoint that verifies *and* loads, falling back to older ones."""
        for step, _ in reversed(self._metas()):
            try:
                info = self.verify(step)
                return info, self.load(info)
            except CheckpointError as e:
                self._invalid.append(str(e))
                log.warning("skipping invalid checkpoint: %s", e)
        return None


def _check_file(path: Path, size_expected, sha_expected) -> None:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    size = path.stat().st_size
    if size != size_expected:
        raise CheckpointError(f"{path}: {size} bytes, expected {size_expected} (truncated?)")
    digest = sha256_file(path)
    if digest != sha_expected:
        raise CheckpointError(f"{path}: sha256 {digest[:12]}… does not match {str(sha_expected)[:12]}… (corrupted)")


# ---- sharded checkpoints (several processes) ------------------------------------------

SHARDED_STATE = "state.pt"
DCP_DIR = "model"


def _rank_file(rank: int) -> str:
    return f"rank-{rank}.pt"


def save_sharded(
    store: CheckpointStore, step: int, student: torch.nn.Module, optimizer, payload: dict[str, Any],
    rng: dict[str, Any], run_id: str | None,
) -> CheckpointInfo | None:
    """Collective: every rank writes its shard of the student and optimizer (torch distributed
    checkpoint) and its RNG; rank 0 writes the global ``payload`` and, last, the ``.json``
    listing every file's size and sha256. Returns the info on rank 0 (None elsewhere).

    A failed write on any rank raises ``OSError`` on every rank, and no ``.json`` is written
    (so the previous checkpoint stays the newest valid one).
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    rank = dist.get_rank()
    root = store.shard_dir(step)
    t0 = time.perf_counter()
    error = None
    if rank == 0:
        store.root.mkdir(parents=True, exist_ok=True)
        store.meta_path(step).unlink(missing_ok=True)
        shutil.rmtree(root, ignore_errors=True)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(student, optimizer)
    try:
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(root / DCP_DIR))
    except Exception as e:  # noqa: BLE001 - reported on every rank below
        error = f"{type(e).__name__}: {e}"
    mine: dict[str, dict] = {}
    if error is None:
        try:
            atomic_write(root / _rank_file(rank), lambda f: torch.save(rng, f))
            if rank == 0:
                atomic_write(root / SHARDED_STATE, lambda f: torch.save(payload, f))
            written = [_rank_file(rank)] + ([SHARDED_STATE] if rank == 0 else [])
            written += [f"{DCP_DIR}/{p.name}" for p in (root / DCP_DIR).glob(f"__{rank}_*")]
            if rank == 0:
                written += [f"{DCP_DIR}/{p.name}" for p in (root / DCP_DIR).iterdir() if not p.name.startswith("__")]
            for name in written:
                mine[name] = {"bytes": (root / name).stat().st_size, "sha256": sha256_file(root / name)}
        except OSError as e:
            error = f"{type(e).__name__}: {e}"
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {"error": error, "files": mine})
    errors = [g["error"] for g in gathered if g["error"]]
    if errors:
        raise OSError(errno.EIO, f"sharded checkpoint of step {step} not written: {'; '.join(errors)}")
    if rank != 0:
        return None
    files = {name: entry for g in gathered for name, entry in g["files"].items()}
    meta = {
        "format": FORMAT, "step": step, "sharded": True, "world_size": dist.get_world_size(),
        "files": files, "bytes": sum(e["bytes"] for e in files.values()), "job_key": store.job_key,
        "mlflow_run_id": run_id, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "write_s": round(time.perf_counter() - t0, 3),
    }
    atomic_write(store.meta_path(step), lambda f: f.write(_json_bytes(meta)))
    store.prune()
    return CheckpointInfo(step, root, meta)


def load_sharded_state(info: CheckpointInfo, student: torch.nn.Module, optimizer) -> dict[str, Any]:
    """Collective: the student's weights and optimizer state from a sharded checkpoint (each
    rank reads what it holds); returns this rank's RNG state."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    world = dist.get_world_size()
    if info.meta.get("world_size") != world:
        raise CheckpointError(
            f"{info.path}: written by {info.meta.get('world_size')} processes, this run has {world} "
            "(resume with the same trainer.devices × trainer.num_nodes)"
        )
    model_sd, optim_sd = get_state_dict(student, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(info.path / DCP_DIR))
    set_state_dict(student, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return torch.load(info.path / _rank_file(dist.get_rank()), map_location="cpu", weights_only=False)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---- RNG -----------------------------------------------------------------------------


def _generators(*owners: Any) -> dict[str, torch.Generator]:
    out = {}
    for name, owner in owners:
        if owner is None:
            continue
        for attr, value in vars(owner).items():
            if isinstance(value, torch.Generator):
                out[f"{name}.{attr}"] = value
    return out


def capture_rng(generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "generators": {k: g.get_state() for k, g in (generators or {}).items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], generators: dict[str, torch.Generator] | None = None) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, g_state in state.get("generators", {}).items():
        g = (generators or {}).get(name)
        if g is not None:
            g.set_state(g_state)
        else:
            log.warning("checkpoint holds the RNG state of %s, which this run does not have", name)


# ---- the callback --------------------------------------------------------------------


def _step_metrics(trainer) -> dict[str, float]:
    """The metrics this step handed to the loggers (sent after the callbacks' batch end)."""
    try:
        metrics = trainer._logger_connector.metrics["log"]
    except Exception:  # noqa: BLE001 - private API; fall back to the public view
        metrics = {k: v for k, v in trainer.callback_metrics.items() if "/" in k}
    out = {}
    for k, v in metrics.items():
        if k == "epoch":
            continue
        try:
            out[k] = float(v)
        except (TypeError, ValueError):
            pass
    return out


def _loop(trainer):
    return trainer.fit_loop.epoch_loop


def relog_pending_metrics(loggers, pending: dict[str, Any] | None) -> int:
    """Send a checkpoint's step metrics to each logger that lacks them; returns how many got them.

    A checkpoint is written at the end of a step, just before Lightning hands that step's
    metrics to the loggers; a kill in between would lose them, so the checkpoint carries them.
    """
    metrics = dict((pending or {}).get("metrics") or {})
    step = (pending or {}).get("step")
    if not metrics or step is None or step < 0:
        return 0
    probe = "train/loss" if "train/loss" in metrics else sorted(metrics)[0]
    sent = 0
    for lg in loggers:
        has = getattr(lg, "has_metric_at", None)
        if has is not None and has(probe, step):
            continue
        lg.log_metrics(metrics, step=step)
        sent += 1
    return sent


class CheckpointCallback(L.Callback):
    """Writes a checkpoint every ``every_n_steps`` optimizer steps and on SIGINT / SIGTERM;
    restores one into a run that resumes.

    Ctrl-C (SIGINT): the current step finishes, its metrics are logged, a checkpoint is
    written, and the run stops with the MLflow status KILLED (a second Ctrl-C stops at once,
    without a checkpoint). SIGTERM (e.g. a SLURM preemption, handled by Lightning at the end of
    a step) does the same.
    """

    def __init__(
        self,
        store: CheckpointStore,
        every_n_steps: int = 1,
        resume: dict[str, Any] | None = None,
    ):
        self.store = store
        self.every_n_steps = int(every_n_steps)
        self.resume_payload = resume
        self.last_saved_step: int | None = None
        self.last_saved: CheckpointInfo | None = None
        self.failures = 0
        self.interrupt_requested = False
        self.interrupted: str | None = None  # "SIGINT" | "SIGTERM" once the run was stopped
        self._previous_sigint = None
        self._installed = False

    # ---- signals -----------------------------------------------------------------------
    def install_signal_handler(self) -> None:
        if self._installed or threading.current_thread() is not threading.main_thread():
            return
        self._previous_sigint = signal.getsignal(signal.SIGINT)
        signal.signal(signal.SIGINT, self._on_sigint)
        self._installed = True

    def restore_signal_handler(self) -> None:
        if self._installed and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous_sigint or signal.default_int_handler)
            self._installed = False

    def _on_sigint(self, signum, frame) -> None:
        if self.interrupt_requested:
            raise KeyboardInterrupt
        self.interrupt_requested = True
        print(
            "\nCtrl-C: finishing the current step, then writing a checkpoint and stopping "
            "(press Ctrl-C again to stop now, without a checkpoint)",
            file=sys.stderr, flush=True,
        )

    # ---- payload -----------------------------------------------------------------------
    def _run_id(self, trainer) -> str | None:
        for lg in trainer.loggers:
            run_id = getattr(lg, "run_id", None)
            if run_id:
                return run_id
        return None

    def _generators(self, trainer) -> dict[str, torch.Generator]:
        module = trainer.lightning_module
        parts = getattr(module, "parts", None)
        return _generators(
            ("datamodule", trainer.datamodule), ("engine", getattr(parts, "_engine", None)), ("module", module)
        )

    def payload(self, trainer, pl_module, pending_metrics: dict[str, float] | None,
                sharded: bool = False) -> dict[str, Any]:
        """What a checkpoint holds; ``sharded``: without the weights, optimizer and RNG (each
        rank writes its own of those, :func:`save_sharded`)."""
        strategy = trainer.strategy
        dm = trainer.datamodule
        step = trainer.global_step
        callbacks = {}
        for cb in trainer.callbacks:
            if cb is self:
                continue
            state = cb.state_dict()
            if state:
                callbacks[type(cb).__qualname__] = state
        checkpoint: dict[str, Any] = {
            "format": FORMAT,
            "step": step,
            "job_key": self.store.job_key,
            "mlflow_run_id": self._run_id(trainer),
            "lr_schedulers": [c.scheduler.state_dict() for c in trainer.lr_scheduler_configs],
            "counters": {
                "skipped_steps": int(getattr(pl_module, "skipped_steps", 0)),
                "skipped_in_a_row": int(getattr(pl_module, "_skipped_in_a_row", 0)),
                "batches_that_stepped": step,
            },
            "callbacks": callbacks,
            "datamodule": {"start_step": step, **(dm.state_dict() if dm is not None else {})},
            "pending_metrics": {"step": step - 1, "metrics": pending_metrics or {}},
        }
        if not sharded:
            checkpoint["module"] = strategy.lightning_module_state_dict()
            checkpoint["optimizers"] = [strategy.optimizer_state(o) for o in trainer.optimizers]
            checkpoint["rng"] = capture_rng(self._generators(trainer))
        pl_module.on_save_checkpoint(checkpoint)
        return checkpoint

    def save(self, trainer, pl_module, pending_metrics: dict[str, float] | None = None) -> CheckpointInfo | None:
        """Write the checkpoint of the current step; a failed write leaves the previous one.
        Several processes: every rank takes part (a sharded checkpoint)."""
        step = trainer.global_step
        sharded = trainer.world_size > 1
        payload = self.payload(trainer, pl_module, pending_metrics, sharded=sharded)
        info = None
        try:
            if sharded:
                info = save_sharded(
                    self.store, step, pl_module.student, trainer.optimizers[0], payload,
                    capture_rng(self._generators(trainer)), payload["mlflow_run_id"],
                )
            elif trainer.is_global_zero:
                info = self.store.save(step, payload, run_id=payload["mlflow_run_id"])
            if info is not None:
                self.last_saved = info
                log.debug("checkpoint: step %d -> %s (%.2fs)", step, info.path, info.meta["write_s"])
        except OSError as e:
            self.failures += 1
            if trainer.is_global_zero:
                reason = "the disk is full" if e.errno == errno.ENOSPC else f"{type(e).__name__}: {e}"
                prev = self.last_saved or self.store.latest()
                log.warning(
                    "checkpoint at step %d could not be written (%s); the previous checkpoint "
                    "%s stays valid and training continues",
                    step, reason, f"(step {prev.step}, {prev.path})" if prev else "(none)",
                )
                for lg in trainer.loggers:
                    lg.log_metrics({"checkpoint/failures": float(self.failures)}, step=max(0, step - 1))
        trainer.strategy.barrier("opd_lit_checkpoint")
        self.last_saved_step = step
        return info

    # ---- hooks -------------------------------------------------------------------------
    def on_fit_start(self, trainer, pl_module) -> None:
        self.install_signal_handler()
        if trainer.is_global_zero:
            self.store.root.mkdir(parents=True, exist_ok=True)
            self.store.clean_temp()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        # The latest point before the first resumed rollout: after the data loader's iterator
        # was made (it draws from the torch RNG) and after any on_train_start hook.
        if self.resume_payload is not None:
            self._restore(trainer, pl_module, self.resume_payload)
            self.resume_payload = None

    def _restore(self, trainer, pl_module, ckpt: dict[str, Any]) -> None:
        step = int(ckpt["step"])
        strategy = trainer.strategy
        if "sharded_from" in ckpt:  # weights, optimizer and this rank's RNG from the shards
            ckpt["rng"] = load_sharded_state(ckpt["sharded_from"], pl_module.student, trainer.optimizers[0])
        else:
            strategy.load_optimizer_state_dict({"optimizer_states": ckpt["optimizers"]})
        for config, state in zip(trainer.lr_scheduler_configs, ckpt.get("lr_schedulers", [])):
            config.scheduler.load_state_dict(state)
        counters = ckpt.get("counters", {})
        if hasattr(pl_module, "skipped_steps"):
            pl_module.skipped_steps = int(counters.get("skipped_steps", 0))
            pl_module._skipped_in_a_row = int(counters.get("skipped_in_a_row", 0))
        for cb in trainer.callbacks:
            state = ckpt.get("callbacks", {}).get(type(cb).__qualname__)
            if state and cb is not self:
                cb.load_state_dict(state)
        loop = _loop(trainer)
        if pl_module.automatic_optimization:
            raise CheckpointError("resume supports manual optimization (DistillModule) only")
        progress = loop.manual_optimization.optim_step_progress.total
        progress.ready = progress.completed = step
        loop._batches_that_stepped = step
        pl_module.on_load_checkpoint(ckpt)
        parts = getattr(pl_module, "parts", None)
        if parts is not None and parts._engine is not None:
            parts.engine.sync_weights(pl_module.student)  # a no-op for hf (the same module)
        if relog_pending_metrics(trainer.loggers, ckpt.get("pending_metrics")):
            log.debug("re-sent the metrics of step %d (the run had stopped before they were logged)", step - 1)
        restore_rng(ckpt["rng"], self._generators(trainer))
        self.last_saved_step = step
        log.debug("resumed at step %d (global step, data position and RNG restored)", step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.interrupt_requested:
            # Lightning would send this step's metrics after this hook; the run stops here, so
            # send them now, checkpoint, and stop.
            metrics = _step_metrics(trainer)
            if metrics:
                for lg in trainer.loggers:
                    lg.log_metrics(metrics, step=step - 1)
            if self.every_n_steps > 0 and step < trainer.max_steps:
                self.save(trainer, pl_module, pending_metrics=None)
            self.interrupted = "SIGINT"
            raise KeyboardInterrupt
        if self.every_n_steps > 0 and step % self.every_n_steps == 0 and step < trainer.max_steps:
            self.save(trainer, pl_module, pending_metrics=_step_metrics(trainer))

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if isinstance(exception, SIGTERMException):
            # Raised by Lightning at the end of a step (state consistent, metrics sent).
            self.interrupted = "SIGTERM"
            step = trainer.global_step
            if self.every_n_steps > 0 and self.last_saved_step != step and step < trainer.max_steps:
                self.save(trainer, pl_module, pending_metrics=None)
        elif isinstance(exception, KeyboardInterrupt):
            self.interrupted = self.interrupted or "SIGINT"
        status = "KILLED" if self.interrupted else "FAILED"
        for lg in trainer.loggers:
            if hasattr(lg, "terminal_status"):
                lg.terminal_status = status

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self.restore_signal_handler()
