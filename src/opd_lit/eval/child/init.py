"""The sandbox's init: ``python -I -S init.py CONFIG.json`` (standard library only).

With ``"jail": false`` it applies the resource limits and executes the program in place.

With ``"jail": true`` it builds the jail and runs the program in it:

1. ``unshare(2)`` new mount, PID, network, IPC and UTS namespaces (and a user namespace
   whose root is the caller, when the evaluator is not root);
2. forks the namespace's PID 1, which (while it still holds its capabilities)
   - makes every mount private, mounts a small tmpfs as the new root, and bind-mounts into
     it, read-only, nosuid and nodev, only what Python needs: ``/usr``, ``/lib*``, ``/bin``,
     the interpreter's prefix, ``/etc/ld.so.cache``; ``/dev/null``, ``zero``, ``random``
     and ``urandom``; a fresh ``/proc`` (this PID namespace only); a private, size-capped
     tmpfs ``/sandbox`` (the working directory, ``HOME``, ``TMPDIR`` and ``/tmp``) holding
     the program's files; then remounts the new root read-only, makes it the root
     (``pivot_root``) and detaches the host's file system;
   - marks itself non-dumpable (nothing in the jail can ptrace it or read its memory);
3. forks the program (PID 2), which sets the resource limits, drops to an unprivileged
   uid (uid/gid 65534 with no supplementary groups when the evaluator is root; otherwise a
   nested user namespace in which it is 65534), sets ``no_new_privs``, closes every file
   descriptor it was not given, and executes the program with a clean environment;
4. PID 1 reaps, and exits with the program's status (128 + signal when it was killed by
   one). When PID 1 exits, the kernel kills everything left in the namespace.

Failures before the program starts exit with status 125 and a line on stderr starting with
``sandbox:``.
"""

import ctypes
import json
import os
import resource
import shutil
import signal
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 1024, 2048, 1 << 21
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 1, 4, 38
MNT_DETACH = 2
_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "ppc64": 203,
               "s390x": 217, "i686": 217, "armv7l": 218}  # pivot_root(2): no glibc wrapper
# statvfs f_flag bits -> mount flags: a read-only remount must keep these (the kernel refuses
# to clear them in a user namespace).
_KEEP_FLAGS = ((os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, MS_NOEXEC),
               (os.ST_NOATIME, MS_NOATIME), (os.ST_NODIRATIME, MS_NODIRATIME),
               (os.ST_RELATIME, MS_RELATIME))
DEVICES = ("null", "zero", "random", "urandom")
SETUP_FAILED = 125

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def _check(rc, what):
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _b(s):
    return None if s is None else s.encode()


def mount(source, target, fstype, flags, data=None):
    _check(_libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)), f"mount {target}")


def prctl(option, value):
    _check(_libc.prctl(option, value, 0, 0, 0), f"prctl {option}")


def bind_readonly(source, target):
    """Bind ``source`` at ``target``, then remount that bind read-only, nosuid, nodev."""
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        open(target, "a").close()
    mount(source, target, None, MS_BIND | MS_REC)
    keep = 0
    flags = os.statvfs(target).f_flag
    for st, ms in _KEEP_FLAGS:
        if flags & st:
            keep |= ms
    mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | keep)


def write_file(path, text):
    with open(path, "w") as f:
        f.write(text)


