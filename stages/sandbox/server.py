"""The sandbox server: one process per ``Sandbox``, that forks one child per piece of untrusted code.

Run only by :class:`stages.sandbox.Sandbox` (``python -m stages.sandbox.server ROOT``), with an
environment the client built (no secrets) and ``ROOT`` a throw-away directory. It

1. moves itself into a **network namespace of its own** (``unshare(CLONE_NEWNET)``: no
   interface but a loopback that is down) and a mount namespace of its own with a **tmpfs of
   ``disk_mb``** for the children's directories (total disk bounded; gone with the server), and
   checks that the kernel offers **Landlock** and **seccomp**; if anything is missing it prints
   one ``{"fatal": …}`` line and exits 3 — untrusted code is never run unprotected;
2. imports pandas/numpy once (a child forks from here: ~5 ms instead of ~0.8 s a fresh
   interpreter costs), then answers one JSON job per stdin line: ``{"table", "codes",
   "previews", "limits"}`` (or ``{"load"}``), each code in a child of its own, one child per
   core at a time; it holds one table at a time (a child can read whatever its parent held);
3. for each job forks a child that, before running the code: starts a new session, points
   fds 0–2 at /dev/null and closes every other fd but its result pipe, works in a fresh
   directory under ``ROOT/jobs``, sets resource limits (CPU seconds, address space, file size,
   open files, no core), restricts the file system with Landlock (read-only: the Python
   installation and system libraries; read-write: its directory; nothing else — not /proc,
   not $HOME; no TCP bind/connect; no signals out of its domain where the ABI has scopes),
   **drops every capability** (uid 0 stays, but without CAP_* and with locked securebits), and
   installs a seccomp filter that refuses process creation (fork/vfork/execve, clone without
   CLONE_THREAD), sockets, signals to and re-limiting of other processes, ptrace, sleeping,
   file metadata changes (chmod/chown/utime/xattrs: uid 0 owns the host's files), namespaces,
   mounts, fanotify, the clock, module loading and bpf;
4. runs the code with ``df`` (a copy of the table), ``pd`` and ``np``: the value of its last
   expression (or of ``result``) is the result, turned into canonical JSON (floats to 10
   significant digits, index, columns and values; a Series' name ignored) and hashed;
5. waits for the child under a **CPU-time** limit (RLIMIT_CPU: independent of the machine's
   load); a wall-clock backstop only catches code that makes no progress (blocked), and its
   verdict does not depend on speed; then kills the child's process group and removes its
   directory: nothing is left behind.

x86_64 only (the seccomp filter names syscalls by number); elsewhere it refuses to start.
"""
from __future__ import annotations

import ctypes
import gc
import hashlib
import json
import math
import os
import platform
import resource
import select
import shutil
import signal
import struct
import sys
import time
from typing import Any, Optional

LIBC = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000
CLONE_THREAD = 0x00010000
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER, PR_GET_SECCOMP = 38, 22, 2, 21
AUDIT_ARCH_X86_64 = 0xC000003E
SYS_LANDLOCK_CREATE, SYS_LANDLOCK_ADD, SYS_LANDLOCK_RESTRICT = 444, 445, 446
EPERM, ENOSYS = 1, 38

