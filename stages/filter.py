"""filter@<domain>: keep the items that are about the domain — local prefilter, then an LLM judge.

Contract:
- input (``params.filter.<domain>.input``: one file or a list of up to
  :data:`MAX_INPUTS`, all of one kind, read in order; dvc.yaml tracks them through
  ``dvc.vars.yaml``'s ``filter_inputs`` and ``--inputs`` must name exactly them): mcq records
  (KMMLU; only ``splits``, never ``test``), or document pages (``extract@rules``), which are first cut into chunks of at
  most ``chunking.size`` characters along article (``제N조``) and paragraph boundaries, with
  up to ``chunking.overlap`` characters of whole trailing paragraphs repeated; each chunk is
  a document record with a stable id (``doc_id``/``page`` of where it starts; its pages in meta);
- prefilter (pure, no LLM): quality rules — ``too_short`` (an MCQ's question), ``not_korean``
  (Hangul share of the letters), ``mostly_digits`` (share of the non-space characters) — then a Korean-aware lexicon score (terms matched once,
  spacing- and case-insensitively, weights from params) below ``min_score`` is
  ``low_domain_score``. Only survivors reach the judge;
- judge: one structured verdict per item (:class:`Verdict`: ``relevant``, ``reason``) with the
  domain's ``criteria``; ``relevant: false`` is recorded as a reject ``not_relevant`` with the
  judge's reason; a judge *failure* (transport error, invalid answer after re-asks, …) is a
  reject ``judge_<reason>`` — never "not relevant" — and only these count towards
  ``max_reject_rate`` (of the items judged). Offline mode with missing cache entries stops
  the stage listing them (``CacheMissError``);
- output: the kept records (mcq or document), input order, ``domain`` = the stage key, meta
  extended with ``filter`` = {score, matched terms, judge reason, tokens}; rejects with
  reasons; metrics with prefilter/judge counts and LLM tokens and cost.
"""
from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union

from pydantic import BaseModel, Field, field_validator, model_validator

from stages.common.chunking import Chunk, Segment, chunk_segments
from stages.common.io import read_records, write_records
from stages.common.llm import LLMParams, LLMRequest, Result, read_llm_section, run_batch
from stages.common.params import PARAMS_FILE, Strict
from stages.common.prompts import lettered, render_template
from stages.common.runlog import (StageError, begin_stage, check_reject_rate, require_input,
                                  stage_main, stage_parser, write_metrics)
from stages.common.schema import SCHEMAS, reject, validate_table
from stages.common.text import content_id, hangul_ratio, normalize_text, unspaced

PARAMS = ("filter.{key}", "llm_defaults")
STAGE = "filter"
TEMPLATES = ("filter_system.txt", "filter_user_mcq.txt", "filter_user_document.txt")


# ---------------------------------------------------------------------------- params
class PrefilterParams(Strict):
    """The cheap local prefilter in front of the LLM judge (stages/filter.py)."""
    keywords: dict[str, float] = Field(
        min_length=1, description="lexicon term -> weight (negative: off-domain); each term counts "
                                  "once, matched case- and spacing-insensitively (주식 시장 = 주식시장)")
    min_score: float = Field(description="sum of matched weights an item needs to reach the judge")
    min_chars: int = Field(ge=0, description="text shorter than this (spaces not counted) is too_short")
    min_hangul_share: float = Field(ge=0, le=1, description="Hangul share of the letters below which "
                                                            "text is not_korean")
    max_digit_share: float = Field(ge=0, le=1, description="digit share of the non-space characters "
                                                           "above which text is mostly_digits")


class ChunkingParams(Strict):
    size: int = Field(gt=0, description="characters per chunk at most (a longer sentence is cut)")
    overlap: int = Field(ge=0, description="characters of whole trailing paragraphs/articles repeated "
                                           "at the start of the next chunk, at most")

    @model_validator(mode="after")
    def _overlap_below_size(self) -> "ChunkingParams":
        if self.overlap >= self.size:
            raise ValueError("overlap must be smaller than size")
        return self


MAX_INPUTS = 3  # dvc.yaml's filter dep slots ${item.a} ${item.b} ${item.c}


