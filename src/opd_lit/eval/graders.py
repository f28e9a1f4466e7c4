"""Answer graders: math, multiple choice, code extraction.

**Math** (``grade_math``): the answer is the content of the last complete ``\\boxed{...}``
(found in one linear pass); none, an empty box, or a hedge (``\\boxed{3} or \\boxed{4}``)
is wrong. When the gold answer is a number the comparison is numeric, by these rules:

- numbers are read in every usual written form: ``1234``, ``1,234``, ``-0.5``, ``.5``,
  ``\\frac{1}{2}`` (``\\dfrac``, ``\\tfrac``), ``1/2``, ``1.6e-19``, ``1.6E-19``,
  ``1.6 \\times 10^{-19}``, ``1.6\\cdot10^{-19}``, ``1.6 x 10^-19``, ``1.6*10^(-19)``,
  ``10^{5}``; a leading ``x =`` or ``\\approx``, ``$``, thin spaces, a trailing unit in
  ``\\text{}`` / ``\\mathrm{}`` and degree signs are dropped;
- a gold integer or fraction is exact: the answer must have exactly that value (``12.0``
  and ``\\frac{24}{2}`` are 12; ``12.0001`` is not);
- a gold decimal compares with a relative tolerance (``rel_tol``, default 1e-4), so tiny
  magnitudes work (``1.6e-19`` is not ``1.7e-19``); a gold in scientific notation with a
  decimal mantissa (``1.6 \\times 10^{-19}``) states its precision, and any answer within
  half a unit of its last digit is right (``1.602e-19``);
- a percent sign means either the number or its hundredth: ``25\\%`` matches ``25`` and
  ``0.25`` (and a gold ``25\\%`` matches both).

A word answer (``Yes``, ``\\text{even}``) compares as text, case-insensitively. Anything
else (expressions, sets, intervals, an answer that is an expression of a numeric gold)
goes to math-verify in a worker process (:mod:`opd_lit.eval.child.symbolic`) that is
killed after ``timeout_s`` seconds, so the timeout works on any thread; there too, a
numeric gold is compared by the rules above with the expression's value.

**Multiple choice** (``extract_choice``): the final answer is the last explicit answer
statement: ``Answer: X``, ``the (correct) answer/option/choice is X``, ``\\boxed{X}``,
``Option X``, or a last line that is only the letter, case-insensitive where the form makes
the letter unambiguous (``answer: d``, ``(b)``). A statement that names two options
(``B or C``, ``\\boxed{A, C}``) is a hedge: no answer. A response cut off at its token
budget has no final answer (``grade_choice(..., truncated=True)``). ``shuffle_choices``
orders the options with a seed derived from the problem and the sample, reproducibly.

**Code** (``extract_code``): the last fenced Python block, preferring one that defines the
entry point; :mod:`opd_lit.eval.programs` runs it.

``strip_thinking`` keeps the part of a response after the reasoning (``</think>``); a
response cut off inside its reasoning has no final answer.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import random
import re
import select
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = [
    "Grade",
    "LETTERS",
    "REL_TOL",
    "extract_boxed",
    "extract_choice",
    "extract_code",
    "format_choices",
    "grade_choice",
    "grade_math",
    "grade_math_detail",
    "parse_number",
    "shuffle_choices",
    "strip_thinking",
]

REL_TOL = 1e-4  # decimal gold answers: |answer - gold| <= REL_TOL * |gold|
MATH_TIMEOUT_S = 5.0  # one symbolic comparison (math-verify), wall clock


@dataclass
class Grade:
    """One graded sample: correct or not, what was read from it, and why."""

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


# ---- boxed answers ------------------------------------------------------------------------

_BOX = re.compile(r"\\boxed\s*\{")
_BRACE = re.compile(r"[{}]")
_HEDGE_BETWEEN = re.compile(r"^(?:or|\\text\{\s*or\s*\}|\\textrm\{\s*or\s*\}|\\quad\s*or|\\lor)$", re.I)


def _boxes(text: str) -> list[tuple[int, int]]:
    """``(start, end)`` of the content of every complete ``\\boxed{...}``, in order; one pass."""
    starts = [m.end() for m in _BOX.finditer(text)]
    if not starts:
        return []
    closing: dict[int, int] = {}
    stack: list[int] = []
    for m in _BRACE.finditer(text, starts[0] - 1):
        if m.group() == "{":
            stack.append(m.start())
        elif stack:
            closing[stack.pop()] = m.start()
    return [(s, closing[s - 1]) for s in starts if s - 1 in closing]


def extract_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` in ``text`` (braces inside are matched:
    ``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``), or None. Linear in ``len(text)``."""
    boxes = _boxes(text)
    if not boxes:
        return None
    s, e = boxes[-1]
    return text[s:e].strip()


