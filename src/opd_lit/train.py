"""Entry point: ``python -m opd_lit.train [overrides]`` (Hydra; ``-m`` for multirun sweeps).

Composes the run from ``conf/`` and instantiates DataModule, method, callbacks, logger and
trainer; holds no science of its own.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
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
from opd_lit.tracking import build_loggers, check_tracking_reachable, tracking_uri

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
    """Train one configuration; returns a summary (also what the multirun sweeper sees)."""
    if cfg.get("dry_run"):
        return dry_run(cfg)
    from opd_lit.jobs import plan_job, set_run_status
    from opd_lit.validate import validate_config

    # 1. Bad input fails here, before anything is written or loaded.
    validate_config(cfg)
    if cfg.logger.kind == "mlflow":
        check_tracking_reachable(tracking_uri(cfg.logger.get("tracking_uri")))
    # 2. Skip, resume or run this job (MLflow runs tagged with its key, its checkpoints).
    key = job_key(cfg)
    external = join_external_group()  # torchrun / SLURM started every rank: plan on rank 0 alone
    leader = is_launch_rank_zero()
    plan = plan_from_env(cfg, key) if not leader else None
    if external:
        plan = broadcast_from_rank_zero(lambda: plan_job(cfg, key))
    elif plan is None:
        plan = plan_job(cfg, key)
    if leader:
        print(f"[opd_lit] {plan.reason}", flush=True)
    if plan.action == "skip":
        return plan.summary
    if not leader:
        pass  # the other ranks of a job only read: rank 0 owns its files and MLflow runs
    elif plan.action == "run":
        from opd_lit.checkpoint import CheckpointStore

        store = CheckpointStore((cfg.get("checkpoint") or {}).get("dir") or f"checkpoints/{key}", key)
        if store.has_any() or store.finished():
            if cfg.get("force") or cfg.get("resume") in (False, "false"):
                dropped = store.clear()
                log.warning("job %s: removed %d checkpoint(s) of an earlier attempt (starting afresh)", key, dropped)
            elif store.has_any():  # not ours to continue, not ours to delete: keep them out of the way
                moved = store.set_aside()
                log.warning(
                    "job %s: checkpoints of an MLflow run that is not in this tracking store moved to %s "
                    "(resume=true checkpoint.dir=%s would continue from them)", key, moved, moved,
                )
    uri = tracking_uri(cfg.logger.get("tracking_uri"))
    for stale in plan.stale_runs if leader else ():  # unfinished runs of this job that nothing will resume
        try:
            set_run_status(uri, stale, "FAILED")
        except Exception as e:  # noqa: BLE001
            log.warning("could not mark stale MLflow run %s FAILED: %s", stale, e)
    if external:
        import torch.distributed as dist

        dist.barrier()  # rank 0 has acted on the plan; the others read from here on

    out = output_dir(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    t0 = time.perf_counter()
    datamodule, module, trainer = build(cfg, out, plan=plan)
    if leader and trainer.world_size > 1:
        plan_to_env(plan)  # Lightning's launcher starts the other ranks with this environment
        use_rank_command()
    logger = trainer.loggers[0] if trainer.loggers else None
    ckpt = next(c for c in trainer.callbacks if type(c).__name__ == "CheckpointCallback")
    try:
        try:
            trainer.fit(module, datamodule=datamodule)
        except BaseException:
            _close_logger(logger, "KILLED" if ckpt.interrupted else "FAILED")
            if ckpt.interrupted:
                saved = ckpt.last_saved
                where = f"checkpoint at step {saved.step}: {saved.path}" if saved else "no checkpoint"
                print(
                    f"[opd_lit] stopped by {ckpt.interrupted} after step {trainer.global_step} "
                    f"({where}); the MLflow run is marked KILLED. Run the same command again "
                    "to resume it.", flush=True,
                )
                raise SystemExit(130 if ckpt.interrupted == "SIGINT" else 143) from None
            raise
        finally:
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
        ckpt.store.mark_finished(
            {k: v for k, v in summary.items() if k != "eval"},
            keep_checkpoints=bool((cfg.get("checkpoint") or {}).get("keep_on_finish", False)),
            marker=cfg.logger.kind != "mlflow",  # with MLflow, the run's status says it
        )
    except BaseException:
        _close_logger(logger, "FAILED")  # no-op when the run already has its final status
        raise
    _close_logger(logger, "FINISHED")
    print_summary(summary)
    return summary


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


def _close_logger(logger, status: str) -> None:
    """Give the MLflow run its final status once (FINISHED only when everything is done)."""
    if logger is not None and hasattr(logger, "close"):
        logger.close(status)


def dry_run(cfg: DictConfig) -> dict[str, Any]:
    """Compose and check one job without loading a model; print one line."""
    from hydra.utils import get_class

    from opd_lit.sweep import describe_job

    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    get_class(cfg.method._target_)  # the method class imports
    line = f"{describe_job(cfg)}  |  {placement(cfg)}"
    print(line, flush=True)
    return {"dry_run": True, "job": line}


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


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> dict[str, Any]:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_logs()
    launcher_env = {k: os.environ.get(k) for k in LAUNCH_ENV}
    try:
        return run(cfg)
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
