"""The data contracts: one Arrow schema per record kind, and their validators.

Every stage validates what it reads and what it writes against these. Kinds:

- ``mcq``          multiple choice (KMMLU, generated questions, stock direction): 2–7 choices,
                   0-based ``answer``. The kind allows 2 (up/down); the stages that promise 7
                   (transform, synthesize, solve) check their own counts.
- ``qa``           free-form prompt/answer (KRX sample, QA JSON, MetaMath, table QA, calc).
- ``translation``  parallel text with language codes (ko-en, ko-zh).
- ``document``     text units from PDFs or JSON documents: one row per page (``page`` ≥ 1)
                   or one per whole document (``page`` = 0).
- ``conversation`` a multi-turn exchange (user, assistant, tool, assistant …) whose tool turns
                   hold real output (agent@: the code's result in the sandbox); ``split``
                   train/dev/test like the other kinds.
- ``example``      a training example in trl's conversational prompt–completion format, with
                   ``split`` train/dev (the mixture's held-out part).
- ``prices``       daily prices, one row per (ticker, date), columnar all the way (a source of
                   1.5 M rows is never a list of dicts): read and checked by
                   :mod:`stages.sources.prices`; no ``id``/``meta`` per row — the key is
                   (``ticker``, ``date``) and provenance is in the collect metrics. ``flags``
                   holds ``;``-separated row flags (``halt``, ``corporate_action``).
- ``reject``       a record a stage refused, with the reason (``data/rejects/…``).

``meta`` is a JSON string (provenance, raw LLM output, token usage): free-form by design,
but always valid JSON so that downstream code can ``json.loads`` it blindly.
"""
from __future__ import annotations

import json
from typing import Any, Callable

import pyarrow as pa

MIN_CHOICES = 2
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
    "conversation": pa.schema([
        ("id", pa.string()), ("source", pa.string()), ("domain", pa.string()),
        ("split", pa.string()), ("messages", pa.list_(_MESSAGE)), ("meta", pa.string()),
    ]),
    "example": pa.schema([
        ("id", pa.string()), ("version", pa.string()), ("source", pa.string()),
        ("split", pa.string()),
        ("prompt", pa.list_(_MESSAGE)), ("completion", pa.list_(_MESSAGE)),
    ]),
    "prices": pa.schema([
        ("date", pa.date32()), ("ticker", pa.string()), ("name", pa.string()),
        ("market", pa.string()), ("series", pa.string()),
        ("open", pa.float64()), ("high", pa.float64()), ("low", pa.float64()),
        ("close", pa.float64()), ("volume", pa.int64()), ("value", pa.float64()),
        ("listed_shares", pa.int64()), ("flags", pa.string()),
    ]),
    "reject": pa.schema([
        ("stage", pa.string()), ("source", pa.string()), ("item", pa.string()),
        ("reason", pa.string()), ("detail", pa.string()), ("raw", pa.string()),
    ]),
}

KINDS = tuple(k for k in SCHEMAS if k not in ("example", "reject"))  # what collect may write


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


ROLES = ("system", "user", "assistant", "tool")


def _validate_messages(messages: Any, field: str) -> list[str]:
    if not isinstance(messages, list) or not messages:
        return [f"{field} is not a non-empty list of messages"]
    problems = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES:
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
    problems += _completion_roles(r.get("completion"))
    if isinstance(r.get("prompt"), list) and any(
            isinstance(m, dict) and m.get("role") == "tool" for m in r["prompt"]):
        problems.append("a tool turn belongs to the completion (after the assistant's call)")
    return problems


def _completion_roles(completion: Any) -> list[str]:
    """A completion is assistant turns, with tool turns (real output) only between two of
    them: assistant [tool assistant]…; the loss falls on the assistant turns only."""
    if not isinstance(completion, list) or not completion or not all(isinstance(m, dict) for m in completion):
        return []   # not a list of messages: _validate_messages says so
    roles = [m.get("role") for m in completion]
    if any(r not in ("assistant", "tool") for r in roles):
        return ["completion must hold assistant (and tool) messages only"]
    if roles[0] != "assistant" or roles[-1] != "assistant" or any(
            a == b == "tool" for a, b in zip(roles, roles[1:])):
        return [f"completion roles {roles}: tool turns only between assistant turns"]
    return []


