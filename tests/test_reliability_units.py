"""Reliability pieces that need no model: checkpoint files (atomic, checksummed, full disk),
job keys and the skip/resume/run decision, buffered MLflow logging, the tracking-URI check."""

from __future__ import annotations

import errno
import socket
import time
from pathlib import Path

import pytest
import torch
from e2e import REPO, compose_cfg
from omegaconf import OmegaConf

from opd_lit.checkpoint import (
    CheckpointError,
    CheckpointStore,
    atomic_write,
    capture_rng,
    restore_rng,
)
from opd_lit.jobs import ResumeError, job_key, plan_job


def payload(step: int) -> dict:
    return {"step": step, "module": {"w": torch.full((64,), float(step))}, "optimizers": [{}], "rng": {}}


# ---- checkpoint files ----------------------------------------------------------------


def test_checkpoints_are_atomic_checksummed_and_pruned(tmp_path):
    store = CheckpointStore(tmp_path / "ck", "job1", keep_last=2)
    for step in (1, 2, 3):
        store.save(step, payload(step), run_id="r1")
    assert sorted(p.name for p in store.root.iterdir()) == [
        "step-00000002.ckpt", "step-00000002.json", "step-00000003.ckpt", "step-00000003.json"
    ]
    info = store.latest()
    assert info.step == 3 and info.run_id == "r1" and len(info.meta["sha256"]) == 64
    assert store.load(info)["module"]["w"][0] == 3.0


@pytest.mark.parametrize("damage", ["flip", "truncate", "no_meta", "no_payload", "bad_meta"])
def test_corrupted_latest_checkpoint_is_detected_and_the_previous_used(tmp_path, damage):
    store = CheckpointStore(tmp_path / "ck", "job1", keep_last=3)
    for step in (1, 2):
        store.save(step, payload(step))
    newest, meta = store.payload_path(2), store.meta_path(2)
    if damage == "flip":
        data = bytearray(newest.read_bytes())
        data[len(data) // 2] ^= 0xFF
        newest.write_bytes(bytes(data))
    elif damage == "truncate":
        newest.write_bytes(newest.read_bytes()[:100])
    elif damage == "no_meta":
        meta.unlink()
    elif damage == "no_payload":
        newest.unlink()
    else:
        meta.write_text("{not json")
    info = store.latest()
    assert info is not None and info.step == 1
    if damage != "no_meta":
        assert "step-00000002" in store.describe_invalid()
    with pytest.raises(CheckpointError):
        store.verify(2)
    loaded = store.latest_loaded()
    assert loaded[0].step == 1 and loaded[1]["module"]["w"][0] == 1.0


def test_checkpoint_of_another_job_is_refused(tmp_path):
    CheckpointStore(tmp_path, "jobA").save(1, payload(1))
    with pytest.raises(CheckpointError, match="jobA"):
        CheckpointStore(tmp_path, "jobB").verify(1)


def test_full_disk_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path / "ck", "job1", keep_last=1)
    store.save(1, payload(1))
    before = {p.name: p.read_bytes() for p in store.root.iterdir()}

    def full_disk(obj, f, *a, **k):
        f.write(b"x" * 1000)  # part of the file made it to disk, then the disk filled up
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("opd_lit.checkpoint.torch.save", full_disk)
    with pytest.raises(OSError) as err:
        store.save(2, payload(2))
    assert err.value.errno == errno.ENOSPC
    after = {p.name: p.read_bytes() for p in store.root.iterdir()}
    assert after == before  # no temp file left, nothing pruned, nothing changed
    assert store.latest().step == 1
    assert store.load(store.latest())["module"]["w"][0] == 1.0


def test_atomic_write_never_leaves_a_half_file(tmp_path):
    target = tmp_path / "f"
    target.write_bytes(b"old")

    def boom(f):
        f.write(b"new, partial")
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(target, boom)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f"]


def test_rng_capture_and_restore_replays_every_stream():
    import random

    import numpy as np

    g = torch.Generator().manual_seed(7)
    state = capture_rng({"dm.gen": g})
    first = (random.random(), np.random.rand(), torch.rand(3), torch.rand(2, generator=g))
    restore_rng(state, {"dm.gen": g})
    again = (random.random(), np.random.rand(), torch.rand(3), torch.rand(2, generator=g))
    assert first[0] == again[0] and first[1] == again[1]
    assert torch.equal(first[2], again[2]) and torch.equal(first[3], again[3])


# ---- job keys and the decision -------------------------------------------------------


