"""The Batch API of the local test server (tests/llm_server.py), driven by the real SDK:
``/v1/files`` and ``/v1/batches``, deterministic progress per retrieval, outputs made by
the chat-completions logic, partial failures, expiry, validation failures, list, cancel,
and state that outlives the client."""
from __future__ import annotations

import http.client
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import openai
import pytest
from openai.types.chat import ChatCompletion

from tests.llm_server import LLMTestServer, Reply, ServerProcess

ROOT = Path(__file__).resolve().parents[1]
FINAL = ("completed", "failed", "expired", "cancelled")
ENDPOINT = "/v1/chat/completions"


def request_line(custom_id: str, text: str = "", **extra) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": ENDPOINT,
            "body": {"model": "gpt-test", "messages": [{"role": "user", "content": text or custom_id}],
                     **extra}}


def jsonl(lines: list) -> bytes:
    return "".join((json.dumps(line) if not isinstance(line, str) else line) + "\n"
                   for line in lines).encode("utf-8")


FIVE = [request_line(f"item-{i}", f"question {i}") for i in range(5)]


def client_for(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0)


def submit(client: openai.OpenAI, lines: list = FIVE, metadata: dict | None = None):
    uploaded = client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    kwargs = {"metadata": metadata} if metadata is not None else {}
    return client.batches.create(input_file_id=uploaded.id, endpoint=ENDPOINT,
                                 completion_window="24h", **kwargs)


def poll(client: openai.OpenAI, batch_id: str, limit: int = 20) -> tuple[object, list[str]]:
    """Retrieve until final: (the final batch, the statuses seen)."""
    seen = []
    for _ in range(limit):
        batch = client.batches.retrieve(batch_id)
        seen.append(batch.status)
        if batch.status in FINAL:
            return batch, seen
    raise AssertionError(f"batch never finished: {seen}")


def read_jsonl(client: openai.OpenAI, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).content.decode().splitlines()]


@pytest.fixture()
def server():
    with LLMTestServer() as srv:
        yield srv


# ---------------------------------------------------------------------------- the happy path
def test_a_batch_of_five_completes_and_every_custom_id_gets_a_completion(server):
    client = client_for(server)
    created = submit(client, metadata={"run": "r1"})
    assert created.status == "validating" and created.object == "batch"
    assert created.output_file_id is None and created.error_file_id is None and created.errors is None
    assert created.metadata == {"run": "r1"} and created.completion_window == "24h"

    batch, seen = poll(client, created.id)
    assert seen == ["in_progress", "completed"]  # batch_polls=2: final at the 2nd retrieval
    assert batch.request_counts.model_dump() == {"total": 5, "completed": 5, "failed": 0}
    assert batch.error_file_id is None and batch.completed_at and batch.in_progress_at
    assert batch.usage.total_tokens == batch.usage.input_tokens + batch.usage.output_tokens > 0

    out = read_jsonl(client, batch.output_file_id)
    assert sorted(line["custom_id"] for line in out) == [f"item-{i}" for i in range(5)]
    for line in out:
        assert line["id"].startswith("batch_req_") and line["error"] is None
        assert line["response"]["status_code"] == 200
        assert line["response"]["request_id"].startswith("req_")
        completion = ChatCompletion.model_validate(line["response"]["body"])
        number = line["custom_id"].split("-")[1]
        assert json.loads(completion.choices[0].message.content) == {"echo": f"question {number}"}
        assert completion.usage.total_tokens > 0 and completion.model == "gpt-test"
    assert len({line["response"]["body"]["id"] for line in out}) == 5

    output_file = client.files.retrieve(batch.output_file_id)
    assert output_file.purpose == "batch_output" and output_file.status == "processed"
    assert client.files.content(created.input_file_id).content == jsonl(FIVE)

    stats = server.stats()["batch"]
    assert stats["files_uploaded"] == 1 and stats["batches_created"] == 1
    assert stats["batch_lines"] == 5 and stats["retrievals"] == 2
    assert stats["created"] == [{"id": created.id, "lines": 5, "status": "completed",
                                 "outcome": "completed", "retrievals": 2, "metadata": {"run": "r1"}}]
    assert stats["line_kinds"] == {"ok": 5}
    assert [b["id"] for b in server.batches] == [created.id]
    assert server.completions_requests == [] and server.stats()["requests"] == 0
    assert all(r.headers["authorization"] == "Bearer sk-test" for r in server.batch_requests)
    assert sorted(r.custom_id for r in server.batch_line_requests) == [f"item-{i}" for i in range(5)]