# x86_64 syscall numbers refused with EPERM (clone3: ENOSYS, so glibc falls back to clone)
DENIED = {
    "socket": 41, "socketpair": 53, "connect": 42, "bind": 49, "listen": 50, "accept": 43,
    "accept4": 288, "fork": 57, "vfork": 58, "execve": 59, "execveat": 322, "kill": 62,
    "tkill": 200, "tgkill": 234, "rt_sigqueueinfo": 129, "rt_tgsigqueueinfo": 297,
    "pidfd_open": 434, "pidfd_send_signal": 424, "ptrace": 101, "process_vm_readv": 310,
    "process_vm_writev": 311, "nanosleep": 35, "clock_nanosleep": 230, "pause": 34,
    "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161, "unshare": 272,
    "setns": 308, "reboot": 169, "kexec_load": 246, "init_module": 175, "finit_module": 313,
    "delete_module": 176, "bpf": 321, "perf_event_open": 298, "userfaultfd": 323,
    "keyctl": 250, "add_key": 248, "request_key": 249, "io_uring_setup": 425,
    "personality": 135, "setsid": 112, "setpgid": 109, "chdir": 80, "fchdir": 81,
    "mknod": 133, "mknodat": 259,
    # file metadata: uid 0 owns the host's files, and an owner may chmod/utime/setxattr them
    # without any capability (Landlock does not cover metadata)
    "chmod": 90, "fchmod": 91, "fchmodat": 268, "fchmodat2": 452, "chown": 92, "fchown": 93,
    "lchown": 94, "fchownat": 260, "utime": 132, "utimes": 235, "futimesat": 261,
    "utimensat": 280, "setxattr": 188, "lsetxattr": 189, "fsetxattr": 190, "removexattr": 197,
    "lremovexattr": 198, "fremovexattr": 199,
    # other processes: a process of the same uid may be re-limited or re-scheduled without
    # capabilities (the server included)
    "prlimit64": 302, "setrlimit": 160, "setpriority": 141, "sched_setaffinity": 203,
    "sched_setscheduler": 144, "sched_setparam": 142, "sched_setattr": 314, "ioprio_set": 251,
    "migrate_pages": 256, "move_pages": 279, "kcmp": 312,
    # the host: clock, names, kernel log, accounting, swap, quota, filesystem watches, mounts
    "sethostname": 170, "setdomainname": 171, "adjtimex": 159, "clock_adjtime": 305,
    "settimeofday": 164, "clock_settime": 227, "syslog": 103, "acct": 163, "swapon": 167,
    "swapoff": 168, "quotactl": 179, "fanotify_init": 300, "fanotify_mark": 301,
    "name_to_handle_at": 303, "open_by_handle_at": 304, "open_tree": 428, "move_mount": 429,
    "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442,
    "vhangup": 153, "iopl": 172, "ioperm": 173,
    # identity and capabilities (dropped before the filter is installed)
    "setuid": 105, "setgid": 106, "setreuid": 113, "setregid": 114, "setresuid": 117,
    "setresgid": 119, "setfsuid": 122, "setfsgid": 123, "setgroups": 116, "capset": 126,
}
SYS_CLONE, SYS_CLONE3 = 56, 435

# Landlock access rights (uapi/linux/landlock.h)
FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1, 2, 4, 8
FS_ALL_V1 = (1 << 13) - 1
FS_REFER, FS_TRUNCATE, FS_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
NET_BIND_TCP, NET_CONNECT_TCP = 1, 2
SCOPE_ABSTRACT_UNIX, SCOPE_SIGNAL = 1, 2
READ_ONLY = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR


def _errno_text() -> str:
    return os.strerror(ctypes.get_errno())


# --------------------------------------------------------------------------- isolation
def landlock_abi() -> int:
    return LIBC.syscall(SYS_LANDLOCK_CREATE, None, ctypes.c_size_t(0), ctypes.c_uint32(1))


def isolation_problems() -> list[str]:
    """What this kernel/process cannot do that the sandbox needs (empty: all there)."""
    problems = []
    if platform.machine() != "x86_64":
        problems.append(f"the seccomp filter is written for x86_64, this is {platform.machine()}")
    if LIBC.unshare(CLONE_NEWNET) != 0:
        problems.append(f"cannot enter a network namespace of its own (unshare: {_errno_text()}; "
                        "needs CAP_SYS_ADMIN: run as root or in a container that allows it)")
    abi = landlock_abi()
    if abi < 1:
        problems.append(f"Landlock is not available ({_errno_text()}; Linux >= 5.13 with "
                        "landlock in the lsm= list)")
    if LIBC.prctl(PR_GET_SECCOMP, 0, 0, 0, 0) < 0:
        problems.append(f"seccomp is not available ({_errno_text()})")
    return problems


MS_REC, MS_PRIVATE, MS_NOSUID, MS_NODEV, MS_NOEXEC = 16384, 1 << 18, 2, 4, 8
CLONE_NEWNS = 0x00020000


