"""transform@<domain>: 4 -> 7 choices with the correct answer tracked through the rewrite,
every check a reject with its reason, letters balanced deterministically; the stage end to end
through the real LLM client against the local OpenAI-compatible server."""
from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest
import yaml

from stages.common.io import read_records, write_records
from stages.common.llm import Result, Usage
from stages.common.prompts import LETTERS
from stages.common.schema import SCHEMAS, validate_table
from stages.common.text import content_id
from stages.common.prompts import place_answer
from stages.transform import (SevenChoiceMCQ, TransformReject, balanced_targets, build_records,
                              _hash_int, check_rewrite, letter_histogram, split_askable,
                              transform_messages)
from tests.conftest import run_stage
from tests.llm_server import LLMTestServer, Reply

API_KEY = "sk-test-TRANSFORMMARKER-81d0"


def original(i: int = 0, answer: int = 2) -> dict[str, Any]:
    question = f"문항 {i}: 채권 가격과 시장금리의 관계로 옳은 것은?"
    choices = [f"원래 선택지 {i}-{k}" for k in range(4)]
    return {"id": content_id("mcq", question, choices, answer), "source": "kmmlu_economics",
            "domain": "financial_market", "split": "train", "question": question, "choices": choices,
            "answer": answer, "category": "Economics", "meta": "{}"}


def rewrite_for(record: dict[str, Any], *, new_positions: str = "BDFA", **changes: Any) -> dict[str, Any]:
    """A correct 7-choice rewrite: original choice k goes to letter new_positions[k]
    (verbatim), the rest are new distractors."""
    choices = [f"새 오답 {record['id']}-{k}" for k in range(7)]
    for k, text in enumerate(record["choices"]):
        choices[LETTERS.index(new_positions[k])] = text
    correct = LETTERS.index(new_positions[record["answer"]])
    answer = {"question": "금융시장 상황: " + record["question"],
              "choices": [{"text": c, "is_correct": i == correct} for i, c in enumerate(choices)],
              "original_positions": list(new_positions), "keeps_original_answer": True}
    answer.update(changes)
    return answer


def parsed(answer: dict[str, Any]) -> SevenChoiceMCQ:
    return SevenChoiceMCQ.model_validate(answer)


# ---------------------------------------------------------------------------- checks
def test_a_good_rewrite_passes_and_points_at_the_original_answer():
    record = original(answer=2)
    question, choices, correct = check_rewrite(record, parsed(rewrite_for(record)))
    assert len(choices) == 7 and choices[correct] == record["choices"][2]
    assert correct == LETTERS.index("F") and question.startswith("금융시장 상황:")


def _mutate(answer: dict[str, Any], how: str) -> dict[str, Any]:
    choices = answer["choices"]
    if how == "six_choices":
        drop = next(i for i, c in enumerate(choices) if not c["is_correct"])
        answer["choices"] = choices[:drop] + choices[drop + 1:]
    elif how == "eight_choices":
        answer["choices"] = choices + [{"text": "여덟 번째", "is_correct": False}]
    elif how == "empty_choice":
        choices[0]["text"] = "   "
    elif how == "duplicate":  # same text up to spacing and case
        choices[2]["text"] = " ".join(choices[3]["text"].upper())
    elif how == "two_correct":
        next(c for c in choices if not c["is_correct"])["is_correct"] = True
    elif how == "none_correct":
        for c in choices:
            c["is_correct"] = False
    elif how == "meaning_changed":
        answer["keeps_original_answer"] = False
    elif how == "bad_letters":
        answer["original_positions"] = ["B", "D", "Z", "A"]
    elif how == "repeated_letters":
        answer["original_positions"] = ["B", "B", "F", "A"]
    elif how == "answer_moved":  # the model marks a new distractor as correct
        for i, c in enumerate(choices):
            c["is_correct"] = i == LETTERS.index("C")
    elif how == "mapping_lies":  # original A is verbatim at B, but the mapping says E
        answer["original_positions"] = ["E", "D", "F", "A"]
    elif how == "empty_question":
        answer["question"] = " "
    return answer


