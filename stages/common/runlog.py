"""Run bookkeeping shared by every stage: logging, metrics JSON, progress bars, clean failure.

A stage's ``main()`` is wrapped by :func:`stage_main`: expected failures (bad params, a
missing input, a reject rate above threshold) raise :class:`StageError` and end with one
clear message and exit code 2, never a traceback halfway through writing outputs.
"""
from __future__ import annotations

import argparse
import functools
import logging
import os
import warnings
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

from tqdm import tqdm

from stages.common.io import write_json
from stages.common.params import PARAMS_FILE, ParamsError

T = TypeVar("T")


class StageError(Exception):
    """An expected, user-facing failure: the message says what and where (param, path)."""


# Third-party messages known to be harmless in this pipeline, each matched exactly, so that a
# run's output shows only what matters (any other warning still prints):
# - transformers 5 renamed gradient checkpointing to activation checkpointing; peft, trl and the
#   SFTConfig keys this project maps one-to-one still use the old names, which work until v6;
# - bitsandbytes tries the optional `kernels` package for a faster CPU 4-bit matmul and falls
#   back to its own (correct) kernel when it is not installed;
# - transformers' checkpoint sorting notes that mtimes are coarse and sorts by step number.
KNOWN_HARMLESS_WARNINGS = (
    r"`(is_)?gradient_checkpointing(_enable|_kwargs)?` is deprecated and will be removed in v6",)
KNOWN_HARMLESS_LOGS = {
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community",
    "transformers.trainer_utils": "mtime may not be reliable on this filesystem",
}


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_known_warnings() -> None:
    """Silence exactly the messages above (idempotent); off a terminal, also the hub's,
    transformers' ("Loading weights …") and datasets' progress bars (trl's "Building labels
    for train dataset", "Truncating …", "Dropping fully masked examples …", six per training
    run), which only fill logs there."""
    if not sys.stderr.isatty():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # read at its import
        hub = sys.modules.get("huggingface_hub")
        if hub is not None:
            hub.utils.disable_progress_bars()
        datasets = sys.modules.get("datasets")
        if datasets is not None and hasattr(datasets, "disable_progress_bars"):
            datasets.disable_progress_bars()
    for pattern in KNOWN_HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=FutureWarning)
    for name, prefix in KNOWN_HARMLESS_LOGS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropMessage(prefix))


def setup_logging(log_path: str | Path | None, name: str) -> logging.Logger:
    quiet_known_warnings()
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    logger.handlers.clear()
    logger.propagate = False
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    logger.addHandler(console)
    if log_path is not None:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_path, mode="w", encoding="utf-8")
        handler.setFormatter(fmt)
        logger.addHandler(handler)
    return logger


def progress(items: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """A progress bar on stderr; quiet when stderr is not a terminal (CI logs stay short)."""
    return iter(tqdm(items, desc=desc, total=total, unit="it", leave=False,
                     disable=not sys.stderr.isatty(), mininterval=0.5))


class Timer:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return round(time.perf_counter() - self.start, 3)


def write_metrics(path: str | Path, metrics: dict[str, Any]) -> None:
    """Metrics JSON (declared as DVC metrics, ``cache: false``): counts, tokens, cost, seconds."""
    write_json(metrics, path)


def require_input(path: str | Path, param: str, hint: str = "", directory: bool = False) -> Path:
    """An input file (or, with ``directory``, a directory) that must exist, or the stage's
    one-line error naming the param and the path."""
    path = Path(path)
    if not (path.is_dir() if directory else path.is_file()):
        what = "is not a directory" if directory and path.exists() else \
            "is a directory, not a file" if path.is_dir() else "does not exist"
        raise StageError(f"{param}: input {path} {what}" + (f" ({hint})" if hint else ""))
    return path


def check_reject_rate(rejected: int, total: int, threshold: float, what: str) -> None:
    """Fail the stage when more than ``threshold`` of ``total`` inputs were rejected."""
    if total and rejected / total > threshold:
        raise StageError(f"{what}: {rejected} of {total} records rejected "
                         f"({rejected / total:.1%}) > max_reject_rate {threshold:.1%}; "
                         "see the rejects file for reasons")


def stage_parser(doc: str | None, key: str | None = None, key_help: str | None = None,
                 rejects: bool = True, out_help: str | None = None,
                 cache_dir: bool = False) -> argparse.ArgumentParser:
    """The command line every stage shares (dvc.yaml writes it): the foreach key when the
    stage has one, then ``--out``, ``--rejects``, ``--metrics``, ``--log``, ``--params`` and,
    for an LLM stage, ``--cache-dir`` (its response cache, a persistent DVC out).
    A stage adds its own options to the parser it gets back."""
    parser = argparse.ArgumentParser(description=doc.strip().splitlines()[0] if doc else None)
    if key:
        parser.add_argument(key, help=key_help)
    parser.add_argument("--out", required=True, help=out_help)
    if rejects:
        parser.add_argument("--rejects", required=True, help="reject records (Parquet)")
    parser.add_argument("--metrics", required=True, help="metrics JSON")
    parser.add_argument("--log", required=True, help="log file")
    parser.add_argument("--params", default=PARAMS_FILE, help="params file (default: %(default)s)")
    if cache_dir:
        parser.add_argument("--cache-dir", required=True, help="LLM response cache directory")
    return parser


def begin_stage(args: argparse.Namespace, stage: str, key: str | None,
                load: Callable[[Any, str], T]) -> tuple[T, logging.Logger, "Timer"]:
    """The start of a stage run: its timer, its params (``load(key, params_path)``, the
    stage's own reader) and its log ``<stage>@<key>``."""
    timer = Timer()
    section = load(key, args.params)
    log = setup_logging(args.log, f"{stage}@{key}" if key else stage)
    return section, log, timer


def run_and_exit(main: Callable[[], Any]) -> None:
    """``python -m stages.<stage>`` for the stages that load torch: ``main()``, then the end
    of the process without the interpreter's teardown. Tearing down the ~3,000 modules of
    torch, transformers, peft and trl takes 1.4-1.7 s per process on 2 cores (17 such
    processes in the quickstart: bench/RESULTS.md), and none of it is the stage's: its
    outputs are written (atomically) and closed when ``main`` returns. stdout, stderr and the
    log handlers are flushed first; a failure (an exception, ``SystemExit``) leaves the
    ordinary way."""
    main()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    logging.shutdown()
    os._exit(0)


def stage_main(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn expected failures into a one-line error and exit code 2."""
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (StageError, ParamsError) as exc:
            settle = getattr(exc, "settle", None)   # the budget cap: its log line, once
            if settle is not None:
                settle()
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
    return wrapper
