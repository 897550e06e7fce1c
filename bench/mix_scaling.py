#!/usr/bin/env python
"""Benchmark of mix@<version> (a benchmark, not a test): time and peak memory vs size.

    python bench/mix_scaling.py [--sizes 10000 100000 1000000] [--no-append]

For each size N it writes N synthetic examples' worth of input (two qa sources of N/2
records each: random Hangul words, 40–200 characters per question and answer, a planted
near-duplicate every 1,000 records and one eval item leaked every 10,000) under a temp
workspace laid out like the repository, with a tokenizer trained by
``stages.base_model.build_tokenizer`` and production ``params.yaml`` whose ``mix`` section
is replaced by one recipe (both sources, fraction 1.0, production dedup/decontamination
settings, max_length 2048). Then it runs ``python -m stages.mix bench`` as dvc.yaml does,
in a fresh wrapper process per size so that ``ru_maxrss`` of its children is that run's
peak RSS, and reads the stage's own timer from its metrics.

Targets (issue 4 §6): time grows linearly (seconds per 1k examples flat), peak RSS at 1M
≤ 2× that at 100k. Prints a table and appends a dated section to ``bench/RESULTS.md``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stages.base_model import build_tokenizer  # noqa: E402
from stages.common.io import open_parquet_writer  # noqa: E402
from stages.mixing.recipe import mix_source_input  # noqa: E402
from stages.common.schema import SCHEMAS  # noqa: E402

SOURCES = ("krx_sample", "metamath")
WRITE_BATCH = 50_000
EVAL_QUESTION = "국채 수익률 곡선이 역전되었을 때 시장이 예상하는 것으로 흔히 해석되는 것은?"
EVAL_CHOICES = ["향후 경기 둔화와 정책금리 인하", "급격한 인플레이션 가속", "중앙은행의 연속적인 금리 인상",
                "기업 이익의 빠른 증가"]


def make_vocabulary(rng: np.random.Generator, size: int = 20_000) -> np.ndarray:
    """Random Hangul "words" of 2–4 syllables: the vocabulary the synthetic texts use."""
    word_len = rng.integers(2, 5, size=size)
    chars = rng.integers(0xAC00, 0xD7A4, size=int(word_len.sum()), dtype=np.uint32)
    flat = chars.astype("<u4").tobytes().decode("utf-32-le")
    cut = np.concatenate([[0], np.cumsum(word_len)])
    return np.array([flat[cut[i]:cut[i + 1]] for i in range(size)], dtype=object)


VOCABULARY = make_vocabulary(np.random.default_rng(12345))


def syllable_words(rng: np.random.Generator, count: int, words: tuple[int, int]) -> list[str]:
    """``count`` texts of ``words`` words each, drawn Zipf-like from the vocabulary (frequent
    words are few, as in real text, so the tokenizer trained on them compresses like BPE
    does on real Korean)."""
    lengths = rng.integers(words[0], words[1], size=count)
    picks = (len(VOCABULARY) * rng.random(int(lengths.sum())) ** 3).astype(np.int64)
    chosen = VOCABULARY[picks]
    cut = np.concatenate([[0], np.cumsum(lengths)])
    return [" ".join(chosen[cut[i]:cut[i + 1]]) for i in range(count)]


def write_source(path: Path, source: str, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = open_parquet_writer(path, SCHEMAS["qa"])
    done = 0
    while done < n:
        size = min(WRITE_BATCH, n - done)
        questions = syllable_words(rng, size, (12, 40))
        answers = syllable_words(rng, size, (12, 40))
        for k in range(size):
            index = done + k
            if index % 1000 == 999:  # near-duplicate of the previous record
                questions[k] = questions[k - 1] + " 다시"
                answers[k] = answers[k - 1]
            if index % 10000 == 5000:  # a leaked evaluation question
                questions[k] = EVAL_QUESTION + " " + " / ".join(EVAL_CHOICES)
        rows = [{"id": f"{seed:02d}{done + k:014x}", "source": source, "domain": "", "split": "train",
                 "question": q, "answer": a, "context": "", "category": "", "meta": "{}"}
                for k, (q, a) in enumerate(zip(questions, answers))]
        writer.write_table(pa.Table.from_pylist(rows, schema=SCHEMAS["qa"]))
        done += size
    writer.close()


def make_workspace(root: Path, n: int, tokenizer_dir: Path) -> None:
    for i, source in enumerate(SOURCES):
        write_source(root / mix_source_input(source), source, n // len(SOURCES), seed=i + 1)
    kmmlu = [{"id": "evalitem1", "source": "kmmlu_economics", "domain": "", "split": "test",
              "question": EVAL_QUESTION, "choices": EVAL_CHOICES, "answer": 0,
              "category": "", "meta": "{}"}]
    for subject in ("kmmlu_economics", "kmmlu_accounting", "kmmlu_taxation"):
        pq.write_table(pa.Table.from_pylist(kmmlu, schema=SCHEMAS["mcq"]),
                       root / f"data/collected/{subject}.parquet")
    shutil.copytree(tokenizer_dir, root / "models/base", dirs_exist_ok=True)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    raw["evaluate"]["local"] = {}
    raw["versions"] = {"bench": {"mix": {"seed": 1, "sources": {s: {"format": "prompt_answer"}
                                                                 for s in SOURCES}},
                                 "train": {"init_from": "base"}}}
    (root / "params.yaml").write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")


WRAPPER = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
           "r = subprocess.run(sys.argv[1:]); "
           "print(r.returncode, time.perf_counter() - t, "
           "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def run_stage(root: Path) -> dict:
    cmd = [sys.executable, "-m", "stages.mix", "bench", "--tokenizer", "models/base",
           "--inputs", *[mix_source_input(s) for s in SOURCES],
           "--out", "data/mixtures/bench.parquet", "--manifest", "data/mixtures/bench.json",
           "--rejects", "data/rejects/mix/bench.parquet", "--metrics", "metrics/mix/bench.json",
           "--log", "logs/mix/bench.log"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), TRANSFORMERS_OFFLINE="1", HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], cwd=root, env=env,
                         capture_output=True, text=True)
    code, wall, rss_kib = out.stdout.strip().splitlines()[-1].split()
    if code != "0":
        raise SystemExit(f"stage failed:\n{out.stderr[-3000:]}")
    metrics = json.loads((root / "metrics/mix/bench.json").read_text(encoding="utf-8"))
    return {"wall": float(wall), "rss_mib": int(rss_kib) / 1024, "metrics": metrics}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    corpus = syllable_words(rng, 3000, (12, 40)) + [EVAL_QUESTION] * 10
    tokenizer = build_tokenizer(corpus, 4000)
    results = ROOT / "bench" / "RESULTS.md"
    header = ("| examples in | examples out | rejected | tokens | stage s | s per 1k | wall s "
              "(with start-up) | peak RSS MiB | RSS vs 100k |\n|---|---|---|---|---|---|---|---|---|")
    if not args.no_append:  # the header first, then one row per size as it finishes: a long
        append(results, section_intro(os.getloadavg()[0]) + header + "\n")  # 1M run is never lost
    rows = []
    with tempfile.TemporaryDirectory(prefix="mix-bench-") as tmp:
        tokenizer_dir = Path(tmp) / "tokenizer"
        tokenizer.save_pretrained(tokenizer_dir)
        for n in args.sizes:
            root = Path(tmp) / f"n{n}"
            started = time.perf_counter()
            make_workspace(root, n, tokenizer_dir)
            setup = time.perf_counter() - started
            result = run_stage(root)
            shutil.rmtree(root)
            rows.append({"n": n, "setup_s": setup, **result})
            m = result["metrics"]
            base = next((r for r in rows if r["n"] == 100_000), None)
            ratio = f"{result['rss_mib'] / base['rss_mib']:.2f}×" if base else "–"
            row = (f"| {n:,} | {m['examples']:,} | {sum(m['rejected'].values()):,} | "
                   f"{m['tokens']:,} | {m['seconds']:.1f} | {1000 * m['seconds'] / n:.2f} | "
                   f"{result['wall']:.1f} | {result['rss_mib']:.0f} | {ratio} |")
            print(row, f"(load average now {os.getloadavg()[0]:.2f})", flush=True)
            if not args.no_append:
                append(results, row + "\n")


def section_intro(load: float) -> str:
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"\n## mix — {now} (`bench/mix_scaling.py`)\n\n"
            f"Machine: {os.cpu_count()} CPUs, {cpu}; Python {platform.python_version()}. "
            f"Load average at start: {load:.2f} (other work on the machine inflates seconds, not "
            "RSS; rows are appended as each size finishes).\n"
            "Input: two qa sources of N/2 synthetic records (Hangul words drawn Zipf-like from a "
            "20k vocabulary, 12–40 words per field, a near-duplicate every 1,000, an eval item "
            "every 10,000); recipe = production mix settings (max_length 2048, MinHash 64 perms / "
            "16 bands, 13-char n-gram decontamination), tokenizer = build_tokenizer(vocab 4000) "
            "with Qwen2's chat template. `stage s` = the stage's own timer; peak RSS = ru_maxrss "
            "of the stage process. Targets: s per 1k flat (linear time), RSS at 1M ≤ 2× RSS at "
            "100k.\n\n")


def append(path: Path, text: str) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(text)

if __name__ == "__main__":
    main()