def private_jobs_tmpfs(jobs: str, size_mb: int) -> Optional[str]:
    """The children's directories on a tmpfs of ``size_mb`` in a mount namespace of the
    server's own: total disk use is bounded, and it all vanishes with the server. None when
    done, else why not."""
    if LIBC.unshare(CLONE_NEWNS) != 0:
        return f"cannot enter a mount namespace of its own (unshare: {_errno_text()})"
    if LIBC.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        return f"cannot make its mounts private ({_errno_text()})"
    options = f"size={size_mb}m,mode=0700".encode()
    if LIBC.mount(b"tmpfs", jobs.encode(), b"tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, options) != 0:
        return f"cannot mount a tmpfs for the jobs ({_errno_text()})"
    return None


def drop_capabilities() -> None:
    """uid 0 without a single capability, for good: securebits locked (no regaining them by
    exec or setuid), the bounding and ambient sets emptied, then the sets themselves."""
    PR_SET_SECUREBITS, PR_CAPBSET_DROP, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 28, 24, 47, 4
    if LIBC.prctl(PR_SET_SECUREBITS, 0xEF, 0, 0, 0) != 0:
        raise OSError(f"securebits: {_errno_text()}")
    for cap in range(64):
        if LIBC.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() != 22:  # EINVAL: no such cap
            raise OSError(f"dropping capability {cap}: {_errno_text()}")
    LIBC.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    header = struct.pack("<Ii", 0x20080522, 0)          # _LINUX_CAPABILITY_VERSION_3, self
    data = bytes(24)                                    # two empty {effective, permitted, inheritable}
    if LIBC.syscall(126, ctypes.c_char_p(header), ctypes.c_char_p(data)) != 0:
        raise OSError(f"capset: {_errno_text()}")


def _landlock(work: str, read_dirs: list[str]) -> None:
    abi = landlock_abi()
    fs = FS_ALL_V1 | (FS_REFER if abi >= 2 else 0) | (FS_TRUNCATE if abi >= 3 else 0) | \
        (FS_IOCTL_DEV if abi >= 5 else 0)
    net = NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0
    scoped = SCOPE_ABSTRACT_UNIX | SCOPE_SIGNAL if abi >= 6 else 0
    attr = struct.pack("<QQQ", fs, net, scoped)[: 24 if abi >= 6 else 16 if abi >= 4 else 8]
    buf = ctypes.create_string_buffer(attr, len(attr))
    ruleset = LIBC.syscall(SYS_LANDLOCK_CREATE, buf, ctypes.c_size_t(len(attr)), ctypes.c_uint32(0))
    if ruleset < 0:
        raise OSError(f"landlock_create_ruleset: {_errno_text()}")
    for path, rights in [(d, READ_ONLY) for d in read_dirs] + [(work, fs)]:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        rule = ctypes.create_string_buffer(struct.pack("<Qi", rights & fs, fd), 12)
        if LIBC.syscall(SYS_LANDLOCK_ADD, ruleset, 1, rule, ctypes.c_uint32(0)) != 0:
            raise OSError(f"landlock_add_rule {path}: {_errno_text()}")
        os.close(fd)
    if LIBC.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(f"no_new_privs: {_errno_text()}")
    if LIBC.syscall(SYS_LANDLOCK_RESTRICT, ruleset, ctypes.c_uint32(0)) != 0:
        raise OSError(f"landlock_restrict_self: {_errno_text()}")
    os.close(ruleset)


def _bpf(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("<HBBI", code, jt, jf, k)


def seccomp_program() -> bytes:
    LD_ABS, JEQ, JSET, JGE, RET = 0x20, 0x15, 0x45, 0x35, 0x06
    allow, kill = 0x7FFF0000, 0x80000000

    def errno(e: int) -> int:
        return 0x00050000 | e

    prog = [_bpf(LD_ABS, 4), _bpf(JEQ, AUDIT_ARCH_X86_64, 1, 0), _bpf(RET, kill),
            _bpf(LD_ABS, 0), _bpf(JGE, 0x40000000, 0, 1), _bpf(RET, errno(EPERM)),  # x32 ABI
            _bpf(JEQ, SYS_CLONE3, 0, 1), _bpf(RET, errno(ENOSYS)),
            # clone: threads only (CLONE_THREAD in the low word of args[0])
            _bpf(JEQ, SYS_CLONE, 0, 4), _bpf(LD_ABS, 16), _bpf(JSET, CLONE_THREAD, 0, 1),
            _bpf(RET, allow), _bpf(RET, errno(EPERM))]
    for nr in sorted(DENIED.values()):
        prog += [_bpf(JEQ, nr, 0, 1), _bpf(RET, errno(EPERM))]
    prog.append(_bpf(RET, allow))
    return b"".join(prog)


def _seccomp() -> None:
    program = seccomp_program()
    filt = ctypes.create_string_buffer(program, len(program))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(program) // 8, ctypes.cast(filt, ctypes.c_void_p))
    if LIBC.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        raise OSError(f"seccomp filter: {_errno_text()}")


def read_only_dirs() -> list[str]:
    """The Python installation and the system's libraries (what a late import may open)."""
    dirs = {sys.prefix, sys.base_prefix, sys.exec_prefix, "/usr/lib", "/usr/lib64", "/lib",
            "/lib64", "/usr/share/zoneinfo"}
    dirs |= {p for p in sys.path if p and os.path.isdir(p) and "site-packages" in p}
    return sorted(d for d in dirs if os.path.isdir(d))


# --------------------------------------------------------------------------- results
def canonical(value: Any) -> Any:
    import numpy as np
    import pandas as pd

    def cell(x: Any) -> Any:
        if x is None or (isinstance(x, float) and math.isnan(x)) or x is pd.NaT:
            return None
        if isinstance(x, (bool, np.bool_)):
            return bool(x)
        if isinstance(x, (int, np.integer)):
            return int(x)
        if isinstance(x, (float, np.floating)):
            return float(f"{float(x):.10g}") if math.isfinite(x) else str(x)
        if isinstance(x, (pd.Timestamp, np.datetime64)):
            return pd.Timestamp(x).isoformat()
        if isinstance(x, tuple):
            return [cell(v) for v in x]
        return str(x)

    if isinstance(value, pd.DataFrame):
        return {"kind": "frame", "columns": [cell(c) for c in value.columns],
                "index": [cell(i) for i in value.index],
                "rows": [[cell(v) for v in row] for row in value.itertuples(index=False, name=None)]}
    if isinstance(value, pd.Series):
        return {"kind": "series", "index": [cell(i) for i in value.index],
                "values": [cell(v) for v in value.tolist()]}
    if isinstance(value, pd.Index):
        return {"kind": "list", "values": [cell(v) for v in value.tolist()]}
    if isinstance(value, np.ndarray):
        return {"kind": "list", "values": [canonical(v) if isinstance(v, np.ndarray) else cell(v)
                                           for v in value.tolist()]}
    if isinstance(value, (list, tuple)):
        return {"kind": "list", "values": [cell(v) for v in value]}
    if isinstance(value, dict):
        return {"kind": "dict", "items": sorted([[cell(k), cell(v)] for k, v in value.items()],
                                                key=lambda kv: str(kv[0]))}
    return {"kind": "scalar", "value": cell(value)}


def preview(value: Any, limit: int = 1500) -> str:
    import pandas as pd
    with pd.option_context("display.max_rows", 12, "display.max_columns", 12, "display.width", 120):
        text = repr(value)
    return text if len(text) <= limit else text[:limit] + " …"


def run_code(code: str, df: Any, with_preview: bool = True) -> dict[str, Any]:
    """In the child, after every restriction: execute, canonicalise, hash."""
    import ast

    import numpy as np
    import pandas as pd
    try:
        tree = ast.parse(code, mode="exec")
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        scope: dict[str, Any] = {"pd": pd, "np": np, "df": df.copy(), "__name__": "__option__"}
        exec(compile(tree, "<option>", "exec"), scope)
        if last is not None:
            value = eval(compile(ast.Expression(last.value), "<option>", "eval"), scope)
        elif "result" in scope:
            value = scope["result"]
        else:
            return {"status": "no_result", "detail": "no final expression and no `result`"}
        if value is None:
            return {"status": "no_result", "detail": "the result is None"}
        text = json.dumps(canonical(value), ensure_ascii=False, sort_keys=True)
        out = {"status": "ok", "hash": hashlib.sha256(text.encode()).hexdigest()[:16],
               "kind": type(value).__name__}
        if with_preview:   # a repr costs a few ms: only where it is shown (a tool turn)
            out["preview"] = preview(value)
        return out
    except MemoryError:
        return {"status": "sandbox_limit", "detail": "memory limit"}
    except BaseException as exc:  # noqa: BLE001 - every failure of untrusted code is an outcome
        return {"status": type(exc).__name__, "detail": str(exc)[:300]}


# --------------------------------------------------------------------------- one job
def _vm_size() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def child(job_fd: int, write_fd: int, work: str, df: Any, limits: dict[str, Any],
          read_dirs: list[str]) -> None:
    """Never returns: restrict itself, then wait for its one job on ``job_fd``, run it,
    report on ``write_fd``, ``_exit``. Forked ahead of the job (while the previous one runs),
    so the set-up is off the job's path."""
    try:
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        low, high = sorted((job_fd, write_fd))
        os.closerange(3, low)
        os.closerange(low + 1, high)
        os.closerange(high + 1, 4096)
        os.chdir(work)
        cpu = int(limits["cpu_seconds"])
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        resource.setrlimit(resource.RLIMIT_AS, (_vm_size() + (limits["memory_mb"] << 20),) * 2)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits["file_mb"] << 20,) * 2)
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))   # no effect as root: seccomp is
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        _landlock(work, read_dirs)
        drop_capabilities()
        _seccomp()
    except BaseException as exc:  # noqa: BLE001 - isolation failed: the code is NOT run
        outcome = {"status": "sandbox_error", "detail": f"{type(exc).__name__}: {exc}"[:300]}
    else:
        chunks = []
        while True:
            data = os.read(job_fd, 65536)
            if not data:
                break
            chunks.append(data)
        os.close(job_fd)
        job = json.loads(b"".join(chunks).decode())
        outcome = run_code(job["code"], df, job.get("preview", True))
    data = json.dumps(outcome, ensure_ascii=False).encode()
    try:
        os.write(write_fd, data)
    finally:
        os._exit(0)


