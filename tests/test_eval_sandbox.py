"""The sandbox on hostile programs: the jail's walls (file system, uid, /proc, network, host
sockets), resource limits and lifetime, and the refusal to run without a jail. Bounded on
purpose (a shared 2-core machine): short time limits, at most 20 sleeping children, a small
memory limit. Jail tests run where the machine can build the jail (Linux, root or user
namespaces); the refusal is tested everywhere."""

import json
import logging
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from opd_lit.eval import sandbox as sb
from opd_lit.eval.sandbox import (
    Isolation,
    Sandbox,
    SandboxLimits,
    UnsandboxedError,
    detect_isolation,
)

FAST = dict(timeout_s=3.0, memory_mb=512, fsize_mb=4)
JAIL = detect_isolation()
needs_jail = pytest.mark.skipif(not JAIL.jailed, reason=f"this machine cannot build the jail: {JAIL.reason}")
# Both ways of building the jail where this machine has them (as root: both).
MODES = [m for m in ("root", "userns") if detect_isolation(m).jailed]


def jail(mode: str | None = None, **limits) -> Sandbox:
    iso = detect_isolation(mode) if mode else JAIL
    return Sandbox(SandboxLimits(**{**FAST, **limits}), isolation=iso)


def unsandboxed(**limits) -> Sandbox:
    return Sandbox(SandboxLimits(**{**FAST, **limits}), allow_unsandboxed=True,
                   isolation=Isolation("none", reason="test"))


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


# One program tries every way out of the jail and reports what it saw.
ESCAPES = r"""
import json, os, socket, sys
out = {"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(), "cwd": os.getcwd()}
def attempt(name, fn):
    try:
        fn()
        out[name] = "done"
    except Exception as e:
        out[name] = type(e).__name__
attempt("write_usr", lambda: open("/usr/opd_escape", "w"))
attempt("write_root", lambda: open("/opd_escape", "w"))
attempt("read_canary", lambda: open(CANARY).read())
attempt("remove_canary", lambda: os.remove(CANARY))
attempt("write_scratch", lambda: open("/tmp/mine", "w").write("x"))
pids = [p for p in os.listdir("/proc") if p.isdigit()]
out["pids"] = len(pids)
out["token_seen"] = any(TOKEN in open(f"/proc/{p}/cmdline", "rb").read().decode(errors="ignore")
                        for p in pids if os.access(f"/proc/{p}/cmdline", os.R_OK))
attempt("proc1_root", lambda: os.listdir("/proc/1/root"))
attempt("unix_path", lambda: socket.socket(socket.AF_UNIX).connect(SOCK_PATH))
attempt("unix_abstract", lambda: socket.socket(socket.AF_UNIX).connect("\0" + ABSTRACT))
attempt("network", lambda: socket.create_connection(("1.1.1.1", 53), timeout=2))
attempt("loopback", lambda: socket.create_connection(("127.0.0.1", LOOPBACK_PORT), timeout=2))
out["host_dirs"] = sorted(d for d in ("/home", "/work", "/data", "/run", "/srv") if os.path.exists(d))
out["env"] = sorted(os.environ)
print(json.dumps(out))
"""


@needs_jail
@pytest.mark.parametrize("mode", MODES)
def test_the_jail_holds(mode, tmp_path, monkeypatch):
    token = uuid.uuid4().hex
    canary = tmp_path / "canary.txt"
    canary.write_text("host secret")
    sock_path = str(tmp_path / "host.sock")
    servers = [socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX), socket.socket()]
    servers[0].bind(sock_path)
    servers[1].bind("\0opd-test-" + token)
    servers[2].bind(("127.0.0.1", 0))
    for s in servers:
        s.listen(1)
    # A host process whose command line names the token (as the evaluator's names its files).
    host = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", token])
    monkeypatch.setenv("OPD_SECRET_FOR_TEST", "leak")
    try:
        source = (f"CANARY = {str(canary)!r}\nTOKEN = {token!r}\nSOCK_PATH = {sock_path!r}\n"
                  f"ABSTRACT = {'opd-test-' + token!r}\nLOOPBACK_PORT = {servers[2].getsockname()[1]}\n"
                  + ESCAPES)
        run = jail(mode).run_script(source)
    finally:
        host.kill()
        for s in servers:
            s.close()
    assert run.ok, run.stderr
    seen = json.loads(run.stdout)
    assert (seen["uid"], seen["gid"], seen["groups"]) == (65534, 65534, [])
    assert seen["cwd"] == "/sandbox" and seen["write_scratch"] == "done"
    assert seen["write_usr"] != "done" and seen["write_root"] != "done"  # read-only root
    assert seen["read_canary"] == "FileNotFoundError" and seen["remove_canary"] == "FileNotFoundError"
    assert canary.read_text() == "host secret"
    assert seen["pids"] <= 3 and not seen["token_seen"]  # its own /proc
    assert seen["proc1_root"] == "PermissionError"
    assert seen["unix_path"] == "FileNotFoundError"  # the host's socket files are not there
    assert seen["unix_abstract"] == "ConnectionRefusedError"  # another network namespace
    assert seen["network"] != "done" and seen["loopback"] != "done"
    assert seen["host_dirs"] == []
    assert "OPD_SECRET_FOR_TEST" not in seen["env"]