def _hedged(text: str) -> bool:
    """The last two boxes hold different answers joined by "or" (``\\boxed{3} or \\boxed{4}``)."""
    boxes = _boxes(text)
    if len(boxes) < 2:
        return False
    (s1, e1), (s2, e2) = boxes[-2:]
    between = text[e1 + 1 : s2].rsplit("\\boxed", 1)[0].strip(" $\t\n,;")
    return _HEDGE_BETWEEN.match(between) is not None and text[s1:e1].strip() != text[s2:e2].strip()


# ---- numbers --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Number:
    """A number read from an answer: its exact value and how it was written."""

    value: Fraction
    exact: bool  # an integer or a fraction of integers (not a decimal, not 1.6e-19)
    half_ulp: Fraction | None = None  # scientific notation with a decimal mantissa
    percent: bool = False


_SPACES = re.compile(r"\\[,;:! ]|\\quad|\\qquad|~|\s+")
_UNIT = re.compile(r"\\(?:text|textrm|mathrm|mbox|rm|operatorname)\s*\{[^{}]*\}$")
_WRAP = re.compile(r"^\\(?:text|textrm|mathrm|mbox|textbf|mathbf|displaystyle)\s*\{(.*)\}$")
_ASSIGN = re.compile(r"^(?:[A-Za-z](?:_\{?\w+\}?)?|\\[A-Za-z]+)=(?!=)")
_MANT = r"(?:\d{1,3}(?:,\d{3})+(?:\.\d*)?|\d+\.?\d*|\.\d+)"
_EXP = r"(?:\{([+-]?\d+)\}|\(([+-]?\d+)\)|([+-]?\d+))"
_SCI_TIMES = re.compile(rf"^({_MANT})(?:\\times|\\cdot|×|·|\*|x|\\ast)10\^{_EXP}$")
_SCI_E = re.compile(rf"^({_MANT})[eE]([+-]?\d+)$")
_POW10 = re.compile(rf"^10\^{_EXP}$")
_PLAIN = re.compile(rf"^{_MANT}$")
_SLASH = re.compile(rf"^({_MANT})/({_MANT})$")
_FRAC_SHORT = re.compile(r"^\\frac(\d)(\d)$")
_MIXED = re.compile(r"^(\d+)\\frac\{(\d+)\}\{(\d+)\}$")  # 3\frac{1}{2} = 7/2
_REPEATING = re.compile(r"^(\d*)\.(\d*)\\(?:overline|bar)\{(\d+)\}$")  # 1.\overline{6} = 5/3
MAX_EXPONENT = 400


def _normalize(s: str) -> str:
    s = s.strip().strip("$").strip()
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("−", "-")
    s = s.replace("\\left", "").replace("\\right", "").replace("{,}", ",").replace("\\$", "")
    s = _SPACES.sub("", s)
    for _ in range(3):
        m = _WRAP.match(s)
        if not m:
            break
        s = m.group(1)
    s = re.sub(r"^\\(?:approx|sim|simeq)", "", s)
    s = _ASSIGN.sub("", s, count=1)
    while True:
        t = _UNIT.sub("", s)
        t = re.sub(r"(?:\^\{?\\circ\}?|°|\\circ|\\degree)$", "", t)
        if t == s or not t:
            break
        s = t
    return s.rstrip(".")