class Child:
    """One child, forked for the current table and limits, restricted before its job."""

    def __init__(self, df: Any, root: str, limits: dict[str, Any], read_dirs: list[str],
                 counter: int):
        self.limits, self.work = limits, os.path.join(root, "jobs", str(counter))
        os.makedirs(self.work)
        job_r, job_w = os.pipe()
        self.result_r, result_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            os.close(job_w)
            os.close(self.result_r)
            child(job_r, result_w, self.work, df, limits, read_dirs)
        os.close(job_r)
        os.close(result_w)
        self.job_w = job_w
        self.chunks: list[bytes] = []
        self.size = 0
        self.deadline = time.monotonic() + limits["wall_seconds"]

    def send(self, code: str, preview: bool) -> None:
        try:
            os.write(self.job_w, json.dumps({"code": code, "preview": preview}).encode())
        except BrokenPipeError:
            pass  # the child died setting up: its status says why
        os.close(self.job_w)

    def finish(self, blocked: bool) -> dict[str, Any]:
        os.close(self.result_r)
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        _, status, usage = os.wait4(self.pid, 0)
        shutil.rmtree(self.work, ignore_errors=True)
        cap = (self.limits["output_kb"] << 10) + 1
        return verdict(self.chunks, self.size, cap, blocked, status,
                       usage.ru_utime + usage.ru_stime, self.limits)


