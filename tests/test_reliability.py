"""Fault tests on real (tiny, random) models: SIGKILL and resume, Ctrl-C, NaN injection, a full
disk while checkpointing, empty responses. The pieces that need no model are in
test_reliability_units.py, the config checks in test_validate.py."""

from __future__ import annotations

import json
import math
import signal
import time
from pathlib import Path

import pytest
import torch
from e2e import compose_cfg
from reliability_kit import (  # noqa: F401 - tiny_pair is a fixture
    checkpoint_steps,
    kill,
    output,
    pair_overrides,
    start,
    step_metrics,
    tiny_pair,
    wait_for,
)

COMPARED = ["train/loss", "train/adv_mean", "train/grad_norm", "rollout/response_len_mean",
            "teacher/logp_mean", "student/logp_mean", "train/kept_frac", "train/lr"]


def mlflow_run(db: Path, experiment: str = "opd_lit"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id]) if exp else []
    return client, runs


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_matches_an_uninterrupted_run(tmp_path, tiny_pair):  # noqa: F811
    steps = 6
    args = [*pair_overrides(*tiny_pair), f"trainer.max_steps={steps}", "rollout.max_new_tokens=8",
            "checkpoint.every_n_steps=1", "hydra.run.dir=run"]
    clean_dir, main_dir = tmp_path / "clean", tmp_path / "main"
    db = tmp_path / "mlflow.db"  # one store, two experiments: the clean run and the killed one
    t0 = time.monotonic()
    mlflow_run(db)  # create the tables once, before two processes open the store
    clean = start(tmp_path, clean_dir, [*args, f"logger.tracking_uri=sqlite:///{db}", "experiment_name=clean"])
    args = [*args, f"logger.tracking_uri=sqlite:///{db}", "experiment_name=main"]
    victim = start(tmp_path, main_dir, args, delay=0.4)

    def ckpts():
        dirs = [d for d in (main_dir / "checkpoints").glob("*") if d.is_dir()]  # not the job's .lock file
        return checkpoint_steps(dirs[0]) if dirs else []

    assert wait_for(lambda: any(s >= 3 for s in ckpts()), 600, victim), output(victim)[-3000:]
    time.sleep(0.3)  # into the next step: its rollout is done, its update is not
    kill(victim, signal.SIGKILL)
    victim.wait(30)
    killed_at = time.monotonic() - t0
    logged_before = sorted(step_metrics(db, "train/loss", "main"))
    on_disk = ckpts()

    resumed = start(tmp_path, main_dir, args)
    assert resumed.wait(600) == 0, output(resumed)[-3000:]
    assert clean.wait(600) == 0, output(clean)[-3000:]
    log = output(resumed)
    assert "resuming it from the checkpoint at step" in log, log[-2000:]
    resumed_from = int(log.split("resuming it from the checkpoint at step ")[1].split()[0])

    client, runs = mlflow_run(db, "main")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # the same MLflow run, continued
    diffs = {}
    for key in COMPARED:
        a, b = step_metrics(db, key, "clean"), step_metrics(db, key, "main")
        assert sorted(a) == sorted(b) == list(range(steps)), (key, a, b)
        diffs[key] = max(abs(a[s] - b[s]) for s in a)
    worst = max(diffs.values())
    redone = max(0, (max(logged_before) + 1 if logged_before else 0) - resumed_from)
    report = {
        "checkpoints_at_kill": on_disk, "steps_logged_at_kill": len(logged_before),
        "resumed_from_step": resumed_from, "completed_steps_redone": redone,
        "max_abs_metric_diff": worst, "per_metric": diffs, "wall_s": round(time.monotonic() - t0, 1),
        "killed_after_s": round(killed_at, 1),
    }
    print("\nSIGKILL/resume:", json.dumps(report))
    (tmp_path / "resume_report.json").write_text(json.dumps(report))
    assert resumed_from >= 3
    assert redone <= 1  # at most one step of work lost (the one being computed when killed)
    assert worst <= 1e-6, diffs


