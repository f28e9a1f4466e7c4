"""Tests of the embedded toy pair: task, tokenizer, shipped assets, build pipeline, grader."""

from __future__ import annotations

import dataclasses
import re
import shutil
import threading

import pytest

from opd_lit.eval.graders import extract_boxed, grade_math
from opd_lit.toy import task as T
from opd_lit.toy.cache import ASSETS_DIR, ToyAssetError, toy_model_dir, verify_assets
from opd_lit.toy.recipe import (
    ROLES,
    default_recipe,
    recipe_hash,
    toy_eval_problems,
    toy_train_problems,
)
from opd_lit.toy.tokenizer import DEFAULT_SYSTEM_PROMPT, IM_END, IM_START, PAD_TOKEN

P = T.DEFAULT_TASK


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models on shared cores: one thread avoids OpenMP stalls (seen: 300 s vs 3 s)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

# ----------------------------------------------------------------------------- task

_Q = re.compile(r"^Start with (\d+)\. (.+)\. What is the result\?$")
_CLAUSE = re.compile(r"^(add|subtract|multiply by) (\d+)$")
_STEP = re.compile(r"^(First|Next|Finally), (\d+) ([-+*]) (\d+) = (\d+)\.$")
_OPS = {"add": "+", "subtract": "-", "multiply by": "*"}


def _check_problem(p: dict) -> None:
    """Recompute everything stated in a problem from its text alone."""
    assert set(p) == {"id", "question", "answer", "solution", "wording"}
    m = _Q.match(p["question"])
    assert m, p["question"]
    start = int(m.group(1))
    clauses = [c.strip() for c in m.group(2).split(", then ")]
    clauses[0] = clauses[0][0].lower() + clauses[0][1:]
    ops = []
    for c in clauses:
        cm = _CLAUSE.match(c)
        assert cm, c
        ops.append((_OPS[cm.group(1)], int(cm.group(2))))
    assert P.min_steps <= len(ops) <= P.max_steps
    assert 0 <= start <= P.start_max

    # One sentence per step, the boxed answer sentence, then the check lines.
    sentences = re.split(r"(?<=\.) ", p["solution"])
    checks = sentences[len(ops) + 1 :]
    assert P.min_checks <= len(checks) <= P.max_checks, p["solution"]
    assert sentences[len(ops)] == f"The answer is \\boxed{{{p['answer']}}}."
    assert checks == T.check_lines(p["solution"])
    for line in checks:
        words = line[:-1]
        for options in T.CHECK_SLOTS:  # each slot filled with one of its options, in order
            opt = next((o for o in options if words.startswith(o)), None)
            assert opt is not None, line
            if p["wording"] == "fixed":
                assert opt == options[0], line
            words = words[len(opt) :].lstrip()
        assert words == "", line
    value = start
    for i, (sentence, (op, x)) in enumerate(zip(sentences, ops)):
        sm = _STEP.match(sentence)
        assert sm, sentence
        lead, a, sop, b, c = sm.groups()
        assert lead == ("First" if i == 0 else "Finally" if i == len(ops) - 1 else "Next")
        a, b, c = int(a), int(b), int(c)
        assert (a, sop, b) == (value, op, x)
        want = {"+": a + b, "-": a - b, "*": a * b}[sop]
        assert c == want, sentence
        if sop == "*":
            assert P.mul_min <= b <= P.mul_max
        else:
            assert 0 <= b <= P.addend_max
        assert 0 <= c <= P.value_max
        value = c
    assert p["answer"] == str(value)
    assert extract_boxed(p["solution"]) == p["answer"]


def test_problems_deterministic_per_seed():
    a = T.make_problems("train", 200, seed=7)
    assert a == T.make_problems("train", 200, seed=7)
    assert a != T.make_problems("train", 200, seed=8)
    # Prefix-stable: a smaller n gives the first problems of a larger n.
    assert T.make_problems("eval", 20, seed=3) == T.make_problems("eval", 50, seed=3)[:20]
    assert len({p["id"] for p in a}) == 200 and len({p["question"] for p in a}) == 200


