"""scripts/record_llm.py and scripts/replay_server.py: authored answers -> the replay server ->
the real stage code online -> the response cache -> an offline run that reproduces the answers.
Also: the committed quickstart recordings of filter/transform match their answers files."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from scripts.record_llm import RecordError, record_one
from scripts.replay_server import HEADER_COMMENT, AnswersFileError, ReplayServer, load_answers
from stages.common.io import read_records, write_records
from stages.common.llm_cache import ResponseCache
from stages.common.schema import SCHEMAS
from stages.common.text import content_id
from tests.conftest import ROOT, run_stage

DVC = str(Path(sys.executable).parent / "dvc")
API_KEY = "sk-test-RECORDMARKER-44a1"

DVC_YAML = """
stages:
  filter:
    foreach: ${filter}
    do:
      cmd: >-
        python -m stages.filter ${key} --out out/${key}.parquet --rejects rejects/${key}.parquet
        --metrics metrics/${key}.json --log logs/${key}.log --cache-dir llm_cache/${key}
      deps:
        - ${item.input}
      params:
        - filter.${key}
      outs:
        - out/${key}.parquet
        - rejects/${key}.parquet
        - llm_cache/${key}:
            persist: true
        - logs/${key}.log:
            cache: false
      metrics:
        - metrics/${key}.json:
            cache: false
