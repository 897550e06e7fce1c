"""Run untrusted (LLM-written) pandas code, never in the caller's process.

    with Sandbox(Limits(cpu_seconds=2)) as box:
        box.load("t1", frame)                       # a DataFrame the code sees as `df`
        outcome = box.run("t1", "df['종가'].mean()")   # Outcome(status="ok", hash=…, preview=…)

A :class:`Sandbox` starts one server process (:mod:`stages.sandbox.server`) in a throw-away
directory, with an environment built from nothing (no ``OPENAI_API_KEY``, no ``HF_TOKEN``, no
proxy settings: only ``PATH``, ``LANG`` and single-threaded BLAS), in a network namespace of
its own; the server forks one child per piece of code under Landlock, seccomp and resource
limits (the server's docstring has the list). Where the kernel cannot isolate (no network
namespace, no Landlock, no seccomp, not x86_64) the server refuses and :class:`Sandbox` raises
:class:`SandboxUnavailable` naming what is missing: untrusted code is never run unprotected.

An :class:`Outcome`'s ``status`` is ``ok`` (with ``hash``: sha256 of the canonical result, and
``preview``: its repr, for a tool turn), the exception's type name (``KeyError``,
``PermissionError`` …), ``no_result``, or ``sandbox_limit`` (CPU time, memory, file size,
output size, no progress, an unreadable report) with a ``detail``. A failure of the sandbox
itself (isolation not applied in a child: the code did not run) raises
:class:`SandboxUnavailable` instead of passing for a verdict about the code.

Known limits: the code runs in the process that reports its result, so it can forge its *own*
report (never another option's); it can ``stat`` paths it cannot open; a CPU-bound option on
a machine 15x slower than usual meets the wall-clock backstop as "no progress".
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from pydantic import Field

from stages.common.params import Strict
from stages.common.runlog import StageError

ROOT = Path(__file__).resolve().parents[2]


class SandboxUnavailable(StageError):
    """The sandbox cannot isolate code here; nothing was run."""


class Limits(Strict):
    """Per piece of code. CPU time, not wall-clock: the verdict must not depend on the load."""
    cpu_seconds: int = Field(2, ge=1, le=60, description="RLIMIT_CPU of the child")
    memory_mb: int = Field(512, ge=64, le=16384, description="address space above the server's")
    file_mb: int = Field(8, ge=1, le=1024, description="largest file the code may write")
    output_kb: int = Field(64, ge=4, le=4096, description="largest result it may send back")
    disk_mb: int = Field(64, ge=8, le=4096, description="all the jobs' files together (a tmpfs)")
    wall_seconds: float = Field(30, gt=0, le=600, description=(
        "backstop for code that makes no progress (blocked, not computing); CPU-bound code meets "
        "cpu_seconds first unless the machine is 15x slower than usual"))


@dataclass
class Outcome:
    status: str
    detail: str = ""
    hash: Optional[str] = None
    preview: str = ""
    kind: str = ""
    cpu_seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def brief(self) -> dict[str, Any]:
        """What a record's meta keeps: the status and the result's hash (or the error)."""
        out: dict[str, Any] = {"status": self.status}
        if self.hash:
            out["hash"] = self.hash
        if self.detail and not self.ok:
            out["detail"] = self.detail[:200]
        return out


def _dropper(caps: tuple[int, ...]) -> Any:
    def drop() -> None:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        for cap in caps:
            if libc.prctl(24, cap, 0, 0, 0) != 0:   # PR_CAPBSET_DROP
                raise OSError(ctypes.get_errno(), "PR_CAPBSET_DROP")
    return drop


def clean_environment() -> dict[str, str]:
    """Everything the server inherits: nothing from the caller but PATH and the locale."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8", "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1",
            "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT)}


