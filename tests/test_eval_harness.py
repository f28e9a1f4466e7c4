"""The evaluation harness end to end without a model: a byte-level fake tokenizer and a
scripted engine stand in for the model, so scores are known exactly; code benchmarks run
real programs in the sandbox; saved responses are re-graded."""

import json
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from opd_lit.eval import sandbox as sandbox_module
from opd_lit.eval.benchmarks import BenchmarkDataError
from opd_lit.eval.harness import Evaluator, result_table
from opd_lit.eval.sandbox import Isolation, UnsandboxedError, detect_isolation
from opd_lit.rollout import Generation

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "eval"
EOS = 256


class ByteTokenizer:
    """Enough of a tokenizer for the harness: UTF-8 bytes, a trivial chat template."""

    eos_token_id, pad_token_id = EOS, 257

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True, **kwargs):
        text = "".join(f"<|{m['role']}|>{m['content']}" for m in messages) + "<|assistant|>"
        return list(text.encode())

    def encode(self, text):
        return list(text.encode())

    def batch_decode(self, seqs, skip_special_tokens=True):
        return [bytes(t for t in s if t < 256).decode("utf-8", "replace") for s in seqs]


class ScriptedEngine:
    """Answers with ``respond(prompt_text, j)``; records the calls."""

    name = "scripted"
    engine_copy = False

    def __init__(self, respond, max_len: int | None = None):
        self.respond, self.max_len, self.calls = respond, max_len, []

    def generate(self, prompts, n, params):
        self.calls.append((len(prompts), n, params))
        tok = ByteTokenizer()
        out = []
        for p in prompts:
            text = bytes(p).decode()
            for j in range(n):
                ids = tok.encode(self.respond(text, j))
                limit = self.max_len or params.max_new_tokens
                out.append(ids[:limit] if len(ids) >= limit else ids + [EOS])
        return Generation(response_ids=out)

    def sync_weights(self, model):
        pass


JAIL = detect_isolation()
# Code benchmarks run in the jail; where this machine cannot build one, these tests (their
# programs are ours) allow running without it. The refusal itself: test_code_is_refused_...
CODE = () if JAIL.jailed else ("eval.allow_unsandboxed=true",)


def eval_cfg(name, *overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=[f"eval={name}", *overrides])
    return OmegaConf.to_container(cfg.eval, resolve=True)


@pytest.fixture(autouse=True)
def fixtures_dir(monkeypatch):
    monkeypatch.setenv("OPD_EVAL_DIR", str(FIXTURES))


def math_responder(evaluator):
    """Right on even samples, wrong on odd ones (so every avg@n is exactly 0.5 for n >= 2)."""
    golds = {}
    for bench in evaluator.benchmarks.values():
        for p in bench.problems:
            golds[p.data["problem"]] = p.data["answer"]

    def respond(prompt, j):
        gold = next(a for q, a in golds.items() if q in prompt)
        return f"<think>hmm \\boxed{{999}}</think>So the answer is \\boxed{{{gold if j % 2 == 0 else '-1'}}}."

    return respond


def test_math5_generation_scores_records_and_metrics():
    ev = Evaluator(eval_cfg("math5", "eval.batch_sequences=40"))
    engine = ScriptedEngine(math_responder(ev))
    result = ev.evaluate(engine, ByteTokenizer(), [EOS])
    scores = {n: r.score for n, r in result.results.items()}
    # samples per problem: 32, 32, 32, 1, 4 -> 0.5 everywhere but math500 (one sample, always right)
    assert scores == {"aime25": 0.5, "hmmt25_feb": 0.5, "hmmt25_nov": 0.5, "math500": 1.0, "minerva": 0.5}
    assert result.averages["math5_avg"] == pytest.approx((0.5 * 4 + 1.0) / 5)
    aime = result.results["aime25"]
    assert (aime.num_problems, aime.samples_per_problem, aime.num_samples) == (3, 32, 96)
    # 40 sequences per call at 32 samples -> one prompt per call for aime25
    assert [c[:2] for c in engine.calls[:3]] == [(1, 32), (1, 32), (1, 32)]
    assert engine.calls[0][2].temperature == 0.6 and engine.calls[0][2].max_new_tokens == 32768
    rec = aime.records[1]
    assert (rec.problem_id, rec.sample, rec.correct, rec.extracted, rec.gold) == ("1", 1, False, "-1", "23")
    assert aime.records[0].correct and aime.records[0].truncated is False
    m = result.metrics()
    assert m["eval/math5_avg"] == result.averages["math5_avg"]
    for name in scores:
        assert m[f"eval/{name}/score"] == scores[name]
        assert f"eval/{name}/extracted_frac" in m and f"eval/{name}/response_len_mean" in m
    lines = [json.loads(x) for x in result.samples_jsonl().splitlines()]
    assert len(lines) == 96 + 64 + 64 + 4 + 12
    assert set(lines[0]) >= {"benchmark", "problem_id", "sample", "response", "extracted", "correct"}
    result_table(result)  # renders