def build_root(cfg):
    """Mount the jail's file system under ``cfg["root"]`` and chroot into it."""
    root = cfg["root"]
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,nr_inodes=4096,mode=0755")
    for path in cfg["binds"]:
        inside = root + path
        if os.path.islink(path) and os.path.dirname(path) == "/":
            os.symlink(os.readlink(path), inside)  # /bin -> usr/bin on merged-/usr systems
        elif os.path.exists(path):
            bind_readonly(path, inside)
    os.makedirs(root + "/dev")
    for name in DEVICES:
        if os.path.exists("/dev/" + name):
            open(f"{root}/dev/{name}", "a").close()
            mount("/dev/" + name, f"{root}/dev/{name}", None, MS_BIND)
    os.makedirs(root + "/proc")
    mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    scratch = root + "/sandbox"
    os.makedirs(scratch)
    mount("tmpfs", scratch, "tmpfs", MS_NOSUID | MS_NODEV,
          f"size={cfg['scratch_mb']}m,nr_inodes={cfg['scratch_inodes']},mode=0700")
    os.symlink("/sandbox", root + "/tmp")
    for name in os.listdir(cfg["files"]):
        shutil.copyfile(os.path.join(cfg["files"], name), os.path.join(scratch, name))
    if cfg["mode"] == "root":  # the program runs as uid 65534: it must own its scratch
        for name in [".", *os.listdir(scratch)]:
            os.chown(os.path.join(scratch, name), cfg["uid"], cfg["gid"])
    mount(None, root, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    enter_root(root)
    os.chdir("/sandbox")


def enter_root(root):
    """Make ``root`` the root of this mount namespace and detach the host's file system
    (``pivot_root``; ``chroot`` where its syscall number is unknown)."""
    os.chdir(root)
    nr = _PIVOT_ROOT.get(os.uname().machine)
    if nr is not None and _libc.syscall(nr, b".", b".") == 0:
        _check(_libc.umount2(b".", MNT_DETACH), "umount the host's root")
    else:
        os.chroot(".")
    os.chdir("/")


def set_limits(rlimits):
    for name, (soft, hard) in rlimits.items():
        resource.setrlimit(getattr(resource, name), (soft, hard))


def drop_privileges(cfg):
    uid, gid = cfg["uid"], cfg["gid"]
    if cfg["mode"] == "root":
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    else:
        # We are root of the jail's user namespace: a nested one maps that root to 65534,
        # so after exec the program holds no capability anywhere. (PID 1 made itself
        # non-dumpable, which this fork inherited; /proc/self is writable only when dumpable.)
        prctl(PR_SET_DUMPABLE, 1)
        _check(_libc.unshare(CLONE_NEWUSER), "unshare(CLONE_NEWUSER) for the program")
        with open("/proc/self/setgroups") as f:
            if f.read().strip() != "deny":  # inherited from the jail's namespace: stays deny
                write_file("/proc/self/setgroups", "deny")
        write_file("/proc/self/uid_map", f"{uid} 0 1")
        write_file("/proc/self/gid_map", f"{gid} 0 1")
    prctl(PR_SET_NO_NEW_PRIVS, 1)


def close_other_fds(keep):
    previous = -1
    for fd in sorted({0, 1, 2, *keep}):
        if fd > previous + 1:  # os.closerange(a, a) would close everything (CPython 3.11)
            os.closerange(previous + 1, fd)
        previous = fd
    os.closerange(previous + 1, 1 << 20)


def exec_program(cfg):
    close_other_fds(cfg["keep_fds"])
    os.execve(cfg["argv"][0], cfg["argv"], cfg["env"])


def wait_for(pid):
    """Reap every child until ``pid`` exits; return its exit code (128 + signal if killed)."""
    while True:
        try:
            got, status = os.wait()
        except ChildProcessError:
            return SETUP_FAILED
        except InterruptedError:
            continue
        if got == pid:
            if os.WIFSIGNALED(status):
                return 128 + os.WTERMSIG(status)
            return os.WEXITSTATUS(status)


def fork_and_wait(child, what, keep_fds):
    """Fork; the child runs ``child()`` (a failure is reported as ``sandbox: could not
    <what>``); this process closes ``keep_fds`` (only the child keeps them), reaps, and exits
    with the child's status."""
    pid = os.fork()
    if pid == 0:
        try:
            child()
        except BaseException as e:  # noqa: BLE001 - report and exit
            sys.stderr.write(f"sandbox: could not {what}: {e!r}\n")
            sys.stderr.flush()
        os._exit(SETUP_FAILED)
    for fd in keep_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    os._exit(wait_for(pid))


def start_program(cfg):
    for step, fn in (("set the limits", set_limits), ("drop privileges", drop_privileges),
                     ("execute it", exec_program)):
        try:
            fn(cfg["rlimits"] if fn is set_limits else cfg)
        except OSError as e:
            raise OSError(e.errno, f"{step}: {e}") from None


def pid_one(cfg):
    """PID 1 of the jail: build it, fork the program, reap, exit with the program's status."""
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the outer init already died
        os._exit(SETUP_FAILED)
    build_root(cfg)
    prctl(PR_SET_DUMPABLE, 0)
    fork_and_wait(lambda: start_program(cfg), "start the program", cfg["keep_fds"])


def jail(cfg):
    flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
    if cfg["mode"] == "userns":
        flags |= CLONE_NEWUSER
    uid, gid = os.getuid(), os.getgid()
    _check(_libc.unshare(flags), "unshare")
    if cfg["mode"] == "userns":
        write_file("/proc/self/setgroups", "deny")
        write_file("/proc/self/uid_map", f"0 {uid} 1")
        write_file("/proc/self/gid_map", f"0 {gid} 1")
    fork_and_wait(lambda: pid_one(cfg), "build the jail", cfg["keep_fds"])


def main():
    with open(sys.argv[1]) as f:
        cfg = json.load(f)
    try:
        if cfg["jail"]:
            jail(cfg)
        else:
            set_limits(cfg["rlimits"])
            os.chdir(cfg["cwd"])
            exec_program(cfg)
    except BaseException as e:  # noqa: BLE001 - report and exit
        sys.stderr.write(f"sandbox: could not start: {e!r}\n")
        sys.stderr.flush()
    os._exit(SETUP_FAILED)


if __name__ == "__main__":
    main()
