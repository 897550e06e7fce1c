"""judge@<key>: open-ended answers scored against their references — chrF offline, an LLM
rubric judge (against the local OpenAI-compatible server) in production; and the open-ended
sets evaluate@ reads."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from stages.common.io import read_records, write_records
from stages.common.runlog import StageError
from stages.evaluate import OPEN_ANSWER_SCHEMA
from stages.judge import Verdict, chrf_scores, judge_messages
from stages.sources.evalsets import OpenEndedSet, load_open_ended
from tests.conftest import ROOT, run_stage
from tests.llm_server import LLMTestServer, Reply

ITEM_HEADER = "x-item-id"  # the LLM layer's item header, as the server (lower-cased) sees it
REFERENCE = "시장금리가 오르면 새로 발행되는 채권의 이자가 높아져 기존 고정금리 채권의 가격이 하락합니다."
ANSWERS = {
    "same": REFERENCE,
    "paraphrase": "금리가 상승하면 기존 고정금리 채권은 상대적으로 매력이 떨어져 가격이 내려갑니다.",
    "off": "삼성전자는 반도체와 스마트폰을 만드는 회사입니다.",
    "empty": "",
}


@pytest.fixture(autouse=True)
def llm_env(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-judge")
    for name in ("OPENAI_BASE_URL", "LLM_OFFLINE"):
        monkeypatch.delenv(name, raising=False)


def answers_file(path: Path) -> list[dict]:
    rows = [{"id": key, "set": "finance_open", "category": "금리", "question": "금리가 오르면 채권 가격은?",
             "reference": REFERENCE, "answer": text, "answer_chars": len(text),
             "answer_tokens": len(text) // 2, "truncated": False} for key, text in ANSWERS.items()]
    write_records(rows, OPEN_ANSWER_SCHEMA, path)
    return rows


def project(tmp: Path, method: str, server: LLMTestServer | None = None, **llm) -> None:
    answers_file(tmp / "answers.parquet")
    section = {"method": method, "max_reject_rate": 0.5,
               "llm": {"model": "judge-model", "base_url": server.base_url if server else None,
                       "max_tokens": 200, "concurrency": 2, "timeout_s": 5.0, "backoff_base_s": 0.01,
                       "backoff_max_s": 0.02, "max_attempts": 2, "max_invalid_attempts": 2, **llm}}
    defaults = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))["llm_defaults"]
    (tmp / "params.yaml").write_text(yaml.safe_dump({"judge": section, "llm_defaults": defaults},
                                                    allow_unicode=True), encoding="utf-8")


ARGS = ["v7", "--answers", "answers.parquet", "--out", "judged.parquet", "--rejects", "rejects.parquet",
        "--cache-dir", "cache", "--metrics", "metrics.json", "--log", "judge.log"]


def test_chrf_scores_korean_answers_by_their_characters():
    rows = [{"answer": a, "reference": REFERENCE} for a in ANSWERS.values()]
    same, paraphrase, off, empty = chrf_scores(rows)
    assert same == 100.0 and empty == 0.0
    assert same > paraphrase > off  # Hangul counts: a paraphrase shares more than an unrelated answer
    assert paraphrase > 15 and off < 10


def test_the_offline_stage_scores_every_answer_and_names_its_judge(tmp_path):
    project(tmp_path, "chrf")
    proc = run_stage("judge", ARGS, tmp_path)
    assert proc.returncode == 0, proc.stderr
    judged = {r["id"]: r for r in read_records(tmp_path / "judged.parquet")}
    metrics = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    assert judged["same"]["score"] == 100.0 and judged["empty"]["score"] == 0.0
    assert judged["same"]["reference"] == REFERENCE and judged["off"]["answer_chars"] == len(ANSWERS["off"])
    assert metrics["judge"].startswith("chrF (sacrebleu") and metrics["scale"] == "0-100"
    assert {r["judge"] for r in judged.values()} == {metrics["judge"]}
    assert metrics["scored"] == 4 and metrics["llm"] is None
    # the response cache (a DVC out) says why it holds no answer, instead of being empty
    assert "no LLM call" in (tmp_path / "cache" / "README.txt").read_text(encoding="utf-8")
    assert metrics["score_mean"] == pytest.approx(sum(r["score"] for r in judged.values()) / 4, abs=1e-3)


def test_the_llm_judge_sees_rubric_reference_and_answer_and_never_pays_twice(tmp_path):
    def rule(request):
        item = request.headers.get(ITEM_HEADER, "")
        if item == "off":
            return Reply.invalid_json()
        score = {"same": 10, "paraphrase": 8, "empty": 1}[item]
        return Reply.ok(json.dumps({"correctness": score, "completeness": score, "fluency": 9,
                                    "score": score, "reason": f"{item} 채점 근거"}, ensure_ascii=False))
    with LLMTestServer(rule=rule) as server:
        project(tmp_path, "llm", server)
        first = run_stage("judge", ARGS, tmp_path)
        asked = len(server.completions_requests)
        bodies = [json.loads(r.raw_body) for r in server.completions_requests]
        again = run_stage("judge", ARGS, tmp_path)  # answers unchanged: all from the cache
        asked_again = len(server.completions_requests) - asked
    assert first.returncode == 0, first.stderr
    assert again.returncode == 0, again.stderr
    judged = {r["id"]: r for r in read_records(tmp_path / "judged.parquet")}
    rejects = read_records(tmp_path / "rejects.parquet")
    metrics = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    # the invalid verdict is a reject, never a score
    assert set(judged) == {"same", "paraphrase", "empty"} and [r["reason"] for r in rejects] == ["judge_invalid_json"]
    assert judged["paraphrase"]["score"] == 8.0 and judged["paraphrase"]["reason"] == "paraphrase 채점 근거"
    assert metrics["judge"] == "llm:judge-model" and metrics["scale"] == "1-10"
    assert metrics["score_mean"] == pytest.approx((10 + 8 + 1) / 3, abs=1e-3)
    user = next(m["content"] for m in bodies[0]["messages"] if m["role"] == "user")
    system = next(m["content"] for m in bodies[0]["messages"] if m["role"] == "system")
    assert REFERENCE in user and "채점할 답변" in user and "correctness" in system and "fluency" in system
    assert bodies[0]["response_format"]["json_schema"]["schema"]["required"] == list(Verdict.model_fields)
    # first run: 4 first draws + the re-ask of the invalid verdict; the re-run with unchanged
    # answers makes no call at all (the re-asked failure is cached too: the same reject again)
    assert asked == 5 and asked_again == 0
    assert metrics["llm"]["calls"] == 0 and metrics["llm"]["cache_hits"] == 5


def test_judge_messages_are_the_cache_key_parts():
    a = judge_messages({"question": "q", "reference": "r", "answer": "a"})
    b = judge_messages({"question": "q", "reference": "r", "answer": "a2"})
    assert a[0] == b[0] and a[1] != b[1]  # same rubric; another answer is another request


def test_open_ended_sets_reject_empty_and_repeated_rows_and_name_missing_columns(tmp_path):
    path = tmp_path / "open.jsonl"
    rows = [{"q": "질문 하나?", "ref": "답 하나", "t": "금리"}, {"q": "질문 둘?", "ref": "", "t": "x"},
            {"q": "질문 하나?", "ref": "다른 답", "t": "y"}]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n{broken\n", encoding="utf-8")
    spec = OpenEndedSet(input=str(path), contest_category="open_ended",
                        columns={"question": "q", "reference": "ref", "category": "t"})
    items, rejects = load_open_ended("open", spec)
    assert [(i.question, i.reference, i.category) for i in items] == [("질문 하나?", "답 하나", "금리")]
    assert sorted(r["reason"] for r in rejects) == ["duplicate", "invalid_record", "malformed_json"]
    with pytest.raises(ValueError, match="missing \\['reference'\\]"):
        OpenEndedSet(input="x.jsonl", contest_category="open_ended", columns={"question": "q"})
    csv = tmp_path / "open.csv"
    csv.write_text("q,answer\n질문?,답\n", encoding="utf-8")
    wrong = OpenEndedSet(input=str(csv), contest_category="open_ended", columns={"question": "q", "reference": "ref"})
    with pytest.raises(StageError, match="'ref'"):
        load_open_ended("open", wrong)