def test_global_overrides_and_truncation():
    ev = Evaluator(eval_cfg("math500", "eval.samples=2", "eval.max_new_tokens=16", "eval.temperature=1.0"))
    engine = ScriptedEngine(lambda prompt, j: "<think>" + "x" * 40)
    result = ev.evaluate(engine, ByteTokenizer(), [EOS])
    r = result.results["math500"]
    assert engine.calls[0][1] == 2 and engine.calls[0][2].max_new_tokens == 16
    assert engine.calls[0][2].temperature == 1.0
    assert r.score == 0.0 and r.truncated_frac == 1.0 and r.extracted_frac == 0.0
    assert r.records[0].detail.startswith("no final answer")


def test_gpqa_each_sample_sees_its_own_option_order():
    ev = Evaluator(eval_cfg("gpqa"))
    seen = []

    def respond(prompt, j):
        problem = next(p for p in ev.benchmarks["gpqa_diamond"].problems if p.data["question"] in prompt)
        letter = re.search(rf"^([A-D])\) {re.escape(problem.data['correct'])}(?:\n|<\|)", prompt, re.M).group(1)
        seen.append((problem.id, letter))
        return f"Reasoning.\nAnswer: {letter}"

    engine = ScriptedEngine(respond)
    result = ev.evaluate(engine, ByteTokenizer(), [EOS])
    r = result.results["gpqa_diamond"]
    assert r.score == 1.0 and r.num_samples == 12
    assert all(c[1] == 1 for c in engine.calls)  # one prompt per sample
    by_problem = {}
    for pid, letter in seen:
        by_problem.setdefault(pid, set()).add(letter)
    assert any(len(v) > 1 for v in by_problem.values())  # orders differ between samples
    assert [rec.gold for rec in r.records] == [letter for _, letter in seen]


def test_regrade_full_and_minimal_files(tmp_path):
    ev = Evaluator(eval_cfg("math5"))
    result = ev.evaluate(ScriptedEngine(math_responder(ev)), ByteTokenizer(), [EOS])
    full = tmp_path / "samples.jsonl"
    full.write_text(result.samples_jsonl())
    again = ev.regrade(full)
    assert {n: r.score for n, r in again.results.items()} == {n: r.score for n, r in result.results.items()}
    assert again.averages == result.averages

    one = Evaluator(eval_cfg("math500"))
    minimal = tmp_path / "minimal.jsonl"
    minimal.write_text(
        json.dumps({"unique_id": "test/prealgebra/1.json", "response": "\\boxed{2}"}) + "\n"
        + json.dumps({"unique_id": "test/prealgebra/2.json", "response": "\\boxed{0.5}"}) + "\n"
        + json.dumps({"problem_id": "test/algebra/3.json", "response": "\\boxed{6}"}) + "\n"
    )
    r = one.regrade(minimal).results["math500"]
    assert r.score == pytest.approx(2 / 3) and r.num_problems == 3 and r.missing_problems == 1

    bad = tmp_path / "bad.jsonl"
    bad.write_text(minimal.read_text() + '{"unique_id": "nope", "response": "x"}\n{"unique_id": \n')
    with pytest.raises(BenchmarkDataError, match=r"line 4: unknown math500 problem id 'nope'.*line 5"):
        one.regrade(bad)
    lenient = Evaluator(eval_cfg("math500", "eval.skip_bad_rows=true"))
    assert lenient.regrade(bad).results["math500"].num_problems == 3


def test_regrade_gpqa_uses_the_sample_index():
    ev = Evaluator(eval_cfg("gpqa"))
    bench = ev.benchmarks["gpqa_diamond"]
    p = bench.problems[0]
    lines = [json.dumps({"Record ID": p.id, "response": f"Answer: {bench.gold(p, s)}"}) for s in range(4)]
    path = Path(__import__("tempfile").mkdtemp()) / "gpqa.jsonl"
    path.write_text("\n".join(lines) + "\n")
    r = ev.regrade(path).results["gpqa_diamond"]
    assert r.score == 1.0 and [x.sample for x in r.records] == [0, 1, 2, 3]


