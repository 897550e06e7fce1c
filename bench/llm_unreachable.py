"""A wrong or dead LLM endpoint: how long until the stage stops (a benchmark, not a test).

11 requests (the issue's case) against a port on 127.0.0.1 that refuses connections, with the
production client settings (``LLMParams`` defaults: 8 attempts, backoff 1 s doubling to 60 s,
concurrency 100). Two rows:

- ``fail fast``: the client as shipped — refused connections before any response are
  counted and ``UNREACHABLE_LIMIT`` of them end the run with one error naming the endpoint;
- ``retry all``: the same client with the limit lifted, i.e. the behaviour before the fix
  (every item retried ``max_attempts`` times, then a transport_error reject each).

Usage: ``python bench/llm_unreachable.py [--items 11] [--no-write]``; appends to
bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import socket
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pydantic import BaseModel  # noqa: E402

import stages.common.llm as llm  # noqa: E402

RESULTS = ROOT / "bench" / "RESULTS.md"


class Verdict(BaseModel):
    relevant: bool


def closed_port() -> int:
    with socket.socket() as probe:  # bound, never listening: connections are refused
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run(items: int, limit: int) -> tuple[float, str]:
    llm.UNREACHABLE_LIMIT = limit
    params = llm.LLMParams(model="gpt-4o-2024-08-06", temperature=0.0, max_tokens=300,
                           prices={"input_per_1m": 2.5, "output_per_1m": 10.0},
                           base_url=f"http://127.0.0.1:{closed_port()}/v1",
                           cache_dir=tempfile.mkdtemp(prefix="bench-unreachable-"))
    requests = [llm.LLMRequest([{"role": "user", "content": f"item {i}"}], Verdict, f"i{i}")
                for i in range(items)]
    start = time.perf_counter()
    try:
        results, accounting = llm.run_batch(params, requests)
        outcome = (f"{sum(r.error == 'transport_error' for r in results)} transport_error rejects, "
                   f"{accounting.transport_retries} retries")
    except llm.FatalLLMError as exc:
        outcome = f"FatalLLMError: {str(exc)[:70]}…"
    return time.perf_counter() - start, outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=11)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("OPENAI_API_KEY", "sk-bench-placeholder")
    shipped = llm.UNREACHABLE_LIMIT
    rows = [("fail fast", *run(args.items, shipped)), ("retry all", *run(args.items, 10 ** 9))]
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"\n## {stamp} — unreachable LLM endpoint (`bench/llm_unreachable.py`)\n",
             f"{args.items} requests, connection refused, production client defaults; "
             f"{platform.node()}, {os.cpu_count()} cores.\n",
             "| client | seconds until the stage stops | outcome |", "|---|---|---|"]
    lines += [f"| {name} | {seconds:.1f} | {outcome} |" for name, seconds, outcome in rows]
    print("\n".join(lines))
    if not args.no_write:
        with RESULTS.open("a", encoding="utf-8") as handle:
            handle.write("\n".join(lines) + "\n")
        print(f"appended to {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
