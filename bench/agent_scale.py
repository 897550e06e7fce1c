#!/usr/bin/env python
"""agent@ at a production target (issue 22 §6), against the model-like stand-in.

Prices of ~2,000 tickers over three years (as ``bench/stock_scale.py`` writes them) ->
``collect`` -> ``agent`` with production params (1,600 train + 200 test tables) and
``llm_defaults.base_url`` pointing at ``bench/standin.py`` (its agent answers: a right key,
distractors of which some are equivalent to the key or name a missing column, and a wrong
letter at ``--wrong-rate``). Every option and reference runs in the sandbox. Also a bare
throughput run of the sandbox: typical options on a 150-row table, one after another.

Targets: the sandbox executes >= 50 options per second on 2 cores; the acceptance rate is
recorded (kept questions / tables); ~1,000 kept.

    python bench/agent_scale.py [--tickers 2000] [--tables 1600] [--record]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.standin import StandIn  # noqa: E402
from bench.stock_scale import report, run, stand_in_counts, write_inputs  # noqa: E402

OPTIONS = ["df['종가'].mean()", "df[df['거래량'] > df['거래량'].median()]['종가'].mean()",
           "df.nlargest(5, '종가')['날짜']", "df['종가'].rolling(5).mean().iloc[-1]",
           "df.groupby(df['날짜'].dt.month)['종가'].mean()", "(df['종가'].iloc[-1] / df['종가'].iloc[0] - 1) * 100",
           "df['시가총액'].mean()", "df.sort_values('종가').tail(3)"]


def sandbox_throughput(n: int = 1008, batch: int = 7) -> dict:
    """Typical options on a 150-row table: one at a time, and ``batch`` at a time (a question's
    options and reference, as agent@ runs them: one child per core)."""
    from stages.sandbox import Limits, Sandbox
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"날짜": pd.date_range("2024-01-02", periods=150, freq="B"),
                          "종가": rng.integers(1000, 90000, 150), "거래량": rng.integers(1, 10**6, 150)})
    codes = [OPTIONS[i % len(OPTIONS)] for i in range(n)]
    with Sandbox(Limits()) as box:
        box.load("t", frame)
        start = time.perf_counter()
        single = [box.run("t", code, preview=False).status for code in codes]
        one = time.perf_counter() - start
        start = time.perf_counter()
        batched = [o.status for i in range(0, n, batch)
                   for o in box.run_many("t", codes[i:i + batch], [False] * len(codes[i:i + batch]))]
        many = time.perf_counter() - start
    assert single == batched
    return {"runs": n, "single_per_second": round(n / one, 1),
            "batched_per_second": round(n / many, 1), "batch": batch,
            "ok": single.count("ok"), "errors": n - single.count("ok")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tickers", type=int, default=2000)
    parser.add_argument("--years", type=int, default=3)
    parser.add_argument("--tables", type=int, default=1600)
    parser.add_argument("--test-tables", type=int, default=200)
    parser.add_argument("--wrong-rate", type=float, default=0.1)
    parser.add_argument("--latency", type=float, nargs=2, default=(0.3, 1.0))
    parser.add_argument("--record", action="store_true", help="append to bench/RESULTS.md")
    args = parser.parse_args(argv)
    bare = sandbox_throughput()
    base = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    server = StandIn.start(latency=tuple(args.latency), wrong_rate=args.wrong_rate)
    try:
        with tempfile.TemporaryDirectory(prefix="agent-bench-") as tmp:
            work = Path(tmp)
            rows, _ = write_inputs(work, args.tickers, args.years)
            params = {"collect": {"krx_stock_prices": base["collect"]["krx_stock_prices"]},
                      "llm_defaults": {**base["llm_defaults"], "base_url": server.base_url},
                      "agent": {"krx": {**base["agent"]["krx"], "tables": args.tables,
                                        "test_tables": args.test_tables}}}
            (work / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
            os.environ["OPENAI_API_KEY"] = "sk-bench-not-a-real-key"
            run(work, ["stages.collect", "krx_stock_prices", "--out",
                       "data/collected/krx_stock_prices.parquet", "--rejects", "r.parquet",
                       "--metrics", "m.json", "--log", "c.log"])
            seconds, rss, _ = run(work, [
                "stages.agent", "krx", "--prices", "data/collected/krx_stock_prices.parquet",
                "--out", "q.parquet", "--conversations", "c.parquet", "--rejects", "rej.parquet",
                "--cache-dir", "cache", "--metrics", "agent.json", "--log", "agent.log"])
            metrics = json.loads((work / "agent.json").read_text(encoding="utf-8"))
    finally:
        stats = server.stats()
        server.stop()
    box = metrics["sandbox"]
    header = (f"{args.tickers} tickers x {args.years} years ({rows:,} price rows); "
              f"{args.tables} + {args.test_tables} tables; stand-in latency {args.latency[0]}-"
              f"{args.latency[1]} s, wrong letter {args.wrong_rate}; {os.cpu_count()} CPUs")
    table = ["| measure | value |", "|---|---:|",
             f"| agent@krx wall (LLM + sandbox) | {seconds:.1f} s |",
             f"| peak RSS of the stage | {rss:.0f} MiB |",
             f"| questions kept / tables (acceptance) | {metrics['records']:,} / {metrics['items']:,} "
             f"({metrics['acceptance_rate']:.1%}) |",
             f"| kept by split | {metrics['splits']} |",
             f"| rejects by reason | {metrics['rejects_by_reason']} |",
             f"| sandbox in the stage: code runs, seconds | {box['runs']:,} in {box['seconds']:.1f} s |",
             f"| **sandbox in the stage: runs per second** (incl. loading each table) | **{box['runs_per_second']}** |",
             f"| sandbox bare: {bare['runs']:,} typical options on a 150-row table, one at a time | "
             f"{bare['single_per_second']} /s ({bare['ok']} ok, {bare['errors']} raising) |",
             f"| sandbox bare: the same, {bare['batch']} at a time (a question's options) | "
             f"**{bare['batched_per_second']} /s** |",
             f"| LLM calls / cached | {metrics['llm'].get('calls')} / {metrics['llm'].get('cache_hits')} |",
             f"| stand-in's agent answers | {stand_in_counts(stats, 'agent.')} |"]
    report("agent@ at a production target", "agent_scale.py", header,
           "Target: the sandbox runs >= 50 options/s on 2 cores.", table, args.record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
