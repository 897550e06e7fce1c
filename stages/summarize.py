"""summarize: KRX company report pages → one structured LLM summary per report (model v5_3).

    python -m stages.summarize --input data/collected/krx_reports.parquet \\
        --out data/generated/report_summaries.parquet --rejects data/rejects/summarize.parquet \\
        --metrics metrics/summarize.json --log logs/summarize.log [--params params.yaml]

Reads ``summarize`` (:class:`SummarizeParams`, below) and the page records
of ``extract@krx_reports`` (``document`` kind, one per PDF page). Every LLM call goes
through :mod:`stages.common.llm` (structured output, response cache under
``summarize.llm.cache_dir``, offline mode).

Per report (the pages of one ``doc_id``, in page order):

1. **Chunk** (:func:`chunk_report`): each page is rendered as a ``[N쪽]`` marker, its body
   text and its tables (cells joined by ``|``; the extract stage keeps table text out of
   the body, so without this the figures of a results table would never reach the model).
   Whole pages are packed greedily into chunks of at most ``max_chunk_tokens`` estimated
   tokens (:func:`estimate_tokens`: characters × ``tokens_per_char``, deliberately high for
   Hangul). A page that alone exceeds the budget is split at line boundaries (a line
   longer than the budget at character boundaries) and its parts go to consecutive chunks;
   every other page lies in exactly one chunk, and chunk boundaries fall on page
   boundaries.
2. **Map**: one call per chunk → a :class:`ReportSummary` of that chunk. A report with a
   single chunk is done: its map answer is the final summary (one call in all).
3. **Reduce** (more than one chunk): the partial summaries (JSON) are merged by further
   calls into one :class:`ReportSummary`. Partials are grouped greedily, in order, under
   the same token budget (:func:`group_partials`: at least two per group, so every level
   makes progress; a last single partial is carried up without a call); when more than one
   group is needed the merge is a tree, level by level (``<doc_id>/merge-<level>-<group>``).
4. **Validate** (:func:`validate_summary`): every key figure's value must occur in the
   report's source text (page text and tables) after number normalisation — commas,
   spaces, signs and full-width digits ignored; Korean magnitude units (만, 억, 조, …) and
   ``%`` understood on both sides, so "1,284억 원" in the text supports ``{"value":
   "1284", "unit": "억 원"}`` and ``{"value": "128,400,000,000", "unit": "원"}``.
   Figures that do not occur are dropped and counted (hallucination guard); a ticker or
   target price whose digits do not occur is cleared the same way. The summary must be
   non-empty.

Outputs (atomic, deterministic, sorted by ``doc_id``):

``--out``      ``document`` records, one per summarised report: ``page`` 0, ``doc_id`` the
               report's, ``title`` the company (the PDF's title when the model found none),
               ``text`` the summary as ``json.dumps(..., ensure_ascii=False,
               sort_keys=True)``, ``meta`` JSON ``{input_source, source_path,
               file_sha256, pages, chunks, calls, figures_dropped, fields_cleared, usage}``.
``--rejects``  ``reject`` records (always written): ``empty_report`` (fewer than
               ``min_report_chars`` characters of text and tables), ``llm_<reason>`` (a
               call was rejected by the LLM layer: ``llm_refusal``, ``llm_truncated``,
               ``llm_schema_violation``, ``llm_invalid_json``, ``llm_transport_error``,
               ``llm_bad_request``; the detail names the call), ``empty_summary``.
``--metrics``  reports, summaries, rejects by reason, pages, chunks, map/reduce calls,
               figures kept/dropped, fields cleared, ``llm`` (tokens, cost, cache hits:
               :meth:`~stages.common.llm.Accounting.as_metrics`), seconds.

Fails (exit 2) when the input is missing or holds no report, when the reject rate exceeds
``max_reject_rate`` (rejects are written first), and in offline mode when the cache lacks
answers (the message counts them and names the first item ids, e.g. ``<doc_id>/chunk-1``).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import re
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from string import Template
from typing import Any, Iterable, Optional, Sequence

import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from stages.common.chunking import Chunk, Segment, chunk_segments
from stages.common.io import write_records
from stages.common.llm import Accounting, LLMClient, LLMParams, LLMRequest, Result, read_llm_section
from stages.common.params import PARAMS_FILE, Strict
from stages.common.prompts import load_template
from stages.common.runlog import (StageError, Timer, check_reject_rate, require_input, setup_logging,
                                  stage_main, stage_parser, write_metrics)
from stages.common.schema import SCHEMAS, reject, validate, validate_table
from stages.common.text import content_id, unspaced

PARAMS = ("summarize", "llm_defaults")
STAGE = "summarize"
OUTPUT_SOURCE = "report_summaries"
TEMPLATES = ("summarize_map_system.txt", "summarize_map_user.txt",
             "summarize_reduce_system.txt", "summarize_reduce_user.txt")


# ---------------------------------------------------------------------------- params
class SummarizeParams(Strict):
    """LLM summaries of the KRX company reports (map over chunks, reduce when needed)."""
    max_chunk_tokens: int = Field(ge=200, description="report text per map call (estimated "
                                                       "tokens); also the budget of a merge call's partials")
    tokens_per_char: float = Field(1.0, gt=0, le=4, description="token estimate per character "
                                   "(1.0 over-estimates Hangul in GPT-4o-class tokenizers)")
    min_report_chars: int = Field(20, ge=0, description="reports with fewer non-space characters "
                                                        "of text and tables are rejected empty_report")
    max_reject_rate: float = Field(0.2, ge=0, le=1, description="of the reports")
    llm: LLMParams


def load_params(key: str | None, path: str = PARAMS_FILE, cache_dir: str | None = None) -> SummarizeParams:
    """``summarize`` with ``llm_defaults`` merged under its ``llm``."""
    return read_llm_section(PARAMS, SummarizeParams, key, path, cache_dir)



# ---------------------------------------------------------------------------- the structure
class KeyFigure(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="지표 이름 (예: 매출액, 영업이익률)")
    value: str = Field(description="본문에 적힌 그대로의 숫자 (예: 1,284)")
    unit: Optional[str] = Field(description="단위 (예: 억 원, %), 없으면 null")
    period: Optional[str] = Field(description="해당 기간 (예: 2024년), 없으면 null")


class ReportSummary(BaseModel):
    """The summary of a report (final) or of one chunk / group of partials (map, reduce).

    Every field is required and nullable (explicit ``null`` / ``[]``): what OpenAI's
    strict structured outputs demand, and what makes a missing field visible."""
    model_config = ConfigDict(extra="forbid")
    company: Optional[str] = Field(description="회사명")
    ticker: Optional[str] = Field(description="종목코드 (예: 005930), 본문에 없으면 null")
    report_date: Optional[str] = Field(description="보고서 작성일, 본문에 없으면 null")
    period: Optional[str] = Field(description="분석 대상 기간 (예: 2024년)")
    report_type: Optional[str] = Field(description="보고서 종류 (예: 기업분석, 실적 리뷰)")
    summary: str = Field(description="한국어 요약, 3~5문장")
    key_figures: list[KeyFigure] = Field(description="주요 수치")
    risks: list[str] = Field(description="위험 요인, 한 항목에 한 문장")
    outlook: Optional[str] = Field(description="전망")
    rating: Optional[str] = Field(description="투자의견 (예: 매수), 본문에 없으면 null")
    target_price: Optional[str] = Field(description="목표주가, 본문에 없으면 null")


# ---------------------------------------------------------------------------- reports and chunks
@dataclass(frozen=True)
class Page:
    page: int
    text: str
    tables: tuple[tuple[tuple[str, ...], ...], ...] = ()


@dataclass(frozen=True)
class Report:
    """The pages of one PDF (``doc_id``), in page order, and where they came from."""
    doc_id: str
    source: str
    path: str
    title: str
    pages: tuple[Page, ...]
    meta: dict[str, Any] = field(default_factory=dict, compare=False)


def group_reports(records: Iterable[dict[str, Any]]) -> list[Report]:
    """Page records → reports, sorted by ``doc_id``, pages sorted by page number."""
    by_doc: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        by_doc[record["doc_id"]].append(record)
    reports = []
    for doc_id in sorted(by_doc):
        rows = sorted(by_doc[doc_id], key=lambda r: r["page"])
        first = rows[0]
        try:
            meta = json.loads(first["meta"])
        except ValueError:
            meta = {}
        pages = tuple(Page(r["page"], r["text"] or "",
                           tuple(tuple(tuple(str(c or "") for c in row) for row in table)
                                 for table in (r["tables"] or [])))
                      for r in rows)
        reports.append(Report(doc_id, first["source"], first["path"], first["title"] or "",
                              pages, meta if isinstance(meta, dict) else {}))
    return reports


def estimate_tokens(text: str, tokens_per_char: float) -> int:
    """Tokens ``text`` is assumed to cost: characters × ``tokens_per_char``, rounded up.

    No tokenizer is loaded (the endpoint's may be unknown): a Hangul syllable costs about
    one token in GPT-4o-class tokenizers (often less), ASCII about a quarter, so 1.0 per
    character over-estimates — a chunk can come out smaller than needed, never larger."""
    return math.ceil(len(text) * tokens_per_char)


def _table_lines(table: Sequence[Sequence[str]]) -> list[str]:
    return [" | ".join(cell.replace("\n", " ").strip() for cell in row) for row in table]


def page_body(page: Page) -> str:
    """The page's text followed by its tables, one ``cell | cell`` line per row."""
    parts = [page.text.strip()] if page.text.strip() else []
    for number, table in enumerate(page.tables, 1):
        rows = _table_lines(table)
        if any(line.strip(" |") for line in rows):
            parts.append("\n".join([f"[표 {number}]", *rows]))
    return "\n".join(parts)


def report_source_text(report: Report) -> str:
    """Everything the summary may draw on: all page bodies (text and tables)."""
    return "\n".join(page_body(p) for p in report.pages)


def _marker(page: int, part: int, parts: int) -> str:
    return f"[{page}쪽]" if parts == 1 else f"[{page}쪽 ({part}/{parts})]"


def _split_long(body: str, budget_chars: int) -> list[str]:
    """Pieces of at most ``budget_chars`` characters: whole lines where possible."""
    pieces: list[str] = []
    current = ""
    for line in body.split("\n"):
        while len(line) > budget_chars:  # a single overlong line: hard split
            if current:
                pieces.append(current)
                current = ""
            pieces.append(line[:budget_chars])
            line = line[budget_chars:]
        candidate = f"{current}\n{line}" if current else line
        if len(candidate) <= budget_chars:
            current = candidate
        else:
            pieces.append(current)
            current = line
    if current:
        pieces.append(current)
    return pieces


def page_segments(page: Page, max_tokens: int, tokens_per_char: float) -> list[Segment]:
    """The page as one segment, or as parts when it alone exceeds ``max_tokens``."""
    body = page_body(page)
    whole = f"{_marker(page.page, 1, 1)}\n{body}"
    if estimate_tokens(whole, tokens_per_char) <= max_tokens:
        return [Segment(page.page, whole)]
    # Room for the longest marker this page can get, "[12쪽 (10/11)]" plus a newline.
    reserve = len(_marker(page.page, 10 ** 6, 10 ** 6)) + 1
    budget_chars = math.floor(max_tokens / tokens_per_char) - reserve
    if budget_chars < 1:
        raise ValueError(f"max_chunk_tokens {max_tokens} leaves no room for text")
    pieces = _split_long(body, budget_chars)
    return [Segment(page.page, f"{_marker(page.page, i, len(pieces))}\n{piece}", i, len(pieces))
            for i, piece in enumerate(pieces, 1)]


def chunk_report(report: Report, max_tokens: int, tokens_per_char: float) -> list[Chunk]:
    """Pack the report's pages, in order, into chunks of at most ``max_tokens`` (estimate).

    Segments are joined by a blank line, which is counted. Pages with no text and no
    tables contribute nothing. See the module docstring for the guarantees."""
    segments = [segment for page in report.pages if page_body(page)
                for segment in page_segments(page, max_tokens, tokens_per_char)]
    return chunk_segments(segments, lambda s: estimate_tokens(s.text, tokens_per_char), max_tokens,
                          "\n\n", estimate_tokens("\n\n", tokens_per_char))


# ---------------------------------------------------------------------------- prompts
@dataclass(frozen=True)
class Prompts:
    map_system: str
    map_user: Template
    reduce_system: str
    reduce_user: Template

    @classmethod
    def load(cls) -> "Prompts":
        texts = [load_template(name) for name in TEMPLATES]
        return cls(texts[0].strip(), Template(texts[1].strip()), texts[2].strip(),
                   Template(texts[3].strip()))


def map_item_id(doc_id: str, index: int) -> str:
    return f"{doc_id}/chunk-{index}"


def reduce_item_id(doc_id: str, level: int, group: int) -> str:
    return f"{doc_id}/merge-{level}-{group}"


def map_request(report: Report, chunk: Chunk, chunk_count: int, prompts: Prompts) -> LLMRequest:
    user = prompts.map_user.substitute(title=report.title or report.path,
                                       chunk_number=chunk.index + 1, chunk_count=chunk_count,
                                       text=chunk.text)
    return LLMRequest([{"role": "system", "content": prompts.map_system},
                       {"role": "user", "content": user}],
                      ReportSummary, map_item_id(report.doc_id, chunk.index))


def summary_json(summary: ReportSummary, *, indent: Optional[int] = None) -> str:
    return json.dumps(summary.model_dump(mode="json"), ensure_ascii=False, sort_keys=True,
                      indent=indent)


def reduce_request(report: Report, partials: Sequence[ReportSummary], level: int, group: int,
                   prompts: Prompts) -> LLMRequest:
    listing = "\n\n".join(f"[부분 {i}]\n{summary_json(p)}" for i, p in enumerate(partials, 1))
    user = prompts.reduce_user.substitute(title=report.title or report.path,
                                          part_count=len(partials), partials=listing)
    return LLMRequest([{"role": "system", "content": prompts.reduce_system},
                       {"role": "user", "content": user}],
                      ReportSummary, reduce_item_id(report.doc_id, level, group))


def group_partials(partials: Sequence[ReportSummary], max_tokens: int,
                   tokens_per_char: float) -> list[list[int]]:
    """Indexes of ``partials`` grouped (in order) so each group's JSON fits ``max_tokens``.

    A group closes when the next partial would exceed the budget, but never before it
    holds two partials: so each merge level shrinks the list (a pair larger than the budget
    is still merged, the one case where the budget is exceeded). Only the last group can
    hold a single partial; it is carried to the next level without a call."""
    groups: list[list[int]] = []
    current: list[int] = []
    tokens = 0
    for index, partial in enumerate(partials):
        cost = estimate_tokens(summary_json(partial), tokens_per_char)
        if len(current) >= 2 and tokens + cost > max_tokens:
            groups.append(current)
            current, tokens = [], 0
        current.append(index)
        tokens += cost
    if current:
        groups.append(current)
    return groups


# ---------------------------------------------------------------------------- figure validation
# A number as written in Korean reports: 1,284 / 1284 / 7.5 / ５０ (NFKC makes it 50).
_NUMBER = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?")
# Magnitude words that may follow a number ("1,284억", "3.2조 원", "85%"), longest first.
_MAGNITUDES = {"천만": 10 ** 7, "백만": 10 ** 6, "십만": 10 ** 5, "천억": 10 ** 11,
               "백억": 10 ** 10, "십억": 10 ** 9, "만": 10 ** 4, "억": 10 ** 8, "조": 10 ** 12,
               "천": 10 ** 3}
_MAGNITUDE = re.compile(r"\s*(" + "|".join(sorted(_MAGNITUDES, key=len, reverse=True)) + ")")


def _canonical(text: str) -> str:
    return unicodedata.normalize("NFKC", text)


def _decimal(digits: str) -> Optional[Decimal]:
    try:
        return Decimal(digits.replace(",", ""))
    except InvalidOperation:
        return None


def unit_multiplier(unit: Optional[str]) -> int:
    """10^k for a Korean magnitude word at the start of ``unit`` ("억 원" → 10^8), else 1."""
    if not unit:
        return 1
    match = _MAGNITUDE.match(_canonical(unit))
    return _MAGNITUDES[match.group(1)] if match else 1


def source_numbers(text: str) -> set[Decimal]:
    """Every number in ``text`` as written and, when a magnitude word follows it, scaled
    by it ("1,284억" → {1284, 128400000000}). Signs are ignored (reports write losses
    as △12, (12) or -12)."""
    text = _canonical(text)
    numbers: set[Decimal] = set()
    for match in _NUMBER.finditer(text):
        value = _decimal(match.group())
        if value is None:
            continue
        numbers.add(value)
        magnitude = _MAGNITUDE.match(text, match.end())
        if magnitude:
            numbers.add(value * _MAGNITUDES[magnitude.group(1)])
    return numbers


def figure_numbers(value: str, unit: Optional[str]) -> Optional[set[Decimal]]:
    """The values a figure may be written as: its first number as written, scaled by a
    magnitude inside ``value`` ("1,284억") or by ``unit``. ``None`` when ``value`` holds
    no number (then it must occur as text)."""
    text = _canonical(value)
    match = _NUMBER.search(text)
    if match is None:
        return None
    number = _decimal(match.group())
    if number is None:
        return None
    inner = _MAGNITUDE.match(text, match.end())
    scale = _MAGNITUDES[inner.group(1)] if inner else unit_multiplier(unit)
    return {number, number * scale}


def _squash(text: str) -> str:
    return unspaced(_canonical(text))


def value_in_source(value: str, unit: Optional[str], numbers: set[Decimal], squashed: str) -> bool:
    """Whether a figure value occurs in the source (see :func:`figure_numbers`)."""
    wanted = figure_numbers(value, unit)
    if wanted is None:
        return bool(_squash(value)) and _squash(value) in squashed
    return not wanted.isdisjoint(numbers)


@dataclass(frozen=True)
class Validation:
    summary: Optional[ReportSummary]   # None when the summary is unusable
    dropped: tuple[dict[str, Any], ...]  # figures removed as unsupported
    cleared: tuple[str, ...]            # scalar fields set to null as unsupported
    problem: Optional[str] = None       # reject reason when summary is None


def validate_summary(summary: ReportSummary, source_text: str) -> Validation:
    """Drop key figures whose value does not occur in ``source_text``; clear a ticker or
    target price whose number does not occur; strip strings; reject an empty summary."""
    numbers = source_numbers(source_text)
    squashed = _squash(source_text)
    kept, dropped = [], []
    seen = set()
    for figure in summary.key_figures:
        figure = KeyFigure(name=figure.name.strip(), value=figure.value.strip(),
                           unit=(figure.unit or "").strip() or None,
                           period=(figure.period or "").strip() or None)
        identity = (figure.name, figure.value, figure.unit, figure.period)
        if identity in seen:  # a merge repeating one figure is not two figures
            continue
        seen.add(identity)
        if figure.name and value_in_source(figure.value, figure.unit, numbers, squashed):
            kept.append(figure)
        else:
            dropped.append(figure.model_dump())
    updates: dict[str, Any] = {"key_figures": kept, "summary": summary.summary.strip(),
                               "risks": [r.strip() for r in summary.risks if r.strip()]}
    for name in ("company", "report_date", "period", "report_type", "outlook", "rating"):
        value = getattr(summary, name)
        updates[name] = value.strip() or None if value is not None else None
    cleared = []
    for name in ("ticker", "target_price"):
        value = (getattr(summary, name) or "").strip()
        if value and not value_in_source(value, None, numbers, squashed):
            cleared.append(name)
            value = ""
        updates[name] = value or None
    result = summary.model_copy(update=updates)
    if not result.summary:
        return Validation(None, tuple(dropped), tuple(cleared), "empty_summary")
    return Validation(result, tuple(dropped), tuple(cleared))


# ---------------------------------------------------------------------------- the work
@dataclass
class Outcome:
    """What happened to one report."""
    report: Report
    chunks: list[Chunk]
    results: list[Result] = field(default_factory=list)   # every call, in order
    final: Optional[ReportSummary] = None
    reject_reason: Optional[str] = None
    reject_detail: str = ""
    validation: Optional[Validation] = None
    reduce_calls: int = 0


def _failed(outcome: Outcome, result: Result, what: str) -> None:
    outcome.reject_reason = f"llm_{result.error}"
    outcome.reject_detail = f"{what} ({result.item_id}): {result.detail}"[:1000]


async def summarize_reports(reports: Sequence[Report], params: SummarizeParams, llm: LLMClient,
                            prompts: Prompts, log: logging.Logger | None = None) -> list[Outcome]:
    """Map every chunk of every report in one concurrent batch, then merge level by level.

    Returns one :class:`Outcome` per report, in input order; raises only what the LLM
    layer raises (fatal errors, offline cache misses)."""
    log = log or logging.getLogger(__name__)
    outcomes = [_chunk_outcome(report, params, log) for report in reports]

    # Map: every chunk of every report at once (the client bounds concurrency).
    active = [o for o in outcomes if o.reject_reason is None]
    partials = await _map_chunks(active, llm, prompts)

    # Reduce: merge level by level while a report has more than one partial.
    pending = {id(o): o for o in active if o.reject_reason is None and len(partials[id(o)]) > 1}
    level = 1
    while pending:
        await _merge_level(pending, partials, level, params, llm, prompts)
        pending = {k: o for k, o in pending.items()
                   if o.reject_reason is None and len(partials[k]) > 1}
        level += 1

    for outcome in outcomes:
        if outcome.reject_reason is None:
            (final,) = partials[id(outcome)]
            _validate_final(outcome, final, log)
    return outcomes


def _chunk_outcome(report: Report, params: SummarizeParams, log: logging.Logger) -> Outcome:
    """The report's chunks as a fresh :class:`Outcome`, rejected ``empty_report`` when too short."""
    chunks = chunk_report(report, params.max_chunk_tokens, params.tokens_per_char)
    outcome = Outcome(report, chunks)
    chars = sum(len(s.text) for c in chunks for s in c.segments)
    body_chars = len(unspaced(report_source_text(report)))
    if not chunks or body_chars < params.min_report_chars:
        outcome.reject_reason = "empty_report"
        outcome.reject_detail = (f"{body_chars} characters of text and tables in "
                                 f"{len(report.pages)} page(s) < min_report_chars "
                                 f"{params.min_report_chars}")
    else:
        log.info("%s (%s): %d page(s), %d chunk(s), %d chars", report.doc_id, report.path,
                 len(report.pages), len(chunks), chars)
    return outcome


async def _map_chunks(active: Sequence[Outcome], llm: LLMClient,
                      prompts: Prompts) -> dict[int, list[ReportSummary]]:
    """Run one map call per chunk of every active report; return the partials by ``id(outcome)``."""
    requests, owners = [], []
    for outcome in active:
        for chunk in outcome.chunks:
            requests.append(map_request(outcome.report, chunk, len(outcome.chunks), prompts))
            owners.append(outcome)
    results = await llm.run_many(requests, desc="summarize map") if requests else []
    partials: dict[int, list[ReportSummary]] = defaultdict(list)
    for outcome, result in zip(owners, results):
        outcome.results.append(result)
        if outcome.reject_reason is not None:
            continue
        if result.ok:
            partials[id(outcome)].append(result.parsed)  # type: ignore[arg-type]
        else:
            _failed(outcome, result, "map call")
    return partials


async def _merge_level(pending: dict[int, Outcome], partials: dict[int, list[ReportSummary]],
                       level: int, params: SummarizeParams, llm: LLMClient, prompts: Prompts) -> None:
    """Merge each pending report's partials one level up, replacing them in ``partials``."""
    requests, slots = [], []
    plans: dict[int, list[Any]] = {}  # per report: a request index or a carried partial
    for key, outcome in pending.items():
        current = partials[key]
        plan: list[Any] = []
        for number, group in enumerate(group_partials(current, params.max_chunk_tokens,
                                                      params.tokens_per_char)):
            if len(group) == 1:
                plan.append(current[group[0]])
                continue
            plan.append(len(requests))
            requests.append(reduce_request(outcome.report, [current[i] for i in group],
                                           level, number, prompts))
            slots.append(key)
        plans[key] = plan
    results = await llm.run_many(requests, desc=f"summarize merge {level}")
    for key, result in zip(slots, results):
        outcome = pending[key]
        outcome.results.append(result)
        outcome.reduce_calls += 1
        if outcome.reject_reason is None and not result.ok:
            _failed(outcome, result, f"merge call, level {level}")
    for key, plan in plans.items():
        if pending[key].reject_reason is None:
            partials[key] = [results[step].parsed if isinstance(step, int) else step
                             for step in plan]


def _validate_final(outcome: Outcome, final: ReportSummary, log: logging.Logger) -> None:
    """Validate a report's final summary against its source: set ``final`` or the reject."""
    validation = validate_summary(final, report_source_text(outcome.report))
    outcome.validation = validation
    if validation.summary is None:
        outcome.reject_reason = validation.problem
        outcome.reject_detail = "the final summary is empty"
    else:
        outcome.final = validation.summary
    if validation.dropped:
        log.info("%s: dropped %d figure(s) not found in the report: %s",
                 outcome.report.doc_id, len(validation.dropped),
                 "; ".join(f"{f['name']}={f['value']}" for f in validation.dropped))


def summary_record(outcome: Outcome) -> dict[str, Any]:
    """The output ``document`` record of a summarised report."""
    assert outcome.final is not None and outcome.validation is not None
    report, final = outcome.report, outcome.final
    text = summary_json(final)
    usage = {"prompt_tokens": sum(r.usage.prompt_tokens for r in outcome.results),
             "completion_tokens": sum(r.usage.completion_tokens for r in outcome.results)}
    meta = {"input_source": report.source, "source_path": report.path,
            "file_sha256": report.meta.get("file_sha256"), "pages": len(report.pages),
            "chunks": len(outcome.chunks), "calls": len(outcome.results),
            "figures_dropped": list(outcome.validation.dropped),
            "fields_cleared": list(outcome.validation.cleared), "usage": usage}
    return {"id": content_id(report.doc_id, text), "source": OUTPUT_SOURCE,
            "doc_id": report.doc_id, "path": report.path, "page": 0,
            "title": final.company or report.title or report.path, "text": text, "tables": [],
            "meta": json.dumps(meta, ensure_ascii=False, sort_keys=True)}


def reject_record(outcome: Outcome) -> dict[str, str]:
    report = outcome.report
    raw = {"doc_id": report.doc_id, "path": report.path, "pages": len(report.pages),
           "chunks": len(outcome.chunks)}
    last = outcome.results[-1] if outcome.results else None
    if last is not None and last.raw is not None and not last.ok:
        raw["last_answer"] = last.raw[:2000]
    return reject(STAGE, report.source, report.doc_id, outcome.reject_reason or "unknown",
                  outcome.reject_detail, raw)


def build_outputs(outcomes: Sequence[Outcome]) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """Output records, reject records (both by ``doc_id``) and the counts for the metrics."""
    records, rejects = [], []
    reasons: Counter = Counter()
    for outcome in sorted(outcomes, key=lambda o: o.report.doc_id):
        if outcome.final is not None:
            records.append(summary_record(outcome))
        else:
            rejects.append(reject_record(outcome))
            reasons[outcome.reject_reason or "unknown"] += 1
    validations = [o.validation for o in outcomes if o.validation is not None]
    counts = {
        "reports": len(outcomes), "records": len(records), "rejected": len(rejects),
        "rejects_by_reason": dict(sorted(reasons.items())),
        "pages": sum(len(o.report.pages) for o in outcomes),
        "chunks": sum(len(o.chunks) for o in outcomes),
        "multi_chunk_reports": sum(1 for o in outcomes if len(o.chunks) > 1),
        "map_calls": sum(len(o.results) - o.reduce_calls for o in outcomes),
        "reduce_calls": sum(o.reduce_calls for o in outcomes),
        "figures_kept": sum(len(o.final.key_figures) for o in outcomes if o.final is not None),
        "figures_dropped": sum(len(v.dropped) for v in validations),
        "fields_cleared": sum(len(v.cleared) for v in validations),
    }
    return records, rejects, counts


def run(reports: Sequence[Report], params: SummarizeParams, log: logging.Logger | None = None
        ) -> tuple[list[Outcome], Accounting]:
    """Synchronous entry point: summarise ``reports`` with a fresh client."""
    prompts = Prompts.load()
    client_params = params.llm

    async def main() -> tuple[list[Outcome], Accounting]:
        async with LLMClient(client_params, logger=log) as llm:
            return await summarize_reports(reports, params, llm, prompts, log), llm.accounting
    return asyncio.run(main())


# ---------------------------------------------------------------------------- the stage
def read_reports(path: str) -> list[Report]:
    require_input(path, "summarize --input", "run extract@krx_reports")
    records = pq.read_table(path).to_pylist()
    try:
        validate_table("document", records)
    except ValueError as exc:
        raise StageError(f"summarize: input {path!r}: {exc}") from exc
    if not records:
        raise StageError(f"summarize: input {path!r} holds no pages")
    return group_reports(records)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = stage_parser(__doc__, out_help="one summary record per report (Parquet)", cache_dir=True)
    parser.add_argument("--input", required=True, help="page records of the reports (Parquet)")
    return parser.parse_args(argv)


@stage_main
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    params = load_params(None, args.params, args.cache_dir)
    cache_dir = params.llm.cache_dir
    timer = Timer()
    log = setup_logging(args.log, STAGE)
    reports = read_reports(args.input)
    log.info("%d report(s) from %s; chunk budget %d tokens; cache %s", len(reports), args.input,
             params.max_chunk_tokens, cache_dir)
    outcomes, accounting = run(reports, params, log)
    records, rejects, counts = build_outputs(outcomes)
    validate_table("document", records)
    for record in rejects:
        problems = validate("reject", record)
        assert not problems, problems
        log.warning("rejected %s: %s (%s)", record["item"], record["reason"], record["detail"])
    write_records(rejects, SCHEMAS["reject"], args.rejects)
    check_reject_rate(counts["rejected"], counts["reports"], params.max_reject_rate,
                      f"summarize (reports; rejects in {args.rejects})")
    write_records(records, SCHEMAS["document"], args.out)
    metrics = {**counts, "llm": accounting.as_metrics(), "seconds": timer.seconds}
    write_metrics(args.metrics, metrics)
    log.info("%d report(s) → %d summaries, %d rejected %s; %d map + %d merge calls "
             "(%d paid, %d cached); %d figure(s) dropped; $%.4f; %.1f s", counts["reports"],
             counts["records"], counts["rejected"], counts["rejects_by_reason"],
             counts["map_calls"], counts["reduce_calls"], accounting.calls,
             accounting.cache_hits, counts["figures_dropped"], accounting.cost_usd, timer.seconds)


if __name__ == "__main__":
    main()
