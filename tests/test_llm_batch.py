"""Batch mode of the LLM layer (``llm.mode: batch``, stages/common/llm_batch.py) against the
Files + Batch API of the local test server: the same answers, cache and checks as online, at
the batch price; re-asks and failed or expired lines go into new batches (or online); a client
killed mid-poll resumes its batch and never submits or pays twice; no key in any file."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stages.common.llm import LLMParams, LLMRequest
from stages.common.runlog import StageError
from tests.conftest import ROOT
from tests.llm_server import LLMTestServer, Reply
from tests.test_llm import API_KEY, Verdict, items_seen, make_params, requests_for, run_requests

BATCH = {"poll_s": 0.01, "collect_s": 0.05}


@pytest.fixture(autouse=True)
def llm_env(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    for name in ("OPENAI_BASE_URL", "LLM_OFFLINE", "LLM_MAX_USD"):
        monkeypatch.delenv(name, raising=False)


def batch_params(tmp_path: Path, server: LLMTestServer, **batch) -> LLMParams:
    return make_params(tmp_path, server, mode="batch", batch={**BATCH, **batch})


def entries(params: LLMParams) -> list[dict]:
    return [json.loads(p.read_text()) for p in Path(params.cache_dir).glob("??/*.json")]


def test_batch_mode_answers_through_one_batch_at_the_batch_price(tmp_path):
    with LLMTestServer() as server:
        params = batch_params(tmp_path, server)
        results, accounting, _ = run_requests(params, requests_for(range(10)))
        assert not server.completions_requests          # nothing online
        assert [len(server.batch_input_lines(b["id"])) for b in server.batches] == [10]
    assert all(r.ok for r in results)
    assert accounting.calls == accounting.batch_calls == 10
    online = accounting.price(accounting.prompt_tokens, accounting.completion_tokens)
    assert accounting.cost_usd == pytest.approx(online / 2)
    cached = entries(params)
    assert len(cached) == 10 and all(e["response"]["batch"] for e in cached)
    record = json.loads(next((Path(params.cache_dir) / "batches").glob("*.json")).read_text())
    assert record["status"] == "collected" and len(record["keys"]) == 10
    # the same requests again: all from the cache, no new batch
    again, acc2, _ = run_requests(params, requests_for(range(10)))
    assert acc2.calls == 0 and acc2.cache_hits == 10
    assert [r.parsed for r in again] == [r.parsed for r in results]


def test_an_invalid_answer_is_re_asked_in_the_next_batch(tmp_path):
    def rule(request):  # item 3's first draw (seed 7) is invalid JSON
        return Reply.invalid_json() if "item-3" in request.text and request.body.get("seed") == 7 else None
    with LLMTestServer(rule=rule) as server:
        results, accounting, _ = run_requests(batch_params(tmp_path, server), requests_for(range(5)))
        sizes = [len(server.batch_input_lines(b["id"])) for b in server.batches]
    assert sizes == [5, 1] and all(r.ok for r in results)
    assert results[3].attempts == 2 and accounting.calls == 6


def test_failed_and_expired_lines_go_into_new_batches_and_none_is_lost(tmp_path):
    with LLMTestServer(batch_outcomes=["expired"], batch_line_errors=0.3, seed=3) as server:
        results, accounting, _ = run_requests(batch_params(tmp_path, server, max_submissions=6),
                                              requests_for(range(12)))
        batches = server.batches
    assert len(batches) >= 2 and batches[0]["status"] == "expired"
    assert all(r.ok for r in results) and accounting.items_ok == 12


def test_lines_failing_every_submission_are_rejects_with_a_reason(tmp_path):
    with LLMTestServer(batch_line_errors=1.0) as server:
        results, _, _ = run_requests(batch_params(tmp_path, server, max_submissions=2),
                                     requests_for(range(3)))
        assert len(server.batches) == 2
    assert {r.error for r in results} == {"transport_error"}
    assert all("batch line failed 2 times" in r.detail for r in results)


def test_failed_lines_can_be_asked_online(tmp_path):
    with LLMTestServer(batch_line_errors=1.0) as server:
        results, accounting, _ = run_requests(batch_params(tmp_path, server, on_failed="online"),
                                              requests_for(range(4)))
        assert sorted(items_seen(server)) == [0, 1, 2, 3] and len(server.batches) == 1
    assert all(r.ok for r in results) and accounting.batch_calls == 0 and accounting.calls == 4


def test_max_wait_stops_the_run_and_the_next_run_resumes_the_same_batch(tmp_path):
    with LLMTestServer(batch_polls=50) as server:
        params = batch_params(tmp_path, server, max_wait_s=0)
        with pytest.raises(StageError, match="still .* re-run the stage"):
            run_requests(params, requests_for(range(4)))
        (batch,) = server.batches
        server.advance_batch(batch["id"], steps=60)
        results, accounting, _ = run_requests(params, requests_for(range(4)))
        assert len(server.batches) == 1                 # resumed, never resubmitted
    assert all(r.ok for r in results) and accounting.batch_calls == 4


CLIENT = """
import sys
from stages.common.llm import LLMParams, LLMRequest, run_batch
from tests.test_llm import Verdict, messages
params = LLMParams.model_validate({{"model": "test-model", "base_url": "{url}", "temperature": 0.0,
    "max_tokens": 64, "seed": 7, "prices": {{"input_per_1m": 2.5, "output_per_1m": 10.0}},
    "cache_dir": "{cache}", "mode": "batch", "batch": {{"poll_s": 0.05, "collect_s": 0.05}}}})
