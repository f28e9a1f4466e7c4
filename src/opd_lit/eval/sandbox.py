"""Run untrusted programs: a jail where the machine allows one, refused otherwise.

**The jail** (``isolation=jail``; ``auto`` picks it when it works): every program starts
from :mod:`opd_lit.eval.child.init`, which gives it

- new mount, PID, network, IPC and UTS namespaces: a root file system that holds only what
  Python needs, read-only (``/usr``, ``/lib*``, the interpreter's prefix, four devices); no
  ``/home``, ``/root``, ``/tmp``, ``/run``, ``/data`` or checkout of the host, hence none of
  the benchmark files and none of the host's Unix sockets; its own ``/proc`` showing only its
  own processes; no network interface but a downed loopback (and no abstract sockets of the
  host); a private, size-capped tmpfs ``/sandbox`` (its working directory, ``HOME``,
  ``TMPDIR`` and ``/tmp``) that vanishes with it;
- an unprivileged uid: 65534 with no groups when the evaluator runs as root; otherwise the
  evaluator's own uid, seen as 65534 inside a user namespace, with no capability; in both
  cases ``no_new_privs`` (a setuid binary gains nothing);
- resource limits: ``RLIMIT_AS`` (``memory_mb``), ``RLIMIT_CPU`` (``cpu_s``),
  ``RLIMIT_FSIZE`` (``fsize_mb``, which also caps the captured stdout/stderr),
  ``RLIMIT_CORE`` 0, ``RLIMIT_NPROC`` (``nproc`` over the uid's current tasks, where the
  kernel enforces it: not for root);
- a wall clock (``timeout_s``): the whole process group is killed, and with it the PID
  namespace, so every process the program started dies, even ones that left the group.

The jail is built by the evaluator's own Python through ``unshare(2)``, ``mount(2)`` and
``chroot(2)``: it needs Linux and either root (the evaluator's uid) or unprivileged user
namespaces. A self-test at start-up checks what it promises (uid, read-only root, no host
file, own ``/proc``, no network); if it fails the reason is logged.

**No jail** (``isolation=none``, or ``auto`` where the jail fails): the program runs as the
evaluator's user with the same resource limits, in a scratch directory, and can read the
host's files, see its processes, connect to its sockets and the network. That is refused
for untrusted code unless ``eval.allow_unsandboxed=true``, and then logged loudly at
start-up and recorded as ``eval/<benchmark>/isolation`` = 0 (1 = jail).
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

ISOLATION_MODES = ("auto", "jail", "none")
MARKER_VAR = "OPD_SANDBOX_RUN"
CHILD_DIR = Path(__file__).resolve().parent / "child"
INIT = CHILD_DIR / "init.py"
SETUP_FAILED = 125  # init.py's status when the jail or the program could not start
JAIL_UID = JAIL_GID = 65534
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32")
ETC_FILES = ("/etc/ld.so.cache", "/etc/localtime")
_MiB = 1 << 20


@dataclass
class SandboxLimits:
    """``eval.sandbox.*`` config keys."""

    timeout_s: float = 10.0  # wall clock per program run
    memory_mb: int = 2048  # RLIMIT_AS
    cpu_s: float | None = None  # RLIMIT_CPU; None = timeout_s + 1
    fsize_mb: int = 16  # RLIMIT_FSIZE (files written, captured stdout/stderr included)
    nproc: int = 64  # RLIMIT_NPROC headroom over the uid's current tasks (not for root)
    isolation: str = "auto"  # auto | jail | none
    workers: int = 2  # programs run in parallel
    max_output_kb: int = 256  # stdout kept in the result (the rest is dropped)
    scratch_mb: int = 64  # size of the jail's private /sandbox tmpfs

    def __post_init__(self):
        if self.isolation not in ISOLATION_MODES:
            raise ValueError(
                f"eval.sandbox.isolation={self.isolation!r} is not one of {list(ISOLATION_MODES)}"
            )
        for key in ("timeout_s", "memory_mb", "fsize_mb", "workers", "scratch_mb"):
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


@dataclass(frozen=True)
class Isolation:
    """How programs run: ``jail`` (mode ``root`` or ``userns``) or ``none``."""

    name: str
    mode: str | None = None
    reason: str = ""

    @property
    def jailed(self) -> bool:
        return self.name == "jail"

    @property
    def level(self) -> float:
        """The ``eval/<benchmark>/isolation`` metric: 1 = jail, 0 = none."""
        return 1.0 if self.jailed else 0.0

    def describe(self) -> str:
        if self.jailed:
            how = "uid 65534" if self.mode == "root" else "uid 65534 in a user namespace"
            return f"jail ({how}; read-only root, private /sandbox, own /proc, no network)"
        return f"NO JAIL ({self.reason})"


class UnsandboxedError(RuntimeError):
    """Untrusted code would run without the jail, and that was not allowed."""


@dataclass
class RunResult:
    """What happened to one program run."""

    status: str  # ok | error | timeout | memory | cpu | output_limit | killed | sandbox_error
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.status == "ok"


# ---- the interpreter and the jail's file system -------------------------------------------

def interpreter() -> str:
    """The base interpreter (not a venv's wrapper): what the jail binds and runs."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def jail_binds() -> list[str]:
    """Host paths the jail binds read-only (or recreates as symlinks, for /bin -> usr/bin)."""
    binds = [d for d in SYSTEM_DIRS if os.path.lexists(d)]
    prefix = os.path.realpath(sys.base_prefix)
    if not any(prefix == d or prefix.startswith(d + "/") for d in binds):
        binds.append(prefix)
    return binds + [f for f in ETC_FILES if os.path.exists(f)]


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


def _rlimits(limits: SandboxLimits, timeout_s: float, iso: Isolation) -> dict[str, tuple[int, int]]:
    import resource

    cpu = max(1, int(limits.cpu_s if limits.cpu_s is not None else timeout_s + 1))
    out = {
        "RLIMIT_AS": (limits.memory_mb * _MiB, limits.memory_mb * _MiB),
        "RLIMIT_CPU": (cpu, cpu + 1),
        "RLIMIT_FSIZE": (limits.fsize_mb * _MiB, limits.fsize_mb * _MiB),
        "RLIMIT_CORE": (0, 0),
    }
    # The uid the kernel counts: 65534 in a root-made jail, else the evaluator's (never root).
    uid = JAIL_UID if iso.jailed and iso.mode == "root" else os.getuid()
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
    """SIGKILL every process whose environment carries this run's marker; returns how many.

    Only needed without the jail, where a child that calls ``setsid`` leaves the group."""
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


def _classify(rc: int | None, timed_out: bool, stderr: str) -> str:
    if timed_out:
        return "timeout"
    if rc == 0:
        return "ok"
    if rc == SETUP_FAILED and "sandbox:" in stderr:
        return "sandbox_error"
    sig = rc - 128 if rc is not None and rc > 128 else (-rc if rc is not None and rc < 0 else 0)
    if sig == signal.SIGXCPU:
        return "cpu"
    if sig == signal.SIGXFSZ or "File too large" in stderr:
        return "output_limit"
    if "MemoryError" in stderr or "Cannot allocate memory" in stderr:
        return "memory"
    if sig == signal.SIGKILL:
        return "killed"  # the CPU hard limit, or the kernel's OOM killer
    return "error"


# ---- one process ---------------------------------------------------------------------------

class Process:
    """One program started through ``init.py``: in the jail, or (``isolation none``, or a
    trusted helper) as a plain child with the resource limits. Use :meth:`finish`."""

    def __init__(self, iso: Isolation, limits: SandboxLimits, *, files: dict[str, str],
                 script: str | None, args: tuple[str, ...] = (), stdin: str | bytes | None = None,
                 pass_fds: tuple[int, ...] = (), timeout_s: float | None = None,
                 trusted_argv: list[str] | None = None, stdin_pipe: bool = False):
        self.iso, self.limits = iso, limits
        self.timeout_s = float(timeout_s if timeout_s is not None else limits.timeout_s)
        self.token = uuid.uuid4().hex
        self.staging = Path(tempfile.mkdtemp(prefix="opd_sandbox_"))
        self.t0 = time.perf_counter()
        self.timed_out = False
        self.proc = None
        try:
            self._start(files, script, args, stdin, pass_fds, trusted_argv, stdin_pipe)
        except BaseException:
            shutil.rmtree(self.staging, ignore_errors=True)
            raise

    def _start(self, files, script, args, stdin, pass_fds, trusted_argv, stdin_pipe):
        files_dir = self.staging / "files"
        files_dir.mkdir()
        for name, text in files.items():
            (files_dir / name).write_text(text, encoding="utf-8")
        jailed = self.iso.jailed and trusted_argv is None
        python = interpreter()
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        if jailed:
            home = "/sandbox"
            argv = [python, "-I", "-S", "-B", f"{home}/{script}", *args]
        elif trusted_argv is not None:
            home = str(files_dir)
            argv = list(trusted_argv)
        else:
            home = str(files_dir)
            argv = [python, "-I", "-S", "-B", str(files_dir / script), *args]
            env[MARKER_VAR] = self.token
        env.update(HOME=home, TMPDIR=home)
        cfg = {
            "jail": jailed, "mode": self.iso.mode, "root": str(self.staging / "root"),
            "files": str(files_dir), "binds": jail_binds(), "uid": JAIL_UID, "gid": JAIL_GID,
            "scratch_mb": self.limits.scratch_mb, "scratch_inodes": 4096,
            "rlimits": _rlimits(self.limits, self.timeout_s, self.iso), "argv": argv,
            "env": env, "cwd": home, "keep_fds": list(pass_fds),
        }
        (self.staging / "root").mkdir()
        (self.staging / "init.json").write_text(json.dumps(cfg))
        if isinstance(stdin, str):
            stdin = stdin.encode("utf-8")
        (self.staging / "stdin").write_bytes(stdin or b"")
        with open(self.staging / "stdin", "rb") as fin, \
                open(self.staging / "stdout", "wb") as fout, \
                open(self.staging / "stderr", "wb") as ferr:
            self.proc = subprocess.Popen(
                [python, "-I", "-S", "-B", str(INIT), str(self.staging / "init.json")],
                cwd=self.staging, env={"PATH": env["PATH"], "LANG": "C.UTF-8"},
                stdin=subprocess.PIPE if stdin_pipe else fin, stdout=fout, stderr=ferr,
                start_new_session=True, close_fds=True, pass_fds=pass_fds,
            )

    @property
    def deadline(self) -> float:
        return self.t0 + self.timeout_s

    def wait(self, timeout: float | None = None) -> int | None:
        """The exit status, or None when still running after ``timeout`` seconds."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        if self.proc is not None:
            _kill_group(self.proc.pid)

    def finish(self, wait: bool = True) -> RunResult:
        """Collect the run and clean up: with ``wait``, let it run until its wall clock
        (then it has timed out); without, kill it now."""
        try:
            if wait and self.wait(max(0.0, self.deadline - time.perf_counter())) is None:
                self.timed_out = True
            self.kill()
            rc = self.proc.wait()
            if not self.iso.jailed:
                sweep_marked(self.token)
            stdout = _read_capped(self.staging / "stdout", self.limits.max_output_kb * 1024)
            stderr = _read_capped(self.staging / "stderr", 16 * 1024)
            seconds = time.perf_counter() - self.t0
            status = _classify(rc, self.timed_out, stderr)
            if status == "sandbox_error":
                log.warning("sandbox: a program could not start: %s", stderr.strip()[-500:])
            return RunResult(status, rc, stdout, stderr, seconds)
        finally:
            if self.proc is not None and self.proc.stdin is not None:
                self.proc.stdin.close()
            shutil.rmtree(self.staging, ignore_errors=True)


# ---- isolation: detection, policy -----------------------------------------------------------

_PROBE = r"""
import os, socket
problems = []
if os.getuid() != 65534 or os.getgid() != 65534:
    problems.append("uid/gid %d/%d, not 65534" % (os.getuid(), os.getgid()))
try:
    open("/usr/opd_probe", "w")
    problems.append("/usr is writable")
except OSError:
    pass
for path in ("/home", "/root", "/work", "/data", "/run"):
    if os.path.exists(path) and path not in PREFIX_PARENTS:
        problems.append(path + " is visible")
pids = [p for p in os.listdir("/proc") if p.isdigit()]
if len(pids) > 3:
    problems.append("%d processes visible in /proc" % len(pids))
try:
    socket.create_connection(("127.0.0.1", 9), timeout=1)
    problems.append("loopback reachable")
except OSError:
    pass
open("scratch", "w").write("x")
print("ok" if not problems else "; ".join(problems))
"""


def _probe(iso: Isolation) -> tuple[bool, str]:
    prefix = os.path.realpath(sys.base_prefix)
    parents = {"/" + prefix.strip("/").split("/")[0]} if prefix.count("/") > 1 else set()
    limits = SandboxLimits(timeout_s=20, memory_mb=1024)
    source = f"PREFIX_PARENTS = {sorted(parents)!r}\n" + _PROBE
    try:
        run = Process(iso, limits, files={"probe.py": source}, script="probe.py").finish()
    except OSError as e:
        return False, repr(e)
    if run.ok and run.stdout.strip() == "ok":
        return True, ""
    why = run.stdout.strip() or run.stderr.strip() or f"status {run.returncode}"
    return False, why[-300:]


_detect_lock = threading.Lock()
_detected: dict[str, Isolation] = {}


def detect_isolation(mode: str | None = None) -> Isolation:
    """The jail if this machine allows it (self-tested once per process), else ``none``.

    ``mode`` (tests): ``root`` or ``userns`` to try only that way of building the jail."""
    key = mode or "auto"
    with _detect_lock:
        if key in _detected:
            return _detected[key]
        if not sys.platform.startswith("linux"):
            iso = Isolation("none", reason=f"no jail on {sys.platform} (it needs Linux namespaces)")
        else:
            modes = [mode] if mode else (["root", "userns"] if os.geteuid() == 0 else ["userns"])
            reasons = []
            iso = None
            for m in modes:
                ok, why = _probe(Isolation("jail", m))
                if ok:
                    iso = Isolation("jail", m)
                    break
                reasons.append(f"{m}: {why}")
            if iso is None:
                iso = Isolation("none", reason="the jail failed its self-test: " + " | ".join(reasons))
        _detected[key] = iso
        return iso


BANNER = (
    "\n" + "!" * 78 + "\n"
    "!!  UNSANDBOXED: generated programs will run WITHOUT the jail (%s).\n"
    "!!  They run as this user and can read its files (the benchmark's tests and expected\n"
    "!!  outputs included), see its processes, reach its sockets and the network.\n"
    "!!  eval/<benchmark>/isolation is logged as 0. Only for code you trust.\n"
    + "!" * 78
)


class Sandbox:
    """The policy and the runner for one evaluation: resolves the isolation once, refuses
    untrusted code without the jail unless ``allow_unsandboxed``, and starts programs."""

    def __init__(self, limits: SandboxLimits | None = None, *, allow_unsandboxed: bool = False,
                 isolation: Isolation | None = None):
        self.limits = limits or SandboxLimits()
        if isolation is None:
            if self.limits.isolation == "none":
                isolation = Isolation("none", reason="eval.sandbox.isolation=none")
            else:
                isolation = detect_isolation()
                if self.limits.isolation == "jail" and not isolation.jailed:
                    raise RuntimeError(
                        f"eval.sandbox.isolation=jail, but this machine cannot build the jail: "
                        f"{isolation.reason}"
                    )
        self.isolation = isolation
        if not isolation.jailed:
            if not allow_unsandboxed:
                raise UnsandboxedError(
                    f"refusing to run generated programs without the jail: {isolation.reason}. "
                    f"Run the evaluation where the jail works (Linux, as root or with "
                    f"unprivileged user namespaces), or set eval.allow_unsandboxed=true to run "
                    f"them unsandboxed (only for code you trust)."
                )
            log.warning(BANNER, isolation.reason)
        else:
            log.info("sandbox: generated programs run in a %s", isolation.describe())

    def start(self, files: dict[str, str], script: str, *, args: tuple[str, ...] = (),
              stdin: str | None = None, pass_fds: tuple[int, ...] = (),
              timeout_s: float | None = None) -> Process:
        """Start ``script`` (one of ``files``) as an untrusted program."""
        return Process(self.isolation, self.limits, files=files, script=script, args=args,
                       stdin=stdin, pass_fds=pass_fds, timeout_s=timeout_s)

    def start_trusted(self, argv: list[str], *, pass_fds: tuple[int, ...] = (),
                      timeout_s: float | None = None) -> Process:
        """Start a trusted helper (the judge) outside the jail, with the resource limits and
        its stdin a pipe (``process.proc.stdin``)."""
        return Process(self.isolation, self.limits, files={}, script=None, pass_fds=pass_fds,
                       timeout_s=timeout_s, trusted_argv=argv, stdin_pipe=True)

    def run_script(self, source: str, *, stdin: str | None = None,
                   timeout_s: float | None = None) -> RunResult:
        """Run ``source`` as the script ``main.py`` (``__name__ == "__main__"``)."""
        return self.start({"main.py": source}, "main.py", stdin=stdin, timeout_s=timeout_s).finish()


def run_python(source: str, *, stdin: str | None = None, limits: SandboxLimits | None = None,
               timeout_s: float | None = None, allow_unsandboxed: bool = False) -> RunResult:
    """One script in a fresh sandbox (a :class:`Sandbox` for a single run)."""
    sandbox = Sandbox(limits, allow_unsandboxed=allow_unsandboxed)
    return sandbox.run_script(source, stdin=stdin, timeout_s=timeout_s)
