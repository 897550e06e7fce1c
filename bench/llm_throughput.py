"""Throughput of the LLM layer against the local OpenAI-compatible server (a benchmark, not a test).

Scenarios (the server runs in its own process, so the client's CPU time is its own):

1. bare   — ``AsyncOpenAI`` + ``asyncio.Semaphore``, nothing else: the reference loop.
2. layer  — :class:`stages.common.llm.LLMClient` (schema validation, cache writes, limiter
            hooks), same server, same requests. Targets: ≥ 90 % of the ceiling
            ``concurrency / mean latency`` and ≥ 95 % of the bare loop.
3. rpm    — server caps requests at ``--rpm`` per minute (429 above it), the client's ``rpm``
            param is set to the same value. Target: achieved rate within 5 % of the cap.
4. faults — 5 % 429 (retry-after-ms 200) and 5 % 500 injected. Target: 100 % of items done.

Each scenario prints a row; the table is appended, with the machine, to bench/RESULTS.md.
Usage: ``python bench/llm_throughput.py [--n 2000] [--concurrency 100] [--latency 1.0]``.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx2  # noqa: E402
import openai  # noqa: E402
from pydantic import BaseModel  # noqa: E402

from stages.common.llm import LLMClient, LLMParams, LLMRequest, response_format_for  # noqa: E402
from tests.llm_server import ServerProcess  # noqa: E402

RESULTS = ROOT / "bench" / "RESULTS.md"
RESULTS_HEADER = "# Benchmark results (appended by the scripts in bench/; newest last)\n"


class Verdict(BaseModel):
    answer: str
    relevant: bool


def messages(i: int) -> list[dict[str, str]]:
    return [{"role": "system", "content": "다음 문항이 금융시장에 관한 것인지 판정하라."},
            {"role": "user", "content": f"문항 {i}: 코스피200 선물의 증거금 제도에 대해 설명하시오."}]


@dataclass
class Row:
    scenario: str
    items: int
    done: int
    wall_s: float
    cpu_s: float
    measure: str
    target: str
    passed: Optional[bool]
    server: dict[str, Any]

    @property
    def rate(self) -> float:
        return self.done / self.wall_s

    @property
    def cpu_ms(self) -> float:
        return 1000 * self.cpu_s / self.items


def timed(coro_factory) -> tuple[Any, float, float]:
    """Run a coroutine in a fresh loop; return (value, wall seconds, CPU seconds)."""
    cpu0, wall0 = time.process_time(), time.perf_counter()
    value = asyncio.run(coro_factory())
    return value, time.perf_counter() - wall0, time.process_time() - cpu0


def run_bare(base_url: str, n: int, concurrency: int):
    fmt = response_format_for(Verdict)

    async def main() -> int:
        http = openai.DefaultAsyncHttpxClient(
            limits=httpx2.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency),
            timeout=120)
        client = openai.AsyncOpenAI(base_url=base_url, max_retries=0, timeout=120, http_client=http)
        semaphore = asyncio.Semaphore(concurrency)

        async def one(i: int) -> bool:
            async with semaphore:
                completion = await client.chat.completions.create(
                    model="bench-model", messages=messages(i), response_format=fmt,
                    temperature=0.0, top_p=1.0, max_tokens=64)
                return completion.choices[0].message.content is not None
        try:
            done = await asyncio.gather(*(one(i) for i in range(n)))
        finally:
            await client.close()
        return sum(done)
    return main


def run_layer(base_url: str, n: int, concurrency: int, cache_dir: str, **extra: Any):
    params = LLMParams(model="bench-model", base_url=base_url, temperature=0.0, max_tokens=64,
                       concurrency=concurrency, prices={"input_per_1m": 2.5, "output_per_1m": 10},
                       cache_dir=cache_dir, **extra)

    async def main() -> tuple[int, dict[str, Any]]:
        async with LLMClient(params) as llm:
            results = await llm.run_many([LLMRequest(messages(i), Verdict, f"q{i}") for i in range(n)])
            return sum(r.ok for r in results), llm.accounting.as_metrics()
    return main


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = "unknown RAM"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                ram = f"{int(line.split()[1]) / 1024 ** 2:.1f} GiB RAM"
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"nproc {cores}, {cpu}, {ram}; Python {platform.python_version()}, "
            f"openai {openai.__version__}, {platform.system()} {platform.release()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--latency", type=float, default=1.0)
    parser.add_argument("--jitter", type=float, default=0.2)
    parser.add_argument("--rpm", type=int, default=3000)
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    os.environ.setdefault("OPENAI_API_KEY", "sk-bench-local-only")
    n, concurrency = args.n, args.concurrency
    ceiling = concurrency / args.latency
    server_config = dict(latency=args.latency, jitter=args.jitter, seed=1)
    rows: list[Row] = []

    def report(row: Row) -> None:
        rows.append(row)
        print(f"{row.scenario:<8} {row.done}/{row.items} done in {row.wall_s:6.1f}s  "
              f"{row.rate:7.1f} items/s  cpu {row.cpu_ms:5.2f} ms/item  {row.measure}  "
              f"target {row.target}: {'ok' if row.passed else 'MISSED' if row.passed is False else '-'}  "
              f"server {row.server['status']}", flush=True)

    with tempfile.TemporaryDirectory(prefix="llm-bench-") as tmp:
        with ServerProcess.start(**server_config) as server:
            done, wall, cpu = timed(run_bare(server.base_url, n, concurrency))
            bare_rate = done / wall
            report(Row("bare", n, done, wall, cpu, f"{bare_rate / ceiling:.1%} of ceiling {ceiling:.0f}/s",
                       "reference", None, server.stats()))
        with ServerProcess.start(**server_config) as server:
            (done, _), wall, cpu = timed(run_layer(server.base_url, n, concurrency, f"{tmp}/layer"))
            rate = done / wall
            passed = rate >= 0.90 * ceiling and rate >= 0.95 * bare_rate and done == n
            report(Row("layer", n, done, wall, cpu,
                       f"{rate / ceiling:.1%} of ceiling, {rate / bare_rate:.1%} of bare",
                       "≥90% ceiling, ≥95% bare", passed, server.stats()))
        with ServerProcess.start(**server_config, rpm_cap=args.rpm) as server:
            (done, _), wall, cpu = timed(run_layer(server.base_url, n, concurrency, f"{tmp}/rpm",
                                                   rpm=args.rpm))
            achieved = done / wall * 60
            report(Row("rpm", n, done, wall, cpu,
                       f"{achieved:.0f} rpm vs cap {args.rpm} ({achieved / args.rpm - 1:+.1%})",
                       "within 5% of cap", abs(achieved / args.rpm - 1) <= 0.05 and done == n,
                       server.stats()))
        with ServerProcess.start(**server_config, fault_rates={"429": 0.05, "500": 0.05}) as server:
            (done, metrics), wall, cpu = timed(run_layer(server.base_url, n, concurrency, f"{tmp}/faults"))
            report(Row("faults", n, done, wall, cpu,
                       f"{done / n:.1%} completed, {metrics['transport_retries']} retries",
                       "100% completed", done == n, server.stats()))

    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"\n## {stamp} — LLM layer throughput (`bench/llm_throughput.py`)\n",
             f"Machine: {machine()}.  ",
             f"Server: separate process on 127.0.0.1, latency {args.latency:g} s ± {args.jitter:g} "
             f"(uniform); {n} requests per scenario, concurrency {concurrency}; ceiling = "
             f"concurrency / latency = {ceiling:.0f} items/s. bare = `AsyncOpenAI` with SDK "
             "defaults (httpx transport, `chat.completions.create`) + semaphore; the layer uses "
             "the SDK's aiohttp transport and `client.post` (fewer client CPU ms per request), "
             "and also validates, caches (fsync) and accounts every answer.\n",
             "| scenario | done | wall s | items/s | measure | target | met | client CPU ms/item | server replies |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        met = "yes" if row.passed else "NO" if row.passed is False else "—"
        statuses = ", ".join(f"{k}: {v}" for k, v in row.server["status"].items())
        lines.append(f"| {row.scenario} | {row.done}/{row.items} | {row.wall_s:.1f} | {row.rate:.1f} | "
                     f"{row.measure} | {row.target} | {met} | {row.cpu_ms:.2f} | {statuses} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        if not RESULTS.exists():
            RESULTS.write_text(RESULTS_HEADER, encoding="utf-8")
        with RESULTS.open("a", encoding="utf-8") as handle:  # other benchmarks append too
            handle.write(text)
        print(f"appended to {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
