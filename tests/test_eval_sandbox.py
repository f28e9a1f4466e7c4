"""The code sandbox on hostile programs: each is killed or refused, scored wrong, and leaves
nothing behind. Bounded on purpose (a shared 2-core machine): short time limits, at most 20
sleeping children, a small memory limit; never an unbounded fork."""

import time
import uuid
from pathlib import Path

import pytest

from opd_lit.eval.sandbox import SandboxLimits, detect_isolation, run_python

FAST = dict(timeout_s=2.0, memory_mb=512, fsize_mb=4)
NAMESPACES = detect_isolation().pid_namespace


def alive_with(token: str) -> list[int]:
    """Live (non-zombie) processes whose command line carries ``token``."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if token.encode() not in cmdline.read_bytes():
                continue
            state = (cmdline.parent / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            pids.append(int(cmdline.parent.name))
    return pids


def wait_gone(token: str, seconds: float = 3.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while True:
        left = alive_with(token)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def test_passing_and_failing_programs():
    ok = run_python("print(sum(range(5)))", limits=SandboxLimits(**FAST))
    assert ok.status == "ok" and ok.stdout.strip() == "10"
    bad = run_python("assert 1 == 2, 'nope'", limits=SandboxLimits(**FAST))
    assert bad.status == "error" and "AssertionError" in bad.stderr


def test_environment_is_stripped_and_cwd_is_a_scratch_dir(monkeypatch):
    monkeypatch.setenv("OPD_SECRET_FOR_TEST", "leak")
    r = run_python(
        "import os, json\nopen('f.txt', 'w').write('x')\n"
        "print(json.dumps({'cwd': os.getcwd(), 'env': sorted(os.environ)}))",
        limits=SandboxLimits(**FAST),
    )
    import json

    out = json.loads(r.stdout)
    assert "OPD_SECRET_FOR_TEST" not in out["env"]
    assert Path(out["cwd"]).name.startswith("opd_sandbox_")
    assert not Path(out["cwd"]).exists()  # removed afterwards


def test_infinite_loop_is_killed_at_the_time_limit():
    t0 = time.perf_counter()
    r = run_python("while True:\n    pass\n", limits=SandboxLimits(**FAST))
    assert r.status == "timeout" and not r.ok
    assert time.perf_counter() - t0 < FAST["timeout_s"] + 2


def test_forked_children_are_all_killed_on_timeout():
    token = uuid.uuid4().hex
    program = (
        "import subprocess, sys, time\n"
        "for _ in range(20):\n"
        f"    subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)', '{token}'])\n"
        "time.sleep(60)\n"
    )
    r = run_python(program, limits=SandboxLimits(**FAST))
    assert r.status == "timeout"
    assert wait_gone(token) == []


@pytest.mark.parametrize("isolation", ["auto", "none"])
def test_children_that_leave_the_process_group_die_too(isolation):
    # The program exits normally; its 20 children called setsid to escape the group kill.
    token = uuid.uuid4().hex
    program = (
        "import os, sys, time\n"
        "for _ in range(20):\n"
        "    if os.fork() == 0:\n"
        "        os.setsid()\n"
        f"        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', '{token}'])\n"
        "time.sleep(0.5)\n"
    )
    r = run_python(program, limits=SandboxLimits(**FAST, isolation=isolation))
    assert r.status == "ok"
    assert wait_gone(token) == []


def test_a_10gb_allocation_is_refused():
    r = run_python("x = bytearray(10 * 2**30)\nprint('allocated')", limits=SandboxLimits(**FAST))
    assert r.status == "memory" and "allocated" not in r.stdout


def test_growing_memory_hits_the_limit():
    r = run_python("a = []\nwhile True:\n    a.append(bytearray(16 * 2**20))\n", limits=SandboxLimits(**FAST))
    assert r.status in ("memory", "killed")


def test_output_flood_is_capped():
    r = run_python("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n", limits=SandboxLimits(**FAST))
    assert r.status == "output_limit"
    assert len(r.stdout) <= 256 * 1024 + 100


@pytest.mark.skipif(not NAMESPACES, reason="no network namespace on this machine")
def test_no_network():
    r = run_python(
        "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=2)\n",
        limits=SandboxLimits(**FAST),
    )
    assert r.status == "error" and ("unreachable" in r.stderr or "OSError" in r.stderr)


def test_unknown_isolation_mode_is_named():
    with pytest.raises(ValueError, match=r"isolation='docker'.*auto"):
        SandboxLimits(isolation="docker")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['memory'\]"):
        SandboxLimits.from_dict({"memory": 1})