def _mantissa(text: str) -> tuple[Fraction, int]:
    """The value of a written decimal and its digits after the point."""
    text = text.replace(",", "")
    digits = len(text.split(".", 1)[1]) if "." in text else 0
    return Fraction(text if not text.endswith(".") else text[:-1]), digits


def _exponent(m: re.Match, first: int) -> int | None:
    raw = next(g for g in m.groups()[first:] if g is not None)
    e = int(raw)
    return e if abs(e) <= MAX_EXPONENT else None


_NUMBER_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty".split())}


def parse_number(text: str) -> Number | None:
    """The number an answer writes (see the module doc for the forms), or None."""
    s = _normalize(str(text))
    if s.casefold() in _NUMBER_WORDS:
        return Number(Fraction(_NUMBER_WORDS[s.casefold()]), exact=True)
    if not s or len(s) > 200:
        return None
    percent = False
    if s.endswith("\\%") or s.endswith("%"):
        s, percent = s[: -2 if s.endswith("\\%") else -1], True
    sign = 1
    while s[:1] in ("-", "+"):
        sign, s = (-sign if s[0] == "-" else sign), s[1:]
    if s.startswith("{") and s.endswith("}") and s.count("{") == 1:
        s = s[1:-1]
    n = _unsigned(s)
    if n is None:
        return None
    return Number(sign * n.value, n.exact, n.half_ulp, percent)


def _unsigned(s: str) -> Number | None:
    if _PLAIN.match(s):
        value, digits = _mantissa(s)
        return Number(value, exact="." not in s)
    m = _SCI_TIMES.match(s) or _SCI_E.match(s)
    if m:
        exp = _exponent(m, 1)
        if exp is None:
            return None
        mant, digits = _mantissa(m.group(1))
        scale = Fraction(10) ** exp
        half = Fraction(1, 2) * Fraction(10) ** (exp - digits) if "." in m.group(1) else None
        return Number(mant * scale, exact=False, half_ulp=half)
    m = _POW10.match(s)
    if m:
        exp = _exponent(m, 0)
        return None if exp is None else Number(Fraction(10) ** exp, exact=True)
    m = _REPEATING.match(s)
    if m:
        whole, fixed, rep = m.group(1) or "0", m.group(2), m.group(3)
        value = Fraction(f"{whole}.{fixed}" if fixed else whole)
        value += Fraction(int(rep), (10 ** len(rep) - 1) * 10 ** len(fixed))
        return Number(value, exact=True)
    m = _MIXED.match(s)
    if m and 0 < int(m.group(2)) < int(m.group(3)):
        return Number(int(m.group(1)) + Fraction(int(m.group(2)), int(m.group(3))), exact=True)
    m = _SLASH.match(s) or _FRAC_SHORT.match(s)
    parts = (m.group(1), m.group(2)) if m else _frac_parts(s)
    if parts:
        num, den = (parse_number(p) for p in parts)
        if num is None or den is None or den.value == 0 or num.percent or den.percent:
            return None
        return Number(num.value / den.value, exact=num.exact and den.exact)
    return None


def _frac_parts(s: str) -> tuple[str, str] | None:
    """``\\frac{A}{B}`` with balanced braces -> ``(A, B)``."""
    if not s.startswith("\\frac{"):
        return None
    depth, i = 0, len("\\frac")
    parts, start = [], i
    while i < len(s):
        c = s[i]
        if c == "{":
            depth += 1
            if depth == 1:
                start = i + 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                parts.append(s[start:i])
                if len(parts) == 2:
                    return tuple(parts) if i == len(s) - 1 else None
            elif depth < 0:
                return None
        elif depth == 0:
            return None
        i += 1
    return None