def run_batch(jobs: list[tuple[str, bool]], df: Any, root: str, limits: dict[str, Any],
              read_dirs: list[str], first: int, width: int) -> list[dict[str, Any]]:
    """Every (code, preview) of ``jobs`` in a child of its own, ``width`` children at a time
    (one per core: the options of one question run side by side); results in job order."""
    results: list[Optional[dict[str, Any]]] = [None] * len(jobs)
    pending = list(range(len(jobs)))
    running: dict[int, tuple[int, Child]] = {}
    cap = (limits["output_kb"] << 10) + 1
    while pending or running:
        while pending and len(running) < width:
            index = pending.pop(0)
            child_ = Child(df, root, limits, read_dirs, first + index)
            child_.send(*jobs[index])
            running[child_.result_r] = (index, child_)
        wait = max(0.0, min(c.deadline for _, c in running.values()) - time.monotonic())
        readable, _, _ = select.select(list(running), [], [], wait)
        now = time.monotonic()
        for fd in list(running):
            index, child_ = running[fd]
            done = blocked = False
            if fd in readable:
                data = os.read(fd, 65536)
                if data:
                    child_.chunks.append(data)
                    child_.size += len(data)
                    done = child_.size >= cap
                else:
                    done = True
            elif now >= child_.deadline:
                done = blocked = True
            if done:
                del running[fd]
                results[index] = child_.finish(blocked)
    return [r for r in results if r is not None]


