"""synthesize@<domain>: slot planning (topic balance, option counts), few-shot matching, the
near-duplicate index, the grounding check, letter balance, and the rounds against the local
OpenAI-compatible server (exact target over rounds, shortfall reported, never padded)."""
from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path
from typing import Any, Optional
from urllib.parse import unquote

import pytest
import yaml

from stages.common.io import read_records, write_records
from stages.common.llm import LLMClient, LLMParams
from stages.common.prompts import LETTERS, load_template
from stages.common.runlog import StageError
from stages.common.schema import SCHEMAS, validate
from stages.common.text import content_id
from stages.synthesize import (TEMPLATES, NearDuplicateIndex, Slot, SynthesizeParams, build_messages,
                               balance_answer, char_ngrams, fewshot_for, load_fewshot, mcq_text,
                               plan_slots, quote_is_grounded, synthesize)
from tests.conftest import ROOT, run_stage
from tests.llm_server import LLMTestServer, Reply

TOPICS = ["주식 시장 제도", "파생상품 거래", "금융상품 분석", "리스크 관리", "투자 전략",
          "금융 규제", "채권 시장", "외환 시장"]
EXISTING_Q = "콜옵션 매수자의 최대 손실로 옳은 것은?"
EXISTING_C = ["지급한 프리미엄", "행사가격", "무한대", "기초자산 가격"]
LONG_Q = ("한국거래소에 상장된 3년 국채선물의 최종 결제 방식과 최종 거래일의 결제 기준 가격을 산출하는 "
          "방법에 대한 설명으로 옳은 것은?")
CHUNK_TEXT = ("제7조(보고 기한) 금융투자업자는 분기 종료 후 45일 이내에\n금융위원회에 업무보고서를 "
              "제출하여야 한다.")


