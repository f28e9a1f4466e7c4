"""The real conf/ composed and run on the embedded toy (a few steps each)."""

import pytest
from e2e import FAST, REPO, compose_cfg, mlflow_runs, run_module

from opd_lit.train import run

STEP_METRICS = [
    "train/loss", "train/adv_mean", "train/kept_frac", "release/accepted_frac",
    "release/release_segment_mean", "release/bic_gain_mean", "rollout/response_len_mean",
    "rollout/tokens_per_s", "teacher/tokens_per_s",
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "method", ["opd", "release_bic", "exopd", "fixed_prefix", "release_random", "lgr"]
)
def test_method_runs_on_the_toy_and_logs_every_metric(tmp_path, method):
    cfg = compose_cfg(tmp_path, f"method={method}", "seed=3")
    summary = run(cfg)
    assert summary["steps"] == 2
    client, runs = mlflow_runs(tmp_path / "mlflow.db")
    assert len(runs) == 1
    r = runs[0]
    assert r.data.tags["method"] == method and r.data.tags["seed"] == "3"
    for name in STEP_METRICS:
        history = client.get_metric_history(r.info.run_id, name)
        assert [m.step for m in history] == [0, 1], name
    acc = client.get_metric_history(r.info.run_id, "eval/toy/accuracy")
    assert [m.step for m in acc] == [0, 2]
    assert all(0.0 <= m.value <= 1.0 for m in acc)
    assert r.data.params["method.name"] == method
    artifacts = {a.path for a in client.list_artifacts(r.info.run_id)}
    assert {"config.yaml", "chat_templates.txt"} <= artifacts
    kept = client.get_metric_history(r.info.run_id, "train/kept_frac")
    if method == "opd":
        assert all(m.value == 1.0 for m in kept)
    else:
        assert all(0.0 < m.value <= 1.0 for m in kept)


@pytest.mark.slow
def test_multirun_leaves_one_mlflow_run_per_job(tmp_path):
    db = tmp_path / "mlflow.db"
    proc = run_module(
        "opd_lit.train", "-m", "method=opd,release_bic", *FAST, "trainer.max_steps=1",
        "eval.at_start=false", "eval.at_end=false", f"hydra.sweep.dir={tmp_path / 'multirun'}",
        cwd=tmp_path, env={"MLFLOW_TRACKING_URI": f"sqlite:///{db}"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, runs = mlflow_runs(db)
    assert sorted(r.data.tags["method"] for r in runs) == ["opd", "release_bic"]
    assert all(r.info.status == "FINISHED" for r in runs)


def test_repo_conf_is_where_train_looks():
    from opd_lit.train import CONF_DIR

    assert (REPO / "conf" / "config.yaml").samefile(f"{CONF_DIR}/config.yaml")
