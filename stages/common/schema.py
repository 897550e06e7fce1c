"""The data contracts: one Arrow schema per record kind, and their validators.

Every stage validates what it reads and what it writes against these. Kinds:

- ``mcq``          multiple choice (KMMLU, generated questions): 4–7 choices, 0-based ``answer``.
- ``qa``           free-form prompt/answer (KRX sample, QA JSON, MetaMath, table QA, calc).
- ``translation``  parallel text with language codes (ko-en, ko-zh).
- ``document``     text units from PDFs or JSON documents: one row per page (``page`` ≥ 1)
                   or one per whole document (``page`` = 0).
- ``example``      a training example in trl's conversational prompt–completion format, with
                   ``split`` train/dev (the mixture's held-out part).
- ``reject``       a record a stage refused, with the reason (``data/rejects/…``).

``meta`` is a JSON string (provenance, raw LLM output, token usage): free-form by design,
but always valid JSON so that downstream code can ``json.loads`` it blindly.
"""
from __future__ import annotations

import json
from typing import Any, Callable

import pyarrow as pa

MIN_CHOICES = 4
MAX_CHOICES = 7
SPLITS = ("train", "dev", "test")

_MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])

SCHEMAS: dict[str, pa.Schema] = {
    "mcq": pa.schema([
        ("id", pa.string()), ("source", pa.string()), ("domain", pa.string()),
        ("split", pa.string()), ("question", pa.string()), ("choices", pa.list_(pa.string())),
        ("answer", pa.int32()), ("category", pa.string()), ("meta", pa.string()),
    ]),
    "qa": pa.schema([
        ("id", pa.string()), ("source", pa.string()), ("domain", pa.string()),
        ("split", pa.string()), ("question", pa.string()), ("answer", pa.string()),
        ("context", pa.string()), ("category", pa.string()), ("meta", pa.string()),
    ]),
    "translation": pa.schema([
        ("id", pa.string()), ("source", pa.string()), ("split", pa.string()),
        ("source_lang", pa.string()), ("target_lang", pa.string()),
        ("source_text", pa.string()), ("target_text", pa.string()), ("meta", pa.string()),
    ]),
    "document": pa.schema([
        ("id", pa.string()), ("source", pa.string()), ("doc_id", pa.string()),
        ("path", pa.string()), ("page", pa.int32()), ("title", pa.string()),
        ("text", pa.string()), ("tables", pa.list_(pa.list_(pa.list_(pa.string())))),
        ("meta", pa.string()),
    ]),
    "example": pa.schema([
        ("id", pa.string()), ("version", pa.string()), ("source", pa.string()),
        ("split", pa.string()),
        ("prompt", pa.list_(_MESSAGE)), ("completion", pa.list_(_MESSAGE)),
    ]),
    "reject": pa.schema([
        ("stage", pa.string()), ("source", pa.string()), ("item", pa.string()),
        ("reason", pa.string()), ("detail", pa.string()), ("raw", pa.string()),
    ]),
}

KINDS = tuple(k for k in SCHEMAS if k not in ("example", "reject"))


def _check_fields(record: dict[str, Any], schema: pa.Schema) -> list[str]:
    problems = []
    names = set(schema.names)
    missing = [n for n in schema.names if n not in record]
    extra = [n for n in record if n not in names]
    if missing:
        problems.append(f"missing fields {missing}")
    if extra:
        problems.append(f"unexpected fields {extra}")
    return problems


def _check_meta(record: dict[str, Any]) -> list[str]:
    try:
        json.loads(record.get("meta", ""))
    except (TypeError, ValueError):
        return ["meta is not a JSON string"]
    return []


def _nonempty(record: dict[str, Any], *fields: str) -> list[str]:
    return [f"empty {f}" for f in fields if not isinstance(record.get(f), str) or not record[f].strip()]


def _validate_mcq(r: dict[str, Any]) -> list[str]:
    problems = _nonempty(r, "id", "source", "question") + _check_meta(r)
    if r.get("split") not in SPLITS:
        problems.append(f"split {r.get('split')!r} not in {SPLITS}")
    choices = r.get("choices")
    if not isinstance(choices, list) or not MIN_CHOICES <= len(choices) <= MAX_CHOICES:
        problems.append(f"need {MIN_CHOICES}-{MAX_CHOICES} choices, got "
                        f"{len(choices) if isinstance(choices, list) else type(choices).__name__}")
        return problems
    if any(not isinstance(c, str) or not c.strip() for c in choices):
        problems.append("empty choice")
    elif len(set(choices)) != len(choices):
        problems.append("duplicate choices")
    answer = r.get("answer")
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
        problems.append(f"answer {answer!r} is not an index into {len(choices)} choices")
    return problems


