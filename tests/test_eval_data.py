"""The benchmark registry: the shipped conf/eval/*.yaml load the fixtures (tiny files in each
public dataset's own layout and field names) through OPD_EVAL_DIR, with the paper's budgets;
bad input gets errors naming the benchmark, the file, the rows and the expected fields."""

import base64
import json
import logging
import pickle
import zlib
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from opd_lit.eval.benchmarks import (
    BenchmarkDataError,
    BenchmarkFileNotFound,
    BenchmarkSpec,
    RowError,
    decode_test_cases,
    load_problems,
)
from opd_lit.eval.harness import Evaluator, parse_eval_config
from opd_lit.eval.sandbox import detect_isolation

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")  # what opd_lit.train uses
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "eval"
BENCHMARKS = [
    "aime24", "aime25", "aime26", "hmmt25_feb", "hmmt25_nov", "math500", "minerva", "deepmath",
    "gpqa_diamond", "livecodebench_v6", "mbpp", "humaneval", "toy",
]
JAIL_OR_ALLOW = () if detect_isolation().jailed else ("eval.allow_unsandboxed=true",)


def eval_cfg(name: str, *overrides: str, config: str = "evaluate") -> dict:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name=config, overrides=[f"eval={name}", *overrides])
    return OmegaConf.to_container(cfg.eval, resolve=True)


@pytest.fixture
def fixtures_dir(monkeypatch):
    monkeypatch.setenv("OPD_EVAL_DIR", str(FIXTURES))
    return FIXTURES


def test_registry_has_one_yaml_per_benchmark_and_the_groups():
    names = {p.stem for p in Path(CONF_DIR, "eval").glob("*.yaml")}
    assert set(BENCHMARKS) | {"math5", "gpqa", "code", "lgr"} <= names
    from opd_lit.eval.benchmarks import registry

    assert set(BENCHMARKS) <= set(registry())


def test_paper_budgets(fixtures_dir):
    math5 = parse_eval_config(eval_cfg("math5"))
    samples = {s.name: s.samples for s in math5.selected}
    assert samples == {"aime25": 32, "hmmt25_feb": 32, "hmmt25_nov": 32, "math500": 1, "minerva": 4}
    assert all(s.max_new_tokens == 32768 for s in math5.selected)
    assert math5.settings.averages == {"math5_avg": list(samples)}
    gpqa = parse_eval_config(eval_cfg("gpqa"))
    assert [(s.name, s.samples) for s in gpqa.selected] == [("gpqa_diamond", 4)]
    code = parse_eval_config(eval_cfg("code"))
    assert [s.name for s in code.selected] == ["livecodebench_v6", "mbpp", "humaneval"]
    toy = parse_eval_config(eval_cfg("toy"))
    t = toy.settings
    assert (t.at_start, t.at_end, t.teacher_at_start, t.num_problems) == (True, True, True, 256)
    assert toy.specs["toy"].greedy and toy.specs["toy"].alias == "accuracy"


def test_every_benchmark_loads_its_fixture_with_the_shipped_config(fixtures_dir):
    loaded = {}
    for group in ("math5", "gpqa", "code"):
        ev = Evaluator(eval_cfg(group, *JAIL_OR_ALLOW))
        loaded.update(ev.benchmarks)
    ids = {name: [p.id for p in b.problems] for name, b in loaded.items()}
    assert ids["aime25"] == ["1", "2", "3"]  # MathArena problem_idx, from data/*.parquet
    assert ids["hmmt25_feb"] == ["1", "2"] and ids["hmmt25_nov"] == ["1", "2"]
    assert ids["math500"][0] == "test/prealgebra/1.json"  # unique_id
    assert ids["minerva"] == ["0", "1", "2"]  # no id field: numbered
    assert ids["gpqa_diamond"] == ["recFixture01", "recFixture02", "recFixture03"]
    assert ids["humaneval"] == ["FixtureEval/0", "FixtureEval/1"]
    assert ids["mbpp"] == ["11", "12"]
    assert ids["livecodebench_v6"] == ["fx-sum", "fx-pair"]  # the 2025-02..05 window of 4 problems
    gpqa = loaded["gpqa_diamond"].problems[0].data
    assert gpqa["question"].startswith("Which gas") and "\n" in gpqa["question"]  # CSV multi-line cell
    assert gpqa["correct"] == "Nitrogen" and len(gpqa["incorrect"]) == 3
    mbpp = {p.id: p.data for p in loaded["mbpp"].problems}
    assert mbpp["12"]["setup"] == "OFFSET = 10" and mbpp["11"]["entry_point"] == "square"
    lcb = {p.id: p.data for p in loaded["livecodebench_v6"].problems}
    assert len(lcb["fx-sum"]["tests"]) == 3  # 1 public + 2 private (compressed)
    assert lcb["fx-pair"]["func_name"] == "maxPair"
    assert "starter code" in loaded["livecodebench_v6"].messages(loaded["livecodebench_v6"].problems[1], 0)[0]["content"]


