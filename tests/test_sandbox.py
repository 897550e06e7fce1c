"""The sandbox for LLM-written code: escapes are rejected with a reason and leave no file,
process or connection behind; it refuses to start where it cannot isolate."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stages.sandbox import Limits, Sandbox, SandboxUnavailable, clean_environment
from stages.sandbox.server import canonical


@pytest.fixture(scope="module")
def box():
    frame = pd.DataFrame({"날짜": pd.date_range("2024-01-02", periods=60, freq="B"),
                          "종가": np.linspace(100, 160, 60), "거래량": np.arange(60) * 10})
    with Sandbox(Limits(cpu_seconds=1, memory_mb=256, wall_seconds=4)) as sandbox:
        sandbox.load("prices", frame)
        yield sandbox


def test_code_runs_on_the_full_table_and_equal_results_hash_equal(box):
    a = box.run("prices", "df[df['거래량'] > 500]['종가'].mean()")
    b = box.run("prices", "result = df.loc[df['거래량'] > 500, '종가'].sum() / (df['거래량'] > 500).sum()")
    c = box.run("prices", "df['종가'].mean()")
    assert a.ok and b.ok and c.ok
    assert a.hash == b.hash != c.hash
    frame = box.run("prices", "df.tail(3)[['날짜', '종가']]")
    assert frame.ok and "종가" in frame.preview
    assert box.run("prices", "x = 1").status == "no_result"
    assert box.run("prices", "df['없는열']").status == "KeyError"


def test_reading_the_api_key_finds_no_secret(box, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key")
    assert "OPENAI_API_KEY" not in clean_environment()
    assert box.run("prices", "import os\nos.environ['OPENAI_API_KEY']").status == "KeyError"
    assert box.run("prices", "import os\nos.environ.get('HF_TOKEN')").status == "no_result"
    # not through the parent's /proc either
    leak = box.run("prices", f"open('/proc/{os.getpid()}/environ').read()")
    assert leak.status == "PermissionError"


def test_a_socket_is_refused_and_no_connection_arrives(box):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.5)
    port = server.getsockname()[1]
    out = box.run("prices", f"import socket\nsocket.create_connection(('127.0.0.1', {port}), 1)")
    assert out.status == "PermissionError"
    with pytest.raises(socket.timeout):
        server.accept()
    server.close()


def test_writing_outside_its_directory_is_refused_and_its_own_files_are_removed(box, tmp_path):
    target = tmp_path / "escaped.txt"
    assert box.run("prices", f"open({str(target)!r}, 'w').write('x')").status == "PermissionError"
    assert not target.exists()
    assert box.run("prices", "open('/etc/hostname-copy', 'w')").status == "PermissionError"
    inside = box.run("prices", "open('scratch.txt', 'w').write('x' * 10)\n'written'")
    assert inside.ok
    jobs = box.root / "jobs"
    assert list(jobs.iterdir()) == []          # its directory is gone after each run
    assert box.run("prices", "open('big', 'wb').write(b'x' * (64 << 20))").status in ("OSError", "sandbox_limit")


def test_spawning_processes_is_refused_and_leaves_none(box, tmp_path):
    marker = tmp_path / "spawned"
    for code in (f"import subprocess\nsubprocess.run(['touch', {str(marker)!r}])",
                 "import os\nos.fork()",
                 "import multiprocessing as m\np = m.Process(target=print)\np.start()",
                 "import os\nos.kill(1, 0)"):
        out = box.run("prices", code)
        assert out.status == "PermissionError", (code, out)
    assert not marker.exists()
    assert children_of(box._proc.pid) == []     # every child was reaped, none escaped


def children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                status = Path(f"/proc/{entry}/status").read_text()
            except OSError:
                continue
            ppid = next(int(l.split()[1]) for l in status.splitlines() if l.startswith("PPid:"))
            if ppid == pid:
                found.append(int(entry))
    return found


def test_unbounded_memory_and_endless_code_hit_the_limits(box):
    for code in ("x = bytearray(10 ** 10)", "x = []\nwhile True: x.append(' ' * 10 ** 6)"):
        out = box.run("prices", code)
        assert out.status == "sandbox_limit" and "memory" in out.detail, out
    loop = box.run("prices", "while True: pass")
    assert loop.status == "sandbox_limit" and loop.detail == "CPU time limit"
    assert loop.cpu_seconds >= 0.9   # it ran until its CPU time was used, not a wall-clock cut
    assert box.run("prices", "import time\ntime.sleep(60)").status == "PermissionError"
    blocked = box.run("prices", "import threading\nl = threading.Lock()\nl.acquire()\nl.acquire()")
    assert blocked.status == "sandbox_limit" and blocked.detail.startswith("no progress")
    # and the sandbox still works afterwards
    assert box.run("prices", "len(df)").ok


def test_the_sandbox_refuses_to_start_where_it_cannot_isolate():
    """Without CAP_SYS_ADMIN (a container that does not grant it) the server cannot enter a
    network namespace: it refuses, the client raises naming why, and nothing is left."""
    box = Sandbox(Limits(), drop_capabilities=(21,))
    with pytest.raises(SandboxUnavailable, match="refusing to run untrusted code.*network namespace"):
        box.start()
    assert box.root is None and box._proc is None


def test_canonical_results_ignore_float_noise_and_series_names():
    a = canonical(pd.Series([0.1 + 0.2, 1.0], name="x"))
    b = canonical(pd.Series([0.3, 1.0], name="y"))
    assert a == b
    assert canonical(pd.DataFrame({"a": [1]})) != canonical(pd.DataFrame({"b": [1]}))


def test_host_files_processes_and_the_clock_are_out_of_reach(box, tmp_path):
    """uid 0 owns the host's files and processes: without capabilities and with the filter,
    the code cannot change file metadata, re-limit or re-schedule the server, watch or freeze
    the filesystem, or set the clock or the host name."""
    victim = tmp_path / "victim.txt"
    victim.write_text("x")
    before = victim.stat()
    for code in (f"import os\nos.chmod({str(victim)!r}, 0o4777)",
                 f"import os\nos.utime({str(victim)!r}, (0, 0))",
                 f"import os\nos.setxattr({str(victim)!r}, 'user.pwned', b'1')",
                 f"import os\nos.chown({str(victim)!r}, 1234, 1234)",
                 f"import resource, os\nresource.prlimit(os.getppid(), resource.RLIMIT_NOFILE, (3, 3))",
                 "import os\nos.setpriority(os.PRIO_PROCESS, os.getppid(), 19)",
                 "import os\nos.sched_setaffinity(os.getppid(), {0})",
                 "import socket\nsocket.sethostname('pwned')",
                 "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                 "if libc.fanotify_init(4, 0) < 0: raise OSError(ctypes.get_errno(), 'fanotify')"):
        out = box.run("prices", code)
        assert out.status in ("PermissionError", "OSError"), (code, out)
    after = victim.stat()
    assert (after.st_mode, after.st_mtime, after.st_uid) == (before.st_mode, before.st_mtime, before.st_uid)
    assert os.listxattr(victim) == []
    # its own files: no immutable flag (it would survive the cleanup)
    immutable = box.run("prices", "import fcntl, struct\nf = open('keep', 'w')\n"
                        "fcntl.ioctl(f, 0x40086602, struct.pack('i', 0x10))")
    assert immutable.status in ("PermissionError", "OSError"), immutable
    assert box.run("prices", "len(df)").ok      # the server was not harmed


def test_total_disk_is_bounded_and_a_forged_report_cannot_crash_the_stage(box):
    many = box.run("prices", "for i in range(40):\n    open(f'f{i}', 'wb').write(b'x' * (7 << 20))")
    assert many.status == "OSError" and "No space left" in many.detail
    forged = box.run("prices", "import sys, os\nf = sys._getframe()\n"
                     "while 'write_fd' not in f.f_locals: f = f.f_back\n"
                     "os.write(f.f_locals['write_fd'], b'{\"status\": \"KeyError\", \"detail\": 7}')\n"
                     "os._exit(0)")
    assert forged.status == "sandbox_limit" and forged.detail == "unreadable result"
    assert box.run("prices", "len(df)").ok


def test_a_child_sees_only_the_current_table_and_the_client_survives_a_dead_server():
    with Sandbox(Limits(cpu_seconds=1, wall_seconds=5)) as sandbox:
        sandbox.load("first", pd.DataFrame({"secret": [1, 2, 3]}))
        sandbox.load("second", pd.DataFrame({"a": [1]}))
        probe = ("import gc, pandas as pd\n"
                 "sum(1 for o in gc.get_objects() if isinstance(o, pd.DataFrame) and 'secret' in o.columns)")
        out = sandbox.run("second", probe)
        assert out.ok and out.preview == "0"
        with pytest.raises(SandboxUnavailable, match="no table 'first'"):
            sandbox.run("first", "len(df)")
        root = sandbox.root
        sandbox._proc.kill()
    assert not root.exists()      # close() after a dead server still removes everything