"""


def mcq(i: int) -> dict[str, Any]:
    question = f"문항 {i}: 주식과 채권의 위험에 대한 설명으로 옳은 것은?"
    choices = [f"주식 선택지 {i}-{k}" for k in range(4)]
    return {"id": content_id("mcq", question, choices, 1), "source": "kmmlu_economics",
            "domain": "financial_market", "split": "train", "question": question, "choices": choices,
            "answer": 1, "category": "Economics", "meta": "{}"}


RECORDS = [mcq(i) for i in range(4)]


def write_answers(path: Path, answers: dict[str, list[Any]], marker: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text((HEADER_COMMENT + "\n" if marker else "")
                    + yaml.safe_dump({"answers": answers}, allow_unicode=True), encoding="utf-8")
    return path


@pytest.fixture()
def project(tmp_path, monkeypatch):
    """A DVC workspace with one LLM stage (filter@fm) and the repository root it records into."""
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)  # must never reach a file
    monkeypatch.delenv("LLM_OFFLINE", raising=False)
    root, ws = tmp_path / "root", tmp_path / "ws"
    ws.mkdir(parents=True)
    subprocess.run([DVC, "init", "--no-scm", "-q"], cwd=ws, check=True)
    shutil.copytree(ROOT / "stages", ws / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    (ws / "dvc.yaml").write_text(DVC_YAML, encoding="utf-8")
    write_records(RECORDS, SCHEMAS["mcq"], ws / "in.parquet")
    params = {"filter": {"fm": {
        "input": "in.parquet", "criteria": "금융시장 문항",
        "prefilter": {"keywords": {"주식": 2, "채권": 2}, "min_score": 2, "min_chars": 10,
                      "min_hangul_share": 0.5, "max_digit_share": 0.5},
        "max_reject_rate": 0.2,
        "llm": {"model": "gpt-4o-2024-08-06", "temperature": 0.0, "max_tokens": 100, "seed": 3,
                "prices": {"input_per_1m": 2.5, "output_per_1m": 10.0}, "offline": True}}}}
    (ws / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    return root, ws


def verdicts() -> dict[str, list[Any]]:
    answers: dict[str, list[Any]] = {r["id"]: [{"relevant": True, "reason": f"이유 {i}"}]
                                      for i, r in enumerate(RECORDS)}
    answers[RECORDS[1]["id"]] = [{"relevant": False, "reason": "관련 없음"}]
    # draw 0 is invalid JSON: the client re-asks (re-ask 1) and gets draw 1
    answers[RECORDS[2]["id"]] = ['{"relevant": tr', {"relevant": True, "reason": "다시 답함"}]
    return answers


def test_round_trip_answers_to_cache_to_an_offline_run(project):
    root, ws = project
    answers_file = write_answers(root / "data/samples/llm_answers/filter.fm.yaml", verdicts())
    summary = record_one(root, ws, "filter", "fm", log=lambda message: None)
    destination = root / "data/samples/llm_cache/filter/fm"
    assert summary["requests"] == 5 and summary["entries"] == 5 and summary["unused"] == []
    # the recorded cache answers an offline run of the stage with exactly the authored verdicts
    shutil.rmtree(ws / "llm_cache", ignore_errors=True)
    shutil.copytree(destination, ws / "llm_cache/fm")
    env_key = os.environ.pop("OPENAI_API_KEY")
    try:
        os.environ["LLM_OFFLINE"] = "1"
        proc = run_stage("filter", ["fm", "--out", "o.parquet", "--rejects", "r.parquet",
                                    "--metrics", "m.json", "--log", "l.log", "--cache-dir", "llm_cache/fm"], ws)
    finally:
        os.environ.pop("LLM_OFFLINE")
        os.environ["OPENAI_API_KEY"] = env_key
    assert proc.returncode == 0, proc.stderr
    kept = read_records(ws / "o.parquet")
    assert [r["id"] for r in kept] == [RECORDS[0]["id"], RECORDS[2]["id"], RECORDS[3]["id"]]
    reasons = {r["id"]: json.loads(r["meta"])["filter"]["judge_reason"] for r in kept}
    assert reasons[RECORDS[2]["id"]] == "다시 답함"
    assert [(r["item"], r["detail"]) for r in read_records(ws / "r.parquet")] == \
        [(RECORDS[1]["id"], "관련 없음")]
    metrics = json.loads((ws / "m.json").read_text(encoding="utf-8"))
    assert metrics["llm"]["calls"] == 0 and metrics["llm"]["cache_hits"] == 5
    # a placeholder key is used, never the caller's; nothing anywhere holds the real one
    for base in (root, ws):
        for path in base.rglob("*"):
            if path.is_file():
                assert API_KEY.encode() not in path.read_bytes(), path
    assert answers_file.is_file()


def test_a_missing_answer_fails_listing_the_item_and_records_nothing(project):
    root, ws = project
    answers = verdicts()
    del answers[RECORDS[3]["id"]]
    write_answers(root / "data/samples/llm_answers/filter.fm.yaml", answers)
    with pytest.raises(RecordError, match=RECORDS[3]["id"]):
        record_one(root, ws, "filter", "fm", log=lambda message: None)
    assert not (root / "data/samples/llm_cache/filter/fm").exists()


def test_stale_answers_are_reported(project):
    root, ws = project
    answers = verdicts()
    answers["no-such-item"] = [{"relevant": True, "reason": "x"}]
    write_answers(root / "data/samples/llm_answers/filter.fm.yaml", answers)
    summary = record_one(root, ws, "filter", "fm", log=lambda message: None)
    assert summary["unused"] == ["no-such-item"]


# ---------------------------------------------------------------------------- the replay server
def post(server: ReplayServer, item: str, sample: int = 0, reask: int = 0) -> tuple[int, dict]:
    request = urllib.request.Request(
        server.base_url + "/chat/completions", method="POST",
        data=json.dumps({"model": "m", "messages": [{"role": "user", "content": "질문"}]}).encode(),
        headers={"Content-Type": "application/json", "X-Item-Id": item,
                 "X-Sample-Index": str(sample), "X-Reask-Index": str(reask)})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_replay_server_hands_out_draws_in_the_order_asked():
    with ReplayServer({"q%201": [{"a": 0}, {"a": 1}, "not json"]}) as server:
        status, body = post(server, "q%25201")  # percent-encoded "q%201"
        assert status == 200 and json.loads(body["choices"][0]["message"]["content"]) == {"a": 0}
        assert post(server, "q%25201")[1]["choices"][0]["message"]["content"] == '{"a": 0}'  # a retry
        assert json.loads(post(server, "q%25201", sample=1)[1]["choices"][0]["message"]["content"]) == {"a": 1}
        assert post(server, "q%25201", sample=1, reask=1)[1]["choices"][0]["message"]["content"] == "not json"
        status, body = post(server, "q%25201", sample=2)
        assert status == 400 and "has 3 authored answer(s) but draw 3" in body["error"]["message"]
        status, body = post(server, "other")
        assert status == 400 and "no authored answer for item 'other'" in body["error"]["message"]
        assert server.misses == ["q%201 (draw 3)", "other (no answers)"]
        assert body.get("usage") is None
        assert post(server, "q%25201")[1]["usage"]["prompt_tokens"] > 0


def test_answers_file_must_be_marked_and_well_formed(tmp_path):
    assert load_answers(write_answers(tmp_path / "ok.yaml", {"x": [{"a": 1}]})) == {"x": [{"a": 1}]}
    with pytest.raises(AnswersFileError, match="marker"):
        load_answers(write_answers(tmp_path / "unmarked.yaml", {"x": [{"a": 1}]}, marker=False))
    with pytest.raises(AnswersFileError, match="non-empty list"):
        load_answers(write_answers(tmp_path / "empty.yaml", {"x": []}))
    with pytest.raises(AnswersFileError, match="does not exist"):
        load_answers(tmp_path / "missing.yaml")


# ---------------------------------------------------------------------------- committed recordings
@pytest.mark.parametrize("answers_file", sorted(
    p.name for p in (ROOT / "data/samples/llm_answers").glob("*.yaml")
    if p.name.startswith(("filter.", "transform.", "agent."))))
def test_committed_recordings_match_their_answers_files(answers_file):
    """Every authored draw is in the recorded cache and the cache holds nothing else: a
    changed answers file that was not re-recorded fails here."""
    stage, key, _ = answers_file.split(".")
    answers = load_answers(ROOT / "data/samples/llm_answers" / answers_file)
    cache = ResponseCache(ROOT / "data/samples/llm_cache" / stage / key)
    recorded = Counter(cache.get(k).response.content for k in cache.keys())
    authored = Counter(d if isinstance(d, str) else json.dumps(d, ensure_ascii=False)
                       for draws in answers.values() for d in draws)
    assert recorded == authored
