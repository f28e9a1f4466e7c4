"""Code benchmarks: run a response's program against a problem's tests, so that the program
can neither read the tests nor forge the verdict.

Function benchmarks (HumanEval, MBPP, LeetCode-style LiveCodeBench problems): the program
is *imported* in the jail by :mod:`~opd_lit.eval.child.serve` as the module ``solution``
(``__name__ != "__main__"``: a demo block does not run, work hidden under it does not
count). The tests never enter that process or its files:

- HumanEval and MBPP: the benchmark's own test code runs in the judge
  (:mod:`~opd_lit.eval.child.judge`), a separate trusted process outside the jail, where
  the entry point (and any other name the tests use that the benchmark does not define) is
  a proxy: a call sends the arguments to the candidate and gets back its return value as
  plain data (:mod:`~opd_lit.eval.child.wire`). The judge reports each test's result over a
  pipe only the evaluator reads, tagged with a per-run nonce. HumanEval: the prompt (with
  its helpers) is the judge's prelude, its ``test`` one test, run as ``check(candidate)``;
  MBPP: ``test_setup_code`` is the prelude, each assert of ``test_list`` one test.
- LiveCodeBench ``functional`` tests: the evaluator itself calls ``Solution().<func_name>``
  (or a top-level ``<func_name>``) with each test's JSON arguments and compares the result
  with the expected output (:func:`same_value`); every test has its own time limit.

Program benchmarks (LiveCodeBench ``stdin`` tests): the program runs as a script
(``__main__``) in a fresh jail per test case with the test's input on stdin; the evaluator
compares its stdout with the expected output (:func:`same_stdout`); it must also exit
normally.

The verdict is always the per-test results (every test reported and passed), never an
exit status: a program that ends its process early (``SystemExit``, ``os._exit``) has
answered no test. The first failing test stops a LiveCodeBench sample.
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
import secrets
import time
from functools import lru_cache
from typing import Any

from opd_lit.eval.child import wire
from opd_lit.eval.graders import Grade
from opd_lit.eval.sandbox import CHILD_DIR, Process, Sandbox, interpreter

# Imports LeetCode-style solutions take for granted (the starter code has none).
LEETCODE_PRELUDE = """\
from typing import *
import bisect, collections, functools, heapq, itertools, math, operator, random, re, string, sys
from collections import Counter, defaultdict, deque, OrderedDict
from functools import cache, lru_cache, reduce
from heapq import heapify, heappop, heappush, heappushpop, nlargest, nsmallest
from itertools import accumulate, combinations, count, groupby, permutations, product
from bisect import bisect_left, bisect_right, insort
from math import ceil, comb, floor, gcd, inf, isqrt, lcm, log, log2, sqrt
sys.setrecursionlimit(100000)
"""

JUDGE = CHILD_DIR / "judge.py"


@lru_cache(maxsize=None)
def _child_source(name: str) -> str:
    return (CHILD_DIR / name).read_text(encoding="utf-8")


def served_files(module_source: str) -> dict[str, str]:
    """The files of a served candidate: its module and the server (no test in them)."""
    return {"solution.py": module_source, "serve.py": _child_source("serve.py"),
            "wire.py": _child_source("wire.py")}


def _defines(code: str, name: str) -> bool:
    return re.search(rf"\bdef\s+{re.escape(name)}\s*\(", code) is not None


def humaneval_module(prompt: str, code: str, entry_point: str) -> str:
    """The candidate's module: a full function after the prompt simply redefines it (keeping
    the prompt's imports and helpers); a completion of the body is appended to the prompt."""
    return f"{prompt}\n{code}" if _defines(code, entry_point) else f"{prompt}{code}"


def _syntax_error(source: str) -> str | None:
    try:
        ast.parse(source)
    except SyntaxError as e:
        return f"fail: SyntaxError: {e.msg} (line {e.lineno})"
    except ValueError as e:  # e.g. a NUL byte
        return f"fail: {e}"
    return None