@pytest.mark.parametrize("how, reason", [
    ("six_choices", "wrong_choice_count"), ("eight_choices", "wrong_choice_count"),
    ("empty_choice", "empty_choice"), ("duplicate", "duplicate_choices"),
    ("two_correct", "not_exactly_one_correct"), ("none_correct", "not_exactly_one_correct"),
    ("meaning_changed", "answer_meaning_changed"), ("bad_letters", "bad_mapping"),
    ("repeated_letters", "bad_mapping"), ("answer_moved", "answer_mismatch"),
    ("mapping_lies", "mapping_inconsistent"), ("empty_question", "empty_question"),
])
def test_each_broken_rewrite_is_rejected_with_its_reason(how, reason):
    record = original(answer=2)
    with pytest.raises(TransformReject) as info:
        check_rewrite(record, parsed(_mutate(rewrite_for(record), how)))
    assert info.value.reason == reason


# ---------------------------------------------------------------------------- letters
def result_for(record: dict[str, Any], answer: dict[str, Any] | None, error: str | None = None) -> Result:
    return Result(record["id"], 0, parsed(answer) if answer else None,
                  json.dumps(answer, ensure_ascii=False) if answer else None, "stop",
                  Usage(10, 20), False, 1, error=error, detail="x" if error else "")


def test_answer_is_tracked_through_rewrite_and_shuffle():
    records = [original(i, answer=i % 4) for i in range(40)]
    positions = ["BDFA", "GACE", "ABCD", "EGBC"]
    results = [result_for(r, rewrite_for(r, new_positions=positions[i % 4])) for i, r in enumerate(records)]
    out, rejects, model_letters = build_records(records, results, "financial_market")
    assert not rejects and len(out) == 40
    validate_table("mcq", out)
    for record, new in zip(records, out):
        assert new["choices"][new["answer"]] == record["choices"][record["answer"]]
        assert len(new["choices"]) == 7 and new["domain"] == "financial_market"
        meta = json.loads(new["meta"])
        assert meta["source_id"] == record["id"] and meta["original"]["answer"] == record["answer"]
        # the other original choices are all still there, as distractors
        assert set(record["choices"]) <= set(new["choices"])
    assert sum(model_letters.values()) == 40


@pytest.mark.parametrize("n", [7, 700, 703])
def test_letters_are_balanced_across_a_to_g(n):
    targets = balanced_targets([f"item-{i}" for i in range(n)])
    counts = Counter(targets.values())
    assert set(counts) <= set(range(7)) and max(counts.values()) - min(counts.values()) <= 1
    assert len(counts) == 7


def test_letters_do_not_depend_on_input_order_or_the_models_position():
    ids = [f"item-{i}" for i in range(50)]
    assert balanced_targets(ids) == balanced_targets(list(reversed(ids)))
    choices = [f"c{i}" for i in range(7)]
    placed = place_answer(choices, 3, 5, _hash_int("item-1"))
    assert placed[5] == "c3" and sorted(placed) == sorted(choices)
    assert place_answer(choices, 3, 5, _hash_int("item-1")) == placed  # seeded by the id
    orders = {tuple(place_answer(choices, 3, 5, _hash_int(f"item-{i}"))) for i in range(10)}
    assert len(orders) > 1 and all(order[5] == "c3" for order in orders)


def test_model_letters_skewed_to_one_position_still_come_out_balanced():
    records = [original(i, answer=0) for i in range(70)]
    results = [result_for(r, rewrite_for(r, new_positions="ABCD")) for r in records]  # always A
    out, _, model_letters = build_records(records, results, "accounting")
    assert model_letters == Counter({"A": 70})
    assert letter_histogram(out) == {ch: 10 for ch in LETTERS}


def test_llm_failures_are_rejects_with_the_llm_reason():
    records = [original(i) for i in range(3)]
    results = [result_for(records[0], rewrite_for(records[0])),
               result_for(records[1], None, error="transport_error"),
               result_for(records[2], _mutate(rewrite_for(records[2]), "two_correct"))]
    out, rejects, _ = build_records(records, results, "financial_market")
    assert [r["item"] for r in rejects] == [records[1]["id"], records[2]["id"]]
    assert [r["reason"] for r in rejects] == ["llm_transport_error", "not_exactly_one_correct"]
    assert len(out) == 1


