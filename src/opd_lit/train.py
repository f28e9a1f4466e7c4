"""Entry point: ``python -m opd_lit.train [overrides]`` (Hydra; ``-m`` for multirun sweeps).

Composes the run from ``conf/`` and instantiates DataModule, method, callbacks, logger and
trainer; holds no science of its own.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.errors import CompactHydraException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from opd_lit.data import RolloutDataModule
from opd_lit.diagnostics import diagnostics_callbacks
from opd_lit.dist import broadcast_from_rank_zero, is_launch_rank_zero, join_external_group
from opd_lit.eval.callback import EvalCallback
from opd_lit.jobs import job_key  # noqa: F401 - registers the ${job_key:} resolver
from opd_lit.progress import StageProgressBar
from opd_lit.settings import run_output_dir
from opd_lit.teacher import TeacherCallback
from opd_lit.tracking import build_loggers, tracking_uri

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
log = logging.getLogger("opd_lit.train")


def _bf16_on_gpu(accelerator: str) -> str:
    """``${bf16_on_gpu:${.accelerator}}``: Lightning precision, bf16-mixed on GPUs, fp32 on the CPU."""
    return "32-true" if str(accelerator) == "cpu" else "bf16-mixed"


if not OmegaConf.has_resolver("bf16_on_gpu"):
    OmegaConf.register_new_resolver("bf16_on_gpu", _bf16_on_gpu)


def output_dir(cfg: DictConfig) -> Path:
    return run_output_dir(cfg, "outputs")


def build(cfg: DictConfig, out: Path, plan=None):
    """Instantiate everything a run needs, without running it.

    ``plan`` (:class:`opd_lit.jobs.JobPlan`): with ``action == "resume"`` the student's
    weights and the data position come from its checkpoint now, the rest (optimizer, LR
    scheduler, RNG, step counters) when training starts, and the MLflow run is continued.
    """
    from opd_lit.checkpoint import CheckpointCallback, CheckpointError, CheckpointStore

    datamodule = RolloutDataModule(
        data=OmegaConf.to_container(cfg.data, resolve=True),
        rollout=OmegaConf.to_container(cfg.rollout, resolve=True),
        student_path=cfg.student.path,
        teacher_path=cfg.teacher.path,
        seed=cfg.seed,
        student_template_kwargs=OmegaConf.to_container(cfg.student.template_kwargs, resolve=True),
        teacher_template_kwargs=OmegaConf.to_container(cfg.teacher.template_kwargs, resolve=True),
    )
    student = OmegaConf.to_container(cfg.student, resolve=True)
    student.pop("name", None)
    module = instantiate(
        cfg.method,
        student=student,
        optim=OmegaConf.to_container(cfg.optim, resolve=True),
        loss=OmegaConf.to_container(cfg.loss, resolve=True),
        release=OmegaConf.to_container(cfg.release, resolve=True),
        divergence=OmegaConf.to_container(cfg.divergence, resolve=True) if "divergence" in cfg else None,
        _convert_="all",
    )
    teacher = TeacherCallback(
        path=cfg.teacher.path,
        dtype=cfg.teacher.dtype,
        attn_implementation=cfg.teacher.get("attn_implementation", "sdpa"),
        chunk_size=cfg.loss.chunk_size,
        micro_batch_size=cfg.teacher.get("micro_batch_size", 64),
        name=cfg.teacher.get("name"),
    )
    evaluation = EvalCallback(**OmegaConf.to_container(cfg.eval, resolve=True))
    if evaluation.every_n_steps or evaluation.at_start or evaluation.at_end:
        datamodule.eval_max_new_tokens = evaluation.max_new_tokens
    callbacks = [teacher, evaluation]
    callbacks += diagnostics_callbacks(cfg.get("diagnostics"))
    if cfg.get("progress", True):
        callbacks.append(StageProgressBar())

    key = plan.key if plan is not None else job_key(cfg)
    ckpt_cfg = cfg.get("checkpoint") or {}
    store = CheckpointStore(
        ckpt_cfg.get("dir") or f"checkpoints/{key}", key, keep_last=ckpt_cfg.get("keep_last", 2)
    )
    payload, run_id = None, None
    if plan is not None and plan.action == "resume":
        try:
            info = plan.checkpoint  # verified by plan_job a moment ago
            payload = store.load(info)
        except CheckpointError as e:
            log.warning("%s; trying older checkpoints", e)
            loaded = store.latest_loaded()
            if loaded is None:
                raise CheckpointError(f"no loadable checkpoint to resume in {store.root}: {store.describe_invalid()}") from e
            info, payload = loaded
        if info.meta.get("sharded"):
            payload["sharded_from"] = info  # weights and optimizer: from the shards, at fit start
        else:
            module.load_state_dict(payload["module"])
        datamodule.start_step = int(payload["step"])
        datamodule.load_state_dict(payload.get("datamodule", {}))
        run_id = plan.run_id
        # The at-start evaluations belong to step 0; a resumed run does not repeat them.
        for cb in callbacks:
            for attr in ("at_start", "teacher_at_start"):
                if isinstance(getattr(cb, attr, None), bool):
                    setattr(cb, attr, False)
        log.debug("resuming job %s at step %d from %s", key, info.step, info.path)
    callbacks.append(
        CheckpointCallback(store, every_n_steps=ckpt_cfg.get("every_n_steps", 0), resume=payload)
    )
    loggers = build_loggers(cfg, out, run_id=run_id)
    trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers, default_root_dir=str(out),
        enable_progress_bar=bool(cfg.get("progress", True)),
    )
    return datamodule, module, trainer


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train one configuration; returns a summary (also what the multirun sweeper sees).

    Global rank 0 owns the job's side effects (:func:`take_the_job`): it holds the job's lock
    (a second run of the job is refused naming this one), refuses a ``checkpoint.dir`` or
    output directory holding another job's work, gives stale MLflow runs their final status,
    and moves or deletes this job's own checkpoints. The other ranks of a multi-process job
    only read, and take rank 0's decision. However the run ends, its MLflow run gets a final
    status with the cause in the tag ``error``.
    """
    if cfg.get("dry_run"):
        return dry_run(cfg)
    from opd_lit.locks import JobLock
    from opd_lit.validate import validate_config

    # 1. Bad input fails here, before anything is written or loaded: config values, prompt
    #    rows, model files, the rollout engine, output locations, the tracking store.
    validate_config(cfg)
    key = job_key(cfg)
    ckpt_dir = (cfg.get("checkpoint") or {}).get("dir") or f"checkpoints/{key}"
    external = join_external_group()  # torchrun / SLURM started every rank: plan on rank 0 alone
    lock = JobLock(ckpt_dir) if is_launch_rank_zero() else None
    term = _TermAsExit()
    term.install()
    try:
        # 2. One owner per job; skip, resume or run it.
        plan, marker = _plan_the_job(cfg, key, ckpt_dir, lock, external)
        if plan.action == "skip":
            return plan.summary
        return _run_job(cfg, key, lock, term, plan, marker)
    finally:
        term.restore()
        if lock is not None:
            lock.release()