def test_toy_benchmark_is_generated(fixtures_dir):
    ev = Evaluator(eval_cfg("toy", "eval.num_problems=5"))
    problems = ev.benchmarks["toy"].problems
    assert len(problems) == 5 and problems[0].id.startswith("toy-eval-")
    msgs = ev.benchmarks["toy"].messages(problems[0], 0)
    assert msgs[-1]["role"] == "user" and "\\boxed{}" in msgs[-1]["content"]


def test_num_problems_caps_every_benchmark(fixtures_dir):
    ev = Evaluator(eval_cfg("math5", "eval.num_problems=1"))
    assert {n: len(b.problems) for n, b in ev.benchmarks.items()} == dict.fromkeys(ev.benchmarks, 1)


def test_training_config_composes_with_every_eval_group(fixtures_dir):
    from opd_lit.eval.callback import EvalCallback

    for group in ("toy", "math5", "gpqa", "code", "math500", "lgr"):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name="config",
                          overrides=[f"eval={group}", "eval.every_n_steps=10", *JAIL_OR_ALLOW])
        cb = EvalCallback(**OmegaConf.to_container(cfg.eval, resolve=True))
        assert cb.every_n_steps == 10 and cb.benchmarks


def test_missing_file_names_benchmark_path_and_schema(tmp_path, monkeypatch):
    monkeypatch.setenv("OPD_EVAL_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(BenchmarkFileNotFound) as err:
        Evaluator(eval_cfg("math500"))
    msg = str(err.value)
    assert "'math500'" in msg and str(tmp_path / "nowhere" / "math500" / "test.jsonl") in msg
    assert "'problem'" in msg and "'answer'" in msg and "'unique_id'" in msg
    assert "OPD_EVAL_DIR" in msg and "eval.math500.path" in msg
    with pytest.raises(BenchmarkFileNotFound, match=r"'Correct Answer'.*'Incorrect Answer 1'"):
        Evaluator(eval_cfg("gpqa"))
    with pytest.raises(BenchmarkFileNotFound, match=r"no jsonl/json/parquet/csv files under"):
        (tmp_path / "nowhere" / "aime25").mkdir(parents=True)
        Evaluator(eval_cfg("aime25"))


def test_malformed_rows_are_reported_with_line_numbers(fixtures_dir, caplog):
    path = FIXTURES / "bad" / "math500.jsonl"
    with pytest.raises(BenchmarkDataError) as err:
        Evaluator(eval_cfg("math500", f"eval.math500.path={path}"))
    msg = str(err.value)
    assert "3 malformed row(s)" in msg
    assert "math500.jsonl line 2: invalid JSON" in msg
    assert "line 4: missing 'answer' (field 'answer')" in msg
    assert "line 6: duplicate id 'test/prealgebra/1.json' (first at math500.jsonl line 1)" in msg
    assert "eval.skip_bad_rows=true" in msg
    with caplog.at_level(logging.WARNING):
        ev = Evaluator(eval_cfg("math500", f"eval.math500.path={path}", "eval.skip_bad_rows=true"))
    assert [p.id for p in ev.benchmarks["math500"].problems] == ["test/prealgebra/1.json", "test/prealgebra/2.json"]
    assert "line 2" in caplog.text and "Skipped" in caplog.text


def test_malformed_csv_and_code_rows(fixtures_dir):
    with pytest.raises(BenchmarkDataError, match=r"gpqa_diamond.csv row 2: missing 'correct' \(field 'Correct Answer'\)"):
        Evaluator(eval_cfg("gpqa", f"eval.gpqa_diamond.path={FIXTURES / 'bad' / 'gpqa_diamond.csv'}"))
    with pytest.raises(BenchmarkDataError, match=r"HumanEval.jsonl line 2: entry_point 'not an identifier'"):
        Evaluator(eval_cfg("humaneval", f"eval.humaneval.path={FIXTURES / 'bad' / 'HumanEval.jsonl'}"))


def test_wrong_field_mapping_lists_the_fields_that_exist(fixtures_dir):
    with pytest.raises(BenchmarkDataError, match=r"has no field\(s\) \['question'\]; its fields: \[.*'problem'"):
        Evaluator(eval_cfg("aime25", "eval.aime25.fields.problem=question"))
    with pytest.raises(BenchmarkDataError, match=r"no row of .* has the field\(s\) \['prompt'\]; fields seen: \[.*'question'"):
        Evaluator(eval_cfg("minerva", "eval.minerva.fields.problem=prompt"))


def test_unknown_keys_and_values_are_named(fixtures_dir):
    base = eval_cfg("math500")
    with pytest.raises(ValueError, match=r"eval.math500: unknown key\(s\) \['sample'\]"):
        parse_eval_config({**base, "math500": {**base["math500"], "sample": 3}})
    with pytest.raises(ValueError, match=r"eval: unknown key\(s\) \['every_n_step'\]"):
        parse_eval_config({**base, "every_n_step": 3})
    with pytest.raises(ValueError, match=r"eval.benchmarks: \['aime25'\] not defined"):
        parse_eval_config({**base, "benchmarks": ["aime25"]})
    with pytest.raises(ValueError, match=r"eval.math500.grader='code': task 'math' is graded by 'math'"):
        parse_eval_config({**base, "math500": {**base["math500"], "grader": "code"}})
    with pytest.raises(ValueError, match=r"eval.math500.task='physics' is not one of"):
        parse_eval_config({**base, "math500": {**base["math500"], "task": "physics"}})
    with pytest.raises(ValueError, match=r"eval.every_n_steps=-1"):
        parse_eval_config({**base, "every_n_steps": -1})


def test_private_test_cases_decode_without_unpickling_objects():
    cases = [{"input": "1\n", "output": "1\n", "testtype": "stdin"}]
    packed = base64.b64encode(zlib.compress(pickle.dumps(json.dumps(cases)))).decode()
    assert decode_test_cases(packed, "private_test_cases") == cases
    assert decode_test_cases(json.dumps(cases), "public_test_cases") == cases

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = base64.b64encode(zlib.compress(pickle.dumps(Evil()))).decode()
    with pytest.raises(RowError, match="refusing to load"):
        decode_test_cases(evil, "private_test_cases")


def test_date_window_and_format_inference(tmp_path):
    rows = [
        {"question_content": "q", "public_test_cases": json.dumps([{"input": "", "output": "x", "testtype": "stdin"}]),
         "question_id": f"p{i}", "contest_date": date}
        for i, date in enumerate(["2025-01-31T00:00:00", "2025-02-01T00:00:00", "2025-05-31T12:00:00", "2025-06-01"])
    ]
    path = tmp_path / "lcb.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = BenchmarkSpec.from_dict("lcb", {
        "task": "livecodebench", "grader": "code", "path": str(path),
        "fields": {"question": "question_content", "public_tests": "public_test_cases",
                   "date": "contest_date", "id": "question_id"},
        "date_from": "2025-02-01", "date_to": "2025-05-31",
    })
    assert [p.id for p in load_problems(spec)] == ["p1", "p2"]


