"""company: the chunks domestic-company questions are written from, no LLM -> data/generated/company/chunks.parquet.

``synthesize@company`` writes each question from one of these chunks (grounded, like
``rules``: its supporting quote must occur in the chunk; a figure the key states must be in it,
and a ratio is recomputed from the figures it quotes); ``solve@company`` verifies the keys.
Params: ``company`` (schema :class:`CompanyParams`).

- **Documents**: the company profiles (``inputs.profiles``: the collected top-100 companies
  JSON, one document per company, whose titles are the company names) and the business
  reports (``inputs.reports``: the extracted pages of the team's report PDFs, one document per
  page, grouped by PDF). A report is assigned to the company its title names, else the one its
  pages name most (:mod:`stages.common.companies`: names matched on their core, "(주)" and
  spacing ignored), among the profiles' names and ``companies`` (report companies outside the
  top 100). A report that names no known company is a reject (``no_company``), never guessed.
- **Chunks**: a document's text lines and its tables (one row per line, cells joined by
  " | ", a table longer than a chunk cut between rows with its header repeated) packed in order
  into chunks of at most ``chunk_chars`` (:func:`stages.common.chunking.pack`), each headed by
  the company and the document, so a question written from it can name them.
- **Selection without an LLM judge**: a chunk needs at least ``min_figures`` figures (numbers
  that are not dates or article numbers); it is scored by its figures (up to 10) and its
  section keywords (``keywords``: weights, e.g. 매출액, 영업이익, 주요 제품). Per company the
  best ``max_chunks_per_company``; then ``budget.train`` / ``budget.test`` chunks in rounds over
  the companies (each company's next-best chunk per round, companies in name order), so the
  budget spreads over companies instead of going to the one with the longest report.
- **Held-out companies** (``held_out``, names): their chunks are the ``test`` split (meta
  ``split``), so their questions are evaluation items only; ``mix`` keeps every record naming
  them out of every source of every version (``company.held_out`` is a mix param). A held-out
  name that is not a known company, or names no document, fails the stage: a typo would
  otherwise hold nothing out.
- rejects (``data/rejects/company.parquet``): reports without a company. Counts of chunks
  without enough figures and over the budget are in the metrics.
"""
from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

from pydantic import Field, model_validator

from stages.common.chunking import pack
from stages.common.companies import CompanyMatcher, core_name
from stages.common.io import read_records, write_records
from stages.common.params import PARAMS_FILE, Strict, read_section
from stages.common.runlog import (StageError, begin_stage, require_input, stage_main,
                                  stage_parser, write_metrics)
from stages.common.schema import SCHEMAS, reject, validate_table
from stages.common.text import content_id, normalize_text

PARAMS = ("company",)
STAGE = "company"
MAX_FIGURE_SCORE = 10
# A figure: digits (thousands separators, decimals) not part of a date ("2024년", "12월 31일"),
# a period ("제15기"), an article ("제3조") or an identifier (letters or digits around it).
FIGURE = re.compile(r"(?<![\w.,])(\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\w,]|\s*(?:년|월|일|기|조|항|호)(?!\w))")
# A figure followed by a unit counts even where a Korean unit word follows directly.
FIGURE_WITH_UNIT = re.compile(r"(?<![\w.,])(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?\s*(?:%|배|원|억|조원|만|천|백만|주|명|개)")


class CompanyInputs(Strict):
    profiles: str = Field(description="collected company profiles (top-100 JSON): titles are the names")
    reports: str = Field(description="extracted business-report pages (document records)")


class CompanyBudget(Strict):
    train: int = Field(ge=0, description="chunks of the training companies")
    test: int = Field(ge=0, description="chunks of the held-out companies")


class CompanyParams(Strict):
    inputs: CompanyInputs
    companies: list[str] = Field(default_factory=list, description=(
        "report companies beyond the profiles' names (a report naming none is a reject)"))
    held_out: list[str] = Field(min_length=1, description="companies whose chunks are the test split only")
    chunk_chars: int = Field(1200, ge=200, le=20000, description="characters per chunk")
    min_figures: int = Field(2, ge=0, description="figures a chunk needs to be chosen")
    keywords: dict[str, float] = Field(default_factory=dict, description="section keywords and weights")
    max_chunks_per_company: int = Field(20, ge=1)
    budget: CompanyBudget

    @model_validator(mode="after")
    def _held_out_distinct(self) -> "CompanyParams":
        cores = [core_name(n) for n in self.held_out]
        if len(set(cores)) != len(cores):
            raise ValueError(f"held_out names a company twice: {self.held_out}")
        return self


def load_params(key: None = None, path: str = PARAMS_FILE) -> CompanyParams:
    return read_section(PARAMS, CompanyParams, path=path)