class RankZeroError(RuntimeError):
    """Rank 0 stopped the job before training (a rank other than 0 reports why)."""


def _plan_the_job(cfg: DictConfig, key: str, ckpt_dir: str, lock, external: bool):
    """``(plan, output marker)``: rank 0 takes the job (:func:`take_the_job`); the ranks
    Lightning's launcher starts read its plan from the environment, ranks started by
    torchrun / SLURM receive it (or rank 0's error) by broadcast."""
    from opd_lit.jobs import plan_job

    if not external:
        if lock is not None:
            return take_the_job(cfg, key, ckpt_dir, lock)
        return plan_from_env(cfg, key) or plan_job(cfg, key), None
    mine: dict[str, Any] = {}

    def lead():
        try:
            mine["plan"], mine["marker"] = take_the_job(cfg, key, ckpt_dir, lock)
        except BaseException as e:  # noqa: BLE001 - re-raised below; the other ranks get its text
            mine["error"] = e
            return "error", f"{type(e).__name__}: {e}"
        return "plan", replace(mine["plan"], runs={})

    kind, value = broadcast_from_rank_zero(lead)  # rank 0 has acted on the plan from here on
    if "error" in mine:
        raise mine["error"]
    if kind == "error":
        raise RankZeroError(f"rank 0 stopped the job: {value}")
    return (mine["plan"], mine["marker"]) if lock is not None else (value, None)