@pytest.mark.slow
def test_ctrl_c_checkpoints_marks_killed_and_exits_cleanly_then_resumes(tmp_path, tiny_pair):  # noqa: F811
    steps = 5
    db = tmp_path / "run" / "mlflow.db"
    ckpt = tmp_path / "ck"
    args = [*pair_overrides(*tiny_pair), f"trainer.max_steps={steps}", "rollout.max_new_tokens=8",
            "checkpoint.every_n_steps=2", f"checkpoint.dir={ckpt}", "hydra.run.dir=out",
            f"logger.tracking_uri=sqlite:///{db}", "method=opd"]
    proc = start(tmp_path, tmp_path / "run", args, delay=0.5)
    assert wait_for(lambda: 2 in checkpoint_steps(ckpt), 600, proc), output(proc)[-3000:]
    proc.send_signal(signal.SIGINT)
    rc = proc.wait(300)
    out = output(proc)
    assert rc == 130, out[-3000:]
    assert "Ctrl-C: finishing the current step" in out and "stopped by SIGINT" in out
    assert "Traceback" not in out, out[-3000:]
    on_disk = checkpoint_steps(ckpt)
    assert on_disk[-1] == 3, on_disk  # the step that was running when Ctrl-C came, checkpointed
    client, runs = mlflow_run(db)
    assert len(runs) == 1 and runs[0].info.status == "KILLED"
    assert runs[0].data.tags["error"].startswith("stopped by SIGINT after step 3 (checkpoint at step 3: ")
    run_id = runs[0].info.run_id
    assert sorted(step_metrics(db, "train/loss")) == [0, 1, 2]  # its metrics reached MLflow

    again = start(tmp_path, tmp_path / "run", [*args, "resume=true"])
    assert again.wait(600) == 0, output(again)[-3000:]
    assert "is KILLED; resuming it from the checkpoint at step 3" in output(again)
    client, runs = mlflow_run(db)
    assert [r.info.run_id for r in runs] == [run_id] and runs[0].info.status == "FINISHED"
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(steps))  # each step once
    assert not ckpt.exists()  # a finished job's checkpoints are removed (MLflow says it finished)


# ---- in-process runs with injected faults ----------------------------------------------


@pytest.fixture
def faults(monkeypatch):
    """Inject NaN teacher log-probs / empty responses at chosen steps; record the weights."""
    import opd_lit.step as step
    from opd_lit.rollout.base import Generation
    from opd_lit.rollout.hf import HFEngine
    from opd_lit.teacher import TeacherModels

    state = {"nan_steps": set(), "empty_all": set(), "empty_half": set(), "weights": {}, "step": None}
    orig_step, orig_score, orig_generate = step.run_step, TeacherModels.score, HFEngine.generate

    def run_step(module, records):
        state["step"] = s = module.trainer.global_step
        state["weights"][s] = [p.detach().clone() for p in module.student.parameters()]
        return orig_step(module, records)

    def score(self, batch, needs):
        orig_score(self, batch, needs)
        if state["step"] in state["nan_steps"]:
            batch.teacher_logprobs = torch.full_like(batch.teacher_logprobs, float("nan"))

    def generate(self, prompts, n, params):
        gen = orig_generate(self, prompts, n, params)
        if state["step"] in state["empty_all"]:
            return Generation(response_ids=[[] for _ in gen.response_ids])
        if state["step"] in state["empty_half"]:
            return Generation(response_ids=[r if i % 2 else [] for i, r in enumerate(gen.response_ids)])
        return gen

    monkeypatch.setattr(step, "run_step", run_step)
    monkeypatch.setattr(TeacherModels, "score", score)
    monkeypatch.setattr(HFEngine, "generate", generate)
    return state


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.slow
def test_nan_step_is_skipped_empty_responses_are_finite_and_a_full_disk_keeps_training(
    tmp_path, tiny_pair, faults, monkeypatch, caplog  # noqa: F811
):
    import errno

    from opd_lit.checkpoint import CheckpointStore
    from opd_lit.train import run

    faults["nan_steps"] = {1}
    faults["empty_all"] = {2}
    faults["empty_half"] = {3}
    real_save = torch.save
    saves = {"n": 0}

    def save(obj, f, *a, **k):  # the 2nd checkpoint write hits a full disk
        saves["n"] += 1
        if saves["n"] == 2:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr("opd_lit.checkpoint.torch.save", save)
    ckpt = tmp_path / "ck"
    cfg = compose_cfg(tmp_path, *pair_overrides(*tiny_pair), "trainer.max_steps=5", "rollout.max_new_tokens=8",
                      f"checkpoint.dir={ckpt}", "checkpoint.keep_on_finish=true", "checkpoint.keep_last=3")
    summary = run(cfg)
    assert summary["steps"] == 5 and summary["skipped_steps"] == 1

    w = faults["weights"]
    assert not same(w[0], w[1])  # step 0 trained
    assert same(w[1], w[2])  # step 1 (NaN advantage) skipped: weights unchanged
    # step 2 (all responses empty): nothing to learn, nothing broken (its weights: the test below)
    assert not same(w[3], w[4])  # step 3 (half empty) trained

    db = tmp_path / "mlflow.db"
    loss = step_metrics(db, "train/loss")
    assert math.isnan(loss[1]) and all(math.isfinite(loss[s]) for s in (0, 2, 3, 4))
    assert step_metrics(db, "train/skipped_steps") == {0: 0.0, 1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0}
    for key in ("train/adv_mean", "train/grad_norm", "rollout/response_len_mean", "teacher/logp_mean"):
        values = step_metrics(db, key)
        assert all(math.isfinite(values[s]) for s in (0, 2, 3, 4)), (key, values)
    assert step_metrics(db, "rollout/response_len_mean")[2] == 0.0

    # the failed write (step 2) left no trace; 1 and 3 are intact, 4 = max_steps is not saved
    assert checkpoint_steps(ckpt) == [1, 3, 4]
    store = CheckpointStore(ckpt, summary["job_key"])
    for step in checkpoint_steps(ckpt):
        store.verify(step)
    assert not list(ckpt.glob(".*tmp*"))
    assert step_metrics(db, "checkpoint/failures") == {1: 1.0}
    assert any("could not be written (the disk is full)" in r.getMessage() for r in caplog.records)
    _, runs = mlflow_run(db)
    assert runs[0].info.status == "FINISHED"


