"""Helpers for tests that compose the real conf/ and run the real entry points."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from opd_lit.train import CONF_DIR

REPO = Path(__file__).resolve().parents[1]

# Small enough for a 2-core CI machine, large enough to exercise every stage.
FAST = [
    "trainer.max_steps=2",
    "rollout.prompts_per_step=8",
    "data.num_train=64",
    "eval.num_problems=16",
    "eval.teacher_at_start=false",
    "progress=false",
    "export.final_model=false",
]


def compose_cfg(tmp_path: Path, *overrides: str, fast: bool = True):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(
            config_name="config",
            overrides=[
                *(FAST if fast else []),
                f"output_dir={tmp_path / 'run'}",
                f"logger.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
                f"checkpoint.dir={tmp_path / 'checkpoints'}/${{job_key:}}",
                *overrides,
            ],
        )


def run_module(module: str, *args: str, cwd: Path, env: dict | None = None, timeout: int = 600):
    full_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout,
    )


def mlflow_runs(db: Path, experiment: str = "opd_lit"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return client, []
    return client, client.search_runs([exp.experiment_id])
