"""Batch mode of the LLM layer (``llm.mode: batch``): the same requests, answers, cache and
checks as online, sent through OpenAI's Batch API at its lower price.

How it fits :class:`stages.common.llm.LLMClient`: where online mode makes an HTTP call for a
cache miss, batch mode hands the request to :class:`Batcher`, which collects the misses that
arrive together (``batch.collect_s`` without a new one, or ``batch.max_lines``), and then

1. writes them as Batch API JSONL (``custom_id`` = the cache key; the body is exactly the online
   request) and a record ``<cache dir>/batches/<submission>.json`` listing the keys — before
   anything is sent;
2. uploads the file (``files.create``, purpose ``batch``) and creates the batch
   (``batches.create``, ``/v1/chat/completions``, 24 h window, ``metadata.submission`` = the
   submission id), writing the batch id into the record at once;
3. polls (``batch.poll_s``) with a progress bar, and on the final status reads the output and
   error files: every answer goes into the response cache (marked ``batch``: priced at the
   batch prices) and back to the waiting item, which then goes through exactly the checks an
   online answer does (invalid JSON, truncation, refusal -> bounded re-asks: the re-asks form
   the next batch). Lines that failed or expired are sent again in a new batch, or online
   (``batch.on_failed``), at most ``batch.max_submissions`` times.

A stage killed while a batch runs resumes it: at the first miss of the next run the client
reads the records, polls every submitted batch that was not collected yet and files its
answers into the cache — it never creates a second batch for them, so nothing is paid twice.
A record whose batch id was not written (killed inside ``batches.create``) is matched by its
``metadata.submission`` in ``batches.list`` before anything is created again.

``batch.max_wait_s`` bounds how long a run waits: then it stops with an error saying the
batch is still running, and the next ``dvc repro`` resumes polling it (submit-and-come-back
for batches that take hours; ``max_wait_s: 0`` submits and returns at once).
"""
from __future__ import annotations

import asyncio
import hashlib
import secrets
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional

from pydantic import Field
from tqdm import tqdm

from stages.common.io import write_json
from stages.common.llm_cache import ENTRY_FORMAT, CacheEntry, CachedResponse, RequestSummary
from stages.common.llm_errors import FatalLLMError
from stages.common.llm_errors import redact as _redact
from stages.common.params import Strict
from stages.common.runlog import StageError

ENDPOINT = "/v1/chat/completions"
LIST_PAGE = 100  # batches per page of the list (the API's maximum)


FINAL = ("completed", "failed", "expired", "cancelled")
log = logging.getLogger(__name__)


class BatchParams(Strict):
    completion_window: Literal["24h"] = Field("24h", description="the Batch API's window")
    poll_s: float = Field(30.0, gt=0, le=3600, description="seconds between status polls")
    collect_s: float = Field(0.5, gt=0, le=60, description=(
        "a batch is sent once no new request arrived for this long (requests of one wave "
        "arrive together)"))
    max_lines: int = Field(50_000, ge=1, le=50_000, description="requests per batch (API limit 50,000)")
    max_wait_s: Optional[float] = Field(None, ge=0, description=(
        "stop waiting after this long (the next run resumes polling); None: wait to the end"))
    on_failed: Literal["batch", "online"] = Field("batch", description=(
        "lines that failed or expired: sent again in a new batch, or online"))
    max_submissions: int = Field(3, ge=1, le=10, description="batches a request may go through")


@dataclass
class Line:
    key: str
    body: dict[str, Any]
    summary: RequestSummary
    future: asyncio.Future
    submissions: int = 0


@dataclass
class Outcome:
    """What the batcher hands back for one line."""
    response: Optional[CachedResponse] = None
    online: bool = False              # send it online instead (on_failed: online)
    reason: Optional[str] = None      # a failure: transport_error / bad_request
    detail: str = ""