# --------------------------------------------------------------------------- documents
@dataclass
class Document:
    doc_id: str
    title: str
    path: str
    source: str
    pages: list[dict[str, Any]]     # document records, page order

    @property
    def text(self) -> str:
        return "\n".join(p["text"] for p in self.pages)


def group_documents(records: list[dict[str, Any]]) -> list[Document]:
    """Pages grouped by ``doc_id`` (first-seen order), each document's pages in page order."""
    docs: dict[str, Document] = {}
    for r in records:
        doc = docs.setdefault(r["doc_id"], Document(r["doc_id"], r.get("title") or "",
                                                    r["path"], r["source"], []))
        doc.pages.append(r)
    for doc in docs.values():
        doc.pages.sort(key=lambda p: p["page"])
    return list(docs.values())


def table_pieces(table: list[list[str]], limit: int) -> list[str]:
    """A table as lines ``cell | cell``; cut between rows under ``limit`` characters, the
    header row repeated at the top of every part."""
    rows = [" | ".join(normalize_text(c) for c in row) for row in table if any(str(c).strip() for c in row)]
    if not rows:
        return []
    header, body = rows[0], rows[1:]
    parts = pack(body, len, max(1, limit - len(header) - 1), joiner_cost=1) if body else [[]]
    return ["\n".join([header, *part]) for part in parts]


def pieces_of(doc: Document, limit: int) -> list[tuple[int, str]]:
    """(page, piece) in reading order: the text lines of each page, then its tables."""
    pieces = []
    for page in doc.pages:
        for line in normalize_text(page["text"]).split("\n"):
            if line.strip():
                pieces.append((page["page"], line[:limit]))
        for table in page.get("tables") or []:
            pieces += [(page["page"], t) for t in table_pieces(table, limit)]
    return pieces


def figures_in(text: str) -> int:
    """Figures in a chunk (module docstring): numbers that are not dates, periods or articles."""
    plain = {m.start() for m in FIGURE.finditer(text)}
    with_unit = {m.start() for m in FIGURE_WITH_UNIT.finditer(text)}
    return len(plain | with_unit)


def keyword_score(text: str, keywords: dict[str, float]) -> float:
    flat = re.sub(r"\s+", "", text)
    return round(sum(w for k, w in keywords.items() if re.sub(r"\s+", "", k) in flat), 3)


@dataclass
class Candidate:
    record: dict[str, Any]
    company: str
    score: float


def chunk_document(doc: Document, company: str, split: str, params: CompanyParams,
                   counts: Counter) -> list[Candidate]:
    """The document's chunks that have figures enough, scored (module docstring)."""
    header = f"[회사] {company} · [문서] {doc.title or doc.path}"
    budget = max(100, params.chunk_chars - len(header) - 1)
    pieces = pieces_of(doc, budget)
    groups = pack(pieces, lambda p: len(p[1]), budget, joiner_cost=1)
    found = []
    for index, group in enumerate(groups):
        body = "\n".join(text for _, text in group)
        figures = figures_in(body)
        counts["chunks_seen"] += 1
        if figures < params.min_figures:
            counts["chunks_without_figures"] += 1
            continue
        keywords = keyword_score(body, params.keywords)
        score = round(min(figures, MAX_FIGURE_SCORE) + keywords, 3)
        pages = sorted({p for p, _ in group})
        text = f"{header}\n{body}"
        meta = {"company": company, "split": split, "doc_title": doc.title, "doc_source": doc.source,
                "pages": pages, "chunk_index": index, "figures": figures,
                "keyword_score": keywords, "score": score}
        record = {"id": content_id("company-chunk", doc.doc_id, index, text), "source": STAGE,
                  "doc_id": doc.doc_id, "path": doc.path, "page": pages[0], "title": company,
                  "text": text, "tables": [],
                  "meta": json.dumps(meta, ensure_ascii=False, sort_keys=True)}
        found.append(Candidate(record, company, score))
    return found


def select(candidates: list[Candidate], per_company: int, budget: int, counts: Counter,
           split: str) -> list[dict[str, Any]]:
    """Best ``per_company`` per company (score, then id), then ``budget`` in rounds over the
    companies in name order (module docstring)."""
    by_company: dict[str, list[Candidate]] = defaultdict(list)
    for c in candidates:
        by_company[c.company].append(c)
    ranked = {}
    for company, found in by_company.items():
        found.sort(key=lambda c: (-c.score, c.record["id"]))
        ranked[company] = found[:per_company]
        counts[f"{split}_over_company_cap"] += len(found) - len(ranked[company])
    chosen: list[dict[str, Any]] = []
    depth = 0
    while len(chosen) < budget and any(depth < len(v) for v in ranked.values()):
        for company in sorted(ranked):
            if depth < len(ranked[company]) and len(chosen) < budget:
                chosen.append(ranked[company][depth].record)
        depth += 1
    counts[f"{split}_over_budget"] += sum(len(v) for v in ranked.values()) - len(chosen)
    return chosen