def test_problem_arithmetic_and_ranges():
    probs = T.make_problems("train", 600, seed=0) + T.make_problems("eval", 300, seed=1)
    for p in probs:
        _check_problem(p)
    n_steps = {len(T.solution_steps(p["solution"])) for p in probs}
    assert n_steps == set(range(P.min_steps, P.max_steps + 1))
    ops = {op for p in probs for _, op, _, _ in T.solution_steps(p["solution"])}
    assert ops == {"+", "-", "*"}


def test_check_wordings():
    """free: the check lines' words vary (the low-contrast mechanism); fixed: one line.
    The arithmetic and the number of check lines do not depend on the wording."""
    free = T.make_problems("train", 300, seed=0, wording="free")
    fixed = T.make_problems("train", 300, seed=0, wording="fixed")
    mixed = T.make_problems("train", 300, seed=0, wording="mixed")
    for a, b, c in zip(free, fixed, mixed):
        assert a["question"] == b["question"] == c["question"] and a["answer"] == b["answer"]
        assert len(T.check_lines(a["solution"])) == len(T.check_lines(b["solution"]))
        assert c["solution"] == (a if c["wording"] == "free" else b)["solution"]
    fixed_lines = {line for p in fixed for line in T.check_lines(p["solution"])}
    assert fixed_lines == {"Let me check this again."}
    free_lines = [line for p in free for line in T.check_lines(p["solution"])]
    # 81 possible lines; every slot's options all occur, each about a third of the time
    for options in T.CHECK_SLOTS:
        for o in options:
            share = sum(f" {o} " in f" {line[:-1]} " for line in free_lines) / len(free_lines)
            assert 0.2 < share < 0.47, (o, share)
    assert 0.3 < sum(p["wording"] == "free" for p in mixed) / len(mixed) < 0.7
    # the prompt names the wording
    assert T.format_prompt(free[0])[0]["content"] != T.format_prompt(fixed[0])[0]["content"]
    assert T.format_prompt(free[0]["question"], "fixed") == T.format_prompt(fixed[0])
    with pytest.raises(ValueError, match="free"):
        T.make_problems("train", 3, seed=0, wording="loose")


def test_train_eval_disjoint():
    train = T.make_problems("train", 6000, seed=0) + toy_train_problems(2000)
    evals = toy_eval_problems(256)
    assert len(evals) == 256
    assert not {p["question"] for p in train} & {p["question"] for p in evals}
    assert all(T.question_split(p["question"]) == "eval" for p in evals)
    assert all(T.question_split(p["question"]) == "train" for p in train[:500])


def test_bad_split_rejected():
    with pytest.raises(ValueError):
        T.make_problems("test", 3, seed=0)


def test_format_prompt():
    p = T.make_problems("eval", 1, seed=0)[0]
    msgs = T.format_prompt(p)
    assert len(msgs) == 1 and msgs[0]["role"] == "user"
    assert msgs[0]["content"].startswith(p["question"]) and "\\boxed{}" in msgs[0]["content"]
    assert T.format_prompt(p["question"]) == msgs


# ----------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """Freshly built tokenizers of both roles, saved and reloaded through AutoTokenizer."""
    from transformers import AutoTokenizer

    from opd_lit.toy.build import build_tokenizer

    out = {}
    for role in ROLES:
        d = tmp_path_factory.mktemp(f"tok_{role}")
        build_tokenizer(default_recipe(), role).save_pretrained(str(d))
        out[role] = AutoTokenizer.from_pretrained(str(d))
    return out


def test_tokenizer_vocab_and_digits(tokenizers):
    tok = tokenizers["student"]
    assert tok.get_vocab() == tokenizers["teacher"].get_vocab()
    assert len(tok) == default_recipe().tokenizer.vocab_size
    # every check-line word is one token (so a slot's choice is one next-token decision)
    for options in T.CHECK_SLOTS:
        for word in options:
            for w in word.split():
                assert len(tok(" " + w, add_special_tokens=False)["input_ids"]) == 1, w
    for special in (PAD_TOKEN, IM_START, IM_END):
        assert special in tok.get_vocab()
    assert tok.eos_token == IM_END and tok.pad_token == PAD_TOKEN
    # No vocabulary entry holds more than one digit.
    assert all(sum(ch.isdigit() for ch in t) <= 1 for t in tok.get_vocab())
    ids = tok("First, 123 + 45 = 168. \\boxed{9075}", add_special_tokens=False)["input_ids"]
    pieces = [tok.decode([i]) for i in ids]
    digit_pieces = [s.strip() for s in pieces if any(c.isdigit() for c in s)]
    assert digit_pieces == list("123451689075")