def numbers_match(pred: Number, gold: Number, rel_tol: float = REL_TOL) -> bool:
    """The comparison rule of the module doc (exact, relative, or the gold's precision)."""
    preds = [pred.value] + ([pred.value / 100] if pred.percent else [])
    golds = [gold.value] + ([gold.value / 100] if gold.percent else [])
    for g in golds:
        for p in preds:
            if gold.exact or g == 0:
                ok = p == g
            else:
                tol = Fraction(rel_tol) * abs(g)
                if gold.half_ulp is not None:
                    tol = max(tol, gold.half_ulp * (1 + Fraction(1, 10**9)))
                ok = abs(p - g) <= tol
            if ok:
                return True
    return False


# ---- symbolic comparison in a killable worker -------------------------------------------------

class SymbolicWorker:
    """A persistent ``child/symbolic.py`` process; a request that outlives its timeout kills
    it (the next request starts a new one). Thread-safe (one request at a time)."""

    SCRIPT = Path(__file__).resolve().parent / "child" / "symbolic.py"
    START_TIMEOUT_S = 120.0

    def __init__(self):
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._buf = b""

    def _start(self) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, str(self.SCRIPT)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True,
        )
        self._buf = b""
        if self._read(self.START_TIMEOUT_S) is None:
            self._stop()
            raise RuntimeError("the math-verify worker did not start")

    def _stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def _read(self, timeout: float) -> dict | None:
        deadline = time.monotonic() + timeout
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return None
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def ask(self, request: dict, timeout: float) -> dict | None:
        """The worker's reply, or None (it timed out, and was killed, or it died)."""
        with self._lock:
            try:
                if self._proc is None or self._proc.poll() is not None:
                    self._start()
                self._proc.stdin.write((json.dumps(request) + "\n").encode())
                self._proc.stdin.flush()
                reply = self._read(timeout)
            except (OSError, ValueError, RuntimeError) as e:
                log.warning("math-verify worker: %r", e)
                reply = None
            if reply is None:
                self._stop()
            return reply

    def close(self) -> None:
        with self._lock:
            self._stop()


_SYMBOLIC = SymbolicWorker()
atexit.register(_SYMBOLIC.close)


class SymbolicTimeout(Exception):
    """The symbolic comparison did not finish in time (its worker was killed)."""


def _ask(request: dict, timeout: float) -> dict:
    reply = _SYMBOLIC.ask(request, timeout)
    if reply is None:
        raise SymbolicTimeout
    return reply


def _symbolic_value(pred: str, timeout: float) -> Number | None:
    value = _ask({"pred": pred, "value": True}, timeout).get("value")
    if not value:
        return None
    if "rational" in value:
        p, q = value["rational"]
        return Number(Fraction(int(p), int(q)), exact=True)
    try:
        return Number(Fraction(value["float"]), exact=False)
    except (ValueError, KeyError):
        return None


_WORD = re.compile(r"^[A-Za-z][A-Za-z '\-]*[A-Za-z]$")  # two letters or more: e, x, i are math
_WORD_HEDGE = re.compile(r"\bor\b|\\lor", re.I)


def _as_word(s: str) -> str | None:
    t = _normalize(s)
    t = re.sub(r"^\(([A-Za-z])\)$", r"\1", t)  # "(B)", a multiple-choice answer in MATH
    if re.fullmatch(r"[A-Z]", t):
        return t.casefold()
    return t.casefold() if _WORD.match(t) else None


