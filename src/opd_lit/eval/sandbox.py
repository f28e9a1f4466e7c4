"""Run an untrusted Python program in a sandboxed subprocess.

Every run gets

- a fresh scratch directory as its working directory (``HOME`` and ``TMPDIR`` too), removed
  afterwards;
- a stripped environment (``PATH``, locale, one-thread BLAS settings and a per-run marker);
- resource limits set with :mod:`resource` in the child, before the program starts:
  ``RLIMIT_AS`` (address space), ``RLIMIT_CPU`` (CPU seconds), ``RLIMIT_FSIZE`` (largest
  file written, which also caps the captured stdout/stderr), ``RLIMIT_CORE`` = 0, and
  ``RLIMIT_NPROC`` when the evaluation does not run as root (the kernel does not enforce it
  for root);
- its own session and process group (``start_new_session=True``); the whole group is killed
  with ``SIGKILL`` when the wall-clock limit passes and again after every run, so children
  the program forked die with it;
- when ``unshare`` works on the machine (detected once per process): new user, network and
  PID namespaces (``unshare -rn --pid --fork --kill-child``). The network namespace has no
  interfaces but a downed loopback, so the program cannot reach the network; the PID
  namespace makes every process the program starts die when its init does, even ones that
  left the process group with ``setsid``. A small init (``_BOOT``) forks the program and
  exits with its status, so the program itself never runs as PID 1 (which would ignore
  ``SIGXCPU`` and friends).

Without ``unshare`` (``isolation=none``, or ``auto`` on a machine that forbids it) the
program can reach the network, and children that call ``setsid`` escape the process-group
kill; a sweep over ``/proc`` then kills every process that still carries the run's
environment marker. ``isolation=namespaces`` makes a missing ``unshare`` an error instead.

The sandbox limits resources, lifetime and network. It is not a filesystem jail (no mount
namespace, chroot or seccomp): run evaluations of untrusted models as an unprivileged user.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ISOLATION_MODES = ("auto", "namespaces", "none")
MARKER_VAR = "OPD_SANDBOX_RUN"
_MiB = 1 << 20


@dataclass
class SandboxLimits:
    """``eval.sandbox.*`` config keys."""

    timeout_s: float = 10.0  # wall clock per program run
    memory_mb: int = 2048  # RLIMIT_AS
    cpu_s: float | None = None  # RLIMIT_CPU; None = timeout_s + 1
    fsize_mb: int = 16  # RLIMIT_FSIZE (files written, captured stdout/stderr included)
    nproc: int = 64  # RLIMIT_NPROC headroom over the user's current tasks (non-root only)
    isolation: str = "auto"  # auto | namespaces | none
    workers: int = 2  # programs run in parallel
    max_output_kb: int = 256  # stdout kept in the result (the rest is dropped)

    def __post_init__(self):
        if self.isolation not in ISOLATION_MODES:
            raise ValueError(
                f"eval.sandbox.isolation={self.isolation!r} is not one of {list(ISOLATION_MODES)}"
            )
        for key in ("timeout_s", "memory_mb", "fsize_mb", "workers"):
            if getattr(self, key) is None or getattr(self, key) <= 0:
                raise ValueError(f"eval.sandbox.{key}={getattr(self, key)!r}: must be > 0")

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> "SandboxLimits":
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"eval.sandbox: unknown key(s) {unknown}; allowed: {sorted(known)}")
        return cls(**values)


@dataclass
class RunResult:
    """What happened to one program run."""

    status: str  # ok | error | timeout | memory | cpu | output_limit | killed
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    files: dict[str, str]

    @property
    def ok(self) -> bool:
        return self.status == "ok"


# The sandbox's init: forks the program with the limits applied, waits, and exits with its
# status (128 + signal when it was killed by one). argv: limits JSON, then the program argv.
_BOOT = r"""
import json, os, resource, sys
lim = json.loads(sys.argv[1])
argv = sys.argv[2:]
pid = os.fork()
if pid == 0:
    try:
        for name, value in lim["rlimits"].items():
            soft, hard = value
            resource.setrlimit(getattr(resource, name), (soft, hard))
        os.execv(argv[0], argv)
    except BaseException as e:
        sys.stderr.write("sandbox: could not start the program: %r\n" % (e,))
        os._exit(127)
while True:
    try:
        _, status = os.waitpid(pid, 0)
        break
    except InterruptedError:
        continue
if os.WIFSIGNALED(status):
    os._exit(128 + os.WTERMSIG(status))
