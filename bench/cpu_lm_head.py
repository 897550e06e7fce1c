#!/usr/bin/env python
"""Benchmark of trl's fused lm_head on CPU by vocabulary tile width (a benchmark, not a test).

    python bench/cpu_lm_head.py [--tokens 140 670 1400] [--chunks 32768 8192 4096 2048 1024]
                                [--repeats 4] [--no-append]

What a training step of the quickstart pays for the loss: ``trl.kernels.chunked_logprob``'s
``ChunkedLogProbFunction`` (the function trl's fused lm_head calls, with the per-token entropy,
mean logit and top-1 outputs trl's metrics request), forward and backward, for ``--tokens``
labelled positions of hidden size 64 against Qwen2's 151,646-row lm_head in bf16 under CPU
autocast, as ``train`` runs it. On CPU trl folds each ``[tokens x chunk]`` tile with ~12
elementwise torch passes; ``chunk`` is trl's ``_CHUNKED_LOGPROB_CHUNK_SIZE`` (32,768, sized for
its GPU kernels) or ``stages.train.CPU_LOGPROB_CHUNK``. The first repeat of each cell is
dropped (allocation warm-up); the table gives the median of the rest. Tokens per step in the
quickstart: ~140 (batch 2 of KRX answers) to ~700 (v3's report summaries).

Prints a table and appends a dated section to ``bench/RESULTS.md``.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from trl.kernels.chunked_logprob import ChunkedLogProbFunction  # noqa: E402

from stages.train import CPU_LOGPROB_CHUNK  # noqa: E402

VOCAB, HIDDEN = 151_646, 64
OUTPUTS = ("entropy", "mean_logits", "is_top1")  # what trl's SFT metrics ask the kernel for


def step_seconds(tokens: int, chunk: int, repeats: int, weight: torch.Tensor) -> float:
    """Median seconds of one forward + backward (first repeat dropped)."""
    targets = torch.randint(0, VOCAB, (tokens,))
    times = []
    for _ in range(repeats + 1):
        hidden = torch.randn(tokens, HIDDEN, requires_grad=True)
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logprobs, *_ = ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, chunk,
                                                        None, 1.0, OUTPUTS)
        (-logprobs.sum()).backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[140, 670, 1400])
    parser.add_argument("--chunks", type=int, nargs="+", default=[32768, 8192, 4096, 2048, 1024])
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()

    torch.manual_seed(0)
    weight = (torch.randn(VOCAB, HIDDEN) * 0.02).to(torch.bfloat16)
    header = "| labelled tokens | " + " | ".join(
        f"chunk {c:,}" + (" (train's)" if c == CPU_LOGPROB_CHUNK else "") for c in args.chunks) + " |"
    lines = [header, "|---|" + "---|" * len(args.chunks)]
    for tokens in args.tokens:
        cells = [step_seconds(tokens, chunk, args.repeats, weight) for chunk in args.chunks]
        lines.append(f"| {tokens} | " + " | ".join(f"{s:.3f} s" for s in cells) + " |")
        print(lines[-1], flush=True)
    machine = (f"Machine: {os.cpu_count()} CPUs, {platform.machine()}; Python {platform.python_version()}, "
               f"torch {torch.__version__}, {torch.get_num_threads()} threads. Forward + backward of "
               f"trl's ChunkedLogProbFunction, hidden {HIDDEN}, vocabulary {VOCAB:,} (bf16, CPU "
               f"autocast), median of {args.repeats} after one warm-up.")
    table = "\n".join(lines)
    print(table)
    if not args.no_append:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        with open(REPO / "bench" / "RESULTS.md", "a", encoding="utf-8") as out:
            out.write(f"\n## trl's fused lm_head on CPU by tile width — {stamp} (`bench/cpu_lm_head.py`)\n\n"
                      f"{machine}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
