"""One owner per job: an exclusive lock file beside the job's checkpoint directory.

``checkpoint.dir=D`` is locked through the file ``D.lock`` (beside ``D``, not inside it, so
the lock stays put when ``D`` is moved aside or removed). :class:`JobLock` holds an
``fcntl.flock`` on it for the whole run and writes who holds it (pid, host, start time,
command, job key, MLflow run once known), so a second run of the same job is refused with a
message naming the running one. The kernel drops an ``flock`` when its process dies however
it dies (SIGKILL, OOM, a crash), so a lock file whose lock is free is *stale*: the next run
takes it over and says whose it was. On file systems without ``flock`` the lock falls back to
an exclusive create (``O_EXCL``): a lock left by a dead process on this host is taken over,
one from another host is refused with the command to remove it.

Only global rank 0 takes the lock (:func:`opd_lit.dist.is_launch_rank_zero`); the other ranks
of a multi-process job are the same job.

:func:`process_owner` identifies a process (also written as MLflow tags by
:func:`opd_lit.tracking.run_tags`), :func:`owner_alive` tells whether it still runs.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".lock"


class JobConflictError(RuntimeError):
    """This run would use (or destroy) what belongs to another run or job."""


class JobLockedError(JobConflictError):
    """The job's lock is held by a running process."""

    def __init__(self, message: str, holder: dict[str, Any] | None = None):
        super().__init__(message)
        self.holder = holder or {}


def _proc_start(pid: int) -> str | None:
    """The start time of ``pid`` in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may hold spaces: split after it
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None


def process_owner() -> dict[str, Any]:
    """Who this process is: pid, host, start, command."""
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "proc_start": _proc_start(os.getpid()),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "command": " ".join(sys.argv)[:500],
    }


def owner_token(owner: dict[str, Any] | None = None) -> str:
    """``pid@host:start``: unique to one process (the MLflow tag ``owner``)."""
    o = owner or process_owner()
    return f"{o.get('pid')}@{o.get('host')}:{o.get('proc_start') or ''}"


def parse_owner_token(token: str | None) -> dict[str, Any] | None:
    if not token or "@" not in token:
        return None
    pid, _, rest = token.partition("@")
    host, _, start = rest.rpartition(":") if ":" in rest else (rest, "", "")
    if not pid.isdigit():
        return None
    return {"pid": int(pid), "host": host, "proc_start": start or None}


def owner_alive(owner: dict[str, Any] | None) -> bool | None:
    """True / False for a process on this host; None when it cannot be told (another host)."""
    if not owner or owner.get("host") != socket.gethostname() or not owner.get("pid"):
        return None
    pid = int(owner["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    recorded = owner.get("proc_start")
    return recorded is None or _proc_start(pid) in (None, str(recorded))


def describe_owner(owner: dict[str, Any] | None) -> str:
    if not owner:
        return "an unknown process"
    text = f"pid {owner.get('pid')} on host {owner.get('host')}"
    if owner.get("started"):
        text += f" (started {owner['started']})"
    return text


def lock_path(checkpoint_dir: str | Path) -> Path:
    d = Path(checkpoint_dir).expanduser().resolve()
    return d.with_name(d.name + LOCK_SUFFIX)


class JobLock:
    """The exclusive lock of one job's checkpoint directory (see the module docstring)."""

    def __init__(self, checkpoint_dir: str | Path):
        self.checkpoint_dir = Path(checkpoint_dir)
        self.path = lock_path(checkpoint_dir)
        self.fd: int | None = None
        self.info: dict[str, Any] = {}
        self.exclusive_file = False  # the O_EXCL fallback (no flock on this file system)

    # ---- reading the holder ----------------------------------------------------------
    @staticmethod
    def _read(fd: int) -> dict[str, Any]:
        for _ in range(5):  # the holder may be writing it this very moment
            try:
                os.lseek(fd, 0, os.SEEK_SET)
                raw = os.read(fd, 1 << 16)
                return json.loads(raw) if raw.strip() else {}
            except ValueError:
                time.sleep(0.05)
            except OSError:
                return {}
        return {}

    def _write(self, fd: int) -> None:
        data = json.dumps(self.info, indent=1, sort_keys=True).encode()
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, data)
        os.fsync(fd)

    def _refusal(self, holder: dict[str, Any]) -> JobLockedError:
        job = holder.get("job_key")
        what = f"job {job}" if job else "another run"
        run = holder.get("mlflow_run_id")
        return JobLockedError(
            f"checkpoint.dir={str(self.checkpoint_dir)!r} is in use by {what}: "
            f"{describe_owner(holder)}, MLflow run {run or '(not created yet)'}"
            + (f", command: {holder['command']}" if holder.get("command") else "")
            + f" (lock {self.path}). Wait for it to finish or stop it; a lock whose process has "
            "died is taken over automatically.",
            holder,
        )

    # ---- acquire / update / release --------------------------------------------------
    def acquire(self, info: dict[str, Any]) -> dict[str, Any] | None:
        """Take the lock, writing ``info`` (plus this process) into it.

        Returns the previous holder when a stale lock was taken over (None otherwise); raises
        :class:`JobLockedError` naming the holder when a live process has it.
        """
        import fcntl

        self.info = {**process_owner(), **info}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(20):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._read(fd)
                os.close(fd)
                raise self._refusal(holder) from None
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    return self._acquire_exclusive()
                raise
            try:  # the file we locked must still be the one at the path (a releaser unlinks it)
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            previous = self._read(fd)
            self._write(fd)
            self.fd = fd
            return previous or None
        raise JobConflictError(f"could not take the lock {self.path}: it keeps being replaced")

    def _acquire_exclusive(self) -> dict[str, Any] | None:
        self.exclusive_file = True
        previous = None
        for _ in range(20):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                try:
                    fd = os.open(self.path, os.O_RDONLY)
                except FileNotFoundError:
                    continue
                holder = self._read(fd)
                os.close(fd)
                alive = owner_alive(holder)
                if alive is False:
                    previous = holder
                    self.path.unlink(missing_ok=True)
                    continue
                err = self._refusal(holder)
                if alive is None:
                    err = JobLockedError(
                        f"{err} This file system has no flock, so a lock from another host cannot "
                        f"be checked: if {describe_owner(holder)} is no longer running, remove "
                        f"{self.path}.", holder,
                    )
                raise err from None
            self._write(fd)
            self.fd = fd
            return previous
        raise JobConflictError(f"could not take the lock {self.path}: it keeps being replaced")

    def update(self, **fields: Any) -> None:
        """Add what became known (e.g. the MLflow run id) to the lock file."""
        if self.fd is None:
            return
        self.info.update({k: v for k, v in fields.items() if v is not None})
        try:
            self._write(self.fd)
        except OSError as e:  # informative only: never stop a run for it
            log.warning("could not update the lock file %s: %s", self.path, e)

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent)."""
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                self.path.unlink()
        except OSError:
            pass
        finally:
            if not self.exclusive_file:
                import fcntl

                try:
                    fcntl.flock(fd, fcntl.LOCK_UN)
                except OSError:
                    pass
            os.close(fd)

    @property
    def held(self) -> bool:
        return self.fd is not None

    def __enter__(self) -> "JobLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
