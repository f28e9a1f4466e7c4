"""Entry point: ``python -m opd_lit.train [overrides]`` (Hydra; ``-m`` for multirun sweeps).

Composes the run from ``conf/`` and instantiates DataModule, method, callbacks, logger and
trainer; holds no science of its own.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from opd_lit.data import RolloutDataModule
from opd_lit.diagnostics import diagnostics_callbacks
from opd_lit.eval.callback import EvalCallback
from opd_lit.jobs import job_key  # noqa: F401 - registers the ${job_key:} resolver
from opd_lit.progress import StageProgressBar
from opd_lit.settings import run_output_dir
from opd_lit.teacher import TeacherCallback
from opd_lit.tracking import build_loggers, check_tracking_reachable, tracking_uri

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
log = logging.getLogger("opd_lit.train")


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
        module.load_state_dict(payload["module"])
        datamodule.start_step = int(payload["step"])
        datamodule.load_state_dict(payload.get("datamodule", {}))
        run_id = plan.run_id
        # The at-start evaluations belong to step 0; a resumed run does not repeat them.
        for cb in callbacks:
            for attr in ("at_start", "teacher_at_start"):
                if isinstance(getattr(cb, attr, None), bool):
                    setattr(cb, attr, False)
        log.info("resuming job %s at step %d from %s", key, info.step, info.path)
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
    plan = plan_job(cfg, key)
    print(f"[opd_lit] {plan.reason}", flush=True)
    if plan.action == "skip":
        return plan.summary
    if plan.action == "run":
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
    for stale in plan.stale_runs:  # unfinished runs of this job that nothing will resume
        try:
            set_run_status(uri, stale, "FAILED")
        except Exception as e:  # noqa: BLE001
            log.warning("could not mark stale MLflow run %s FAILED: %s", stale, e)

    out = output_dir(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    t0 = time.perf_counter()
    datamodule, module, trainer = build(cfg, out, plan=plan)
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
            module.student.save_pretrained(target)
            datamodule.student_tokenizer.save_pretrained(target)
            summary["final_model"] = str(target)
            if logger is not None and hasattr(logger, "run_id"):
                logger.experiment.set_tag(logger.run_id, "final_model_dir", str(target.resolve()))
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
    line = describe_job(cfg)
    print(line, flush=True)
    return {"dry_run": True, "job": line}


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
    return run(cfg)


if __name__ == "__main__":
    main()
