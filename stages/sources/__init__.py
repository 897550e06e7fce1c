"""Source loaders for ``collect``: raw rows out, nothing normalised yet.

A loader returns :class:`Rows`: the rows it could read (``item`` says where each came from,
``split`` which split) and the rows it could not (malformed CSV lines, invalid JSON lines),
so that ``collect`` can reject them with a reason instead of crashing or dropping them.
Whole-input problems (a missing file, a wrong encoding, a missing column) raise
:class:`stages.common.runlog.StageError` naming the param and the path.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RawRow:
    item: str            # where the row came from: "line 12", "record 3", "test#41"
    split: str           # our split name: train / dev / test
    values: dict[str, Any]


@dataclass
class BadRow:
    item: str
    reason: str
    detail: str
    raw: Any = None


@dataclass
class Rows:
    rows: list[RawRow] = field(default_factory=list)
    bad: list[BadRow] = field(default_factory=list)
    columns: list[str] | None = None          # header, where the format has one
    info: dict[str, Any] = field(default_factory=dict)   # provenance for metrics/meta