results, acc = run_batch(params, [LLMRequest(messages(i), Verdict, f"item-{{i}}") for i in range(6)])
print("OK", sum(r.ok for r in results), acc.calls, acc.batch_calls)
"""


def test_a_client_killed_mid_poll_resumes_its_batch_without_a_second_submission(tmp_path):
    with LLMTestServer(batch_polls=10_000) as server:
        script = CLIENT.format(url=server.base_url, cache=tmp_path / "cache")
        env = {"OPENAI_API_KEY": API_KEY, "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
        proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while not (server.batches and server.batch_counts["retrievals"] >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.05)
        proc.kill()
        proc.wait()
        (batch,) = server.batches
        server.advance_batch(batch["id"], steps=20_000)
        done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert len(server.batches) == 1 and not server.completions_requests
    assert done.stdout.split() == ["OK", "6", "6", "6"]  # the answers paid once, accounted once
    for path in (tmp_path / "cache").rglob("*"):
        if path.is_file():
            assert API_KEY not in path.read_text(encoding="utf-8")


def test_a_create_that_fails_after_the_server_made_the_batch_is_not_made_twice(tmp_path):
    from tests import llm_server
    with LLMTestServer() as server:
        real, calls = server._api_batch_create, []

        def create(record):  # the batch exists, then the reply is a 500
            out = real(record)
            calls.append(1)
            if len(calls) == 1:
                raise llm_server._APIError(500, "upstream hiccup after commit", kind="server_error")
            return out
        server._api_batch_create = create
        results, _, _ = run_requests(batch_params(tmp_path, server), requests_for(range(5)))
        assert len(server.batches) == 1 and len(calls) == 1  # found by its submission id
    assert all(r.ok for r in results)


def test_the_lost_batch_is_found_behind_a_full_page_of_newer_ones(tmp_path):
    """A busy account: 150 other batches are created between ours and the create's failed
    reply, so ours is on the second page of the newest-first list; found there, not made again."""
    import copy
    from tests import llm_server
    with LLMTestServer() as server:
        real, calls = server._api_batch_create, []

        def create(record):
            status, out = real(record)
            calls.append(1)
            if len(calls) == 1:
                ours = server._batches[out["id"]]
                for n in range(150):  # other submissions, newer than ours
                    obj = {**copy.deepcopy(ours.obj), "id": f"batch_other{n:03d}",
                           "metadata": {"submission": f"other-{n}"}}
                    server._batches[obj["id"]] = llm_server._Batch(
                        obj, len(server._batches), [], [], "completed", {})
                raise llm_server._APIError(500, "upstream hiccup after commit", kind="server_error")
            return status, out
        server._api_batch_create = create
        results, _, _ = run_requests(batch_params(tmp_path, server), requests_for(range(5)))
        assert len(calls) == 1 and server.batch_counts["lists"] == 2  # page 2 held it
        assert [b["metadata"]["submission"].startswith("other-") for b in server.batches].count(
            False) == 1
    assert all(r.ok for r in results)


def test_a_list_whose_cursor_does_not_move_ends_the_search(tmp_path):
    """An endpoint that ignores ``after`` and always says ``has_more``: the search stops when a
    page repeats (never an endless run of list calls), and the create is retried once."""
    import copy
    import dataclasses
    from tests import llm_server
    with LLMTestServer() as server:
        params = batch_params(tmp_path, server)
        run_requests(params, requests_for(range(2)))
        (template,) = server._batches.values()
        for n in range(150):
            obj = {**copy.deepcopy(template.obj), "id": f"batch_x{n:03d}",
                   "metadata": {"submission": f"x-{n}"}}
            server._batches[obj["id"]] = llm_server._Batch(obj, len(server._batches), [], [],
                                                            "completed", {})
        real_create, real_list, creates = server._api_batch_create, server._api_batch_list, []

        def create(record):  # the first create of the run fails before making anything
            creates.append(1)
            if len(creates) == 1:
                raise llm_server._APIError(500, "upstream hiccup", kind="server_error")
            return real_create(record)

        def stuck(record):  # always the first page
            return real_list(dataclasses.replace(record, path=record.path.split("?")[0] + "?limit=100"))
        server._api_batch_create, server._api_batch_list = create, stuck
        lists = server.batch_counts["lists"]
        results, _, _ = run_requests(params, requests_for(range(2, 5)))
        assert server.batch_counts["lists"] - lists == 2 and len(creates) == 2
    assert all(r.ok for r in results)


def test_resume_looks_for_a_lost_batch_only_where_it_can_be(tmp_path):
    """A record killed after its upload ("uploaded", no batch id) is looked for newest first
    down to its upload time, not through all of a long history; one killed before the upload
    was recorded ("prepared") cannot have a batch and is not looked for. Both are dropped and
    their requests asked again, once."""
    import copy
    from tests import llm_server
    with LLMTestServer() as server:
        params = batch_params(tmp_path, server)
        run_requests(params, requests_for(range(2)))  # one real batch, to copy
        (template,) = server._batches.values()
        for n in range(250):  # two days of other batches
            obj = {**copy.deepcopy(template.obj), "id": f"batch_old{n:03d}",
                   "created_at": int(time.time()) - 2 * 86400 + n,
                   "metadata": {"submission": f"old-{n}"}}
            server._batches[obj["id"]] = llm_server._Batch(obj, len(server._batches), [], [],
                                                            "completed", {})
        template.obj["created_at"] -= 3 * 86400
        records = Path(params.cache_dir) / "batches"
        for sid, status in (("lost-1", "uploaded"), ("lost-2", "prepared")):
            (records / f"{sid}.json").write_text(json.dumps(
                {"submission": sid, "status": status, "batch_id": None, "input_file_id": None,
                 "uploaded_at": time.time(), "keys": [], "summaries": {}}), encoding="utf-8")
        lists = server.batch_counts["lists"]
        results, _, _ = run_requests(params, requests_for(range(2, 4)))
        assert server.batch_counts["lists"] - lists == 1  # one page: older than the upload
        assert not (records / "lost-1.json").exists() and not (records / "lost-2.json").exists()
    assert all(r.ok for r in results)


def test_a_rerun_after_every_line_failed_sends_a_new_batch(tmp_path):
    with LLMTestServer(batch_line_errors=1.0) as server:
        first, _, _ = run_requests(batch_params(tmp_path, server, max_submissions=1),
                                   requests_for(range(3)))
        assert {r.error for r in first} == {"transport_error"}
        server.batch_line_errors = None  # the endpoint recovered
        again, _, _ = run_requests(batch_params(tmp_path, server, max_submissions=1),
                                   requests_for(range(3)))
        assert len(server.batches) == 2
    assert all(r.ok for r in again)


def test_batch_line_errors_never_carry_the_key(tmp_path):
    def rule(request):
        return Reply(status=401, error={"message": f"bad key {API_KEY}", "type": "auth", "code": None})
    with LLMTestServer(rule=rule) as server:
        results, _, _ = run_requests(batch_params(tmp_path, server, max_submissions=1),
                                     requests_for(range(2)))
    assert all(not r.ok and API_KEY not in r.detail for r in results)
