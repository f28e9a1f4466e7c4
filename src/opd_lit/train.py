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
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from opd_lit.data import RolloutDataModule
from opd_lit.eval.callback import EvalCallback
from opd_lit.progress import StageProgressBar
from opd_lit.teacher import TeacherCallback
from opd_lit.tracking import build_loggers

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
log = logging.getLogger("opd_lit.train")


def output_dir(cfg: DictConfig) -> Path:
    if cfg.get("output_dir"):
        path = Path(cfg.output_dir)
    elif HydraConfig.initialized():
        path = Path(HydraConfig.get().runtime.output_dir)
    else:
        path = Path("outputs") / time.strftime("%Y-%m-%d/%H-%M-%S")
    path.mkdir(parents=True, exist_ok=True)
    return path


def build(cfg: DictConfig, out: Path):
    """Instantiate everything a run needs, without running it."""
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
    callbacks = [teacher, evaluation]
    if cfg.get("progress", True):
        callbacks.append(StageProgressBar())
    loggers = build_loggers(cfg, out)
    trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers, default_root_dir=str(out),
        enable_progress_bar=bool(cfg.get("progress", True)),
    )
    return datamodule, module, trainer


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train one configuration; returns a summary (also what the multirun sweeper sees)."""
    if cfg.get("dry_run"):
        return dry_run(cfg)
    out = output_dir(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    t0 = time.perf_counter()
    datamodule, module, trainer = build(cfg, out)
    trainer.fit(module, datamodule=datamodule)
    evaluation = next(c for c in trainer.callbacks if isinstance(c, EvalCallback))
    summary: dict[str, Any] = {
        "method": cfg.method.name,
        "seed": cfg.seed,
        "steps": trainer.global_step,
        "wall_s": round(time.perf_counter() - t0, 1),
        "output_dir": str(out),
        "eval": evaluation.history,
    }
    logger = trainer.loggers[0] if trainer.loggers else None
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
    print_summary(summary)
    return summary


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
