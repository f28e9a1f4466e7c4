"""Start-up config validation: every check rejects a bad value, all failures come at once,
and a bad config stops the run before anything is written or loaded."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from e2e import REPO, compose_cfg
from omegaconf import OmegaConf
from reliability_kit import tiny_pair  # noqa: F401 - fixture

from opd_lit.validate import CHECKS, ConfigError, check_config, validate_config


@pytest.fixture(scope="module")
def base(tiny_pair, tmp_path_factory):  # noqa: F811
    student, teacher = tiny_pair
    cfg = compose_cfg(tmp_path_factory.mktemp("validate"), f"student.path={student}", f"teacher.path={teacher}")
    assert check_config(cfg) == []
    return cfg


def mutate(cfg, **changes):
    cfg = OmegaConf.create(OmegaConf.to_container(cfg))  # a copy, resolvers kept as text
    for key, value in changes.items():
        OmegaConf.update(cfg, key.replace("__", "."), value, force_add=True)
    return cfg


def bad_vocab_dir(tmp: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({"a": 0, "b": 1, "<unk>": 2}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>")
    d = tmp / "other_vocab"
    tok.save_pretrained(d)
    (d / "config.json").write_text("{}")
    return d


def non_special_im_start(teacher: Path, tmp: Path) -> Path:
    """The teacher's tokenizer with <|im_start|> demoted to an ordinary token (same vocabulary)."""
    d = tmp / "teacher_demoted"
    shutil.copytree(teacher, d)
    tj = json.loads((d / "tokenizer.json").read_text())
    for t in tj["added_tokens"]:
        if t["content"] == "<|im_start|>":
            t["special"] = False
    (d / "tokenizer.json").write_text(json.dumps(tj))
    tc = json.loads((d / "tokenizer_config.json").read_text())
    tc.pop("extra_special_tokens", None)
    tc.pop("additional_special_tokens", None)
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    return d


def no_template(teacher: Path, tmp: Path) -> Path:
    d = tmp / "teacher_no_template"
    shutil.copytree(teacher, d)
    (d / "chat_template.jinja").unlink(missing_ok=True)
    tc = json.loads((d / "tokenizer_config.json").read_text())
    tc.pop("chat_template", None)
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    return d