def test_aime24_aime26_and_deepmath_load_in_their_public_schema(fixtures_dir, monkeypatch):
    monkeypatch.setenv("OPD_DATA_DIR", str(FIXTURES))  # DeepMath-103K: the training copy's place
    aime24 = Evaluator(eval_cfg("aime24")).benchmarks["aime24"]
    assert [(p.id, p.data["answer"]) for p in aime24.problems] == [("60", "42"), ("61", "99")]
    aime26 = Evaluator(eval_cfg("aime26")).benchmarks["aime26"]
    assert [(p.id, p.data["answer"]) for p in aime26.problems] == [("1", "7"), ("2", "12")]  # an int column
    deep = Evaluator(eval_cfg("deepmath")).benchmarks["deepmath"]
    assert sorted(p.id for p in deep.problems) == ["0", "1", "2", "3"]  # no id field: numbered
    by_id = {p.id: p for p in deep.problems}
    assert by_id["1"].data["answer"] == "Yes" and by_id["1"].data["difficulty"] == 1.0
    assert by_id["1"].data["topic"].startswith("Mathematics -> Number Theory")
    assert deep.grade(by_id["1"], 0, "\\boxed{yes}").correct
    assert deep.grade(by_id["3"], 0, "\\boxed{0.5}").correct  # gold \dfrac{1}{2}
    # a seeded subset: reproducible, and not simply the first rows
    subsets = [tuple(p.id for p in Evaluator(eval_cfg(
        "deepmath", "eval.deepmath.max_problems=2", f"eval.deepmath.subset_seed={seed}")).benchmarks["deepmath"].problems)
        for seed in (0, 0, 1, 2, 3)]
    assert subsets[0] == subsets[1] and len(set(subsets)) > 1
    assert parse_eval_config(eval_cfg("deepmath")).specs["deepmath"].max_problems == 500


