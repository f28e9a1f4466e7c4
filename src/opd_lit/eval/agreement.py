"""Agreement of the graders with a human grader, on a hand-labelled set.

``python -m opd_lit.eval.agreement [--cases DIR] [--domain math|gpqa|code]`` grades every
case of ``DIR/cases.jsonl`` (default: ``tests/fixtures/eval/agreement``, written by its
``make_cases.py``) with the graders the benchmarks use, the way they use them (the text
after ``</think>``; GPQA with the response's ``truncated`` flag; code through
``extract_code`` and :mod:`opd_lit.eval.programs` in the sandbox, against the problems of
``DIR/problems.json``), and prints, per domain and class of case: how many, how many agree
with the human label, false positives (graded right, labelled wrong) and false negatives.
Exits with status 1 when there is any false positive.
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opd_lit.eval import programs
from opd_lit.eval.graders import (
    Grade,
    extract_code,
    grade_choice,
    grade_math_detail,
    strip_thinking,
)
from opd_lit.eval.sandbox import Sandbox, SandboxLimits

DEFAULT_DIR = Path(__file__).resolve().parents[3] / "tests" / "fixtures" / "eval" / "agreement"
DOMAINS = ("math", "gpqa", "code")
CODE_TIMEOUT_S = 3.0


@dataclass
class Tally:
    n: int = 0
    agree: int = 0
    fp: int = 0  # graded right, labelled wrong
    fn: int = 0  # graded wrong, labelled right

    def add(self, graded: bool, human: bool) -> None:
        self.n += 1
        self.agree += graded == human
        self.fp += graded and not human
        self.fn += human and not graded

    @property
    def rate(self) -> float:
        return self.agree / self.n if self.n else float("nan")


@dataclass
class Report:
    by_class: dict[tuple[str, str], Tally] = field(default_factory=dict)
    disagreements: list[tuple[dict, Grade]] = field(default_factory=list)

    def total(self, domain: str | None = None) -> Tally:
        t = Tally()
        for (d, _), x in self.by_class.items():
            if domain is None or d == domain:
                t.n, t.agree, t.fp, t.fn = t.n + x.n, t.agree + x.agree, t.fp + x.fp, t.fn + x.fn
        return t


def load(cases_dir: Path) -> tuple[list[dict], dict[str, dict]]:
    cases = [json.loads(line) for line in (cases_dir / "cases.jsonl").read_text(encoding="utf-8").splitlines()
             if line.strip()]
    problems = json.loads((cases_dir / "problems.json").read_text(encoding="utf-8"))
    return cases, problems


def grade_case(case: dict[str, Any], problems: dict[str, dict], sandbox: Sandbox | None) -> Grade:
    text = strip_thinking(case["response"])
    if case["domain"] == "math":
        if not text.strip():
            return Grade(False, None, "no final answer")
        return grade_math_detail(text, case["gold"])
    if case["domain"] == "gpqa":
        return grade_choice(text, case["correct"], case.get("num_options", 4), truncated=case.get("truncated"))
    problem = problems[case["problem"]]
    if sandbox is None:
        raise ValueError("code cases need a sandbox")
    kind = problem["benchmark"]
    if kind == "humaneval":
        return programs.run_humaneval(extract_code(text, problem["entry_point"]), problem, sandbox, CODE_TIMEOUT_S)
    if kind == "mbpp":
        return programs.run_mbpp(extract_code(text), problem, sandbox, CODE_TIMEOUT_S)
    return programs.run_livecodebench(extract_code(text, problem.get("func_name")), problem, sandbox,
                                      CODE_TIMEOUT_S)


def run(cases_dir: Path = DEFAULT_DIR, domains: tuple[str, ...] = DOMAINS, sandbox: Sandbox | None = None,
        workers: int = 2) -> Report:
    cases, problems = load(cases_dir)
    cases = [c for c in cases if c["domain"] in domains]
    if sandbox is None and any(c["domain"] == "code" for c in cases):
        sandbox = Sandbox(SandboxLimits(timeout_s=CODE_TIMEOUT_S, memory_mb=1024))
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        grades = list(pool.map(lambda c: grade_case(c, problems, sandbox), cases))
    report = Report()
    for case, grade in zip(cases, grades):
        key = (case["domain"], case["class"])
        report.by_class.setdefault(key, Tally()).add(bool(grade.correct), bool(case["human"]))
        if bool(grade.correct) != bool(case["human"]):
            report.disagreements.append((case, grade))
    return report


def format_report(report: Report) -> str:
    lines = [f"{'domain':<6} {'class':<14} {'cases':>5} {'agree':>6} {'rate':>7} {'FP':>3} {'FN':>3}"]
    for domain in DOMAINS:
        rows = sorted((c, t) for (d, c), t in report.by_class.items() if d == domain)
        for cls, t in rows:
            lines.append(f"{domain:<6} {cls:<14} {t.n:>5} {t.agree:>6} {100 * t.rate:>6.1f}% {t.fp:>3} {t.fn:>3}")
        if rows:
            t = report.total(domain)
            lines.append(f"{domain:<6} {'(all)':<14} {t.n:>5} {t.agree:>6} {100 * t.rate:>6.1f}% {t.fp:>3} {t.fn:>3}")
    t = report.total()
    lines.append(f"{'all':<6} {'':<14} {t.n:>5} {t.agree:>6} {100 * t.rate:>6.1f}% {t.fp:>3} {t.fn:>3}")
    for case, grade in report.disagreements:
        kind = "FP" if grade.correct else "FN"
        lines.append(f"{kind} {case['id']} ({case['class']}): graded {grade.correct} "
                     f"[{grade.extracted!r:.40}] {grade.detail or ''} | {case['response'][:80]!r}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=Path, default=DEFAULT_DIR, help="directory with cases.jsonl, problems.json")
    parser.add_argument("--domain", choices=DOMAINS, action="append", help="only these domains (repeatable)")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    report = run(args.cases, tuple(args.domain or DOMAINS), workers=args.workers)
    print(format_report(report))
    return 1 if report.total().fp else 0


if __name__ == "__main__":
    sys.exit(main())