def test_progress_is_one_step_per_retrieval_and_stops_at_the_final_state():
    with LLMTestServer(batch_polls=4) as server:
        client = client_for(server)
        created = submit(client)
        _, seen = poll(client, created.id)
        assert seen == ["in_progress", "in_progress", "finalizing", "completed"]
        again = client.batches.retrieve(created.id)
        assert again.status == "completed" and again.output_file_id is not None
        assert server.stats()["batch"]["retrievals"] == 5
        # the in-process hook moves a batch without counting a retrieval
        other = submit(client)
        assert server.advance_batch(other.id, 4)["status"] == "completed"
        assert server.stats()["batch"]["retrievals"] == 5


def test_lines_go_through_the_rule_and_the_responder(server):
    def rule(request):
        if request.custom_id == "item-2":
            return Reply.refused("no")
        if "question 3" in request.text:
            return Reply.server_error(503)
        return None

    server.rule = rule
    server.responder = lambda body: json.dumps({"answer": body["messages"][-1]["content"].upper()})
    client = client_for(server)
    batch, _ = poll(client, submit(client).id)
    out = {line["custom_id"]: line for line in read_jsonl(client, batch.output_file_id)}
    errors = read_jsonl(client, batch.error_file_id)
    assert sorted(out) == ["item-0", "item-1", "item-2", "item-4"]
    assert json.loads(out["item-0"]["response"]["body"]["choices"][0]["message"]["content"]) == {
        "answer": "QUESTION 0"}
    refused = out["item-2"]["response"]["body"]["choices"][0]["message"]
    assert refused["refusal"] == "no" and refused["content"] is None
    assert [e["custom_id"] for e in errors] == ["item-3"]
    assert errors[0]["response"]["status_code"] == 503 and errors[0]["error"] is None
    assert errors[0]["response"]["body"]["error"]["type"] == "server_error"
    assert batch.request_counts.model_dump() == {"total": 5, "completed": 4, "failed": 1}
    assert server.stats()["batch"]["line_kinds"] == {"5xx": 1, "ok": 3, "refusal": 1}


# ---------------------------------------------------------------------------- partial failures
def test_scripted_line_errors_land_in_the_error_file():
    with LLMTestServer(batch_line_errors={"item-1": 500, "item-3": 429,
                                          "item-4": "internal_error"}) as server:
        client = client_for(server)
        batch, _ = poll(client, submit(client).id)
        assert batch.status == "completed"
        assert batch.request_counts.model_dump() == {"total": 5, "completed": 2, "failed": 3}
        out = read_jsonl(client, batch.output_file_id)
        assert sorted(line["custom_id"] for line in out) == ["item-0", "item-2"]
        errors = {line["custom_id"]: line for line in read_jsonl(client, batch.error_file_id)}
        assert sorted(errors) == ["item-1", "item-3", "item-4"]
        assert errors["item-1"]["response"]["status_code"] == 500
        assert errors["item-3"]["response"]["status_code"] == 429
        assert errors["item-3"]["response"]["body"]["error"]["code"] == "rate_limit_exceeded"
        assert errors["item-4"]["response"] is None
        assert errors["item-4"]["error"]["code"] == "internal_error"


