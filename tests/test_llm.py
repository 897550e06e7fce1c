"""The LLM layer against a local OpenAI-compatible server: retries, fail-fast, re-asks,
the response cache (keys, resume after SIGKILL, offline mode, concurrent writers), the
api key's whereabouts, the concurrency bound, rate limiting and accounting.

No network but 127.0.0.1. Timing is asserted only as coarse lower bounds (a wait the
server asked for really happened), never as upper bounds.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from pathlib import Path
from typing import Any, Optional

import pytest
from pydantic import BaseModel, ValidationError

from stages.common.llm import (Accounting, FatalLLMError, LLMClient, LLMParams, LLMRequest,
                               RateLimiter, Result, derive_seed, estimate_tokens,
                               evaluate_response, response_format_for, retry_after_seconds,
                               run_batch)
from stages.common.llm_cache import (CacheEntry, CacheMissError, CachedResponse,
                                     RequestSummary, ResponseCache, cache_key)
from stages.common.runlog import StageError
from tests.conftest import ROOT
from tests.llm_server import LLMTestServer, Reply, free_port

API_KEY = "sk-test-MARKER-7f3a9c1e5b"
ITEM = re.compile(r"item-(\d+)")


class Verdict(BaseModel):
    answer: str
    relevant: bool
    note: Optional[str] = None


class Summary(BaseModel):
    summary: str


def messages(i: int, text: str = "주식시장 관련 질문입니까?") -> list[dict[str, str]]:
    return [{"role": "system", "content": "금융 문항 판정기"},
            {"role": "user", "content": f"item-{i}: {text}"}]


def requests_for(items, model: type[BaseModel] = Verdict, **kw: Any) -> list[LLMRequest]:
    return [LLMRequest(messages(i), model, f"item-{i}", **kw) for i in items]


def items_seen(server: LLMTestServer, since: int = 0) -> list[int]:
    return [int(ITEM.search(r.text).group(1)) for r in server.completions_requests[since:]]


@pytest.fixture(autouse=True)
def llm_env(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    for name in ("OPENAI_BASE_URL", "LLM_OFFLINE", "OPENAI_ORG_ID", "OPENAI_PROJECT_ID",
                 "OPENAI_CUSTOM_HEADERS"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture()
def server():
    with LLMTestServer() as srv:
        yield srv


def make_params(tmp_path: Path, server: LLMTestServer | None = None, **overrides: Any) -> LLMParams:
    spec: dict[str, Any] = dict(
        model="test-model", base_url=server.base_url if server else None, temperature=0.0,
        max_tokens=64, seed=7, concurrency=8, timeout_s=5.0, backoff_base_s=0.01,
        backoff_max_s=0.05, max_attempts=4, max_invalid_attempts=3,
        prices={"input_per_1m": 2.5, "output_per_1m": 10.0}, cache_dir=str(tmp_path / "llm_cache"))
    spec.update(overrides)
    return LLMParams.model_validate(spec)


def run_requests(params: LLMParams, requests: list[LLMRequest]) -> tuple[list[Result], Accounting, LLMClient]:
    async def main():
        async with LLMClient(params) as llm:
            return await llm.run_many(requests), llm.accounting, llm
    return asyncio.run(main())


def run_one(params: LLMParams, i: int = 0, model: type[BaseModel] = Verdict) -> Result:
    results, _, _ = run_requests(params, requests_for([i], model))
    return results[0]


# ---------------------------------------------------------------------------- request shape
def test_request_is_structured_output_with_strict_schema(tmp_path, server):
    result = run_one(make_params(tmp_path, server), 3)
    assert result.ok and result.parsed.answer.startswith("item-3")
    body = server.completions_requests[0].body
    fmt = body["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["strict"] is True
    assert fmt["json_schema"]["name"] == "Verdict"
    schema = fmt["json_schema"]["schema"]
    assert schema["additionalProperties"] is False
    assert set(schema["required"]) == {"answer", "relevant", "note"}  # strict: all required
    assert (body["model"], body["temperature"], body["top_p"], body["max_tokens"], body["seed"]) == \
        ("test-model", 0.0, 1.0, 64, 7)
    assert body["messages"] == messages(3)
    assert server.completions_requests[0].headers["x-stainless-retry-count"] == "0"


def test_token_limit_field_is_configurable(tmp_path, server):
    run_one(make_params(tmp_path, server, token_limit_field="max_completion_tokens"))
    body = server.completions_requests[0].body
    assert body["max_completion_tokens"] == 64 and "max_tokens" not in body


def test_endpoint_can_come_from_the_environment(tmp_path, server, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    result = run_one(make_params(tmp_path, None), 1)
    assert result.ok and len(server.completions_requests) == 1


def test_params_are_strict():
    base = dict(model="m", temperature=0, max_tokens=8, cache_dir="c",
                prices={"input_per_1m": 0, "output_per_1m": 0})
    LLMParams.model_validate(base)
    with pytest.raises(ValidationError, match="concurency"):
        LLMParams.model_validate({**base, "concurency": 5})
    with pytest.raises(ValidationError, match="credentials"):
        LLMParams.model_validate({**base, "base_url": "https://user:secret@example.org/v1"})
    with pytest.raises(ValidationError):
        LLMParams.model_validate({**base, "api_key": "sk-no-keys-in-params"})


# ---------------------------------------------------------------------------- transport retries
@pytest.mark.parametrize("reply,wait", [
    (Reply.rate_limited(retry_after=1), 1.0),
    (Reply.rate_limited(retry_after_ms=400), 0.4),
])
def test_rate_limit_waits_as_long_as_the_server_asks(tmp_path, server, reply, wait):
    server.enqueue(reply)
    params = make_params(tmp_path, server)  # own backoff is 10-50 ms: only the header explains the wait
    start = time.monotonic()
    result = run_one(params)
    elapsed = time.monotonic() - start
    assert result.ok and result.retries == 1
    assert len(server.completions_requests) == 2
    gap = server.completions_requests[1].received_at - server.completions_requests[0].received_at
    assert gap >= wait and elapsed >= wait


@pytest.mark.parametrize("fault", ["500", "503", "drop", "timeout", "garbage", "no_choices"])
def test_transient_errors_are_retried_until_success(tmp_path, server, fault):
    reply = {"500": Reply.server_error(500), "503": Reply.server_error(503),
             "drop": Reply.drop_connection(), "timeout": Reply.slow(3.0),
             "garbage": Reply.garbage(),
             "no_choices": Reply.garbage(b'{"id": "x", "object": "chat.completion", "choices": []}')
             }[fault]
    server.enqueue(reply, reply)
    params = make_params(tmp_path, server, timeout_s=0.4)
    results, accounting, _ = run_requests(params, requests_for([0]))
    assert results[0].ok and results[0].retries == 2 and results[0].attempts == 1
    assert len(server.completions_requests) == 3
    assert accounting.transport_retries == 2 and accounting.calls == 1
    assert len(ResponseCache(params.cache_dir)) == 1


def test_transport_errors_exhaust_into_a_reject_that_is_not_cached(tmp_path, server):
    server.rule = lambda request: Reply.server_error(502)
    params = make_params(tmp_path, server, max_attempts=3)
    results, accounting, _ = run_requests(params, requests_for([0, 1]))
    assert [r.error for r in results] == ["transport_error", "transport_error"]
    assert all(r.parsed is None and "HTTP 502" in r.detail for r in results)
    assert len(server.completions_requests) == 6  # 3 attempts each, then give up
    assert accounting.rejects == {"transport_error": 2} and accounting.calls == 0
    assert len(ResponseCache(params.cache_dir)) == 0
    server.rule = None  # the endpoint recovers: a rerun asks again (nothing to replay)
    results, _, _ = run_requests(params, requests_for([0, 1]))
    assert all(r.ok for r in results) and len(server.completions_requests) == 8


def _closed_port() -> int:
    import socket
    with socket.socket() as probe:  # bound, never listening: connections are refused
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("base_url", ["refused", "http://no-such-host.invalid/v1"])
def test_an_endpoint_never_reached_fails_the_stage_naming_it(tmp_path, base_url):
    if base_url == "refused":
        base_url = f"http://127.0.0.1:{_closed_port()}/v1"
    params = make_params(tmp_path, None, base_url=base_url, max_attempts=8, concurrency=2)
    with pytest.raises(FatalLLMError) as info:
        run_requests(params, requests_for(range(11)))
    message = str(info.value)
    assert f"LLM endpoint {base_url} is unreachable" in message and "no request has reached it" in message
    assert "ConnectionRefusedError" in message or "gaierror" in message


def test_a_refused_connection_after_the_endpoint_answered_is_retried(tmp_path):
    """Only an endpoint never reached is fatal; once it has answered, a refused connection is
    a drop like any other: retried, then a transport_error reject for that item."""
    with LLMTestServer() as up:
        params = make_params(tmp_path, up, max_attempts=2)

        async def main():
            async with LLMClient(params) as llm:
                first = await llm.run_many(requests_for([0]))
                up.stop()  # the endpoint goes away mid-run
                rest = await llm.run_many(requests_for([1, 2]))
                return first, rest, llm.accounting
        first, rest, accounting = asyncio.run(main())
    assert first[0].ok
    assert [r.error for r in rest] == ["transport_error", "transport_error"]
    assert all("gave up after 2 attempts" in r.detail for r in rest)
    assert accounting.transport_retries == 2


def test_server_rpm_cap_answers_429_and_exhausted_retries_reject(tmp_path):
    with LLMTestServer(rpm_cap=2) as capped:
        results, accounting = run_batch(make_params(tmp_path, capped, max_attempts=1),
                                        requests_for(range(3)))
        assert [r.ok for r in results].count(True) == 2
        [rejected] = [r for r in results if not r.ok]
        assert rejected.error == "transport_error" and "HTTP 429" in rejected.detail
        assert capped.status_counts[429] == 1 and accounting.rejects == {"transport_error": 1}
        assert int(capped.requests[-1].headers.get("x-stainless-retry-count", "0")) == 0


def test_other_client_errors_reject_the_item_without_retry(tmp_path, server):
    server.enqueue(Reply.bad_request())
    results, accounting, _ = run_requests(make_params(tmp_path, server), requests_for([0, 1]))
    by_item = {r.item_id: r for r in results}
    assert sum(r.error == "bad_request" for r in results) == 1
    assert any(r.ok for r in results)
    assert "context length" in next(r.detail for r in results if r.error)
    assert len(server.completions_requests) == 2 and accounting.rejects == {"bad_request": 1}
    assert set(by_item) == {"item-0", "item-1"}


# ---------------------------------------------------------------------------- fail fast
@pytest.mark.parametrize("reply,phrase", [
    (Reply.unauthorized(), "OPENAI_API_KEY"),
    (Reply.permission_denied(), "HTTP 403"),
    (Reply.insufficient_quota(), "insufficient_quota"),
])
def test_fatal_errors_fail_fast_and_cancel_outstanding_work(tmp_path, server, reply, phrase):
    server.rule = lambda request: reply
    server.latency = 0.05
    params = make_params(tmp_path, server, concurrency=3, max_attempts=8)

    async def main():
        async with LLMClient(params) as llm:
            with pytest.raises(FatalLLMError) as caught:
                await llm.run_many(requests_for(range(30)))
            # Requests the client had already written may still be on their way to the
            # server: let them land before counting, then nothing more may arrive.
            await asyncio.sleep(0.5)
            seen = len(server.completions_requests)
            with pytest.raises(FatalLLMError):  # the client refuses further work
                await llm.complete(messages(99), Verdict, item_id="item-99")
            await asyncio.sleep(0.3)
            return caught.value, seen
    error, seen = asyncio.run(main())
    assert isinstance(error, StageError) and phrase in str(error)
    assert API_KEY not in str(error)
    assert seen <= 3  # only what was already in flight; no retries, no new requests
    assert len(server.completions_requests) == seen


def test_unknown_model_is_fatal(tmp_path, server):
    server.rule = lambda request: Reply(status=404, error={"message": "The model does not exist",
                                                            "type": "invalid_request_error",
                                                            "code": "model_not_found"})
    with pytest.raises(FatalLLMError, match="404.*test-model|test-model.*404"):
        run_requests(make_params(tmp_path, server), requests_for(range(5)))


def test_missing_api_key_is_fatal_before_any_request(tmp_path, server, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(FatalLLMError, match="OPENAI_API_KEY is not set"):
        run_requests(make_params(tmp_path, server), requests_for(range(3)))
    assert server.completions_requests == []


# ---------------------------------------------------------------------------- invalid answers
INVALID = {
    "invalid_json": Reply.invalid_json(),
    "schema_violation": Reply.ok('{"answer": "yes"}'),  # "relevant" missing
    "refusal": Reply.refused(),
    "truncated": Reply.truncated(),
}


@pytest.mark.parametrize("reason", sorted(INVALID))
def test_invalid_answers_are_reasked_then_rejected_with_the_reason(tmp_path, server, reason):
    server.rule = lambda request: INVALID[reason]
    params = make_params(tmp_path, server)
    results, accounting, _ = run_requests(params, requests_for([0]))
    result = results[0]
    assert result.parsed is None and result.error == reason and result.detail
    assert result.attempts == 3 and not result.cached
    sent = server.completions_requests
    assert len(sent) == 3
    seeds = [r.body["seed"] for r in sent]
    assert seeds[0] == 7 and len(set(seeds)) == 3  # each re-ask is a new draw
    assert accounting.rejects == {reason: 1} and accounting.items_ok == 0
    # Every completed response was cached: a rerun replays them and reaches the same verdict.
    assert len(ResponseCache(params.cache_dir)) == 3
    again, accounting2, _ = run_requests(params, requests_for([0]))
    assert len(server.completions_requests) == 3
    assert (again[0].error, again[0].cached, again[0].raw) == (reason, True, result.raw)
    assert accounting2.calls == 0 and accounting2.cache_hits == 3


def test_a_reask_that_comes_back_valid_is_accepted(tmp_path, server):
    server.enqueue(Reply.truncated(), Reply.invalid_json())
    result = run_one(make_params(tmp_path, server), 5)
    assert result.ok and result.attempts == 3 and result.parsed.answer.startswith("item-5")
    assert len(server.completions_requests) == 3


def test_evaluate_response_accepts_fenced_json_and_reports_schema_errors():
    fenced = CachedResponse(content='```json\n{"answer": "a", "relevant": false, "note": null}\n```',
                            finish_reason="stop", prompt_tokens=1, completion_tokens=1)
    parsed, reason, _ = evaluate_response(fenced, Verdict)
    assert reason is None and parsed == Verdict(answer="a", relevant=False)
    wrong = fenced.model_copy(update={"content": '{"answer": 1, "relevant": "maybe"}'})
    parsed, reason, detail = evaluate_response(wrong, Verdict)
    assert parsed is None and reason == "schema_violation" and "relevant" in detail
    empty = fenced.model_copy(update={"content": None})
    assert evaluate_response(empty, Verdict)[1] == "invalid_json"
    filtered = fenced.model_copy(update={"finish_reason": "content_filter"})
    assert evaluate_response(filtered, Verdict)[1] == "refusal"


# ---------------------------------------------------------------------------- the cache
def test_rerun_makes_no_call_and_new_items_make_exactly_one_call_each(tmp_path, server):
    server.latency, server.jitter = 0.02, 0.02  # answers arrive out of order
    params = make_params(tmp_path, server)
    first, acc1, _ = run_requests(params, requests_for(range(10)))
    assert [r.parsed.answer.split(":")[0] for r in first] == [f"item-{i}" for i in range(10)]
    assert len(server.completions_requests) == 10 and acc1.calls == 10
    second, acc2, _ = run_requests(params, requests_for(range(10)))
    assert len(server.completions_requests) == 10
    assert acc2.calls == 0 and acc2.cache_hits == 10 and all(r.cached for r in second)
    assert [r.parsed for r in second] == [r.parsed for r in first]
    third, acc3, _ = run_requests(params, requests_for(range(13)))
    assert sorted(items_seen(server, since=10)) == [10, 11, 12]
    assert acc3.calls == 3 and acc3.cache_hits == 10 and all(r.ok for r in third)


def test_cache_key_ignores_endpoint_key_and_throughput_settings(tmp_path, server, monkeypatch):
    run_requests(make_params(tmp_path, server), requests_for(range(4)))
    assert len(server.completions_requests) == 4
    monkeypatch.setenv("OPENAI_API_KEY", "sk-another-key-entirely-42")
    with LLMTestServer() as other:  # another base URL, key, concurrency, limits, timeouts
        params = make_params(tmp_path, other, concurrency=2, rpm=6000, tpm=10**6, timeout_s=9,
                             max_attempts=2, backoff_base_s=0.5, backoff_max_s=3,
                             prices={"input_per_1m": 9, "output_per_1m": 9})
        results, accounting, _ = run_requests(params, requests_for(range(4)))
        assert other.completions_requests == []
    assert all(r.ok and r.cached for r in results) and accounting.cache_hits == 4


@pytest.mark.parametrize("change", ["model", "temperature", "top_p", "max_tokens", "seed",
                                    "messages", "schema", "sample_index"])
def test_cache_key_changes_with_what_shapes_the_answer(tmp_path, server, change):
    params = make_params(tmp_path, server)
    run_requests(params, requests_for([0]))
    overrides = {"model": {"model": "other-model"}, "temperature": {"temperature": 0.7},
                 "top_p": {"top_p": 0.9}, "max_tokens": {"max_tokens": 65}, "seed": {"seed": 8}}
    changed = make_params(tmp_path, server, **overrides.get(change, {}))
    request = LLMRequest(messages(0), Verdict, "item-0")
    if change == "messages":
        request = LLMRequest(messages(0, "채권시장 관련 질문입니까?"), Verdict, "item-0")
    elif change == "schema":
        request = LLMRequest(messages(0), Summary, "item-0")
    elif change == "sample_index":
        request = LLMRequest(messages(0), Verdict, "item-0", sample_index=1)
    results, accounting, _ = run_requests(changed, [request])
    assert results[0].ok and accounting.calls == 1
    assert len(server.completions_requests) == 2


def test_cache_key_material_is_canonical():
    base = dict(model="m", messages=messages(1), json_schema=response_format_for(Verdict)["json_schema"],
                temperature=0, top_p=1, max_tokens=16, seed=None, sample_index=0, reask_index=0)
    key = cache_key(**base)
    assert re.fullmatch(r"[0-9a-f]{64}", key)
    assert cache_key(**{**base, "temperature": 0.0, "top_p": 1.0}) == key  # 0 == 0.0
    reordered = [dict(reversed(list(m.items()))) for m in base["messages"]]
    assert cache_key(**{**base, "messages": reordered}) == key  # dict order is not content
    for field, value in [("reask_index", 1), ("sample_index", 2), ("seed", 0),
                         ("json_schema", response_format_for(Summary)["json_schema"])]:
        assert cache_key(**{**base, field: value}) != key, field


def test_entries_hold_a_request_summary_and_the_raw_response_only(tmp_path, server):
    params = make_params(tmp_path, server)
    result = run_one(params, 2)
    cache = ResponseCache(params.cache_dir)
    [key] = list(cache.keys())
    path = cache.path_for(key)
    assert path.parent.name == key[:2] and path.parent.parent == Path(params.cache_dir)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert set(data) == {"format", "request", "response"}
    assert data["request"] == {"model": "test-model", "schema_name": "Verdict", "temperature": 0.0,
                               "top_p": 1.0, "max_tokens": 64, "seed": 7, "sample_index": 0,
                               "reask_index": 0}
    assert data["response"]["content"] == result.raw
    assert key not in path.read_text(encoding="utf-8")
    # canonical: sorted keys, so equal entries are equal bytes
    assert path.read_text(encoding="utf-8") == json.dumps(data, ensure_ascii=False, indent=2,
                                                          sort_keys=True) + "\n"


def test_partial_entry_is_a_miss_and_gets_rewritten(tmp_path, server, caplog):
    params = make_params(tmp_path, server)
    run_one(params)
    cache = ResponseCache(params.cache_dir)
    [key] = list(cache.keys())
    path = cache.path_for(key)
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    with caplog.at_level(logging.WARNING):
        assert cache.get(key) is None
    assert "damaged or partial" in caplog.text
    result = run_one(params)
    assert result.ok and not result.cached and len(server.completions_requests) == 2
    assert cache.get(key) is not None and path.read_bytes() == whole


def test_concurrent_identical_and_distinct_requests_leave_only_valid_entries(tmp_path, server):
    server.latency, server.jitter = 0.02, 0.01
    params = make_params(tmp_path, server, concurrency=100)
    identical = [LLMRequest(messages(0), Verdict, f"dup-{k}") for k in range(100)]
    distinct = requests_for(range(1, 101))
    results, accounting, _ = run_requests(params, identical + distinct)
    assert all(r.ok for r in results)
    assert [r.item_id for r in results[:3]] == ["dup-0", "dup-1", "dup-2"]
    # the 100 identical requests made one call; the others read its entry
    assert len(server.completions_requests) == 101
    assert accounting.calls == 101 and accounting.cache_hits == 99
    cache = ResponseCache(params.cache_dir)
    keys = list(cache.keys())
    assert len(keys) == 101 and all(cache.get(k) is not None for k in keys)
    leftovers = [p for p in Path(params.cache_dir).rglob("*") if p.is_file() and p.suffix != ".json"]
    assert leftovers == []


def test_many_threads_writing_one_key_never_expose_a_partial_file(tmp_path, caplog):
    cache = ResponseCache(tmp_path / "c")
    key = "ab" * 32
    entries = [CacheEntry(format=1, request=RequestSummary(
        model="m", schema_name="S", temperature=0, top_p=1, max_tokens=8, seed=None,
        sample_index=0, reask_index=0), response=CachedResponse(
        content="가" * (1000 + 500 * n), finish_reason="stop", prompt_tokens=n,
        completion_tokens=n)) for n in range(8)]
    stop = threading.Event()
    seen: list[Any] = []

    def reader() -> None:
        while not stop.is_set():
            seen.append(cache.get(key))

    def writer(n: int) -> None:
        for _ in range(25):
            cache.put(key, entries[n])

    with caplog.at_level(logging.WARNING):
        readers = [threading.Thread(target=reader) for _ in range(2)]
        writers = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
        for thread in readers + writers:
            thread.start()
        for thread in writers:
            thread.join()
        stop.set()
        for thread in readers:
            thread.join()
    assert "damaged" not in caplog.text
    assert all(entry is None or entry in entries for entry in seen)
    assert cache.get(key) in entries
    assert [p.name for p in (tmp_path / "c" / "ab").iterdir()] == [f"{key}.json"]


RESUME_SCRIPT = '''
import asyncio, json, sys
from typing import Optional
from pydantic import BaseModel
from stages.common.llm import LLMClient, LLMParams, LLMRequest

class Verdict(BaseModel):
    answer: str
    relevant: bool
    note: Optional[str] = None

def messages(i):
    return [{"role": "system", "content": "금융 문항 판정기"},
            {"role": "user", "content": f"item-{i}: 주식시장 관련 질문입니까?"}]

params = LLMParams.model_validate_json(sys.argv[1])
n = int(sys.argv[2])

async def main():
    async with LLMClient(params) as llm:
        results = await llm.run_many([LLMRequest(messages(i), Verdict, f"item-{i}") for i in range(n)])
    print(json.dumps([r.parsed.answer for r in results], ensure_ascii=False))

asyncio.run(main())
'''


def test_resume_after_sigkill_repeats_no_completed_call(tmp_path, server):
    n = 40
    server.latency, server.jitter = 0.2, 0.1
    params = make_params(tmp_path, server, concurrency=4)
    script = tmp_path / "resume.py"
    script.write_text(RESUME_SCRIPT, encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    argv = [sys.executable, str(script), params.model_dump_json(), str(n)]
    cache = ResponseCache(params.cache_dir)

    victim = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while len(cache) < 8 and time.monotonic() < deadline and victim.poll() is None:
        time.sleep(0.02)
    os.kill(victim.pid, signal.SIGKILL)
    _, victim_err = victim.communicate()
    assert victim.returncode == -signal.SIGKILL, victim_err.decode(errors="replace")[-2000:]

    schema = response_format_for(Verdict)["json_schema"]
    key_of = {i: cache_key(model=params.model, messages=messages(i), json_schema=schema,
                           temperature=params.temperature, top_p=params.top_p,
                           max_tokens=params.max_tokens, seed=params.seed, sample_index=0,
                           reask_index=0) for i in range(n)}
    completed = {i for i, key in key_of.items() if cache.get(key) is not None}
    assert 8 <= len(completed) < n, "the kill should land midway"
    before = len(server.completions_requests)
    assert before <= len(completed) + params.concurrency  # at most the in-flight ones lost

    rerun = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert rerun.returncode == 0, rerun.stderr
    answers = json.loads(rerun.stdout)
    assert [a.split(":")[0] for a in answers] == [f"item-{i}" for i in range(n)]
    asked_again = items_seen(server, since=before)
    assert not set(asked_again) & completed  # no completed call repeated
    assert sorted(asked_again) == sorted(set(range(n)) - completed)  # each missing one once


# ---------------------------------------------------------------------------- offline mode
def test_offline_answers_from_a_full_cache_without_touching_the_network(tmp_path, server, monkeypatch):
    online = make_params(tmp_path, server)
    first, _, _ = run_requests(online, requests_for(range(6)))
    monkeypatch.delenv("OPENAI_API_KEY")  # offline needs no key either
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens here
    for params in (make_params(tmp_path, None, base_url=dead, offline=True, max_attempts=1),
                   make_params(tmp_path, None, base_url=dead, max_attempts=1)):
        monkeypatch.setenv("LLM_OFFLINE", "0" if params.offline else "1")
        results, accounting, llm = run_requests(params, requests_for(range(6)))
        assert llm.offline and llm._api_client is None
        assert [r.parsed for r in results] == [r.parsed for r in first]
        assert accounting.calls == 0 and accounting.cache_hits == 6
    assert len(server.completions_requests) == 6


def test_offline_miss_raises_listing_every_missing_item(tmp_path, server):
    run_requests(make_params(tmp_path, server), requests_for(range(5)))
    offline = make_params(tmp_path, server, offline=True)
    with pytest.raises(CacheMissError) as caught:
        run_requests(offline, requests_for(range(20)))
    error = caught.value
    assert isinstance(error, StageError)
    assert error.missing == [f"item-{i}" for i in range(5, 20)]  # all of them, in order
    assert "15 LLM request(s)" in str(error) and "item-5" in str(error) and "5 more" in str(error)
    assert len(server.completions_requests) == 5  # no network even with a live server

    async def single():
        async with LLMClient(offline) as llm:
            await llm.complete(messages(42), Verdict, item_id="item-42")
    with pytest.raises(CacheMissError, match="item-42"):
        asyncio.run(single())


# ---------------------------------------------------------------------------- secrets
def test_api_key_is_sent_only_as_the_authorization_header_and_written_nowhere(tmp_path, server, caplog):
    server.enqueue(Reply.server_error(), Reply.unauthorized())
    log_file = tmp_path / "stage.log"
    handler = logging.FileHandler(log_file, encoding="utf-8")
    handler.setLevel(logging.DEBUG)
    logging.getLogger().addHandler(handler)
    try:
        with caplog.at_level(logging.DEBUG):
            with pytest.raises(FatalLLMError) as caught:
                run_requests(make_params(tmp_path, server, concurrency=1), requests_for([0]))
            server.rule = lambda r: Reply.invalid_json() if "item-1" in r.text else None
            run_requests(make_params(tmp_path, server), requests_for(range(1, 4)))
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    for request in server.completions_requests:
        assert request.headers["authorization"] == f"Bearer {API_KEY}"
        assert all(API_KEY not in value for name, value in request.headers.items()
                   if name != "authorization")
        assert API_KEY.encode() not in request.raw_body and API_KEY not in request.path
    assert API_KEY not in str(caught.value) and API_KEY not in caplog.text
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    # the log, and the cache entries: item-1's three invalid answers, items 2 and 3
    assert log_file in files and len([p for p in files if p.suffix == ".json"]) == 5
    assert [p for p in files if API_KEY.encode() in p.read_bytes()] == []


# ---------------------------------------------------------------------------- throughput controls
def test_concurrency_bound_is_respected_and_used(tmp_path, server):
    server.latency = 0.1
    results, _, _ = run_requests(make_params(tmp_path, server, concurrency=5), requests_for(range(30)))
    assert all(r.ok for r in results)
    assert server.max_in_flight == 5


def test_rpm_limit_paces_requests(tmp_path, server):
    # 1,200 rpm = 20/s with a one-second burst: 40 requests need at least (40 - 20) / 20 s.
    params = make_params(tmp_path, server, concurrency=50, rpm=1200)
    start = time.monotonic()
    results, _, _ = run_requests(params, requests_for(range(40)))
    assert all(r.ok for r in results)
    assert time.monotonic() - start >= 0.95
    assert len(server.completions_requests) == 40


def test_tpm_limit_is_corrected_by_the_usage_the_server_reports(tmp_path, server):
    # Each request is estimated at ~100 tokens but the server reports 10,000 used; at
    # 600k tpm (10k/s) the third request must wait about a second for that debt.
    server.rule = lambda request: Reply.ok(usage=(5000, 5000))
    params = make_params(tmp_path, server, concurrency=1, tpm=600_000)
    start = time.monotonic()
    results, _, _ = run_requests(params, requests_for(range(3)))
    assert all(r.ok for r in results)
    assert time.monotonic() - start >= 0.9


def test_rate_limiter_charges_debt_and_credits_actual_usage():
    async def main():
        bucket = RateLimiter(6000)  # 100 tokens/s, holds 100
        assert bucket.capacity == 100
        await bucket.acquire(250)  # bigger than the bucket: allowed, leaves debt
        assert bucket.available < -140
        start = time.monotonic()
        await bucket.acquire(10)  # must wait for the debt to be repaid
        waited = time.monotonic() - start
        bucket.credit(200)  # the estimate was too high: give the difference back
        return waited, bucket.available
    waited, available = asyncio.run(main())
    assert waited >= 1.4 and available >= 99


def test_token_estimate_covers_prompt_and_completion():
    korean = [{"role": "user", "content": "가" * 100}]
    english = [{"role": "user", "content": "a" * 100}]
    assert estimate_tokens(korean, 50) >= 100 + 50  # a Hangul syllable is about a token
    assert 25 + 50 <= estimate_tokens(english, 50) < estimate_tokens(korean, 50)


def test_retry_after_parsing():
    assert retry_after_seconds({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert retry_after_seconds({"retry-after": "2"}) == 2.0
    when = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=30), usegmt=True)
    assert 25 <= retry_after_seconds({"retry-after": when}) <= 31
    assert retry_after_seconds({"retry-after": "soon"}) is None
    assert retry_after_seconds({}) is None


def test_derived_seeds_are_stable_and_distinct():
    assert derive_seed(7, 0, 0) == 7 and derive_seed(None, 0, 0) is None
    seeds = {derive_seed(7, s, r) for s in range(5) for r in range(3)}
    assert len(seeds) == 15 and derive_seed(7, 2, 1) == derive_seed(7, 2, 1)


# ---------------------------------------------------------------------------- accounting
def test_accounting_totals_tokens_cost_cache_and_rejects(tmp_path, server):
    server.rule = lambda r: (Reply.refused(usage=(1000, 200)) if "item-4" in r.text
                             else Reply.ok(usage=(1000, 200)))
    params = make_params(tmp_path, server)  # $2.5 / $10 per 1M
    results, accounting, _ = run_requests(params, requests_for(range(5)))
    assert [r.ok for r in results] == [True] * 4 + [False]
    assert results[4].usage.prompt_tokens == 3000 and results[4].usage.completion_tokens == 600
    metrics = accounting.as_metrics()
    assert metrics["items"] == 5 and metrics["items_ok"] == 4
    assert metrics["rejects"] == {"refusal": 1}
    assert (metrics["calls"], metrics["cache_hits"]) == (7, 0)  # 4 + 3 answers for the refusal
    assert (metrics["prompt_tokens"], metrics["completion_tokens"]) == (7000, 1400)
    assert metrics["cost_usd"] == pytest.approx((7000 * 2.5 + 1400 * 10) / 1e6)
    json.dumps(metrics)  # ready for the metrics file
    _, again, _ = run_requests(params, requests_for(range(5)))
    assert (again.calls, again.cache_hits, again.cost_usd) == (0, 7, 0)
    assert again.cost_saved_usd == pytest.approx(0.0315)
    assert again.as_metrics()["rejects"] == {"refusal": 1}


# ---------------------------------------------------------------------------- the budget cap
def cache_entries(params: LLMParams) -> int:
    return sum(1 for _ in Path(params.cache_dir).rglob("*.json"))


def test_the_budget_cap_stops_before_crossing_and_a_rerun_resumes_without_repaying(tmp_path, server):
    """Dear prices make the worst case of one request (prompt estimate + max_tokens) about
    $0.09; each answer really costs less. Serially, requests go out while spent + worst <= cap."""
    dear = {"input_per_1m": 1000.0, "output_per_1m": 1000.0}
    params = make_params(tmp_path, server, prices=dear, concurrency=1, max_usd=0.5)
    schema = math.ceil(len(json.dumps(response_format_for(Verdict))) / 3)  # billed as prompt
    worst = Accounting(params.prices).price(estimate_tokens(messages(0), 0) + schema, params.max_tokens)
    with pytest.raises(StageError) as err:
        run_requests(params, requests_for(range(20)))
    sent = len(server.completions_requests)
    assert 0 < sent < 20
    message = str(err.value)
    assert "$0.50" in message and "llm.max_usd" in message and "LLM_MAX_USD" in message
    assert f"{20 - sent} requests not sent" in message
    assert cache_entries(params) == sent           # every paid answer kept
    paid, spent = re.search(r"paid (\d+) calls, \$([\d.]+)", message).groups()
    assert int(paid) == sent
    spent = float(spent)
    assert spent <= 0.5 and spent + worst > 0.5 - 1e-9  # it stopped only when it had to

    results, accounting, _ = run_requests(params.model_copy(update={"max_usd": 50.0}),
                                          requests_for(range(20)))
    assert all(r.ok for r in results)
    assert sorted(items_seen(server, sent)) == list(range(sent, 20))  # no paid call repeated
    assert accounting.cache_hits == sent and accounting.calls == 20 - sent


def test_at_the_cap_the_requests_in_flight_finish_and_are_cached(tmp_path):
    with LLMTestServer(latency=0.05) as srv:
        params = make_params(tmp_path, srv, concurrency=8, max_usd=0.3,
                             prices={"input_per_1m": 1000.0, "output_per_1m": 1000.0})
        with pytest.raises(StageError, match="budget cap"):
            run_requests(params, requests_for(range(40)))
        sent = len(srv.completions_requests)
    assert 0 < sent < 40 and cache_entries(params) == sent


def test_the_environment_cap_overrides_the_params_and_is_checked(tmp_path, server, monkeypatch):
    params = make_params(tmp_path, server, prices={"input_per_1m": 1000.0, "output_per_1m": 1000.0})
    monkeypatch.setenv("LLM_MAX_USD", "0.2")
    with pytest.raises(StageError, match=r"\$0\.20 \(LLM_MAX_USD\)"):
        run_requests(params, requests_for(range(10)))
    for bad in ("-1", "abc", "nan"):
        monkeypatch.setenv("LLM_MAX_USD", bad)
        with pytest.raises(StageError, match="LLM_MAX_USD"):
            run_requests(params, requests_for(range(2)))
    with pytest.raises(ValidationError):
        make_params(tmp_path, server, max_usd=0)


def test_at_the_cap_sequential_calls_under_run_all_finish_and_are_cached(tmp_path):
    """solve's pattern: tasks each making several complete() calls under run_all; the first
    refusal must not cancel the paid requests still in flight."""
    from stages.common.llm import run_all
    with LLMTestServer(latency=0.3) as srv:
        params = make_params(tmp_path, srv, concurrency=8,
                             prices={"input_per_1m": 1000.0, "output_per_1m": 1000.0})
        worst = LLMClient(params)._worst_cost(messages(0), response_format_for(Verdict))
        params = params.model_copy(update={"max_usd": 5.5 * worst})  # 5 worst cases in flight

        async def one(llm, i):
            await llm.complete(messages(i), Verdict, item_id=f"item-{i}")
            await llm.complete(messages(100 + i), Verdict, item_id=f"item-{100 + i}")

        log = logging.getLogger("solve@cap_test")
        log.setLevel(logging.INFO)
        handler = logging.FileHandler(tmp_path / "stage.log", encoding="utf-8")
        log.addHandler(handler)

        async def main():
            async with LLMClient(params, logger=log) as llm:
                await run_all([one(llm, i) for i in range(8)], "solve")
        with pytest.raises(StageError, match="budget cap") as err:
            asyncio.run(main())
        handler.close()
        log.removeHandler(handler)
        sent = len(srv.completions_requests)
    assert 0 < sent < 16 and cache_entries(params) == sent
    # the message counts the answers that landed after the first refusal: what the cache holds
    entries = [json.loads(path.read_text())["response"] for path in Path(params.cache_dir).rglob("*.json")]
    paid = sum(Accounting(params.prices).price(e["prompt_tokens"], e["completion_tokens"]) for e in entries)
    message = str(err.value)
    calls, dollars = re.search(r"paid (\d+) calls, \$([\d.]+)", message).groups()
    assert int(calls) == len(entries) and float(dollars) == pytest.approx(paid, abs=1e-4)
    assert "dvc repro solve@cap_test" in message
    assert message in (tmp_path / "stage.log").read_text(encoding="utf-8")   # logged, once
    assert (tmp_path / "stage.log").read_text(encoding="utf-8").count("budget cap") == 1