def test_tokenizer_round_trip(tokenizers):
    tok = tokenizers["teacher"]
    for p in T.make_problems("eval", 30, seed=2):
        for text in (p["question"], p["solution"], T.format_prompt(p)[0]["content"]):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert tok.decode(ids) == text
    text = f"{IM_START}user\nStart with 5.{IM_END}\n"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_chat_templates(tokenizers):
    msgs = T.format_prompt(T.make_problems("eval", 1, seed=0)[0])
    content = msgs[0]["content"]
    user_turn = f"{IM_START}user\n{content}{IM_END}\n{IM_START}assistant\n"
    student = tokenizers["student"].apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    teacher = tokenizers["teacher"].apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert student == user_turn
    assert teacher == f"{IM_START}system\n{DEFAULT_SYSTEM_PROMPT}{IM_END}\n" + user_turn
    # An explicit system turn replaces the teacher's default one.
    sys_msgs = [{"role": "system", "content": "Be brief."}] + msgs
    with_sys = tokenizers["teacher"].apply_chat_template(sys_msgs, add_generation_prompt=True, tokenize=False)
    assert with_sys == f"{IM_START}system\nBe brief.{IM_END}\n" + user_turn
    # tokenize=True (a dict-like in transformers 5) matches tokenizing the rendered text.
    for role, text in (("student", student), ("teacher", teacher)):
        tok = tokenizers[role]
        enc = tok.apply_chat_template(msgs, add_generation_prompt=True)
        ids = enc["input_ids"] if hasattr(enc, "keys") else enc
        assert list(ids) == tok(text, add_special_tokens=False)["input_ids"]
    no_gen = tokenizers["student"].apply_chat_template(msgs, add_generation_prompt=False, tokenize=False)
    assert no_gen == f"{IM_START}user\n{content}{IM_END}\n"


# ----------------------------------------------------------------------------- shipped assets


