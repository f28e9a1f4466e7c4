"""Synthetic step-by-step arithmetic with a closing check: the toy task of the embedded pair.

A problem starts from a number and applies 3-5 operations (add, subtract, multiply),
each stated in the question and worked out in one sentence of the solution. After the
boxed answer the solution checks it in 2-3 short lines::

    question: Start with 23. Add 45, then multiply by 2, then subtract 17. What is the result?
              Put the final answer in \\boxed{}, then check it.
    solution: First, 23 + 45 = 68. Next, 68 * 2 = 136. Finally, 136 - 17 = 119.
              The answer is \\boxed{119}. I can verify it again. Let me test this now.

The check lines are the toy's model of a response region where the teacher's local
contrast is low (README "The embedded toy"). Every check line fills four word slots
(``CHECK_SLOTS``), and under the ``free`` wording each slot's word is drawn uniformly
from its options: several continuations are equally right, so a teacher trained on
such text prefers none of them, and its margin among the student's candidates collapses
on those tokens. Everything before the answer is determined by the question (high
contrast); the check lines come last, so the contrast falls late in the response, as the
paper's premise describes for long reasoning. The ``fixed`` wording turns the mechanism
off without changing the shape of the response: the same number of check lines at the
same places, each with the first option of every slot ("Let me check this again."), so
they are as determined as the arithmetic. The prompt says which wording is wanted (the
last words of the instruction), so one teacher and one student serve both settings.

Every value (start, operands, intermediates, answer) stays in a fixed range.

Train and eval problems never share a question: a question belongs to exactly one split,
decided by a hash of its text (``question_split``), so the splits are disjoint whatever
the seeds and sizes are. Generation is deterministic for a seed, and the arithmetic and
the number of check lines of a problem do not depend on the wording.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "TaskParams",
    "DEFAULT_TASK",
    "WORDINGS",
    "CHECK_SLOTS",
    "INSTRUCTIONS",
    "check_wording",
    "make_problems",
    "question_split",
    "format_prompt",
    "solution_steps",
    "check_lines",
]

#: The check-line wordings: ``free`` (the low-contrast mechanism on) and ``fixed`` (off).
WORDINGS = ("free", "fixed")

#: The instruction appended to every question; its last words name the wording.
INSTRUCTIONS = {
    "free": "Put the final answer in \\boxed{}, then check it.",
    "fixed": "Put the final answer in \\boxed{}, then check it plainly.",
}

#: The four word slots of a check line; ``fixed`` takes the first option of each.
CHECK_SLOTS: tuple[tuple[str, ...], ...] = (
    ("Let me", "I can", "I will"),
    ("check", "verify", "test"),
    ("this", "that", "it"),
    ("again", "once more", "now"),
)


@dataclass(frozen=True)
class TaskParams:
    """Everything that determines the generated problems (part of the toy recipe)."""

    min_steps: int = 3
    max_steps: int = 5
    start_max: int = 50  # start value in [0, start_max]
    addend_max: int = 50  # + and - operands in [0, addend_max]
    mul_min: int = 2
    mul_max: int = 5
    value_max: int = 199  # every intermediate value in [0, value_max]
    min_checks: int = 2  # check lines after the answer
    max_checks: int = 3
    eval_fraction_per_mille: int = 100  # share of the question space reserved for eval

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


DEFAULT_TASK = TaskParams()

_OPS = ("+", "-", "*")
_VERB = {"+": "add {}", "-": "subtract {}", "*": "multiply by {}"}
_LEAD = ("First", "Next", "Finally")


def check_wording(wording: str) -> str:
    """``wording`` if it is one of :data:`WORDINGS`, else a ValueError naming the choices."""
    if wording not in WORDINGS:
        raise ValueError(f"toy check-line wording must be one of {list(WORDINGS)}, got {wording!r}")
    return wording


def question_split(question: str, params: TaskParams = DEFAULT_TASK) -> str:
    """The split ("train" or "eval") a question text belongs to, by a stable hash."""
    h = int.from_bytes(hashlib.sha256(question.encode("utf-8")).digest()[:8], "big")
    return "eval" if h % 1000 < params.eval_fraction_per_mille else "train"


def _apply(op: str, a: int, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    return a * b


def _sample_chain(rng: random.Random, p: TaskParams) -> tuple[int, list[tuple[str, int]]]:
    n_steps = rng.randint(p.min_steps, p.max_steps)
    start = rng.randint(0, p.start_max)
    value = start
    ops: list[tuple[str, int]] = []
    while len(ops) < n_steps:
        op = rng.choice(_OPS)
        if op == "*":
            operand = rng.randint(p.mul_min, p.mul_max)
        else:
            operand = rng.randint(0, p.addend_max)
        result = _apply(op, value, operand)
        if 0 <= result <= p.value_max:  # rejection: keep every value in range
            ops.append((op, operand))
            value = result
    return start, ops


def _sample_checks(rng: random.Random, p: TaskParams) -> list[tuple[int, ...]]:
    """Slot choices (option indices) of each check line; the count is 2-3 by default."""
    n = rng.randint(p.min_checks, p.max_checks)
    return [tuple(rng.randrange(len(options)) for options in CHECK_SLOTS) for _ in range(n)]


def _check_line(choice: tuple[int, ...], wording: str) -> str:
    words = [options[0 if wording == "fixed" else c] for options, c in zip(CHECK_SLOTS, choice)]
    return " ".join(words) + "."


def _render(start: int, ops: list[tuple[str, int]]) -> tuple[str, list[str], int]:
    clauses = [_VERB[op].format(x) for op, x in ops]
    clauses[0] = clauses[0][0].upper() + clauses[0][1:]
    question = f"Start with {start}. " + ", then ".join(clauses) + ". What is the result?"
    sentences = []
    value = start
    for i, (op, x) in enumerate(ops):
        lead = _LEAD[0] if i == 0 else (_LEAD[2] if i == len(ops) - 1 else _LEAD[1])
        new = _apply(op, value, x)
        sentences.append(f"{lead}, {value} {op} {x} = {new}.")
        value = new
    sentences.append(f"The answer is \\boxed{{{value}}}.")
    return question, sentences, value


def make_problems(
    split: str, n: int, seed: int, params: TaskParams = DEFAULT_TASK, wording: str = "free"
) -> list[dict[str, str]]:
    """``n`` distinct problems of ``split`` ("train" or "eval"), deterministic for ``seed``.

    Records: ``{"id", "question", "answer" (str), "solution", "wording"}``. ``wording`` is
    ``free``, ``fixed`` or ``mixed`` (each problem draws one of the two, for training the
    toy models on both). A question is kept only if ``question_split`` assigns it to
    ``split``, so train and eval never overlap.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if wording != "mixed":
        check_wording(wording)
    # Independent streams per split, so the same seed gives unrelated sets; the wording
    # draws come from their own stream, so the problems are the same in every setting.
    rng = random.Random(f"opd_lit.toy.task/{split}/{seed}")
    mix = random.Random(f"opd_lit.toy.task/{split}/{seed}/wording")
    seen: set[str] = set()
    out: list[dict[str, str]] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 10_000:
            raise RuntimeError(f"could not generate {n} distinct {split} problems")
        start, ops = _sample_chain(rng, params)
        checks = _sample_checks(rng, params)
        question, sentences, answer = _render(start, ops)
        if question in seen or question_split(question, params) != split:
            continue
        seen.add(question)
        w = WORDINGS[mix.randrange(2)] if wording == "mixed" else wording
        solution = " ".join(sentences + [_check_line(c, w) for c in checks])
        out.append(
            {
                "id": f"toy-{split}-{seed}-{len(out):06d}",
                "question": question,
                "answer": str(answer),
                "solution": solution,
                "wording": w,
            }
        )
    return out


def format_prompt(problem: dict[str, str] | str, wording: str | None = None) -> list[dict[str, str]]:
    """Chat messages for a problem record (or a bare question): one user turn.

    The instruction names the check-line wording: ``wording``, else the record's own,
    else ``free``.
    """
    question = problem if isinstance(problem, str) else problem["question"]
    if wording is None:
        wording = "free" if isinstance(problem, str) else problem.get("wording", "free")
    return [{"role": "user", "content": f"{question} {INSTRUCTIONS[check_wording(wording)]}"}]


_STEP = re.compile(r"(?:First|Next|Finally), (\d+) ([-+*]) (\d+) = (-?\d+)\.")


def solution_steps(solution: str) -> list[tuple[int, str, int, int]]:
    """Parse the step sentences of a solution into ``(a, op, b, result)`` tuples.

    Used by tests and sanity checks to recompute the stated arithmetic.
    """
    return [(int(a), op, int(b), int(c)) for a, op, b, c in _STEP.findall(solution)]


def check_lines(solution: str) -> list[str]:
    """The check lines of a solution (the sentences after the boxed answer)."""
    tail = solution.split("}.", 1)[1] if "}." in solution else ""
    return [s.strip() + "." for s in tail.split(".") if s.strip()]
