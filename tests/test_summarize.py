"""summarize: chunking, map/reduce call counts, the figure check, rejects, determinism from
the cache and offline misses — against the local OpenAI-compatible server on 127.0.0.1."""
from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any, Optional
from urllib.parse import unquote

import pytest
import yaml

from stages.common.io import read_records, write_records
from stages.common.llm import LLMClient, LLMParams
from stages.extract import ExtractParams
from stages.summarize import SummarizeParams
from stages.common.schema import SCHEMAS, validate
from stages.common.text import content_id
from stages.extract import extract_pdf
from stages.summarize import (Page, Prompts, Report, ReportSummary, chunk_report, estimate_tokens,
                              group_partials, group_reports, page_body,
                              source_numbers, summarize_reports, summary_json, validate_summary,
                              value_in_source)
from tests.conftest import run_stage
from tests.llm_server import LLMTestServer, ReceivedRequest, Reply

API_KEY = "sk-test-summarize-4e1d"
PAGE_MARK = re.compile(r"\[(\d+)쪽")


# ---------------------------------------------------------------------------- fixtures
def page_record(doc_id: str, page: int, text: str, tables: Optional[list] = None,
                title: str = "가나전자(주) 기업분석 보고서") -> dict[str, Any]:
    return {"id": content_id(doc_id, page), "source": "krx_reports", "doc_id": doc_id,
            "path": f"{doc_id}.pdf", "page": page, "title": title, "text": text,
            "tables": tables or [],
            "meta": json.dumps({"file_sha256": doc_id * 4, "page_count": 9})}


RESULTS_TABLE = [[["구분", "2023년", "2024년"], ["매출액", "1,146억", "1,284억"],
                  ["영업이익", "58억", "96억"]]]
SENTENCE = "가나전자는 전력반도체와 차량용 전장 부품을 만든다. 2024년 매출액은 1,284억 원이다.\n"


def sample_pages() -> list[dict[str, Any]]:
    """Three reports: 'aaaa' short (one chunk), 'bbbb' long (several chunks), 'cccc' empty."""
    pages = [page_record("aaaa", 1, SENTENCE), page_record("aaaa", 2, "주요 재무 실적", RESULTS_TABLE)]
    pages += [page_record("bbbb", n, SENTENCE * 12, title="다라마바이오(주) 보고서") for n in range(1, 4)]
    pages.append(page_record("cccc", 1, "-", title="빈 보고서"))
    return pages


def summarize_section(tmp_path: Path, server: Optional[LLMTestServer], **overrides: Any) -> dict:
    llm = {"model": "test-model", "base_url": server.base_url if server else None,
           "temperature": 0.0, "max_tokens": 512, "seed": 3, "concurrency": 4, "timeout_s": 5.0,
           "backoff_base_s": 0.01, "backoff_max_s": 0.05, "max_attempts": 3,
           "max_invalid_attempts": 2, "prices": {"input_per_1m": 2.5, "output_per_1m": 10.0},
           "cache_dir": str(tmp_path / "llm_cache"), "offline": False}
    llm.update(overrides.pop("llm", {}))
    section = {"max_chunk_tokens": 1200, "tokens_per_char": 1.0, "min_report_chars": 20,
               "max_reject_rate": 0.5, "llm": llm}
    section.update(overrides)
    return section


def item_id(request: ReceivedRequest) -> str:
    return unquote(request.headers.get("x-item-id", ""))


def figure_responder(body: dict[str, Any]) -> str:
    """A model that summarises honestly but invents one figure (9,999억) in every answer."""
    user = body["messages"][-1]["content"]
    pages = sorted({int(p) for p in PAGE_MARK.findall(user)})
    kind = "병합" if "[부분 1]" in user else "부분"
    return json.dumps({
        "company": "가나전자(주)", "ticker": None, "report_date": None, "period": "2024년",
        "report_type": "기업분석", "summary": f"{kind} 요약 {pages}",
        "key_figures": [
            {"name": "매출액", "value": "1284", "unit": "억 원", "period": "2024년"},
            {"name": "순이익", "value": "9,999", "unit": "억 원", "period": "2024년"}],
        "risks": ["환율 변동"], "outlook": None, "rating": None, "target_price": None,
    }, ensure_ascii=False)