CODE_RESPONSES = {
    # (benchmark, problem id): (right, wrong)
    ("humaneval", "FixtureEval/0"): ("```python\ndef add(a, b):\n    return a + b\n```", "```python\ndef add(a, b):\n    return a - b\n```"),
    ("humaneval", "FixtureEval/1"): (
        "Here:\n```python\ndef running_max(xs: List[int]) -> List[int]:\n    out = []\n    for x in xs:\n"
        "        out.append(x if not out else max(out[-1], x))\n    return out\n```",
        "```python\nimport os\nos.system('true')\n```",
    ),
    ("mbpp", "11"): ("```python\ndef square(x):\n    return x ** 2\n```", "```python\ndef square(x):\n    return 2 * x\n```"),
    ("mbpp", "12"): ("```python\ndef shift(x):\n    return OFFSET + x\n```", "no code, sorry"),
    ("livecodebench_v6", "fx-sum"): (
        "```python\na, b = map(int, input().split())\nprint(a + b)\n```",
        "```python\nprint(3)\n```",  # passes the public test only
    ),
    ("livecodebench_v6", "fx-pair"): (
        "```python\nclass Solution:\n    def maxPair(self, nums: List[int]) -> int:\n"
        "        s = sorted(nums)\n        return s[-1] + s[-2]\n```",
        "```python\nclass Solution:\n    def maxPair(self, nums):\n        return max(nums)\n```",
    ),
}


def test_code_benchmarks_run_the_programs(tmp_path):
    ev = Evaluator(eval_cfg("code", *CODE))
    rows = []
    for (bench, pid), (right, wrong) in CODE_RESPONSES.items():
        rows.append({"benchmark": bench, "problem_id": pid, "response": right})
        rows.append({"benchmark": bench, "problem_id": pid, "response": wrong})
    path = tmp_path / "code.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = ev.regrade(path)
    for name, r in result.results.items():
        assert [rec.correct for rec in r.records] == [True, False] * 2, (name, [rec.detail for rec in r.records])
        assert r.score == 0.5
    assert result.averages["code_avg"] == 0.5
    metrics = result.metrics()
    assert {metrics[f"eval/{n}/isolation"] for n in result.results} == {ev.sandbox.isolation.level}
    details = {(rec.benchmark, rec.problem_id, rec.sample): rec.detail for r in result.results.values() for rec in r.records}
    assert details[("livecodebench_v6", "fx-sum", 1)].startswith("test 1: fail: wrong answer")
    assert details[("mbpp", "12", 1)].startswith("fail")


def test_hostile_programs_are_scored_wrong_and_evaluation_goes_on(tmp_path):
    ev = Evaluator(eval_cfg("humaneval", "eval.humaneval.timeout_s=1.5", "eval.sandbox.memory_mb=512", *CODE))
    hostile = [
        "```python\ndef add(a, b):\n    while True:\n        pass\n```",
        "```python\nimport subprocess, sys\nfor _ in range(10):\n"
        "    subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)'])\n"
        "def add(a, b):\n    import time; time.sleep(30)\n```",
        "```python\nx = bytearray(10 * 2**30)\ndef add(a, b):\n    return a + b\n```",
        "```python\ndef add(a, b):\n    return a + b\n```",
    ]
    path = tmp_path / "hostile.jsonl"
    path.write_text("".join(json.dumps({"task_id": "FixtureEval/0", "response": h}) + "\n" for h in hostile))
    r = ev.regrade(path).results["humaneval"]
    assert [rec.correct for rec in r.records] == [False, False, False, True]
    assert [rec.detail for rec in r.records[:3]] == [
        "timeout", "timeout", "fail: the candidate did not load: MemoryError"]
    assert r.score == 0.25


class RecordingLogger:
    def __init__(self, log_dir):
        self.log_dir, self.logged = str(log_dir), []

    def log_metrics(self, metrics, step):
        self.logged.append((step, dict(metrics)))