def _answers_equal(pred: str, gold: str, rel_tol: float, timeout_s: float) -> bool:
    g = parse_number(gold)
    if g is not None:
        p = parse_number(pred)
        if p is None and _WORD_HEDGE.search(pred):
            # "3 or 4" is a hedge; "\frac{1}{2} or 0.5" is one value written twice
            parts = [parse_number(x) for x in re.split(r"\\text\{\s*or\s*\}|\bor\b|\\lor", pred)]
            if len(parts) < 2 or any(x is None for x in parts) or not all(
                    numbers_match(x, parts[0], 0.0) for x in parts[1:]):
                return False
            p = parts[0]
        if p is None:
            if not re.search(r"[\d\\]", pred):
                return False  # words, not a number
            p = _symbolic_value(pred, timeout_s)
        return p is not None and numbers_match(p, g, rel_tol)
    word = _as_word(gold)
    if word is not None:
        return _as_word(pred) == word
    return bool(_ask({"gold": gold, "pred": pred}, timeout_s).get("eq"))


def grade_math_detail(response: str, gold: str, *, rel_tol: float = REL_TOL,
                      timeout_s: float = MATH_TIMEOUT_S) -> Grade:
    """``grade_math`` with the extracted answer and the reason."""
    pred = extract_boxed(response)
    if not pred:
        return Grade(False, pred, "no boxed answer")
    if _hedged(response):
        return Grade(False, pred, "hedged: two boxed answers joined by 'or'")
    gold = str(gold).strip()
    gold = extract_boxed(gold) or gold
    if pred == gold:
        return Grade(True, pred)
    try:
        ok = _answers_equal(pred, gold, rel_tol, timeout_s)
    except SymbolicTimeout:
        return Grade(False, pred, f"the symbolic comparison took over {timeout_s:g}s")
    except (ValueError, ZeroDivisionError, OverflowError) as e:  # a malformed answer is wrong
        return Grade(False, pred, f"unreadable: {e!r}"[:200])
    return Grade(bool(ok), pred)


def grade_math(response: str, gold: str, *, rel_tol: float = REL_TOL,
               timeout_s: float = MATH_TIMEOUT_S) -> bool:
    """True iff the last boxed answer of ``response`` equals ``gold`` (module doc)."""
    return grade_math_detail(response, gold, rel_tol=rel_tol, timeout_s=timeout_s).correct


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


# Where a final answer is stated; the clause after it holds the letter(s).
_MARKERS = re.compile(
    r"\\boxed\s*\{"
    r"|\bfinal\s+answer\b\s*(?:is\s*:?|:|=)?"
    r"|\b(?:correct\s+|right\s+|best\s+)?answer\s*(?:is\s*:?|:|=|-|–)"
    r"|\bthe\s+(?:correct|right|best|final)\s+(?:option|choice)\s*(?:is\s*:?|:)"
    r"|\bI(?:'d|'ll|\s+would|\s+will)?\s+(?:choose|pick|select|go\s+with)\b",
    re.I,
)
# Where the clause of an answer statement ends: a line or sentence end, or an explanation.
_CLAUSE_END = re.compile(
    r"\n|[.!?;](?=\s|$)|\s(?:because|since|as|which|due|given|so|while|whereas|where|if|"
    r"not|rather|instead|than)\b",
    re.I,
)


def _letters_in(clause: str, letters: str) -> list[str]:
    """The option letters a clause names: capitals standing alone (``B``, ``(B)``, ``**B**``),
    and lower-case ones where the form makes them letters (``(b)``, ``b)``, ``option b``, or
    the whole clause)."""
    found = re.findall(rf"(?<![A-Za-z'\\\\])([{letters}])(?![A-Za-z'])", clause)
    lower = letters.lower()
    for m in re.finditer(rf"(?i:option|choice)\s*\(?\s*([{lower}])(?![A-Za-z])", clause):
        found.append(m.group(1).upper())
    for m in re.finditer(rf"\(\s*([{lower}])\s*\)|(?<![A-Za-z])([{lower}])\)", clause):
        found.append((m.group(1) or m.group(2)).upper())
    bare = re.sub(r"\\(?:text|textbf|mathrm|mathbf)|[\s*_$()\[\]{}:.,]", "", clause)
    if len(bare) == 1 and bare.upper() in letters:
        found.append(bare.upper())
    return found