@pytest.fixture(autouse=True)
def llm_env(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-synth-0000")
    for name in ("OPENAI_BASE_URL", "LLM_OFFLINE"):
        monkeypatch.delenv(name, raising=False)


def mcq(question: str, choices: list[str], answer: int = 0, split: str = "train") -> dict[str, Any]:
    return {"id": content_id("mcq", question, choices, answer), "source": "kmmlu_economics",
            "domain": "financial_market", "split": split, "question": question,
            "choices": choices, "answer": answer, "category": "", "meta": "{}"}


def chunk(text: str = CHUNK_TEXT, cid: str = "chunk-a") -> dict[str, Any]:
    return {"id": cid, "source": "rules", "doc_id": "doc1", "path": "rules.pdf", "page": 3,
            "title": "", "text": text, "tables": [], "meta": "{}"}


def params(tmp_path: Path, server: Optional[LLMTestServer] = None, **over: Any) -> SynthesizeParams:
    spec: dict[str, Any] = dict(
        domain_description="금융시장", grounded=False,
        inputs={"filtered": "f.parquet", "transformed": "t.parquet"},
        fewshot=str(ROOT / "data/samples/fewshot/finance.yaml"), target=4, topics=TOPICS[:4],
        choice_counts=[4, 5, 6, 7], max_rounds=3, near_duplicate_threshold=0.6, ngram=3,
        min_quote_chars=10, max_reject_rate=0.9,
        llm=dict(model="test-model", base_url=server.base_url if server else None,
                 temperature=0.9, max_tokens=512, seed=1, concurrency=8, timeout_s=5.0,
                 backoff_base_s=0.01, backoff_max_s=0.05, max_attempts=3,
                 max_invalid_attempts=2, prices={"input_per_1m": 1.0, "output_per_1m": 2.0},
                 cache_dir=str(tmp_path / "cache")))
    spec.update(over)
    return SynthesizeParams.model_validate(spec)


def templates() -> dict[str, str]:
    return {name: load_template(name) for name in TEMPLATES}


# ---------------------------------------------------------------------------- planning
def test_slots_balance_topics_and_option_counts_exactly_target_and_stable_prefix():
    slots = plan_slots(37, TOPICS, [4, 5, 6, 7])
    assert len(slots) == 37
    per_topic = Counter(s.topic for s in slots)
    assert set(per_topic) == set(TOPICS) and max(per_topic.values()) - min(per_topic.values()) <= 1
    per_count = Counter(s.n_choices for s in slots)
    assert max(per_count.values()) - min(per_count.values()) <= 1
    # each topic meets more than one option count across passes
    assert len({s.n_choices for s in slots if s.topic == TOPICS[0]}) > 1
    # raising the target adds slots and leaves the existing ones (and their requests) alone
    assert plan_slots(50, TOPICS, [4, 5, 6, 7])[:37] == slots
    grounded = plan_slots(5, TOPICS[:2], [4], [chunk(cid="b"), chunk(cid="a")])
    assert [s.chunk["id"] for s in grounded] == ["a", "b", "a", "b", "a"]


@pytest.mark.parametrize("n_topics", [1, 2, 7, 8, 25])
def test_every_topic_meets_every_option_count_for_any_number_of_topics(n_topics):
    topics = [f"주제 {t}" for t in range(n_topics)]
    slots = plan_slots(n_topics * 4 * 3, topics, [4, 5, 6, 7])
    for topic in topics:
        assert Counter(s.n_choices for s in slots if s.topic == topic) == {4: 3, 5: 3, 6: 3, 7: 3}


@pytest.mark.parametrize("domain", ["financial_market", "accounting", "rules"])
def test_at_production_params_every_slot_sends_a_distinct_request(domain):
    """500 slots over 8 topics used to send 32 distinct prompts: the client answered many
    slots with one cached response, all but the first rejected as near-duplicates."""
    from stages.synthesize import load_params

    p = load_params(domain, ROOT / "params.yaml")
    assert p.choice_counts == [7]  # the seed's format: A-G
    chunks = [chunk(cid=f"c{i:03d}") for i in range(97)] if p.grounded else ()
    slots = plan_slots(p.target, p.topics, p.choice_counts, chunks, p.angles)
    examples = load_fewshot(p.fewshot)
    requests = {json.dumps(build_messages(s, p, examples, templates()), ensure_ascii=False)
                for s in slots}
    assert len(slots) == p.target and len(requests) == p.target
    assert {s.angle for s in slots} == set(p.angles)


def test_a_re_asked_slot_is_shown_the_stems_accepted_for_its_topic(tmp_path):
    p = params(tmp_path)
    examples = load_fewshot(ROOT / "data/samples/fewshot/finance.yaml")
    slot = plan_slots(1, p.topics, p.choice_counts)[0]
    first = build_messages(slot, p, examples, templates())[1]["content"]
    again = build_messages(slot, p, examples, templates(), ["이미 나온 문항의 줄기?"])[1]["content"]
    assert "이미 나온 문항의 줄기?" in again and "이미 나온" not in first
    assert again.startswith(first.split("선택지")[0])


def test_fewshot_examples_match_the_slot_option_count(tmp_path):
    examples = load_fewshot(ROOT / "data/samples/fewshot/finance.yaml")
    for n in (4, 5, 6, 7):
        shots = fewshot_for(examples, n, 1, 0)
        assert shots and all(len(e.choices) == n for e in shots)
        slot = Slot(3, TOPICS[1], n)
        user = build_messages(slot, params(tmp_path), examples, templates())[1]["content"]
        assert f"정확히 {n}개({', '.join(LETTERS[:n])})" in user
        assert json.dumps(shots[0].question, ensure_ascii=False) in user
        others = [e for e in examples if len(e.choices) != n]
        assert all(json.dumps(e.question, ensure_ascii=False) not in user for e in others)
    only_four = [e for e in examples if len(e.choices) == 4]
    with pytest.raises(StageError, match="7 choices"):
        fewshot_for(only_four, 7, 1, 0)


def test_repo_fewshot_files_cover_every_option_count_and_rules_quotes_are_grounded():
    for name in ("finance", "rules"):
        examples = load_fewshot(ROOT / f"data/samples/fewshot/{name}.yaml")
        assert {len(e.choices) for e in examples} >= {4, 5, 6, 7}
    for e in load_fewshot(ROOT / "data/samples/fewshot/rules.yaml"):
        assert quote_is_grounded(e.supporting_quote, e.source_text, 10), e.question


# ---------------------------------------------------------------------------- checks
def test_near_duplicates_are_found_despite_spacing_punctuation_and_choice_order():
    index = NearDuplicateIndex(n=3, threshold=0.6)
    index.add("orig", mcq_text(EXISTING_Q, EXISTING_C))
    index.add("other", mcq_text("채권 가격과 시장금리의 관계로 옳은 것은?",
                                ["반비례한다", "비례한다", "무관하다", "같다"]))
    reworded = mcq_text("콜옵션 매수자의  최대손실로 옳은것은 ?", list(reversed(EXISTING_C)))
    assert index.duplicate_of(reworded)[0] == "orig"
    fresh = mcq_text("환율이 오르면 수입 물가는 어떻게 되는가?", ["오른다", "내린다", "변함없다", "알 수 없다"])
    assert index.duplicate_of(fresh) is None
    assert index.nearest(fresh)[1] < 0.6
    assert char_ngrams("가 나,다", 2) == char_ngrams("가나다", 2) == frozenset({"가나", "나다"})


def test_grounding_quote_must_occur_in_the_chunk_after_whitespace_normalisation():
    assert quote_is_grounded("분기 종료 후 45일 이내에 금융위원회에 업무보고서를", CHUNK_TEXT, 10)
    assert quote_is_grounded("분기 종료 후 45일 이내에금융위원회에", CHUNK_TEXT, 10)  # spacing only
    assert not quote_is_grounded("분기 종료 후 30일 이내에 금융위원회에", CHUNK_TEXT, 10)
    assert not quote_is_grounded("45일", CHUNK_TEXT, 10)  # too short to mean anything


def test_answer_position_is_balanced_over_letters_and_keeps_the_key():
    positions = Counter()
    for i in range(1400):
        choices = [f"선택지 {i}-{k}" for k in range(7)]
        placed, answer = balance_answer(f"문제 {i}", choices, 0)
        assert placed[answer] == choices[0] and sorted(placed) == sorted(choices)
        assert placed == balance_answer(f"문제 {i}", choices, 0)[0]  # deterministic
        positions[answer] += 1
    assert set(positions) == set(range(7))
    assert all(150 <= n <= 250 for n in positions.values()), positions  # expected 200 each


# ---------------------------------------------------------------------------- rounds, server
def draw_reply(answers: dict[str, list[Any]]):
    """Server rule: answer item X-Item-Id draw X-Sample-Index from ``answers``."""
    def rule(request) -> Optional[Reply]:
        item = unquote(request.headers.get("x-item-id", ""))
        sample = int(request.headers.get("x-sample-index", "0"))
        draws = answers.get(item)
        if draws is None or sample >= len(draws):
            return None
        return Reply.ok(json.dumps(draws[sample], ensure_ascii=False))
    return rule


def gen(question: str, n: int, answer: str = "A", **extra: Any) -> dict[str, Any]:
    return {"question": question, "choices": [f"{question[:6]} 선택지 {k}" for k in range(n)],
            "answer": answer, "explanation": "해설", **extra}


def run_synthesis(p: SynthesizeParams, slots, index=None):
    async def main():
        async with LLMClient(LLMParams.model_validate(p.llm)) as llm:
            return await synthesize(slots, llm, key="financial_market", params=p,
                                    examples=load_fewshot(p.fewshot), templates=templates(),
                                    index=index or NearDuplicateIndex(p.ngram, p.near_duplicate_threshold))
    return asyncio.run(main())


def test_rounds_fill_exactly_the_target_rejecting_near_duplicates_and_bad_counts(tmp_path):
    answers = {
        "slot00000": [gen(LONG_Q, 4)],
        # first draw copies an existing question -> near_duplicate, second is new
        "slot00001": [{"question": EXISTING_Q, "choices": EXISTING_C + ["만기 가치"],
                       "answer": "A", "explanation": "복제"},
                      gen("주가지수 옵션의 거래 승수에 대한 설명으로 옳은 것은?", 5)],
        # first draw has the wrong option count, second is right
        "slot00002": [gen("신용부도스와프의 보장 매수자가 지급하는 것은?", 4),
                      gen("신용부도스와프의 보장 매수자가 지급하는 것은?", 6)],
        # a near-duplicate of slot 0's accepted question, then a distinct one
        "slot00003": [gen(LONG_Q.replace("옳은", "옳지 않은"), 7),
                      gen("외환 스왑 거래의 구조로 옳은 것은?", 7, "C")],
    }
    with LLMTestServer(rule=draw_reply(answers)) as server:
        p = params(tmp_path, server, target=4)
        index = NearDuplicateIndex(3, 0.6)
        index.add("existing", mcq_text(EXISTING_Q, EXISTING_C))
        outcome = run_synthesis(p, plan_slots(4, p.topics, p.choice_counts), index)
        assert len(server.completions_requests) == 7
    assert len(outcome.records) == 4 and outcome.short == 0 and outcome.rounds == 2
    assert [json.loads(r["meta"])["slot"] for r in outcome.records] == [0, 1, 2, 3]
    assert [len(r["choices"]) for r in outcome.records] == [4, 5, 6, 7]
    assert Counter(r["reason"] for r in outcome.rejects) == {"near_duplicate": 2, "wrong_choice_count": 1}
    assert all(not validate("mcq", r) for r in outcome.records)
    assert len({r["id"] for r in outcome.records}) == 4
    # the key survives the answer re-positioning
    slot3 = outcome.records[3]
    assert slot3["choices"][slot3["answer"]] == "외환 스왑 선택지 2"


def test_shortfall_is_reported_never_padded(tmp_path):
    stems = ["듀레이션의 의미로 옳은 것은?", "환헤지 비용의 결정 요인은?", "엉터리", "공매도 제도의 목적은?"]
    answers = {f"slot{i:05d}": [gen(stem, n)] for i, (stem, n) in enumerate(zip(stems, [4, 5, 6, 7]))}
    answers["slot00002"] = [gen("엉터리", 4)] * 2  # always the wrong option count
    with LLMTestServer(rule=draw_reply(answers)) as server:
        p = params(tmp_path, server, target=4, max_rounds=2)
        outcome = run_synthesis(p, plan_slots(4, p.topics, p.choice_counts))
    assert len(outcome.records) == 3 and outcome.short == 1 and outcome.rounds == 2
    assert Counter(r["reason"] for r in outcome.rejects) == {"wrong_choice_count": 2}


def test_grounded_stage_end_to_end_keeps_chunk_id_and_rejects_an_ungrounded_quote(tmp_path):
    """The stage as dvc.yaml runs it: inputs read by kind, metrics with the shortfall."""
    write_records([chunk(), chunk("제9조(과태료) 보고서를 제출하지 아니한 자에게는 1천만원 이하의 과태료를 "
                                  "부과한다.", "chunk-b")], SCHEMAS["document"], tmp_path / "filtered.parquet")
    good = gen("금융투자업자의 업무보고서 제출 기한은?", 4, "B",
               supporting_quote="분기 종료 후 45일 이내에 금융위원회에 업무보고서를 제출하여야 한다")
    made_up = gen("과태료 상한은 얼마인가?", 5, "A", supporting_quote="2천만원 이하의 과태료를 부과한다")
    fixed = gen("보고서 미제출 시 과태료 상한으로 옳은 것은?", 5, "D",
                supporting_quote="1천만원 이하의 과태료를 부과한다")
    answers = {"slot00000": [good], "slot00001": [made_up, fixed]}
    with LLMTestServer(rule=draw_reply(answers)) as server:
        p = params(tmp_path, server, grounded=True, target=2, topics=["절차와 기한", "제재와 예외"],
                   fewshot=str(ROOT / "data/samples/fewshot/rules.yaml"),
                   inputs={"filtered": "filtered.parquet", "transformed": "filtered.parquet"})
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(
            {"synthesize": {"rules": p.model_dump(exclude={"llm": {"cache_dir"}})}}, allow_unicode=True),
            encoding="utf-8")
        result = run_stage("synthesize", ["rules", "--out", "out.parquet", "--rejects", "rej.parquet",
                                          "--metrics", "m.json", "--log", "s.log", "--cache-dir", p.llm.cache_dir], tmp_path)
    assert result.returncode == 0, result.stderr
    records = read_records(tmp_path / "out.parquet")
    assert [json.loads(r["meta"])["chunk_id"] for r in records] == ["chunk-a", "chunk-b"]
    assert json.loads(records[1]["meta"])["supporting_quote"] == "1천만원 이하의 과태료를 부과한다"
    assert [r["reason"] for r in read_records(tmp_path / "rej.parquet")] == ["ungrounded"]
    metrics = json.loads((tmp_path / "m.json").read_text(encoding="utf-8"))
    assert metrics["records"] == 2 and metrics["short"] == 0 and metrics["target"] == 2
    assert metrics["llm"]["calls"] == 3
    # a re-run is answered from the cache: same bytes, no call
    before = (tmp_path / "out.parquet").read_bytes()
    again = run_stage("synthesize", ["rules", "--out", "out.parquet", "--rejects", "rej.parquet",
                                     "--metrics", "m.json", "--log", "s.log", "--cache-dir", p.llm.cache_dir], tmp_path)
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "out.parquet").read_bytes() == before
    assert json.loads((tmp_path / "m.json").read_text(encoding="utf-8"))["llm"]["calls"] == 0
