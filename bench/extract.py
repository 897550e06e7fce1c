#!/usr/bin/env python
"""Benchmark of extract@<collection> (a benchmark, not a test): speed and memory vs input size.

    python bench/extract.py [--copies 10 40 160] [--tables-copies 40] [--workers N] [--no-append]

Input: N copies of the real statute PDFs in ``../shared/real/pdfs`` (58 pages per copy),
written to a temp directory. Each copy gets a different PDF comment after its ``%%EOF``
(MuPDF ignores it) so that no file is a ``duplicate_file`` of another.

For each N it measures, in the same run:

* **bare**: one process, ``pymupdf.open`` + ``page.get_text()`` on every page — the floor
  any extractor pays;
* **stage**: ``python -m stages.extract`` as dvc.yaml runs it (tables off, ``workers`` =
  CPUs), pages/s over the stage's own timer (metrics ``seconds``: process start-up and
  imports excluded) and end to end;
* CPU per page of both (the stage's over all its processes), which does not depend on how
  busy the machine is — wall-clock speed-ups on a shared machine do;
* peak memory of the stage's process tree, polled from /proc every 20 ms: the sum of RSS
  (counts pages shared between the forked workers once per process), the sum of PSS
  (shares them out), and the largest single process. Flat in N means memory does not grow
  with the number of PDFs.

Then ``tables: true`` vs ``false`` on ``--tables-copies`` copies of the repository's sample
reports (``data/samples/pdfs``: ruled tables on 4 of their 8 pages; the statutes have no
table and find_tables is skipped on their pages), and a per-page breakdown of where the
stage's time goes (in-process, one copy of the statutes). Prints a table and appends a dated
section to ``bench/RESULTS.md`` (created with a header if missing).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stages import extract  # noqa: E402  (imports pymupdf the way the stage does)
from stages.extract import ExtractParams  # noqa: E402
from stages.common.text import normalize_text  # noqa: E402

import pymupdf  # noqa: E402

REAL_PDFS = REPO.parent / "shared" / "real" / "pdfs"
SAMPLE_PDFS = REPO / "data" / "samples" / "pdfs"
RESULTS = REPO / "bench" / "RESULTS.md"
RESULTS_HEADER = """# Benchmark results

Appended by the scripts in `bench/` (one dated section per run; newest last). Numbers are
from the machine named in each section; compare runs only on the same machine.
"""
TARGET_SPEEDUP = 1.5


# ----------------------------------------------------------------------------- inputs
def make_copies(dest: Path, copies: int, sources: list[Path] | None = None) -> list[Path]:
    sources = sources if sources is not None else sorted(REAL_PDFS.glob("*.pdf"))
    if not sources:
        raise SystemExit(f"no PDFs in {REAL_PDFS}")
    files = []
    for n in range(copies):
        for source in sources:
            target = dest / f"copy{n:04d}" / source.name
            target.parent.mkdir(parents=True, exist_ok=True)
            # A comment after %%EOF: same content for MuPDF, different sha256.
            target.write_bytes(source.read_bytes() + f"\n% bench copy {n}\n".encode())
            files.append(target)
    return files


# ----------------------------------------------------------------------------- measurements
def bare_get_text(files: list[Path]) -> tuple[int, float, float]:
    """(pages, wall seconds, CPU seconds) of plain get_text() in this process."""
    wall, cpu, pages = time.perf_counter(), time.process_time(), 0
    for path in files:
        with pymupdf.open(path) as doc:
            for page in doc:
                page.get_text()
                pages += 1
    return pages, time.perf_counter() - wall, time.process_time() - cpu


def _descendants(pid: int) -> list[int]:
    found, frontier = [], [pid]
    while frontier:
        current = frontier.pop()
        found.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as handle:
                    frontier.extend(int(c) for c in handle.read().split())
        except OSError:
            pass
    return found


def _memory_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in KiB; (0, 0) once it is gone."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for row in handle:
                if row.startswith("Rss:"):
                    rss = int(row.split()[1])
                elif row.startswith("Pss:"):
                    pss = int(row.split()[1])
    except OSError:
        pass
    return rss, pss


class TreeMemory(threading.Thread):
    """Polls the memory of a process and all its descendants until stopped."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_rss_sum = self.peak_pss_sum = self.peak_rss_max = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            sizes = [_memory_kib(p) for p in _descendants(self.pid)]
            if sizes:
                self.peak_rss_sum = max(self.peak_rss_sum, sum(s[0] for s in sizes))
                self.peak_pss_sum = max(self.peak_pss_sum, sum(s[1] for s in sizes))
                self.peak_rss_max = max(self.peak_rss_max, max(s[0] for s in sizes))
            self.done.wait(self.interval)


