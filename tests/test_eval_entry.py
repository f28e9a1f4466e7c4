"""``python -m opd_lit.evaluate`` and the in-training EvalCallback: the real conf/, MLflow in a
temporary SQLite store. Models: a tiny random Qwen3 saved with the toy tokenizer (no
download, no trained assets); the trained toy pair when its assets are there."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from opd_lit.evaluate import run

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = str(REPO / "conf")
FIXTURES = REPO / "tests" / "fixtures" / "eval"
TOY_ASSETS = REPO / "src" / "opd_lit" / "toy" / "assets" / "manifest.json"
needs_toy = pytest.mark.skipif(not TOY_ASSETS.exists(), reason="the toy models are not built yet")


@pytest.fixture(autouse=True)
def fixtures_dir(monkeypatch):
    monkeypatch.setenv("OPD_EVAL_DIR", str(FIXTURES))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_entry")
    return root, f"sqlite:///{root / 'mlflow.db'}"


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer random Qwen3 with the toy tokenizer and chat template, saved as an HF dir."""
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    from opd_lit.toy.build import build_tokenizer
    from opd_lit.toy.recipe import default_recipe
    from opd_lit.toy.tokenizer import IM_END, PAD_TOKEN

    out = tmp_path_factory.mktemp("tiny_model")
    tok = build_tokenizer(default_recipe(), "student")
    eos, pad = tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids(PAD_TOKEN)
    torch.manual_seed(0)
    cfg = Qwen3Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=512,
        tie_word_embeddings=True, eos_token_id=eos, pad_token_id=pad, bos_token_id=None,
    )
    Qwen3ForCausalLM(cfg).save_pretrained(out)
    GenerationConfig(eos_token_id=eos, pad_token_id=pad, bos_token_id=None).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def evaluate_cfg(store, *overrides, name="run"):
    root, uri = store
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(
            config_name="evaluate",
            overrides=[f"logger.tracking_uri={uri}", f"output_dir={root / name}", *overrides],
        )


def client_for(store):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=store[1])


def test_regrade_logs_scores_samples_and_a_table(store, tmp_path, capsys):
    responses = tmp_path / "responses.jsonl"
    responses.write_text(
        json.dumps({"benchmark": "math500", "unique_id": "test/prealgebra/1.json", "response": "\\boxed{2}"}) + "\n"
        + json.dumps({"benchmark": "math500", "unique_id": "test/prealgebra/2.json", "response": "\\boxed{3}"}) + "\n"
    )
    # eval=math5: > 100 config params for the new run (MLflow's per-batch limit)
    summary = run(evaluate_cfg(store, "eval=math5", f"responses={responses}", name="regrade"))
    assert summary["metrics"]["eval/math500/score"] == 0.5
    assert "eval/math5_avg" not in summary["metrics"]  # only one of the five was graded
    client = client_for(store)
    r = client.get_run(summary["mlflow_run_id"])
    assert r.data.metrics["eval/math500/score"] == 0.5
    assert r.data.params["eval.aime25.samples"] == "32" and len(r.data.params) > 100
    assert r.data.tags["eval.mode"] == "regrade" and r.info.status == "FINISHED"
    arts = [a.path for a in client.list_artifacts(r.info.run_id, "eval/math500")]
    assert arts == ["eval/math500/samples.jsonl"]
    out = Path(summary["output_dir"])
    lines = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert [(x["problem_id"], x["correct"], x["extracted"]) for x in lines] == [
        ("test/prealgebra/1.json", True, "2"), ("test/prealgebra/2.json", False, "3")]
    assert json.loads((out / "scores.json").read_text())["metrics"]["eval/math500/score"] == 0.5
    printed = capsys.readouterr().out
    assert "MATH500" in printed and "50.00" in printed


def test_evaluate_a_training_run_generates_with_its_model_and_logs_into_it(store, tiny_model_dir):
    client = client_for(store)
    exp = client.get_experiment_by_name("opd_lit") or client.get_experiment(client.create_experiment("opd_lit"))
    run_id = client.create_run(exp.experiment_id, run_name="fake-training").info.run_id
    client.log_metric(run_id, "time/wall_s", 1.0, step=7)
    client.set_tag(run_id, "final_model_dir", str(tiny_model_dir))
    client.log_param(run_id, "student.template_kwargs.enable_thinking", "False")
    client.set_terminated(run_id)
    from opd_lit.evaluate import template_kwargs_from_run

    assert template_kwargs_from_run(client, run_id) == {"enable_thinking": False}
    summary = run(evaluate_cfg(
        store, "eval=toy", f"run_id={run_id}", "eval.num_problems=6", "eval.toy.max_new_tokens=8",
        name="from_run",
    ))
    assert summary["mlflow_run_id"] == run_id and summary["model"] == str(tiny_model_dir)
    score = client.get_metric_history(run_id, "eval/toy/score")
    acc = client.get_metric_history(run_id, "eval/toy/accuracy")
    assert [m.step for m in score] == [7] and [m.step for m in acc] == [7]
    assert 0.0 <= score[0].value <= 1.0
    assert client.get_metric_history(run_id, "eval/toy/truncated_frac")
    samples = client.download_artifacts(run_id, "eval/toy/samples.jsonl", str(store[0] / "dl"))
    records = [json.loads(x) for x in Path(samples).read_text().splitlines()]
    assert len(records) == 6 and all(r["response_tokens"] <= 9 for r in records)


