"""The evaluation sets, read one way for everyone who needs them.

``evaluate@<key>`` scores models on them; ``mix@<version>`` removes training examples that
overlap them (decontamination). Both must see the same items, with the same ids and the same
choice texts (labels such as "A. " stripped where ``strip_choice_labels`` says so), or a
contaminated example could slip through under a differently written choice. Local files are
read and mapped by collect's own loader and row mapping.

Each set belongs to one KRX-Bench category (``contest_category``, :data:`CONTEST_CATEGORIES`):
the leaderboard scores a model per category and averages them; the report does the same.
Sets are the held-out (``test``) splits of what the pipeline writes (stock, agent and company
questions), the KMMLU test splits, and the team's local MCQ files.

This module sits beside the source loaders it reads local sets with (``local.py``,
``records.py``, ``spec.py``): ``stages/common/`` imports nothing from above it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal, Sequence, Union

from pydantic import Field, model_validator

from stages.common.io import read_records
from stages.common.params import Strict
from stages.common.prompts import LETTERS
from stages.common.runlog import StageError, require_input
from stages.common.schema import reject, validate
from stages.common.text import content_id
from stages.sources.local import read_local
from stages.sources.records import build_records, check_columns
from stages.sources.spec import LocalSpec, SourceParams

STAGE = "evaluate"

# KRX-Bench's categories in the leaderboard's order: param value -> the leaderboard's name.
CONTEST_CATEGORIES: dict[str, str] = {
    "accounting": "재무회계", "financial_market": "금융시장", "company": "국내기업 분석",
    "stock": "주가 예측", "agent": "금융 에이전트"}
ContestCategory = Literal["accounting", "financial_market", "company", "stock", "agent"]
_CATEGORY_HELP = ("the KRX-Bench category this set scores: " + ", ".join(
    f"{k} ({v})" for k, v in CONTEST_CATEGORIES.items()))


# ---------------------------------------------------------------------------- the sets' params
# ``evaluate.collected`` / ``evaluate.local``: read by evaluate (its whole section) and by mix
# (these two sections only, for decontamination).
class EvalCollectedSet(Strict):
    """A parquet of mcq records (``collect@<source>``, or a generating stage's output such as
    ``stock@<key>``); only ``split`` is read."""
    input: str = Field(description="parquet of mcq records, e.g. data/collected/kmmlu_economics.parquet")
    contest_category: ContestCategory = Field(description=_CATEGORY_HELP)
    split: Literal["train", "dev", "test"] = Field(
        "test", description="the held-out split (KMMLU test: never in any mixture)")


class EvalLocalSet(Strict):
    """A local MCQ file (csv/tsv/json/jsonl/parquet/xlsx) read the way ``collect`` reads a local
    mcq source (same loader, same column mapping and answer formats), 2-7 choices."""
    input: str = Field(description="the file; must lie under evaluate.local_dir (the dvc dep)")
    contest_category: ContestCategory = Field(description=_CATEGORY_HELP)
    local: LocalSpec = Field(default_factory=LocalSpec)
    columns: dict[str, Union[str, list[str]]] = Field(
        description="question, choices (list of columns, or one column holding a list), answer, "
                    "optional category")
    constants: dict[str, str] = Field(default_factory=dict)
    answer_format: Literal["index1", "index0", "letter", "text"] = "index1"
    strip_choice_labels: bool = Field(
        False, description="drop leading 'A. ' / 'B) ' / '1 ' labels written into the choices")

    def as_source(self) -> SourceParams:
        """The equivalent ``collect`` source (kind mcq, loader local, split test: held out)."""
        local = self.local.model_copy(update={"split": "test"})
        return SourceParams(kind="mcq", loader="local", input=self.input, local=local,
                            columns=self.columns, constants=self.constants,
                            answer_format=self.answer_format, max_reject_rate=1.0)

    @model_validator(mode="after")
    def _valid_source(self) -> "EvalLocalSet":
        self.as_source()  # same checks as a collect source (question/choices/answer mapped)
        return self


@dataclass(frozen=True)
class EvalItem:
    """One multiple-choice question; ``answer`` is a 0-based index into ``choices``."""
    set: str
    id: str
    question: str
    choices: tuple[str, ...]
    answer: int
    category: str = ""
    contest_category: str = ""

    @property
    def category_key(self) -> str:
        return f"{self.set}/{self.category}" if self.category else self.set


_CHOICE_LABEL = re.compile(r"^\s*(?:\(?([A-Ga-g])[.)]|([1-7])[.)]?)\s+")


def strip_labels(choices: Sequence[str]) -> list[str]:
    """Drop letter/number labels written into the choices ("A. …", "B) …", "1 …") — only when
    every choice carries the label of its own position, so real text is never cut."""
    stripped = []
    for position, choice in enumerate(choices):
        match = _CHOICE_LABEL.match(choice)
        if not match:
            return list(choices)
        label = match.group(1) or match.group(2)
        expected = LETTERS[position] if match.group(1) else str(position + 1)
        if label.upper() != expected:
            return list(choices)
        stripped.append(choice[match.end():].strip())
    return stripped if all(stripped) else list(choices)


def items_from_records(name: str, records: list[dict[str, Any]], split: str | None,
                       contest_category: str = "") -> tuple[list[EvalItem], list[dict[str, str]]]:
    """mcq records (collect's schema) -> items of set ``name`` (only ``split`` when given);
    invalid records become rejects."""
    items, rejects = [], []
    for index, record in enumerate(records):
        if split is not None and record.get("split") != split:
            continue
        problems = validate("mcq", record)
        if problems:
            rejects.append(reject(STAGE, name, str(record.get("id") or f"row {index}"),
                                  "invalid_record", "; ".join(problems), record))
            continue
        items.append(EvalItem(name, record["id"], record["question"], tuple(record["choices"]),
                              record["answer"], record.get("category") or "", contest_category))
    return items, rejects


def load_local_set(name: str, spec: EvalLocalSet) -> tuple[list[EvalItem], list[dict[str, str]]]:
    """A local MCQ file, read and mapped by collect's own loader and row mapping."""
    source = spec.as_source()
    param = f"evaluate.local.{name}"
    rows = read_local(source.input, source.local, param)
    check_columns(rows, source, param, source.input)
    records, rejects, _ = build_records(rows, source, name, source.input, stage=STAGE)
    if spec.strip_choice_labels:
        for record in records:
            record["choices"] = strip_labels(record["choices"])
            record["id"] = content_id("mcq", record["question"], record["choices"], record["answer"])
    for record in records:
        record["split"] = "test"
    items, invalid = items_from_records(name, records, None, spec.contest_category)
    return items, rejects + invalid


def load_sets(settings: Any) -> tuple[list[EvalItem], list[dict[str, str]]]:
    """Every eval set of ``settings`` (``collected``, ``local``, ``max_items_per_set``: the
    evaluate settings) -> (items sorted by set then id, rejects)."""
    items: list[EvalItem] = []
    rejects: list[dict[str, str]] = []
    max_items_per_set = settings.max_items_per_set
    for name, spec in sorted(settings.collected.items()):
        require_input(spec.input, f"evaluate.collected.{name}.input", "run its collect stage first")
        got, bad = items_from_records(name, read_records(spec.input), spec.split, spec.contest_category)
        if not got:
            raise StageError(f"evaluate.collected.{name}: no {spec.split!r} records in {spec.input}")
        items += cap(got, max_items_per_set)
        rejects += bad
    for name, local_spec in sorted(settings.local.items()):
        got, bad = load_local_set(name, local_spec)
        items += cap(got, max_items_per_set)
        rejects += bad
    return items, rejects


# ---------------------------------------------------------------------------- open-ended sets
class OpenEndedSet(Strict):
    """A local file of free-form finance questions with reference answers (the contest's
    open-ended part), read by collect's local loader: ``evaluate@<key>`` generates each
    version's answer, ``judge@<key>`` scores it against the reference."""
    input: str = Field(description="the file; must lie under evaluate.local_dir (the dvc dep)")
    contest_category: Literal["open_ended"] = Field(description="always open_ended: scored by "
                                                    "judge@, apart from the five MCQ categories")
    local: LocalSpec = Field(default_factory=LocalSpec)
    columns: dict[str, str] = Field(description="question, reference; optional category")

    @model_validator(mode="after")
    def _columns(self) -> "OpenEndedSet":
        missing = {"question", "reference"} - set(self.columns)
        unknown = set(self.columns) - {"question", "reference", "category"}
        if missing or unknown:
            raise ValueError(f"columns: map question and reference (and optionally category); "
                             f"missing {sorted(missing)}, unknown {sorted(unknown)}")
        return self


@dataclass(frozen=True)
class OpenItem:
    """One open-ended question and the reference answer a judge compares with."""
    set: str
    id: str
    question: str
    reference: str
    category: str = ""


def load_open_ended(name: str, spec: OpenEndedSet) -> tuple[list[OpenItem], list[dict[str, str]]]:
    """The set's items (file order) and its rejects: unreadable rows, an empty question or
    reference, a repeated question."""
    param = f"evaluate.open_ended.{name}"
    rows = read_local(spec.input, spec.local, param)
    if rows.columns is not None:
        absent = [c for c in spec.columns.values() if c not in rows.columns]
        if absent:
            raise StageError(f"{param}.columns: {absent} not in {spec.input} (columns: {rows.columns})")
    rejects = [reject(STAGE, name, bad.item, bad.reason, bad.detail, bad.raw) for bad in rows.bad]
    items, seen = [], set()
    for row in rows.rows:
        text = {k: str(row.values.get(column) or "").strip() for k, column in spec.columns.items()}
        if not text["question"] or not text["reference"]:
            rejects.append(reject(STAGE, name, row.item, "invalid_record",
                                  "empty question or reference", row.values))
            continue
        item_id = content_id("open_ended", text["question"])
        if item_id in seen:
            rejects.append(reject(STAGE, name, row.item, "duplicate", "the question repeats", row.values))
            continue
        seen.add(item_id)
        items.append(OpenItem(name, item_id, text["question"], text["reference"], text.get("category", "")))
    return items, rejects


def cap(items: list[EvalItem], limit: int | None) -> list[EvalItem]:
    ordered = sorted(items, key=lambda item: item.id)
    return ordered if limit is None else ordered[:limit]