def test_a_set_of_custom_ids_or_a_rate_fails_lines():
    with LLMTestServer(batch_line_errors={"item-0"}) as server:
        client = client_for(server)
        batch, _ = poll(client, submit(client).id)
        assert [e["custom_id"] for e in read_jsonl(client, batch.error_file_id)] == ["item-0"]
    with LLMTestServer(batch_line_errors=1.0) as server:
        client = client_for(server)
        batch, _ = poll(client, submit(client).id)
        assert batch.status == "completed" and batch.output_file_id is None
        assert batch.request_counts.model_dump() == {"total": 5, "completed": 0, "failed": 5}
        assert {e["response"]["status_code"] for e in read_jsonl(client, batch.error_file_id)} == {500}


def test_fault_rates_apply_to_batch_lines_too():
    with LLMTestServer(fault_rates={"truncated": 1.0}) as server:
        client = client_for(server)
        batch, _ = poll(client, submit(client).id)
        out = read_jsonl(client, batch.output_file_id)
        assert len(out) == 5
        assert {line["response"]["body"]["choices"][0]["finish_reason"] for line in out} == {"length"}


# ---------------------------------------------------------------------------- expired / failed
def test_scripted_outcomes_are_consumed_in_creation_order_and_expiry_keeps_a_partial_output():
    with LLMTestServer(batch_outcomes=["expired", "completed"]) as server:
        client = client_for(server)
        first, second = submit(client), submit(client)
        expired, seen = poll(client, first.id)
        assert seen == ["in_progress", "expired"] and expired.expired_at is not None
        assert expired.request_counts.model_dump() == {"total": 5, "completed": 2, "failed": 3}
        out = read_jsonl(client, expired.output_file_id)
        assert sorted(line["custom_id"] for line in out) == ["item-0", "item-1"]
        assert all(ChatCompletion.model_validate(line["response"]["body"]) for line in out)
        errors = read_jsonl(client, expired.error_file_id)
        assert sorted(e["custom_id"] for e in errors) == ["item-2", "item-3", "item-4"]
        assert all(e["response"] is None and e["error"]["code"] == "batch_expired" for e in errors)
        assert poll(client, second.id)[0].status == "completed"


def test_the_expired_share_is_configurable():
    with LLMTestServer(batch_outcomes=["expired"], batch_partial_share=0.0) as server:
        client = client_for(server)
        batch, _ = poll(client, submit(client).id)
        assert batch.output_file_id is None and batch.request_counts.failed == 5


def test_a_scripted_failure_has_errors_and_no_output():
    with LLMTestServer(batch_outcomes=["failed"]) as server:
        client = client_for(server)
        batch, seen = poll(client, submit(client).id)
        assert seen == ["validating", "failed"] and batch.failed_at is not None
        assert batch.output_file_id is None and batch.error_file_id is None
        assert [e.code for e in batch.errors.data] == ["token_limit_exceeded"]
        assert server.batch_line_requests == []


def test_outcome_rates_decide_batches_when_nothing_is_scripted():
    with LLMTestServer(batch_outcome_rates={"expired": 1.0}) as server:
        client = client_for(server)
        assert poll(client, submit(client).id)[0].status == "expired"


@pytest.mark.parametrize("bad_line, code, param", [
    ('{"custom_id": "x", "method": "POST", ', "invalid_json_line", None),
    (request_line("item-0"), "duplicate_custom_id", "custom_id"),
    ({**request_line("item-9"), "url": "/v1/embeddings"}, "invalid_url", "url"),
    ({**request_line("item-9"), "method": "GET"}, "invalid_method", "method"),
    ({"custom_id": "item-9", "method": "POST", "url": ENDPOINT}, "missing_required_parameter", "body"),
])
def test_a_malformed_input_line_fails_validation(server, bad_line, code, param):
    client = client_for(server)
    batch, _ = poll(client, submit(client, FIVE[:3] + [bad_line] + FIVE[3:]).id)
    assert batch.status == "failed" and batch.output_file_id is None
    assert [(e.code, e.line, e.param) for e in batch.errors.data] == [(code, 4, param)]
    assert server.stats()["batch"]["created"][0]["lines"] == 0


