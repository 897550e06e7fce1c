"""Local files: csv / tsv / json / jsonl / parquet / xlsx, with an explicit encoding.

Why not ``pandas.read_csv`` for CSV: it either raises on the first malformed line or skips
it silently; the stdlib ``csv`` reader lets every malformed line become a reject with its
line number, and handles BOMs, CRLF and quoted newlines correctly.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any

from stages.sources.spec import LocalSpec
from stages.common.runlog import StageError
from stages.sources import BadRow, RawRow, Rows

SUFFIX_FORMATS = {".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "jsonl",
                  ".ndjson": "jsonl", ".parquet": "parquet", ".xlsx": "xlsx"}


def detect_format(path: str, spec: LocalSpec, param: str) -> str:
    if spec.format:
        return spec.format
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIX_FORMATS:
        raise StageError(f"cannot tell the format of {path!r} from its suffix; set {param}.local.format "
                         f"to one of {sorted(set(SUFFIX_FORMATS.values()))}")
    return SUFFIX_FORMATS[suffix]


def decode(data: bytes, encoding: str, path: str, param: str) -> str:
    """Decode strictly: a wrong encoding is an error for the whole input, never mojibake."""
    codec = "utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding
    try:
        return data.decode(codec)
    except LookupError:
        raise StageError(f"{param}.local.encoding={encoding!r} is not a known encoding") from None
    except UnicodeDecodeError as exc:
        hint = " (Korean public data is often cp949/euc-kr)" if "utf" in codec else ""
        raise StageError(f"{path}: cannot decode with {param}.local.encoding={encoding!r} at byte "
                         f"{exc.start}{hint}") from None


def _clean_cell(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def parse_delimited(text: str, delimiter: str, split: str) -> Rows:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    out = Rows()
    try:
        header = next(reader)
    except StopIteration:
        return out
    header = [h.strip() for h in header]
    out.columns = header
    while True:
        start_line = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:  # e.g. an unterminated quote swallowing the rest
            out.bad.append(BadRow(f"line {start_line}", "malformed_row", str(exc)))
            break
        if not cells or all(not c.strip() for c in cells):
            continue  # blank line: not a record
        if len(cells) != len(header):
            out.bad.append(BadRow(f"line {start_line}", "malformed_row",
                                  f"{len(cells)} fields, header has {len(header)}", cells))
            continue
        out.rows.append(RawRow(f"line {start_line}", split, dict(zip(header, cells))))
    return out


def _dig(document: Any, dotted: str | None, path: str, param: str) -> Any:
    if not dotted:
        return document
    node = document
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise StageError(f"{path}: {param}.local.records_key={dotted!r} not found in the JSON")
        node = node[part]
    return node


def parse_json(text: str, spec: LocalSpec, path: str, param: str) -> Rows:
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StageError(f"{path}: not valid JSON ({exc}); for one object per line set "
                         f"{param}.local.format=jsonl") from None
    records = _dig(document, spec.records_key, path, param)
    if not isinstance(records, list):
        raise StageError(f"{path}: expected a list of records"
                         + (f" at {spec.records_key!r}" if spec.records_key else
                            f"; set {param}.local.records_key to the key holding the list"))
    out = Rows()
    for index, record in enumerate(records):
        item = f"record {index}"
        if isinstance(record, dict):
            out.rows.append(RawRow(item, spec.split, record))
        else:
            out.bad.append(BadRow(item, "not_an_object", f"got {type(record).__name__}", record))
    return out


def parse_jsonl(text: str, split: str) -> Rows:
    out = Rows()
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        item = f"line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            out.bad.append(BadRow(item, "malformed_json", str(exc), line[:500]))
            continue
        if isinstance(record, dict):
            out.rows.append(RawRow(item, split, record))
        else:
            out.bad.append(BadRow(item, "not_an_object", f"got {type(record).__name__}", record))
    return out


def read_local(path: str, spec: LocalSpec, param: str) -> Rows:
    """Read one local file into raw rows. ``param`` is the params path (for messages)."""
    if not os.path.exists(path):
        raise StageError(f"{param}.input: file not found: {path}")
    if os.path.isdir(path):
        raise StageError(f"{param}.input: {path} is a directory, expected a file")
    fmt = detect_format(path, spec, param)
    if fmt == "parquet":
        import pyarrow.parquet as pq
        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow raises several types for a bad file
            raise StageError(f"{path}: not a readable Parquet file ({exc})") from None
        rows = Rows(columns=table.column_names)
        for index, record in enumerate(table.to_pylist()):
            rows.rows.append(RawRow(f"row {index}", spec.split, record))
        return rows
    if fmt == "xlsx":
        import pandas as pd
        try:
            frame = pd.read_excel(path, sheet_name=spec.sheet, dtype=object)
        except ValueError as exc:  # missing sheet
            raise StageError(f"{path}: {param}.local.sheet={spec.sheet!r}: {exc}") from None
        except Exception as exc:
            raise StageError(f"{path}: not a readable xlsx file ({exc})") from None
        rows = Rows(columns=[str(c).strip() for c in frame.columns])
        for index, record in enumerate(frame.to_dict(orient="records")):
            values = {str(k).strip(): _clean_cell(v) for k, v in record.items()}
            if all(v is None for v in values.values()):
                continue
            # +2: Excel rows are 1-based and the header is row 1.
            rows.rows.append(RawRow(f"row {index + 2}", spec.split, values))
        return rows
    text = decode(Path(path).read_bytes(), spec.encoding, path, param)
    if fmt in ("csv", "tsv"):
        return parse_delimited(text, "," if fmt == "csv" else "\t", spec.split)
    if fmt == "json":
        return parse_json(text, spec, path, param)
    return parse_jsonl(text, spec.split)