def test_prompt_carries_the_original_answer_and_the_context():
    record = original(answer=1)
    system, user = transform_messages(record, "외환 시장 상황")
    assert "외환 시장 상황" in system["content"] and "$" not in system["content"]
    assert "정답: B. 원래 선택지 0-1" in user["content"]
    assert "D. 원래 선택지 0-3" in user["content"]


# ---------------------------------------------------------------------------- the stage
@pytest.fixture(autouse=True)
def llm_env(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    for name in ("OPENAI_BASE_URL", "LLM_OFFLINE"):
        monkeypatch.delenv(name, raising=False)


ARGS = ["fm", "--out", "out.parquet", "--rejects", "rejects.parquet", "--metrics", "metrics.json",
        "--log", "transform.log", "--cache-dir", "cache"]


def test_stage_end_to_end_tracks_answers_rejects_and_reports_letters(tmp_path):
    records = [original(i, answer=i % 4) for i in range(14)]
    answers = {r["id"]: rewrite_for(r) for r in records}
    answers[records[3]["id"]] = _mutate(answers[records[3]["id"]], "duplicate")

    def rule(request):
        return Reply.ok(json.dumps(answers[request.headers["x-item-id"]], ensure_ascii=False))

    write_records(records, SCHEMAS["mcq"], tmp_path / "in.parquet")
    llm = {"model": "test-model", "temperature": 0.0, "max_tokens": 512, "seed": 1,
           "concurrency": 4, "timeout_s": 5.0, "max_attempts": 2,
           "prices": {"input_per_1m": 2.5, "output_per_1m": 10.0}}  # cache: --cache-dir
    with LLMTestServer(rule=rule) as server:
        llm["base_url"] = server.base_url
        (tmp_path / "params.yaml").write_text(yaml.safe_dump({"transform": {"fm": {
            "input": "in.parquet", "context": "주식시장 실무", "max_reject_rate": 0.2, "llm": llm}}},
            allow_unicode=True), encoding="utf-8")
        proc = run_stage("transform", ARGS, tmp_path)
        assert proc.returncode == 0, proc.stderr
        calls = len(server.completions_requests)
        first = (tmp_path / "out.parquet").read_bytes()
        again = run_stage("transform", ARGS, tmp_path)  # from the cache: no call, same bytes
        assert again.returncode == 0 and len(server.completions_requests) == calls == 14
    assert (tmp_path / "out.parquet").read_bytes() == first
    out = read_records(tmp_path / "out.parquet")
    rejects = read_records(tmp_path / "rejects.parquet")
    metrics = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    assert [r["reason"] for r in rejects] == ["duplicate_choices"]
    by_source = {json.loads(r["meta"])["source_id"]: r for r in out}
    for record in records:
        if record["id"] in by_source:
            new = by_source[record["id"]]
            assert new["choices"][new["answer"]] == record["choices"][record["answer"]]
    assert metrics["records"] == 13 and metrics["letter_spread"] <= 1
    assert sum(metrics["answer_letters"].values()) == 13
    assert metrics["answer_letters_from_model"]["F"] + metrics["answer_letters_from_model"]["D"] > 0
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert API_KEY.encode() not in path.read_bytes(), path


def test_an_original_with_repeated_choices_is_rejected_before_any_request():
    """Such an item can never pass check_rewrite (verbatim: duplicate_choices; reworded:
    mapping_inconsistent), so it is not worth a paid call."""
    twin = original(7)
    twin = {**twin, "choices": ["같은 선택지", "다른 선택지", "같은  선택지 ", "셋째"]}
    askable, rejects = split_askable([original(1), twin, original(2)], "fm")
    assert [r["id"] for r in askable] == [original(1)["id"], original(2)["id"]]
    assert [(r["item"], r["reason"]) for r in rejects] == [(twin["id"], "original_duplicate_choices")]
    assert "A, C" in rejects[0]["detail"]
    with pytest.raises(TransformReject):  # what the model's faithful rewrite would have met
        check_rewrite(twin, parsed(rewrite_for(twin)))
