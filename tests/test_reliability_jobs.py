"""One owner per job, without a model: the job lock, a checkpoint.dir or output directory of
another job, stale MLflow runs, runs that fail before training, and ranks other than 0.
The end-to-end versions (real runs started together) are in test_reliability.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from e2e import compose_cfg

import opd_lit.train as train
from opd_lit.checkpoint import CheckpointStore
from opd_lit.jobs import (
    JOB_FILE,
    OUTPUT_MARKER,
    claim_output_dir,
    job_config,
    job_key,
    plan_job,
    write_job_file,
)
from opd_lit.locks import (
    JobConflictError,
    JobLock,
    JobLockedError,
    lock_path,
    owner_token,
    process_owner,
)


class Built(Exception):
    """train.build was reached: everything before it let the run through."""


def payload(step: int) -> dict:
    return {"step": step, "module": {"w": torch.zeros(4)}, "optimizers": [{}], "rng": {}}


@pytest.fixture
def no_build(monkeypatch):
    def stop(*a, **k):
        raise Built

    monkeypatch.setattr(train, "build", stop)


def client_of(tmp_path: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")


def make_run(tmp_path: Path, key: str, status: str, **tags) -> str:
    client = client_of(tmp_path)
    exp = client.get_experiment_by_name("opd_lit")
    exp_id = exp.experiment_id if exp else client.create_experiment("opd_lit")
    run = client.create_run(exp_id, tags={"job_key": key, **tags})
    if status != "RUNNING":
        client.set_terminated(run.info.run_id, status)
    return run.info.run_id


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ---- the lock --------------------------------------------------------------------------


def test_a_held_lock_refuses_a_second_owner_naming_the_first(tmp_path):
    ck = tmp_path / "ck"
    first = JobLock(ck)
    assert first.acquire({"job_key": "k1"}) is None
    first.update(mlflow_run_id="run-123")
    with pytest.raises(JobLockedError) as err:
        JobLock(ck).acquire({"job_key": "k1"})
    msg = str(err.value)
    assert f"pid {process_owner()['pid']} on host {process_owner()['host']}" in msg
    assert "MLflow run run-123" in msg and "job k1" in msg and str(lock_path(ck)) in msg
    first.release()
    assert not lock_path(ck).exists()
    again = JobLock(ck)
    assert again.acquire({"job_key": "k1"}) is None  # free again once released
    again.release()


def test_a_stale_lock_of_a_dead_process_is_taken_over_and_reported(tmp_path, no_build, capsys):
    cfg = compose_cfg(tmp_path, f"checkpoint.dir={tmp_path / 'ck'}")
    pid = dead_pid()
    stale = {"pid": pid, "host": process_owner()["host"], "job_key": job_key(cfg), "started": "2026-01-01T00:00:00"}
    lock_path(tmp_path / "ck").write_text(json.dumps(stale))  # its process died without releasing
    with pytest.raises(Built):
        train.run(cfg)
    out = capsys.readouterr().out
    assert f"took over the stale lock {lock_path(tmp_path / 'ck')}" in out
    assert f"pid {pid} on host" in out and "is no longer running" in out
    assert not lock_path(tmp_path / "ck").exists()  # released when the run ended


def test_run_refuses_a_job_whose_lock_is_held_before_anything_is_written(tmp_path, no_build):
    cfg = compose_cfg(tmp_path, f"checkpoint.dir={tmp_path / 'ck'}")
    key = job_key(cfg)
    CheckpointStore(tmp_path / "ck", key).save(2, payload(2), run_id="r-live")
    before = sorted(p.name for p in (tmp_path / "ck").iterdir())
    holder = JobLock(tmp_path / "ck")
    holder.acquire({"job_key": key, "mlflow_run_id": "r-live"})
    try:
        with pytest.raises(JobLockedError, match=r"is in use by job .*MLflow run r-live"):
            train.run(cfg)
    finally:
        holder.release()
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == before
    assert not (tmp_path / "mlflow.db").exists()  # refused before the tracking store was opened


# ---- a checkpoint.dir or output_dir of another job ------------------------------------------


def test_a_changed_config_in_a_used_checkpoint_dir_is_refused_naming_the_keys(tmp_path, no_build):
    ck = tmp_path / "ck"
    cfg_a = compose_cfg(tmp_path, f"checkpoint.dir={ck}")
    key_a = job_key(cfg_a)
    run_a = make_run(tmp_path, key_a, "RUNNING")  # job A was SIGKILLed at step 3
    store = CheckpointStore(ck, key_a)
    store.save(3, payload(3), run_id=run_a)
    write_job_file(store, key_a, job_config(cfg_a))
    files = {p.name: p.read_bytes() for p in ck.iterdir()}

    cfg_b = compose_cfg(tmp_path, f"checkpoint.dir={ck}", "seed=1", "optim.lr=2.0e-4")
    with pytest.raises(JobConflictError) as err:
        train.run(cfg_b)
    msg = str(err.value)
    assert f"holds the state of another job, {key_a} (checkpoint at step 3, MLflow run {run_a})" in msg
    assert "seed: 0 -> 1" in msg and "optim.lr: 0.0003 -> 0.0002" in msg and "Nothing was changed" in msg
    assert {p.name: p.read_bytes() for p in ck.iterdir()} == files  # nothing moved or rewritten
    assert not list(tmp_path.glob("ck.orphan-*"))
    assert client_of(tmp_path).get_run(run_a).info.status == "RUNNING"  # not marked FAILED by B
    # and job A's own command still resumes its run from its checkpoint
    plan = plan_job(cfg_a)
    assert plan.action == "resume" and plan.run_id == run_a and plan.checkpoint.step == 3


def test_an_output_dir_of_another_job_is_refused_and_a_finished_runs_is_kept(tmp_path):
    out = tmp_path / "out"
    marker = claim_output_dir(out, "aaaa", {"seed": 0, "lr": 1}, None, None)
    assert json.loads(marker.read_text())["job_key"] == "aaaa"
    with pytest.raises(JobConflictError) as err:
        claim_output_dir(out, "bbbb", {"seed": 1, "lr": 1}, None, None)
    assert "holds the outputs of another job, aaaa" in str(err.value) and "seed: 0 -> 1" in str(err.value)
    assert json.loads(marker.read_text())["job_key"] == "aaaa"  # unchanged
    claim_output_dir(out, "aaaa", {"seed": 0, "lr": 1}, None, None)  # the same job again: fine

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = make_run(tmp_path, "aaaa", "FINISHED")
    data = json.loads(marker.read_text())
    marker.write_text(json.dumps({**data, "mlflow_run_id": done}))
    with pytest.raises(JobConflictError, match=f"FINISHED MLflow run {done} of this job"):
        claim_output_dir(out, "aaaa", {"seed": 0, "lr": 1}, None, uri)  # force=true into its dir
    claim_output_dir(out, "aaaa", {"seed": 0, "lr": 1}, done, uri)  # that run itself, resumed: fine


def test_run_refuses_an_output_dir_holding_another_jobs_outputs(tmp_path, no_build, capsys):
    cfg_a = compose_cfg(tmp_path, "seed=0")
    out = Path(cfg_a.output_dir)
    claim_output_dir(out, job_key(cfg_a), job_config(cfg_a), "run-a", None)
    (out / "student_final").mkdir()
    with pytest.raises(JobConflictError, match=rf"output_dir='{out}' holds the outputs of another job, {job_key(cfg_a)}"):
        train.run(compose_cfg(tmp_path, "seed=1"))
    assert json.loads((out / OUTPUT_MARKER).read_text())["mlflow_run_id"] == "run-a"
    assert "running it" not in capsys.readouterr().out  # the plan is announced only once nothing refuses it


# ---- stale runs, and runs that end before training ----------------------------------------


def test_only_dead_running_runs_are_marked_failed_and_killed_ones_keep_their_status(tmp_path, no_build):
    cfg = compose_cfg(tmp_path, f"checkpoint.dir={tmp_path / 'ck'}")
    key = job_key(cfg)
    killed = make_run(tmp_path, key, "KILLED")
    legacy = make_run(tmp_path, key, "RUNNING")  # no owner tag: from before the tag
    dead = make_run(tmp_path, key, "RUNNING", owner=f"{dead_pid()}@{process_owner()['host']}:1")
    elsewhere = make_run(tmp_path, key, "RUNNING", owner="7@another-host:1", checkpoint_dir="/elsewhere/ck")
    with pytest.raises(Built):
        train.run(cfg)
    client = client_of(tmp_path)
    status = {r: client.get_run(r).info.status for r in (killed, legacy, dead, elsewhere)}
    assert status == {killed: "KILLED", legacy: "FAILED", dead: "FAILED", elsewhere: "RUNNING"}
    assert "ended without a final status (killed" in client.get_run(dead).data.tags["error"]
    assert "error" not in client.get_run(killed).data.tags


def test_a_running_run_of_this_job_with_a_live_process_is_refused(tmp_path, no_build):
    cfg = compose_cfg(tmp_path, f"checkpoint.dir={tmp_path / 'ck'}")
    key = job_key(cfg)
    legacy = make_run(tmp_path, key, "RUNNING")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        owner = {"pid": live.pid, "host": process_owner()["host"]}
        from opd_lit.locks import _proc_start

        owner["proc_start"] = _proc_start(live.pid)
        running = make_run(tmp_path, key, "RUNNING", owner=owner_token(owner), checkpoint_dir="/other/ck")
        with pytest.raises(JobLockedError, match=rf"already running as MLflow run {running}: pid {live.pid}"):
            train.run(cfg)
    finally:
        live.kill()
        live.wait()
    client = client_of(tmp_path)
    assert client.get_run(legacy).info.status == "RUNNING"  # refused before anything changed
    assert not (tmp_path / "ck" / JOB_FILE).exists()


def test_a_run_whose_trainer_cannot_be_built_ends_failed_with_the_error(tmp_path, monkeypatch):
    from opd_lit.tracking import build_loggers

    def build(cfg, out, plan=None):  # the MLflow run exists, then the trainer fails
        build_loggers(cfg, out)
        raise TypeError("Trainer.__init__() got an unexpected keyword argument 'max_step'")

    monkeypatch.setattr(train, "build", build)
    cfg = compose_cfg(tmp_path, f"checkpoint.dir={tmp_path / 'ck'}")
    with pytest.raises(TypeError):
        train.run(cfg)
    (run,) = client_of(tmp_path).search_runs([client_of(tmp_path).get_experiment_by_name("opd_lit").experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.tags["error"] == "TypeError: Trainer.__init__() got an unexpected keyword argument 'max_step'"
    assert not lock_path(tmp_path / "ck").exists()


def test_ranks_other_than_zero_change_nothing(tmp_path, no_build, monkeypatch):
    cfg = compose_cfg(tmp_path, f"checkpoint.dir={tmp_path / 'ck'}")
    key = job_key(cfg)
    stale = make_run(tmp_path, key, "RUNNING")
    CheckpointStore(tmp_path / "ck", key).save(2, payload(2), run_id="of-another-store")
    monkeypatch.setenv("LOCAL_RANK", "1")  # how Lightning's launcher starts rank 1
    with pytest.raises(Built):
        train.run(cfg)
    assert not lock_path(tmp_path / "ck").exists()
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["step-00000002.ckpt", "step-00000002.json"]
    assert not (Path(cfg.output_dir) / OUTPUT_MARKER).exists()
    assert client_of(tmp_path).get_run(stale).info.status == "RUNNING"
    monkeypatch.delenv("LOCAL_RANK")
    with pytest.raises(Built):  # rank 0 of the same job does its bookkeeping
        train.run(cfg)
    assert client_of(tmp_path).get_run(stale).info.status == "FAILED"
    assert list(tmp_path.glob("ck.orphan-*")) and (tmp_path / "ck" / JOB_FILE).exists()


def test_read_only_output_locations_and_tracking_store_are_named_before_any_model(tmp_path, monkeypatch):
    from reliability_kit import read_only

    import opd_lit.models as models
    from opd_lit.validate import ConfigError

    monkeypatch.setattr(models, "load_causal_lm", lambda *a, **k: pytest.fail("a model was loaded"))
    ro_out, ro_ck, store = tmp_path / "ro_out", tmp_path / "ro_ck", tmp_path / "store"
    for d in (ro_out, ro_ck, store):
        d.mkdir()
    db = store / "mlflow.db"
    client_of(store)  # a real store, made before it turns read-only
    make_run(store, "x", "FINISHED")
    before = db.read_bytes()
    cfg = compose_cfg(tmp_path, f"output_dir={ro_out / 'run'}", f"checkpoint.dir={ro_ck / 'job'}",
                      f"logger.tracking_uri=sqlite:///{db}")
    with read_only(ro_out, ro_ck, db):
        with pytest.raises(ConfigError) as err:
            train.run(cfg)
    msg = str(err.value)
    assert "3 problems" in msg, msg
    assert f"output_dir='{ro_out / 'run'}': a writable directory ({ro_out} is read-only" in msg
    assert f"checkpoint.dir='{ro_ck / 'job'}': a writable directory ({ro_ck} is read-only" in msg
    assert f"logger.tracking_uri='sqlite:///{db}': the SQLite file {db} is read-only" in msg
    assert db.read_bytes() == before and not (ro_out / "run").exists()


def test_a_corrupted_tracking_store_is_named_with_its_uri_and_file(tmp_path, monkeypatch):
    from opd_lit.jobs import find_job_runs
    from opd_lit.tracking import TrackingStoreError
    from opd_lit.validate import ConfigError

    db = tmp_path / "mlflow.db"
    db.write_bytes(b"\x00garbage, not SQLite" * 200)
    cfg = compose_cfg(tmp_path)
    with pytest.raises(ConfigError, match=rf"logger.tracking_uri='sqlite:///{db}': the SQLite file {db} is not a "
                                          r"readable SQLite database \(file is not a database; corrupted\?\)"):
        train.run(cfg)
    # past the start-up check (e.g. it broke since): the look-up names the store the same way
    with pytest.raises(TrackingStoreError, match=rf"'sqlite:///{db}' \(file {db}\) cannot be used"):
        find_job_runs(f"sqlite:///{db}", "opd_lit", "k")


def test_sigterm_while_the_models_load_ends_the_run_killed(tmp_path, monkeypatch):
    import os
    import signal

    from opd_lit.tracking import build_loggers

    def build(cfg, out, plan=None):  # the MLflow run exists; SIGTERM arrives while models load
        build_loggers(cfg, out)
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop the run")

    monkeypatch.setattr(train, "build", build)
    with pytest.raises(SystemExit) as code:
        train.run(compose_cfg(tmp_path, f"checkpoint.dir={tmp_path / 'ck'}"))
    assert code.value.code == 143
    (run,) = client_of(tmp_path).search_runs([client_of(tmp_path).get_experiment_by_name("opd_lit").experiment_id])
    assert run.info.status == "KILLED" and run.data.tags["error"] == "stopped by SIGTERM (exit 143)"
    assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None)  # the handler is gone again
