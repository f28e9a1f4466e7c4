"""Code benchmarks: build the program to run from a response and a problem, run it, judge it.

- HumanEval: the problem's ``prompt`` (imports, helpers, the signature with its docstring),
  then the model's code (a full function, or a completion of the prompt's body), the
  problem's ``test`` (which defines ``check``) and ``check(entry_point)``. Passing = exit 0.
- MBPP: ``test_setup_code``, the model's code, then every assert of ``test_list``.
- LiveCodeBench: each test case runs on its own. ``stdin`` tests feed ``input`` to the
  program and compare its stdout with ``output`` (line by line, trailing whitespace ignored,
  numbers equal within 1e-6); ``functional`` tests (LeetCode style) call
  ``Solution().<func_name>`` (or a top-level ``<func_name>``) with the JSON arguments of
  ``input`` (one per line) and compare the JSON result with ``output``. The first failing
  test stops the sample.

Every run goes through :func:`opd_lit.eval.sandbox.run_python`.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from opd_lit.eval.graders import Grade
from opd_lit.eval.sandbox import RunResult, SandboxLimits, run_python

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

_RESULT_FILE = "__result.json"

FUNCTIONAL_DRIVER = """

def __opd_main():
    import json as _json, sys as _sys
    _args = [_json.loads(_line) for _line in _sys.stdin.read().split("\\n") if _line.strip()]
    _name = {name!r}
    _g = globals()
    if "Solution" in _g and hasattr(_g["Solution"], _name):
        _fn = getattr(_g["Solution"](), _name)
    elif _name in _g:
        _fn = _g[_name]
    else:
        raise SystemExit("no Solution." + _name + " and no function " + _name)
    _out = _fn(*_args)
    with open({result!r}, "w") as _f:
        _f.write(_json.dumps(_out))

__opd_main()
"""


def _status_detail(run: RunResult) -> str:
    if run.ok:
        return "pass"
    if run.status == "error":
        lines = [ln for ln in run.stderr.strip().splitlines() if ln.strip()]
        last = lines[-1][:200] if lines else f"exit {run.returncode}"
        return f"fail: {last}"
    return run.status


def _defines(code: str, name: str) -> bool:
    return re.search(rf"\bdef\s+{re.escape(name)}\s*\(", code) is not None


def humaneval_program(prompt: str, code: str, test: str, entry_point: str) -> str:
    # A full function after the prompt simply redefines it (the prompt's own body is its
    # docstring, a valid body), keeping the prompt's imports and helpers; a completion is
    # appended to the prompt as is.
    body = f"{prompt}\n{code}" if _defines(code, entry_point) else f"{prompt}{code}"
    return f"{body}\n\n{test}\n\ncheck({entry_point})\n"


def mbpp_program(code: str, tests: list[str], setup: str = "") -> str:
    return f"{setup}\n{code}\n\n" + "\n".join(tests) + "\n"


def run_humaneval(code: str | None, problem: dict[str, Any], limits: SandboxLimits,
                  timeout_s: float | None = None) -> Grade:
    if not code:
        return Grade(False, code, "no code")
    program = humaneval_program(problem["prompt"], code, problem["test"], problem["entry_point"])
    run = run_python(program, limits=limits, timeout_s=timeout_s)
    return Grade(run.ok, code, _status_detail(run))


def run_mbpp(code: str | None, problem: dict[str, Any], limits: SandboxLimits,
             timeout_s: float | None = None) -> Grade:
    if not code:
        return Grade(False, code, "no code")
    program = mbpp_program(code, problem["tests"], problem.get("setup") or "")
    run = run_python(program, limits=limits, timeout_s=timeout_s)
    return Grade(run.ok, code, _status_detail(run))


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
    return a == b


def run_livecodebench(code: str | None, problem: dict[str, Any], limits: SandboxLimits,
                      timeout_s: float | None = None) -> Grade:
    if not code:
        return Grade(False, code, "no code")
    tests = problem["tests"]
    for i, case in enumerate(tests):
        if case["testtype"] == "functional":
            name = problem.get("func_name")
            if not name:
                return Grade(False, code, "fail: functional test without a function name")
            program = LEETCODE_PRELUDE + code + FUNCTIONAL_DRIVER.format(name=name, result=_RESULT_FILE)
            run = run_python(program, stdin=case["input"], limits=limits, timeout_s=timeout_s,
                             read_files=(_RESULT_FILE,))
            if not run.ok:
                return Grade(False, code, f"test {i}: {_status_detail(run)}")
            try:
                got = json.loads(run.files.get(_RESULT_FILE, ""))
                want = json.loads(case["output"])
            except ValueError:
                return Grade(False, code, f"test {i}: fail: result is not JSON")
            if not same_value(got, want):
                return Grade(False, code, f"test {i}: fail: wrong answer")
        else:
            run = run_python(code, stdin=case["input"], limits=limits, timeout_s=timeout_s)
            if not run.ok:
                return Grade(False, code, f"test {i}: {_status_detail(run)}")
            if not same_stdout(run.stdout, case["output"]):
                return Grade(False, code, f"test {i}: fail: wrong answer")
    return Grade(True, code, f"pass ({len(tests)} tests)")