def _validate_conversation(r: dict[str, Any]) -> list[str]:
    problems = _nonempty(r, "id", "source") + _check_meta(r)
    if r.get("split") not in SPLITS:
        problems.append(f"split {r.get('split')!r} not in {SPLITS}")
    messages = r.get("messages")
    problems += _validate_messages(messages, "messages")
    if isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages):
        first = next((i for i, m in enumerate(messages) if m.get("role") == "assistant"), None)
        if first is None or any(m.get("role") not in ("system", "user") for m in messages[:first]):
            problems.append("a conversation opens with system/user turns, then the assistant")
        else:
            problems += _completion_roles(messages[first:])
    return problems


PRICE_SERIES = ("stock", "index")
PRICE_FLAGS = ("halt", "corporate_action")


def _validate_prices(r: dict[str, Any]) -> list[str]:
    """One price row (tests, small tables); whole tables: :func:`validate_prices_table`."""
    problems = _nonempty(r, "ticker")
    if r.get("series") not in PRICE_SERIES:
        problems.append(f"series {r.get('series')!r} not in {PRICE_SERIES}")
    prices = [r.get(f) for f in ("open", "high", "low", "close")]
    if any(not isinstance(p, (int, float)) or not p > 0 for p in prices):
        problems.append("prices must be positive numbers")
    elif not (r["low"] <= min(r["open"], r["close"]) and max(r["open"], r["close"]) <= r["high"]):
        problems.append("open/close outside [low, high]")
    if not isinstance(r.get("volume"), int) or r["volume"] < 0:
        problems.append("volume is not a non-negative int")
    flags = [f for f in (r.get("flags") or "").split(";") if f]
    if any(f not in PRICE_FLAGS for f in flags):
        problems.append(f"unknown flags {flags}")
    return problems


def validate_prices_table(table: pa.Table) -> None:
    """Raise ``ValueError`` when a ``prices`` table breaks the contract: its schema, positive
    prices inside [low, high], a non-negative volume, one row per (ticker, date), sorted."""
    import numpy as np
    import pyarrow.compute as pc
    if not table.schema.equals(SCHEMAS["prices"]):
        raise ValueError(f"prices table schema differs from the contract: {table.schema}")
    o, h, l, c = (table[f].to_numpy() for f in ("open", "high", "low", "close"))
    checks = {"non-positive price": (np.minimum(np.minimum(o, c), l) <= 0) | np.isnan(o + h + l + c),
              "open/close outside [low, high]": (np.minimum(o, c) < l) | (np.maximum(o, c) > h),
              "negative volume": table["volume"].to_numpy(zero_copy_only=False) < 0}
    for what, bad in checks.items():
        if bad.any():
            raise ValueError(f"prices table row {int(np.argmax(bad))}: {what}")
    if table.num_rows > 1:
        tickers = table["ticker"].to_numpy(zero_copy_only=False)
        days = pc.cast(table["date"], pa.int32()).to_numpy(zero_copy_only=False)
        same = tickers[1:] == tickers[:-1]
        if (tickers[1:] < tickers[:-1]).any() or (same & (days[1:] <= days[:-1])).any():
            raise ValueError("prices table is not sorted by (ticker, date) with one row each")


def _validate_reject(r: dict[str, Any]) -> list[str]:
    return _nonempty(r, "stage", "source", "reason")


_VALIDATORS: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "mcq": _validate_mcq, "qa": _validate_qa, "translation": _validate_translation,
    "document": _validate_document, "example": _validate_example, "reject": _validate_reject,
    "prices": _validate_prices, "conversation": _validate_conversation,
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
