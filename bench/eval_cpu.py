#!/usr/bin/env python
"""Benchmark of evaluate@<key> on CPU (a benchmark, not a test): items/s by batch size.

    python bench/eval_cpu.py [--items 256] [--batch-sizes 1 8 32] [--sizes tiny small] [--no-append]

Model: the quickstart's tiny Qwen2 (``data/samples/quickstart.params.yaml`` ``base_model.build``:
random weights, byte-level BPE tokenizer trained on the sample texts) built with
``stages.base_model``; ``small`` is the same architecture at hidden 256 / 4 layers for a sense
of scale. Items: the sample eval sets (``data/samples/eval``, 4-7 choices) cycled to
``--items`` items, each given its own id (so each gets its own shuffled permutation).

Measured in-process with the stage's own functions (``stages.evaluate``), imports and model
load excluded: log-likelihood scoring (one forward pass per item, the stage's default) with
and without the shuffled-options pass, and two-step generation (greedy, 32 solution tokens +
4 letter tokens). items/s counts items scored (a shuffled run scores each item twice but
counts it once, as the stage's metrics do not). Prints a table and appends a dated section
to ``bench/RESULTS.md``.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import yaml  # noqa: E402

from stages.base_model import build_tiny_model, build_tokenizer, tiny_model_kwargs  # noqa: E402
from stages.base_model import TinyModelSpec  # noqa: E402
from stages.evaluate import EvaluateSettings, load_params  # noqa: E402
from stages.common.prompts import step1_prompt  # noqa: E402
from stages.sources.evalsets import EvalItem, load_sets  # noqa: E402
from stages.evaluate import chat_text, evaluate_items, score_generate, score_loglik  # noqa: E402

RESULTS = REPO / "bench" / "RESULTS.md"
SAMPLES = REPO / "data" / "samples"


def sample_items(count: int) -> list[EvalItem]:
    params = load_params(None, REPO / "params.yaml").model_dump()
    for spec in params["local"].values():
        spec["input"] = str(SAMPLES / "eval" / Path(spec["input"]).name)
    params.update(local_dir=str(SAMPLES / "eval"), collected={})
    base, _ = load_sets(EvaluateSettings.model_validate(params))
    return [replace(item, id=f"{item.id}-{n}")
            for n, item in zip(range(count), (base[i % len(base)] for i in range(count)))]


def build(size: str):
    overrides = yaml.safe_load((SAMPLES / "quickstart.params.yaml").read_text(encoding="utf-8"))
    spec = TinyModelSpec.model_validate(overrides["base_model"]["build"])
    if size == "small":
        spec = spec.model_copy(update={"hidden_size": 256, "layers": 4, "heads": 8, "kv_heads": 2,
                                       "intermediate": 1024})
    texts = []
    for path in sorted((SAMPLES / "hub" / "KMMLU" / "data").glob("*-train.csv")) + \
            sorted((SAMPLES / "eval").glob("*.jsonl")):
        texts += path.read_text(encoding="utf-8").splitlines()
    tokenizer = build_tokenizer(texts, spec.vocab_size)
    tokenizer.padding_side = "left"
    model = build_tiny_model(tokenizer, **tiny_model_kwargs(spec)).eval()
    return tokenizer, model, sum(p.numel() for p in model.parameters())


def timed(fn) -> tuple[float, float]:
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - start_wall, time.process_time() - start_cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=256)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=["tiny", "small"])
    parser.add_argument("--generate-items", type=int, default=32)
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args(argv)

    items = sample_items(args.items)
    gen_items = items[:args.generate_items]
    rows = []
    prompt_tokens = {}
    load_before = os.getloadavg()[0]
    for size in args.sizes:
        tokenizer, model, n_params = build(size)
        lengths = [len(tokenizer(chat_text(tokenizer, step1_prompt(i.question, i.choices)),
                                 add_special_tokens=False)["input_ids"]) for i in items]
        prompt_tokens[size] = sum(lengths) / len(lengths)
        evaluate_items(items[:8], lambda b: score_loglik(model, tokenizer, b, 8), False, 0)  # warm-up
        for batch in args.batch_sizes:
            for shuffled in (False, True):
                wall, cpu = timed(lambda: evaluate_items(
                    items, lambda b: score_loglik(model, tokenizer, b, batch), shuffled, 0))
                rows.append((size, n_params, "loglik" + (" + shuffled" if shuffled else ""), batch,
                             len(items), wall, len(items) / wall, 1000 * cpu / len(items)))
        wall, cpu = timed(lambda: evaluate_items(
            gen_items, lambda b: score_generate(model, tokenizer, b, 8, 32, 4), False, 0))
        rows.append((size, n_params, "generate (32+4 tokens)", 8, len(gen_items), wall,
                     len(gen_items) / wall, 1000 * cpu / len(gen_items)))
    load_after = os.getloadavg()[0]

    header = ("| model | parameters | scoring | batch | items | wall s | items/s | CPU ms/item |\n"
              "|---|---|---|---|---|---|---|---|")
    lines = [f"| {s} | {p:,} | {mode} | {b} | {n} | {w:.2f} | {ips:.1f} | {cpu:.1f} |"
             for s, p, mode, b, n, w, ips, cpu in rows]
    table = header + "\n" + "\n".join(lines)
    print(table)
    if not args.no_append:
        now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        cpu_name = next((line.split(":", 1)[1].strip() for line in
                         Path("/proc/cpuinfo").read_text().splitlines()
                         if line.startswith("model name")), platform.processor())
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        section = (
            f"\n## evaluate (CPU) — {now}\n\n"
            f"Machine: {os.cpu_count()} CPUs, {cpu_name}; torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {platform.python_version()}. Load "
            f"average before/after: {load_before:.2f} / {load_after:.2f} (other work on the machine "
            f"slows every row alike). Script: `bench/eval_cpu.py` (in-process, model load and "
            f"imports excluded; peak RSS {peak:.0f} MiB).\n"
            f"Items: the sample eval sets (4-7 choices) cycled to {len(items)} items; tiny = the "
            f"quickstart model (`base_model.build`), small = hidden 256 / 4 layers; mean prompt "
            f"length (chat template + step-1 prompt, the samples' BPE vocab of 2048) "
            f"{', '.join(f'{k}: {v:.0f}' for k, v in prompt_tokens.items())} tokens. "
            f"items/s counts items (a shuffled run scores each twice).\n\n{table}\n")
        with RESULTS.open("a", encoding="utf-8") as handle:
            handle.write(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