def judged(sandbox: Sandbox, module_source: str, job: dict[str, Any],
           timeout_s: float | None = None) -> Grade:
    """Serve ``module_source`` in the jail and run ``job``'s tests against it in the judge.

    ``job``: ``prelude`` (benchmark code the tests expect), ``tests`` (code snippets, one test
    each), ``call`` (run after each snippet), ``entry_point`` (bound to ``candidate``)."""
    n_tests = len(job["tests"])
    nonce = secrets.token_hex(16)
    r_req, w_req = os.pipe()  # judge -> candidate: calls
    r_rep, w_rep = os.pipe()  # candidate -> judge: return values
    r_rpt, w_rpt = os.pipe()  # judge -> evaluator: per-test results
    cand = judge = None
    try:
        cand = sandbox.start(served_files(module_source), "serve.py", args=(str(r_req), str(w_rep)),
                             pass_fds=(r_req, w_rep), timeout_s=timeout_s)
        judge = sandbox.start_trusted(
            [interpreter(), "-I", "-S", "-B", str(JUDGE), str(w_req), str(r_rep), str(w_rpt)],
            pass_fds=(w_req, r_rep, w_rpt), timeout_s=timeout_s,
        )
    except BaseException:
        os.close(r_rpt)
        for p in (cand, judge):
            if p is not None:
                p.finish(wait=False)
        raise
    finally:
        for fd in (r_req, w_req, r_rep, w_rep, w_rpt):
            os.close(fd)
    results: dict[int, dict] = {}
    done = None
    timed_out = False
    try:
        try:
            judge.proc.stdin.write(json.dumps({**job, "nonce": nonce}).encode())
            judge.proc.stdin.close()
        except OSError:
            pass  # the judge died; its report (none) says so
        reader = wire.Reader(r_rpt)
        while True:
            try:
                message = reader.recv(timeout=max(0.0, judge.deadline - time.perf_counter()))
            except TimeoutError:
                timed_out = True
                break
            except wire.WireError:
                break
            if message is None:
                break
            if message.get("nonce") != nonce:
                continue
            if message.get("done"):
                done = message
                break
            test = message.get("test")
            if isinstance(test, int) and 0 <= test < n_tests and test not in results:
                results[test] = message
    finally:
        os.close(r_rpt)
        judge_run = judge.finish(wait=False)
        cand_run = cand.finish(wait=False)
    if done is None:
        if timed_out:
            return Grade(False, None, "timeout")
        why = judge_run.stderr.strip().splitlines()[-1:] or [judge_run.status]
        return Grade(False, None, f"fail: the judge ended without a report ({why[0][:200]})")
    if not done.get("loaded"):
        return Grade(False, None, f"fail: {done.get('detail', 'the candidate did not load')}"[:300])
    failed = [i for i in range(n_tests) if not results.get(i, {}).get("passed")]
    if failed:
        i = failed[0]
        detail = results.get(i, {}).get("detail") or "no result"
        if "the candidate exited" in detail and cand_run.status not in ("ok", "killed"):
            detail += f" ({cand_run.status})"
        return Grade(False, None, f"fail: test {i}: {detail}"[:300])
    return Grade(True, None, _passed(n_tests))


def _passed(n: int) -> str:
    return f"pass ({n} test{'s' if n != 1 else ''})"


def _with_code(grade: Grade, code: str) -> Grade:
    return Grade(grade.correct, code, grade.detail)


def run_humaneval(code: str | None, problem: dict[str, Any], sandbox: Sandbox,
                  timeout_s: float | None = None) -> Grade:
    if not code:
        return Grade(False, code, "no code")
    entry = problem["entry_point"]
    module = humaneval_module(problem["prompt"], code, entry)
    bad = _syntax_error(module)
    if bad:
        return Grade(False, code, bad)
    job = {"prelude": problem["prompt"], "tests": [problem["test"]], "call": "check(candidate)",
           "entry_point": entry}
    return _with_code(judged(sandbox, module, job, timeout_s), code)


def run_mbpp(code: str | None, problem: dict[str, Any], sandbox: Sandbox,
             timeout_s: float | None = None) -> Grade:
    if not code:
        return Grade(False, code, "no code")
    setup = problem.get("setup") or ""
    module = f"{setup}\n{code}" if setup.strip() else code  # as MBPP runs it: setup, then code
    bad = _syntax_error(module)
    if bad:
        return Grade(False, code, bad)
    job = {"prelude": setup, "tests": list(problem["tests"]), "call": "", "entry_point": None}
    return _with_code(judged(sandbox, module, job, timeout_s), code)


# ---- LiveCodeBench ------------------------------------------------------------------------

def _number(tok: str) -> float | None:
    try:
        return float(tok)
    except ValueError:
        return None