def test_callback_runs_at_start_every_n_steps_and_at_the_end(tmp_path):
    from types import SimpleNamespace

    from opd_lit.eval.callback import EvalCallback

    cb = EvalCallback(**eval_cfg("math500", "eval.every_n_steps=2", "eval.at_start=true"))
    ev = cb.evaluator
    engine = ScriptedEngine(math_responder(ev))
    dm = SimpleNamespace(
        student_tokenizer=ByteTokenizer(), eos_ids=[EOS], student_template_kwargs={},
        prepare_tokenizers=lambda: None,
    )
    module = SimpleNamespace(parts=SimpleNamespace(engine=engine))  # the step's rollout engine
    logger = RecordingLogger(tmp_path)
    trainer = SimpleNamespace(datamodule=dm, global_step=0, max_steps=5, loggers=[logger], callbacks=[])
    cb.on_train_start(trainer, module)
    for step in range(1, 6):
        trainer.global_step = step
        cb.on_train_batch_end(trainer, module, None, None, step - 1)
    cb.on_train_end(trainer, module)
    steps = [s for s, m in logger.logged if "eval/math500/score" in m]
    assert steps == [0, 2, 4, 5]
    assert [row["step"] for row in cb.history] == [0, 2, 4, 5]
    assert all(row["eval/math500/score"] == 1.0 for row in cb.history)
    assert (tmp_path / "eval" / "math500" / "samples-step000004.jsonl").is_file()


def test_code_is_refused_without_the_jail_unless_allowed(monkeypatch, tmp_path):
    none = Isolation("none", reason="no namespaces in this test")
    monkeypatch.setattr(sandbox_module, "detect_isolation", lambda mode=None: none)
    with pytest.raises(UnsandboxedError, match="eval.allow_unsandboxed=true"):
        Evaluator(eval_cfg("humaneval"))  # before any model would be loaded
    Evaluator(eval_cfg("math500"))  # no programs, nothing to refuse
    ev = Evaluator(eval_cfg("humaneval", "eval.allow_unsandboxed=true"))
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"task_id": "FixtureEval/0", "response": CODE_RESPONSES[("humaneval", "FixtureEval/0")][0]}) + "\n")
    result = ev.regrade(path)
    assert result.metrics()["eval/humaneval/isolation"] == 0.0 and result.results["humaneval"].score == 1.0


def test_gpqa_a_response_cut_at_the_budget_has_no_answer():
    ev = Evaluator(eval_cfg("gpqa", "eval.max_new_tokens=40"))
    bench = ev.benchmarks["gpqa_diamond"]

    def respond(prompt, j):
        p = next(p for p in bench.problems if p.data["question"] in prompt)
        letter = re.search(rf"^([A-D])\) {re.escape(p.data['correct'])}(?:\n|<\|)", prompt, re.M).group(1)
        return f"Answer: {letter}\nLet me double check this by going through each option again"

    cut = ev.evaluate(ScriptedEngine(respond), ByteTokenizer(), [EOS]).results["gpqa_diamond"]
    assert cut.truncated_frac == 1.0 and cut.score == 0.0
    assert {r.detail for r in cut.records} == {"cut off at the token budget: no final answer"}
    whole = Evaluator(eval_cfg("gpqa")).evaluate(ScriptedEngine(respond), ByteTokenizer(), [EOS])
    assert whole.results["gpqa_diamond"].score == 1.0


def test_regrade_reads_key_aliases_and_titles_and_names_unknown_benchmarks(tmp_path, caplog):
    ev = Evaluator(eval_cfg("math500"))
    path = tmp_path / "r.jsonl"
    path.write_text(
        json.dumps({"dataset": "MATH500", "id": "test/prealgebra/1.json", "completion": "\\boxed{2}"}) + "\n"
        + json.dumps({"benchmark": "math500", "unique_id": "test/prealgebra/2.json", "output": "\\boxed{0.5}"}) + "\n"
        + json.dumps({"benchmark": "AIME25", "problem_id": "1", "response": "\\boxed{23}"}) + "\n"  # not selected
    )
    with caplog.at_level("WARNING"):
        r = ev.regrade(path).results["math500"]
    assert (r.num_samples, r.score) == (2, 1.0)
    assert "skipped: {'aime25': 1}" in caplog.text
    typo = tmp_path / "typo.jsonl"
    typo.write_text(json.dumps({"benchmark": "MATH-500", "id": "test/prealgebra/1.json", "response": "x"}) + "\n"
                    + json.dumps({"benchmark": "MATH-500", "id": "test/prealgebra/2.json", "response": "x"}) + "\n")
    with pytest.raises(BenchmarkDataError, match=r"unknown benchmark\(s\) 'MATH-500' \(lines 1, 2\).*'math500'"):
        ev.regrade(typo)