# (check name, {dotted key (with "." or "__"): bad value}, the key the problem must name)
CASES = [
    ("seed", {"seed": -1}, "seed"),
    ("seed", {"seed": "zero"}, "seed"),
    ("max_steps", {"trainer.max_steps": 0}, "trainer.max_steps"),
    ("max_steps", {"trainer.max_steps": -1}, "trainer.max_steps"),
    ("prompts_per_step", {"rollout.prompts_per_step": 0}, "rollout.prompts_per_step"),
    ("samples_per_prompt", {"rollout.samples_per_prompt": 0}, "rollout.samples_per_prompt"),
    ("max_new_tokens", {"rollout.max_new_tokens": 0}, "rollout.max_new_tokens"),
    ("max_prompt_tokens", {"rollout.max_prompt_tokens": 0}, "rollout.max_prompt_tokens"),
    ("rollout_batches", {"rollout.gen_batch_size": 0}, "rollout.gen_batch_size"),
    ("rollout_batches", {"rollout.score_chunk_size": -4}, "rollout.score_chunk_size"),
    ("temperature", {"rollout.temperature": 0.0}, "rollout.temperature"),
    ("top_p", {"rollout.top_p": 0.0}, "rollout.top_p"),
    ("top_p", {"rollout.top_p": 1.5}, "rollout.top_p"),
    ("rollout_top_k", {"rollout.top_k": -1}, "rollout.top_k"),
    ("engine", {"rollout.engine": "sglang"}, "rollout.engine"),
    ("release_top_k", {"release.top_k": 1}, "release.top_k"),
    ("release_top_k", {"release.top_k": 2.5}, "release.top_k"),
    ("release_signal", {"release.signal": "variance"}, "release.signal"),
    ("lr", {"optim.lr": 0.0}, "optim.lr"),
    ("lr", {"optim.lr": "1e-3"}, "optim.lr"),
    ("weight_decay", {"optim.weight_decay": -0.1}, "optim.weight_decay"),
    ("betas", {"optim.betas": [0.9, 1.0]}, "optim.betas"),
    ("betas", {"optim.betas": [0.9]}, "optim.betas"),
    ("eps", {"optim.eps": 0.0}, "optim.eps"),
    ("warmup_steps", {"optim.warmup_steps": -1}, "optim.warmup_steps"),
    ("schedule", {"optim.schedule": "linear"}, "optim.schedule"),
    ("min_lr_ratio", {"optim.min_lr_ratio": 1.5}, "optim.min_lr_ratio"),
    ("max_grad_norm", {"optim.max_grad_norm": -1.0}, "optim.max_grad_norm"),
    ("micro_batch_size", {"loss.micro_batch_size": 0}, "loss.micro_batch_size"),
    ("chunk_size", {"loss.chunk_size": 0}, "loss.chunk_size"),
    ("max_skipped_in_a_row", {"loss.max_skipped_in_a_row": 0}, "loss.max_skipped_in_a_row"),
    ("devices", {"trainer.devices": "two"}, "trainer.devices"),
    ("batch_divisible", {"trainer.devices": 3}, "rollout.prompts_per_step"),  # 8 x 1 over 3
    ("batch_divisible", {"trainer.devices": 2, "trainer.num_nodes": 3}, "rollout.prompts_per_step"),
    ("prefix_len", {"method.prefix_len": 500}, "method.prefix_len"),  # max_new_tokens is 128
    ("prefix_len", {"method.start_len": 129}, "method.start_len"),
    ("method_class", {"method._target_": "opd_lit.methods.NoSuchMethod"}, "method._target_"),
    ("model_paths", {"student.path": "/no/such/model"}, "student.path"),
    ("model_paths", {"teacher.path": "toy:teach"}, "teacher.path"),
    ("model_paths", {"teacher.path": "@EMPTY_DIR"}, "teacher.path"),
    ("model_paths", {"method.reference": "/no/such/reference"}, "method.reference"),
    ("dtype", {"student.dtype": "int8"}, "student.dtype"),
    ("dtype", {"teacher.dtype": "fp32"}, "teacher.dtype"),
    ("tokenizers", {"teacher.path": "@OTHER_VOCAB"}, "teacher.path"),
    ("tokenizers", {"teacher.path": "@DEMOTED"}, "teacher.path"),
    ("tokenizers", {"teacher.path": "@NO_TEMPLATE"}, "teacher.path"),
    ("data", {"data.source": "web"}, "data.source"),
    ("data", {"data.source": "file", "data.path": "/no/such/prompts.jsonl"}, "data.path"),
    ("data", {"data.source": "file", "data.path": "???"}, "data.path"),
    ("data", {"data.limit": 0}, "data.limit"),
    ("data", {"data.num_train": 0}, "data.num_train"),
    ("data", {"data.check_wording": "loose"}, "data.check_wording"),
    ("logger", {"logger.kind": "wandb"}, "logger.kind"),
    ("logger", {"logger.experiment_name": ""}, "logger.experiment_name"),
    ("eval", {"eval.toy.task": "nope"}, "eval"),
    ("eval", {"eval.every_n_steps": -1}, "eval"),
    ("checkpoint", {"checkpoint.every_n_steps": -1}, "checkpoint.every_n_steps"),
    ("checkpoint", {"checkpoint.keep_last": 0}, "checkpoint.keep_last"),
    ("checkpoint", {"checkpoint.dir": ""}, "checkpoint.dir"),
    ("resume_force", {"resume": "maybe"}, "resume"),
    ("resume_force", {"force": "yes"}, "force"),
    ("trainer_keys", {"trainer.max_step": 3}, "trainer.max_step"),  # max_steps misspelled
    ("prompt_rows", {"data.source": "file", "data.path": "@NULL_PROMPT"}, "data.path"),
    ("prompt_rows", {"data.num_train": 7}, "rollout.prompts_per_step"),  # 8 prompts per step
    ("model_files", {"student.path": "@TRUNCATED"}, "student.path"),
    ("rollout_engine", {"rollout.engine": "vllm"}, "rollout.engine"),  # the tiny pair's head_dim is 16
    ("writable", {"output_dir": "@A_FILE/run"}, "output_dir"),
    ("writable", {"checkpoint.dir": "@A_FILE/ck"}, "checkpoint.dir"),
    ("tracking_store", {"logger.tracking_uri": "@CORRUPT_DB"}, "logger.tracking_uri"),
    ("divergence", {"divergence.stop_after": -1}, "divergence.stop_after"),
    ("divergence", {"divergence.stop": True}, "divergence.stop"),
]