def take_the_job(cfg: DictConfig, key: str, ckpt_dir: str, lock):
    """Rank 0: lock the job, refuse what belongs to another, decide, and act on the decision.

    Returns ``(plan, output marker)``; the marker is None when the job is skipped.
    """
    from opd_lit.checkpoint import CheckpointStore
    from opd_lit.jobs import (
        check_checkpoint_dir,
        claim_output_dir,
        job_config,
        plan_job,
        settle_stale_runs,
        write_job_file,
    )
    from opd_lit.locks import describe_owner

    mlflow = cfg.logger.kind == "mlflow"
    uri = tracking_uri(cfg.logger.get("tracking_uri")) if mlflow else None
    # a second run of this job stops here, naming the running one
    previous = lock.acquire({"job_key": key, "checkpoint_dir": str(Path(ckpt_dir).resolve()), "tracking_uri": uri})
    if previous:
        print(f"[opd_lit] took over the stale lock {lock.path} of job {previous.get('job_key')}: "
              f"{describe_owner(previous)} is no longer running", flush=True)
    store = CheckpointStore(ckpt_dir, key)
    config = job_config(cfg)
    check_checkpoint_dir(store, key, config)  # another job's checkpoints here: refused, keys named
    plan = plan_job(cfg, key)  # MLflow runs tagged with its key, its checkpoints
    if plan.action == "skip":
        print(f"[opd_lit] {plan.reason}", flush=True)
        return plan, None
    if mlflow:  # a live owner of this job elsewhere: refused; dead runs get their final status
        settle_stale_runs(uri, plan, ckpt_dir)
    marker = claim_output_dir(output_dir(cfg), key, config, plan.run_id, uri)
    print(f"[opd_lit] {plan.reason}", flush=True)  # once no refusal can follow
    if plan.action == "run":
        _clear_or_set_aside(cfg, store, plan, uri)
    write_job_file(store, key, config)
    return plan, marker