def test_an_empty_file_fails_validation(server):
    client = client_for(server)
    batch, _ = poll(client, submit(client, []).id)
    assert batch.status == "failed" and batch.errors.data[0].code == "empty_file"


def test_bad_create_requests_are_api_errors(server):
    client = client_for(server)
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-nope", endpoint=ENDPOINT, completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")
    with pytest.raises(openai.NotFoundError):
        client.files.content("file-nope")
    other = client.files.create(file=("x.jsonl", jsonl(FIVE)), purpose="user_data")
    with pytest.raises(openai.BadRequestError):
        client.batches.create(input_file_id=other.id, endpoint=ENDPOINT, completion_window="24h")
    uploaded = client.files.create(file=("x.jsonl", jsonl(FIVE)), purpose="batch")
    with pytest.raises(openai.BadRequestError):
        client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings",
                              completion_window="24h")


# ---------------------------------------------------------------------------- list / cancel
def test_list_is_newest_first_pages_and_finds_a_batch_by_metadata(server):
    client = client_for(server)
    ids = [submit(client, FIVE[:1], metadata={"run": f"run-{i}"}).id for i in range(5)]
    page = client.batches.list(limit=2)
    assert [b.id for b in page.data] == ids[::-1][:2] and page.has_more
    assert [b.id for b in client.batches.list(limit=2)] == ids[::-1]  # auto-paging via `after`
    assert [b.id for b in client.batches.list(after=ids[2]).data] == [ids[1], ids[0]]
    found = [b for b in client.batches.list() if (b.metadata or {}).get("run") == "run-3"]
    assert [b.id for b in found] == [ids[3]]
    assert server.stats()["batch"]["retrievals"] == 0  # listing does not advance batches
    assert {b.status for b in client.batches.list()} == {"validating"}


def test_cancel_goes_through_cancelling_to_cancelled_with_partial_results():
    with LLMTestServer(batch_polls=3) as server:
        client = client_for(server)
        created = submit(client)
        assert client.batches.retrieve(created.id).status == "in_progress"
        cancelling = client.batches.cancel(created.id)
        assert cancelling.status == "cancelling" and cancelling.cancelling_at is not None
        batch, seen = poll(client, created.id)
        assert seen == ["cancelled"] and batch.cancelled_at is not None
        assert batch.request_counts.model_dump() == {"total": 5, "completed": 2, "failed": 3}
        assert len(read_jsonl(client, batch.output_file_id)) == 2
        assert {e["error"]["code"] for e in read_jsonl(client, batch.error_file_id)} == {"batch_cancelled"}
        with pytest.raises(openai.ConflictError):
            client.batches.cancel(created.id)
        # cancelled while still validating: nothing ran
        early = submit(client)
        client.batches.cancel(early.id)
        batch, _ = poll(client, early.id)
        assert batch.status == "cancelled" and batch.output_file_id is None
        assert batch.error_file_id is None and batch.request_counts.total == 0
        assert server.stats()["batch"]["cancels"] == 3


# ---------------------------------------------------------------------------- robustness
def test_batch_rule_scripts_the_http_calls_and_does_not_advance_the_batch(server):
    failing = {"left": 1}

    def batch_rule(request):
        if request.method == "GET" and "/batches/" in request.path and failing["left"]:
            failing["left"] -= 1
            return Reply.server_error()
        return None

    server.batch_rule = batch_rule
    client = client_for(server)
    created = submit(client)
    with pytest.raises(openai.InternalServerError):
        client.batches.retrieve(created.id)
    _, seen = poll(client, created.id)
    assert seen == ["in_progress", "completed"]
    assert [r.status for r in server.batch_requests if r.method == "GET"] == [500, 200, 200]