@pytest.fixture(scope="module")
def special_dirs(tiny_pair, tmp_path_factory):  # noqa: F811
    tmp = tmp_path_factory.mktemp("special")
    (tmp / "empty").mkdir()
    (tmp / "null_prompt.jsonl").write_text('{"question": null, "final_answer": "1"}\n')
    truncated = shutil.copytree(tiny_pair[0], tmp / "truncated")
    weights = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    (tmp / "a_file").write_text("x")
    (tmp / "corrupt.db").write_bytes(b"this is not a SQLite database" * 100)
    return {
        "@NULL_PROMPT": str(tmp / "null_prompt.jsonl"),
        "@TRUNCATED": str(truncated),
        "@A_FILE/run": str(tmp / "a_file" / "run"),
        "@A_FILE/ck": str(tmp / "a_file" / "ck"),
        "@CORRUPT_DB": f"sqlite:///{tmp / 'corrupt.db'}",
        "@EMPTY_DIR": str(tmp / "empty"),
        "@OTHER_VOCAB": str(bad_vocab_dir(tmp)),
        "@DEMOTED": str(non_special_im_start(tiny_pair[1], tmp)),
        "@NO_TEMPLATE": str(no_template(tiny_pair[1], tmp)),
    }


@pytest.mark.parametrize("name,changes,key", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_each_check_rejects_a_bad_value(base, special_dirs, name, changes, key):
    changes = {k: special_dirs.get(v, v) if isinstance(v, str) else v for k, v in changes.items()}
    problems = check_config(mutate(base, **changes))
    named = [p for p in problems if p.key == key]
    assert named, f"{name}: no problem for {key} in {[str(p) for p in problems]}"
    text = str(named[0])
    if not named[0].text:  # our own checks: key=value: what is allowed
        assert text.startswith(f"{key}=") and ": " in text, text


def test_every_check_has_a_case():
    assert {c.name for c in CHECKS} == {case[0] for case in CASES}
    assert len(CHECKS) >= 20


def test_missing_benchmark_file_is_named(tmp_path):
    cfg = compose_cfg(tmp_path, "eval=aime25", f"eval.aime25.path={tmp_path / 'no' / 'aime25'}",
                      "student.path=toy:student", "teacher.path=toy:teacher")
    problems = [p for p in check_config(cfg) if p.key == "eval.aime25.path"]
    assert problems and "aime25" in str(problems[0]) and "not found" in str(problems[0])


def test_all_failures_at_once_in_one_error(base):
    cfg = mutate(base, seed=-1, optim__lr=0.0, release__top_k=1, rollout__top_p=2.0, logger__kind="x")
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    msg = str(err.value)
    assert "5 problems" in msg
    for line in ("seed=-1: an integer >= 0", "optim.lr=0.0: a number > 0", "release.top_k=1: an integer >= 2",
                 "rollout.top_p=2.0: a number in (0, 1]", "logger.kind='x': one of ['mlflow', 'csv']"):
        assert line in msg, msg


def test_bad_config_stops_the_run_before_anything_is_written(base, tmp_path, monkeypatch):
    import opd_lit.models as models
    from opd_lit.train import run

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before validation")

    monkeypatch.setattr(models, "load_causal_lm", no_load)
    db = tmp_path / "mlflow.db"
    db.write_bytes(b"existing")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "step-00000001.ckpt").write_bytes(b"previous")
    cfg = mutate(base, seed=-1, output_dir=str(tmp_path / "run"), checkpoint__dir=str(ckpt),
                 logger__tracking_uri=f"sqlite:///{db}")
    with pytest.raises(ConfigError, match="seed=-1"):
        run(cfg)
    assert not (tmp_path / "run").exists()
    assert db.read_bytes() == b"existing"
    assert [p.name for p in ckpt.iterdir()] == ["step-00000001.ckpt"]
    assert (ckpt / "step-00000001.ckpt").read_bytes() == b"previous"


def test_readme_lists_every_check():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Validated settings", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `([a-z_]+)` \|", section, flags=re.M))
    assert listed == {c.name for c in CHECKS}