def _run_job(cfg: DictConfig, key: str, lock, term: "_TermAsExit", plan, marker) -> dict[str, Any]:
    from opd_lit.jobs import end_own_runs, release_checkpoint_dir, update_output_marker
    from opd_lit.tracking import describe_exception

    rank0 = lock is not None
    mlflow = cfg.logger.kind == "mlflow"
    uri = tracking_uri(cfg.logger.get("tracking_uri")) if mlflow else None
    out = output_dir(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    t0 = time.perf_counter()
    logger = None
    try:
        datamodule, module, trainer = build(cfg, out, plan=plan)
        if rank0 and trainer.world_size > 1:
            plan_to_env(plan)  # Lightning's launcher starts the other ranks with this environment
            use_rank_command()
        logger = trainer.loggers[0] if trainer.loggers else None
        run_id = getattr(logger, "run_id", None) if logger is not None and hasattr(logger, "run_id") else None
        if rank0:
            lock.update(mlflow_run_id=run_id)
            update_output_marker(marker, run_id)
        ckpt = next(c for c in trainer.callbacks if type(c).__name__ == "CheckpointCallback")
        term.in_fit = True  # Lightning handles SIGTERM at the end of a step
        try:
            trainer.fit(module, datamodule=datamodule)
        except BaseException as e:
            if ckpt.interrupted:
                saved = ckpt.last_saved
                where = f"checkpoint at step {saved.step}: {saved.path}" if saved else "no checkpoint"
                _close_logger(logger, "KILLED", f"stopped by {ckpt.interrupted} after step {trainer.global_step} ({where})")
                print(
                    f"[opd_lit] stopped by {ckpt.interrupted} after step {trainer.global_step} "
                    f"({where}); the MLflow run is marked KILLED. Run the same command again "
                    "to resume it.", flush=True,
                )
                raise SystemExit(130 if ckpt.interrupted == "SIGINT" else 143) from None
            _close_logger(logger, "FAILED", describe_exception(e))
            raise
        finally:
            term.in_fit = False
            ckpt.restore_signal_handler()
        evaluation = next(c for c in trainer.callbacks if isinstance(c, EvalCallback))
        summary: dict[str, Any] = {
            "method": cfg.method.name,
            "seed": cfg.seed,
            "steps": trainer.global_step,
            "wall_s": round(time.perf_counter() - t0, 1),
            "output_dir": str(out),
            "eval": evaluation.history,
            "job_key": key,
            "skipped_steps": int(getattr(module, "skipped_steps", 0)),
        }
        if plan.action == "resume":
            summary["resumed_from_step"] = plan.checkpoint.step
        if logger is not None and hasattr(logger, "run_id"):
            summary["mlflow_run_id"] = logger.run_id
        if cfg.get("export", {}).get("final_model", False):
            target = out / "student_final"
            export_student(module.student, datamodule.student_tokenizer, target)  # every rank takes part
            summary["final_model"] = str(target)
            if logger is not None and hasattr(logger, "run_id") and trainer.is_global_zero:
                logger.experiment.set_tag(logger.run_id, "final_model_dir", str(target.resolve()))
        if not trainer.is_global_zero:
            return summary  # rank 0 records the job (MLflow status, checkpoints, summary)
        if logger is not None:
            logger.log_metrics({"time/wall_s": summary["wall_s"]}, step=trainer.global_step)
            if hasattr(logger, "run_id"):
                logger.experiment.set_tag(logger.run_id, "steps", str(trainer.global_step))
        if rank0:
            ckpt.store.mark_finished(
                {k: v for k, v in summary.items() if k != "eval"},
                keep_checkpoints=bool((cfg.get("checkpoint") or {}).get("keep_on_finish", False)),
                marker=not mlflow,  # with MLflow, the run's status says it
            )
            release_checkpoint_dir(ckpt.store)
    except BaseException as e:
        status = "KILLED" if _interrupted(e) else "FAILED"
        error = describe_exception(e)
        _close_logger(logger, status, error)  # no-op when the run already has its final status
        if rank0 and mlflow:  # whatever this process left RUNNING (e.g. build() failed after creating it)
            end_own_runs(uri, cfg.logger.experiment_name, key, status, error)
        raise
    _close_logger(logger, "FINISHED")
    print_summary(summary)
    return summary


def _clear_or_set_aside(cfg: DictConfig, store, plan, uri: str | None) -> None:
    """A fresh start of this job: delete its old checkpoints when asked (force, resume=false);
    otherwise move them aside, kept, saying why and how to continue from them."""
    if not (store.has_any() or store.finished()):
        return
    if cfg.get("force") or cfg.get("resume") in (False, "false"):
        dropped = store.clear()
        log.warning("job %s: removed %d checkpoint(s) of an earlier attempt (starting afresh)", plan.key, dropped)
        return
    if not store.has_any():
        return
    orphan = plan.orphan_checkpoint
    moved = store.set_aside()
    why = (
        f"its checkpoint at step {orphan.step} was written by MLflow run {orphan.run_id}, which is not "
        f"a run of this job in experiment {cfg.logger.experiment_name!r} of the tracking store {uri}"
        if orphan is not None else
        f"none of them is valid ({store.describe_invalid() or 'no complete checkpoint'})"
    )
    log.warning(
        "job %s: checkpoints in %s moved to %s (kept, not deleted): %s. To continue from them in a "
        "new MLflow run: the same command with resume=true checkpoint.dir=%s", plan.key, store.root, moved,
        why, moved,
    )


def _interrupted(exc: BaseException) -> bool:
    """Ctrl-C, SIGTERM (ours before training, Lightning's during it) or the exits they become."""
    if isinstance(exc, KeyboardInterrupt):
        return True
    if isinstance(exc, SystemExit):
        return exc.code in (130, 143)
    return type(exc).__name__ == "SIGTERMException"


class _TermAsExit:
    """SIGTERM outside ``trainer.fit`` (validation, model loading, export) becomes
    ``SystemExit(143)``, so the run's MLflow run is marked KILLED; inside ``fit`` it does
    nothing (Lightning, which calls it too, stops at the end of the step)."""

    def __init__(self):
        self.in_fit = False
        self._previous = None
        self._installed = False

    def __call__(self, signum, frame) -> None:
        if not self.in_fit:
            raise SystemExit(143)

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self)
            self._installed = True

    def restore(self) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous or signal.SIG_DFL)
            self._installed = False


def rank_command(local_rank: int) -> tuple[list[str], str]:
    """The command Lightning's launcher runs for the other ranks of this Hydra job.

    Lightning's own re-runs ``sys.argv``, which in a multirun (``-m``) would start the whole
    sweep again in every child. This one runs exactly this job: the same config source, the
    job's own overrides, its output directory, no second copy of the ``.hydra`` files.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd

    hc = HydraConfig.get()
    command = [sys.executable, "-m", "opd_lit.train"]
    argv = sys.argv[1:]
    for i, arg in enumerate(argv):  # --config-dir/-cd, --config-name/-cn, --config-path/-cp
        for flag in ("--config-dir", "-cd", "--config-name", "-cn", "--config-path", "-cp"):
            if arg == flag and i + 1 < len(argv):
                command += [flag, argv[i + 1]]
            elif arg.startswith(flag + "="):
                command.append(arg)
    command += list(hc.overrides.task)
    command += [
        f'hydra.run.dir="{hc.runtime.output_dir}"',
        f"hydra.job.name=rank_{local_rank}",
        "hydra.output_subdir=null",
    ]
    return command, get_original_cwd()


def use_rank_command() -> None:
    """Make Lightning's subprocess launcher start the other ranks with :func:`rank_command`."""
    from lightning.pytorch.strategies.launchers import subprocess_script

    subprocess_script._hydra_subprocess_cmd = rank_command


