"""bench/standin.py: every answer passes the stage's own parsing and checks, for requests built
with the stage's own message code — filter, transform, synthesize (plain and grounded),
solve (with re-samples and the quality gate) and summarize (map and reduce) — plus the
knobs (keep share, wrong-letter share, quality share), usage counts, faults, and one short
end-to-end run of the LLM layer against the stand-in in its own process."""
from __future__ import annotations

import asyncio
import csv
import json
import random
import subprocess
import sys
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import pytest

from bench import standin_vocab as V
from bench.standin import (StandIn, StandInConfig, StandInResponder, TokenCounter, fold, in_process_server,
                           josa, parse_args, stage_of)
from stages import filter as F
from stages import solve as SO
from stages import summarize as SU
from stages import synthesize as S
from stages import transform as T
from stages.common.llm import (LLMClient, LLMParams, LLMRequest, Result, Usage, derive_seed,
                               evaluate_response, response_format_for, run_batch)
from stages.common.llm_cache import CachedResponse
from stages.common.prompts import LETTERS, load_template
from stages.common.schema import validate
from stages.common.text import content_id
from tests.conftest import ROOT

KMMLU = ROOT / "data/samples/hub/KMMLU/data"
SYNTH_TEMPLATES = {name: load_template(name) for name in S.TEMPLATES}
SOLVE_TEMPLATES = {name: load_template(name) for name in SO.TEMPLATES}


# ---------------------------------------------------------------------------- helpers
def body(messages, model, *, temperature: float = 0.0, seed: Optional[int] = 1234,
         max_tokens: int = 3000) -> dict[str, Any]:
    """The request body stages.common.llm sends."""
    return {"model": "gpt-4o-2024-08-06", "messages": [dict(m) for m in messages],
            "response_format": response_format_for(model), "temperature": temperature,
            "top_p": 1.0, "max_tokens": max_tokens, **({"seed": seed} if seed is not None else {})}


def answer(responder: StandInResponder, messages, model, **kw: Any):
    """(parsed answer, raw content) the way the LLM layer evaluates it; fails on a reject."""
    content = responder(body(messages, model, **kw))
    assert isinstance(content, str), content
    response = CachedResponse(content=content, refusal=None, finish_reason="stop",
                              prompt_tokens=1, completion_tokens=1)
    parsed, reason, detail = evaluate_response(response, model)
    assert parsed is not None, (reason, detail, content)
    return parsed, content


class DirectLLM:
    """The stage-facing part of LLMClient (run_many / complete), answered by the responder
    in-process with the bodies and seeds the real client would send."""

    def __init__(self, responder: StandInResponder, params: LLMParams):
        self.responder, self.params = responder, params
        self.cache = type("Cache", (), {"root": Path("unused")})()

    def _result(self, request: LLMRequest) -> Result:
        p = self.params
        content = self.responder(body(request.messages, request.response_model, temperature=p.temperature,
                                      seed=derive_seed(p.seed, request.sample_index, 0),
                                      max_tokens=p.max_tokens))
        response = CachedResponse(content=content, refusal=None, finish_reason="stop",
                                  prompt_tokens=1, completion_tokens=1)
        parsed, reason, detail = evaluate_response(response, request.response_model)
        return Result(request.item_id or "", request.sample_index, parsed, content, "stop", Usage(),
                      False, 1, 0, reason, detail)

    async def run_many(self, requests, desc: str = "") -> list[Result]:
        return [self._result(r) for r in requests]

    async def complete(self, messages, model, *, sample_index: int = 0, item_id: Optional[str] = None):
        return self._result(LLMRequest(messages, model, item_id, sample_index))


def llm_params(tmp_path: Path, base_url: Optional[str] = None, **over: Any) -> dict[str, Any]:
    spec = dict(model="gpt-4o-2024-08-06", base_url=base_url, temperature=0.9, max_tokens=1500,
                seed=2024, concurrency=16, timeout_s=10.0, backoff_base_s=0.01, backoff_max_s=0.05,
                max_attempts=4, max_invalid_attempts=3,
                prices={"input_per_1m": 2.5, "output_per_1m": 10.0}, cache_dir=str(tmp_path / "cache"))
    return {**spec, **over}