@pytest.mark.slow
def test_a_step_whose_responses_are_all_empty_changes_no_weight(tmp_path, tiny_pair, faults):  # noqa: F811
    from opd_lit.train import run

    faults["empty_all"] = {1}
    cfg = compose_cfg(tmp_path, *pair_overrides(*tiny_pair), "trainer.max_steps=3", "rollout.max_new_tokens=6",
                      "checkpoint.every_n_steps=0", "method=opd", "release.diagnose=false")
    assert run(cfg)["steps"] == 3
    w = faults["weights"]
    assert not same(w[0], w[1]) and same(w[1], w[2])


@pytest.mark.slow
def test_three_non_finite_steps_in_a_row_stop_the_run_with_a_clear_error(tmp_path, tiny_pair, faults):  # noqa: F811
    from opd_lit.methods.base import NonFiniteError
    from opd_lit.train import run

    faults["nan_steps"] = {1, 2, 3, 4}
    cfg = compose_cfg(tmp_path, *pair_overrides(*tiny_pair), "trainer.max_steps=6", "rollout.max_new_tokens=8",
                      f"checkpoint.dir={tmp_path / 'ck'}", "method=opd", "release.diagnose=false")
    with pytest.raises(NonFiniteError) as err:
        run(cfg)
    msg = str(err.value)
    assert "3 steps in a row had a non-finite advantage" in msg and "loss.max_skipped_in_a_row=3" in msg
    w = faults["weights"]
    assert same(w[1], w[2]) and same(w[2], w[3])  # none of the NaN steps changed the weights
    _, runs = mlflow_run(tmp_path / "mlflow.db")
    assert runs[0].info.status == "FAILED"
    assert runs[0].data.tags["error"] == f"NonFiniteError: {msg}"  # Lightning's own end of the run has no cause
    assert step_metrics(tmp_path / "mlflow.db", "train/skipped_steps") == {0: 0.0, 1: 1.0, 2: 2.0}
    assert checkpoint_steps(tmp_path / "ck")[-1] == 3  # the last good state is on disk


@pytest.mark.slow
def test_divergence_stop_after_ends_the_run_failed_with_every_diverged_step_in_mlflow(tmp_path, tiny_pair):  # noqa: F811
    from opd_lit.guards import DivergenceError
    from opd_lit.train import run

    # any real loss is above this bound: every step diverges, the 2nd in a row stops the run
    cfg = compose_cfg(tmp_path, *pair_overrides(*tiny_pair), "trainer.max_steps=4", "rollout.max_new_tokens=6",
                      "checkpoint.every_n_steps=0", "method=opd", "release.diagnose=false",
                      "divergence.max_abs_loss=1e-9", "divergence.stop_after=2")
    with pytest.raises(DivergenceError, match=r"^step 2: training diverged: \|loss\| = .* above divergence"
                                              r"\.max_abs_loss=1e-09; stopping \(divergence\.stop_after=2\)$") as err:
        run(cfg)
    db = tmp_path / "mlflow.db"
    _, (mlrun,) = mlflow_run(db)
    assert mlrun.info.status == "FAILED" and mlrun.data.tags["error"] == f"DivergenceError: {err.value}"
    assert step_metrics(db, "train/diverged") == {0: 1.0, 1: 1.0}  # the stopping step too
    assert sorted(step_metrics(db, "train/loss")) == [0, 1]