def test_job_key_ignores_volatile_keys_only(tmp_path):
    base = compose_cfg(tmp_path)
    key = job_key(base)
    assert len(key) == 16 and key == job_key(compose_cfg(tmp_path))
    for same in ("output_dir=/elsewhere", "progress=true", "logger.tracking_uri=sqlite:///x.db",
                 "checkpoint.every_n_steps=5", "checkpoint.dir=/tmp/c", "resume=false", "force=true"):
        assert job_key(compose_cfg(tmp_path, same)) == key, same
    for different in ("seed=1", "optim.lr=2.0e-3", "method=opd", "trainer.max_steps=3", "rollout.top_p=0.9"):
        assert job_key(compose_cfg(tmp_path, different)) != key, different
    # the tests route checkpoint.dir under tmp_path/checkpoints/${job_key:}; the default is the same
    # directory relative to the working directory
    assert OmegaConf.select(compose_cfg(tmp_path), "checkpoint.dir") == f"{tmp_path}/checkpoints/{key}"
    assert "dir: checkpoints/${job_key:}" in (REPO / "conf" / "config.yaml").read_text()


def make_run(db: Path, key: str, status: str, experiment: str = "opd_lit") -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    run = client.create_run(exp_id, tags={"job_key": key, "method": "release_bic", "seed": "0"})
    client.log_metric(run.info.run_id, "eval/toy/accuracy", 0.5, step=2)
    if status != "RUNNING":
        client.set_terminated(run.info.run_id, status)
    return run.info.run_id


def test_plan_skips_finished_resumes_unfinished_and_runs_the_rest(tmp_path):
    cfg = compose_cfg(tmp_path, f"checkpoint.dir={tmp_path / 'ck'}")
    key = job_key(cfg)
    db = tmp_path / "mlflow.db"
    assert plan_job(cfg).action == "run"  # nothing yet

    crashed = make_run(db, key, "RUNNING")  # SIGKILLed: still RUNNING, no checkpoint yet
    plan = plan_job(cfg)
    assert plan.action == "run" and plan.stale_runs == [crashed]

    CheckpointStore(tmp_path / "ck", key).save(3, payload(3), run_id=crashed)
    plan = plan_job(cfg)
    assert plan.action == "resume" and plan.run_id == crashed and plan.checkpoint.step == 3

    # a checkpoint of a run that is not in this tracking store: not resumed by default ...
    other = compose_cfg(tmp_path, f"checkpoint.dir={tmp_path / 'ck'}", f"logger.tracking_uri=sqlite:///{tmp_path / 'other.db'}")
    assert plan_job(other).action == "run"
    # ... but resume=true takes it (into a new MLflow run)
    forced = compose_cfg(tmp_path, f"checkpoint.dir={tmp_path / 'ck'}", "resume=true",
                         f"logger.tracking_uri=sqlite:///{tmp_path / 'other.db'}")
    plan = plan_job(forced)
    assert plan.action == "resume" and plan.run_id is None

    from mlflow.tracking import MlflowClient

    MlflowClient(f"sqlite:///{db}").set_terminated(crashed, "FINISHED")
    plan = plan_job(cfg)
    assert plan.action == "skip" and plan.run_id == crashed and "FINISHED" in plan.reason
    assert plan.summary["mlflow_run_id"] == crashed and plan.summary["skipped"]
    assert plan_job(compose_cfg(tmp_path, f"checkpoint.dir={tmp_path / 'ck'}", "force=true")).action == "run"


def test_resume_true_without_checkpoint_is_a_clear_error(tmp_path):
    cfg = compose_cfg(tmp_path, f"checkpoint.dir={tmp_path / 'ck'}", "resume=true")
    with pytest.raises(ResumeError, match=r"resume=true: no valid checkpoint .*checkpoint.dir="):
        plan_job(cfg)


def test_run_skips_a_finished_job_without_loading_anything(tmp_path, monkeypatch, capsys):
    import opd_lit.models as models
    from opd_lit.train import run

    monkeypatch.setattr(models, "load_causal_lm", lambda *a, **k: pytest.fail("loaded a model"))
    cfg = compose_cfg(tmp_path, f"checkpoint.dir={tmp_path / 'ck'}")
    done = make_run(tmp_path / "mlflow.db", job_key(cfg), "FINISHED")
    summary = run(cfg)
    assert summary["skipped"] and summary["mlflow_run_id"] == done
    assert summary["metrics"]["eval/toy/accuracy"] == 0.5
    assert "already has a FINISHED MLflow run" in capsys.readouterr().out
    assert not (tmp_path / "run").exists()


# ---- tracking ------------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_tracking_server_is_a_clear_error_before_any_model(tmp_path, monkeypatch):
    import opd_lit.models as models
    from opd_lit.train import run
    from opd_lit.validate import ConfigError

    monkeypatch.setattr(models, "load_causal_lm", lambda *a, **k: pytest.fail("loaded a model"))
    uri = f"http://127.0.0.1:{closed_port()}"
    cfg = compose_cfg(tmp_path, f"logger.tracking_uri={uri}")
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as err:  # the tracking_store check of the validation
        run(cfg)
    assert time.monotonic() - t0 < 10
    assert uri in str(err.value) and "unreachable" in str(err.value)
    assert not (tmp_path / "run").exists()


