"""solve@<domain>: byte-exact prompts, solution checks, wrong-letter re-sampling and rejection,
exact pair counts with replacement in id order, shortfall reporting, the quality gate and
the original-format exports — against the local OpenAI-compatible server."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, Optional
from urllib.parse import unquote

import pytest
import yaml

from stages.common.io import read_records, write_records
from stages.common.llm import LLMClient, LLMParams
from stages.common.prompts import LETTERS, load_template
from stages.common.schema import SCHEMAS, validate
from stages.common.text import content_id
from stages.solve import (TEMPLATES, Solution, SolveParams, check_solution, make_pairs, quality_item_id,
                          render_solution, seed_format, select_candidates, solve_messages,
                          solve_questions)
from tests.conftest import run_stage
from tests.llm_server import LLMTestServer, Reply


@pytest.fixture(autouse=True)
def llm_env(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-solve-0000")
    for name in ("OPENAI_BASE_URL", "LLM_OFFLINE"):
        monkeypatch.delenv(name, raising=False)


def mcq(i: int, answer: int = 1, n: int = 4, split: str = "train", source: str = "transform_x") -> dict[str, Any]:
    question = f"문항 {i}: 금리가 오를 때 채권 가격의 변화로 옳은 것은?"
    choices = [f"{i}번 선택지 {k}" for k in range(n)]
    return {"id": content_id("mcq", question, choices, answer), "source": source,
            "domain": "financial_market", "split": split, "question": question,
            "choices": choices, "answer": answer, "category": "", "meta": json.dumps({"k": i})}


def solution(q: dict[str, Any], final: Optional[str] = None, reviewed: Optional[str] = None) -> dict[str, Any]:
    letters = LETTERS[:len(q["choices"])] if reviewed is None else reviewed
    return {"analysis": "금리와 채권 가격의 관계를 묻는다.",
            "choice_reviews": [{"letter": c, "assessment": f"{c} 검토"} for c in letters],
            "derivation": "금리가 오르면 채권 가격은 내린다.",
            "final_letter": final or LETTERS[q["answer"]]}


def params(tmp_path: Path, server: Optional[LLMTestServer] = None, **over: Any) -> SolveParams:
    spec: dict[str, Any] = dict(
        inputs={"transformed": "t.parquet", "synthesized": "s.parquet"}, target_pairs=None,
        max_resamples=2, quality={"enabled": False}, max_reject_rate=0.9,
        llm=dict(model="test-model", base_url=server.base_url if server else None,
                 temperature=0.7, max_tokens=512, seed=1, concurrency=8, timeout_s=5.0,
                 backoff_base_s=0.01, backoff_max_s=0.05, max_attempts=3,
                 max_invalid_attempts=2, prices={"input_per_1m": 1.0, "output_per_1m": 2.0},
                 cache_dir=str(tmp_path / "cache")))
    spec.update(over)
    return SolveParams.model_validate(spec)


def templates() -> dict[str, str]:
    return {name: load_template(name) for name in TEMPLATES}


def draw_reply(answers: dict[str, list[Any]]):
    """Server rule: item X-Item-Id, draw X-Sample-Index -> answers[item][draw]."""
    def rule(request) -> Optional[Reply]:
        item = unquote(request.headers.get("x-item-id", ""))
        sample = int(request.headers.get("x-sample-index", "0"))
        draws = answers.get(item)
        if draws is None:
            return None
        return Reply.ok(json.dumps(draws[min(sample, len(draws) - 1)], ensure_ascii=False))
    return rule


def items_asked(server: LLMTestServer) -> list[str]:
    return [unquote(r.headers.get("x-item-id", "")) for r in server.completions_requests]


def run(p: SolveParams, candidates):
    async def main():
        async with LLMClient(LLMParams.model_validate(p.llm)) as llm:
            return await solve_questions(candidates, llm, p, templates())
    return asyncio.run(main())


# ---------------------------------------------------------------------------- the format
def test_step_prompts_are_byte_exact_to_the_mission_format():
    q = mcq(1, answer=2)
    text = render_solution(Solution.model_validate(solution(q)))
    step1, step2 = make_pairs(q, text, "financial_market")
    expected1 = ("다음 문제를 읽고 정답으로 가장 알맞은 것을 고르시요.\n"
                 "### 질문: 문항 1: 금리가 오를 때 채권 가격의 변화로 옳은 것은?\n"
                 "### 선택지:\nA. 1번 선택지 0\nB. 1번 선택지 1\nC. 1번 선택지 2\nD. 1번 선택지 3\n"
                 "### 정답:")
    assert step1["question"] == expected1 and step1["answer"] == text
    assert step2["question"] == expected1 + "\n" + text and step2["answer"] == "C"
    assert (step1["category"], step2["category"]) == ("step1", "step2")
    for record in (step1, step2):
        assert not validate("qa", record)
        assert json.loads(record["meta"])["question_id"] == q["id"]
        assert record["context"] == "" and record["split"] == "train"
    # the solution reviews every choice in letter order and concludes with the letter
    assert [line[:2] for line in text.splitlines()[2:6]] == ["A.", "B.", "C.", "D."]
    assert text.endswith("따라서 정답은 C입니다.")
    assert seed_format([step1, step2]) == [{"prompt": expected1, "response": text},
                                           {"prompt": expected1 + "\n" + text, "response": "C"}]


def test_solver_never_sees_the_key_and_checks_are_strict():
    q = mcq(2, answer=3)
    messages = solve_messages(q, templates())
    assert "1번 선택지" not in messages[0]["content"]
    assert "2번 선택지 3" in messages[1]["content"] and "정답은 D" not in messages[1]["content"]
    assert check_solution(Solution.model_validate(solution(q)), q) is None
    assert check_solution(Solution.model_validate(solution(q, "A")), q)[0] == "wrong_letter"
    assert check_solution(Solution.model_validate(solution(q, reviewed="ABD")), q)[0] == "incomplete_review"
    assert check_solution(Solution.model_validate(solution(q, "E")), q)[0] == "wrong_letter"


def test_select_candidates_sorts_by_id_dedups_and_rejects_the_test_split():
    a, b, c = mcq(1), mcq(2), mcq(3, split="test")
    candidates, rejects, duplicates = select_candidates([[b, a, c], [a]], "financial_market")
    assert [q["id"] for q in candidates] == sorted([a["id"], b["id"]])
    assert duplicates == 1 and [r["reason"] for r in rejects] == ["test_split"]


# ---------------------------------------------------------------------------- against the server
def test_wrong_letter_is_resampled_and_accepted_or_rejected_after_k_resamples(tmp_path):
    right_later, always_wrong, right_first = mcq(1, answer=1), mcq(2, answer=0), mcq(3, answer=2)
    answers = {right_later["id"]: [solution(right_later, "D"), solution(right_later)],
               always_wrong["id"]: [solution(always_wrong, "B")],
               right_first["id"]: [solution(right_first)]}
    with LLMTestServer(rule=draw_reply(answers)) as server:
        p = params(tmp_path, server, max_resamples=2)
        outcomes, unused = run(p, [right_later, always_wrong, right_first])
        asked = items_asked(server)
    by_id = {o.question["id"]: o for o in outcomes}
    assert by_id[right_later["id"]].ok and by_id[right_later["id"]].sample_index == 1
    assert asked.count(right_later["id"]) == 2
    assert not by_id[always_wrong["id"]].ok and by_id[always_wrong["id"]].reason == "wrong_letter"
    assert asked.count(always_wrong["id"]) == 3  # sample 0 + k=2 re-samples, then rejected
    assert by_id[right_first["id"]].sample_index == 0 and asked.count(right_first["id"]) == 1
    assert unused == 0


def test_exact_pair_count_replaces_failures_in_id_order(tmp_path):
    questions = [mcq(i, answer=i % 4) for i in range(6)]
    ordered = sorted(questions, key=lambda q: q["id"])
    bad = ordered[1]  # among the first three taken: must be replaced by the fourth in id order
    answers = {q["id"]: [solution(q)] for q in questions}
    answers[bad["id"]] = [solution(bad, LETTERS[(bad["answer"] + 1) % 4])]
    with LLMTestServer(rule=draw_reply(answers)) as server:
        p = params(tmp_path, server, target_pairs=6, max_resamples=0)
        outcomes, unused = run(p, ordered)
        asked = set(items_asked(server))
    verified = [o.question["id"] for o in outcomes if o.ok]
    assert verified == [ordered[i]["id"] for i in (0, 2, 3)]
    assert asked == {q["id"] for q in ordered[:4]} and unused == 2


def test_quality_gate_rejects_low_scores_and_hallucinations(tmp_path):
    good, low, fake = mcq(1), mcq(2), mcq(3)
    answers = {q["id"]: [solution(q)] for q in (good, low, fake)}
    answers[quality_item_id(good["id"])] = [{"score": 4, "hallucination": False, "reason": "정확"}]
    answers[quality_item_id(low["id"])] = [{"score": 2, "hallucination": False, "reason": "모호"}]
    answers[quality_item_id(fake["id"])] = [{"score": 5, "hallucination": True, "reason": "없는 제도"}]
    with LLMTestServer(rule=draw_reply(answers)) as server:
        p = params(tmp_path, server, quality={"enabled": True, "min_score": 3})
        outcomes, _ = run(p, [good, low, fake])
    reasons = {o.question["id"]: (o.ok, o.reason) for o in outcomes}
    assert reasons == {good["id"]: (True, None), low["id"]: (False, "low_quality"),
                       fake["id"]: (False, "hallucination")}


def stage_args(tmp_path: Path) -> list[str]:
    return ["financial_market", "--out", "q.parquet", "--pairs", "p.parquet", "--rejects", "r.parquet",
            "--metrics", "m.json", "--log", "s.log", "--exports", "exports/solve/financial_market",
            "--cache-dir", str(tmp_path / "cache")]


def test_stage_reports_shortfall_writes_pairs_and_the_seed_format_exports(tmp_path):
    transformed = [mcq(i, answer=i % 4, n=7) for i in range(3)]
    synthesized = [mcq(10 + i, answer=i % 4, source="synthesize_financial_market") for i in range(2)]
    write_records(transformed, SCHEMAS["mcq"], tmp_path / "t.parquet")
    write_records(synthesized, SCHEMAS["mcq"], tmp_path / "s.parquet")
    key_disagrees = synthesized[0]  # the solver never agrees with the generator's key
    answers = {q["id"]: [solution(q)] for q in transformed + synthesized}
    answers[key_disagrees["id"]] = [solution(key_disagrees, LETTERS[(key_disagrees["answer"] + 1) % 4])]
    with LLMTestServer(rule=draw_reply(answers)) as server:
        p = params(tmp_path, server, target_pairs=12, max_resamples=1)
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(
            {"solve": {"financial_market": p.model_dump(exclude={"llm": {"cache_dir"}})}},
            allow_unicode=True), encoding="utf-8")
        result = run_stage("solve", stage_args(tmp_path), tmp_path)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "m.json").read_text(encoding="utf-8"))
    assert (metrics["records"], metrics["pairs"], metrics["short_pairs"]) == (4, 8, 4)
    assert metrics["rejects_by_reason"] == {"wrong_letter": 1}
    assert "4 pairs short of the target 12" in (tmp_path / "s.log").read_text(encoding="utf-8")
    questions = read_records(tmp_path / "q.parquet")
    assert [q["id"] for q in questions] == sorted(q["id"] for q in transformed + synthesized[1:])
    assert all(json.loads(q["meta"])["solution"].endswith("입니다.") for q in questions)
    pairs = read_records(tmp_path / "p.parquet")
    assert len(pairs) == 8 and [p["category"] for p in pairs] == ["step1", "step2"] * 4
    exports = tmp_path / "exports/solve/financial_market"
    data_files = list(exports.glob("final_training_data_*.json"))
    assert len(data_files) == 1
    data = json.loads(data_files[0].read_text(encoding="utf-8"))
    assert isinstance(data, list) and len(data) == 8 and all(set(d) == {"prompt", "response"} for d in data)
    assert data[1]["prompt"] == data[0]["prompt"] + "\n" + data[0]["response"]
    assert data[1]["response"] in LETTERS
    stamp = data_files[0].name[len("final_training_data_"):-len(".json")]
    assert (exports / f"processing_stats_{stamp}.json").is_file()
    assert "verified" in (exports / f"processing_{stamp}.log").read_text(encoding="utf-8")
    # deterministic data outputs, answered from the cache on a re-run
    before = [(tmp_path / f).read_bytes() for f in ("q.parquet", "p.parquet")]
    again = run_stage("solve", stage_args(tmp_path), tmp_path)
    assert again.returncode == 0, again.stderr
    assert [(tmp_path / f).read_bytes() for f in ("q.parquet", "p.parquet")] == before
    assert json.loads((tmp_path / "m.json").read_text(encoding="utf-8"))["llm"]["calls"] == 0
