"""Synthetic step-by-step arithmetic: the toy task of the embedded strong-to-weak pair.

A problem starts from a number and applies 2-3 operations (add, subtract, multiply),
each stated in the question and worked out in one sentence of the solution::

    question: Start with 23. Add 45, then multiply by 2, then subtract 17. What is the result?
    solution: First, 23 + 45 = 68. Next, 68 * 2 = 136. Finally, 136 - 17 = 119.
              The answer is \\boxed{119}.

Every value (start, operands, intermediates, answer) stays in a fixed range.

Train and eval problems never share a question: a question belongs to exactly one split,
decided by a hash of its text (``question_split``), so the splits are disjoint whatever
the seeds and sizes are. Generation is deterministic for a seed.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "TaskParams",
    "DEFAULT_TASK",
    "INSTRUCTION",
    "make_problems",
    "question_split",
    "format_prompt",
    "solution_steps",
]

INSTRUCTION = "Put the final answer in \\boxed{}."


@dataclass(frozen=True)
class TaskParams:
    """Everything that determines the generated problems (part of the toy recipe)."""

    min_steps: int = 2
    max_steps: int = 3
    start_max: int = 50  # start value in [0, start_max]
    addend_max: int = 50  # + and - operands in [0, addend_max]
    mul_min: int = 2
    mul_max: int = 5
    value_max: int = 199  # every intermediate value in [0, value_max]
    eval_fraction_per_mille: int = 100  # share of the question space reserved for eval

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


DEFAULT_TASK = TaskParams()

_OPS = ("+", "-", "*")
_VERB = {"+": "add {}", "-": "subtract {}", "*": "multiply by {}"}
_LEAD = ("First", "Next", "Finally")


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


def _render(start: int, ops: list[tuple[str, int]]) -> tuple[str, str, int]:
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
    return question, " ".join(sentences), value


def make_problems(
    split: str, n: int, seed: int, params: TaskParams = DEFAULT_TASK
) -> list[dict[str, str]]:
    """``n`` distinct problems of ``split`` ("train" or "eval"), deterministic for ``seed``.

    Records: ``{"id", "question", "answer" (str), "solution"}``. A question is kept only
    if ``question_split`` assigns it to ``split``, so train and eval never overlap.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    # Independent streams per split, so the same seed gives unrelated sets.
    rng = random.Random(f"opd_lit.toy.task/{split}/{seed}")
    seen: set[str] = set()
    out: list[dict[str, str]] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 10_000:
            raise RuntimeError(f"could not generate {n} distinct {split} problems")
        start, ops = _sample_chain(rng, params)
        question, solution, answer = _render(start, ops)
        if question in seen or question_split(question, params) != split:
            continue
        seen.add(question)
        out.append(
            {
                "id": f"toy-{split}-{seed}-{len(out):06d}",
                "question": question,
                "answer": str(answer),
                "solution": solution,
            }
        )
    return out


def format_prompt(problem: dict[str, str] | str) -> list[dict[str, str]]:
    """Chat messages for a problem record (or a bare question): one user turn."""
    question = problem if isinstance(problem, str) else problem["question"]
    return [{"role": "user", "content": f"{question} {INSTRUCTION}"}]


def solution_steps(solution: str) -> list[tuple[int, str, int, int]]:
    """Parse the step sentences of a solution into ``(a, op, b, result)`` tuples.

    Used by tests and sanity checks to recompute the stated arithmetic.
    """
    import re

    pat = re.compile(r"(?:First|Next|Finally), (\d+) ([-+*]) (\d+) = (-?\d+)\.")
    return [(int(a), op, int(b), int(c)) for a, op, b, c in pat.findall(solution)]