class FilterParams(Strict):
    input: Union[str, list[str]] = Field(description=(
        "parquet of mcq records (KMMLU) or document pages (extract@rules); a list pools several "
        f"(at most {MAX_INPUTS}, e.g. KMMLU subjects) into the one domain"))
    splits: list[Literal["train", "dev"]] = Field(
        default_factory=lambda: ["train"], min_length=1,
        description="mcq splits used; never test (the evaluation set)")
    criteria: str = Field(min_length=1, description="the domain's relevance criteria for the judge (Korean)")
    prefilter: PrefilterParams
    chunking: Optional[ChunkingParams] = Field(None, description="document inputs only: page text -> chunks")
    max_reject_rate: float = Field(0.2, ge=0, le=1, description="judge errors / items judged")
    llm: LLMParams

    @field_validator("input")
    @classmethod
    def _input_list(cls, value: Union[str, list[str]]) -> Union[str, list[str]]:
        files = [value] if isinstance(value, str) else value
        if not 1 <= len(files) <= MAX_INPUTS or len(set(files)) != len(files):
            raise ValueError(f"one file or a list of 1-{MAX_INPUTS} distinct files, got {value!r}")
        return value

    @property
    def inputs(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


# A new chunk starts at a statute article (제3조, 제3조의2), a chapter/section heading, or
# the addenda (부칙) — the units a Korean enforcement rule is cited by.
_HEADING = re.compile(r"^\s*(제\s*\d+\s*(조(의\s*\d+)?|장|절|관)(\s|\(|$)|부\s*칙)")
_SENTENCE_END = re.compile(r"(?<=[.!?。])\s+")
# The start of an article's 항 (①), 호 (1.) or 목 (가.): where a long article is cut first.
_ITEM = re.compile(r"^\s*([\u2460-\u2473]|\d{1,2}\.\s|\d{1,2}\)|[가-하]\.\s)")


def load_params(key: str, path: str = PARAMS_FILE, cache_dir: str | None = None) -> FilterParams:
    """``filter.<key>`` with ``llm_defaults`` merged under its ``llm``."""
    return read_llm_section(PARAMS, FilterParams, key, path, cache_dir)


class Verdict(BaseModel):
    """The judge's structured answer."""
    relevant: bool = Field(description="the item matches the domain criteria and is usable")
    reason: str = Field(description="one or two sentences in Korean")


# ---------------------------------------------------------------------------- prefilter
@dataclass(frozen=True)
class Prefiltered:
    """Outcome of the local prefilter: ``reason`` is None when the item goes to the judge."""
    score: float
    matched: tuple[str, ...]
    reason: Optional[str] = None
    detail: str = ""


def _squash(text: str) -> str:
    """NFC, case-folded, without whitespace: the form lexicon terms are matched in, so that
    Korean spacing variants (주식 시장 / 주식시장) and ETF/etf match alike."""
    return unspaced(unicodedata.normalize("NFC", text)).casefold()


def keyword_score(text: str, keywords: dict[str, float]) -> tuple[float, tuple[str, ...]]:
    """Sum of the weights of the lexicon terms found in ``text`` (each term once) and the
    terms found, in lexicon order. Substring matching suits Korean: particles attach to the
    noun (주식시장에서, 채권의), so a term is found inside its inflected word."""
    squashed = _squash(text)
    matched = tuple(term for term in keywords if _squash(term) and _squash(term) in squashed)
    return round(sum(keywords[t] for t in matched), 6), matched


def digit_share(text: str) -> float:
    chars = [c for c in text if not c.isspace()]
    return sum(c.isdigit() for c in chars) / len(chars) if chars else 0.0


def hangul_letter_share(text: str) -> float:
    """Hangul share of the letters only: digits and punctuation are judged apart
    (``mostly_digits``), so a calculation question in Korean is not "non-Korean"."""
    letters = "".join(c for c in text if c.isalpha())
    return hangul_ratio(letters) if letters else 0.0


def quality_problem(text: str, params: PrefilterParams, length_text: Optional[str] = None
                    ) -> Optional[tuple[str, str]]:
    """The first rule-based quality problem as ``(reason, detail)``, or None: ``too_short``
    (``length_text``, default ``text``), then ``not_korean`` and ``mostly_digits`` on ``text``."""
    length = len(unspaced(length_text if length_text is not None else text))
    if length < params.min_chars:
        return "too_short", f"{length} characters < min_chars {params.min_chars}"
    share = hangul_letter_share(text)
    if share < params.min_hangul_share:
        return "not_korean", f"Hangul share of letters {share:.2f} < {params.min_hangul_share}"
    digits = digit_share(text)
    if digits > params.max_digit_share:
        return "mostly_digits", f"digit share {digits:.2f} > {params.max_digit_share}"
    return None


def prefilter(text: str, params: PrefilterParams, length_text: Optional[str] = None) -> Prefiltered:
    """Quality rules (length on ``length_text``, default ``text``), then the lexicon score."""
    score, matched = keyword_score(text, params.keywords)
    problem = quality_problem(text, params, length_text)
    if problem:
        return Prefiltered(score, matched, *problem)
    if score < params.min_score:
        return Prefiltered(score, matched, "low_domain_score",
                           f"score {score:g} < min_score {params.min_score:g} (matched: "
                           f"{', '.join(matched) or 'none'})")
    return Prefiltered(score, matched)


def item_text(record: dict[str, Any]) -> tuple[str, str]:
    """(whole text, text whose length counts) of an mcq or document record. An MCQ's
    length is its question's; its language and digit shares are the whole item's, so that a
    short question with an English term (VaR) or numeric choices is judged on everything."""
    if "choices" in record:
        return record["question"] + "\n" + "\n".join(record["choices"]), record["question"]
    return record["text"], record["text"]


# ---------------------------------------------------------------------------- chunking
def segments(pages: Sequence[tuple[int, str]]) -> list[Segment]:
    """Paragraph/article units of a document's pages, in order: a unit starts at an article
    or chapter heading line (제N조, 제N장, 부칙) or after a blank line; lines wrapped by the
    PDF layout stay together. An article continuing on the next page starts a new unit
    there (so each unit has one page)."""
    units: list[Segment] = []
    for page, text in pages:
        current: list[str] = []
        for line in normalize_text(text).split("\n"):
            if not line.strip() or _HEADING.match(line):
                if current:
                    units.append(Segment(page, "\n".join(current)))
                current = [line] if line.strip() else []
            else:
                current.append(line)
        if current:
            units.append(Segment(page, "\n".join(current)))
    return units


def _pack(parts: Sequence[str], size: int, sep: str) -> list[str]:
    """Join consecutive ``parts`` with ``sep`` into pieces of at most ``size`` characters,
    balanced: a piece closes once it reaches the average length the total needs, so a long
    article becomes two halves rather than a full piece and a scrap."""
    total = sum(len(part) for part in parts) + len(sep) * max(0, len(parts) - 1)
    target = total / max(1, -(-total // size))
    packed: list[str] = []
    current = ""
    for part in parts:
        candidate = f"{current}{sep}{part}" if current else part
        if current and (len(candidate) > size or len(current) >= target):
            packed.append(current)
            current = part
        else:
            current = candidate
    if current:
        packed.append(current)
    return packed


def _split_long(unit: Segment, size: int) -> list[Segment]:
    """A unit longer than ``size`` is cut at its items first (lines starting ①, 1., 가.:
    the 항/호/목 of an article), then at sentence ends, and hard at ``size`` only inside a
    single sentence longer than that."""
    if len(unit.text) <= size:
        return [unit]
    items: list[str] = []
    for line in unit.text.split("\n"):
        if items and not _ITEM.match(line):
            items[-1] += "\n" + line
        else:
            items.append(line)
    pieces: list[str] = []
    for item in items:
        if len(item) <= size:
            pieces.append(item)
            continue
        sentences: list[str] = []
        for sentence in _SENTENCE_END.split(item):
            sentences += [sentence[i:i + size] for i in range(0, len(sentence), size)]
        pieces += _pack([s for s in sentences if s.strip()], size, " ")
    return [Segment(unit.page, piece.strip()) for piece in _pack(pieces, size, "\n") if piece.strip()]


def chunk_units(units: Sequence[Segment], params: ChunkingParams) -> list[Chunk]:
    """Units packed into chunks of at most ``size`` characters (joined by a newline); the next
    chunk starts with the whole trailing units of the previous one that fit in ``overlap``."""
    pieces = [piece for unit in units for piece in _split_long(unit, params.size)]
    return chunk_segments(pieces, lambda u: len(u.text), params.size, "\n", 1, params.overlap)


def chunk_documents(pages: list[dict[str, Any]], params: ChunkingParams, source: str
                    ) -> list[dict[str, Any]]:
    """Document page records -> chunk document records (documents in first-seen order)."""
    by_doc: dict[str, list[dict[str, Any]]] = {}
    for page in pages:
        by_doc.setdefault(page["doc_id"], []).append(page)
    records = []
    for doc_id, doc_pages in by_doc.items():
        doc_pages = sorted(doc_pages, key=lambda p: p["page"])
        first = doc_pages[0]
        units = segments([(p["page"], p["text"]) for p in doc_pages])
        page_ids = {p["page"]: p["id"] for p in doc_pages}
        for chunk in chunk_units(units, params):
            meta = {"chunk_index": chunk.index, "pages": list(chunk.pages),
                    "page_ids": [page_ids[n] for n in chunk.pages],
                    "file_sha256": json.loads(first["meta"] or "{}").get("file_sha256")}
            records.append({
                "id": content_id("chunk", doc_id, chunk.index, chunk.text), "source": source,
                "doc_id": doc_id, "path": first["path"], "page": chunk.pages[0],
                "title": first["title"], "text": chunk.text, "tables": [],
                "meta": json.dumps(meta, ensure_ascii=False, sort_keys=True)})
    return records


# ---------------------------------------------------------------------------- judge
def judge_messages(record: dict[str, Any], criteria: str) -> list[dict[str, str]]:
    system = render_template("filter_system.txt", criteria=criteria.strip())
    if "choices" in record:
        user = render_template("filter_user_mcq.txt", question=record["question"],
                               choices=lettered(record["choices"]))
    else:
        user = render_template("filter_user_document.txt", title=record["title"] or record["doc_id"],
                               text=record["text"])
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


@dataclass
class FilterOutcome:
    kept: list[dict[str, Any]]
    rejects: list[dict[str, str]]
    counts: Counter


def select_candidates(records: list[dict[str, Any]], params: FilterParams, key: str
                      ) -> tuple[list[tuple[dict[str, Any], Prefiltered]], list[dict[str, str]], Counter]:
    """Prefilter: (survivors with their outcome, rejects, counts). Pure."""
    counts: Counter = Counter(items=len(records))
    survivors, rejects = [], []
    for record in records:
        text, length_text = item_text(record)
        outcome = prefilter(text, params.prefilter, length_text)
        if outcome.reason:
            counts[f"prefilter_{outcome.reason}"] += 1
            rejects.append(reject(STAGE, key, record["id"], outcome.reason, outcome.detail,
                                  {"score": outcome.score, "matched": list(outcome.matched)}))
        else:
            survivors.append((record, outcome))
    counts["prefilter_passed"] = len(survivors)
    return survivors, rejects, counts


def apply_verdicts(survivors: list[tuple[dict[str, Any], Prefiltered]], results: list[Result],
                   key: str) -> FilterOutcome:
    """Judge results -> kept records / rejects. Pure. A result without a verdict is a
    ``judge_<reason>`` reject, never a "not relevant"."""
    kept, rejects = [], []
    counts: Counter = Counter()
    for (record, outcome), result in zip(survivors, results, strict=True):
        if not result.ok:
            counts["judge_errors"] += 1
            rejects.append(reject(STAGE, key, record["id"], f"judge_{result.error}", result.detail,
                                  {"raw": result.raw}))
            continue
        verdict: Verdict = result.parsed  # type: ignore[assignment]
        if not verdict.relevant:
            counts["not_relevant"] += 1
            rejects.append(reject(STAGE, key, record["id"], "not_relevant", verdict.reason,
                                  {"score": outcome.score, "matched": list(outcome.matched)}))
            continue
        counts["relevant"] += 1
        meta = json.loads(record["meta"] or "{}")
        meta["filter"] = {"score": outcome.score, "matched": list(outcome.matched),
                          "judge_reason": verdict.reason,
                          "tokens": {"prompt": result.usage.prompt_tokens,
                                     "completion": result.usage.completion_tokens}}
        kept.append({**record, "meta": json.dumps(meta, ensure_ascii=False, sort_keys=True)}
                    | ({"domain": key} if "domain" in record else {}))
    return FilterOutcome(kept, rejects, counts)


def load_items(params: FilterParams, key: str) -> tuple[str, list[dict[str, Any]], Counter]:
    """(kind, records to filter, counts): mcq of the wanted splits, or chunks of pages, from
    every input in order (all of one kind)."""
    kinds, records = set(), []
    for path in map(Path, params.inputs):
        require_input(path, f"filter.{key}.input", "run its collect/extract stage first")
        got = read_records(path)
        if got:
            kinds.add(_record_kind(got, path, key))
        records += got
    if not records:
        raise StageError(f"filter@{key}: input {', '.join(params.inputs)} has no records")
    if len(kinds) > 1:
        raise StageError(f"filter@{key}: inputs {params.inputs} mix {sorted(kinds)} records")
    counts: Counter = Counter()
    if kinds == {"mcq"}:
        validate_table("mcq", records)
        wanted = [r for r in records if r["split"] in params.splits]
        counts["split_skipped"] = len(records) - len(wanted)
        return "mcq", wanted, counts
    validate_table("document", records)
    if params.chunking is None:
        raise StageError(f"filter@{key}: {params.inputs} hold documents; set filter.{key}.chunking")
    counts["pages"] = len(records)
    chunks = chunk_documents(records, params.chunking, key)
    validate_table("document", chunks)
    return "document", chunks, counts


def _record_kind(records: list[dict[str, Any]], path: Path, key: str) -> str:
    columns = set(records[0])
    for kind in ("mcq", "document"):
        if columns == set(SCHEMAS[kind].names):
            return kind
    raise StageError(f"filter@{key}: {path} holds neither mcq nor document records "
                     f"(columns {sorted(columns)})")


def check_declared_inputs(params: FilterParams, declared: list[str], key: str) -> None:
    """DVC must track exactly the files read, or a changed input would not re-filter."""
    if set(declared) != set(params.inputs):
        raise StageError(f"filter.{key}.input: dvc.yaml tracks {sorted(set(declared))} but the "
                         f"params read {sorted(params.inputs)}; run `python -m stages.dvc_vars` "
                         "(dvc.vars.yaml is derived from params.yaml)")


@stage_main
def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__, "domain", cache_dir=True)
    parser.add_argument("--inputs", nargs="+", help="the files dvc.yaml tracks (checked against "
                        "the params; default: the params' input)")
    args = parser.parse_args(argv)
    key = args.domain
    params, log, timer = begin_stage(args, "filter", key,
                                     lambda k, path: load_params(k, path, args.cache_dir))
    if args.inputs is not None:
        check_declared_inputs(params, args.inputs, key)

    kind, records, counts = load_items(params, key)
    survivors, rejects, prefilter_counts = select_candidates(records, params, key)
    counts.update(prefilter_counts)
    log.info("%d %s items, %d pass the prefilter; judging with %s", len(records), kind,
             len(survivors), params.llm.model)
    requests = [LLMRequest(judge_messages(record, params.criteria), Verdict, record["id"])
                for record, _ in survivors]
    results, accounting = run_batch(params.llm, requests, logger=log, desc=f"filter@{key}")
    outcome = apply_verdicts(survivors, results, key)
    counts.update(outcome.counts)
    rejects += outcome.rejects
    for r in rejects:
        log.info("reject %s: %s %s", r["item"], r["reason"], r["detail"])
    write_records(rejects, SCHEMAS["reject"], args.rejects)
    check_reject_rate(counts["judge_errors"], len(survivors), params.max_reject_rate, f"filter@{key}")
    if records and not outcome.kept:
        raise StageError(f"filter@{key}: no item of {len(records)} was kept; see {args.rejects}")
    validate_table(kind, outcome.kept)
    write_records(outcome.kept, SCHEMAS[kind], args.out)
    reasons = Counter(r["reason"] for r in rejects)
    metrics = {"kind": kind, "items": len(records), "records": len(outcome.kept),
               "prefilter_passed": len(survivors), "judged": len(survivors),
               "relevant": counts["relevant"], "not_relevant": counts["not_relevant"],
               "rejected": counts["judge_errors"], "rejects_by_reason": dict(sorted(reasons.items())),
               "llm": accounting.as_metrics(), "seconds": timer.seconds}
    if kind == "mcq":
        metrics["split_skipped"] = counts["split_skipped"]
    else:
        metrics["pages"] = counts["pages"]
    write_metrics(args.metrics, metrics)
    log.info("%d kept of %d (%d not relevant, %d judge errors, %d prefiltered) -> %s; "
             "%d LLM calls, %d cached, $%.4f", len(outcome.kept), len(records),
             counts["not_relevant"], counts["judge_errors"], len(records) - len(survivors),
             args.out, accounting.calls, accounting.cache_hits, accounting.cost_usd)


if __name__ == "__main__":
    main()