@dataclass
class Sandbox:
    limits: Limits = field(default_factory=Limits)
    # capabilities dropped from the server's bounding set before it starts: a test's stand-in
    # for a container without them (CAP_SYS_ADMIN = 21: no network namespace)
    drop_capabilities: tuple[int, ...] = ()
    root: Optional[Path] = None
    _proc: Optional[subprocess.Popen] = None
    landlock_abi: int = 0
    runs: int = 0                # pieces of code run so far
    cpu_seconds: float = 0.0     # their CPU time, summed

    def __enter__(self) -> "Sandbox":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def start(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="sandbox-"))
        (self.root / "tables").mkdir()
        (self.root / "jobs").mkdir()
        extra: dict[str, Any] = {}
        if self.drop_capabilities:
            extra["preexec_fn"] = _dropper(self.drop_capabilities)
        self._proc = subprocess.Popen(
            [sys.executable, "-s", "-m", "stages.sandbox.server", str(self.root),
             str(self.limits.disk_mb)],
            cwd=self.root, env=clean_environment(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True, encoding="utf-8", **extra)
        first = self._reply()
        if "fatal" in first:
            self.close()
            raise SandboxUnavailable(f"refusing to run untrusted code: the sandbox cannot isolate "
                                     f"it here: {first['fatal']}")
        self.landlock_abi = first.get("landlock_abi", 0)

    def _reply(self) -> Any:
        assert self._proc is not None and self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line:
            code = self._proc.wait()
            raise SandboxUnavailable(f"the sandbox server exited (status {code})")
        return json.loads(line)

    def _send(self, message: dict[str, Any]) -> Any:
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.write(json.dumps(message, ensure_ascii=False) + "\n")
        self._proc.stdin.flush()
        return self._reply()

    def load(self, name: str, frame: Any) -> None:
        """Make ``frame`` the ``df`` of later ``run(name, …)`` calls."""
        if not name.replace("_", "").isalnum():
            raise ValueError(f"table name {name!r}: letters, digits and _ only")
        assert self.root is not None
        frame.to_parquet(self.root / "tables" / f"{name}.parquet")
        self._send({"load": name})

    def run(self, table: str, code: str, preview: bool = True) -> Outcome:
        """Run ``code`` on table ``table``; ``preview=False`` skips the result's repr (a few ms)
        where nobody will read it."""
        return self.run_many(table, [code], [preview])[0]

    def run_many(self, table: str, codes: list[str],
                 previews: Optional[list[bool]] = None) -> list[Outcome]:
        """Each piece of code in a child of its own, one child per core at a time (the options
        of one question side by side); outcomes in order."""
        previews = [True] * len(codes) if previews is None else previews
        replies = self._send({"table": table, "codes": codes, "previews": previews,
                              "limits": self.limits.model_dump()})
        outcomes = []
        for reply in replies:
            if reply.get("status") == "sandbox_error":
                # isolation could not be applied in a child (the code did not run) or the
                # server was asked something impossible: never a verdict about the code
                raise SandboxUnavailable(f"sandbox failure, nothing was judged: {reply.get('detail')}")
            self.runs += 1
            self.cpu_seconds += float(reply.get("cpu_seconds") or 0)
            outcomes.append(Outcome(**{k: reply[k] for k in ("status", "detail", "hash", "preview",
                                                               "kind", "cpu_seconds") if k in reply}))
        if len(outcomes) != len(codes):
            raise SandboxUnavailable(f"the sandbox answered {len(outcomes)} of {len(codes)} runs")
        return outcomes

    def close(self) -> None:
        """Stop the server (its tmpfs of job files goes with it) and remove the directory;
        safe after the server died."""
        try:
            if self._proc is not None:
                for stream in (self._proc.stdin, self._proc.stdout):
                    try:
                        if stream:
                            stream.close()
                    except OSError:
                        pass
                try:
                    self._proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
        finally:
            self._proc = None
            if self.root is not None:
                shutil.rmtree(self.root, ignore_errors=True)
                self.root = None
