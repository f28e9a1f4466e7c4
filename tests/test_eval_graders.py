"""Graders: math (numbers in every written form, tolerances, percent, hedges, the symbolic
worker and its timeout), multiple choice (one final answer or none), code extraction and
output comparison. No model, no sandbox."""

import threading
import time
from fractions import Fraction

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
    parse_number,
    shuffle_choices,
    strip_thinking,
)
from opd_lit.eval.programs import humaneval_module, same_stdout, same_value


def boxed(x: str) -> str:
    return f"Some work.\n\nThe answer is $\\boxed{{{x}}}$."


def test_extract_boxed():
    assert extract_boxed("so \\boxed{\\frac{1}{2}} and then \\boxed{3}") == "3"
    assert extract_boxed("\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert extract_boxed("no box") is None
    assert extract_boxed("\\boxed{7} then \\boxed{unterminated") == "7"
    assert extract_boxed("\\boxed {  8 }") == "8"


def test_extract_boxed_is_linear_on_hostile_input():
    hostile = "\\boxed{" * 20000 + "x" * 100_000
    t0 = time.perf_counter()
    assert extract_boxed(hostile) is None
    assert extract_boxed(hostile + "\\boxed{5}") == "5"
    assert time.perf_counter() - t0 < 1.0  # the quadratic version took 30 s on this input


@pytest.mark.parametrize("gold, pred, ok", [
    # integers are exact
    ("204", "204", True), ("204", "205", False), ("33", "033", True), ("12", "12.0", True),
    ("12", "12.0001", False), ("1000", "1,000", True), ("1000", "1{,}000", True), ("1000", "1\\,000", True),
    ("1000000", "10^{6}", True), ("7", "x = 7", True), ("-3", "3", False), ("6", "\\text{6}", True),
    ("5", "\\$5", True), ("90", "90^\\circ", True), ("1", "0.99999999999", False),
    # fractions
    ("\\frac{1}{2}", "0.5", True), ("\\frac{1}{2}", "1/2", True), ("0.5", "\\frac12", True),
    ("\\frac{1}{3}", "0.3333", False), ("-\\frac{3}{4}", "-0.75", True), ("\\frac{7}{2}", "3\\frac{1}{2}", True),
    # decimals: relative tolerance 1e-4
    ("6.5", "6.50", True), ("6.5", "6.5004", True), ("6.5", "6.6", False), ("0.088", "0.09", False),
    # scientific notation, every written form; tiny magnitudes compare relatively
    ("1.6 \\times 10^{-19}", "1.7 \\times 10^{-19}", False),
    ("1.6 \\times 10^{-19}", "1.6e-19", True), ("1.6 \\times 10^{-19}", "1.6E-19", True),
    ("1.6 \\times 10^{-19}", "1.6\\cdot10^{-19}", True), ("1.6 \\times 10^{-19}", "1.6 x 10^-19", True),
    ("1.6 \\times 10^{-19}", "1.6*10^(-19)", True), ("1.6 \\times 10^{-19}", "16 \\times 10^{-20}", True),
    ("1.6 \\times 10^{-19}", "1.6 \\times 10^{19}", False), ("1.6 \\times 10^{-19}", "10^{-19}", False),
    ("1.6 \\times 10^{-19}", "1.6 \\times 10^{-19} \\text{ C}", True),
    # ... a decimal mantissa states the gold's precision: half a unit of its last digit
    ("1.6 \\times 10^{-19}", "1.602 \\times 10^{-19}", True), ("1.6 \\times 10^{-19}", "1.66e-19", False),
    ("3 \\times 10^{8}", "3.1e8", False), ("3 \\times 10^{8}", "300000000", True),
    ("1.6e-19", "0", False), ("0", "1.6e-19", False),
    # percent: the number or its hundredth
    ("25", "25\\%", True), ("25\\%", "25", True), ("25\\%", "0.25", True), ("0.25", "25\\%", True),
    ("25", "0.25", False), ("40", "45\\%", False),
    # words, symbolic (math-verify in the worker)
    ("\\text{Yes}", "yes", True), ("yes", "sey", False), ("3", "\\sqrt{9}", True), ("1", "1 - 10^{-20}", False),
    ("2\\sqrt{3}", "\\sqrt{12}", True), ("2\\sqrt{3}", "3\\sqrt{2}", False), ("(0,1]", "(0, 1]", True),
    ("(0,1]", "[0,1]", False), ("0.5", "\\frac{\\sqrt{4}}{4}", True),
    # hedges inside one box; one value written twice is not one
    ("3", "3 \\text{ or } 4", False), ("3", "3, 4", False), ("3", "\\pm 3", False),
    ("\\frac{1}{2}", "\\frac{1}{2} \\text{ or } 0.5", True),
    # forms found by the held-out cases
    ("\\frac{5}{3}", "1.\\overline{6}", True), ("2", "\\text{two}", True), ("e", "e^1", True),
    ("\\text{(B)}", "B", True), ("\\text{(B)}", "C", False),
])
def test_grade_math(gold, pred, ok):
    assert grade_math(boxed(pred), gold) is ok


def test_parse_number_reads_the_written_forms():
    n = parse_number("1.6 \\times 10^{-19}")
    assert n.value == Fraction(16, 10**20) and not n.exact and n.half_ulp == Fraction(5, 10**21)
    assert parse_number("-1.25e-3").value == Fraction(-125, 100000)
    assert parse_number("16 \\times 10^{-20}").half_ulp is None  # no decimal point: no stated precision
    assert parse_number("\\dfrac{3}{4}").value == Fraction(3, 4) and parse_number("\\dfrac{3}{4}").exact
    assert parse_number("12").exact and not parse_number("12.0").exact
    assert parse_number("25\\%").percent and parse_number("25\\%").value == 25
    assert parse_number("10^{10^{10}}") is None and parse_number("abc") is None
    assert parse_number("10^{99999}") is None  # exponents are bounded


def test_two_boxes_joined_by_or_are_a_hedge():
    hedge = "It is $\\boxed{3}$ or $\\boxed{4}$."
    assert not grade_math(hedge, "3") and not grade_math(hedge, "4")
    assert "hedge" in grade_math_detail(hedge, "4").detail
    assert grade_math("First $\\boxed{4}$; no, checking again: $\\boxed{5}$.", "5")


def test_grade_math_keeps_its_contract():
    assert not grade_math("4", "4")  # no boxed answer
    assert not grade_math("\\boxed{}", "0")
    assert grade_math("\\boxed{187}", "\\boxed{187}")  # a gold that is itself boxed
    g = grade_math_detail("work... \\boxed{ (0,1] }", "(0,1]")
    assert g.correct and g.extracted == "(0,1]"


def test_symbolic_timeout_works_off_the_main_thread():
    out = []

    def grade():
        t0 = time.perf_counter()
        out.append((grade_math_detail(boxed("(x+1)^{2000}"), "x^2", timeout_s=1.0), time.perf_counter() - t0))

    grade_math(boxed("\\sqrt{4}"), "2")  # the worker is up
    t = threading.Thread(target=grade)
    t.start()
    t.join(timeout=30)
    (g, seconds), = out
    assert not g.correct and "took over 1s" in g.detail
    assert seconds < 5
    assert grade_math(boxed("\\sqrt{9}"), "3")  # a fresh worker answers after the kill


def test_numeric_grading_is_fast_enough_for_training():
    t0 = time.perf_counter()
    n = sum(grade_math(f"First, 2 + 3 = 5. So \\boxed{{{i}}}.", str(i + i % 2)) for i in range(256))
    assert n == 128
    assert time.perf_counter() - t0 < 0.5  # the toy grades 256 answers every few steps


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


@pytest.mark.parametrize("text, letter", [
    ("Reasoning...\nAnswer: B", "B"),
    ("... so the answer is (C).", "C"),
    ("Final: \\boxed{D}", "D"),
    ("\\boxed{\\text{A}}", "A"),
    ("The correct option is **B**", "B"),
    ("Option A looks wrong. Answer: **D**", "D"),
    ("First Answer: A, then on reflection Answer: C", "C"),
    ("blah\n(B)", "B"),
    ("**Final Answer**\n\nC", "C"),
    ("Answer:\n\nD", "D"),
    # case-insensitive where the form makes a letter a letter
    ("answer: d", "D"), ("ANSWER: c", "C"), ("Answer: (c)", "C"), ("The answer is a bit subtle. Answer: B", "B"),
    # Option X forms
    ("Answer: Option D", "D"), ("Answer: option d.", "D"), ("I choose option C.", "C"),
    # one final answer or none: hedges
    ("Answer: B or C", None), ("The answer is either B or C.", None), ("\\boxed{A, C}", None),
    ("Answer: B (though C is also possible)", None), ("Answer: B/C", None), ("Answer: B and C", None),
    ("Answer: B. But it could also be C.", None), ("Answer: A. Actually any of A, B, C, D.", None),
    # ... and what is not a hedge
    ("Answer: C. A is wrong because it ignores spin.", "C"), ("The answer is (D), not (C).", "D"),
    ("First Answer: A, then on reflection Answer: C", "C"), ("Answer: D\nAnswer: D", "D"),
    # the letter first, other separators, other verbs
    ("Thus, option B is correct.", "B"), ("**C** is the answer.", "C"), ("Answer - C", "C"),
    ("After careful consideration, I'd go with B.", "B"), ("I'm torn between A and C, so I'll pick C.", "C"),
    # two different final answers back to back, or a conditional one after: a hedge
    ("Answer: A\n\n\\boxed{B}", None),
    ("The answer is A. However, with relativistic effects, the answer would be B.", None),
    ("Answer: B, since the dipole term vanishes.", "B"), ("Answer: B. It could be a problem if it were strong.", "B"),
    # no answer
    ("Both seem plausible", None), ("Answer: E", None), ("Considering option B. The energy of the", None),
    ("To find the answer, consider B", None), ("A B C D", None), ("\\boxed{ABCD}", None),
])
def test_extract_choice(text, letter):
    assert extract_choice(text, 4) == letter


def test_grade_choice_and_truncation():
    assert grade_choice("Answer: C", "C").correct
    g = grade_choice("Answer: A", "C")
    assert not g.correct and g.extracted == "A"
    cut = grade_choice("Answer: C\n\nLet me double check the integral: the first term", "C", truncated=True)
    assert not cut.correct and "cut off" in cut.detail
    assert grade_choice("Answer: C\n\nLet me double check.", "C", truncated=False).correct


def test_extract_code():
    two = "Plan\n```python\ndef helper():\n    pass\n```\nthen\n```python\ndef f(x):\n    return x\n```\nend"
    assert extract_code(two) == "def f(x):\n    return x\n"
    assert extract_code(two, entry_point="helper") == "def helper():\n    pass\n"
    assert extract_code("```\nprint(1)\n```") == "print(1)\n"
    assert extract_code("```python\ndef g():\n    return 2") == "def g():\n    return 2"  # cut off
    assert extract_code("```bash\nls\n```\n```py\nx = 1\n```") == "x = 1\n"
    assert extract_code("x = 1") == "x = 1"
    assert extract_code("   ") is None


def test_humaneval_module_keeps_prompt_imports_and_accepts_completions():
    prompt = 'from typing import List\n\ndef f(xs: List[int]) -> int:\n    """doc"""\n'
    full = humaneval_module(prompt, "def f(xs):\n    return len(xs)\n", "f")
    assert full.startswith(prompt) and "check" not in full
    compile(full, "p", "exec")
    body = humaneval_module(prompt, "    return len(xs)\n", "f")
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
    assert not same_value("8", 8)