def build_chunks(profiles: list[dict[str, Any]], reports: list[dict[str, Any]],
                 params: CompanyParams) -> tuple[list[dict[str, Any]], list[dict[str, str]], dict[str, Any]]:
    """(chunk records, rejects, metrics) — the whole stage without its I/O."""
    names = [p["title"] for p in profiles if p.get("title")] + list(params.companies)
    try:
        matcher = CompanyMatcher(names)
    except ValueError as exc:
        raise StageError(f"company: {exc}") from None
    held = {core_name(n) for n in params.held_out}
    unknown = sorted(n for n in params.held_out if core_name(n) not in matcher.names)
    if unknown:
        raise StageError(f"company.held_out: {unknown} are not companies of the profiles "
                         f"({params.inputs.profiles}) or company.companies")
    counts: Counter = Counter()
    rejects: list[dict[str, str]] = []
    candidates: dict[str, list[Candidate]] = {"train": [], "test": []}
    docs_of: Counter = Counter()
    profile_docs = group_documents(profiles)
    for doc in profile_docs + group_documents(reports):
        company = (matcher.names[core_name(doc.title)] if doc in profile_docs
                   else matcher.main_company(doc.title, doc.text))
        if company is None:
            rejects.append(reject(STAGE, doc.source, doc.doc_id, "no_company",
                                  f"{doc.path}: names none of the {len(matcher.names)} known companies"))
            continue
        split = "test" if core_name(company) in held else "train"
        docs_of[company] += 1
        candidates[split] += chunk_document(doc, company, split, params, counts)
    missing = sorted(n for n in params.held_out if matcher.names[core_name(n)] not in docs_of)
    if missing:
        raise StageError(f"company.held_out: no document is about {missing}")
    chosen = {split: select(found, params.max_chunks_per_company,
                            getattr(params.budget, split), counts, split)
              for split, found in candidates.items()}
    records = sorted(chosen["train"] + chosen["test"], key=lambda r: r["id"])
    metrics = {"records": len(records),
               "documents": sum(docs_of.values()) + len(rejects), "no_company": len(rejects),
               "companies": {"train": sum(core_name(c) not in held for c in docs_of),
                             "test": sum(core_name(c) in held for c in docs_of)},
               "chunks_seen": counts["chunks_seen"],
               "chunks_without_figures": counts["chunks_without_figures"],
               "candidates": {s: len(v) for s, v in candidates.items()},
               "chunks": {s: len(v) for s, v in chosen.items()},
               "over_company_cap": {s: counts[f"{s}_over_company_cap"] for s in candidates},
               "over_budget": {s: counts[f"{s}_over_budget"] for s in candidates},
               # numbers only: DVC reads a metrics file whose first bytes are mostly non-ASCII
               # (a hundred Korean company names) as binary and fails the stage
               "chunks_per_company": spread(Counter(json.loads(r["meta"])["company"] for r in records))}
    return records, rejects, metrics


def spread(counts: Counter) -> dict[str, float]:
    values = sorted(counts.values()) or [0]
    return {"companies": len(counts), "min": values[0], "median": values[len(values) // 2],
            "max": values[-1]}


@stage_main
def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__)
    args = parser.parse_args(argv)
    params, log, timer = begin_stage(args, STAGE, None, lambda _k, path: load_params(path=path))
    loaded = {}
    for name in ("profiles", "reports"):
        path = getattr(params.inputs, name)
        require_input(path, f"company.inputs.{name}")
        records = read_records(path)
        validate_table("document", records)
        loaded[name] = records
        log.info("%d documents records from %s", len(records), path)
    if not loaded["profiles"]:
        raise StageError(f"company.inputs.profiles: {params.inputs.profiles} holds no company")
    records, rejects, metrics = build_chunks(loaded["profiles"], loaded["reports"], params)
    log.info("held out (test split): %s", ", ".join(params.held_out))
    log.info("chunks by company: %s", dict(sorted(Counter(
        json.loads(r["meta"])["company"] for r in records).items())))
    write_records(rejects, SCHEMAS["reject"], args.rejects)
    validate_table("document", records)
    if not records:
        raise StageError("company: no chunk has figures enough (min_figures) — nothing to write from")
    write_records(records, SCHEMAS["document"], args.out)
    metrics["seconds"] = timer.seconds
    write_metrics(args.metrics, metrics)
    log.info("%d chunks (%d train, %d test) of %d companies; %d reports without a company -> %s (%.1fs)",
             len(records), metrics["chunks"]["train"], metrics["chunks"]["test"],
             metrics["companies"]["train"] + metrics["companies"]["test"],
             len(rejects), args.out, timer.seconds)


if __name__ == "__main__":
    main()
