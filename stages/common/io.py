"""Atomic, deterministic writers and the readers that go with them.

Every stage output goes through here: a temp file in the destination directory, fsync,
then ``os.replace`` — a killed stage never leaves a half-written file for DVC to cache.
Parquet is written from explicit Arrow schemas with fixed writer options so that the same
records give the same bytes (DVC md5s stay equal across runs and machines).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

# Fixed writer options: deterministic bytes for the pinned pyarrow version.
_PARQUET_OPTIONS = dict(compression="zstd", compression_level=3, use_dictionary=True,
                        write_statistics=True, version="2.6")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success rename it over ``path``, else delete it."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix or ".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as handle:
            os.fsync(handle.fileno())
        # mkstemp creates 0600; outputs should be as readable as ordinary files.
        os.chmod(tmp_path, 0o644)
        os.replace(tmp_path, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def write_parquet(table: pa.Table, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, **_PARQUET_OPTIONS)


def write_records(records: list[dict[str, Any]], schema: pa.Schema, path: str | os.PathLike) -> None:
    """Write records (already validated) under an explicit schema; no pandas metadata."""
    write_parquet(pa.Table.from_pylist(records, schema=schema), path)


def open_parquet_writer(path: str | os.PathLike, schema: pa.Schema) -> pq.ParquetWriter:
    """A streaming writer with the same fixed options as :func:`write_parquet`.

    For outputs too large to hold in memory: write record batches as they come, into the
    temp path of :func:`atomic_path`, and ``close()`` before the context exits. Row-group
    boundaries follow the ``write_table`` calls, so flush at fixed record counts to keep
    the bytes deterministic.
    """
    return pq.ParquetWriter(path, schema, **_PARQUET_OPTIONS)


def iter_record_batches(path: str | os.PathLike, batch_size: int) -> Iterator[pa.RecordBatch]:
    """The rows of a Parquet file in batches of at most ``batch_size``, one row group at a
    time: a fresh ``iter_batches`` per row group.

    Not one ``ParquetFile.iter_batches`` over the whole file: that keeps what it has decoded
    in Arrow's memory pool until the iterator is exhausted (measured: 176 MiB held after 300k
    rows of text in 300 row groups, against <= 3 MiB this way), which made a mixture's peak
    memory grow with its input. Not ``read_row_group`` either: within one large row group
    (``write_parquet`` writes up to 1Mi rows per group) it holds the compressed and decoded
    group at once (176 MiB against 92 MiB on 100k rows in one group).
    """
    parquet = pq.ParquetFile(path)
    for index in range(parquet.num_row_groups):
        yield from parquet.iter_batches(batch_size=batch_size, row_groups=[index])


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    return pq.read_table(path).to_pylist()


def dumps_json(obj: Any) -> str:
    """Canonical JSON: UTF-8 (Korean stays readable), sorted keys, trailing newline."""
    return json.dumps(obj, ensure_ascii=False, indent=2, sort_keys=True) + "\n"


def write_json(obj: Any, path: str | os.PathLike) -> None:
    write_text(dumps_json(obj), path)


def write_text(text: str, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build a directory output in a temp sibling, then swap it in whole.

    The old directory (if any) is moved aside and removed only after the new one is in
    place, so readers see either the complete old or the complete new directory.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old.{os.getpid()}")
        os.replace(target, old)
    os.replace(tmp, target)
    # mkdtemp creates 0700; outputs should be as readable as ordinary files.
    os.chmod(target, 0o755)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
