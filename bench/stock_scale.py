#!/usr/bin/env python
"""Production size for the price sources and stock@ (issue 22 §6): ~2,000 tickers over three
years (~1.5 M rows, the data portal's layout, CSV) -> ``collect`` -> ``stock`` at a target of
20,000 train + 2,000 test questions, each stage run as dvc.yaml runs it (its own process).

Target: collect + stock together <= 60 s on 2 cores, peak RSS of each process <= 1.5 GiB.
The series are generated (scripts/make_price_samples.py ``generate``), with a 1:2 split
planted in every 50th ticker and a 1% sprinkling of bad rows, so validation does real work.

    python bench/stock_scale.py [--tickers 2000] [--years 3] [--record]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from make_price_samples import csv_bytes, finish, generate  # noqa: E402

PORTAL = {"date": "basDt", "ticker": "srtnCd", "name": "itmsNm", "market": "mrktCtg",
          "open": "mkp", "high": "hipr", "low": "lopr", "close": "clpr", "volume": "trqu",
          "value": "trPrc", "listed_shares": "lstgStCnt"}
INDEX = {"date": "basDt", "ticker": "idxNm", "name": "idxNm", "market": "idxCsf", "open": "mkp",
         "high": "hipr", "low": "lopr", "close": "clpr", "volume": "trqu", "value": "trPrc"}


def write_inputs(work: Path, tickers: int, years: int) -> tuple[int, float]:
    start = date(2023, 1, 2)
    stock, index = generate(tickers, start, date(2023 + years - 1, 12, 30), seed=7)
    codes = stock["srtnCd"].unique()
    days = sorted(stock["basDt"].unique())
    split_day = days[len(days) // 2]
    split = stock["srtnCd"].isin(codes[::50]) & (stock["basDt"] >= split_day)
    for col in ("clpr", "prev", "mkp", "hipr", "lopr"):
        stock.loc[split, col] = (stock.loc[split, col] / 2).round()
    stock.loc[split & (stock["basDt"] == split_day), "prev"] *= 2
    stock.loc[split, "lstgStCnt"] *= 2
    rng = np.random.default_rng(1)
    bad = rng.choice(len(stock), len(stock) // 100, replace=False)
    stock.loc[stock.index[bad], "lopr"] = stock.loc[stock.index[bad], "hipr"] + 10  # high < low
    stock, index = finish(stock, index)
    raw = work / "data" / "raw" / "prices"
    raw.mkdir(parents=True)
    data = csv_bytes(stock)
    (raw / "stock_prices.csv").write_bytes(data)
    (raw / "index_prices.csv").write_bytes(csv_bytes(index))
    return len(stock), len(data) / 2**20


def params() -> dict:
    base = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    collect = {k: base["collect"][k] for k in ("krx_stock_prices", "krx_index_prices")}
    return {"collect": collect, "stock": {"krx": {**base["stock"]["krx"], "cutoff": "2025-07-01"}}}


def run(work: Path, args: list[str]) -> tuple[float, float, str]:
    """Wall seconds and the child's peak RSS (MiB), measured by a wrapper process."""
    probe = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
             "r = subprocess.run(sys.argv[1:]); w = time.perf_counter() - t; "
             "print('BENCH', w, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode)")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", probe, sys.executable, "-m", *args], cwd=work,
                         env=env, capture_output=True, text=True)
    line = [l for l in out.stdout.splitlines() if l.startswith("BENCH")][-1].split()
    if line[3] != "0":
        raise SystemExit(f"{args[1]} failed:\n{out.stderr[-3000:]}")
    return float(line[1]), int(line[2]) / 1024, out.stderr


def report(title: str, script: str, header: str, note: str, table: list[str], record: bool) -> None:
    """Print a bench's table; with ``record``, append it to bench/RESULTS.md under
    ``## <title> — <UTC time> (`bench/<script>`)``, then the header line and ``note``."""
    print(header)
    print("\n".join(table))
    if record:
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        with open(ROOT / "bench" / "RESULTS.md", "a", encoding="utf-8") as f:
            f.write(f"\n## {title} — {stamp} (`bench/{script}`)\n\n{header}. {note}\n\n"
                    + "\n".join(table) + "\n")


def stand_in_counts(stats: Any, prefix: str, strip: bool = False) -> dict[str, int]:
    """The stand-in's own counts whose names start with ``prefix``, wherever they sit in its
    stats (``strip``: without the prefix)."""
    found: dict[str, int] = {}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if isinstance(k, str) and k.startswith(prefix) and isinstance(v, int):
                    found[k[len(prefix):] if strip else k] = v
                else:
                    walk(v)
    walk(stats)
    return dict(sorted(found.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tickers", type=int, default=2000)
    parser.add_argument("--years", type=int, default=3)
    parser.add_argument("--record", action="store_true", help="append to bench/RESULTS.md")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="stock-bench-") as tmp:
        work = Path(tmp)
        rows, mib = write_inputs(work, args.tickers, args.years)
        (work / "params.yaml").write_text(yaml.safe_dump(params(), allow_unicode=True), encoding="utf-8")
        lines = []
        total = 0.0
        for name, cmd in (
                ("collect@krx_index_prices", ["stages.collect", "krx_index_prices"]),
                ("collect@krx_stock_prices", ["stages.collect", "krx_stock_prices"]),
                ("stock@krx", ["stages.stock", "krx", "--calendar",
                               "data/collected/krx_index_prices.parquet", "--prices",
                               "data/collected/krx_stock_prices.parquet"])):
            stage, key = cmd[0].split(".")[1], cmd[1]
            folder = "collected" if stage == "collect" else "generated/stock"
            io = ["--out", f"data/{folder}/{key}.parquet", "--rejects", f"rejects/{key}.parquet",
                  "--metrics", f"metrics/{stage}_{key}.json", "--log", f"logs/{stage}_{key}.log"]
            seconds, rss, _ = run(work, [*cmd, *io])
            total += seconds
            metrics = json.loads((work / f"metrics/{stage}_{key}.json").read_text(encoding="utf-8"))
            lines.append((name, seconds, rss, metrics))
    header = (f"{args.tickers} tickers x {args.years} years: {rows:,} rows, {mib:.0f} MiB of CSV; "
              f"{os.cpu_count()} CPUs")
    table = ["| stage | wall s | peak RSS MiB | what it did |", "|---|---:|---:|---|"]
    for name, seconds, rss, m in lines:
        if name.startswith("collect"):
            what = (f"{m['records']:,} rows kept, {m['rejected']:,} rejected "
                    f"{m['rejects_by_reason']}, flags {m['flags']}")
        else:
            s = m["splits"]
            what = (f"{m['records']:,} questions: train {s['train']['selected']:,} of "
                    f"{s['train']['candidates']:,} (natural up {s['train']['natural_up_share']}, "
                    f"selected {s['train']['selected_up_share']}), test {s['test']['selected']:,} "
                    f"of {s['test']['candidates']:,} (natural up {s['test']['natural_up_share']}); "
                    f"{m['corporate_actions']} corporate actions, {m['gaps']} gaps cut")
        table.append(f"| {name} | {seconds:.1f} | {rss:.0f} | {what} |")
    table.append(f"| **together** | **{total:.1f}** | max {max(l[2] for l in lines):.0f} | "
                 "target <= 60 s, <= 1,536 MiB |")
    report("Price sources and stock@ at production size", "stock_scale.py", header,
           "Each stage in its own process, as dvc.yaml runs it; peak RSS of that process.",
           table, args.record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
