"""Code verdicts that cannot be forged: the candidate is imported (not run as __main__) or
run as a program, the tests and expected outputs stay out of its process and files, and the
verdict is the per-test result. Each hostile program below tries one way to pass without
being right; each must be scored wrong, and the honest programs next to them right."""

import subprocess
import sys

import pytest

from opd_lit.eval.programs import run_humaneval, run_livecodebench, run_mbpp, served_files
from opd_lit.eval.sandbox import Isolation, Sandbox, SandboxLimits, detect_isolation

JAIL = detect_isolation()
LIMITS = SandboxLimits(timeout_s=3.0, memory_mb=512)
ADD = {
    "prompt": 'def add(a: int, b: int) -> int:\n    """Return a + b."""\n',
    "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"
            "    assert candidate(10**20, 1) == 10**20 + 1\n",
    "entry_point": "add",
}
RIGHT = "def add(a, b):\n    return a + b\n"


@pytest.fixture(scope="module")
def box():
    if JAIL.jailed:
        return Sandbox(LIMITS, isolation=JAIL)
    # The harness's defences below do not depend on the jail (only reading host files does).
    return Sandbox(LIMITS, allow_unsandboxed=True, isolation=Isolation("none", reason="no jail here"))


@pytest.mark.parametrize("name, code, ok", [
    ("full function", RIGHT, True),
    ("body completion", "    return a + b\n", True),
    ("demo __main__ that reads input", RIGHT + "if __name__ == '__main__':\n    print(add(*map(int, input().split())))\n", True),
    ("wrong", "def add(a, b):\n    return a - b\n", False),
    ("SystemExit(0) at import", "raise SystemExit(0)\n", False),
    ("os._exit(0) at import", "import os\nos._exit(0)\n", False),
    ("sys.exit(0) in the call", "import sys\ndef add(a, b):\n    sys.exit(0)\n", False),
    ("work only under __main__", "if __name__ == '__main__':\n    def add(a, b):\n        return a + b\n", False),
    ("reads its own file for the tests",
     "SRC = open(__file__).read()\ndef add(a, b):\n    return 5 if 'candidate(2, 3)' in SRC else -1\n", False),
    ("an object equal to everything",
     "class Any:\n    def __eq__(self, o):\n        return True\ndef add(a, b):\n    return Any()\n", False),
    ("an int subclass equal to everything",
     "class Int(int):\n    def __eq__(self, o):\n        return True\ndef add(a, b):\n    return Int(0)\n", False),
    ("replaces AssertionError",
     "import builtins\nbuiltins.AssertionError = type('X', (Exception,), {})\ndef add(a, b):\n    return 0\n", False),
    ("writes fake verdicts to every descriptor",
     "import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'{\"done\": true, \"loaded\": true}\\n')\n"
     "    except OSError:\n        pass\ndef add(a, b):\n    return 0\n", False),
    ("prints a pass line", "print('All tests passed')\ndef add(a, b):\n    return 1\n", False),
])
def test_humaneval_verdicts(box, name, code, ok):
    g = run_humaneval(code, ADD, box)
    assert g.correct is ok, (name, g.detail)


def test_a_timeout_and_a_dead_candidate_are_wrong(box):
    assert run_humaneval("def add(a, b):\n    while True:\n        pass\n", ADD, box).detail == "timeout"
    g = run_humaneval("import os\ndef add(a, b):\n    os._exit(0)\n", ADD, box)
    assert not g.correct and "exited" in g.detail


def test_mbpp_setup_names_and_objects_cross_by_name(box):
    setup = ("class Node:\n    def __init__(self, v, l=None):\n        self.v, self.l = v, l\n"
             "chain = Node(1, Node(2, Node(3)))\n")
    problem = {"setup": setup, "tests": ["assert depth(chain) == 3", "assert math.isclose(depth(None) + 0.5, 0.5)"]}
    right = "def depth(n):\n    return 0 if n is None else 1 + depth(n.l)\n"
    assert run_mbpp(right, problem, box).correct
    assert not run_mbpp("def depth(n):\n    return 3\n", problem, box).correct  # fails test 1
    # classes the tests construct are the candidate's, passed as handles
    chain = {"tests": ["assert longest([Pair(1, 2), Pair(3, 4)]) == 2"]}
    pair = "class Pair:\n    def __init__(self, a, b):\n        self.a, self.b = a, b\n"
    assert run_mbpp(pair + "def longest(ps):\n    return len(ps)\n", chain, box).correct