def test_lgr_mean8_setting(fixtures_dir):
    lgr = parse_eval_config(eval_cfg("lgr"))
    six = ["aime24", "aime25", "aime26", "hmmt25_feb", "hmmt25_nov", "livecodebench_v6"]
    assert lgr.settings.benchmarks == six and lgr.settings.averages == {"lgr_mean8": six}
    assert lgr.settings.samples == 8  # mean@8 on every benchmark, whatever its own budget
    assert {s.samples for s in lgr.selected} == {32, 4}  # ... which it overrides


def test_files_are_read_by_suffix_unless_a_format_is_forced(tmp_path, fixtures_dir):
    rows = [{"problem_idx": 1, "problem": "1+1?", "answer": "2"}, {"problem_idx": 2, "problem": "2+2?", "answer": "4"}]
    path = tmp_path / "aime25.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ev = Evaluator(eval_cfg("aime25", f"eval.aime25.path={path}"))  # the public copy is parquet
    assert [p.id for p in ev.benchmarks["aime25"].problems] == ["1", "2"]
    with pytest.raises(BenchmarkDataError, match=r"aime25.jsonl is a jsonl file by its suffix, but "
                       r"eval.aime25.format=parquet forces parquet; set eval.aime25.format=null"):
        Evaluator(eval_cfg("aime25", f"eval.aime25.path={path}", "eval.aime25.format=parquet"))
    csv_copy = tmp_path / "aime25.csv"
    csv_copy.write_text("problem_idx,problem,answer\n1,1+1?,2\n")
    assert len(Evaluator(eval_cfg("aime25", f"eval.aime25.path={csv_copy}")).benchmarks["aime25"].problems) == 1


def test_a_copy_without_the_id_field_is_numbered(tmp_path, fixtures_dir, caplog):
    path = tmp_path / "aime.jsonl"
    path.write_text(json.dumps({"problem": "1+1?", "answer": "2"}) + "\n" + json.dumps({"problem": "2+2?", "answer": "4"}) + "\n")
    with caplog.at_level(logging.WARNING):
        ev = Evaluator(eval_cfg("aime25", f"eval.aime25.path={path}"))
    assert [p.id for p in ev.benchmarks["aime25"].problems] == ["0", "1"]
    assert "no row of" in caplog.text and "'problem_idx'" in caplog.text
    partial = tmp_path / "partial.jsonl"
    partial.write_text(json.dumps({"problem_idx": 1, "problem": "1+1?", "answer": "2"}) + "\n"
                       + json.dumps({"problem": "2+2?", "answer": "4"}) + "\n")
    with pytest.raises(BenchmarkDataError, match=r"partial.jsonl line 2: missing id \(field 'problem_idx'\)"):
        Evaluator(eval_cfg("aime25", f"eval.aime25.path={partial}"))