def submission_id(keys: list[str]) -> str:
    """Names one submission (recorded before anything is sent): a digest of its keys and a
    random part, so that a later submission of the same keys (a re-run after every line
    failed, a resubmission) is never mistaken for an earlier batch; a run killed while
    creating finds its own batch again by this id (``metadata.submission``)."""
    digest = hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()[:12]
    return f"{digest}-{secrets.token_hex(4)}"


@dataclass
class Batcher:
    client: Any  # the stages.common.llm.LLMClient it serves (not imported: llm.py imports this module)
    params: BatchParams
    directory: Path
    pending: dict[str, Line] = field(default_factory=dict)
    _timer: Optional[asyncio.TimerHandle] = None
    _resumed: Optional[asyncio.Task] = None
    _running: set = field(default_factory=set)
    batches: int = 0  # created by this run

    # -- entry point (LLMClient._fetch)
    async def fetch(self, key: str, body: dict[str, Any], summary: RequestSummary) -> Outcome:
        if self._resumed is None:
            self._resumed = asyncio.ensure_future(self.resume())
        await asyncio.shield(self._resumed)  # one caller's cancellation must not stop it
        entry = self.client.cache.get(key)  # answered by a batch of an earlier run
        if entry is not None:
            return Outcome(entry.response)
        future = asyncio.get_running_loop().create_future()
        self.pending[key] = Line(key, body, summary, future)
        self._arm()
        return await future

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        delay = 0 if len(self.pending) >= self.params.max_lines else self.params.collect_s
        self._timer = loop.call_later(delay, self._flush)

    def _flush(self) -> None:
        self._timer = None
        for key in [k for k, line in self.pending.items() if line.future.done()]:
            del self.pending[key]  # cancelled callers: not worth paying for
        lines = list(self.pending.values())[:self.params.max_lines]
        for line in lines:
            del self.pending[line.key]
        if self.pending:
            self._arm()
        if lines:
            task = asyncio.ensure_future(self._run(lines))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run(self, lines: list[Line]) -> None:
        try:
            record = await self.submit(lines)
            answers = await self.collect(record)
        except BaseException as exc:  # a fatal error / timeout reaches every waiting item
            for line in lines:
                if not line.future.done():
                    line.future.set_exception(exc if isinstance(exc, Exception) else StageError(str(exc)))
            if not isinstance(exc, Exception):
                raise
            return
        for line in lines:
            self._settle(line, answers.get(line.key))

    def _settle(self, line: Line, got: Optional[tuple[Optional[CachedResponse], str]]) -> None:
        if line.future.done():  # its caller was cancelled: nobody waits, nothing to resend
            return
        response, detail = got if got is not None else (None, "no line in the batch's output")
        if response is not None:
            line.future.set_result(Outcome(response))
            return
        line.submissions += 1
        if self.params.on_failed == "online":
            line.future.set_result(Outcome(online=True, detail=detail))
        elif line.submissions < self.params.max_submissions:
            self.pending[line.key] = line  # the next batch
            self._arm()
        else:
            line.future.set_result(Outcome(reason="transport_error", detail=(
                f"batch line failed {line.submissions} times: {detail}")))

    # -- the records: what was submitted, written before it is sent
    def record_path(self, sid: str) -> Path:
        return self.directory / f"{sid}.json"

    def write_record(self, record: dict[str, Any]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        write_json(record, self.record_path(record["submission"]))

    async def submit(self, lines: list[Line]) -> dict[str, Any]:
        keys = [line.key for line in lines]
        sid = submission_id(keys)
        jsonl = "".join(json.dumps({"custom_id": line.key, "method": "POST", "url": ENDPOINT,
                                    "body": line.body}, ensure_ascii=False) + "\n" for line in lines)
        record = {"submission": sid, "status": "prepared", "batch_id": None, "input_file_id": None,
                  "keys": keys, "summaries": {l.key: l.summary.model_dump(mode="json") for l in lines}}
        self.write_record(record)
        api = self.client._api()
        uploaded = await self.call(lambda: api.files.create(
            file=(f"{sid}.jsonl", jsonl.encode("utf-8")), purpose="batch"))
        record.update(input_file_id=uploaded.id, status="uploaded", uploaded_at=time.time())
        self.write_record(record)
        # a failed create may still have created the batch (500 after the fact, a dropped
        # reply): before each retry, look for it by its submission id — never create twice
        found = await self.call(lambda: api.batches.create(
            input_file_id=uploaded.id, endpoint=ENDPOINT,
            completion_window=self.params.completion_window, metadata={"submission": sid}),
            before_retry=lambda: self.find_submitted(sid, record["uploaded_at"]))
        self.batches += 1
        record.update(batch_id=found.id, status="submitted")
        self.write_record(record)
        self.client.log.info("LLM batch %s submitted: %d requests (submission %s)", found.id,
                             len(lines), sid)
        return record

    async def find_submitted(self, sid: str, since: Optional[float] = None) -> Any:
        """A batch already created for this submission (a run killed inside create). Pages
        through the account's batches, newest first, down to ``since`` (when the file was
        uploaded, less an hour for clock skew) or to the last page: a busy account has more
        than one page of batches, and a batch missed here would be paid for twice."""
        api = self.client._api()
        after: Optional[str] = None
        seen: set[str] = set()
        while True:
            page = await self.call(lambda: api.batches.list(limit=LIST_PAGE, **(
                {"after": after} if after else {})))
            batches = list(getattr(page, "data", None) or [])
            for batch in batches:
                if (batch.metadata or {}).get("submission") == sid and batch.status not in (
                        "failed", "expired", "cancelled"):
                    return batch
            if not batches or batches[-1].id in seen:  # the end, or a cursor that did not move
                return None
            seen.update(batch.id for batch in batches)
            oldest = batches[-1].created_at  # unknown: not known to be older
            if since is not None and oldest is not None and oldest < since - 3600:
                return None
            more = getattr(page, "has_more", None)  # left out (None): a full page may have more
            if more is False or (more is None and len(batches) < LIST_PAGE):
                return None
            after = batches[-1].id

    async def resume(self) -> None:
        """Collect every batch an earlier run submitted and did not collect (never resubmit)."""
        if not self.directory.is_dir():
            return
        for path in sorted(self.directory.glob("*.json")):
            record = json.loads(path.read_text(encoding="utf-8"))
            if record.get("status") == "collected":
                continue
            if record.get("batch_id") is None:
                # "prepared": killed before the upload was recorded, so create never ran
                # a record of older code has no uploaded_at: its file was last written then
                found = None if record.get("status") == "prepared" else await self.find_submitted(
                    record["submission"], record.get("uploaded_at") or path.stat().st_mtime)
                if found is None:  # nothing was created: the requests will come again
                    path.unlink()
                    continue
                record.update(batch_id=found.id, status="submitted")
                self.write_record(record)
            self.client.log.info("LLM batch %s from an earlier run: resuming, not resubmitting",
                                 record["batch_id"])
            await self.collect(record)

    # -- polling and reading the results
    async def collect(self, record: dict[str, Any]) -> dict[str, tuple[Optional[CachedResponse], str]]:
        """Poll to the final status; file every answer into the cache; key -> (answer, why not)."""
        api = self.client._api()
        start, seen = time.monotonic(), None
        bar = tqdm(total=len(record["keys"]), desc=f"batch {record['batch_id']}", unit="req",
                   leave=False, disable=not sys.stderr.isatty())
        while True:
            batch = await self.call(lambda: api.batches.retrieve(record["batch_id"]))
            counts = batch.request_counts
            state = (batch.status, getattr(counts, "completed", 0), getattr(counts, "failed", 0))
            bar.update((state[1] or 0) + (state[2] or 0) - bar.n)
            if state != seen:
                self.client.log.info("LLM batch %s: %s, %s/%s done, %s failed", batch.id,
                                     batch.status, state[1], getattr(counts, "total", "?"), state[2])
                seen = state
            if batch.status in FINAL:
                break
            waited = time.monotonic() - start
            if self.params.max_wait_s is not None and waited >= self.params.max_wait_s:
                raise StageError(
                    f"LLM batch {batch.id} is still {batch.status} after {waited:.0f} s "
                    f"(batch.max_wait_s); its id is recorded in {self.directory}: re-run the stage "
                    "(dvc repro) to resume polling it; nothing is submitted twice")
            await asyncio.sleep(self.params.poll_s)
        bar.close()
        answers = await self.read_results(batch, record)
        record["status"] = "collected"
        record["final_status"] = batch.status
        self.write_record(record)
        return answers

    async def read_results(self, batch: Any, record: dict[str, Any]
                           ) -> dict[str, tuple[Optional[CachedResponse], str]]:
        api = self.client._api()
        answers: dict[str, tuple[Optional[CachedResponse], str]] = {}
        for file_id in (batch.output_file_id, batch.error_file_id):
            if not file_id:
                continue
            content = await self.call(lambda: api.files.content(file_id))
            for text in content.text.splitlines():
                if text.strip():
                    key, answer = self.parse_line(json.loads(text), record)
                    if key in record["summaries"]:
                        answers[key] = answer
        why = _redact(f"batch {batch.id} {batch.status}" + (f": {batch.errors}" if batch.errors else ""))
        for key in record["keys"]:
            answers.setdefault(key, (None, why))
        return answers

    def parse_line(self, line: dict[str, Any], record: dict[str, Any]
                   ) -> tuple[str, tuple[Optional[CachedResponse], str]]:
        from openai.types.chat import ChatCompletion

        key = str(line.get("custom_id"))
        response = line.get("response") or {}
        if line.get("error") or response.get("status_code") != 200:
            error = line.get("error") or (response.get("body") or {}).get("error") or {}
            status = f"HTTP {response['status_code']}: " if response.get("status_code") else ""
            detail = f"{status}{error.get('code') or ''} {error.get('message') or ''}".strip()
            return key, (None, _redact(detail))
        cached = self.client._to_cached(ChatCompletion.model_validate(response.get("body") or {}))
        if cached is None:
            return key, (None, "malformed completion in the batch output")
        cached = cached.model_copy(update={"batch": True})
        summary = record["summaries"].get(key)
        if summary is not None:
            self.client.cache.put(key, CacheEntry(format=ENTRY_FORMAT, response=cached,
                                                  request=RequestSummary(**summary)))
        return key, (cached, "")

    async def call(self, make: Callable[[], Any],
                   before_retry: Optional[Callable[[], Any]] = None) -> Any:
        """An SDK call of the Batch API with the layer's retries (429, 5xx, drops);
        ``before_retry`` may return what the failed call did after all (then no retry)."""
        import openai
        client = self.client
        for attempt in range(1, client.params.max_attempts + 1):
            try:
                return await make()
            except openai.NotFoundError as exc:
                where = exc.request.url.path if getattr(exc, "request", None) else "Files/Batches"
                client._fatal = FatalLLMError(
                    f"LLM endpoint {client.params.base_url or 'api.openai.com'} has no Batch API "
                    f"(HTTP 404 on {where}); use llm.mode: online with this endpoint")
                raise client._fatal from None
            except openai.APIError as exc:
                failure = client._classify(exc)
                if failure.kind == "fatal":
                    client._fatal = FatalLLMError(f"LLM Batch API: {failure.detail}")
                    raise client._fatal from None
                if failure.kind == "reject" or attempt == client.params.max_attempts:
                    raise StageError(f"LLM Batch API: {failure.detail}") from None
                await asyncio.sleep(client._backoff(attempt, failure.retry_after))
                if before_retry is not None:
                    done = await before_retry()
                    if done is not None:
                        return done
        raise AssertionError("unreachable")