def test_state_outlives_a_client_killed_mid_poll(server):
    child = textwrap.dedent(f"""
        import json, sys, openai
        client = openai.OpenAI(base_url={server.base_url!r}, api_key="sk-test", max_retries=0)
        data = {jsonl(FIVE)!r}
        uploaded = client.files.create(file=("in.jsonl", data), purpose="batch")
        batch = client.batches.create(input_file_id=uploaded.id, endpoint={ENDPOINT!r},
                                      completion_window="24h", metadata={{"run": "killed"}})
        print(json.dumps({{"id": batch.id, "status": client.batches.retrieve(batch.id).status}}),
              flush=True)
        sys.stdin.read()  # "mid-poll" until killed
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        first = json.loads(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait()
    assert first["status"] == "in_progress"
    client = client_for(server)  # a new client finds the batch by its metadata and finishes it
    (found,) = [b for b in client.batches.list() if (b.metadata or {}).get("run") == "killed"]
    assert found.id == first["id"]
    batch, seen = poll(client, found.id)
    assert seen == ["completed"] and len(read_jsonl(client, batch.output_file_id)) == 5


def test_subprocess_server_runs_batches_and_reports_them_in_stats():
    with ServerProcess.start(batch_outcomes=["expired"], batch_polls=1,
                             batch_line_errors=["item-0"]) as proc:
        client = client_for(proc)
        batch, seen = poll(client, submit(client).id)
        assert seen == ["expired"]
        errors = read_jsonl(client, batch.error_file_id)
        assert sorted(e["custom_id"] for e in errors) == ["item-0", "item-2", "item-3", "item-4"]
        stats = proc.stats()["batch"]
        assert stats["batches_created"] == 1 and stats["batch_lines"] == 5
        assert stats["files_uploaded"] == 1 and stats["retrievals"] == 1
        assert stats["statuses"] == {"expired": 1}


def test_output_order_is_shuffled_unless_told_otherwise():
    lines = [request_line(f"item-{i:02d}") for i in range(20)]
    with LLMTestServer(batch_shuffle=False) as server:
        client = client_for(server)
        batch, _ = poll(client, submit(client, lines).id)
        ordered = [line["custom_id"] for line in read_jsonl(client, batch.output_file_id)]
        assert ordered == [line["custom_id"] for line in lines]
    with LLMTestServer() as server:
        client = client_for(server)
        batch, _ = poll(client, submit(client, lines).id)
        shuffled = [line["custom_id"] for line in read_jsonl(client, batch.output_file_id)]
        assert shuffled != ordered and sorted(shuffled) == ordered


def test_a_chunked_upload_is_read(server):
    boundary = "XyZ"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"c.jsonl\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + jsonl(FIVE) + \
        f"\r\n--{boundary}--\r\n".encode()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("POST", "/v1/files", body=iter([body[:50], body[50:]]), encode_chunked=True,
                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}",
                          "Transfer-Encoding": "chunked"})
    reply = json.loads(conn.getresponse().read())
    conn.close()
    assert reply["filename"] == "c.jsonl" and reply["bytes"] == len(jsonl(FIVE))
    assert server.file_bytes(reply["id"]) == jsonl(FIVE)


def test_reset_forgets_batches_and_files(server):
    client = client_for(server)
    submit(client)
    server.reset()
    assert server.batches == [] and server.files == [] and "batch" not in server.stats()
    assert client.batches.list().data == []


def test_a_responder_that_breaks_is_a_500_not_a_hang(server):
    def broken(body):
        raise RuntimeError("responder bug")

    server.responder = broken
    client = client_for(server)
    created = submit(client)
    client.batches.retrieve(created.id)
    with pytest.raises(openai.InternalServerError, match="responder bug"):
        client.batches.retrieve(created.id)