PLAN_ENV = "OPD_LIT_JOB_PLAN"


def plan_to_env(plan) -> None:
    """Hand rank 0's decision to the ranks Lightning's launcher starts (they inherit the
    environment): they must not plan again, since rank 0 has already acted on it."""
    os.environ[PLAN_ENV] = json.dumps({
        "action": plan.action, "key": plan.key, "reason": plan.reason, "run_id": plan.run_id,
        "step": plan.checkpoint.step if plan.checkpoint is not None else None,
    })


def plan_from_env(cfg: DictConfig, key: str):
    """The plan rank 0 handed over (:func:`plan_to_env`), or None outside such a child."""
    from opd_lit.checkpoint import CheckpointStore
    from opd_lit.jobs import JobPlan

    raw = os.environ.get(PLAN_ENV)
    if not raw:
        return None
    d = json.loads(raw)
    if d["key"] != key:
        raise RuntimeError(f"{PLAN_ENV} is for job {d['key']}, this process composes job {key}")
    info = None
    if d["step"] is not None:
        store = CheckpointStore((cfg.get("checkpoint") or {}).get("dir") or f"checkpoints/{key}", key)
        info = store.verify(int(d["step"]))
    return JobPlan(d["action"], key, d["reason"], run_id=d["run_id"], checkpoint=info)


def export_student(student, tokenizer, target: Path) -> None:
    """Save the trained student as a Hugging Face directory (rank 0 writes; a sharded student
    is gathered to full tensors on rank 0 first, which every rank takes part in)."""
    from opd_lit.parallel import is_sharded

    state = None
    if is_sharded(student):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        head = student.get_output_embeddings()
        if head.weight is student.get_input_embeddings().weight:  # tied: saved once, as on disk
            name = next(n for n, m in student.named_modules() if m is head)
            state.pop(f"{name}.weight", None)
    if is_launch_rank_zero():
        student.save_pretrained(target, state_dict=state)
        tokenizer.save_pretrained(target)


def _close_logger(logger, status: str, error: str | None = None) -> None:
    """Give the MLflow run its final status once (FINISHED only when everything is done)."""
    if logger is not None and hasattr(logger, "close"):
        if error is not None and hasattr(logger, "closed_with"):
            logger.close(status, error=error)
        else:
            logger.close(status)