def test_sqlite_store_in_a_missing_directory_is_named(tmp_path):
    from opd_lit.tracking import TrackingUnreachableError, check_tracking_reachable

    with pytest.raises(TrackingUnreachableError, match="does not exist"):
        check_tracking_reachable(f"sqlite:///{tmp_path}/no/such/dir/mlflow.db")
    check_tracking_reachable(f"sqlite:///{tmp_path}/mlflow.db")


def buffered_logger(tmp_path, retry=0.0):
    from opd_lit.tracking import BufferedMLFlowLogger

    lg = BufferedMLFlowLogger(
        experiment_name="buf", tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        fallback_dir=tmp_path / "run", retry_interval_s=retry,
    )
    _ = lg.experiment
    return lg


def history(lg, key):
    return sorted((m.step, m.value) for m in lg.experiment.get_metric_history(lg.run_id, key))


def test_metrics_are_buffered_while_mlflow_is_down_and_flushed_when_it_returns(tmp_path, monkeypatch):
    lg = buffered_logger(tmp_path)
    lg.log_metrics({"train/loss": 0.0}, step=0)
    client = lg.experiment
    real = client.log_batch

    def down(*a, **k):
        raise ConnectionError("tracking server down")

    monkeypatch.setattr(client, "log_batch", down)
    with pytest.warns(RuntimeWarning, match="MLflow logging failed"):
        for step in (1, 2, 3):
            lg.log_metrics({"train/loss": float(step)}, step=step)  # no crash
    assert len(lg.buffer) == 3
    monkeypatch.setattr(client, "log_batch", real)
    lg.log_metrics({"train/loss": 4.0}, step=4)
    assert lg.buffer == []
    assert history(lg, "train/loss") == [(s, float(s)) for s in range(5)]
    lg.close("FINISHED")
    assert client.get_run(lg.run_id).info.status == "FINISHED"


def test_metrics_never_sent_go_to_a_csv_in_the_run_dir(tmp_path, monkeypatch):
    import csv

    lg = buffered_logger(tmp_path, retry=3600)
    monkeypatch.setattr(lg.experiment, "log_batch", lambda *a, **k: (_ for _ in ()).throw(OSError("down")))
    with pytest.warns(RuntimeWarning):
        lg.log_metrics({"train/loss": 1.5, "train/kept_frac": 0.5}, step=7)
    lg.log_metrics({"train/loss": 2.5}, step=8)  # within the retry interval: buffered quietly
    lg.finalize("success")
    rows = list(csv.DictReader(open(tmp_path / "run" / "mlflow_unsent_metrics.csv")))
    assert {(r["step"], r["key"], r["value"]) for r in rows} == {
        ("7", "train/loss", "1.5"), ("7", "train/kept_frac", "0.5"), ("8", "train/loss", "2.5")
    }
    assert all(r["run_id"] == lg.run_id for r in rows)


def test_a_checkpoints_step_metrics_are_resent_only_when_missing(tmp_path):
    from opd_lit.checkpoint import relog_pending_metrics

    lg = buffered_logger(tmp_path)
    lg.log_metrics({"train/loss": 0.5}, step=0)
    assert relog_pending_metrics([lg], {"step": 0, "metrics": {"train/loss": 0.5}}) == 0
    assert relog_pending_metrics([lg], {"step": 1, "metrics": {"train/loss": 0.25, "train/lr": 1.0}}) == 1
    assert history(lg, "train/loss") == [(0, 0.5), (1, 0.25)] and history(lg, "train/lr") == [(1, 1.0)]
    assert relog_pending_metrics([lg], {"step": -1, "metrics": {"train/loss": 1.0}}) == 0


def test_checkpoints_of_an_unknown_run_are_set_aside_not_deleted(tmp_path, monkeypatch):
    import opd_lit.train as train

    class Built(Exception):
        pass

    def stop(*a, **k):
        raise Built

    monkeypatch.setattr(train, "build", stop)
    cfg = compose_cfg(tmp_path, f"checkpoint.dir={tmp_path / 'ck'}")
    CheckpointStore(tmp_path / "ck", job_key(cfg)).save(2, payload(2), run_id="a-run-of-another-store")
    with pytest.raises(Built):
        train.run(cfg)
    assert not list((tmp_path / "ck").glob("step-*"))  # only the new attempt's job.json is there
    (moved,) = tmp_path.glob("ck.orphan-*")
    assert CheckpointStore(moved, job_key(cfg)).latest().step == 2
    # the printed advice works: the same command with resume=true checkpoint.dir=<moved>
    plan = plan_job(compose_cfg(tmp_path, f"checkpoint.dir={moved}", "resume=true"))
    assert plan.action == "resume" and plan.checkpoint.step == 2 and plan.key == job_key(cfg)

    # resume=false: the user asked for a fresh start, so the old checkpoints go
    CheckpointStore(tmp_path / "ck", job_key(cfg)).save(2, payload(2), run_id="x")
    with pytest.raises(Built):
        train.run(compose_cfg(tmp_path, f"checkpoint.dir={tmp_path / 'ck'}", "resume=false"))
    assert CheckpointStore(tmp_path / "ck", job_key(cfg)).latest() is None