def test_run_without_a_model_says_what_to_give(store):
    with pytest.raises(ValueError, match=r"model.path=.*run_id=.*responses="):
        run(evaluate_cfg(store, "eval=math500", name="nomodel"))
    client = client_for(store)
    exp = client.get_experiment_by_name("opd_lit") or client.get_experiment(client.create_experiment("opd_lit"))
    bare = client.create_run(exp.experiment_id).info.run_id
    with pytest.raises(ValueError, match=r"no 'final_model_dir' tag"):
        run(evaluate_cfg(store, "eval=math500", f"run_id={bare}", name="bare"))


@pytest.mark.slow
def test_cli_regrades_from_the_command_line(tmp_path):
    responses = tmp_path / "r.jsonl"
    responses.write_text(json.dumps({"problem_id": "0", "response": "\\boxed{75}"}) + "\n")
    proc = subprocess.run(
        [sys.executable, "-m", "opd_lit.evaluate", "eval=minerva", f"responses={responses}",
         f"output_dir={tmp_path / 'out'}", "logger=csv"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OPD_EVAL_DIR": str(FIXTURES), "COLUMNS": "200"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Minerva" in proc.stdout and "100.00" in proc.stdout
    scores = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert scores["metrics"]["eval/minerva/score"] == 1.0
    # everything it wrote is under output_dir, Hydra's own files included
    assert (tmp_path / "out" / ".hydra" / "config.yaml").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "r.jsonl"]


@needs_toy
@pytest.mark.slow
def test_toy_student_on_the_toy_benchmark(store):
    summary = run(evaluate_cfg(store, "model.path=toy:student", "eval=toy", "eval.num_problems=8",
                               "logger.kind=csv", name="toy_student"))
    assert 0.0 <= summary["metrics"]["eval/toy/score"] <= 1.0
    assert summary["metrics"]["eval/toy/accuracy"] == summary["metrics"]["eval/toy/score"]


def test_callback_with_real_engines_student_every_n_steps_and_teacher_once(tiny_model_dir, tmp_path):
    """The training callback on the hf engine, student and teacher (the tiny random model as
    both), driven through Lightning's hooks; the full training loop is tests/test_train.py."""
    from types import SimpleNamespace

    from opd_lit.eval.callback import EvalCallback
    from opd_lit.models import end_of_turn_ids, freeze, load_causal_lm, load_tokenizer
    from opd_lit.rollout import HFEngine
    from opd_lit.teacher import TeacherCallback, TeacherModels

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "eval=toy", "eval.every_n_steps=2", "eval.num_problems=4", "eval.toy.max_new_tokens=6"])
    from omegaconf import OmegaConf

    cb = EvalCallback(**OmegaConf.to_container(cfg.eval, resolve=True))
    tok = load_tokenizer(tiny_model_dir)
    model = freeze(load_causal_lm(tiny_model_dir))
    eos = end_of_turn_ids(tok, tiny_model_dir)
    teacher_cb = TeacherCallback(path=str(tiny_model_dir))
    teacher_cb.models = TeacherModels(model)
    module = SimpleNamespace(parts=SimpleNamespace(engine=HFEngine(model, pad_id=tok.pad_token_id, eos_ids=eos)))
    dm = SimpleNamespace(
        student_tokenizer=tok,
        teacher_tokenizer=tok, eos_ids=eos, student_template_kwargs={}, teacher_template_kwargs={},
        teacher_path=str(tiny_model_dir), spec=SimpleNamespace(gen_batch_size=8),
        prepare_tokenizers=lambda: None,
    )
    logged = []

    class Logger:
        log_dir = str(tmp_path)

        def log_metrics(self, metrics, step):
            logged.append((step, dict(metrics)))

    trainer = SimpleNamespace(datamodule=dm, global_step=0, max_steps=3, loggers=[Logger()],
                              callbacks=[teacher_cb, cb])
    cb.on_train_start(trainer, module)
    for step in (1, 2, 3):
        trainer.global_step = step
        cb.on_train_batch_end(trainer, module, None, None, step - 1)
    cb.on_train_end(trainer, module)
    steps = {name: [s for s, m in logged if name in m] for name in (
        "eval/toy/score", "eval/toy/accuracy", "eval/toy/teacher_score", "eval/toy/teacher_accuracy")}
    assert steps == {"eval/toy/score": [0, 2, 3], "eval/toy/accuracy": [0, 2, 3],
                     "eval/toy/teacher_score": [0], "eval/toy/teacher_accuracy": [0]}
    assert (tmp_path / "eval" / "toy" / "samples-teacher.jsonl").is_file()
    assert (tmp_path / "eval" / "toy" / "samples-step000002.jsonl").is_file()
