"""Answer graders.

Math: ``extract_boxed`` finds the last ``\\boxed{...}`` in a response (nested braces
handled); ``grade_math`` compares that answer with a gold answer through ``math_verify``
(so "0.5" and "\\frac{1}{2}" match). A response without a boxed answer is wrong.

Multiple choice (GPQA): ``shuffle_choices`` orders the options with a seed derived from the
problem id and the sample index (every sample sees its own order, reproducibly, so saved
responses can be re-graded); ``extract_choice`` reads the chosen letter.

Code: ``extract_code`` takes the program out of a response (the last fenced Python block,
preferring one that defines the entry point); :mod:`opd_lit.eval.programs` runs it.

``strip_thinking`` keeps the part of a response after the reasoning (``</think>``); a
response cut off inside its reasoning has no final answer.
"""

from __future__ import annotations

import random
import re
import threading
from dataclasses import dataclass
from fractions import Fraction

__all__ = [
    "Grade",
    "LETTERS",
    "extract_boxed",
    "extract_choice",
    "extract_code",
    "format_choices",
    "grade_choice",
    "grade_math",
    "grade_math_detail",
    "shuffle_choices",
    "strip_thinking",
]


@dataclass
class Grade:
    """One graded sample: correct or not, what was read from it, and why (for code)."""

    correct: bool
    extracted: str | None
    detail: str | None = None


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def strip_thinking(text: str) -> str:
    """The text after the last ``</think>``; ``""`` when a ``<think>`` block never closes."""
    if THINK_CLOSE in text:
        return text.rsplit(THINK_CLOSE, 1)[1]
    if THINK_OPEN in text:
        return ""
    return text

_BOXED = "\\boxed"


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` in ``text``, or None if there is none.

    Braces inside the box are matched, so ``\\boxed{\\frac{1}{2}}`` gives
    ``\\frac{1}{2}``. An unterminated last box is skipped in favour of the last
    complete one; None when there is no complete box.
    """
    start = text.rfind(_BOXED + "{")
    while start != -1:
        i = start + len(_BOXED) + 1
        depth = 1
        j = i
        while j < len(text):
            c = text[j]
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    return text[i:j].strip()
            j += 1
        # Unterminated box: fall back to an earlier, complete one.
        start = text.rfind(_BOXED + "{", 0, start)
    return None


def _timeout() -> int | None:
    # math_verify's timeout uses signal.alarm, which only works in the main thread.
    return 5 if threading.current_thread() is threading.main_thread() else None


_PLAIN_NUMBER = re.compile(r"^-?\d+(\.\d+)?$")


def grade_math(response: str, gold: str) -> bool:
    """True iff the last boxed answer of ``response`` is mathematically equal to ``gold``."""
    from math_verify import parse, verify

    pred = extract_boxed(response)
    if pred is None or not pred:
        return False
    gold = str(gold).strip()
    if pred == gold:
        return True
    if _PLAIN_NUMBER.match(pred) and _PLAIN_NUMBER.match(gold):
        # Two plain decimals: compare exactly without the (slow) symbolic parser.
        return Fraction(pred) == Fraction(gold)
    gold_box = extract_boxed(gold)
    gold_inner = gold_box if gold_box is not None else gold
    t = _timeout()
    try:
        gold_parsed = parse(f"\\boxed{{{gold_inner}}}", parsing_timeout=t)
        pred_parsed = parse(f"\\boxed{{{pred}}}", parsing_timeout=t)
        if not gold_parsed or not pred_parsed:
            return False
        return bool(verify(gold_parsed, pred_parsed, timeout_seconds=t))
    except Exception:  # a malformed answer is a wrong answer, never a crash
        return False


def grade_math_detail(response: str, gold: str) -> Grade:
    """``grade_math`` plus the extracted answer (for the per-sample records)."""
    pred = extract_boxed(response)
    return Grade(correct=bool(pred) and grade_math(response, gold), extracted=pred)


# ---- multiple choice ----------------------------------------------------------------------

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def shuffle_choices(
    correct: str, incorrect: list[str], problem_id: str, sample: int, seed: int = 0
) -> tuple[list[str], str]:
    """Options in a seeded order and the letter of the correct one.

    The order depends only on ``(seed, problem_id, sample)`` (``random.Random`` seeded with
    a string is stable across processes and Python versions), so each sample of a problem
    sees its own order and a saved response can be re-graded later.
    """
    options = [correct, *incorrect]
    if len(options) > len(LETTERS):
        raise ValueError(f"{len(options)} options: at most {len(LETTERS)} are supported")
    order = list(range(len(options)))
    random.Random(f"opd_lit.choice/{seed}/{problem_id}/{sample}").shuffle(order)
    return [options[i] for i in order], LETTERS[order.index(0)]


def format_choices(options: list[str]) -> str:
    return "\n".join(f"{LETTERS[i]}) {str(o).strip()}" for i, o in enumerate(options))


def extract_choice(text: str, num_options: int = 4) -> str | None:
    """The chosen letter: "Answer: X" / \\boxed{X} / "the answer is (X)", last one wins."""
    letters = LETTERS[:num_options]
    cls = f"[{letters}]"
    patterns = [
        rf"\\boxed\{{\s*(?:\\text\{{)?\s*\(?({cls})\)?\s*\}}?\s*\}}",
        rf"(?i:answer)\s*(?:is|:)?\s*[:\-]?\s*\**\s*\(?\s*({cls})\s*\)?(?![A-Za-z])",
        rf"(?i:the\s+(?:correct\s+)?(?:answer|option|choice)\s+is)\s*[:\-]?\s*\**\s*\(?({cls})\)?(?![A-Za-z])",
    ]
    for pat in patterns:
        hits = re.findall(pat, text)
        if hits:
            return hits[-1]
    # A last line that is just the letter: "B", "(B)", "**B**", "B)".
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if lines:
        m = re.fullmatch(rf"[\*\(\s]*({cls})[\*\)\.\s]*", lines[-1])
        if m:
            return m.group(1)
    return None


def grade_choice(response: str, correct_letter: str, num_options: int = 4) -> Grade:
    pred = extract_choice(response, num_options)
    return Grade(correct=pred == correct_letter, extracted=pred)


# ---- code ---------------------------------------------------------------------------------

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+.-]*)[^\n]*\n(.*?)```", re.S)
_OPEN_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*)$", re.S | re.I)
_PY = {"python", "py", "python3", ""}


def extract_code(text: str, entry_point: str | None = None) -> str | None:
    """The program in a response, or None when there is nothing that looks like one.

    The last fenced block tagged Python (or untagged); among several, the last one that
    defines ``entry_point``. An unterminated last fence (a response cut off mid-block) gives
    what follows it. With no fence at all the whole response is taken as code.
    """
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(text)]
    if blocks:
        py = [body for lang, body in blocks if lang in _PY] or [body for _, body in blocks]
        if entry_point:
            defines = re.compile(rf"\bdef\s+{re.escape(entry_point)}\s*\(")
            with_ep = [b for b in py if defines.search(b)]
            if with_ep:
                return with_ep[-1]
        return py[-1]
    m = _OPEN_FENCE.search(text)
    if m:
        return m.group(1)
    stripped = text.strip()
    return stripped or None
