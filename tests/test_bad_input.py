"""Bad input gets a clear error naming the bad key or value and what is allowed."""

import pytest
import torch
from e2e import compose_cfg
from hydra.errors import MissingConfigException

from opd_lit.methods import ReleaseBIC
from opd_lit.models import ModelPathError, check_same_vocabulary, load_tokenizer, resolve_model_path
from opd_lit.train import run


def test_unknown_method_lists_the_available_ones(tmp_path):
    with pytest.raises(MissingConfigException) as err:
        compose_cfg(tmp_path, "method=nope")
    msg = str(err.value)
    assert "method/nope" in msg and "opd" in msg and "release_bic" in msg


def test_missing_model_path_names_the_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelPathError, match="no-such-model"):
        resolve_model_path(missing, "student.path")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelPathError, match="config.json"):
        resolve_model_path(tmp_path / "empty", "teacher.path")
    # Through the entry point, the start-up validator names the key and the path.
    cfg = compose_cfg(tmp_path, f"student.path={missing}")
    with pytest.raises(Exception) as err:
        run(cfg)
    assert "student.path" in str(err.value) and "no-such-model" in str(err.value)


def test_vocabulary_mismatch_names_both_sizes():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    student = load_tokenizer("toy:student")
    raw = Tokenizer(models.WordLevel({"a": 0, "b": 1, "<unk>": 2}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    other = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>")
    with pytest.raises(ValueError) as err:
        check_same_vocabulary(student, other)
    assert str(len(student)) in str(err.value) and "has 3 tokens" in str(err.value)


def test_top_k_below_two_is_rejected():
    with pytest.raises(ValueError, match=r"release.top_k=1.*>= 2"):
        ReleaseBIC(release={"top_k": 1})


def test_unknown_keys_and_values_are_named():
    with pytest.raises(ValueError, match=r"release: unknown key\(s\) \['topk'\]"):
        ReleaseBIC(release={"topk": 4})
    with pytest.raises(ValueError, match=r"release.signal='variance'.*margin.*adv_std"):
        ReleaseBIC(release={"signal": "variance"})


def test_empty_response_gets_zero_weight_and_no_nan():
    from opd_lit.release import release_weights_batch

    B, T, K = 3, 6, 4
    adv = torch.randn(B, T)
    mask = torch.ones(B, T)
    mask[1] = 0  # empty response
    seg = torch.tensor([[0, 0, 1, 1, 2, 2], [-1] * 6, [0, 0, 0, 1, 1, 1]])
    topk = torch.randn(B, T, K).log_softmax(-1)
    rel = release_weights_batch(adv, mask, topk, seg)
    assert torch.all(rel.weight[1] == 0)
    assert torch.isfinite(rel.weight).all() and torch.isfinite(rel.scale).all()


def test_response_without_sentence_boundary_is_fully_supervised():
    from opd_lit.release import release_weights_batch, segment_ids_batch

    tok = load_tokenizer("toy:student")
    ids = tok("First 3 plus 4 makes 7 and then we add 2 to get 9 so it is 9", add_special_tokens=False)["input_ids"]
    resp = torch.tensor([ids])
    mask = torch.ones_like(resp, dtype=torch.float32)
    seg = segment_ids_batch(tok, resp, mask)
    assert set(seg[0].tolist()) == {0}
    rel = release_weights_batch(torch.randn(1, len(ids)), mask, torch.randn(1, len(ids), 8).log_softmax(-1), seg)
    assert not bool(rel.accepted[0])
    torch.testing.assert_close(rel.weight, mask)


# ---- prompt files: every row checked before any model loads, named by file and line ----------


def _parquet_bytes(tmp_path) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["a", "b"], "answer": ["1", "2"]}), tmp_path / "whole.parquet")
    return (tmp_path / "whole.parquet").read_bytes()


PROMPT_FILES = [
    ("empty.jsonl", b"", "empty.jsonl: no rows (an empty file)"),
    ("malformed.jsonl", b'{"prompt": "a", "answer": "1"}\n{"prompt": "b", "answer": 2\n',
     "malformed.jsonl:2: not valid JSON (Expecting ',' delimiter"),
    ("latin1.jsonl", '{"prompt": "a", "answer": "1"}\n{"prompt": "café", "answer": "1"}\n'.encode("latin-1"),
     "latin1.jsonl:2: not UTF-8 (byte 0xe9 at column 16)"),
    ("null.jsonl", b'{"prompt": null, "answer": "1"}\n{"prompt": " ", "answer": "1"}\n{"prompt": "x", "answer": null}\n',
     "null.jsonl:1: 'prompt' is null|null.jsonl:2: 'prompt' is empty|null.jsonl:3: 'answer' (data.answer_field) is null"),
    ("array.jsonl", b"[1, 2]\n", "array.jsonl:1: a JSON object per line, got list"),
    ("fields.csv", b'prompt,answer\na,1\nb,2,3\n', "fields.csv:3: 3 fields, the header has 2"),
    ("truncated.parquet", None, "truncated.parquet: not a readable parquet file"),
]