def test_teacher_contrast_falls_on_free_check_lines():
    """The toy's documented mechanism, on the shipped pair: with the free wording the
    teacher's margin among the student's top-8 collapses on the check lines (several words
    equally right), with the fixed wording it stays as high as on the arithmetic."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opd_lit.toy.contrast import sentence_margins

    models, toks = {}, {}
    for role in ROLES:
        d = toy_model_dir(role, build=False)
        models[role] = AutoModelForCausalLM.from_pretrained(str(d)).eval()
        toks[role] = AutoTokenizer.from_pretrained(str(d))
    m = {
        w: sentence_margins(toy_eval_problems(24, wording=w), models["student"], models["teacher"], toks)
        for w in T.WORDINGS
    }
    assert m["free"]["steps"] > 5.0 and m["fixed"]["steps"] > 5.0  # the arithmetic is determined
    for check in ("check 1", "check 2"):
        assert m["free"][check] < 0.5 * m["free"]["steps"], m
        assert m["fixed"][check] > 0.7 * m["fixed"]["steps"], m


def test_shipped_assets_verify_and_load():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    manifest = verify_assets()
    assert manifest["recipe_hash"] == recipe_hash()
    assert manifest["teacher_accuracy"] >= 0.95  # near the ceiling
    assert 0.15 <= manifest["student_accuracy"] <= 0.35  # headroom to learn
    assert set(manifest["train_seconds"]) == set(ROLES)
    total = sum(p.stat().st_size for p in ASSETS_DIR.rglob("*") if p.is_file())
    assert total < 8 * 2**20
    models, toks = {}, {}
    for role in ROLES:
        d = toy_model_dir(role, build=False)  # never a real (minutes-long) build in tests
        assert d == ASSETS_DIR / role
        models[role] = AutoModelForCausalLM.from_pretrained(str(d))
        toks[role] = AutoTokenizer.from_pretrained(str(d))
        eos = toks[role].convert_tokens_to_ids(IM_END)
        assert models[role].config.model_type == "qwen3"
        assert models[role].generation_config.eos_token_id == eos
        assert models[role].generation_config.pad_token_id == toks[role].pad_token_id
    assert models["teacher"].config.vocab_size == models["student"].config.vocab_size
    assert models["teacher"].config.vocab_size >= len(toks["teacher"])
    assert toks["teacher"].get_vocab() == toks["student"].get_vocab()
    assert toks["teacher"].chat_template != toks["student"].chat_template
    n = {r: sum(p.numel() for p in m.parameters()) for r, m in models.items()}
    assert n["teacher"] > 1.8 * n["student"]  # twice the depth at the same width
    assert models["teacher"].config.head_dim == models["student"].config.head_dim == 32


def test_shipped_teacher_solves_problems():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opd_lit.toy.build import greedy_accuracy, greedy_generate

    d = toy_model_dir("teacher", build=False)
    model = AutoModelForCausalLM.from_pretrained(str(d))
    tok = AutoTokenizer.from_pretrained(str(d))
    probs = toy_eval_problems(16)
    assert greedy_accuracy(model, tok, probs, batch_size=16) >= 0.75
    out = greedy_generate(model, tok, probs[:2], max_new_tokens=96)
    assert all(extract_boxed(r) is not None for r in out)


def test_tampered_assets_fail_verification(tmp_path):
    root = tmp_path / "assets"
    shutil.copytree(ASSETS_DIR, root)
    verify_assets(root)  # the untouched copy verifies
    target = root / "teacher" / "model.safetensors"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(ToyAssetError, match="teacher/model.safetensors"):
        verify_assets(root)
    verify_assets(root, roles=["student"])  # the other role is still intact
    (root / "student" / "config.json").unlink()
    with pytest.raises(ToyAssetError, match="student/config.json"):
        verify_assets(root, roles=["student"])


def test_recipe_hash_tracks_hyperparameters():
    r = default_recipe()
    h = recipe_hash(r)
    assert h == recipe_hash(default_recipe()) and re.fullmatch(r"[0-9a-f]{64}", h)
    lr = r.replace(teacher_train=dataclasses.replace(r.teacher_train, lr=r.teacher_train.lr * 2))
    steps = r.replace(student_train=dataclasses.replace(r.student_train, steps=r.student_train.steps + 1))
    task = r.replace(task=dataclasses.replace(r.task, value_max=r.task.value_max + 1))
    width = r.replace(student_model=dataclasses.replace(r.student_model, hidden_size=96))
    seed = r.replace(eval_problem_seed=r.eval_problem_seed + 1)
    hashes = {recipe_hash(x) for x in (r, lr, steps, task, width, seed)}
    assert len(hashes) == 6
    with pytest.raises(ToyAssetError, match="recipe hash"):
        verify_assets(ASSETS_DIR, recipe=lr)


def test_unknown_role():
    with pytest.raises(ValueError, match="teacher.*student"):
        toy_model_dir("oracle")


# ----------------------------------------------------------------------------- build pipeline


def _tiny_recipe():
    from opd_lit.toy.recipe import ModelParams, TrainParams
    from opd_lit.toy.tokenizer import TokenizerParams

    small = ModelParams(
        num_hidden_layers=1, hidden_size=32, num_attention_heads=1, num_key_value_heads=1,
        head_dim=32, intermediate_size=64,
    )
    train = TrainParams(steps=3, batch_size=4, warmup_steps=1, bucket_batches=2)
    return default_recipe().replace(
        tokenizer=TokenizerParams(corpus_problems=300),
        teacher_model=small, teacher_train=train,
        student_model=small, student_train=dataclasses.replace(train, seed=5),
        eval_problems=4, eval_max_new_tokens=8,
    )


def test_build_pipeline_end_to_end(tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opd_lit.toy import build as B

    recipe = _tiny_recipe()
    manifest = B.build_all(tmp_path / "out", recipe, evaluate=False, progress=False)
    assert manifest["recipe_hash"] == recipe_hash(recipe) != recipe_hash()
    verify_assets(tmp_path / "out", recipe=recipe)
    for role in ROLES:
        d = tmp_path / "out" / role
        model = AutoModelForCausalLM.from_pretrained(str(d))
        tok = AutoTokenizer.from_pretrained(str(d))
        msgs = T.format_prompt(T.make_problems("eval", 1, seed=0)[0])
        enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt")
        ids = enc["input_ids"]
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=3)
        assert out.shape[1] <= ids.shape[1] + 3

    # The cache path: builds once into $OPD_LIT_CACHE/toy/<hash>/<role>, then reuses it.
    monkeypatch.setenv("OPD_LIT_CACHE", str(tmp_path / "cache"))
    d = toy_model_dir("student", recipe=recipe)
    assert d == tmp_path / "cache" / "toy" / recipe_hash(recipe) / "student"
    assert (d / "model.safetensors").is_file()

    def no_build(*a, **k):
        raise AssertionError("should not rebuild a verified cache entry")

    monkeypatch.setattr(B, "build_into_cache", no_build)
    assert toy_model_dir("student", recipe=recipe) == d
    with pytest.raises(ToyAssetError):
        toy_model_dir("teacher", recipe=recipe, build=False)


def test_lr_schedule():
    from opd_lit.toy.build import lr_at
    from opd_lit.toy.recipe import TrainParams

    tp = TrainParams(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.05)
    assert lr_at(0, tp) == pytest.approx(0.1)
    assert lr_at(9, tp) == pytest.approx(1.0)
    assert lr_at(10, tp) == pytest.approx(1.0)
    assert lr_at(99, tp) == pytest.approx(0.05, abs=1e-3)
    assert all(lr_at(s, tp) >= lr_at(s + 1, tp) for s in range(10, 99))


# ----------------------------------------------------------------------------- grader


@pytest.mark.parametrize(
    "response, gold, ok",
    [
        ("First, 2 + 3 = 5. The answer is \\boxed{5}.", "5", True),
        ("The answer is \\boxed{6}.", "5", False),
        ("The answer is 5.", "5", False),  # no boxed answer
        ("", "5", False),
        ("\\boxed{4} then corrected: \\boxed{5}", "5", True),  # the last box counts
        ("\\boxed{5} then corrected: \\boxed{4}", "5", False),
        ("\\boxed{\\frac{1}{2}}", "0.5", True),  # nested braces
        ("\\boxed{0.5}", "1/2", True),
        ("\\boxed{1/2}", "\\frac{1}{2}", True),
        ("\\boxed{0.5}", "1/3", False),
        ("\\boxed{187}", "\\boxed{187}", True),
        ("\\boxed{}", "0", False),
    ],
)
def test_grade_math(response, gold, ok):
    assert grade_math(response, gold) is ok


def test_extract_boxed():
    assert extract_boxed("a \\boxed{1} b \\boxed{\\frac{3}{4}} c") == "\\frac{3}{4}"
    assert extract_boxed("\\boxed{{2}}") == "{2}"
    assert extract_boxed("no box") is None
    assert extract_boxed("\\boxed{7} and \\boxed{8") == "7"  # unterminated last box


def test_grade_math_off_main_thread():
    result = []
    t = threading.Thread(target=lambda: result.append(grade_math("\\boxed{0.5}", "1/2")))
    t.start()
    t.join()
    assert result == [True]


def test_training_and_eval_prompts_follow_data_check_wording():
    """data.check_wording reaches the training prompts and, through eval.toy.check_wording,
    the evaluation prompts; an unknown wording is refused by name."""
    from opd_lit.data.prompts import toy_records
    from opd_lit.eval.benchmarks import TASKS, BenchmarkSpec, load_problems

    for wording in T.WORDINGS:
        rec = toy_records(2, wording)[0]
        assert rec["messages"][0]["content"].endswith(T.INSTRUCTIONS[wording])
        spec = BenchmarkSpec.from_dict("toy", {"task": "toy", "grader": "math", "check_wording": wording})
        problem = load_problems(spec, limit=1)[0]
        msgs = TASKS["toy"].messages(problem, spec, 0)
        assert msgs[-1]["content"].endswith(T.INSTRUCTIONS[wording])
    with pytest.raises(ValueError, match="check_wording"):
        BenchmarkSpec.from_dict("toy", {"task": "toy", "grader": "math", "check_wording": "loose"})
