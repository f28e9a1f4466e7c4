"""Multi-process training on the CPU (gloo): DDP and FSDP2 runs of the real entry point, the
1-vs-2-process equivalence of an update, a SIGKILL of a 2-process run and its resume, and the
per-rank split of the paper presets. Few and short: every run is 2 processes on 2 cores."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from e2e import compose_cfg, mlflow_runs
from reliability_kit import checkpoint_steps, env, pair_overrides, step_metrics, tiny_pair, wait_for  # noqa: F401

from opd_lit.data.datamodule import StepBatchSampler

# The names a 1-process run logs every step; a 2-process run must log the same.
STEP_METRICS = (
    "train/loss", "train/grad_norm", "train/adv_mean", "train/kept_frac", "rollout/response_len_mean",
    "rollout/accuracy", "teacher/logp_mean", "student/logp_mean", "release/accepted_frac",
    "time/rollout_s", "time/update_s", "rollout/sync_s",
)
TOY = [
    "method=release_bic", "trainer.max_steps=3", "rollout.prompts_per_step=8", "rollout.greedy=true",
    "data.num_train=64", "eval.at_start=false", "eval.at_end=false", "eval.teacher_at_start=false",
    "diagnostics.enabled=false", "progress=false", "checkpoint.every_n_steps=0", "export.final_model=true",
]
CPU2 = ["trainer.accelerator=cpu", "trainer.devices=2"]


def launch(cwd: Path, args: list[str], **kw) -> subprocess.Popen:
    cwd.mkdir(parents=True, exist_ok=True)
    log = open(cwd / f"log-{time.time_ns()}.txt", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "opd_lit.train", *args], cwd=cwd, env=env(), stdout=log,
        stderr=subprocess.STDOUT, text=True, start_new_session=True, **kw,
    )
    proc.log_path = log.name
    return proc


def finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    code = proc.wait(timeout)
    text = Path(proc.log_path).read_text()
    assert code == 0, text[-4000:]
    return text


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run_dir / "student_final" / "model.safetensors")


@pytest.mark.slow
def test_ddp_and_fsdp_give_the_one_process_update_and_log_like_it(tmp_path):
    """3 greedy toy steps with 1 process, DDP over 2 and FSDP2 over 2: the same rollouts, so
    the same losses, gradient norms and final weights (to float tolerance), and one FINISHED
    MLflow run each with every metric of a 1-process run."""
    db = tmp_path / "mlflow.db"
    mlflow_runs(db)  # the tables once, before several processes open the store
    common = [*TOY, f"logger.tracking_uri=sqlite:///{db}"]
    setups = {
        "one": [],
        "ddp": ["trainer=ddp", *CPU2],
        "fsdp": ["trainer=fsdp", *CPU2],
    }
    for name, extra in setups.items():
        finish(launch(tmp_path / name, [*common, *extra, f"experiment_name={name}",
                                        f"output_dir={tmp_path / name / 'out'}",
                                        f"checkpoint.dir={tmp_path / name / 'ck'}"]))
    client, _ = mlflow_runs(db, "one")
    figures = {}
    for name in ("ddp", "fsdp"):
        _, runs = mlflow_runs(db, name)
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
        assert runs[0].data.tags["world_size"] == "2"
        for key in STEP_METRICS:
            assert sorted(step_metrics(db, key, name)) == [0, 1, 2], (name, key)
        dl = max(abs(step_metrics(db, "train/loss", name)[s] - step_metrics(db, "train/loss", "one")[s]) for s in range(3))
        dg = max(abs(step_metrics(db, "train/grad_norm", name)[s] - step_metrics(db, "train/grad_norm", "one")[s])
                 for s in range(3))
        a, b = weights(tmp_path / "one" / "out"), weights(tmp_path / name / "out")
        assert set(a) == set(b)
        dw = max(float((a[k] - b[k]).abs().max()) for k in a)
        figures[name] = {"max_abs_d_loss": dl, "max_abs_d_grad_norm": dg, "max_abs_d_weight": dw}
    print("\n1-vs-2-process equivalence:", json.dumps(figures))
    for f in figures.values():
        # lr 1e-4: each Adam step moves a weight by up to ~1e-4 (3e-4 over the run); the float
        # noise of a different reduction order is ~1e-6 in the gradient, which Adam's m/√v
        # enlarges on weights whose gradient is near 0 (measured: 2e-5)
        assert f["max_abs_d_loss"] < 1e-5 and f["max_abs_d_grad_norm"] < 1e-4, figures
        assert f["max_abs_d_weight"] < 5e-5, figures


@pytest.mark.slow
def test_a_killed_two_process_run_resumes_into_the_same_mlflow_run(tmp_path, tiny_pair):  # noqa: F811
    steps = 5
    db = tmp_path / "mlflow.db"
    mlflow_runs(db)
    args = [*pair_overrides(*tiny_pair), f"trainer.max_steps={steps}", "rollout.max_new_tokens=8",
            "rollout.prompts_per_step=4", "checkpoint.every_n_steps=1", "trainer=fsdp", *CPU2,
            f"logger.tracking_uri=sqlite:///{db}", "hydra.run.dir=run", "checkpoint.dir=ck"]
    victim = launch(tmp_path, args)
    assert wait_for(lambda: any(s >= 2 for s in checkpoint_steps(tmp_path / "ck")), 600, victim), \
        Path(victim.log_path).read_text()[-3000:]
    os.killpg(victim.pid, signal.SIGKILL)  # every rank at once, as a preemption would
    victim.wait(30)
    logged = sorted(step_metrics(db, "train/loss"))
    resumed = finish(launch(tmp_path, args))
    assert "resuming it from the checkpoint at step" in resumed, resumed[-2000:]
    start = int(resumed.split("resuming it from the checkpoint at step ")[1].split()[0])
    _, runs = mlflow_runs(db)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert sorted(step_metrics(db, "train/loss")) == list(range(steps))
    lost = max(0, (max(logged) + 1 if logged else 0) - start)
    print("\n2-process SIGKILL/resume:", json.dumps({"logged_at_kill": logged, "resumed_from": start, "steps_redone": lost}))
    assert start >= 2 and lost <= 1


def test_each_rank_samples_a_disjoint_share_of_the_same_global_batch():
    one = StepBatchSampler(50, 8, 4, seed=3)
    shares = [StepBatchSampler(50, 8, 4, seed=3, rank=r, world_size=4) for r in range(4)]
    for step in range(4):
        parts = [s.batch(step) for s in shares]
        assert sum(parts, []) == one.batch(step) and all(len(p) == 2 for p in parts)
    with pytest.raises(ValueError, match=r"rollout.prompts_per_step=6 .* multiple of 4"):
        StepBatchSampler(50, 6, 4, seed=3, world_size=4)


@pytest.mark.parametrize("preset", ["paper_1p7b", "paper_4b", "paper_8b"])
def test_paper_presets_on_8_devices_give_128_prompts_per_rank(tmp_path, preset, capsys):
    from opd_lit.train import run

    cfg = compose_cfg(tmp_path, f"experiment={preset}", "trainer.devices=8", "dry_run=true", fast=False)
    line = run(cfg)["job"]
    assert "FSDP2Strategy: 8 rank(s) = 1 node(s) x 8 device(s), 128 prompts per rank of 1024" in line, line


def test_hydra_children_run_only_their_own_job(monkeypatch):
    """Lightning's launcher re-runs sys.argv; in a multirun that would start the whole sweep
    again in every rank. The rank command names this job's overrides and directory only."""
    from types import SimpleNamespace

    import hydra.core.hydra_config as hc_mod
    import hydra.utils

    from opd_lit import train

    fake = SimpleNamespace(overrides=SimpleNamespace(task=["method=opd", "seed=1"]),
                           runtime=SimpleNamespace(output_dir="/tmp/multirun/3-opd-s1"))
    monkeypatch.setattr(hc_mod.HydraConfig, "get", staticmethod(lambda: fake))
    monkeypatch.setattr(hydra.utils, "get_original_cwd", lambda: "/work")
    monkeypatch.setattr(sys, "argv", ["train.py", "-m", "--config-dir", "sweeps", "--config-name", "table1",
                                      "method=opd,exopd", "seed=0,1"])
    cmd, cwd = train.rank_command(1)
    assert cmd[1:3] == ["-m", "opd_lit.train"] and cwd == "/work"
    assert cmd[3:7] == ["--config-dir", "sweeps", "--config-name", "table1"]
    assert "method=opd" in cmd and "seed=1" in cmd and "method=opd,exopd" not in cmd and cmd.count("-m") == 1
    assert 'hydra.run.dir="/tmp/multirun/3-opd-s1"' in cmd and "hydra.output_subdir=null" in cmd