@pytest.mark.slow
def test_crash_after_a_checkpoint_with_the_newest_corrupted_resumes_from_the_one_before(
    tmp_path, tiny_pair, monkeypatch, caplog  # noqa: F811
):
    from opd_lit.checkpoint import CheckpointStore
    from opd_lit.train import run

    real_save = CheckpointStore.save

    def save_then_crash(self, step, payload, run_id=None):
        info = real_save(self, step, payload, run_id)
        if step == 3:
            raise RuntimeError("simulated crash right after the step-3 checkpoint")
        return info

    ckpt = tmp_path / "ck"
    cfg = compose_cfg(tmp_path, *pair_overrides(*tiny_pair), "trainer.max_steps=5", "rollout.max_new_tokens=8",
                      f"checkpoint.dir={ckpt}", "checkpoint.keep_last=3", "method=opd", "release.diagnose=false")
    monkeypatch.setattr(CheckpointStore, "save", save_then_crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(cfg)
    monkeypatch.setattr(CheckpointStore, "save", real_save)
    db = tmp_path / "mlflow.db"
    _, runs = mlflow_run(db)
    assert [r.info.status for r in runs] == ["FAILED"]
    assert checkpoint_steps(ckpt) == [1, 2, 3]
    newest = ckpt / "step-00000003.ckpt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 3] ^= 0xFF  # bit rot / a bad write the file system did not report
    newest.write_bytes(bytes(data))

    summary = run(cfg)
    assert summary["resumed_from_step"] == 2 and summary["steps"] == 5
    assert any("sha256" in r.getMessage() and "step-00000003" in r.getMessage() for r in caplog.records)
    _, runs = mlflow_run(db)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert sorted(step_metrics(db, "train/loss")) == [0, 1, 2, 3, 4]


# ---- one owner per job, end to end ------------------------------------------------------------


@pytest.mark.slow
def test_the_same_job_started_twice_at_once_runs_once_and_the_second_names_the_first(tmp_path, tiny_pair):  # noqa: F811
    db = tmp_path / "mlflow.db"
    ckpt = tmp_path / "ck"
    args = [*pair_overrides(*tiny_pair), "trainer.max_steps=3", "rollout.max_new_tokens=8", "method=opd",
            f"checkpoint.dir={ckpt}", f"logger.tracking_uri=sqlite:///{db}", "hydra.run.dir=out"]
    mlflow_run(db)  # create the tables once, before two processes open the store
    a = start(tmp_path, tmp_path / "a", args, delay=0.5)
    b = start(tmp_path, tmp_path / "b", args, delay=0.5)
    codes = sorted([(a.wait(600), a), (b.wait(600), b)], key=lambda x: x[0])
    (ok, winner), (refused, loser) = codes
    assert (ok, refused) == (0, 1), (output(a)[-2000:], output(b)[-2000:])
    msg = output(loser)
    assert f"JobLockedError: checkpoint.dir='{ckpt}' is in use by job" in msg, msg[-2000:]
    assert f"pid {winner.pid} on host" in msg and "Traceback" not in msg
    _, runs = mlflow_run(db)
    assert [r.info.status for r in runs] == ["FINISHED"]  # one run of the job, not two
    assert runs[0].data.tags["owner"].startswith(f"{winner.pid}@")


@pytest.mark.slow
def test_a_second_job_in_the_same_output_dir_is_refused_and_the_first_export_kept(tmp_path, tiny_pair):  # noqa: F811
    from opd_lit.locks import JobConflictError
    from opd_lit.settings import sha256_file
    from opd_lit.train import run

    common = [*pair_overrides(*tiny_pair), "trainer.max_steps=1", "rollout.max_new_tokens=6",
              "export.final_model=true", "method=opd"]
    first = run(compose_cfg(tmp_path, *common))  # output_dir is tmp_path/run for both
    exported = Path(first["final_model"])
    hashes = {p.name: sha256_file(p) for p in exported.iterdir()}
    with pytest.raises(JobConflictError) as err:
        run(compose_cfg(tmp_path, *common, "seed=1"))
    msg = str(err.value)
    assert f"holds the outputs of another job, {first['job_key']} (MLflow run {first['mlflow_run_id']}, FINISHED" in msg
    assert "seed: 0 -> 1" in msg
    assert {p.name: sha256_file(p) for p in exported.iterdir()} == hashes
    _, runs = mlflow_run(tmp_path / "mlflow.db")
    assert len(runs) == 1 and runs[0].data.tags["final_model_dir"] == str(exported.resolve())
