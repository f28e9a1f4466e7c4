"""Entry point: ``python -m opd_lit.evaluate [overrides]`` (Hydra, ``conf/evaluate.yaml``).

Evaluates one model on the benchmarks of an ``eval=`` config, with the same rollout engines
as training, or re-grades saved responses without loading a model::

    python -m opd_lit.evaluate model.path=/models/qwen3-1.7b eval=math5
    python -m opd_lit.evaluate model.path=toy:student eval=toy
    python -m opd_lit.evaluate run_id=<mlflow run> eval=gpqa          # the run's trained student
    python -m opd_lit.evaluate eval=math500 responses=samples.jsonl   # re-grade, no model

Writes MLflow metrics (``eval/<benchmark>/score``, ``eval/math5_avg``, ...), the per-sample
JSONL artifact (``eval/<benchmark>/samples.jsonl``) and prints a table. With ``run_id=`` the
metrics go into that (training) run, at its last step; otherwise into a new run of
``experiment_name``. The output directory (``output_dir``) gets ``samples.jsonl`` and
``scores.json``, and Hydra's own files: nothing is written anywhere else.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from opd_lit.eval.harness import EvalResult, Evaluator, parse_eval_config, print_result
from opd_lit.settings import run_output_dir

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
log = logging.getLogger("opd_lit.evaluate")

FINAL_MODEL_TAG = "final_model_dir"


def output_dir(cfg: DictConfig) -> Path:
    return run_output_dir(cfg, "outputs/eval")


def _client(cfg: DictConfig):
    from opd_lit.tracking import mlflow_client  # the same URI rules as training

    return mlflow_client(cfg.logger.get("tracking_uri"))


def model_from_run(client, run_id: str) -> str:
    """The trained student a training run saved (its ``final_model_dir`` tag)."""
    run = client.get_run(run_id)
    path = run.data.tags.get(FINAL_MODEL_TAG)
    if not path:
        raise ValueError(
            f"run_id={run_id}: the run has no {FINAL_MODEL_TAG!r} tag (it saves one when trained "
            f"with export.final_model=true); give model.path=<dir> instead"
        )
    if not Path(path).is_dir():
        raise FileNotFoundError(f"run_id={run_id}: its {FINAL_MODEL_TAG} {path!r} does not exist here")
    return path


def template_kwargs_from_run(client, run_id: str) -> dict[str, Any]:
    """The chat-template arguments the run's student was trained with (its logged
    ``student.template_kwargs.*`` params, e.g. ``enable_thinking``), so it is evaluated alike."""
    import yaml

    prefix = "student.template_kwargs."
    params = client.get_run(run_id).data.params
    return {k[len(prefix):]: yaml.safe_load(v) for k, v in params.items() if k.startswith(prefix)}


def _last_step(client, run_id: str) -> int:
    """The step training ended at (train.py logs time/wall_s there), else the latest step seen."""
    history = client.get_metric_history(run_id, "time/wall_s")
    if history:
        return max(m.step for m in history)
    run = client.get_run(run_id)
    steps = [0]
    for key in list(run.data.metrics)[:50]:
        steps.extend(m.step for m in client.get_metric_history(run_id, key))
    return max(steps)


def resolve_device(name: str | None) -> str:
    import torch

    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def generate_and_grade(cfg: DictConfig, evaluator: Evaluator, model_path: str,
                       template_kwargs: dict[str, Any] | None = None) -> EvalResult:
    from opd_lit.models import end_of_turn_ids, freeze, load_causal_lm, load_tokenizer
    from opd_lit.rollout import build_engine

    device = resolve_device(cfg.model.get("device"))
    dtype = cfg.model.get("dtype") or "auto"
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    tokenizer = load_tokenizer(model_path, "model.path")
    model = freeze(load_causal_lm(
        model_path, dtype=dtype, attn_implementation=cfg.model.get("attn_implementation", "sdpa"),
        device=device, key="model.path",
    ))
    eos_ids = end_of_turn_ids(tokenizer, model_path)
    extra = cfg.rollout.get("engine_options")
    options = dict(OmegaConf.to_container(extra, resolve=True)) if extra else {}
    if cfg.rollout.engine == "hf":
        # The harness already bounds a call to eval.batch_sequences sequences: one generate
        # per call (on the toy, 256 prompts at once run 2x faster than 4 x 64).
        batch = max(int(cfg.rollout.get("gen_batch_size", 64)), evaluator.settings.batch_sequences)
        options.setdefault("batch_size", batch)
    elif options.get("max_model_len") is None:
        # vLLM: room for the longest prompt and the largest evaluation budget.
        budget = max(evaluator.sampling_params(b.spec).max_new_tokens for b in evaluator.benchmarks.values())
        options["max_model_len"] = int(cfg.rollout.get("max_prompt_tokens", 2048)) + budget
    engine = build_engine(cfg.rollout.engine, model, pad_id=tokenizer.pad_token_id, eos_ids=eos_ids, **options)
    kwargs = cfg.model.get("template_kwargs")
    template_kwargs = {**(template_kwargs or {}), **(OmegaConf.to_container(kwargs, resolve=True) if kwargs else {})}
    if template_kwargs:
        log.info("chat template arguments: %s", template_kwargs)
    return evaluator.evaluate(engine, tokenizer, eos_ids, template_kwargs)


def log_to_mlflow(cfg: DictConfig, result: EvalResult, model_label: str, mode: str,
                  eval_cfg: dict[str, Any], isolation: str | None = None) -> str:
    from mlflow.entities import Metric, Param

    from opd_lit.tracking import flatten

    client = _client(cfg)
    run_id = cfg.get("run_id")
    now = int(time.time() * 1000)
    if run_id:
        step = cfg.get("step") if cfg.get("step") is not None else _last_step(client, run_id)
    else:
        step = cfg.get("step") or 0
        exp = client.get_experiment_by_name(cfg.experiment_name)
        exp_id = exp.experiment_id if exp is not None else client.create_experiment(cfg.experiment_name)
        name = cfg.logger.get("run_name") or f"eval-{Path(model_label).name or model_label}"
        run_id = client.create_run(
            exp_id, run_name=name,
            tags={"kind": "evaluate", "model": model_label, "eval.mode": mode,
                  "eval.benchmarks": ",".join(result.results)},
        ).info.run_id
        params = {f"eval.{k}": v for k, v in flatten(eval_cfg).items()}
        params["model.path"] = model_label
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            client.log_batch(run_id, params=items[i : i + 100])
    metrics = [Metric(k, float(v), now, int(step)) for k, v in result.metrics().items()]
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i : i + 1000])
    if eval_cfg.get("save_samples", True):
        for name, r in result.results.items():
            client.log_text(run_id, r.samples_jsonl(), f"eval/{name}/samples.jsonl")
    client.set_tag(run_id, "eval.last", f"{mode}: {','.join(result.results)} ({model_label})")
    if isolation is not None:
        client.set_tag(run_id, "eval.isolation", isolation)
    if not cfg.get("run_id"):
        client.set_terminated(run_id)
    return run_id


def run(cfg: DictConfig) -> dict[str, Any]:
    out = output_dir(cfg)
    eval_cfg = OmegaConf.to_container(cfg.eval, resolve=True)
    evaluator = Evaluator(parse_eval_config(eval_cfg))
    t0 = time.perf_counter()
    if cfg.get("responses"):
        if cfg.model.get("path"):
            log.warning("responses=%s given: re-grading; model.path=%s is not loaded", cfg.responses, cfg.model.path)
        mode, model_label = "regrade", str(cfg.responses)
        result = evaluator.regrade(cfg.responses)
    else:
        model_path, run_kwargs = cfg.model.get("path"), {}
        if not model_path:
            if not cfg.get("run_id"):
                raise ValueError("give model.path=<local HF dir | toy:student | toy:teacher>, "
                                 "run_id=<mlflow run>, or responses=<file>")
            client = _client(cfg)
            model_path = model_from_run(client, cfg.run_id)
            run_kwargs = template_kwargs_from_run(client, cfg.run_id)
        mode, model_label = "generate", str(model_path)
        result = generate_and_grade(cfg, evaluator, model_path, run_kwargs)
    wall = time.perf_counter() - t0

    (out / "samples.jsonl").write_text(result.samples_jsonl(), encoding="utf-8")
    isolation = evaluator.sandbox.isolation.describe() if evaluator.sandbox is not None else None
    summary: dict[str, Any] = {
        "mode": mode,
        "model": model_label,
        "metrics": result.metrics(),
        "wall_s": round(wall, 2),
        "output_dir": str(out),
    }
    if isolation is not None:
        summary["isolation"] = isolation
    if cfg.logger.kind == "mlflow":
        summary["mlflow_run_id"] = log_to_mlflow(cfg, result, model_label, mode, eval_cfg, isolation)
    (out / "scores.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    title = f"opd_lit.evaluate: {model_label}"
    if "mlflow_run_id" in summary:
        title += f" -> MLflow run {summary['mlflow_run_id']}"
    print_result(result, title)
    summary["result"] = result
    return summary


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run(cfg)


if __name__ == "__main__":
    main()