def same_stdout(actual: str, expected: str) -> bool:
    """Line by line, trailing whitespace ignored; tokens that are numbers equal within 1e-6."""
    a = [ln.rstrip() for ln in actual.strip().splitlines()]
    e = [ln.rstrip() for ln in expected.strip().splitlines()]
    if a == e:
        return True
    if len(a) != len(e):
        return False
    for la, le in zip(a, e):
        ta, te = la.split(), le.split()
        if ta == te:
            continue
        if len(ta) != len(te):
            return False
        for x, y in zip(ta, te):
            if x == y:
                continue
            fx, fy = _number(x), _number(y)
            if fx is None or fy is None or not math.isclose(fx, fy, rel_tol=1e-6, abs_tol=1e-6):
                return False
    return True


def same_value(a: Any, b: Any) -> bool:
    """JSON values equal, floats within 1e-6, tuples and lists alike."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    return a == b  # plain data on both sides (decoded from the wire): no custom __eq__


class _Handle:
    """An object the candidate returned: it stays there, and equals nothing here."""

    def __init__(self, n: int):
        self.n = n


def _functional(code: str, problem: dict[str, Any], tests: list[dict], sandbox: Sandbox,
                timeout_s: float) -> Grade:
    name = problem.get("func_name")
    if not name:
        return Grade(False, code, "fail: functional test without a function name")
    module = LEETCODE_PRELUDE + code
    bad = _syntax_error(module)
    if bad:
        return Grade(False, code, bad)
    r_req, w_req = os.pipe()
    r_rep, w_rep = os.pipe()
    proc: Process | None = None
    try:
        proc = sandbox.start(served_files(module), "serve.py", args=(str(r_req), str(w_rep)),
                             pass_fds=(r_req, w_rep), timeout_s=timeout_s * (len(tests) + 1))
    finally:
        os.close(r_req)
        os.close(w_rep)
    caller = wire.Caller(wire.Writer(w_req), wire.Reader(r_rep), unref=_Handle,
                         mirror=lambda value, name: value)
    i = -1
    try:
        caller.ready(timeout=timeout_s)
        target = None
        for i, case in enumerate(tests):
            args = [json.loads(line) for line in case["input"].split("\n") if line.strip()]
            if target is None or target.get("handle") is not None:
                try:  # a fresh Solution() for every test
                    solution = caller.call({"name": "Solution"}, timeout=timeout_s)
                    target = {"handle": solution.n, "attr": name} if isinstance(solution, _Handle) else None
                except wire.CandidateError as e:
                    if not str(e).startswith("NameError"):
                        raise
                    target = {"name": name}
                if target is None:
                    return Grade(False, code, "fail: Solution is not a class")
            got = caller.call(target, args, timeout=timeout_s)
            if not same_value(got, json.loads(case["output"])):
                return Grade(False, code, f"test {i}: fail: wrong answer")
        return Grade(True, code, _passed(len(tests)))
    except TimeoutError:
        return Grade(False, code, f"test {max(i, 0)}: timeout")
    except (wire.CandidateError, wire.WireError) as e:
        return Grade(False, code, f"test {max(i, 0)}: fail: {e}"[:300])
    finally:
        os.close(w_req)
        os.close(r_rep)
        if proc is not None:
            proc.finish(wait=False)


def run_livecodebench(code: str | None, problem: dict[str, Any], sandbox: Sandbox,
                      timeout_s: float | None = None) -> Grade:
    if not code:
        return Grade(False, code, "no code")
    timeout = float(timeout_s if timeout_s is not None else sandbox.limits.timeout_s)
    tests = problem["tests"]
    functional = [t for t in tests if t["testtype"] == "functional"]
    if functional and len(functional) != len(tests):
        return Grade(False, code, "fail: a problem mixing stdin and functional tests")
    if functional:
        return _functional(code, problem, tests, sandbox, timeout)
    for i, case in enumerate(tests):
        run = sandbox.run_script(code, stdin=case["input"], timeout_s=timeout)
        if not run.ok:
            if run.status == "error":
                lines = [ln for ln in run.stderr.strip().splitlines() if ln.strip()]
                last = lines[-1][:200] if lines else f"exit {run.returncode}"
                return Grade(False, code, f"test {i}: fail: {last}")
            return Grade(False, code, f"test {i}: {run.status}")
        if not same_stdout(run.stdout, case["output"]):
            return Grade(False, code, f"test {i}: fail: wrong answer")
    return Grade(True, code, _passed(len(tests)))