@pytest.mark.parametrize("name,data,expected", PROMPT_FILES, ids=[p[0] for p in PROMPT_FILES])
def test_bad_prompt_file_is_named_by_file_and_line(tmp_path, name, data, expected):
    from opd_lit.data.prompts import PromptSpec, scan_prompt_files

    if data is None:
        whole = _parquet_bytes(tmp_path)
        data = whole[: len(whole) // 2]
    (tmp_path / name).write_bytes(data)
    spec = PromptSpec(source="file", path=str(tmp_path / name), prompt_field="prompt", answer_field="answer")
    scan = scan_prompt_files(spec)
    for part in expected.split("|"):
        assert any(part in p for p in scan.problems), (part, scan.problems)
    assert all(str(tmp_path / name) in p for p in scan.problems)


def test_the_template_keeps_other_braces_and_fills_row_fields():
    from opd_lit.data.prompts import render_template, template_fields

    deepmath = "{prompt}\n\nPlease reason step by step, and put your final answer within \\boxed{}."
    assert render_template(deepmath, {"prompt": "1+1?"}).endswith("within \\boxed{}.")
    assert template_fields("Q ({level}): {prompt} {{prompt}}") == ["level", "prompt"]
    assert render_template("Q ({level}): {prompt} {{x}}", {"level": 3, "prompt": "p"}) == "Q (3): p {x}"


def test_bad_prompt_rows_stop_the_run_before_any_model_loads(tmp_path, monkeypatch):
    import opd_lit.models as models
    from opd_lit.data.prompts import DataConfigError, PromptSpec, file_records
    from opd_lit.validate import ConfigError

    monkeypatch.setattr(models, "load_causal_lm", lambda *a, **k: pytest.fail("a model was loaded"))
    rows = tmp_path / "three.jsonl"
    rows.write_text("".join(f'{{"question": "q{i}", "final_answer": "{i}"}}\n' for i in range(3)))
    cfg = compose_cfg(tmp_path, "data.source=file", f"+data.path={rows}",
                      "+data.prompt_template='Level {level}: {prompt}'", "rollout.prompts_per_step=4")
    with pytest.raises(ConfigError) as err:
        run(cfg)
    assert f"data.path: {rows}: lines 1, 2, 3: data.prompt_template uses {{level}}, which the row lacks" in str(err.value)
    cfg = compose_cfg(tmp_path, "data.source=file", f"+data.path={rows}", "rollout.prompts_per_step=4")
    with pytest.raises(ConfigError, match=r"rollout.prompts_per_step=4: at most the number of prompts, 3"):
        run(cfg)
    assert not (tmp_path / "run").exists() and not (tmp_path / "mlflow.db").exists()
    # the same rule guards a direct load: a null prompt is never trained on as the text "None"
    rows.write_text('{"question": null, "final_answer": "1"}\n')
    with pytest.raises(DataConfigError, match=r"row 0: 'question' is null"):
        file_records(PromptSpec(source="file", path=str(rows)))


# ---- how errors print ----------------------------------------------------------------------


def _main(monkeypatch, tmp_path, *overrides):
    import opd_lit.train as train

    monkeypatch.setattr("sys.argv", ["opd_lit.train", f"hydra.run.dir={tmp_path / 'hydra'}",
                                     f"logger.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
                                     f"checkpoint.dir={tmp_path / 'ck'}", *overrides])
    return train.main()


def test_errors_print_one_line_per_problem_without_a_traceback(tmp_path, monkeypatch, capsys):
    from opd_lit.validate import ConfigError

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as code:
        _main(monkeypatch, tmp_path, "+trainer.max_step=3", "optim.lr=0.0")
    assert code.value.code == 1
    err = capsys.readouterr().err
    assert "ConfigError: invalid configuration (2 problems):" in err
    assert "  - trainer.max_step=3: not an argument of lightning.Trainer: did you mean trainer.max_steps?" in err
    assert "  - optim.lr=0.0: a number > 0" in err
    assert "Traceback" not in err
    assert not (tmp_path / "mlflow.db").exists()  # no MLflow run left RUNNING: none was made
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(ConfigError):  # the full traceback when asked for
        _main(monkeypatch, tmp_path, "optim.lr=0.0")


def test_a_dry_run_validates_the_settings_and_reports_bad_files_without_failing(tmp_path, capsys):
    from opd_lit.validate import ConfigError

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ConfigError, match=r"optim.lr=-1: a number > 0"):
        run(compose_cfg(tmp_path, "dry_run=true", "optim.lr=-1"))
    # the files a job names may be on another machine (a cluster's sweep): reported, not refused
    summary = run(compose_cfg(tmp_path, "dry_run=true", "data=jsonl", f"data.path={empty}", fast=False))
    assert summary["on_disk_problems"] == [f"data.path: {empty}: no rows (an empty file)"]
    assert f"    on this machine: data.path: {empty}: no rows (an empty file)" in capsys.readouterr().out
    assert not (tmp_path / "run").exists() and not (tmp_path / "mlflow.db").exists()  # nothing written
