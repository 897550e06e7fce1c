"""Raw source rows -> records of the source's kind (:mod:`stages.common.schema`): the one row
mapping, used by ``collect@<source>`` and by the evaluation-set reader (local MCQ files are
read exactly as a ``collect`` local source is). Pure: no files, no params file, no network."""
from __future__ import annotations

import json
import math
from collections import Counter
from typing import Any

from stages.common.runlog import StageError, progress
from stages.common.schema import reject, validate
from stages.common.text import content_id, normalize_text
from stages.sources import RawRow, Rows
from stages.sources.spec import SourceParams

LETTERS = "ABCDEFG"
SPLIT_PRIORITY = {"test": 0, "dev": 1, "train": 2}


class RowError(Exception):
    """One row cannot become a record; ``reason`` is the machine-readable reject reason."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


# ------------------------------------------------------------------------ value helpers
def _text(value: Any) -> str:
    """Cell -> normalised text. Lists/dicts (a table, a product list) become canonical JSON."""
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False, sort_keys=True)
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # spreadsheets turn 12 into 12.0
    return normalize_text(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)


def parse_answer(value: Any, choices: list[str], answer_format: str) -> int:
    """Source answer -> 0-based index into ``choices``; RowError when it is not one."""
    n = len(choices)
    raw = _text(value)
    if not raw:
        raise RowError("missing_answer", "answer is empty")
    if answer_format in ("index1", "index0"):
        try:
            number = float(raw)
        except ValueError:
            kind = "a letter" if raw.upper() in LETTERS else "not a number"
            raise RowError("answer_not_an_index",
                           f"answer {raw!r} is {kind}; answer_format={answer_format}") from None
        if not number.is_integer():
            raise RowError("answer_not_an_index", f"answer {raw!r} is not an integer")
        index = int(number) - (1 if answer_format == "index1" else 0)
        if not 0 <= index < n:
            base = 1 if answer_format == "index1" else 0
            raise RowError("answer_out_of_range",
                           f"answer {raw} not in {base}..{n - 1 + base}")
        return index
    if answer_format == "letter":
        letter = raw.strip().rstrip(".)").upper()
        if len(letter) != 1 or letter not in LETTERS[:n]:
            raise RowError("answer_out_of_range", f"answer {raw!r} is not a letter A..{LETTERS[n - 1]}")
        return LETTERS.index(letter)
    matches = [i for i, choice in enumerate(choices) if choice == raw]
    if len(matches) != 1:
        raise RowError("answer_not_a_choice", f"answer {raw!r} matches {len(matches)} choices")
    return matches[0]


def _choices(values: dict[str, Any], mapping: str | list[str]) -> list[str]:
    if isinstance(mapping, list):
        return [_text(values.get(column)) for column in mapping]
    cell = values.get(mapping)
    if isinstance(cell, str):
        try:
            cell = json.loads(cell)
        except json.JSONDecodeError:
            raise RowError("malformed_choices", f"{mapping!r} is not a list") from None
    if not isinstance(cell, list):
        raise RowError("malformed_choices", f"{mapping!r} is not a list")
    return [_text(c) for c in cell]


def _field(values: dict[str, Any], params: SourceParams, name: str, default: str = "") -> str:
    if name in params.constants:
        return params.constants[name]
    column = params.columns.get(name)
    if column is None:
        return default
    if isinstance(column, list):
        raise RowError("bad_mapping", f"{name} maps to several columns")
    return _text(values.get(column))


def _document_text(values: dict[str, Any], mapping: str | list[str]) -> str:
    if isinstance(mapping, str):
        return _text(values.get(mapping))
    lines = []
    for column in mapping:
        value = values.get(column)
        if isinstance(value, list):
            value = ", ".join(_text(v) for v in value)
        text = _text(value)
        if text:
            lines.append(f"{column}: {text}")
    return "\n".join(lines)


# ------------------------------------------------------------------------ row -> record
def to_record(row: RawRow, params: SourceParams, source: str, input_label: str) -> dict[str, Any]:
    """Map one raw row to a record of ``params.kind``; RowError with the reason otherwise."""
    values = row.values
    meta: dict[str, Any] = {"input": input_label, "item": row.item}
    for column in params.meta_columns:
        if column in values:
            meta[column] = _jsonable(values[column])
    meta_json = json.dumps(meta, ensure_ascii=False, sort_keys=True)
    domain = params.domain

    if params.kind == "mcq":
        question = _field(values, params, "question")
        if not question:
            raise RowError("empty_question")
        choices = _choices(values, params.columns["choices"])
        if any(not c for c in choices):
            raise RowError("empty_choice", f"choice {LETTERS[[bool(c) for c in choices].index(False)]} is empty")
        if len(set(choices)) != len(choices):
            raise RowError("duplicate_choices")
        answer = parse_answer(values.get(params.columns["answer"]), choices, params.answer_format)
        record = {"id": content_id("mcq", question, choices, answer), "source": source,
                  "domain": domain, "split": row.split, "question": question, "choices": choices,
                  "answer": answer, "category": _field(values, params, "category"), "meta": meta_json}
    elif params.kind == "qa":
        question, answer = _field(values, params, "question"), _field(values, params, "answer")
        if not question:
            raise RowError("empty_question")
        if not answer:
            raise RowError("missing_answer", "answer is empty")
        context = _field(values, params, "context")
        record = {"id": content_id("qa", question, answer, context), "source": source,
                  "domain": domain, "split": row.split, "question": question, "answer": answer,
                  "context": context, "category": _field(values, params, "category"),
                  "meta": meta_json}
    elif params.kind == "translation":
        src_lang, tgt_lang = _field(values, params, "source_lang"), _field(values, params, "target_lang")
        src, tgt = _field(values, params, "source_text"), _field(values, params, "target_text")
        if not src or not tgt:
            raise RowError("empty_text", "source_text or target_text is empty")
        record = {"id": content_id("translation", src_lang, tgt_lang, src, tgt), "source": source,
                  "split": row.split, "source_lang": src_lang, "target_lang": tgt_lang,
                  "source_text": src, "target_text": tgt, "meta": meta_json}
    else:  # document
        text = _document_text(values, params.columns["text"])
        if not text:
            raise RowError("empty_text")
        title = _field(values, params, "title")
        doc_id = content_id("document", title, text)
        record = {"id": doc_id, "source": source, "doc_id": doc_id, "path": input_label,
                  "page": 0, "title": title, "text": text, "tables": [], "meta": meta_json}
    problems = validate(params.kind, record)
    if problems:
        raise RowError("invalid_record", "; ".join(problems))
    return record


def check_columns(rows: Rows, params: SourceParams, param: str, where: str) -> None:
    """A mapped column absent from the header is a whole-input error, named by its param."""
    if rows.columns is None:
        return  # JSON records: a missing key is a per-row reject instead
    for field, mapping in params.columns.items():
        for column in ([mapping] if isinstance(mapping, str) else mapping):
            if column not in rows.columns:
                raise StageError(f"{param}.columns.{field}: column {column!r} not in {where} "
                                 f"(columns: {rows.columns})")


def _missing_keys(values: dict[str, Any], params: SourceParams) -> list[str]:
    wanted: list[str] = []
    for field, mapping in params.columns.items():
        if field in ("category", "context", "title"):
            continue  # optional per record
        wanted.extend([mapping] if isinstance(mapping, str) else mapping)
    return [c for c in wanted if c not in values]


def build_records(rows: Rows, params: SourceParams, source: str, input_label: str,
                  stage: str = "collect") -> tuple[list[dict[str, Any]], list[dict[str, str]], Counter]:
    """Raw rows -> (records, rejects of ``stage``, counts)."""
    counts: Counter = Counter(rows_read=len(rows.rows) + len(rows.bad))
    rejects = [reject(stage, source, bad.item, bad.reason, bad.detail, bad.raw) for bad in rows.bad]
    candidates: list[tuple[RawRow, dict[str, Any]]] = []
    for row in progress(rows.rows, desc=f"{stage}@{source}"):
        missing = _missing_keys(row.values, params) if rows.columns is None else []
        try:
            if missing:
                raise RowError("missing_field", f"missing {missing}")
            candidates.append((row, to_record(row, params, source, input_label)))
        except RowError as exc:
            rejects.append(reject(stage, source, row.item, exc.reason, exc.detail,
                                  {k: _jsonable(v) for k, v in row.values.items()}))
    # Exact duplicates: keep the copy in the most held-out split, then the first seen.
    keeper: dict[str, tuple[int, int]] = {}
    for position, (row, record) in enumerate(candidates):
        rank = (SPLIT_PRIORITY[row.split], position)
        if record["id"] not in keeper or rank < keeper[record["id"]]:
            keeper[record["id"]] = rank
    records = []
    for position, (row, record) in enumerate(candidates):
        kept_position = keeper[record["id"]][1]
        if kept_position == position:
            records.append(record)
        else:
            kept_row = candidates[kept_position][0]
            counts["duplicates_removed"] += 1
            rejects.append(reject(stage, source, row.item, "exact_duplicate",
                                  f"same content as {kept_row.item} ({kept_row.split}), id {record['id']}"))
    counts["records"] = len(records)
    for record in records:
        if "split" in record:  # documents have no split
            counts[f"split_{record['split']}"] += 1
    return records, rejects, counts