os._exit(os.WEXITSTATUS(status))
"""


@dataclass
class Isolation:
    name: str  # "user+net+pid namespaces" | "user+net namespaces" | "none"
    prefix: list[str]
    pid_namespace: bool
    reason: str = ""


_isolation_lock = threading.Lock()
_isolation_cache: Isolation | None = None


def _probe(prefix: list[str]) -> tuple[bool, str]:
    try:
        proc = subprocess.run(
            [*prefix, sys.executable, "-I", "-c", "pass"],
            capture_output=True, text=True, timeout=20, env={"PATH": os.defpath},
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, repr(e)
    return proc.returncode == 0, proc.stderr.strip()[-300:]


def detect_isolation() -> Isolation:
    """The strongest isolation this machine allows (probed once per process)."""
    global _isolation_cache
    with _isolation_lock:
        if _isolation_cache is not None:
            return _isolation_cache
        unshare = shutil.which("unshare")
        if unshare is None or not sys.platform.startswith("linux"):
            iso = Isolation("none", [], False, "no unshare binary on this machine")
        else:
            full = [unshare, "-rn", "--pid", "--fork", "--kill-child", "--"]
            ok, why = _probe(full)
            if ok:
                iso = Isolation("user+net+pid namespaces", full, True)
            else:
                net = [unshare, "-rn", "--"]
                ok2, why2 = _probe(net)
                if ok2:
                    iso = Isolation("user+net namespaces", net, False, f"no PID namespace: {why}")
                else:
                    iso = Isolation("none", [], False, f"unshare -rn failed: {why2 or why}")
        _isolation_cache = iso
        if iso.name == "none":
            log.warning(
                "sandbox: running generated programs WITHOUT namespaces (%s): they can reach "
                "the network, and children that call setsid are only caught by the /proc sweep",
                iso.reason,
            )
        else:
            log.info("sandbox: generated programs run in %s", iso.name)
        return iso


def isolation_for(mode: str) -> Isolation:
    if mode == "none":
        return Isolation("none", [], False, "eval.sandbox.isolation=none")
    iso = detect_isolation()
    if mode == "namespaces" and iso.name != "user+net+pid namespaces":
        raise RuntimeError(
            f"eval.sandbox.isolation=namespaces, but this machine allows only {iso.name!r} "
            f"({iso.reason}). Use isolation=auto to run with what is available."
        )
    return iso


def _user_tasks(uid: int) -> int:
    """Processes and threads of ``uid`` (what RLIMIT_NPROC counts)."""
    count = 0
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
        except OSError:
            continue
        real_uid = threads = None
        for line in text.splitlines():
            if line.startswith("Uid:"):
                real_uid = int(line.split()[1])
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
        if real_uid == uid:
            count += threads or 1
    return count


def _rlimits(limits: SandboxLimits, timeout_s: float) -> dict[str, tuple[int, int]]:
    import resource

    cpu = int(limits.cpu_s if limits.cpu_s is not None else timeout_s + 1)
    cpu = max(1, cpu)
    out = {
        "RLIMIT_AS": (limits.memory_mb * _MiB, limits.memory_mb * _MiB),
        "RLIMIT_CPU": (cpu, cpu + 1),
        "RLIMIT_FSIZE": (limits.fsize_mb * _MiB, limits.fsize_mb * _MiB),
        "RLIMIT_CORE": (0, 0),
    }
    uid = os.getuid()
    if uid != 0 and hasattr(resource, "RLIMIT_NPROC") and Path("/proc").is_dir():
        n = _user_tasks(uid) + limits.nproc
        out["RLIMIT_NPROC"] = (n, n)
    return out


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def sweep_marked(token: str) -> int:
    """SIGKILL every process whose environment carries this run's marker; returns how many."""
    needle = f"{MARKER_VAR}={token}".encode()
    killed = 0
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            data = environ.read_bytes()
        except OSError:
            continue
        if needle in data.split(b"\0"):
            try:
                os.kill(int(environ.parent.name), signal.SIGKILL)
                killed += 1
            except (ProcessLookupError, PermissionError, ValueError):
                pass
    return killed


def _read_capped(path: Path, limit: int) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError:
        return ""
    text = data[:limit].decode("utf-8", errors="replace")
    return text + ("\n...[truncated]" if len(data) > limit else "")


def _classify(rc: int, timed_out: bool, stderr: str) -> str:
    if timed_out:
        return "timeout"
    if rc == 0:
        return "ok"
    sig = rc - 128 if rc > 128 else (-rc if rc < 0 else 0)
    if sig == signal.SIGXCPU:
        return "cpu"
    if sig == signal.SIGXFSZ or "File too large" in stderr:
        return "output_limit"
    if "MemoryError" in stderr or "Cannot allocate memory" in stderr:
        return "memory"
    if sig == signal.SIGKILL:
        return "killed"  # the CPU hard limit, or the kernel's OOM killer
    return "error"


def run_python(
    source: str,
    *,
    stdin: str | None = None,
    limits: SandboxLimits | None = None,
    timeout_s: float | None = None,
    read_files: tuple[str, ...] = (),
    python: str | None = None,
) -> RunResult:
    """Run ``source`` as ``main.py`` in a fresh sandbox; never raises for what the program does."""
    limits = limits or SandboxLimits()
    timeout = float(timeout_s if timeout_s is not None else limits.timeout_s)
    iso = isolation_for(limits.isolation)
    token = uuid.uuid4().hex
    scratch = Path(tempfile.mkdtemp(prefix="opd_sandbox_"))
    t0 = time.perf_counter()
    timed_out = False
    try:
        (scratch / "main.py").write_text(source, encoding="utf-8")
        (scratch / "stdin.txt").write_text(stdin or "", encoding="utf-8")
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": str(scratch),
            "TMPDIR": str(scratch),
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            MARKER_VAR: token,
        }
        lim = {"rlimits": _rlimits(limits, timeout)}
        exe = python or sys.executable
        argv = [*iso.prefix, exe, "-I", "-c", _BOOT, json.dumps(lim), exe, "-I", "main.py"]
        with open(scratch / "stdin.txt", "rb") as fin, open(scratch / ".stdout", "wb") as fout, \
                open(scratch / ".stderr", "wb") as ferr:
            proc = subprocess.Popen(
                argv, cwd=scratch, env=env, stdin=fin, stdout=fout, stderr=ferr,
                start_new_session=True, close_fds=True,
            )
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc.pid)
                rc = proc.wait()
            finally:
                # Leftover children of a finished program die too.
                _kill_group(proc.pid)
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        if not iso.pid_namespace:
            sweep_marked(token)
        seconds = time.perf_counter() - t0
        stdout = _read_capped(scratch / ".stdout", limits.max_output_kb * 1024)
        stderr = _read_capped(scratch / ".stderr", 16 * 1024)
        files = {name: _read_capped(scratch / name, limits.max_output_kb * 1024)
                 for name in read_files if (scratch / name).is_file()}
        return RunResult(_classify(rc, timed_out, stderr), rc, stdout, stderr, seconds, files)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