def dry_run(cfg: DictConfig) -> dict[str, Any]:
    """Compose and check one job without loading a model or writing anything; print one line.

    The settings are validated as in a run (a bad one: :class:`ConfigError`); what the files
    and stores it names look like on this machine (:data:`opd_lit.validate.ON_DISK`) is
    printed after the line, not an error, since a sweep meant for a cluster is often
    dry-run where its models and data are not: one problem a line for a single job, the keys
    on one line for each job of a multirun."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from hydra.utils import get_class

    from opd_lit.sweep import describe_job
    from opd_lit.validate import CHECKS, ON_DISK, check_config, validate_config

    validate_config(cfg, skip=ON_DISK)
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    get_class(cfg.method._target_)  # the method class imports
    line = f"{describe_job(cfg)}  |  {placement(cfg)}"
    print(line, flush=True)
    on_disk = check_config(cfg, skip=tuple(c.name for c in CHECKS if c.name not in ON_DISK))
    if on_disk and HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        keys = ", ".join(dict.fromkeys(p.key for p in on_disk))
        print(f"    on this machine: {len(on_disk)} problem(s) with {keys} (dry-run the job alone to see each)",
              flush=True)
    else:
        for problem in on_disk:
            print(f"    on this machine: {problem}", flush=True)
    return {"dry_run": True, "job": line, "on_disk_problems": [str(p) for p in on_disk]}


def placement(cfg: DictConfig) -> str:
    """How the job spreads over processes: ranks, strategy, and each rank's share of the
    global batch (``rollout.prompts_per_step``)."""
    t = cfg.trainer
    devices, nodes = t.get("devices", 1), int(t.get("num_nodes", 1) or 1)
    strategy = str((t.get("strategy") or {}).get("_target_", "single")).rsplit(".", 1)[-1] if isinstance(
        t.get("strategy"), DictConfig) else str(t.get("strategy") or "single")
    prompts = int(cfg.rollout.prompts_per_step)
    if not isinstance(devices, int):
        return f"{strategy}: devices={devices} x {nodes} node(s), {prompts} prompts per step in all"
    ranks = devices * nodes
    share = f"{prompts // ranks}" if prompts % ranks == 0 else f"{prompts}/{ranks} (not a whole number: refused)"
    return f"{strategy}: {ranks} rank(s) = {nodes} node(s) x {devices} device(s), {share} prompts per rank of {prompts}"


def print_summary(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"opd_lit: {summary['method']} (seed {summary['seed']})")
    table.add_column("what")
    table.add_column("value", justify="right")
    for row in summary["eval"]:
        for key, value in row.items():
            if key != "step":
                table.add_row(f"{key} @ step {row['step']}", f"{value:.3f}")
    table.add_row("steps", str(summary["steps"]))
    table.add_row("wall time", f"{summary['wall_s']:.1f} s")
    if "mlflow_run_id" in summary:
        table.add_row("MLflow run", summary["mlflow_run_id"])
    table.add_row("output", summary["output_dir"])
    Console().print(table)


# Errors that are the user's input or a run's state, not a bug: printed as their message alone
# (one line per problem), without a traceback unless HYDRA_FULL_ERROR=1.
USER_ERRORS = ("ConfigError", "RankZeroError", "JobConflictError", "JobLockedError", "ResumeError", "TrackingStoreError",
               "TrackingUnreachableError", "DataConfigError", "ModelPathError", "NonFiniteError",
               "DivergenceError", "CheckpointError", "ToyAssetError", "VLLMUnavailable")


class RunError(CompactHydraException):
    """A user-facing error, printed by Hydra as its message alone."""


def user_error_message(exc: BaseException) -> str | None:
    """``Type: message`` of a user-facing error (see :data:`USER_ERRORS`), else None."""
    from hydra.errors import InstantiationException

    if isinstance(exc, InstantiationException) and isinstance(exc.__cause__, ValueError):
        exc = exc.__cause__  # a method class rejecting one of its keys (method.lam, ...)
        return f"{type(exc).__name__}: {exc}"
    if any(c.__name__ in USER_ERRORS for c in type(exc).__mro__):
        return f"{type(exc).__name__}: {exc}"
    return None


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> dict[str, Any]:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_logs()
    launcher_env = {k: os.environ.get(k) for k in LAUNCH_ENV}
    try:
        return run(cfg)
    except KeyboardInterrupt:  # Ctrl-C before training started (during it: exit 130 already)
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print("[opd_lit] interrupted (Ctrl-C)", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    except Exception as e:
        message = user_error_message(e)
        if message is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            print(f"[opd_lit] job failed: {message}", file=sys.stderr, flush=True)  # the sweep goes on
        raise RunError(message) from None
    finally:
        end_process_group(launcher_env)


def quiet_logs() -> None:
    """One line per event that matters: progress lives in the rich bar, results in the summary
    table, details at DEBUG (``hydra.verbose=opd_lit`` shows them). Libraries speak at WARNING
    (Lightning's device banner and tips, MLflow's store messages, transformers' loading bars),
    and ranks other than 0 only at WARNING."""
    import warnings

    import transformers

    transformers.utils.logging.disable_progress_bar()
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # read when datasets is imported
    transformers.utils.logging.set_verbosity_warning()
    for name in ("lightning.pytorch", "lightning.fabric", "mlflow", "alembic", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*is deprecated")
    if not is_launch_rank_zero():
        logging.getLogger("opd_lit").setLevel(logging.WARNING)


# What Lightning's launcher writes into the environment of the process that starts the ranks;
# left there, the next job of a multirun would believe its ranks were started externally.
LAUNCH_ENV = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT", PLAN_ENV)


def end_process_group(launcher_env: dict[str, str | None]) -> None:
    """Close this job's process group and give the environment back as it was, so that a
    multirun's next job starts its own ranks."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for k, v in launcher_env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


if __name__ == "__main__":
    main()