# After the final statement: taking it back ("Actually any of A-D", "or possibly C").
_TAIL_HEDGE = re.compile(
    r"\b(?i:any|either|both)\s+(?i:of\s+)?(?:(?i:the\s+(?:options|choices|answers))|\(?[A-Z]\)?(?![A-Za-z]))"
    r"|\b(?i:maybe|possibly|perhaps|(?:could|might|would)\s+(?:also\s+)?be)\s+"
    r"(?i:option\s+)?\(?[A-Z]\)?(?![A-Za-z])"
)


# "B is correct", "option B is the right one", "**C** is the answer": the letter comes first.
_LETTER_FIRST = re.compile(
    r"(?<![A-Za-z'])(?:(?i:option|choice)\s+)?[(*\[]*([A-Z])[)*\]]*\s+(?i:is)\s+"
    r"(?i:the\s+)?(?i:correct|right|best|true|answer)\b"
)


def _statements(text: str, letters: str):
    """``(letters named, start, marker end, clause end)`` of every answer statement that
    names a letter, the last first (letters ``[]``: it names a letter that is not an option)."""
    boxes = dict(_boxes(text))
    limit = len(text)  # a statement's clause ends where the next statement starts
    marks = sorted([*_MARKERS.finditer(text), *_LETTER_FIRST.finditer(text)], key=lambda m: m.start())
    for m in reversed(marks):
        if m.re is _LETTER_FIRST:
            if m.group(1) in letters:
                yield [m.group(1)], m.start(), m.start(), m.end()
            limit = m.start()
            continue
        if m.group().startswith("\\boxed"):
            if m.end() not in boxes:
                continue  # an unterminated box
            clause, stop = text[m.end() : boxes[m.end()]], boxes[m.end()] + 1
        else:
            rest = text[m.end() : max(limit, m.end())].lstrip(" \t*:_-")
            if rest.startswith("\n"):  # "Answer:\n\nD"
                rest = rest.lstrip()
            end = _CLAUSE_END.search(rest)
            clause = (rest[: end.start()] if end else rest)[:120]
            stop = max(limit, m.end()) - len(rest) + len(clause)
        limit = m.start()
        named = _letters_in(clause, letters)
        if named:
            yield named, m.start(), m.end(), stop
        elif re.fullmatch(r"[\s*(\[{]*(?:\\text\{)?[A-Z](?:\})?[\s*)\]}.]*", clause):
            yield [], m.start(), m.end(), stop  # "Answer: E" with four options


def extract_choice(text: str, num_options: int = 4) -> str | None:
    """The one option the response's final answer names, or None (none, or a hedge)."""
    letters = LETTERS[:num_options]
    found = _statements(text, letters)
    final = next(found, None)
    if final is None:
        lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
        if not lines:
            return None
        m = re.fullmatch(rf"[\*\(\s\[]*(?i:option\s*)?([{letters}{letters.lower()}])[\*\)\]\.\s]*", lines[-1])
        return m.group(1).upper() if m else None
    named, start, _, stop = final
    if len(set(named)) != 1 or _TAIL_HEDGE.search(text[stop:]):
        return None  # no option, several options, or taken back afterwards
    before = next(found, None)
    if (before is not None and set(before[0]) != set(named)
            and not re.search(r"[A-Za-z]{2}", text[before[2]:start])):
        return None  # two different answers back to back ("Answer: A\n\n\\boxed{B}")
    return named[0]


def grade_choice(response: str, correct_letter: str, num_options: int = 4,
                 truncated: bool | None = None) -> Grade:
    if truncated:
        return Grade(False, None, "cut off at the token budget: no final answer")
    pred = extract_choice(response, num_options)
    if pred is None:
        return Grade(False, None, "no single final answer")
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
