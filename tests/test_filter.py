"""filter@<domain>: the local prefilter, statute chunking, and the judge through the real LLM
client against the local OpenAI-compatible server (tests/llm_server.py): judge errors are
rejects with their reason (never "not relevant"), offline misses list the items, a SIGKILLed
run resumes without repeating a completed call, new items cost one call each, and the api
key is written nowhere."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from stages.common.io import read_records, write_records
from stages.common.llm import LLMParams, response_format_for
from stages.common.llm_cache import ResponseCache, cache_key
from stages.extract import ExtractParams
from stages.filter import ChunkingParams, FilterParams, PrefilterParams
from stages.common.schema import SCHEMAS, validate_table
from stages.common.text import content_id
from stages.filter import (Verdict, apply_verdicts, chunk_documents, chunk_units, hangul_letter_share,
                           item_text, judge_messages, keyword_score, prefilter, segments,
                           select_candidates)
from tests.conftest import ROOT, run_stage
from tests.llm_server import LLMTestServer, Reply

API_KEY = "sk-test-FILTERMARKER-5c2e91"
ITEM_HEADER = "x-item-id"
PRE = PrefilterParams(keywords={"주식": 2, "채권": 2, "금리": 1.5, "주식 시장": 1, "ETF": 2, "효용": -1},
                      min_score=2, min_chars=10, min_hangul_share=0.5, max_digit_share=0.5)
ARTICLE_START = re.compile(r"^\s*(제\s*\d+\s*(조|장|절)|부\s*칙)")


# ---------------------------------------------------------------------------- prefilter
def test_keyword_score_is_korean_aware_spacing_and_case_insensitive():
    # particles attached (주식시장에서), spacing variant (주식 시장 vs 주식시장), case (etf)
    score, matched = keyword_score("주식시장에서 etf를 매수하면 채권보다 위험하다", PRE.keywords)
    assert matched == ("주식", "채권", "주식 시장", "ETF")
    assert score == 7
    # every term counts once, however often it appears; negative terms subtract
    assert keyword_score("주식 주식 주식", PRE.keywords) == (2, ("주식",))
    assert keyword_score("주식과 효용", PRE.keywords) == (1, ("주식", "효용"))


@pytest.mark.parametrize("text, reason", [
    ("채권 가격과 시장금리의 관계에 대한 설명으로 옳은 것은?", None),
    # noisy but clean enough: PDF spacing, line breaks, an English term, some digits
    ("  채권   가격은\n시장 금리가 1%p 오르면   하락한다. (bond price)  ", None),
    ("주식?", "too_short"),
    ("What is the duration of a zero-coupon bond 채권?", "not_korean"),
    ("주식 1,234,567 / 2,345,678 / 3,456,789 / 4,567,890", "mostly_digits"),
    ("한계효용이 체감하는 이유로 옳은 것은 무엇인가?", "low_domain_score"),
])
def test_prefilter_quality_rules_and_domain_score(text, reason):
    outcome = prefilter(text, PRE)
    assert outcome.reason == reason, outcome


def test_mcq_length_is_the_question_but_language_is_the_whole_item():
    # "VaR(Value at Risk)…" alone is half Latin; with its Korean choices it is Korean
    record = {"question": "VaR(Value at Risk)에 대한 설명으로 옳지 않은 것은?",
              "choices": ["최대 손실 추정치이다.", "신뢰수준이 높을수록 커진다.",
                          "극단적 손실의 크기를 알려 준다.", "보유기간이 길수록 커진다."]}
    assert hangul_letter_share(record["question"]) < 0.5
    text, length_text = item_text(record)
    assert prefilter(text, PRE.model_copy(update={"min_score": 0}), length_text).reason is None
    short = {"question": "주식은?", "choices": record["choices"]}  # long choices, short question
    assert prefilter(item_text(short)[0], PRE, item_text(short)[1]).reason == "too_short"


# ---------------------------------------------------------------------------- chunking
SAMPLE_PAGES = [
    (1, "샘플 시행규칙\n제1조(목적) 이 규칙은 금융거래 보고에 필요한 사항을 규정함을\n목적으로 한다.\n"
        "제2조(정의) 이 규칙에서 사용하는 용어의 뜻은 다음과 같다. 1. \"보고기관\"이란 금융회사등을 말한다."),
    (2, "제3조(보고 기한) ① 보고기관은 30일 이내에 보고서를 제출하여야 한다.\n② 보고서는 전자문서로 제출한다.\n\n"
        "부칙 이 규칙은 공포한 날부터 시행한다."),
]


def page_records(pages, doc_id="doc1", title="샘플 시행규칙"):
    return [{"id": content_id("page", doc_id, n), "source": "rules", "doc_id": doc_id, "path": "s.pdf",
             "page": n, "title": title, "text": text, "tables": [],
             "meta": json.dumps({"file_sha256": "ab" * 32})} for n, text in pages]


def test_segments_start_at_articles_and_keep_wrapped_lines_together():
    units = segments(SAMPLE_PAGES)
    texts = [u.text for u in units]
    assert texts[0] == "샘플 시행규칙"
    assert texts[1].startswith("제1조(목적)") and "규정함을\n목적으로" in texts[1]  # wrapped line kept
    assert [u.page for u in units] == [1, 1, 1, 2, 2]
    assert texts[-1].startswith("부칙")


def test_chunks_respect_size_articles_and_overlap():
    params = ChunkingParams(size=120, overlap=60)
    chunks = chunk_units(segments(SAMPLE_PAGES), params)
    assert all(len(c.text) <= params.size for c in chunks)
    assert all(ARTICLE_START.match(c.text) or c.index == 0 for c in chunks)
    joined = "\n".join(c.text for c in chunks)
    for article in ("제1조", "제2조", "제3조", "부칙"):
        assert article in joined  # nothing lost
    # a short trailing article is repeated at the start of the next chunk
    assert any(a.text.split("\n")[-1] == b.text.split("\n")[0] for a, b in zip(chunks, chunks[1:]))


def test_chunk_records_are_valid_stable_and_carry_their_pages():
    params = ChunkingParams(size=150, overlap=40)
    first = chunk_documents(page_records(SAMPLE_PAGES), params, "rules")
    again = chunk_documents(page_records(SAMPLE_PAGES), params, "rules")
    validate_table("document", first)
    assert first == again
    assert len({r["id"] for r in first}) == len(first)
    for record in first:
        meta = json.loads(record["meta"])
        assert record["page"] == meta["pages"][0] == min(meta["pages"]) and record["doc_id"] == "doc1"
        assert len(meta["page_ids"]) == len(meta["pages"])
    assert {r["page"] for r in first} == {1, 2}


def test_a_long_article_is_cut_at_its_items_into_balanced_pieces():
    items = "\n".join(f"{n}. “용어{n}”이란 금융회사가 이용자에게 제공하는 전자적 장치를 말한다." for n in range(1, 41))
    params = ChunkingParams(size=1000, overlap=100)
    chunks = chunk_units(segments([(1, "제2조(정의) 이 법에서 사용하는 용어의 뜻은 다음과 같다.\n" + items)]), params)
    lengths = [len(c.text) for c in chunks]
    assert all(n <= 1000 for n in lengths) and len(chunks) >= 2
    assert min(lengths) > 0.5 * max(lengths)  # no scrap chunk
    assert all(re.match(r"(제2조|\d+\. )", c.text) for c in chunks)  # cut at item starts


def test_chunking_real_statute_pdfs(real_dir):
    from stages.extract import extract_pdf
    folder = real_dir("pdfs")
    params = ChunkingParams(size=1500, overlap=300)
    for pdf in sorted(folder.glob("*.pdf")):
        result = extract_pdf(str(pdf), pdf.name, ExtractParams(input=str(folder), tables=False), "rules")
        assert result.pages, pdf
        chunks = chunk_documents(result.pages, params, "rules")
        validate_table("document", chunks)
        assert all(len(c["text"]) <= params.size for c in chunks)
        # most chunks begin at a structural boundary (article / chapter / item), not mid-sentence
        starts = sum(bool(ARTICLE_START.match(c["text"]) or re.match(r"\s*([①-⑳]|\d+\.|[가-하]\.)", c["text"]))
                     for c in chunks)
        assert starts >= 0.8 * len(chunks), (pdf.name, starts, len(chunks))
        # every article heading of the document survives into some chunk
        headings = {m.group(0) for p in result.pages for m in re.finditer(r"(?m)^제\d+조(의\d+)?\(", p["text"])}
        text = "\n".join(c["text"] for c in chunks)
        assert all(h in text for h in headings), pdf.name
        assert min(len(c["text"]) for c in chunks) >= 200, pdf.name


# ---------------------------------------------------------------------------- verdicts (pure)
def mcq(i: int, question: str | None = None, split: str = "train") -> dict[str, Any]:
    question = question or f"문항 {i}: 채권 가격과 시장 금리의 관계로 옳은 것은?"
    choices = [f"주식 선택지 {i}-{k}" for k in range(4)]
    return {"id": content_id("mcq", question, choices, 0), "source": "kmmlu_economics",
            "domain": "financial_market", "split": split, "question": question,
            "choices": choices, "answer": 0, "category": "Economics", "meta": "{}"}


MINIMAL_LLM = {"model": "m", "temperature": 0.0, "max_tokens": 64, "cache_dir": "cache",
               "prices": {"input_per_1m": 0.0, "output_per_1m": 0.0}}


def filter_params(**llm: Any) -> FilterParams:
    return FilterParams.model_validate({
        "input": "in.parquet", "criteria": "금융시장 문항", "prefilter": PRE.model_dump(),
        "max_reject_rate": 0.5, "llm": llm or MINIMAL_LLM})


def test_test_split_can_never_be_selected():
    with pytest.raises(Exception, match="splits"):
        FilterParams.model_validate({"input": "x", "criteria": "c", "prefilter": PRE.model_dump(),
                                     "splits": ["train", "test"], "llm": MINIMAL_LLM})


def test_judge_messages_use_the_templates_and_criteria():
    messages = judge_messages(mcq(1), "금융시장 기준 XYZ")
    assert [m["role"] for m in messages] == ["system", "user"]
    assert "금융시장 기준 XYZ" in messages[0]["content"] and "$" not in messages[0]["content"]
    assert "A. 주식 선택지 1-0" in messages[1]["content"]
    doc = page_records(SAMPLE_PAGES)[0]
    assert "샘플 시행규칙" in judge_messages(doc, "c")[1]["content"]


# ---------------------------------------------------------------------------- the stage, end to end
@pytest.fixture(autouse=True)
def llm_env(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    for name in ("OPENAI_BASE_URL", "LLM_OFFLINE"):
        monkeypatch.delenv(name, raising=False)


def verdict_rule(not_relevant: set[str] = frozenset(), fail: set[str] = frozenset(),
                 garbage: set[str] = frozenset()):
    """Server rule: answer by the X-Item-Id header the client sends."""
    def rule(request):
        item = request.headers.get(ITEM_HEADER, "")
        if item in fail:
            return Reply.server_error(503)
        if item in garbage:
            return Reply.invalid_json()
        return Reply.ok(json.dumps({"relevant": item not in not_relevant,
                                    "reason": "판정 이유 " + item}, ensure_ascii=False))
    return rule


def write_project(tmp: Path, records: list[dict[str, Any]], server: LLMTestServer | None,
                  kind: str = "mcq", **llm_overrides: Any) -> dict[str, Any]:
    write_records(records, SCHEMAS[kind], tmp / "in.parquet")
    llm = {"model": "test-model", "base_url": server.base_url if server else None,
           "temperature": 0.0, "max_tokens": 64, "seed": 1, "concurrency": 4, "timeout_s": 5.0,
           "backoff_base_s": 0.01, "backoff_max_s": 0.02, "max_attempts": 2,
           "max_invalid_attempts": 2, "prices": {"input_per_1m": 2.5, "output_per_1m": 10.0},
           "cache_dir": "cache"}
    llm.update(llm_overrides)
    prefilter = PRE if kind == "mcq" else PRE.model_copy(update={"keywords": {"보고": 2, "금융": 1}})
    section = {"input": "in.parquet", "criteria": "금융시장 관련 문항", "prefilter": prefilter.model_dump(),
               "max_reject_rate": 0.5, "llm": llm}
    if kind == "document":
        section["chunking"] = {"size": 150, "overlap": 40}
    written = {**section, "llm": {k: v for k, v in llm.items() if k != "cache_dir"}}  # a CLI arg
    (tmp / "params.yaml").write_text(yaml.safe_dump({"filter": {"fm": written}}, allow_unicode=True),
                                     encoding="utf-8")
    return section


ARGS = ["fm", "--out", "out.parquet", "--rejects", "rejects.parquet", "--metrics", "metrics.json",
        "--log", "filter.log", "--cache-dir", "cache"]


def outputs(tmp: Path) -> tuple[list[dict], list[dict], dict]:
    return (read_records(tmp / "out.parquet"), read_records(tmp / "rejects.parquet"),
            json.loads((tmp / "metrics.json").read_text(encoding="utf-8")))


def test_stage_keeps_relevant_records_and_rejects_with_reasons(tmp_path):
    records = [mcq(i) for i in range(6)] + [mcq(6, "소비자의 한계효용이 체감하는 이유로 옳은 것은?"), mcq(7, split="test")]
    ids = [r["id"] for r in records]
    with LLMTestServer(rule=verdict_rule(not_relevant={ids[1]}, fail={ids[2]}, garbage={ids[3]})) as server:
        write_project(tmp_path, records, server)
        proc = run_stage("filter", ARGS, tmp_path)
        asked = {r.headers[ITEM_HEADER] for r in server.completions_requests}
    assert proc.returncode == 0, proc.stderr
    kept, rejects, metrics = outputs(tmp_path)
    assert [r["id"] for r in kept] == [ids[0], ids[4], ids[5]]
    reasons = {r["item"]: r["reason"] for r in rejects}
    assert reasons == {ids[1]: "not_relevant", ids[2]: "judge_transport_error",
                       ids[3]: "judge_invalid_json", ids[6]: "low_domain_score"}
    assert asked == set(ids[:6])  # only prefilter survivors reach the judge; test split never read
    assert json.loads(kept[0]["meta"])["filter"]["judge_reason"] == "판정 이유 " + ids[0]
    assert metrics["not_relevant"] == 1 and metrics["rejected"] == 2 and metrics["split_skipped"] == 1
    assert metrics["llm"]["calls"] >= 5 and metrics["llm"]["cost_usd"] > 0


def test_a_domain_pools_several_inputs_and_dvc_must_track_exactly_them(tmp_path):
    """The accounting domain: KMMLU Accounting (dev; its train is empty at the pin) + Taxation."""
    first = [mcq(i, split="dev") for i in range(2)] + [mcq(2, split="test")]
    second = [mcq(10 + i) for i in range(3)]
    with LLMTestServer(rule=verdict_rule()) as server:
        section = write_project(tmp_path, first, server)
        write_records(second, SCHEMAS["mcq"], tmp_path / "tax.parquet")
        section = {**section, "input": ["in.parquet", "tax.parquet"], "splits": ["train", "dev"]}
        section["llm"] = {k: v for k, v in section["llm"].items() if k != "cache_dir"}
        (tmp_path / "params.yaml").write_text(
            yaml.safe_dump({"filter": {"fm": section}}, allow_unicode=True), encoding="utf-8")
        stale = run_stage("filter", [*ARGS, "--inputs", "in.parquet"], tmp_path)
        assert stale.returncode != 0 and "dvc.vars.yaml" in stale.stderr
        assert "tax.parquet" in stale.stderr and not server.completions_requests
        proc = run_stage("filter", [*ARGS, "--inputs", "in.parquet", "tax.parquet", "in.parquet"],
                         tmp_path)
    assert proc.returncode == 0, proc.stderr
    kept, _, metrics = outputs(tmp_path)
    assert [r["id"] for r in kept] == [r["id"] for r in first[:2] + second]  # input order, no test
    assert metrics["items"] == 5 and metrics["split_skipped"] == 1
    with pytest.raises(Exception, match="distinct"):
        FilterParams.model_validate({**section, "input": ["a", "a"]})
    with pytest.raises(Exception, match="1-3"):
        FilterParams.model_validate({**section, "input": ["a", "b", "c", "d"]})


def test_judge_errors_above_the_threshold_fail_the_stage_and_are_never_not_relevant(tmp_path):
    records = [mcq(i) for i in range(4)]
    with LLMTestServer(rule=lambda request: Reply.server_error(500)) as server:
        write_project(tmp_path, records, server)
        proc = run_stage("filter", ARGS, tmp_path)
    assert proc.returncode == 2
    assert "4 of 4 records rejected" in proc.stderr
    rejects = read_records(tmp_path / "rejects.parquet")
    assert {r["reason"] for r in rejects} == {"judge_transport_error"}
    assert not (tmp_path / "out.parquet").exists()


def test_offline_miss_lists_the_missing_items_without_a_call(tmp_path, monkeypatch):
    records = [mcq(i) for i in range(5)]
    with LLMTestServer(rule=verdict_rule()) as server:
        write_project(tmp_path, records[:2], server)
        assert run_stage("filter", ARGS, tmp_path).returncode == 0
        write_project(tmp_path, records, server)
        monkeypatch.setenv("LLM_OFFLINE", "1")
        before = len(server.completions_requests)
        proc = run_stage("filter", ARGS, tmp_path)
        assert len(server.completions_requests) == before
    assert proc.returncode == 2
    assert "3 LLM request(s) not in the response cache" in proc.stderr
    for record in records[2:]:
        assert record["id"] in proc.stderr


def test_adding_n_items_makes_exactly_n_calls(tmp_path):
    records = [mcq(i) for i in range(9)]
    with LLMTestServer(rule=verdict_rule()) as server:
        write_project(tmp_path, records[:6], server)
        assert run_stage("filter", ARGS, tmp_path).returncode == 0
        first = Counter(r.headers[ITEM_HEADER] for r in server.completions_requests)
        write_project(tmp_path, records, server)
        assert run_stage("filter", ARGS, tmp_path).returncode == 0
        second = Counter(r.headers[ITEM_HEADER] for r in server.completions_requests) - first
    assert sorted(second) == sorted(r["id"] for r in records[6:]) and set(second.values()) == {1}
    kept, _, metrics = outputs(tmp_path)
    assert len(kept) == 9 and metrics["llm"]["calls"] == 3 and metrics["llm"]["cache_hits"] == 6


def test_sigkilled_run_resumes_without_repeating_a_completed_call(tmp_path):
    records = [mcq(i) for i in range(30)]
    with LLMTestServer(rule=verdict_rule(), latency=0.15, jitter=0.05) as server:
        section = write_project(tmp_path, records, server, concurrency=3)
        cache = ResponseCache(tmp_path / section["llm"]["cache_dir"])
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        victim = subprocess.Popen([sys.executable, "-m", "stages.filter", *ARGS], cwd=tmp_path, env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while len(cache) < 8 and time.monotonic() < deadline and victim.poll() is None:
            time.sleep(0.02)
        os.kill(victim.pid, signal.SIGKILL)
        victim.communicate()
        assert victim.returncode == -signal.SIGKILL
        assert not (tmp_path / "out.parquet").exists()
        params = LLMParams.model_validate({**section["llm"], "cache_dir": str(cache.root)})
        schema = response_format_for(Verdict)["json_schema"]
        cached = {r["id"] for r in records if cache.get(cache_key(
            model=params.model, messages=judge_messages(r, section["criteria"]), json_schema=schema,
            temperature=params.temperature, top_p=params.top_p, max_tokens=params.max_tokens,
            seed=params.seed, sample_index=0, reask_index=0)) is not None}
        assert 8 <= len(cached) < 30, "the kill should land midway"
        before = len(server.completions_requests)
        proc = run_stage("filter", ARGS, tmp_path)
        asked_again = Counter(r.headers[ITEM_HEADER] for r in server.completions_requests[before:])
    assert proc.returncode == 0, proc.stderr
    assert len(read_records(tmp_path / "out.parquet")) == 30  # no item lost
    assert not set(asked_again) & cached  # no completed call repeated
    assert set(asked_again) == {r["id"] for r in records} - cached  # each missing one...
    assert set(asked_again.values()) == {1}  # ...exactly once


def test_rules_documents_are_chunked_judged_and_written_as_chunk_records(tmp_path):
    pages = page_records(SAMPLE_PAGES)
    with LLMTestServer(rule=verdict_rule()) as server:
        write_project(tmp_path, pages, server, kind="document")
        proc = run_stage("filter", ARGS, tmp_path)
        asked = [r.headers[ITEM_HEADER] for r in server.completions_requests]
    assert proc.returncode == 0, proc.stderr
    kept, rejects, metrics = outputs(tmp_path)
    validate_table("document", kept)
    assert metrics["kind"] == "document" and metrics["pages"] == 2
    assert sorted(asked) == sorted(r["id"] for r in kept)  # every judged chunk was relevant
    assert len(kept) + len(rejects) == metrics["items"] >= 2
    assert all(r["doc_id"] == "doc1" and r["id"] != r["doc_id"] for r in kept)


def test_api_key_appears_in_no_file_after_a_run(tmp_path):
    records = [mcq(i) for i in range(3)]
    with LLMTestServer(rule=verdict_rule(fail={records[0]["id"]})) as server:
        write_project(tmp_path, records, server)
        assert run_stage("filter", ARGS, tmp_path).returncode == 0
        assert all(r.headers.get("authorization") == f"Bearer {API_KEY}"
                   for r in server.completions_requests)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) >= 6
    for path in files:
        assert API_KEY.encode() not in path.read_bytes(), path


def test_apply_verdicts_is_pure_and_orders_like_the_input():
    from stages.common.llm import Result, Usage
    records = [mcq(i) for i in range(3)]
    survivors, rejects, counts = select_candidates(records, filter_params(), "fm")
    assert len(survivors) == 3 and not rejects
    results = [Result(r["id"], 0, Verdict(relevant=i != 1, reason=f"r{i}") if i != 2 else None,
                      None, None, Usage(3, 4), False, 1, error=None if i != 2 else "refusal",
                      detail="refused") for i, r in enumerate(records)]
    outcome = apply_verdicts(survivors, results, "fm")
    assert [r["id"] for r in outcome.kept] == [records[0]["id"]]
    assert [r["reason"] for r in outcome.rejects] == ["not_relevant", "judge_refusal"]
    assert outcome.counts == Counter(relevant=1, not_relevant=1, judge_errors=1)


def test_a_stage_at_its_budget_cap_writes_nothing_and_a_rerun_pays_only_the_rest(tmp_path):
    records = [mcq(i) for i in range(12)]
    with LLMTestServer(rule=verdict_rule()) as server:
        write_project(tmp_path, records, server, concurrency=1, max_usd=0.01,
                      prices={"input_per_1m": 10.0, "output_per_1m": 40.0})
        capped = run_stage("filter", ARGS, tmp_path)
        sent = len(server.completions_requests)
        assert capped.returncode == 2 and 0 < sent < 12
        lines = [line for line in capped.stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and "budget cap $0.01" in lines[0] and "re-run" in lines[0]
        assert not (tmp_path / "out.parquet").exists() and not (tmp_path / "metrics.json").exists()
        resumed = run_stage("filter", ARGS, tmp_path, env={"LLM_MAX_USD": "5"})
        again = [r.headers[ITEM_HEADER] for r in server.completions_requests[sent:]]
    assert resumed.returncode == 0, resumed.stderr
    assert len(again) == 12 - sent and set(again).isdisjoint(
        r.headers[ITEM_HEADER] for r in server.completions_requests[:sent])
    kept, _, metrics = outputs(tmp_path)
    assert len(kept) == 12 and metrics["llm"]["cache_hits"] == sent


def test_the_stage_in_batch_mode_pays_the_batch_price_for_the_same_output(tmp_path):
    """Batch lines carry no item headers: the verdict is read off the question text."""
    def rule(request):
        relevant = "문항 1:" not in request.text
        return Reply.ok(json.dumps({"relevant": relevant, "reason": "판정"}, ensure_ascii=False))
    records = [mcq(i) for i in range(6)]
    runs = {}
    for mode in ("online", "batch"):
        (tmp_path / mode).mkdir()
        with LLMTestServer(rule=rule) as server:
            extra = {"mode": "batch", "batch": {"poll_s": 0.01, "collect_s": 0.05}} if mode == "batch" else {}
            write_project(tmp_path / mode, records, server, **extra)
            proc = run_stage("filter", ARGS, tmp_path / mode)
            assert proc.returncode == 0, proc.stderr
            runs[mode] = (len(server.completions_requests), len(server.batches), outputs(tmp_path / mode))
    assert runs["online"][:2] == (6, 0) and runs["batch"][:2] == (0, 1)
    (kept, rejects, metrics), (online_kept, _, online_metrics) = runs["batch"][2], runs["online"][2]
    assert kept == online_kept and [r["reason"] for r in rejects] == ["not_relevant"]
    assert metrics["llm"]["batch_calls"] == 6
    assert metrics["llm"]["cost_usd"] == pytest.approx(online_metrics["llm"]["cost_usd"] / 2, rel=1e-3)