def verdict(chunks: list[bytes], size: int, cap: int, blocked: bool, status: int, cpu: float,
            limits: dict[str, Any]) -> dict[str, Any]:
    if blocked:
        return {"status": "sandbox_limit", "detail": f"no progress: blocked after {cpu:.2f} s CPU",
                "cpu_seconds": round(cpu, 3)}
    if size >= cap:
        return {"status": "sandbox_limit", "detail": "output too large", "cpu_seconds": round(cpu, 3)}
    if not chunks:
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        reason = {signal.SIGXCPU: "CPU time limit", signal.SIGXFSZ: "file size limit",
                  signal.SIGSYS: "forbidden system call"}.get(sig, f"died without a result (signal {sig})")
        if sig == signal.SIGKILL and cpu >= limits["cpu_seconds"]:
            reason = "CPU time limit"
        return {"status": "sandbox_limit", "detail": reason, "cpu_seconds": round(cpu, 3)}
    try:
        outcome = json.loads(b"".join(chunks).decode())
    except ValueError:
        return {"status": "sandbox_limit", "detail": "unreadable result", "cpu_seconds": round(cpu, 3)}
    clean = validated(outcome)
    if clean is None:
        return {"status": "sandbox_limit", "detail": "unreadable result", "cpu_seconds": round(cpu, 3)}
    clean["cpu_seconds"] = round(cpu, 3)
    return clean


def validated(outcome: Any) -> Optional[dict[str, Any]]:
    """The child's report with the types the client relies on, or None. (The code runs in
    the child's process and could write this line itself: it can only claim a result for
    itself, never for another option, and never crash the server or the stage.)"""
    if not isinstance(outcome, dict) or not isinstance(outcome.get("status"), str):
        return None
    clean: dict[str, Any] = {"status": outcome["status"][:80]}
    for field, limit in (("detail", 300), ("preview", 2000), ("kind", 80)):
        value = outcome.get(field, "")
        if not isinstance(value, str):
            return None
        if value:
            clean[field] = value[:limit]
    digest = outcome.get("hash")
    if digest is not None:
        if not (isinstance(digest, str) and len(digest) == 16
                and all(c in "0123456789abcdef" for c in digest)):
            return None
        clean["hash"] = digest
    if (clean["status"] == "ok") != ("hash" in clean):
        return None
    return clean


def main() -> int:
    root = os.path.abspath(sys.argv[1])
    disk_mb = int(sys.argv[2]) if len(sys.argv) > 2 else 64
    problems = isolation_problems()
    if not problems:
        failed = private_jobs_tmpfs(os.path.join(root, "jobs"), disk_mb)
        problems += [failed] if failed else []
    if problems:
        print(json.dumps({"fatal": "; ".join(problems)}), flush=True)
        return 3
    import numpy  # noqa: F401  (loaded once; children fork from here)
    import pandas as pd
    read_dirs = read_only_dirs()
    width = max(1, os.cpu_count() or 1)
    current: dict[str, Any] = {}          # the one table held: {name: frame}
    counter = 0
    # a forked child shares the server's pages until it writes them; the collector walking
    # every object would write them (reference counts, gc links): frozen objects are not walked
    gc.freeze()
    print(json.dumps({"ready": True, "landlock_abi": landlock_abi(), "width": width}), flush=True)
    for line in sys.stdin:
        try:
            job = json.loads(line)
            if "load" in job:
                # one table at a time: a child (a fork of this process) can find in memory
                # whatever the server holds, so it holds only the table of the current job
                current.clear()
                current[job["load"]] = pd.read_parquet(os.path.join(root, "tables", job["load"] + ".parquet"))
                gc.collect()
                gc.freeze()
                reply: Any = {"loaded": job["load"]}
            elif job.get("table") not in current:
                reply = [{"status": "sandbox_error", "detail": f"no table {job.get('table')!r} loaded"}]
            else:
                codes = [(c, bool(p)) for c, p in zip(job["codes"], job["previews"])]
                reply = run_batch(codes, current[job["table"]], root, job["limits"], read_dirs,
                                  counter, width)
                counter += len(codes)
        except Exception as exc:  # noqa: BLE001 - one bad job never takes the server down
            reply = [{"status": "sandbox_error", "detail": f"{type(exc).__name__}: {exc}"[:300]}]
        print(json.dumps(reply, ensure_ascii=False), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