def _validate_qa(r: dict[str, Any]) -> list[str]:
    problems = _nonempty(r, "id", "source", "question", "answer") + _check_meta(r)
    if r.get("split") not in SPLITS:
        problems.append(f"split {r.get('split')!r} not in {SPLITS}")
    return problems


def _validate_translation(r: dict[str, Any]) -> list[str]:
    problems = _nonempty(r, "id", "source", "source_lang", "target_lang", "source_text",
                         "target_text") + _check_meta(r)
    if r.get("split") not in SPLITS:
        problems.append(f"split {r.get('split')!r} not in {SPLITS}")
    if r.get("source_lang") == r.get("target_lang"):
        problems.append("source_lang equals target_lang")
    return problems


def _validate_document(r: dict[str, Any]) -> list[str]:
    problems = _nonempty(r, "id", "source", "doc_id", "path", "text") + _check_meta(r)
    page = r.get("page")
    if not isinstance(page, int) or page < 0:
        problems.append(f"page {page!r} is not a non-negative int")
    tables = r.get("tables")
    if not isinstance(tables, list) or any(
            not isinstance(t, list) or any(not isinstance(row, list) for row in t) for t in tables):
        problems.append("tables is not a list of tables of rows")
    return problems


def _validate_messages(messages: Any, field: str) -> list[str]:
    if not isinstance(messages, list) or not messages:
        return [f"{field} is not a non-empty list of messages"]
    problems = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            problems.append(f"{field} has a message with a bad role")
        elif not isinstance(m.get("content"), str) or not m["content"].strip():
            problems.append(f"{field} has an empty message")
    return problems


EXAMPLE_SPLITS = ("train", "dev")


def _validate_example(r: dict[str, Any]) -> list[str]:
    problems = _nonempty(r, "id", "version", "source")
    if r.get("split") not in EXAMPLE_SPLITS:
        problems.append(f"split {r.get('split')!r} not in {EXAMPLE_SPLITS}")
    problems += _validate_messages(r.get("prompt"), "prompt")
    problems += _validate_messages(r.get("completion"), "completion")
    if isinstance(r.get("completion"), list) and any(
            isinstance(m, dict) and m.get("role") != "assistant" for m in r["completion"]):
        problems.append("completion must hold assistant messages only")
    return problems


def _validate_reject(r: dict[str, Any]) -> list[str]:
    return _nonempty(r, "stage", "source", "reason")


_VALIDATORS: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "mcq": _validate_mcq, "qa": _validate_qa, "translation": _validate_translation,
    "document": _validate_document, "example": _validate_example, "reject": _validate_reject,
}


def validate(kind: str, record: dict[str, Any]) -> list[str]:
    """Problems with ``record`` as a ``kind`` record; empty list when it is valid."""
    if kind not in SCHEMAS:
        raise ValueError(f"unknown record kind {kind!r}; known: {sorted(SCHEMAS)}")
    problems = _check_fields(record, SCHEMAS[kind])
    return problems + _VALIDATORS[kind](record)


def validate_table(kind: str, records: list[dict[str, Any]]) -> None:
    """Raise ``ValueError`` naming the first invalid record: used on stage inputs and outputs,
    where an invalid record is a bug upstream, not bad user input."""
    for index, record in enumerate(records):
        problems = validate(kind, record)
        if problems:
            raise ValueError(f"{kind} record #{index} (id={record.get('id')!r}) is invalid: "
                             + "; ".join(problems))


def reject(stage: str, source: str, item: str, reason: str, detail: str = "",
           raw: Any = None) -> dict[str, str]:
    """A reject record. ``raw`` is kept as JSON so the user can see what came in."""
    return {"stage": stage, "source": source, "item": str(item), "reason": reason,
            "detail": detail,
            "raw": json.dumps(raw, ensure_ascii=False, default=str, sort_keys=True)
            if raw is not None else ""}