STDIN = {"tests": [{"input": "1 2\n", "output": "3\n", "testtype": "stdin"},
                   {"input": "10 20\n", "output": "30\n", "testtype": "stdin"}]}
FUNCTIONAL = {"func_name": "maxPair", "tests": [
    {"input": "[1, 5, 3]", "output": "8", "testtype": "functional"},
    {"input": "[2, 2]", "output": "4", "testtype": "functional"}]}


@pytest.mark.parametrize("code, ok", [
    ("a, b = map(int, input().split())\nprint(a + b)\n", True),
    ("def main():\n    a, b = map(int, input().split())\n    print(a + b)\nif __name__ == '__main__':\n    main()\n", True),
    ("print(3)\n", False),  # the public test's output only
    ("import os\nos._exit(0)\n", False),
    ("a, b = map(int, input().split())\nprint(a + b)\nraise SystemExit(1)\n", False),
])
def test_livecodebench_stdin(box, code, ok):
    assert run_livecodebench(code, STDIN, box).correct is ok


@pytest.mark.parametrize("code, ok", [
    ("class Solution:\n    def maxPair(self, nums: List[int]) -> int:\n        s = sorted(nums)\n        return s[-1] + s[-2]\n", True),
    ("def maxPair(nums):\n    return sum(sorted(nums)[-2:])\n", True),
    ("class Solution:\n    def maxPair(self, nums):\n        return max(nums)\n", False),
    ("class A:\n    def __eq__(self, o):\n        return True\nclass Solution:\n    def maxPair(self, nums):\n        return A()\n", False),
    ("import sys\nclass Solution:\n    def maxPair(self, nums):\n        sys.exit(0)\n", False),
])
def test_livecodebench_functional(box, code, ok):
    assert run_livecodebench(code, FUNCTIONAL, box, timeout_s=3).correct is ok


# Reads every file named on any process's command line and prints the line after its input.
PEEK = r"""
import os, sys
inp = sys.stdin.read()
for p in os.listdir('/proc'):
    try:
        parts = open(f'/proc/{p}/cmdline', 'rb').read().decode(errors='ignore').split('\0')
    except OSError:
        continue
    for part in parts:
        try:
            text = open(part).read()
        except (OSError, ValueError):
            continue
        lines = text.splitlines()
        for i, line in enumerate(lines[:-1]):
            if line.strip() == inp.strip():
                print(lines[i + 1])
                sys.exit(0)
"""


@pytest.mark.parametrize("where", ["jail", "none"])
def test_a_program_that_reads_the_benchmark_from_proc(where, tmp_path):
    """The issue's case: the benchmark's path is on a process's command line. In the jail the
    program sees neither the process nor the file; without it, it cheats (which is why no jail
    is refused by default)."""
    if where == "jail" and not JAIL.jailed:
        pytest.skip(f"this machine cannot build the jail: {JAIL.reason}")
    bench = tmp_path / "bench.txt"
    bench.write_text("1 2\n3\n10 20\n30\n")
    host = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", str(bench)])
    try:
        box = (Sandbox(LIMITS, isolation=JAIL) if where == "jail" else
               Sandbox(LIMITS, allow_unsandboxed=True, isolation=Isolation("none", reason="test")))
        g = run_livecodebench(PEEK, STDIN, box)
    finally:
        host.kill()
    assert g.correct is (where == "none"), g.detail


def test_tests_never_reach_the_candidate(box):
    """What the candidate can see of itself: its module and the server, no test text."""
    spy = ("import os\nSEEN = {n: open(n).read() for n in os.listdir('.') if os.path.isfile(n)}\n"
           "def add(a, b):\n    import json\n    return json.dumps(SEEN)\n")
    marker_test = dict(ADD, test="def check(candidate):\n    seen = candidate(1, 2)\n    assert 'UNIQUE-TEST-MARKER' in seen\n")
    g = run_humaneval(spy, marker_test, box)
    assert not g.correct and "AssertionError" in g.detail
    assert sorted(served_files("x")) == ["serve.py", "solution.py", "wire.py"]