def kmmlu_records() -> list[dict[str, Any]]:
    """The KMMLU sample rows shipped in the repo as mcq records (4 choices)."""
    records = []
    for path in sorted(KMMLU.glob("*.csv")):
        with path.open(encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                choices = [row[k] for k in "ABCD"]
                records.append({"id": content_id("mcq", row["question"], choices), "source": "kmmlu",
                                "domain": "financial_market", "split": "train", "question": row["question"],
                                "choices": choices, "answer": int(row["answer"]) - 1, "category": "",
                                "meta": "{}"})
    return records


def synth_params(tmp_path: Path, domain: str, **over: Any) -> S.SynthesizeParams:
    p = S.load_params(domain, ROOT / "params.yaml")
    return p.model_copy(update={"llm": LLMParams.model_validate(llm_params(tmp_path)), **over})


def rule_chunks(n: int) -> list[dict[str, Any]]:
    """Document chunks of made-up enforcement-rule articles (2-4 per chunk)."""
    rng = random.Random(7)
    terms = [t for group in V.RULES_TERMS.values() for t in group]
    chunks = []
    for c in range(n):
        articles = []
        for k in range(rng.randint(2, 4)):
            actor, term = rng.choice(V.RULE_ACTORS), rng.choice(terms)
            articles.append(
                f"제{c * 4 + k + 1}조({rng.choice(['보고 기한', '자료의 보존', '교육', '과태료', '신고'])}) "
                f"① {josa(actor, '은')} {josa(term, '이')} 있은 날부터 {rng.choice(V.PERIODS)} 이내에\n"
                f"보고서를 제출하여야 한다. ② {josa(rng.choice(V.RULE_ACTORS), '은')} 관련 자료를 "
                f"{rng.randint(2, 10)}년 동안 보존하여야 한다.")
        chunks.append({"id": f"chunk{c:04d}", "source": "rules", "doc_id": f"doc{c // 10}", "path": "r.pdf",
                       "page": 1, "title": "", "text": "\n".join(articles), "tables": [], "meta": "{}"})
    return chunks


def run_synthesis(p: S.SynthesizeParams, responder: StandInResponder, chunks=(), existing=()):
    slots = S.plan_slots(p.target, p.topics, p.choice_counts, chunks, p.angles)
    index = S.NearDuplicateIndex(p.ngram, p.near_duplicate_threshold)
    for record in existing:
        index.add(record["id"], S.mcq_text(record["question"], record["choices"]))
    return asyncio.run(S.synthesize(slots, DirectLLM(responder, p.llm), key="d", params=p,
                                    examples=S.load_fewshot(p.fewshot), templates=SYNTH_TEMPLATES,
                                    index=index))


# ---------------------------------------------------------------------------- filter
def test_filter_verdicts_parse_are_deterministic_and_keep_about_the_configured_share():
    params = F.load_params("financial_market", ROOT / "params.yaml")
    records = kmmlu_records()
    requests = [F.judge_messages(r, params.criteria) for r in records]
    shares = {}
    for keep_rate in (0.3, 0.75, 0.95):
        responder = StandInResponder(keep_rate=keep_rate)
        verdicts = [answer(responder, m, F.Verdict)[0] for m in requests]
        assert all(v.reason.strip() and any("가" <= c <= "힣" for c in v.reason) for v in verdicts)
        shares[keep_rate] = sum(v.relevant for v in verdicts) / len(verdicts)
    assert shares[0.3] < shares[0.75] < shares[0.95]
    assert 0.5 <= shares[0.75] <= 0.95, shares
    again = StandInResponder()
    assert answer(again, requests[0], F.Verdict)[1] == answer(StandInResponder(), requests[0], F.Verdict)[1]
    # documents (rules chunks) are judged too, and the verdicts feed apply_verdicts
    rules = F.load_params("rules", ROOT / "params.yaml")
    chunks = rule_chunks(20)
    results = [Result(c["id"], 0, answer(again, F.judge_messages(c, rules.criteria), F.Verdict)[0], "", "stop",
                      Usage(), False, 1) for c in chunks]
    outcome = F.apply_verdicts([(c, F.prefilter(c["text"], rules.prefilter)) for c in chunks], results, "rules")
    assert len(outcome.kept) + len(outcome.rejects) == len(chunks) and outcome.kept


# ---------------------------------------------------------------------------- transform
def test_transform_rewrites_pass_check_rewrite_and_keep_the_key():
    params = T.load_params("financial_market", ROOT / "params.yaml")
    records = [r for r in kmmlu_records() if len({fold(c) for c in r["choices"]}) == 4]
    responder = StandInResponder(wrong_rate=0.0)
    results = []
    for record in records:
        parsed, raw = answer(responder, T.transform_messages(record, params.context), T.SevenChoiceMCQ,
                             temperature=0.3)
        question, choices, correct = T.check_rewrite(record, parsed)  # raises TransformReject
        assert choices[correct] == record["choices"][record["answer"]]
        assert params.context in question and record["question"].strip() in question
        results.append(Result(record["id"], 0, parsed, raw, "stop", Usage(), False, 1))
    out, rejects, _ = T.build_records(records, results, "financial_market")
    assert not rejects and len(out) == len(records)
    assert all(not validate("mcq", r) and len(r["choices"]) == 7 for r in out)
    # solve knows the key of every transformed question (letters moved by the stage)
    fresh = StandInResponder(wrong_rate=0.0)
    for target in (responder, fresh):  # memory, and the watermark alone
        for record in out:
            solution, _ = answer(target, SO.solve_messages(record, SOLVE_TEMPLATES), SO.Solution)
            assert SO.check_solution(solution, record) is None


# ---------------------------------------------------------------------------- synthesize
def test_synthesize_stems_depend_on_the_prompt_and_identical_prompts_repeat(tmp_path):
    p = synth_params(tmp_path, "financial_market", choice_counts=[4, 5, 6, 7])
    examples = S.load_fewshot(p.fewshot)
    slots = S.plan_slots(40, p.topics, p.choice_counts, (), p.angles)
    responder = StandInResponder()
    drafts = [answer(responder, S.build_messages(s, p, examples, SYNTH_TEMPLATES), S.GeneratedMCQ,
                     temperature=0.9)[0] for s in slots]
    assert len({fold(d.question) for d in drafts}) == len(slots)
    assert [len(d.choices) for d in drafts] == [s.n_choices for s in slots]
    assert all(LETTERS.index(d.answer) < len(d.choices) for d in drafts)
    messages = S.build_messages(slots[3], p, examples, SYNTH_TEMPLATES)
    same = answer(StandInResponder(), messages, S.GeneratedMCQ, temperature=0.9)[0]
    assert same == drafts[3]  # same prompt, same seed: the same question
    other_seed = answer(responder, messages, S.GeneratedMCQ, temperature=0.9, seed=77)[0]
    assert other_seed.question == same.question and other_seed.answer == same.answer
    assert 3 <= len(set(other_seed.choices) & set(same.choices)) < len(same.choices)
    at_zero = [answer(responder, messages, S.GeneratedMCQ, temperature=0.0, seed=s)[0] for s in (1, 2)]
    assert at_zero[0] == at_zero[1]
    avoided = S.build_messages(slots[3], p, examples, SYNTH_TEMPLATES, avoid=[d.question[:80] for d in drafts[:5]])
    assert answer(responder, avoided, S.GeneratedMCQ)[0].question != same.question


@pytest.mark.parametrize("domain", ["financial_market", "accounting", "rules"])
def test_synthesize_rounds_fill_the_target_with_few_near_duplicates(tmp_path, domain):
    """The stage's own rounds, near-duplicate index and grounding check over 300 slots."""
    p = synth_params(tmp_path, domain, target=300, choice_counts=[4, 5, 6, 7] if domain == "rules" else [7])
    chunks = rule_chunks(25) if p.grounded else ()
    existing = [] if p.grounded else kmmlu_records()
    outcome = run_synthesis(p, StandInResponder(), chunks, existing)
    assert len(outcome.records) == 300 and outcome.short == 0
    assert outcome.draws - len(outcome.records) <= 0.03 * outcome.draws, outcome.reasons
    assert all(not validate("mcq", r) for r in outcome.records)
    if p.grounded:
        for record in outcome.records:
            meta = json.loads(record["meta"])
            chunk = next(c for c in chunks if c["id"] == meta["chunk_id"])
            assert S.quote_is_grounded(meta["supporting_quote"], chunk["text"], p.min_quote_chars)


# ---------------------------------------------------------------------------- solve
def test_solve_answers_pass_check_solution_and_honour_the_wrong_rate(tmp_path):
    p = synth_params(tmp_path, "accounting", target=200, choice_counts=[4, 5, 6, 7])
    writer = StandInResponder()
    questions = run_synthesis(p, writer).records
    solver = StandInResponder(wrong_rate=0.1)
    problems = Counter()
    for question in questions:
        messages = SO.solve_messages(question, SOLVE_TEMPLATES)
        for seed in range(5):  # 1,000 draws: 200 questions x 5 sampling seeds
            solution, _ = answer(solver, messages, SO.Solution, temperature=0.7, seed=seed)
            problems[(SO.check_solution(solution, question) or ("ok",))[0]] += 1
            rendered = SO.render_solution(solution)
            assert rendered.startswith("문제 분석:") and f"정답은 {solution.final_letter}입니다." in rendered
    assert set(problems) <= {"ok", "wrong_letter"}
    assert 60 <= problems["wrong_letter"] <= 140, problems  # 10% of 1,000 ± 4 sigma
    # the writer's memory is not needed: a fresh solver knows the keys from the watermark
    assert solver.stats()["counts"]["solve.key_from_watermark"] == 1000


def test_solve_stage_reaches_its_target_with_resamples_and_the_quality_gate(tmp_path):
    p = synth_params(tmp_path, "financial_market", target=120)
    responder = StandInResponder(wrong_rate=0.3, quality_pass_rate=0.9)
    questions = run_synthesis(p, responder).records
    params = SO.SolveParams.model_validate({
        "inputs": {"transformed": "t", "synthesized": "s"}, "target_pairs": 200, "max_resamples": 2,
        "quality": {"enabled": True}, "max_reject_rate": 0.5,
        "llm": llm_params(tmp_path, temperature=0.7, max_tokens=3000)})
    llm = DirectLLM(responder, params.llm)
    outcomes, unused = asyncio.run(SO.solve_questions(sorted(questions, key=lambda q: q["id"]), llm,
                                                      params, SOLVE_TEMPLATES))
    verified = [o for o in outcomes if o.ok]
    assert len(verified) == 100 and unused >= 0
    assert Counter(o.sample_index for o in verified)[0] < len(verified)  # some fixed by re-samples
    reasons = Counter(o.reason for o in outcomes if not o.ok)
    assert set(reasons) <= {"wrong_letter", "low_quality", "hallucination"} and reasons
    _, pairs, _ = SO.build_outputs(outcomes, "financial_market")
    assert len(pairs) == 200 and all(not validate("qa", pair) for pair in pairs)


def test_quality_gate_passes_about_the_configured_share():
    responder = StandInResponder(quality_pass_rate=0.8)
    verdicts = []
    for i in range(500):
        question = {"question": f"문항 {i}: 듀레이션에 대한 설명으로 옳은 것은?",
                    "choices": [f"선택지 {i}-{k}" for k in range(5)], "answer": i % 5}
        verdicts.append(answer(responder, SO.quality_messages(question, "문제 분석: …", SOLVE_TEMPLATES),
                               SO.QualityVerdict)[0])
    passed = sum(v.score >= 3 and not v.hallucination for v in verdicts)
    assert 340 <= passed <= 460  # 80% of 500 ± 6 sigma
    assert any(v.hallucination for v in verdicts) and all(v.reason for v in verdicts)


# ---------------------------------------------------------------------------- summarize
def report() -> SU.Report:
    text = ("[요약] 가나전자(주)는 전력반도체와 차량용 전장 부품을 만드는 코스닥 상장사이다. 2024년\n"
            "매출액은 전년 대비 12% 늘어난 1,284억 원, 영업이익은 96억 원으로 영업이익률이 7.5%까지 회복되었다.\n"
            "[전망] 2025년에는 신규 공장 가동으로 생산 능력이 30% 늘어날 예정이다.\n"
            "투자의견 매수, 목표주가 85,000원을 제시한다. 종목코드 123450.\n"
            "[리스크 요인] 환율이 10% 하락하면 영업이익이 약 8억 원 줄어드는 것으로 추정된다.\n")
    table = (("구분", "2023년", "2024년"), ("매출액", "1,146억", "1,284억"), ("영업이익", "58억", "96억"))
    pages = tuple(SU.Page(n, text * (3 if n > 1 else 1), (table,) if n == 2 else ()) for n in (1, 2, 3))
    return SU.Report("doc1", "krx_reports", "ganada.pdf", "가나전자(주) 기업분석 보고서", pages)


@pytest.mark.parametrize("budget", [12000, 400])
def test_summaries_pass_the_schema_and_keep_every_figure(budget):
    prompts = SU.Prompts.load()
    rep = report()
    chunks = SU.chunk_report(rep, budget, 1.0)
    responder = StandInResponder()
    partials = [answer(responder, SU.map_request(rep, c, len(chunks), prompts).messages, SU.ReportSummary)[0]
                for c in chunks]
    final = partials[0]
    if len(partials) > 1:
        request = SU.reduce_request(rep, partials, 1, 0, prompts)
        assert stage_of(body(request.messages, SU.ReportSummary)) == "summarize_reduce"
        final = answer(responder, request.messages, SU.ReportSummary)[0]
    assert (len(chunks) > 1) == (budget == 400)
    checked = SU.validate_summary(final, SU.report_source_text(rep))
    assert checked.summary is not None and not checked.dropped and not checked.cleared
    summary = checked.summary
    assert summary.company == "가나전자(주)" and summary.ticker == "123450" and summary.rating == "매수"
    assert summary.target_price == "85,000" and summary.period == "2024년"
    assert {("매출액", "1,284")} <= {(f.name, f.value) for f in summary.key_figures}
    assert 3 <= summary.summary.count("다.") <= 6 and summary.risks and summary.outlook


# ---------------------------------------------------------------------------- usage, faults, config
def test_usage_counts_tokens_of_the_rendered_messages_and_the_content():
    counter = TokenCounter()
    if counter.name == "o200k_base":
        assert counter.count("Hello world") == 2
    responder = StandInResponder()
    params = F.load_params("financial_market", ROOT / "params.yaml")
    request = body(F.judge_messages(kmmlu_records()[0], params.criteria), F.Verdict)
    content = responder(request)
    prompt, completion = responder.usage(request, content)
    text = "".join(m["content"] for m in request["messages"])
    assert len(text) / 4 < prompt < 2 * len(text) and counter.count(text) < prompt
    assert 5 < completion <= len(content) and completion == counter.count(content)
    cut = responder({**request, "max_tokens": 8})
    assert cut.finish_reason == "length" and counter.count(cut.content) <= 8 and content.startswith(cut.content)


def fetch(url: str, payload: dict[str, Any]) -> tuple[int, dict[str, str], dict[str, Any]]:
    request = urllib.request.Request(url + "/chat/completions", json.dumps(payload).encode(),
                                     {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, dict(reply.headers), json.loads(reply.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read() or b"{}")


@pytest.mark.parametrize("fault", ["invalid_json", "truncated", "refusal", "429", "5xx"])
def test_each_fault_kind_has_the_shape_of_the_real_one(fault):
    rates = {"invalid_json": "invalid_json_rate", "truncated": "truncated_rate", "refusal": "refusal_rate",
             "429": "rate_limit_rate", "5xx": "server_error_rate"}
    config = StandInConfig(latency=(0, 0), retry_after=2,
                           **{name: 1.0 if key == fault else 0.0 for key, name in rates.items()})
    params = F.load_params("financial_market", ROOT / "params.yaml")
    request = body(F.judge_messages(kmmlu_records()[0], params.criteria), F.Verdict, max_tokens=300)
    with in_process_server(config) as server:
        status, headers, reply = fetch(server.base_url, request)
        stats = server.stats()
    assert stats["kinds"] == {fault: 1} and stats["labels"]["filter"]["kinds"] == {fault: 1}
    if fault == "429":
        assert status == 429 and {k.lower(): v for k, v in headers.items()}["retry-after"] == "2"
        return
    if fault == "5xx":
        assert status in (500, 502, 503)
        return
    choice = reply["choices"][0]
    assert status == 200 and reply["usage"]["prompt_tokens"] > 100 and reply["usage"]["completion_tokens"] > 0
    response = CachedResponse(content=choice["message"]["content"], refusal=choice["message"]["refusal"],
                              finish_reason=choice["finish_reason"], prompt_tokens=1, completion_tokens=1)
    assert evaluate_response(response, F.Verdict)[1] == {"invalid_json": "invalid_json", "truncated": "truncated",
                                                         "refusal": "refusal"}[fault]


def test_config_validates_and_the_cli_parses_its_flags():
    config = parse_args(["--latency", "0.5", "2", "--wrong-rate", "0.2", "--rate-limit-rate", "0.1",
                         "--port", "0", "--no-max-tokens"])
    assert config.latency == (0.5, 2.0) and config.wrong_rate == 0.2 and not config.enforce_max_tokens
    assert config.fault_rates()["429"] == 0.1
    with pytest.raises(ValueError):
        StandInConfig(latency=(3, 1))
    with pytest.raises(ValueError):
        StandInConfig(invalid_json_rate=0.6, truncated_rate=0.6)
    mapped = StandInConfig.from_options(fault_rates={"invalid_json": 0.01, "429": 0.02, "500": 0.01, "503": 0.01})
    assert mapped.fault_rates() == {"invalid_json": 0.01, "429": 0.02, "5xx": 0.02}
    with pytest.raises(ValueError):
        StandInConfig.from_options(fault_rates={"drop": 0.1})


# ---------------------------------------------------------------------------- end to end
def test_end_to_end_the_llm_layer_against_the_standin_process(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-standin-test-0000")
    monkeypatch.delenv("LLM_OFFLINE", raising=False)
    with StandIn.start(latency=(0, 0), invalid_json_rate=0.1, rate_limit_rate=0.1, retry_after=0,
                       refusal_rate=0.0, truncated_rate=0.0, server_error_rate=0.05) as standin:
        p = synth_params(tmp_path, "financial_market", target=12, max_rounds=3)
        p = p.model_copy(update={"llm": LLMParams.model_validate(llm_params(tmp_path, standin.base_url))})

        async def generate():
            async with LLMClient(p.llm) as llm:
                return await S.synthesize(S.plan_slots(12, p.topics, p.choice_counts, (), p.angles), llm,
                                          key="financial_market", params=p, examples=S.load_fewshot(p.fewshot),
                                          templates=SYNTH_TEMPLATES, index=S.NearDuplicateIndex(3, 0.6))
        synthesized = asyncio.run(generate()).records
        solve_llm = LLMParams.model_validate(llm_params(tmp_path, standin.base_url, temperature=0.7,
                                                        max_tokens=3000, cache_dir=str(tmp_path / "solve")))
        requests = [LLMRequest(SO.solve_messages(q, SOLVE_TEMPLATES), SO.Solution, q["id"])
                    for q in synthesized]
        results, accounting = run_batch(solve_llm, requests)
        for _ in range(20):  # an answer over max_tokens is cut (a reply built in the server process)
            status, _, cut = fetch(standin.base_url, body(requests[0].messages, SO.Solution, max_tokens=5))
            if status == 200:
                break
        stats = standin.stats()
    assert cut["choices"][0]["finish_reason"] == "length" and cut["usage"]["completion_tokens"] <= 20
    assert len(synthesized) == 12
    checked = [SO.check_solution(r.parsed, q) for r, q in zip(results, synthesized) if r.ok]
    assert len(checked) == 12 and sum(c is None for c in checked) >= 8
    assert accounting.prompt_tokens > 0 and accounting.completion_tokens > 0
    assert set(stats["labels"]) == {"synthesize", "solve"} and stats["kinds"]["truncated"] >= 1
    assert stats["replies"] == stats["kinds"] and sum(stats["by_stage"].values()) == stats["requests"]
    assert stats["kinds"]["ok"] >= 24 and stats["tokens"]["prompt"] > 12 * 500
    assert stats["responder"]["counts"]["solve.key_from_memory"] >= 12


def test_cli_prints_its_url_and_serves_until_terminated():
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench/standin.py"), "--port", "0", "--latency", "0", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
        params = F.load_params("financial_market", ROOT / "params.yaml")
        status, _, reply = fetch(url, body(F.judge_messages(kmmlu_records()[0], params.criteria), F.Verdict))
        assert status in (200, 429, 500, 502, 503)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0 and '"requests": 1' in err