@pytest.fixture(autouse=True)
def llm_env(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    for name in ("OPENAI_BASE_URL", "LLM_OFFLINE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture()
def server():
    with LLMTestServer(figure_responder) as srv:
        yield srv


def summarize(reports: list[Report], section: dict) -> list:
    params = SummarizeParams.model_validate(section)

    async def main():
        async with LLMClient(LLMParams.model_validate(params.llm)) as llm:
            return await summarize_reports(reports, params, llm, Prompts.load())
    return asyncio.run(main())


# ---------------------------------------------------------------------------- chunking
def long_report() -> Report:
    """Pages of varied size: small, medium, one far over the budget, an empty one, a table."""
    return Report("dddd", "krx_reports", "d.pdf", "보고서", (
        Page(1, "짧은 첫 쪽."),
        Page(2, "두 번째 쪽의 문장입니다.\n" * 8),
        Page(3, "아주 긴 쪽의 한 줄입니다. " * 10 + "\n" + "줄바꿈 없이 계속되는 긴 문장" * 60),
        Page(4, "", ()),
        Page(5, "표가 있는 쪽", ((("구분", "2024년"), ("매출액", "1,284억")),)),
        Page(6, "마지막 쪽." * 20),
    ))


def test_chunks_respect_the_budget_and_page_boundaries():
    report, budget = long_report(), 200
    chunks = chunk_report(report, budget, 1.0)
    assert len(chunks) > 3
    for chunk in chunks:
        assert chunk.cost <= budget
        assert estimate_tokens(chunk.text, 1.0) == chunk.cost  # what is counted is what is sent
    segments = [s for c in chunks for s in c.segments]
    # pages in order; the empty page 4 contributes nothing; every other page exactly once
    assert [s.page for s in segments] == sorted(s.page for s in segments)
    assert sorted({s.page for s in segments}) == [1, 2, 3, 5, 6]
    for page in (1, 2, 5, 6):  # pages that fit lie whole in exactly one chunk
        holders = [c.index for c in chunks for s in c.segments if s.page == page]
        parts = [s for s in segments if s.page == page]
        assert len(holders) == 1 and len(parts) == 1 and parts[0].parts == 1
        assert page_body(report.pages[page - 1]) in parts[0].text
    # the oversized page is cut into parts in consecutive chunks, nothing lost or repeated
    parts = [s for s in segments if s.page == 3]
    assert len(parts) > 2 and [s.part for s in parts] == list(range(1, len(parts) + 1))
    rebuilt = "".join(s.text.split("\n", 1)[1] for s in parts)  # minus the [3쪽 (i/n)] markers
    assert rebuilt.replace("\n", "") == page_body(report.pages[2]).replace("\n", "")
    # chunk boundaries fall on page boundaries except inside the oversized page
    for before, after in zip(chunks, chunks[1:]):
        last, first = before.segments[-1], after.segments[0]
        assert last.page != first.page or last.page == 3
    # the table reaches the model as text
    assert any("매출액 | 1,284억" in c.text for c in chunks)


def test_a_small_report_is_one_chunk_and_a_bigger_budget_means_fewer_chunks():
    report = long_report()
    counts = [len(chunk_report(report, budget, 1.0)) for budget in (200, 400, 800, 5000)]
    assert counts == sorted(counts, reverse=True) and counts[-1] == 1
    # the ratio is applied: 2 tokens per character halves what fits
    assert len(chunk_report(report, 400, 2.0)) > len(chunk_report(report, 400, 1.0))


def test_chunking_real_korean_statute_pdf(real_dir):
    pdf = real_dir("pdfs") / "electronic_financial_transactions_act.pdf"
    if not pdf.is_file():
        pytest.skip(f"{pdf} is absent")
    result = extract_pdf(str(pdf), pdf.name, ExtractParams(input=str(pdf.parent), tables=True),
                         "krx_reports")
    assert result.file_reject is None and len(result.pages) > 10
    (report,) = group_reports(result.pages)
    budget = 3000
    chunks = chunk_report(report, budget, 1.0)
    total = sum(len(page_body(p)) for p in report.pages)
    assert total > 3 * budget and len(chunks) >= total // budget
    assert all(c.cost <= budget for c in chunks)
    pages = [s.page for c in chunks for s in c.segments if s.parts == 1]
    split = {s.page for c in chunks for s in c.segments if s.parts > 1}
    assert sorted(pages + sorted(split)) == [p.page for p in report.pages if page_body(p)]
    assert all(page_body(report.pages[[p.page for p in report.pages].index(n)]) in
               "\n".join(c.text for c in chunks) for n in pages)
    assert "전자금융" in chunks[0].text


def test_partials_are_grouped_under_the_budget_at_least_two_at_a_time():
    small = summary_with()
    cost = estimate_tokens(summary_json(small), 1.0)
    assert group_partials([small] * 7, 3 * cost, 1.0) == [[0, 1, 2], [3, 4, 5], [6]]
    # a pair over the budget is still merged (progress); only the last group may be single
    assert group_partials([small] * 5, cost, 1.0) == [[0, 1], [2, 3], [4]]
    assert group_partials([small] * 2, 10 ** 6, 1.0) == [[0, 1]]


# ---------------------------------------------------------------------------- figure check
SOURCE = ("2024년 매출액은 1,284억 원, 영업이익률 7.5%, 부채비율은 85% 수준이다. "
          "순손실 △12억 원. 종목코드 123456. 매출 ５０억. 흑자전환에 성공했다.\n"
          "구분 | 2024년\n매출액 | 1,284억")


@pytest.mark.parametrize("value,unit,found", [
    ("1,284", "억 원", True), ("1284", "억 원", True), ("128,400,000,000", "원", True),
    ("1,284억 원", None, True), ("7.5", "%", True), ("7.50", "%", True), ("-12", "억 원", True),
    ("50", "억", True), ("흑자전환", None, True), ("85", "%", True),
    ("9,999", "억 원", False), ("1,285", "억 원", False), ("12.8", "조 원", False),
    ("적자전환", None, False),
])
def test_figure_values_are_looked_up_with_number_normalisation(value, unit, found):
    from stages.summarize import _squash
    assert value_in_source(value, unit, source_numbers(SOURCE), _squash(SOURCE)) is found


def summary_with(**fields: Any) -> ReportSummary:
    base = json.loads(figure_responder({"messages": [{"content": "[1쪽]"}]}))
    base.update(fields)
    return ReportSummary.model_validate(base)


def test_validation_drops_hallucinated_figures_and_clears_unsupported_fields():
    checked = validate_summary(summary_with(ticker="123456", target_price="99,000원"), SOURCE)
    assert checked.summary is not None
    assert [(f.name, f.value) for f in checked.summary.key_figures] == [("매출액", "1284")]
    assert [f["value"] for f in checked.dropped] == ["9,999"]
    assert checked.summary.ticker == "123456" and checked.summary.target_price is None
    assert checked.cleared == ("target_price",)


def test_validation_rejects_an_empty_summary_and_strips_blank_fields():
    checked = validate_summary(summary_with(summary="  ", rating=" "), SOURCE)
    assert checked.summary is None and checked.problem == "empty_summary"
    ok = validate_summary(summary_with(rating=" ", risks=["", " 환율 "]), SOURCE)
    assert ok.summary.rating is None and ok.summary.risks == ["환율"]


# ---------------------------------------------------------------------------- map / reduce
def test_one_chunk_is_one_call_and_many_chunks_are_mapped_then_merged(tmp_path, server):
    reports = group_reports(sample_pages())
    outcomes = summarize(reports, summarize_section(tmp_path, server))
    by_doc = {o.report.doc_id: o for o in outcomes}
    seen = [item_id(r) for r in server.completions_requests]
    # aaaa: one chunk -> exactly one call, no merge; its map answer is the summary
    assert len(by_doc["aaaa"].chunks) == 1
    assert [i for i in seen if i.startswith("aaaa/")] == ["aaaa/chunk-0"]
    assert by_doc["aaaa"].final.summary == "부분 요약 [1, 2]"
    # bbbb: n chunks -> n map calls, then merges (one call when the partials fit)
    n = len(by_doc["bbbb"].chunks)
    assert n >= 3
    b_calls = sorted(i for i in seen if i.startswith("bbbb/"))
    assert b_calls == sorted([f"bbbb/chunk-{k}" for k in range(n)] + ["bbbb/merge-1-0"])
    assert by_doc["bbbb"].final.summary == "병합 요약 []"
    merge = next(r for r in server.completions_requests if item_id(r) == "bbbb/merge-1-0")
    assert merge.text.count("[부분 ") == n and "부분 요약 [1]" in merge.text
    # cccc: empty report -> no call at all
    assert by_doc["cccc"].reject_reason == "empty_report"
    assert not any(i.startswith("cccc/") for i in seen)
    # the figure check ran on the final summaries: the invented 9,999억 is gone
    for doc in ("aaaa", "bbbb"):
        assert [f.value for f in by_doc[doc].final.key_figures] == ["1284"]
        assert [f["value"] for f in by_doc[doc].validation.dropped] == ["9,999"]


def test_many_partials_merge_as_a_tree(tmp_path, server):
    pages = [page_record("eeee", n, SENTENCE * 12) for n in range(1, 13)]
    reports = group_reports(pages)
    # a budget that holds a page but only two or three partial summaries
    partial_cost = estimate_tokens(summary_json(summary_with()), 1.0)
    section = summarize_section(tmp_path, server, max_chunk_tokens=3 * partial_cost)
    (outcome,) = summarize(reports, section)
    seen = [item_id(r) for r in server.completions_requests]
    maps = [i for i in seen if "/chunk-" in i]
    merges = [i for i in seen if "/merge-" in i]
    assert len(maps) == len(outcome.chunks) == 12  # one page per chunk
    assert any(i.startswith("eeee/merge-2-") for i in merges)  # a second level was needed
    assert outcome.final is not None and outcome.reduce_calls == len(merges)
    levels = {int(i.split("-")[1]) for i in merges}
    assert levels == set(range(1, max(levels) + 1))
    last = max(levels)
    assert [i for i in merges if i.startswith(f"eeee/merge-{last}-")] == [f"eeee/merge-{last}-0"]


# ---------------------------------------------------------------------------- the stage
def stage_workspace(tmp_path: Path, section: dict, pages: Optional[list] = None) -> Path:
    work = tmp_path / "work"
    (work / "data/collected").mkdir(parents=True)
    write_records(pages if pages is not None else sample_pages(), SCHEMAS["document"],
                  work / "data/collected/krx_reports.parquet")
    written = {**section, "llm": {k: v for k, v in section["llm"].items() if k != "cache_dir"}}
    (work / "params.yaml").write_text(yaml.safe_dump({"summarize": written}, allow_unicode=True),
                                      encoding="utf-8")
    return work


STAGE_ARGS = ["--input", "data/collected/krx_reports.parquet",
              "--out", "data/generated/report_summaries.parquet",
              "--rejects", "data/rejects/summarize.parquet",
              "--metrics", "metrics/summarize.json", "--log", "logs/summarize.log",
              "--cache-dir", "../llm_cache"]


def outputs(work: Path) -> tuple[bytes, bytes]:
    return ((work / "data/generated/report_summaries.parquet").read_bytes(),
            (work / "data/rejects/summarize.parquet").read_bytes())


def test_stage_output_is_valid_and_byte_identical_when_rerun_from_the_cache(tmp_path, server, monkeypatch):
    work = stage_workspace(tmp_path, summarize_section(tmp_path, server))
    first = run_stage("summarize", STAGE_ARGS, work)
    assert first.returncode == 0, first.stderr
    calls = len(server.completions_requests)
    records = read_records(work / "data/generated/report_summaries.parquet")
    assert [r["doc_id"] for r in records] == ["aaaa", "bbbb"]  # sorted, one per report
    for record in records:
        assert validate("document", record) == []
        assert record["page"] == 0 and record["source"] == "report_summaries"
        assert record["title"] == "가나전자(주)"
        summary = ReportSummary.model_validate_json(record["text"])
        assert record["text"] == json.dumps(json.loads(record["text"]), ensure_ascii=False,
                                            sort_keys=True)
        assert summary.summary and summary.key_figures[0].value == "1284"
        meta = json.loads(record["meta"])
        assert meta["source_path"] == f"{record['doc_id']}.pdf" and meta["file_sha256"]
        assert meta["figures_dropped"] == [
            {"name": "순이익", "value": "9,999", "unit": "억 원", "period": "2024년"}]
    rejects = read_records(work / "data/rejects/summarize.parquet")
    assert [(r["item"], r["reason"]) for r in rejects] == [("cccc", "empty_report")]
    metrics = json.loads((work / "metrics/summarize.json").read_text(encoding="utf-8"))
    assert metrics["reports"] == 3 and metrics["records"] == 2 and metrics["rejected"] == 1
    assert metrics["map_calls"] + metrics["reduce_calls"] == calls == metrics["llm"]["calls"]
    assert metrics["reduce_calls"] == 1 and metrics["figures_dropped"] == 2
    assert metrics["llm"]["cost_usd"] > 0 and metrics["llm"]["prompt_tokens"] > 0
    before = outputs(work)

    # offline, no server involved: same bytes, no call
    monkeypatch.setenv("LLM_OFFLINE", "1")
    again = run_stage("summarize", STAGE_ARGS, work)
    assert again.returncode == 0, again.stderr
    assert outputs(work) == before
    assert len(server.completions_requests) == calls
    metrics = json.loads((work / "metrics/summarize.json").read_text(encoding="utf-8"))
    assert metrics["llm"]["calls"] == 0 and metrics["llm"]["cache_hits"] == calls
    assert API_KEY not in (work / "logs/summarize.log").read_text(encoding="utf-8")


def test_offline_run_with_missing_cache_entries_fails_listing_them(tmp_path, server, monkeypatch):
    work = stage_workspace(tmp_path, summarize_section(tmp_path, None, llm={"offline": True}))
    monkeypatch.delenv("OPENAI_API_KEY")
    result = run_stage("summarize", STAGE_ARGS, work)
    assert result.returncode == 2
    message = result.stderr.strip().splitlines()[-1]
    assert "offline mode" in message and "aaaa/chunk-0" in message and "bbbb/chunk-0" in message
    n_chunks = 1 + len(chunk_report(group_reports(sample_pages())[1], 1200, 1.0))
    assert f"{n_chunks} LLM request(s) not in the response cache" in message
    assert not (work / "data/generated/report_summaries.parquet").exists()
    assert server.completions_requests == []


def refuse(doc: str):
    def rule(request: ReceivedRequest) -> Optional[Reply]:
        return Reply.refused("요청을 처리할 수 없습니다.") if item_id(request).startswith(doc) else None
    return rule


def test_an_llm_rejection_becomes_a_reject_with_its_reason(tmp_path):
    with LLMTestServer(figure_responder, rule=refuse("bbbb/chunk-1")) as srv:
        work = stage_workspace(tmp_path, summarize_section(tmp_path, srv, max_reject_rate=0.7))
        result = run_stage("summarize", STAGE_ARGS, work)
        assert result.returncode == 0, result.stderr
        # the refused chunk was re-asked up to max_invalid_attempts, no merge followed
        seen = [item_id(r) for r in srv.completions_requests]
        assert seen.count("bbbb/chunk-1") == 2 and "bbbb/merge-1-0" not in seen
    records = read_records(work / "data/generated/report_summaries.parquet")
    assert [r["doc_id"] for r in records] == ["aaaa"]
    rejects = {r["item"]: r for r in read_records(work / "data/rejects/summarize.parquet")}
    assert rejects["bbbb"]["reason"] == "llm_refusal"
    assert "bbbb/chunk-1" in rejects["bbbb"]["detail"] and "처리할 수 없습니다" in rejects["bbbb"]["detail"]
    assert rejects["cccc"]["reason"] == "empty_report"
    metrics = json.loads((work / "metrics/summarize.json").read_text(encoding="utf-8"))
    assert metrics["rejects_by_reason"] == {"empty_report": 1, "llm_refusal": 1}


def test_reject_rate_above_threshold_fails_after_writing_the_rejects(tmp_path):
    with LLMTestServer(figure_responder, rule=refuse("")) as srv:
        work = stage_workspace(tmp_path, summarize_section(tmp_path, srv, max_reject_rate=0.2))
        result = run_stage("summarize", STAGE_ARGS, work)
    assert result.returncode == 2 and "max_reject_rate" in result.stderr
    reasons = sorted(r["reason"] for r in read_records(work / "data/rejects/summarize.parquet"))
    assert reasons == ["empty_report", "llm_refusal", "llm_refusal"]
    assert not (work / "data/generated/report_summaries.parquet").exists()


def test_a_typo_in_the_llm_block_is_an_error_naming_the_key(tmp_path):
    work = stage_workspace(tmp_path, summarize_section(tmp_path, None, llm={"temprature": 0.1}))
    result = run_stage("summarize", STAGE_ARGS, work)
    assert result.returncode == 2 and "summarize.llm.temprature: unknown key" in result.stderr
