"""How long a no-op ``dvc status`` takes on the full DAG, and where the time goes (a benchmark).

    .venv/bin/python bench/dvc_status.py [--workspace quickstart] [--runs 5] [--no-write]

Run it after ``make quickstart`` (every stage up to date). It times ``dvc status -q`` (the CLI
as users start it) ``--runs`` times, twice: with ruamel.yaml's C loader (``ruamel.yaml.clib``,
in requirements.lock) and with it hidden (the pure-Python loader, what the environment had
before), and profiles one run to show the share spent parsing YAML. DVC reads each stage's
params file anew for every stage (53 stages -> 53 parses of params.yaml), so the YAML loader
dominates a no-op status. Target: <= 3 s. The table is appended to bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import platform
import pstats
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "RESULTS.md"
HIDE_C = "import sys; sys.modules['_ruamel_yaml'] = None; "  # ImportError -> pure Python
RUN = "from dvc.cli import main; sys.exit(main(['status', '-q']))"


def timed(workspace: Path, pure: bool, runs: int) -> list[float]:
    code = ("import sys; " + (HIDE_C if pure else "") + RUN)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", code], cwd=workspace, capture_output=True,
                              text=True)
        times.append(time.perf_counter() - start)
        if proc.returncode != 0 or proc.stdout.strip():
            raise SystemExit(f"dvc status is not a clean no-op in {workspace}: "
                             f"{proc.stdout[-500:]}{proc.stderr[-500:]}")
    return times


def yaml_share(workspace: Path) -> tuple[float, float, int]:
    """(total s, s in ruamel's load, number of loads) of one profiled in-process status."""
    from dvc.cli import main

    cwd = os.getcwd()
    os.chdir(workspace)
    profile = cProfile.Profile()
    try:
        profile.runcall(main, ["status", "-q"])
    finally:
        os.chdir(cwd)
    stats = pstats.Stats(profile, stream=io.StringIO())
    total = max(v[3] for v in stats.stats.values())
    loads = [v for k, v in stats.stats.items() if k[2] == "load" and "ruamel" in k[0]]
    return total, sum(v[3] for v in loads), sum(v[1] for v in loads)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, default=ROOT / "quickstart")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    ws = args.workspace.resolve()
    stages = sum(1 for _ in (ws / "dvc.lock").read_text(encoding="utf-8").splitlines()
                 if _.startswith("  ") and not _.startswith("   ") and _.rstrip().endswith(":"))
    rows = []
    for label, pure in (("C loader (ruamel.yaml.clib)", False), ("pure-Python loader", True)):
        times = timed(ws, pure, args.runs)
        rows.append(f"| {label} | {statistics.median(times):.2f} | {min(times):.2f} | "
                    f"{max(times):.2f} | {'yes' if statistics.median(times) <= 3 else 'no'} |")
    total, in_yaml, loads = yaml_share(ws)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = (f"## dvc status no-op — {when} (`bench/dvc_status.py`)\n\n"
            f"Machine: {os.cpu_count()} CPUs, Python {platform.python_version()}; workspace "
            f"{ws.name} ({stages} stages, all up to date); {args.runs} runs of `dvc status -q` "
            "each, the CLI started as users start it.\n\n"
            "| YAML loader | median s | min s | max s | <= 3 s |\n|---|---|---|---|---|\n"
            + "\n".join(rows) + "\n\n"
            f"One profiled run with the C loader: {total:.2f} s, of which {in_yaml:.2f} s in "
            f"{loads} YAML loads (DVC parses params.yaml once per stage that declares params, "
            "plus dvc.yaml, dvc.lock and dvc.vars.yaml).\n")
    print(text)
    if not args.no_write:
        with RESULTS.open("a", encoding="utf-8") as out:
            out.write("\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
