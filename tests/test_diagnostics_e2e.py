"""Diagnostics end to end: the real conf and entry points on the embedded toy (slow)."""

from __future__ import annotations

import pytest
from e2e import REPO, compose_cfg, mlflow_runs

from opd_lit.train import run

TOY_ASSETS = REPO / "src" / "opd_lit" / "toy" / "assets" / "manifest.json"


def artifact_files(client, run_id, path="diagnostics"):
    out = []
    for a in client.list_artifacts(run_id, path):
        out.extend(artifact_files(client, run_id, a.path) if a.is_dir else [a.path])
    return out


@pytest.mark.slow
@pytest.mark.skipif(not TOY_ASSETS.exists(), reason="the toy models are not built yet")
def test_training_logs_the_diagnostics_and_diagnose_redraws_them(tmp_path, capsys, monkeypatch):
    from opd_lit.diagnose import main

    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root and the checkpoints land here

    common = ("trainer.max_steps=2", "diagnostics.every_n_steps=1", "eval.at_start=false")
    run(compose_cfg(tmp_path, "method=release_bic", *common))
    run(compose_cfg(tmp_path, "method=opd", "release.diagnose=false", *common,
                    f"output_dir={tmp_path / 'run-opd'}"))  # each job its own output directory
    client, runs = mlflow_runs(tmp_path / "mlflow.db")
    by_method = {r.data.tags["method"]: r.info.run_id for r in runs}

    files = set(artifact_files(client, by_method["release_bic"]))
    for name in ("advantage_by_position", "margin_by_position", "release_stats", "response_length"):
        assert {f"diagnostics/{name}.csv", f"diagnostics/{name}.png"} <= files, name
    assert any(f.startswith("diagnostics/case_studies/step_000002_") and f.endswith(".html") for f in files)
    # opd without release decisions: no release figures, a reason, everything else
    files = set(artifact_files(client, by_method["opd"]))
    assert "diagnostics/advantage_by_position.png" in files and "diagnostics/margin_by_position.png" in files
    assert "diagnostics/release_stats.csv" not in files and "diagnostics/skipped.csv" in files

    capsys.readouterr()
    out = tmp_path / "diagnose"
    assert main([f"run_id={by_method['opd']},{by_method['release_bic']}",
                 f"tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", f"out={out}"]) == 0
    text = capsys.readouterr().out
    assert (out / by_method["release_bic"] / "release_stats.png").exists()
    assert (out / "response_length.png").exists()
    assert f"Runs that have it: {by_method['release_bic']} (release_bic)" in text
