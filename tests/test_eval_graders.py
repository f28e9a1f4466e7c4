"""Graders: math (math-verify), multiple choice (seeded shuffling, letter extraction), code
extraction and output comparison. Pure functions, no model, no subprocess."""

import pytest

from opd_lit.eval.graders import (
    LETTERS,
    extract_boxed,
    extract_choice,
    extract_code,
    format_choices,
    grade_choice,
    grade_math,
    grade_math_detail,
    shuffle_choices,
    strip_thinking,
)
from opd_lit.eval.programs import humaneval_program, same_stdout, same_value


def test_extract_boxed_and_grade_math_keep_working():
    assert extract_boxed("so \\boxed{\\frac{1}{2}} and then \\boxed{3}") == "3"
    assert extract_boxed("\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert extract_boxed("no box") is None
    assert extract_boxed("\\boxed{7} then \\boxed{unterminated") == "7"
    assert grade_math("The answer is \\boxed{0.5}.", "\\frac{1}{2}")
    assert grade_math("\\boxed{2\\sqrt{3}}", "\\sqrt{12}")
    assert not grade_math("\\boxed{3}", "4")
    assert not grade_math("4", "4")  # no boxed answer: wrong


def test_grade_math_detail_reports_what_it_read():
    g = grade_math_detail("work... \\boxed{ (0,1] }", "(0,1]")
    assert g.correct and g.extracted == "(0,1]"
    g = grade_math_detail("I give up", "3")
    assert not g.correct and g.extracted is None


def test_strip_thinking_keeps_the_final_part():
    assert strip_thinking("<think>\\boxed{1}</think>So \\boxed{2}") == "So \\boxed{2}"
    assert strip_thinking("<think>still thinking \\boxed{1}") == ""  # cut off while thinking
    assert strip_thinking("plain \\boxed{3}") == "plain \\boxed{3}"


def test_option_order_is_seeded_per_problem_and_sample():
    wrong = ["w1", "w2", "w3"]
    a = shuffle_choices("right", wrong, "rec1", 0)
    assert a == shuffle_choices("right", wrong, "rec1", 0)  # reproducible
    orders = {tuple(shuffle_choices("right", wrong, "rec1", s)[0]) for s in range(16)}
    assert len(orders) > 3  # samples see different orders
    for s in range(16):
        options, letter = shuffle_choices("right", wrong, "rec1", s)
        assert sorted(options) == sorted(["right", *wrong])
        assert options[LETTERS.index(letter)] == "right"
    assert {shuffle_choices("right", wrong, pid, 0)[1] for pid in map(str, range(40))} == set("ABCD")
    seeds = {tuple(shuffle_choices("right", wrong, "rec1", 0, seed=k)[0]) for k in range(8)}
    assert len(seeds) > 1  # the benchmark's seed changes the orders
    assert format_choices(["x", "y"]) == "A) x\nB) y"


@pytest.mark.parametrize(
    "text, letter",
    [
        ("Reasoning...\nAnswer: B", "B"),
        ("Answer: (c)", None),  # lower-case letters are not options
        ("... so the answer is (C).", "C"),
        ("Final: \\boxed{D}", "D"),
        ("\\boxed{\\text{A}}", "A"),
        ("The correct option is **B**", "B"),
        ("Option A looks wrong. Answer: **D**", "D"),
        ("First Answer: A, then on reflection Answer: C", "C"),
        ("blah\n(B)", "B"),
        ("Both seem plausible", None),
        ("Answer: E", None),  # only A-D with four options
    ],
)
def test_extract_choice(text, letter):
    assert extract_choice(text, 4) == letter


def test_grade_choice():
    assert grade_choice("Answer: C", "C").correct
    g = grade_choice("Answer: A", "C")
    assert not g.correct and g.extracted == "A"


def test_extract_code():
    two = "Plan\n```python\ndef helper():\n    pass\n```\nthen\n```python\ndef f(x):\n    return x\n```\nend"
    assert extract_code(two) == "def f(x):\n    return x\n"
    assert extract_code(two, entry_point="helper") == "def helper():\n    pass\n"
    assert extract_code("```\nprint(1)\n```") == "print(1)\n"
    assert extract_code("```python\ndef g():\n    return 2") == "def g():\n    return 2"  # cut off
    assert extract_code("```bash\nls\n```\n```py\nx = 1\n```") == "x = 1\n"
    assert extract_code("x = 1") == "x = 1"
    assert extract_code("   ") is None


def test_humaneval_program_keeps_prompt_imports_and_accepts_completions():
    prompt = 'from typing import List\n\ndef f(xs: List[int]) -> int:\n    """doc"""\n'
    full = humaneval_program(prompt, "def f(xs):\n    return len(xs)\n", "def check(c):\n    assert c([1]) == 1\n", "f")
    assert full.startswith(prompt) and "check(f)" in full
    compile(full, "p", "exec")
    body = humaneval_program(prompt, "    return len(xs)\n", "def check(c):\n    pass\n", "f")
    compile(body, "p", "exec")


def test_output_comparisons():
    assert same_stdout("3\n", "3")
    assert same_stdout("1 2  \n3\n\n", "1 2\n3")
    assert same_stdout("0.3333333\n", "0.33333333")
    assert not same_stdout("3\n4\n", "3")
    assert not same_stdout("abc", "abd")
    assert same_value([1, 2.0000000001], (1, 2))
    assert same_value({"a": [True]}, {"a": [True]})
    assert not same_value(True, 1)
    assert not same_value([1, 2], [2, 1])