def run_stage(workdir: Path, inputs: Path, workers: int, tables: bool) -> dict:
    """Run the stage's CLI on ``inputs``; its metrics plus wall, CPU and memory figures."""
    (workdir / "params.yaml").write_text(json.dumps(
        {"extract": {"bench": {"input": str(inputs), "workers": workers, "tables": tables}}}))
    out = workdir / "out"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "stages.extract", "bench", "--out", f"{out}/bench.parquet",
           "--json-dir", f"{out}/bench_json", "--rejects", f"{out}/rejects.parquet",
           "--metrics", f"{out}/metrics.json", "--log", f"{out}/extract.log",
           "--params", str(workdir / "params.yaml")]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = time.perf_counter()
    process = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    memory = TreeMemory(process.pid)
    memory.start()
    stdout, stderr = process.communicate()
    wall = time.perf_counter() - wall
    memory.done.set()
    memory.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if process.returncode != 0:
        raise SystemExit(f"stage failed ({process.returncode}):\n{stderr[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    metrics.update(
        wall=wall,
        cpu=(after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        peak_rss_sum_mib=memory.peak_rss_sum / 1024, peak_pss_sum_mib=memory.peak_pss_sum / 1024,
        peak_rss_max_mib=memory.peak_rss_max / 1024)
    return metrics


def breakdown(files: list[Path]) -> list[tuple[str, float]]:
    """Per-page milliseconds of the stage's steps, in this process, on ``files``."""
    params = ExtractParams(input="unused", tables=False)
    extract._init_worker(params, "bench")
    pages = 0
    t_open = t_text = t_words = 0.0
    for path in files:
        start = time.perf_counter()
        doc = pymupdf.open(path)
        loaded = [doc.load_page(i) for i in range(doc.page_count)]
        t_open += time.perf_counter() - start
        start = time.perf_counter()
        for page in loaded:
            page.get_text()
        t_text += time.perf_counter() - start
        start = time.perf_counter()
        for page in loaded:
            extract.page_words(page)
        t_words += time.perf_counter() - start
        pages += len(loaded)
        doc.close()
    start = time.perf_counter()
    results = [extract._process_file((str(p), p.name)) for p in files]
    t_stage = time.perf_counter() - start
    texts = [r["text"] for result in results for r in result.pages]
    start = time.perf_counter()
    for text in texts:
        normalize_text(text)  # already normal: the same scans, a lower bound of its cost
    t_norm = time.perf_counter() - start
    per_page = 1000 / pages
    return [("open + load pages", t_open * per_page),
            ("bare page.get_text()", t_text * per_page),
            ("page.get_text('words') (the stage's extraction call)", t_words * per_page),
            ("normalize_text of the page text (≥)", t_norm * per_page),
            ("whole per-file work in a worker (extract_pdf + JSON)", t_stage * per_page)]


# ----------------------------------------------------------------------------- report
def machine() -> str:
    model = "unknown CPU"
    try:
        for row in Path("/proc/cpuinfo").read_text().splitlines():
            if row.startswith("model name"):
                model = row.split(":", 1)[1].strip()
                break
        mem_kib = next(int(r.split()[1]) for r in Path("/proc/meminfo").read_text().splitlines()
                       if r.startswith("MemTotal:"))
        ram = f"{mem_kib / 1024 / 1024:.1f} GiB RAM"
    except (OSError, StopIteration):
        ram = "RAM unknown"
    return (f"{os.cpu_count()} CPUs ({extract.available_cpus()} usable), {model}, {ram}; "
            f"Python {platform.python_version()}, PyMuPDF {pymupdf.VersionBind} "
            f"(MuPDF {pymupdf.VersionFitz})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--copies", type=int, nargs="+", default=[10, 40, 160])
    parser.add_argument("--tables-copies", type=int, default=40)
    parser.add_argument("--workers", type=int, default=extract.available_cpus())
    parser.add_argument("--no-append", action="store_true", help="print only")
    args = parser.parse_args()
    if not REAL_PDFS.is_dir():
        print(f"skipped: {REAL_PDFS} is absent", file=sys.stderr)
        return 0

    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_extract_") as tmp:
        tmp_path = Path(tmp)
        for copies in args.copies:
            inputs = tmp_path / f"in{copies}"
            files = make_copies(inputs, copies)
            pages, bare_wall, bare_cpu = bare_get_text(files)
            stage = run_stage(tmp_path, inputs, args.workers, tables=False)
            assert stage["pages"] == pages and stage["files_rejected"] == 0, stage
            rows.append(dict(copies=copies, files=len(files), pages=pages,
                             bare_pps=pages / bare_wall, bare_cpu_ms=bare_cpu * 1000 / pages,
                             stage_pps=pages / stage["seconds"], stage_e2e_pps=pages / stage["wall"],
                             stage_cpu_ms=stage["cpu"] * 1000 / pages,
                             rss_sum=stage["peak_rss_sum_mib"], pss_sum=stage["peak_pss_sum_mib"],
                             rss_max=stage["peak_rss_max_mib"]))
            print(f"{copies} copies done: {rows[-1]}", file=sys.stderr, flush=True)
            if copies != args.copies[0]:
                shutil.rmtree(inputs)
        parts = breakdown(sorted((tmp_path / f"in{args.copies[0]}").rglob("*.pdf"))[:5])
        samples = [p for p in sorted(SAMPLE_PDFS.rglob("*.pdf")) if p.name != "broken_sample.pdf"]
        tables_inputs = tmp_path / "samples"
        make_copies(tables_inputs, args.tables_copies, samples)
        without_tables = run_stage(tmp_path, tables_inputs, args.workers, tables=False)
        with_tables = run_stage(tmp_path, tables_inputs, args.workers, tables=True)
    load_after = os.getloadavg()

    # Fixed costs (interpreter start, imports, forking the pool, pyarrow importing pandas on
    # its first table) do not depend on N; the difference between consecutive sizes is
    # the steady-state throughput and CPU cost per page.
    for previous, r in zip([None, *rows], rows):
        if previous is None:
            r["marginal_pps"] = r["marginal_cpu_ms"] = None
            continue
        pages = r["pages"] - previous["pages"]
        r["marginal_pps"] = pages / (r["pages"] / r["stage_pps"] - previous["pages"] / previous["stage_pps"])
        r["marginal_cpu_ms"] = (r["stage_cpu_ms"] * r["pages"]
                                - previous["stage_cpu_ms"] * previous["pages"]) / pages

    def fmt(value, pattern):
        return "–" if value is None else format(value, pattern)

    header = ("| copies | files | pages | bare get_text pages/s | stage pages/s | speed-up | "
              "stage pages/s, steady state (Δ from previous row) | steady speed-up | "
              "CPU ms/page bare | CPU ms/page stage, steady | peak RSS sum MiB | "
              "peak PSS sum MiB | largest process RSS MiB |")
    lines = [header, "|" + "---|" * 13]
    for r in rows:
        steady = None if r["marginal_pps"] is None else r["marginal_pps"] / r["bare_pps"]
        lines.append(f"| {r['copies']} | {r['files']} | {r['pages']} | {r['bare_pps']:.0f} | "
                     f"{r['stage_pps']:.0f} | {r['stage_pps'] / r['bare_pps']:.2f}× | "
                     f"{fmt(r['marginal_pps'], '.0f')} | {fmt(steady, '.2f')}{'×' if steady else ''} | "
                     f"{r['bare_cpu_ms']:.2f} | {fmt(r['marginal_cpu_ms'], '.2f')} | "
                     f"{r['rss_sum']:.0f} | {r['pss_sum']:.0f} | {r['rss_max']:.0f} |")
    table = "\n".join(lines)
    tables_line = (f"Tables ({args.tables_copies} copies of the {len(samples)} sample reports in "
                   f"data/samples/pdfs, {with_tables['pages']} pages, {with_tables['tables']} "
                   f"tables found, {args.workers} workers): tables on "
                   f"{with_tables['pages'] / with_tables['seconds']:.1f} pages/s, tables off "
                   f"{without_tables['pages'] / without_tables['seconds']:.1f} pages/s; peak PSS "
                   f"sum {with_tables['peak_pss_sum_mib']:.0f} MiB.")
    parts_table = "\n".join(["| step (one process, one copy) | ms/page |", "|---|---|"]
                            + [f"| {name} | {ms:.2f} |" for name, ms in parts])
    last = rows[-1]
    steady_best = last["marginal_pps"] / last["bare_pps"] if last["marginal_pps"] else 0.0
    raw_best = max(r["stage_pps"] / r["bare_pps"] for r in rows)
    ceiling = (args.workers * last["bare_cpu_ms"] / last["marginal_cpu_ms"]
               if last["marginal_cpu_ms"] else float("nan"))
    verdict = (f"Target ≥ {TARGET_SPEEDUP}× bare: "
               f"{'met' if max(steady_best, raw_best) >= TARGET_SPEEDUP else 'NOT met'} "
               f"(largest N: {raw_best:.2f}× including fixed costs, {steady_best:.2f}× steady "
               f"state). The stage spends {last['marginal_cpu_ms']:.2f} CPU ms per page against "
               f"{last['bare_cpu_ms']:.2f} for bare get_text(), so {args.workers} idle CPUs could "
               f"give at most {ceiling:.2f}×.")
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = "\n".join([
        f"## extract — {now}", "",
        f"Machine: {machine()}. Load average before/after: "
        f"{load_before[0]:.2f} / {load_after[0]:.2f} (other work on the machine slows the pool more "
        "than the single-process baseline).",
        f"Input: N copies of the 5 statute PDFs in ../shared/real/pdfs (58 pages per copy); "
        f"stage = `python -m stages.extract`, tables off, workers = {args.workers}.", "",
        table, "", tables_line, "", parts_table, "", verdict, ""])
    print(section)
    if not args.no_append:
        if not RESULTS.exists():
            RESULTS.write_text(RESULTS_HEADER, encoding="utf-8")
        with open(RESULTS, "a", encoding="utf-8") as handle:
            handle.write("\n" + section)
        print(f"appended to {RESULTS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