@needs_jail
def test_children_die_with_the_program_even_outside_its_group():
    token = uuid.uuid4().hex
    program = (
        "import os, subprocess, sys, time\n"
        "for _ in range(10):\n"
        f"    subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)', '{token}'])\n"
        "for _ in range(10):\n"
        "    if os.fork() == 0:\n"
        "        os.setsid()\n"
        f"        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', '{token}'])\n"
        "time.sleep(60)\n"
    )
    t0 = time.perf_counter()
    r = jail().run_script(program)
    assert r.status == "timeout" and time.perf_counter() - t0 < FAST["timeout_s"] + 3
    assert wait_gone(token) == []


def test_without_the_jail_a_sweep_kills_setsid_children():
    token = uuid.uuid4().hex
    program = (
        "import os, sys, time\n"
        "for _ in range(10):\n"
        "    if os.fork() == 0:\n"
        "        os.setsid()\n"
        f"        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', '{token}'])\n"
        "time.sleep(0.5)\n"
    )
    r = unsandboxed().run_script(program)
    assert r.status == "ok"
    assert wait_gone(token) == []


@pytest.mark.parametrize("where", ["jail", "none"])
def test_memory_and_output_limits(where):
    if where == "jail" and not JAIL.jailed:
        pytest.skip(f"this machine cannot build the jail: {JAIL.reason}")
    box = jail() if where == "jail" else unsandboxed()
    big = box.run_script("x = bytearray(10 * 2**30)\nprint('allocated')")
    assert big.status == "memory" and "allocated" not in big.stdout
    flood = box.run_script("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n")
    assert flood.status == "output_limit" and len(flood.stdout) <= 256 * 1024 + 100


def test_no_jail_is_refused_unless_allowed(monkeypatch, caplog):
    none = Isolation("none", reason="no namespaces in this test")
    monkeypatch.setattr(sb, "detect_isolation", lambda mode=None: none)
    with pytest.raises(UnsandboxedError, match=r"without the jail: no namespaces.*eval.allow_unsandboxed=true"):
        Sandbox(SandboxLimits())
    with pytest.raises(UnsandboxedError):
        Sandbox(SandboxLimits(isolation="none"))  # asking for no jail is not allowing it
    with pytest.raises(RuntimeError, match=r"isolation=jail, but this machine cannot build the jail"):
        Sandbox(SandboxLimits(isolation="jail"), allow_unsandboxed=True)
    with caplog.at_level(logging.WARNING, logger="opd_lit.eval.sandbox"):
        box = Sandbox(SandboxLimits(), allow_unsandboxed=True)
    assert box.isolation.level == 0.0 and "UNSANDBOXED" in caplog.text
    assert JAIL.level == (1.0 if JAIL.jailed else 0.0)


def test_unknown_isolation_mode_is_named():
    with pytest.raises(ValueError, match=r"isolation='docker'.*auto"):
        SandboxLimits(isolation="docker")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['memory'\]"):
        SandboxLimits.from_dict({"memory": 1})


def test_scratch_is_removed(tmp_path):
    before = set(Path(os.environ.get("TMPDIR", "/tmp")).glob("opd_sandbox_*"))
    r = (jail() if JAIL.jailed else unsandboxed()).run_script("open('f.txt', 'w').write('x')\nprint('ok')")
    assert r.ok and r.stdout.strip() == "ok"
    assert set(Path(os.environ.get("TMPDIR", "/tmp")).glob("opd_sandbox_*")) <= before
