"""A local OpenAI-compatible ``/v1/chat/completions`` server for tests and benchmarks.

Standard library only (asyncio streams, a minimal HTTP/1.1 with keep-alive), bound to
127.0.0.1 on a free port. Two ways to run it:

- in-process, on a background thread: ``with LLMTestServer(...) as server:`` — tests
  script it and inspect ``server.requests`` (body, headers) and in-flight counts;
- as a separate process (benchmarks, so that the client's CPU time is its own):
  ``ServerProcess.start(latency=1.0, ...)`` runs ``python tests/llm_server.py`` and
  reads counters from ``GET /_stats``.

What it answers, per request, first match wins:

1. the RPM cap (``rpm_cap``; sliding 60 s window of accepted requests): 429 with
   ``Retry-After`` when exceeded;
2. the next scripted :class:`Reply` queued with :meth:`LLMTestServer.enqueue`;
3. ``rule(request) -> Reply | None`` (per-request scripting, e.g. by item id);
4. random faults (``fault_rates={"429": p, "500": p, "drop": p}``, seeded); also
   ``"5xx"`` (500, 502 or 503), and faults of a 200's *content*: ``"invalid_json"`` (the
   responder's answer, corrupted), ``"truncated"`` (cut, ``finish_reason: "length"``) and
   ``"refusal"`` (``message.refusal`` set, no content). A ``"429"`` fault carries
   ``retry-after-ms: 200``, or ``Retry-After: <retry_after>`` seconds when that is set;
5. the default: a 200 whose content is ``responder(body)`` — by default
   :func:`echo_responder`, a valid JSON instance of the requested schema. A responder may
   also return a :class:`Reply` (status 200) to set the finish reason or a refusal itself.

``latency`` (± uniform ``jitter``) delays every reply except 429s (rate limits answer at
once, as real ones do) unless a reply sets its own ``delay``; ``latency_range=(lo, hi)``
draws it uniformly from that range instead.

Optional hooks (all additive): ``usage(body, text) -> (prompt_tokens, completion_tokens)``
(default: characters / 4), ``label(body) -> str`` (stats are also counted per label, e.g.
per pipeline stage) and ``extra_stats() -> dict`` (merged into ``/_stats`` as
``"responder"``); ``keep_bodies=False`` forgets each request body once it is answered
(long runs). ``/_stats`` counts replies by status and by kind (``ok``,
``invalid_json``, ``truncated``, ``refusal``, ``429``, ``5xx``, ``drop``, …), per label, and
sums the tokens of every 200. In subprocess mode the JSON config may name a responder
factory as ``"responder": "module:callable"`` with ``"responder_config": {...}`` (its
keyword arguments); the object it returns is the responder, and its ``usage`` / ``label`` /
``stats`` methods, where it has them, are the hooks.

**The Batch API** (``/v1/files``, ``/v1/batches``; what the ``openai`` SDK's ``files`` and
``batches`` resources call). State lives in the server, so a client may die mid-poll and a
new one carry on. ``POST /v1/files`` (multipart: ``purpose``, ``file``) stores the bytes;
``GET /v1/files/{id}`` / ``…/content`` / ``DELETE`` / ``GET /v1/files``. ``POST
/v1/batches`` validates the input JSONL (each line: JSON with a unique ``custom_id``,
``method`` ``"POST"``, ``url`` ``"/v1/chat/completions"``, an object ``body``; a bad file
makes the batch ``failed`` with ``errors.data``) and answers ``validating``. The batch
advances one step per ``GET /v1/batches/{id}`` (or :meth:`LLMTestServer.advance_batch`),
never by the clock: ``validating`` → ``in_progress`` (→ ``finalizing``) → final at the
``batch_polls``-th retrieval (default 2). The final status is ``completed``, or ``failed``
/ ``expired`` as scripted (``batch_outcomes``, consumed in creation order, then
``batch_outcome_rates``). At completion every line is answered by the chat-completions
logic (``rule``, ``fault_rates``, ``responder``; not the ``enqueue`` script nor
``rpm_cap``): a 200 goes to the output file as ``{"id": "batch_req_…", "custom_id",
"response": {"status_code": 200, "request_id", "body": <chat.completion>}, "error": null}``;
a non-200 (a fault, a rule's reply, ``batch_line_errors``) to the error file with
``response.body = {"error": {...}}``; a failure outside HTTP (``batch_expired``,
``batch_cancelled``, or a ``batch_line_errors`` code string) as ``"response": null,
"error": {"code", "message"}``. An ``expired`` batch answers its first
``batch_partial_share`` of lines (default half); so does one cancelled while in progress
(``POST /v1/batches/{id}/cancel``: ``cancelling``, then ``cancelled`` at the next
retrieval). Output lines come shuffled (``batch_shuffle``; OpenAI keeps no order).
``GET /v1/batches`` lists newest first (``limit``, ``after``). ``batch_rule(request) ->
Reply | None`` may answer any of these HTTP requests itself (a 500, a 401, a drop).
Counters: ``stats()["batch"]`` (present once a file or batch endpoint was called),
:attr:`LLMTestServer.batches`, ``batch_requests``, ``batch_line_requests``.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import copy
import importlib
import json
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Union

HOST = "127.0.0.1"
_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
            404: "Not Found", 409: "Conflict", 429: "Too Many Requests", 500: "Internal Server Error",
            502: "Bad Gateway", 503: "Service Unavailable"}


# ---------------------------------------------------------------------------- replies
@dataclass
class Reply:
    """What the server does with one request."""
    status: int = 200
    content: Optional[str] = None          # 200: message content; None -> responder(body)
    refusal: Optional[str] = None
    finish_reason: str = "stop"
    error: Optional[dict[str, Any]] = None  # non-200: the "error" object
    headers: dict[str, str] = field(default_factory=dict)
    drop: bool = False                     # close the socket without any response
    delay: Optional[float] = None          # overrides latency
    usage: Optional[tuple[int, int]] = None  # (prompt, completion); default: from lengths
    raw_body: Optional[bytes] = None       # sent verbatim instead of a JSON payload
    mangle: Optional[str] = None           # "invalid_json" / "truncated": spoil responder(body)

    @classmethod
    def ok(cls, content: Optional[str] = None, **kw: Any) -> "Reply":
        return cls(content=content, **kw)

    @classmethod
    def rate_limited(cls, retry_after: Optional[float] = None,
                     retry_after_ms: Optional[float] = None, **kw: Any) -> "Reply":
        headers = {}
        if retry_after is not None:
            headers["retry-after"] = f"{retry_after:g}"
        if retry_after_ms is not None:
            headers["retry-after-ms"] = f"{retry_after_ms:g}"
        return cls(status=429, headers=headers, error={
            "message": "Rate limit reached for requests", "type": "requests",
            "code": "rate_limit_exceeded", "param": None}, **kw)

    @classmethod
    def server_error(cls, status: int = 500, **kw: Any) -> "Reply":
        return cls(status=status, error={"message": "The server had an error",
                                         "type": "server_error", "code": None, "param": None}, **kw)

    @classmethod
    def drop_connection(cls, **kw: Any) -> "Reply":
        return cls(drop=True, **kw)

    @classmethod
    def garbage(cls, body: bytes = b"<html>502 upstream hiccup</html>", **kw: Any) -> "Reply":
        """A 200 whose body is not the JSON it claims to be (a confused proxy)."""
        return cls(raw_body=body, **kw)

    @classmethod
    def slow(cls, delay: float, **kw: Any) -> "Reply":
        return cls(delay=delay, **kw)

    @classmethod
    def invalid_json(cls, text: str = '{"answer": "unterminated', **kw: Any) -> "Reply":
        return cls(content=text, **kw)

    @classmethod
    def truncated(cls, text: str = '{"answer": "a very long answ', **kw: Any) -> "Reply":
        return cls(content=text, finish_reason="length", **kw)

    @classmethod
    def spoiled(cls, kind: str, **kw: Any) -> "Reply":
        """The responder's own answer, spoiled: ``"invalid_json"`` (corrupted) or
        ``"truncated"`` (cut part-way, ``finish_reason: "length"``)."""
        if kind not in ("invalid_json", "truncated"):
            raise ValueError(f"unknown content fault {kind!r}")
        return cls(mangle=kind, finish_reason="length" if kind == "truncated" else "stop", **kw)

    @classmethod
    def refused(cls, text: str = "I'm sorry, I can't help with that.", **kw: Any) -> "Reply":
        return cls(content=None, refusal=text, **kw)

    @classmethod
    def unauthorized(cls, **kw: Any) -> "Reply":
        return cls(status=401, error={"message": "Incorrect API key provided.",
                                      "type": "invalid_request_error", "code": "invalid_api_key",
                                      "param": None}, **kw)

    @classmethod
    def permission_denied(cls, **kw: Any) -> "Reply":
        return cls(status=403, error={"message": "Project does not have access to the model",
                                      "type": "invalid_request_error", "code": None, "param": None}, **kw)

    @classmethod
    def insufficient_quota(cls, **kw: Any) -> "Reply":
        return cls(status=429, error={
            "message": "You exceeded your current quota, please check your plan and billing details.",
            "type": "insufficient_quota", "code": "insufficient_quota", "param": None}, **kw)

    @classmethod
    def bad_request(cls, message: str = "This model's maximum context length is exceeded",
                    **kw: Any) -> "Reply":
        return cls(status=400, error={"message": message, "type": "invalid_request_error",
                                      "code": "context_length_exceeded", "param": "messages"}, **kw)


# ---------------------------------------------------------------------------- the default answer
def _instance(schema: dict[str, Any], root: dict[str, Any], text: str) -> Any:
    if "$ref" in schema:
        node: Any = root
        for part in schema["$ref"][2:].split("/"):
            node = node[part]
        return _instance(node, root, text)
    if "enum" in schema:
        return schema["enum"][0]
    if "const" in schema:
        return schema["const"]
    if "anyOf" in schema:
        variants = [v for v in schema["anyOf"] if v.get("type") != "null"] or schema["anyOf"]
        return _instance(variants[0], root, text)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        return {name: _instance(sub, root, text) for name, sub in schema.get("properties", {}).items()}
    if kind == "array":
        return [_instance(schema["items"], root, text)] * schema.get("minItems", 0)
    return {"string": text, "integer": 0, "number": 0.0, "boolean": True, "null": None}.get(kind, text)


def echo_responder(body: dict[str, Any]) -> str:
    """A valid JSON instance of the requested schema; strings echo the last user message."""
    messages = body.get("messages") or [{}]
    text = str(messages[-1].get("content", ""))
    fmt = body.get("response_format") or {}
    schema = (fmt.get("json_schema") or {}).get("schema")
    if not schema:
        return json.dumps({"echo": text}, ensure_ascii=False)
    return json.dumps(_instance(schema, schema, text), ensure_ascii=False)


# ---------------------------------------------------------------------------- requests seen
@dataclass
class ReceivedRequest:
    index: int
    method: str
    path: str
    headers: dict[str, str]   # names lower-cased
    raw_body: bytes
    received_at: float        # time.monotonic()
    status: Optional[int] = None   # what was answered (None: dropped / not yet)
    completed: bool = False        # the full response went out on an open connection
    custom_id: Optional[str] = None  # batch lines: the line's custom_id
    batch_id: Optional[str] = None   # batch lines: the batch it belongs to
    _parsed: Optional[dict[str, Any]] = field(default=None, repr=False, compare=False)

    @property
    def body(self) -> dict[str, Any]:
        """The JSON body (parsed once; ``{}`` when it is not JSON)."""
        if self._parsed is None:
            try:
                parsed = json.loads(self.raw_body or b"{}")
            except ValueError:
                parsed = {}
            self._parsed = parsed if isinstance(parsed, dict) else {}
        return self._parsed

    @property
    def messages(self) -> list[dict[str, Any]]:
        return self.body.get("messages") or []

    @property
    def text(self) -> str:
        """All message contents joined (for finding item markers)."""
        return "\n".join(str(m.get("content", "")) for m in self.messages)


# ---------------------------------------------------------------------------- the Batch API: pieces
_BATCH_OUTCOMES = frozenset({"completed", "failed", "expired"})
_BATCH_FINAL = frozenset({"completed", "failed", "expired", "cancelled"})
_BATCH_ENDPOINT = "/v1/chat/completions"
_FILE_PURPOSES = frozenset({"assistants", "batch", "fine-tune", "vision", "user_data", "evals"})
_ROUTE = re.compile(r"(?:/v1)?/(files|batches)(?:/([^/]+)(?:/(content|cancel))?)?")


def _new_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex[:24]


class _APIError(Exception):
    """An OpenAI-style error reply of a file / batch endpoint."""

    def __init__(self, status: int, message: str, *, code: Optional[str] = None,
                 param: Optional[str] = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status = status
        self.error = {"message": message, "type": kind, "param": param, "code": code}


@dataclass
class _Batch:
    """One batch's server-side state; ``obj`` is the Batch object the API returns."""
    obj: dict[str, Any]
    seq: int                        # creation order
    lines: list[dict[str, Any]]     # the validated input lines (empty when invalid)
    errors: list[dict[str, Any]]    # validation errors -> "failed"
    outcome: str                    # completed / failed / expired, when it gets there
    headers: dict[str, str]         # of the create request (batch lines carry them to ``rule``)
    steps: int = 0                  # advances so far (retrievals, advance_batch)
    retrievals: int = 0
    cancelled_from: Optional[str] = None


def _batch_route(method: str, target: str) -> Optional[tuple[str, tuple[str, ...]]]:
    """``(handler name, args)`` of a file / batch endpoint, or None."""
    match = _ROUTE.fullmatch(urllib.parse.urlsplit(target).path.rstrip("/"))
    if match is None:
        return None
    kind, ident, sub = match.groups()
    table = {("files", False, None, "POST"): "file_create", ("files", False, None, "GET"): "file_list",
             ("files", True, None, "GET"): "file_get", ("files", True, None, "DELETE"): "file_delete",
             ("files", True, "content", "GET"): "file_content",
             ("batches", False, None, "POST"): "batch_create", ("batches", False, None, "GET"): "batch_list",
             ("batches", True, None, "GET"): "batch_get", ("batches", True, "cancel", "POST"): "batch_cancel"}
    name = table.get((kind, ident is not None, sub, method))
    if name is None:
        return None
    return name, ((urllib.parse.unquote(ident),) if ident is not None else ())


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    """A ``Transfer-Encoding: chunked`` request body."""
    parts = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                pass
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)


def _parse_multipart(content_type: str, body: bytes) -> dict[str, tuple[Optional[str], bytes]]:
    """``{field name: (filename or None, bytes)}`` of a multipart/form-data body."""
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if match is None:
        raise _APIError(400, "Invalid multipart/form-data: no boundary")
    boundary = b"--" + match.group(1).encode("latin-1")
    fields: dict[str, tuple[Optional[str], bytes]] = {}
    for part in body.split(boundary)[1:]:
        if part.startswith(b"--"):
            break
        if part.startswith(b"\r\n"):
            part = part[2:]
        head, _, data = part.partition(b"\r\n\r\n")
        if data.endswith(b"\r\n"):
            data = data[:-2]
        disposition = ""
        for line in head.decode("utf-8", "replace").split("\r\n"):
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-disposition":
                disposition = value
        field_name = re.search(r'(?:^|[;\s])name="([^"]*)"', disposition)
        filename = re.search(r'filename="([^"]*)"', disposition)
        if field_name:
            fields[field_name.group(1)] = (filename.group(1) if filename else None, data)
    return fields


def _validate_batch_input(data: bytes, endpoint: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(lines, errors)`` of a batch input JSONL; ``errors`` are BatchError objects
    (``code``, ``message``, ``param``, ``line``: 1-based), at most one per line."""
    lines: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()

    def error(number: Optional[int], code: str, message: str, param: Optional[str] = None) -> None:
        errors.append({"code": code, "message": message, "param": param, "line": number})

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        error(None, "invalid_file_format", "The batch input file is not UTF-8 text.")
        return [], errors
    for number, raw in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 is JSON
        if not raw.strip():
            continue
        try:
            item = json.loads(raw)
        except ValueError:
            error(number, "invalid_json_line", "This line is not parseable as valid JSON.")
            continue
        if not isinstance(item, dict):
            error(number, "invalid_json_line", "This line is not a JSON object.")
            continue
        missing = [key for key in ("custom_id", "method", "url", "body") if key not in item]
        if missing:
            error(number, "missing_required_parameter",
                  f"Missing required parameter: '{missing[0]}'.", missing[0])
            continue
        custom_id = item["custom_id"]
        if not isinstance(custom_id, str) or not custom_id:
            error(number, "invalid_type", "'custom_id' must be a non-empty string.", "custom_id")
        elif custom_id in seen:
            error(number, "duplicate_custom_id",
                  f"The custom_id '{custom_id}' is not unique in this file.", "custom_id")
        elif item["method"] != "POST":
            error(number, "invalid_method", f"Only POST is supported, not {item['method']!r}.", "method")
        elif item["url"] != endpoint:
            error(number, "invalid_url", f"The URL {item['url']!r} of this line does not match "
                                         f"the batch's endpoint {endpoint!r}.", "url")
        elif not isinstance(item["body"], dict):
            error(number, "invalid_type", "'body' must be a JSON object.", "body")
        else:
            lines.append(item)
        if isinstance(custom_id, str):
            seen.add(custom_id)
    if not lines and not errors:
        error(None, "empty_file", "The batch input file is empty.")
    return ([] if errors else lines), errors


# ---------------------------------------------------------------------------- the server
class LLMTestServer:
    """Scriptable OpenAI-compatible server on a background thread (see module docstring)."""

    def __init__(self, responder: Callable[[dict[str, Any]], str] = echo_responder, *,
                 latency: float = 0.0, jitter: float = 0.0, rpm_cap: Optional[int] = None,
                 fault_rates: Optional[dict[str, float]] = None, seed: int = 0,
                 rule: Optional[Callable[[ReceivedRequest], Optional[Reply]]] = None,
                 port: int = 0, latency_range: Optional[tuple[float, float]] = None,
                 retry_after: Optional[float] = None,
                 usage: Optional[Callable[[dict[str, Any], str], tuple[int, int]]] = None,
                 label: Optional[Callable[[dict[str, Any]], str]] = None,
                 extra_stats: Optional[Callable[[], dict[str, Any]]] = None,
                 keep_bodies: bool = True, batch_polls: int = 2,
                 batch_outcomes: Optional[Iterable[str]] = None,
                 batch_outcome_rates: Optional[dict[str, float]] = None,
                 batch_line_errors: Union[None, float, Iterable[str], Mapping[str, Any]] = None,
                 batch_partial_share: float = 0.5, batch_shuffle: bool = True,
                 batch_rule: Optional[Callable[[ReceivedRequest], Optional[Reply]]] = None):
        self.responder = responder
        self.latency = latency
        self.jitter = jitter
        self.latency_range = tuple(latency_range) if latency_range is not None else None
        self.retry_after = retry_after
        self.rpm_cap = rpm_cap
        self.fault_rates = dict(fault_rates or {})
        self.rule = rule
        self.usage = usage
        self.label = label
        self.extra_stats = extra_stats
        self.keep_bodies = keep_bodies  # False: long runs drop each body once answered
        self._rng = random.Random(seed)
        self._port = port
        self._lock = threading.RLock()  # a rule may read server.requests
        self._script: collections.deque[Reply] = collections.deque()
        self._requests: list[ReceivedRequest] = []
        self._window: collections.deque[float] = collections.deque()
        self.in_flight = 0
        self.max_in_flight = 0
        self.status_counts: collections.Counter = collections.Counter()
        self.kind_counts: collections.Counter = collections.Counter()
        self.label_counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.tokens: collections.Counter = collections.Counter()  # prompt / completion, all 200s
        self.label_tokens: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._server: Optional[asyncio.AbstractServer] = None
        self._connections: set[asyncio.StreamWriter] = set()
        self._ready = threading.Event()
        self._stopping: Optional[asyncio.Event] = None
        self._startup_error: Optional[BaseException] = None
        # -- the Batch API (see the module docstring)
        self.batch_polls = batch_polls                # retrievals until a batch is final
        self.batch_outcomes: collections.deque[str] = collections.deque(batch_outcomes or ())
        self.batch_outcome_rates = dict(batch_outcome_rates or {})  # {"failed": p, "expired": p}
        for outcome in list(self.batch_outcomes) + list(self.batch_outcome_rates):
            if outcome not in _BATCH_OUTCOMES:
                raise ValueError(f"unknown batch outcome {outcome!r} (one of {sorted(_BATCH_OUTCOMES)})")
        self.batch_line_errors = batch_line_errors    # rate, custom_ids, or {custom_id: error}
        self.batch_partial_share = batch_partial_share  # expired / cancelled: share answered
        self.batch_shuffle = batch_shuffle
        self.batch_rule = batch_rule
        self._batch_rng = random.Random(f"batch-{seed}")
        self._files: dict[str, dict[str, Any]] = {}   # id -> {"object": {...}, "data": bytes}
        self._batches: dict[str, _Batch] = {}         # id -> state, in creation order
        self._batch_requests: list[ReceivedRequest] = []
        self._batch_line_requests: list[ReceivedRequest] = []
        self.batch_counts: collections.Counter = collections.Counter()
        self.batch_line_kinds: collections.Counter = collections.Counter()
        self.batch_line_tokens: collections.Counter = collections.Counter()

    # -- scripting and inspection (thread-safe)
    def enqueue(self, *replies: Reply) -> None:
        """Queue replies used, in order, for the next requests (before rule/faults/default)."""
        with self._lock:
            self._script.extend(replies)

    @property
    def requests(self) -> list[ReceivedRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def completions_requests(self) -> list[ReceivedRequest]:
        return [r for r in self.requests if r.path.rstrip("/").endswith("/chat/completions")]

    def reset(self) -> None:
        with self._lock:
            self._script.clear()
            self._requests.clear()
            self._window.clear()
            self.max_in_flight = self.in_flight
            self.status_counts.clear()
            self.kind_counts.clear()
            self.label_counts.clear()
            self.tokens.clear()
            self.label_tokens.clear()
            self._files.clear()
            self._batches.clear()
            self._batch_requests.clear()
            self._batch_line_requests.clear()
            self.batch_counts.clear()
            self.batch_line_kinds.clear()
            self.batch_line_tokens.clear()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            stats = {"requests": len(self._requests), "in_flight": self.in_flight,
                     "max_in_flight": self.max_in_flight,
                     "completed": sum(r.completed for r in self._requests),
                     "status": {str(k): v for k, v in sorted(self.status_counts.items(),
                                                             key=lambda kv: str(kv[0]))},
                     "kinds": dict(sorted(self.kind_counts.items())),
                     "tokens": {"prompt": self.tokens["prompt"],
                                "completion": self.tokens["completion"]}}
            if self.label_counts:
                stats["labels"] = {name: {"kinds": dict(sorted(counts.items())),
                                          "tokens": dict(sorted(self.label_tokens[name].items()))}
                                   for name, counts in sorted(self.label_counts.items())}
            if self.batch_counts:
                stats["batch"] = self._batch_stats()
        if self.extra_stats is not None:
            stats["responder"] = self.extra_stats()
        return stats

    # -- the Batch API: inspection and scripting (thread-safe)
    @property
    def batches(self) -> list[dict[str, Any]]:
        """The Batch objects created so far, in creation order (copies)."""
        with self._lock:
            return [copy.deepcopy(batch.obj) for batch in self._batches.values()]

    def batch(self, batch_id: str) -> dict[str, Any]:
        """One Batch object as it stands (a copy; retrieving it here does not advance it)."""
        with self._lock:
            return copy.deepcopy(self._batches[batch_id].obj)

    def batch_input_lines(self, batch_id: str) -> list[dict[str, Any]]:
        """The validated input lines of a batch (empty when its file was invalid)."""
        with self._lock:
            return copy.deepcopy(self._batches[batch_id].lines)

    def advance_batch(self, batch_id: str, steps: int = 1) -> dict[str, Any]:
        """Move a batch on as ``steps`` retrievals would (without counting them)."""
        with self._lock:
            batch = self._batches[batch_id]
            for _ in range(steps):
                self._advance(batch)
            return copy.deepcopy(batch.obj)

    def file_bytes(self, file_id: str) -> bytes:
        """The stored bytes of an uploaded, output or error file."""
        with self._lock:
            return self._files[file_id]["data"]

    @property
    def files(self) -> list[dict[str, Any]]:
        """The File objects stored (uploads, then outputs as made), copies."""
        with self._lock:
            return [dict(entry["object"]) for entry in self._files.values()]

    @property
    def batch_requests(self) -> list[ReceivedRequest]:
        """The HTTP requests to file / batch endpoints (headers, bodies, statuses)."""
        with self._lock:
            return list(self._batch_requests)

    @property
    def batch_line_requests(self) -> list[ReceivedRequest]:
        """One record per batch line answered (``custom_id``, ``batch_id``, ``status``)."""
        with self._lock:
            return list(self._batch_line_requests)

    def _batch_stats(self) -> dict[str, Any]:
        # Called under self._lock.
        counts = self.batch_counts
        return {"requests": counts["requests"], "files_uploaded": counts["files_uploaded"],
                "file_reads": counts["file_reads"], "batches_created": counts["batches_created"],
                "batch_lines": counts["batch_lines"], "retrievals": counts["retrievals"],
                "lists": counts["lists"], "cancels": counts["cancels"],
                "statuses": dict(sorted(collections.Counter(
                    b.obj["status"] for b in self._batches.values()).items())),
                "created": [{"id": b.obj["id"], "lines": len(b.lines), "status": b.obj["status"],
                             "outcome": b.outcome, "retrievals": b.retrievals,
                             "metadata": b.obj["metadata"]} for b in self._batches.values()],
                "line_kinds": dict(sorted(self.batch_line_kinds.items())),
                "line_tokens": {"prompt": self.batch_line_tokens["prompt"],
                                "completion": self.batch_line_tokens["completion"]}}

    @property
    def port(self) -> int:
        assert self._server is not None, "server not started"
        return self._server.sockets[0].getsockname()[1]

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}/v1"

    # -- lifecycle
    def start(self) -> "LLMTestServer":
        self._thread = threading.Thread(target=self._run_thread, name="llm-test-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("test server did not start")
        if self._startup_error:
            raise self._startup_error
        return self

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._thread = None

    def __enter__(self) -> "LLMTestServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _run_thread(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        try:
            loop.run_until_complete(self._open())
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            self._startup_error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            # Finish handler tasks (they see their connections closed) before closing.
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

    async def _open(self) -> None:
        self._stopping = asyncio.Event()
        self._server = await asyncio.start_server(self._handle, HOST, self._port, backlog=2048,
                                                  limit=1 << 22)

    async def _close(self) -> None:
        """Stop accepting, cut every connection, wake sleeping handlers, let them finish."""
        assert self._server is not None and self._stopping is not None
        self._stopping.set()
        self._server.close()
        for writer in list(self._connections):
            writer.transport.abort()
        handlers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if handlers:
            await asyncio.wait(handlers, timeout=5)

    # -- HTTP
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections.add(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, target, _version = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        name, value = line.split(":", 1)
                        headers[name.strip().lower()] = value.strip()
                length = int(headers.get("content-length", "0") or 0)
                try:
                    if "chunked" in headers.get("transfer-encoding", "").lower():
                        body = await _read_chunked(reader)
                    else:
                        body = await reader.readexactly(length) if length else b""
                except (asyncio.IncompleteReadError, ConnectionError, ValueError):
                    return
                keep_alive = headers.get("connection", "").lower() != "close"
                if not await self._respond(method, target, headers, body, reader, writer):
                    return
                if not keep_alive:
                    return
        finally:
            self._connections.discard(writer)
            with contextlib.suppress(Exception):
                writer.close()

    async def _respond(self, method: str, target: str, headers: dict[str, str], body: bytes,
                       reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; False when the connection must end."""
        if target == "/_stats":
            return await self._write(writer, 200, self.stats(), {})
        route = _batch_route(method, target)
        if route is not None:
            return await self._batch_respond(route, method, target, headers, body, writer)
        if not (method == "POST" and target.rstrip("/").endswith("/chat/completions")):
            return await self._write(writer, 404, {"error": {"message": f"no route {method} {target}",
                                                             "type": "invalid_request_error"}}, {})
        now = time.monotonic()
        with self._lock:
            record = ReceivedRequest(len(self._requests), method, target, headers, body, now)
            self._requests.append(record)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            reply = self._choose(record, now)
        try:
            delay = reply.delay
            if delay is None:
                delay = 0.0 if reply.status == 429 else self._latency()
            if delay:
                assert self._stopping is not None
                # Sleep, but wake at shutdown so that stop() never waits on a slow reply.
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)
            if self._stopping is not None and self._stopping.is_set():
                return False
            if reply.drop:
                self._count(record, "drop")
                writer.transport.abort()
                return False
            if reader.at_eof():  # the client went away while we "thought"
                return False
            usage = (0, 0)
            if reply.status != 200:
                payload: dict[str, Any] = {"error": reply.error or {"message": "error"}}
                kind = "5xx" if reply.status >= 500 else str(reply.status)
            else:
                payload, kind = self._completion(record, reply)
                usage = (payload["usage"]["prompt_tokens"], payload["usage"]["completion_tokens"])
            self._count(record, kind, usage)  # before the write: a client reading /_stats next sees it
            ok = await self._write(writer, reply.status, payload, reply.headers, reply.raw_body)
            with self._lock:
                record.status = reply.status
                record.completed = ok
                self.status_counts[reply.status] += 1
            return ok
        finally:
            record._parsed = None  # parsed once per reply, not kept
            if not self.keep_bodies:
                record.raw_body = b""
            with self._lock:
                self.in_flight -= 1

    def _latency(self) -> float:
        if self.latency_range is not None:
            return max(0.0, self._rng.uniform(*self.latency_range))
        return max(0.0, self.latency + self._rng.uniform(-self.jitter, self.jitter))

    def _count(self, record: ReceivedRequest, kind: str, usage: tuple[int, int] = (0, 0)) -> None:
        """Stats of one reply: its kind, its label's kind, the tokens of a 200."""
        name = None
        if self.label is not None:
            try:
                name = self.label(record.body)
            except Exception:  # noqa: BLE001 - a label is bookkeeping, never an answer
                name = "unlabelled"
        with self._lock:
            self.kind_counts[kind] += 1
            self.tokens["prompt"] += usage[0]
            self.tokens["completion"] += usage[1]
            if name is not None:
                self.label_counts[name][kind] += 1
                self.label_tokens[name]["prompt"] += usage[0]
                self.label_tokens[name]["completion"] += usage[1]

    def _fault(self, name: str) -> Reply:
        if name == "429":
            if self.retry_after is not None:
                return Reply.rate_limited(retry_after=self.retry_after)
            return Reply.rate_limited(retry_after_ms=200)
        if name == "drop":
            return Reply.drop_connection()
        if name in ("invalid_json", "truncated"):
            return Reply.spoiled(name)
        if name == "refusal":
            return Reply.refused()
        if name == "5xx":
            return Reply.server_error(self._rng.choice((500, 502, 503)))
        return Reply.server_error(int(name))

    def _choose(self, record: ReceivedRequest, now: float) -> Reply:
        # Called under self._lock.
        if self.rpm_cap is not None:
            while self._window and now - self._window[0] >= 60.0:
                self._window.popleft()
            if len(self._window) >= self.rpm_cap:
                wait = 60.0 - (now - self._window[0])
                return Reply.rate_limited(retry_after=max(1, int(wait + 0.999)))
            self._window.append(now)
        if self._script:
            return self._script.popleft()
        return self._rule_or_fault(record)

    def _rule_or_fault(self, record: ReceivedRequest) -> Reply:
        """``rule``, then the random faults, then a plain 200 (called under self._lock)."""
        if self.rule is not None:
            reply = self.rule(record)
            if reply is not None:
                return reply
        roll = self._rng.random()
        for name, rate in self.fault_rates.items():
            if roll < rate:
                return self._fault(name)
            roll -= rate
        return Reply.ok()

    def _spoil(self, content: str, kind: str) -> str:
        """``content`` cut part-way (truncated) or made unparsable (invalid_json)."""
        if kind == "truncated":
            return content[:max(1, int(len(content) * self._rng.uniform(0.3, 0.9)))]
        style = self._rng.randrange(3)
        if style == 0:
            return content.rstrip()[:-1]          # the closing brace lost
        if style == 1:
            return content + "\n}"                # trailing garbage
        return "다음은 요청하신 JSON입니다:\n" + content  # prose around it

    def _completion(self, record: ReceivedRequest, reply: Reply) -> tuple[dict[str, Any], str]:
        """The chat-completion payload of a 200 and its kind (ok, refusal, truncated, …)."""
        body = record.body
        content, refusal, finish = reply.content, reply.refusal, reply.finish_reason
        usage = reply.usage
        if content is None and refusal is None:
            answer = self.responder(body)
            if isinstance(answer, str):
                content = answer
            else:  # a Reply (duck-typed: the subprocess imports this module twice)
                content, refusal, usage = answer.content, answer.refusal, answer.usage or usage
                finish = answer.finish_reason if finish == "stop" else finish
        if reply.mangle and content is not None:
            content = self._spoil(content, reply.mangle)
        if usage is None and self.usage is not None:
            usage = self.usage(body, content or refusal or "")
        prompt, completion = usage or (
            max(1, len(json.dumps(body.get("messages", []), ensure_ascii=False)) // 4),
            max(1, len(content or refusal or "") // 4))
        kind = ("refusal" if refusal else "truncated" if finish == "length"
                else "invalid_json" if reply.mangle == "invalid_json"
                else "garbage" if reply.raw_body is not None else "ok")
        return {
            "id": f"chatcmpl-test-{record.index}", "object": "chat.completion",
            "created": int(time.time()), "model": body.get("model", "test-model"),
            "system_fingerprint": "fp_test",
            "choices": [{"index": 0, "logprobs": None, "finish_reason": finish,
                         "message": {"role": "assistant", "content": content,
                                     "refusal": refusal}}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                      "total_tokens": prompt + completion},
        }, kind

    async def _write(self, writer: asyncio.StreamWriter, status: int, payload: dict[str, Any],
                     headers: dict[str, str], raw_body: Optional[bytes] = None,
                     content_type: str = "application/json") -> bool:
        data = raw_body if raw_body is not None else json.dumps(payload, ensure_ascii=False).encode("utf-8")
        head = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}",
                f"content-type: {content_type}", f"content-length: {len(data)}"]
        head += [f"{name}: {value}" for name, value in headers.items()]
        try:
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + data)
            await writer.drain()
        except (ConnectionError, RuntimeError):
            return False
        return not writer.is_closing()

    # -- the Batch API: HTTP
    async def _batch_respond(self, route: tuple[str, tuple[str, ...]], method: str, target: str,
                             headers: dict[str, str], body: bytes,
                             writer: asyncio.StreamWriter) -> bool:
        """Answer one file / batch request (no latency: these are bookkeeping calls)."""
        name, args = route
        reply_headers: dict[str, str] = {}
        with self._lock:
            record = ReceivedRequest(len(self._batch_requests), method, target, headers, body,
                                     time.monotonic())
            self._batch_requests.append(record)
            self.batch_counts["requests"] += 1
            reply = self.batch_rule(record) if self.batch_rule is not None else None
            if reply is not None and (reply.drop or reply.status != 200):
                status, payload = reply.status, {"error": reply.error or {"message": "error"}}
                reply_headers = reply.headers
            else:
                reply = None
                try:
                    status, payload = getattr(self, f"_api_{name}")(record, *args)
                except _APIError as exc:
                    status, payload = exc.status, {"error": exc.error}
                except Exception as exc:  # noqa: BLE001 - a broken responder / rule: say so
                    status, payload = 500, {"error": {
                        "message": f"test server error: {exc!r}", "type": "server_error",
                        "param": None, "code": None}}
            # before the reply is written: a client that has its answer sees the status recorded
            record.status = None if reply is not None and reply.drop else status
        try:
            if reply is not None and reply.drop:
                writer.transport.abort()
                return False
            if isinstance(payload, bytes):
                ok = await self._write(writer, status, {}, reply_headers, payload,
                                       "application/octet-stream")
            else:
                ok = await self._write(writer, status, payload, reply_headers)
            with self._lock:
                record.completed = ok
            return ok
        finally:
            record._parsed = None
            if not self.keep_bodies:
                record.raw_body = b""

    def _store_file(self, filename: str, data: bytes, purpose: str) -> dict[str, Any]:
        # Called under self._lock.
        now = int(time.time())
        obj = {"id": _new_id("file-"), "object": "file", "bytes": len(data), "created_at": now,
               "filename": filename, "purpose": purpose, "status": "processed",
               "expires_at": now + 30 * 86400 if purpose.startswith("batch") else None,
               "status_details": None}
        self._files[obj["id"]] = {"object": obj, "data": data}
        return obj

    def _file_entry(self, file_id: str) -> dict[str, Any]:
        entry = self._files.get(file_id)
        if entry is None:
            raise _APIError(404, f"No such File object: {file_id}", param="id")
        return entry

    def _api_file_create(self, record: ReceivedRequest) -> tuple[int, Any]:
        content_type = record.headers.get("content-type", "")
        if "multipart/form-data" not in content_type:
            raise _APIError(400, "Uploads must be multipart/form-data.")
        fields = _parse_multipart(content_type, record.raw_body)
        for key in ("purpose", "file"):
            if key not in fields:
                raise _APIError(400, f"Missing required parameter: '{key}'.", param=key,
                                code="missing_required_parameter")
        purpose = fields["purpose"][1].decode("utf-8", "replace").strip()
        if purpose not in _FILE_PURPOSES:
            raise _APIError(400, f"Invalid value for 'purpose': {purpose!r}.", param="purpose",
                            code="invalid_value")
        filename, data = fields["file"]
        obj = self._store_file(filename or "file", data, purpose)
        self.batch_counts["files_uploaded"] += 1
        return 200, dict(obj)

    def _api_file_get(self, record: ReceivedRequest, file_id: str) -> tuple[int, Any]:
        return 200, dict(self._file_entry(file_id)["object"])

    def _api_file_content(self, record: ReceivedRequest, file_id: str) -> tuple[int, Any]:
        data = self._file_entry(file_id)["data"]
        self.batch_counts["file_reads"] += 1
        return 200, data

    def _api_file_delete(self, record: ReceivedRequest, file_id: str) -> tuple[int, Any]:
        self._file_entry(file_id)
        del self._files[file_id]
        return 200, {"id": file_id, "object": "file", "deleted": True}

    def _api_file_list(self, record: ReceivedRequest) -> tuple[int, Any]:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(record.path).query)
        purpose = (query.get("purpose") or [None])[0]
        data = [dict(e["object"]) for e in reversed(self._files.values())
                if purpose is None or e["object"]["purpose"] == purpose]
        return 200, {"object": "list", "data": data, "has_more": False,
                     "first_id": data[0]["id"] if data else None,
                     "last_id": data[-1]["id"] if data else None}

    def _batch_entry(self, batch_id: str) -> _Batch:
        batch = self._batches.get(batch_id)
        if batch is None:
            raise _APIError(404, f"No batch found with id '{batch_id}'.", param="batch_id")
        return batch

    def _api_batch_create(self, record: ReceivedRequest) -> tuple[int, Any]:
        try:
            params = json.loads(record.raw_body or b"{}")
        except ValueError:
            params = None
        if not isinstance(params, dict):
            raise _APIError(400, "We could not parse the JSON body of your request.")
        for key in ("input_file_id", "endpoint", "completion_window"):
            if not params.get(key):
                raise _APIError(400, f"Missing required parameter: '{key}'.", param=key,
                                code="missing_required_parameter")
        endpoint, window = params["endpoint"], params["completion_window"]
        if endpoint != _BATCH_ENDPOINT:
            raise _APIError(400, f"Invalid value for 'endpoint': {endpoint!r}; this server batches "
                                 f"only {_BATCH_ENDPOINT}.", param="endpoint", code="invalid_value")
        if window != "24h":
            raise _APIError(400, f"Invalid value for 'completion_window': {window!r}; only '24h' "
                                 "is supported.", param="completion_window", code="invalid_value")
        metadata = params.get("metadata")
        if metadata is not None and not (
                isinstance(metadata, dict) and len(metadata) <= 16
                and all(isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512
                        for k, v in metadata.items())):
            raise _APIError(400, "Invalid 'metadata': at most 16 string keys (≤64 characters) "
                                 "with string values (≤512 characters).", param="metadata",
                            code="invalid_value")
        entry = self._file_entry(params["input_file_id"])
        if entry["object"]["purpose"] != "batch":
            raise _APIError(400, f"The input file {params['input_file_id']} must be uploaded with "
                                 f"purpose 'batch', not {entry['object']['purpose']!r}.",
                            param="input_file_id", code="invalid_value")
        lines, errors = _validate_batch_input(entry["data"], endpoint)
        if self.batch_outcomes:
            outcome = self.batch_outcomes.popleft()
        else:
            outcome, roll = "completed", self._batch_rng.random()
            for name, rate in self.batch_outcome_rates.items():
                if roll < rate:
                    outcome = name
                    break
                roll -= rate
        if errors:
            outcome = "failed"
        now = int(time.time())
        model = lines[0]["body"].get("model") if lines else None
        obj = {"id": _new_id("batch_"), "object": "batch", "endpoint": endpoint, "model": model,
               "errors": None, "input_file_id": params["input_file_id"],
               "completion_window": window, "status": "validating", "output_file_id": None,
               "error_file_id": None, "created_at": now, "in_progress_at": None,
               "expires_at": now + 24 * 3600, "finalizing_at": None, "completed_at": None,
               "failed_at": None, "expired_at": None, "cancelling_at": None, "cancelled_at": None,
               "request_counts": {"total": 0, "completed": 0, "failed": 0}, "usage": None,
               "metadata": metadata}
        self._batches[obj["id"]] = _Batch(obj, len(self._batches), lines, errors, outcome,
                                          dict(record.headers))
        self.batch_counts["batches_created"] += 1
        self.batch_counts["batch_lines"] += len(lines)
        return 200, copy.deepcopy(obj)

    def _api_batch_get(self, record: ReceivedRequest, batch_id: str) -> tuple[int, Any]:
        batch = self._batch_entry(batch_id)
        batch.retrievals += 1
        self.batch_counts["retrievals"] += 1
        self._advance(batch)
        return 200, copy.deepcopy(batch.obj)

    def _api_batch_list(self, record: ReceivedRequest) -> tuple[int, Any]:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(record.path).query)
        try:
            limit = int((query.get("limit") or ["20"])[0])
        except ValueError:
            limit = 0
        if not 1 <= limit <= 100:
            raise _APIError(400, "Invalid 'limit': it must be an integer from 1 to 100.",
                            param="limit", code="invalid_value")
        self.batch_counts["lists"] += 1
        newest_first = sorted(self._batches.values(), key=lambda b: -b.seq)
        after = (query.get("after") or [None])[0]
        if after is not None:
            cursor = self._batches.get(after)
            newest_first = [b for b in newest_first if cursor is not None and b.seq < cursor.seq]
        page = [copy.deepcopy(b.obj) for b in newest_first[:limit]]
        return 200, {"object": "list", "data": page, "has_more": len(newest_first) > limit,
                     "first_id": page[0]["id"] if page else None,
                     "last_id": page[-1]["id"] if page else None}

    def _api_batch_cancel(self, record: ReceivedRequest, batch_id: str) -> tuple[int, Any]:
        batch = self._batch_entry(batch_id)
        self.batch_counts["cancels"] += 1
        status = batch.obj["status"]
        if status in _BATCH_FINAL:
            raise _APIError(409, f"Cannot cancel a batch with status '{status}'.")
        if status != "cancelling":
            batch.cancelled_from = status
            batch.obj.update(status="cancelling", cancelling_at=int(time.time()))
        return 200, copy.deepcopy(batch.obj)

    # -- the Batch API: progress (called under self._lock)
    def _advance(self, batch: _Batch) -> None:
        """One step: validating -> in_progress (-> finalizing) -> final at ``batch_polls``;
        a cancelling batch becomes cancelled."""
        obj = batch.obj
        if obj["status"] in _BATCH_FINAL:
            return
        if obj["status"] == "cancelling":
            self._finish(batch, "cancelled")
            return
        batch.steps += 1
        polls = max(1, int(self.batch_polls))
        if batch.steps >= polls:
            self._finish(batch, batch.outcome)
            return
        if batch.outcome == "failed":  # failing in validation: it stays there until then
            return
        now = int(time.time())
        if obj["status"] == "validating":
            obj.update(status="in_progress", in_progress_at=now)
            obj["request_counts"]["total"] = len(batch.lines)
        if batch.outcome == "completed" and polls >= 3 and batch.steps == polls - 1:
            obj.update(status="finalizing", finalizing_at=now)

    def _finish(self, batch: _Batch, status: str) -> None:
        obj, now = batch.obj, int(time.time())
        if status == "failed":
            errors = batch.errors or [{
                "code": "token_limit_exceeded", "param": None, "line": None,
                "message": f"Enqueued token limit reached for {obj['model'] or 'test-model'} in "
                           "organization org-test. Limit: 90,000 enqueued tokens. Please try "
                           "again once some in_progress batches have been completed."}]
            obj.update(status="failed", failed_at=now, errors={"object": "list", "data": errors})
            return
        total = len(batch.lines)
        if status == "completed":
            answered = total
        elif status == "expired" or batch.cancelled_from in ("in_progress", "finalizing"):
            answered = int(total * self.batch_partial_share)
        else:  # cancelled while validating: nothing ran
            answered = total = 0
        outputs: list[dict[str, Any]] = []
        failures: list[dict[str, Any]] = []
        tokens = [0, 0]
        for line in batch.lines[:answered]:
            ok, entry, usage = self._answer_line(batch, line)
            (outputs if ok else failures).append(entry)
            tokens[0] += usage[0]
            tokens[1] += usage[1]
        code, message = (("batch_expired", "This request could not be executed before the "
                                           "completion window expired.")
                         if status == "expired" else
                         ("batch_cancelled", "This request was not executed because the batch "
                                             "was cancelled."))
        for line in batch.lines[answered:total]:
            failures.append({"id": _new_id("batch_req_"), "custom_id": line["custom_id"],
                             "response": None, "error": {"code": code, "message": message}})
        if self.batch_shuffle:
            self._batch_rng.shuffle(outputs)
            self._batch_rng.shuffle(failures)
        for kind, entries in (("output", outputs), ("error", failures)):
            if entries:
                data = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries).encode("utf-8")
                file_obj = self._store_file(f"batch_{obj['id']}_{kind}.jsonl", data, "batch_output")
                obj[f"{kind}_file_id"] = file_obj["id"]
        obj["request_counts"] = {"total": total, "completed": len(outputs), "failed": len(failures)}
        obj["usage"] = {"input_tokens": tokens[0], "input_tokens_details": {"cached_tokens": 0},
                        "output_tokens": tokens[1], "output_tokens_details": {"reasoning_tokens": 0},
                        "total_tokens": tokens[0] + tokens[1]}
        if obj["in_progress_at"] is None and total:
            obj["in_progress_at"] = now
        if status == "completed" and obj["finalizing_at"] is None:
            obj["finalizing_at"] = now
        obj["status"] = status
        obj[f"{status}_at"] = now

    def _line_error(self, custom_id: str) -> Union[None, Reply, str]:
        """What ``batch_line_errors`` makes of a line: None, a non-200 Reply, or an error code."""
        spec = self.batch_line_errors
        if spec is None:
            return None
        if isinstance(spec, (int, float)) and not isinstance(spec, bool):
            return Reply.server_error() if self._batch_rng.random() < spec else None
        if isinstance(spec, Mapping):
            if custom_id not in spec:
                return None
            value = spec[custom_id]
            if isinstance(value, (Reply, str)) or hasattr(value, "status"):
                return value
            status = int(value)
            if status == 429:
                return Reply.rate_limited()
            if status == 400:
                return Reply.bad_request()
            return Reply.server_error(status) if status >= 500 else Reply(
                status=status, error={"message": f"error {status}", "type": "invalid_request_error",
                                      "code": None, "param": None})
        return Reply.server_error() if custom_id in spec else None

    def _answer_line(self, batch: _Batch,
                     line: dict[str, Any]) -> tuple[bool, dict[str, Any], tuple[int, int]]:
        """One batch line through the chat-completions logic: (succeeded, its output /
        error line, its (prompt, completion) tokens)."""
        custom_id = line["custom_id"]
        raw = json.dumps(line["body"], ensure_ascii=False).encode("utf-8")
        record = ReceivedRequest(len(self._batch_line_requests), "POST", line["url"],
                                 dict(batch.headers), raw, time.monotonic(),
                                 custom_id=custom_id, batch_id=batch.obj["id"])
        self._batch_line_requests.append(record)
        entry: dict[str, Any] = {"id": _new_id("batch_req_"), "custom_id": custom_id}
        usage = (0, 0)
        try:
            scripted = self._line_error(custom_id)
            if isinstance(scripted, str):
                entry.update(response=None, error={"code": scripted,
                                                   "message": f"The request failed ({scripted})."})
                record.status, kind = None, scripted
            else:
                reply = scripted if scripted is not None else self._rule_or_fault(record)
                if reply.drop or reply.raw_body is not None:  # nothing like that in a batch
                    reply = Reply.server_error()
                response: dict[str, Any] = {"status_code": reply.status,
                                            "request_id": "req_" + uuid.uuid4().hex}
                if reply.status == 200:
                    payload, kind = self._completion(record, reply)
                    payload["id"] = f"chatcmpl-batch-{record.index}"
                    usage = (payload["usage"]["prompt_tokens"], payload["usage"]["completion_tokens"])
                else:
                    payload = {"error": reply.error or {"message": "error"}}
                    kind = "5xx" if reply.status >= 500 else str(reply.status)
                response["body"] = payload
                entry.update(response=response, error=None)
                record.status = reply.status
            record.completed = True
        finally:
            record._parsed = None
            if not self.keep_bodies:
                record.raw_body = b""
        self.batch_line_kinds[kind] += 1
        self.batch_line_tokens["prompt"] += usage[0]
        self.batch_line_tokens["completion"] += usage[1]
        return record.status == 200, entry, usage


def free_port() -> int:
    """A port that was free a moment ago (for 'nothing listens here' tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------- subprocess mode
class ServerProcess:
    """The server in its own process (benchmarks): start, read ``/_stats``, stop."""

    def __init__(self, proc: subprocess.Popen, port: int):
        self.proc = proc
        self.port = port
        self.base_url = f"http://{HOST}:{port}/v1"

    @classmethod
    def start(cls, *, latency: float = 0.0, jitter: float = 0.0, rpm_cap: Optional[int] = None,
              fault_rates: Optional[dict[str, float]] = None, seed: int = 0,
              latency_range: Optional[tuple[float, float]] = None,
              retry_after: Optional[float] = None, responder: Optional[str] = None,
              responder_config: Optional[dict[str, Any]] = None, port: int = 0,
              keep_bodies: bool = True, startup_timeout: float = 60.0,
              batch_polls: int = 2, batch_outcomes: Optional[list[str]] = None,
              batch_outcome_rates: Optional[dict[str, float]] = None,
              batch_line_errors: Union[None, float, list[str], dict[str, Any]] = None,
              batch_partial_share: float = 0.5, batch_shuffle: bool = True) -> "ServerProcess":
        """``responder``: ``"module:callable"``, a factory called with ``responder_config``
        in the server process (the repository root is on its ``sys.path``). ``batch_*``: as
        for :class:`LLMTestServer` (``batch_line_errors``: a rate, a list of custom_ids, or
        ``{custom_id: status or error code}``)."""
        config = {"latency": latency, "jitter": jitter, "rpm_cap": rpm_cap,
                  "fault_rates": fault_rates or {}, "seed": seed, "latency_range": latency_range,
                  "retry_after": retry_after, "responder": responder,
                  "responder_config": responder_config or {}, "port": port,
                  "keep_bodies": keep_bodies, "batch_polls": batch_polls,
                  "batch_outcomes": list(batch_outcomes or []),
                  "batch_outcome_rates": batch_outcome_rates or {},
                  "batch_line_errors": (sorted(batch_line_errors)
                                        if isinstance(batch_line_errors, (set, frozenset))
                                        else batch_line_errors),
                  "batch_partial_share": batch_partial_share, "batch_shuffle": batch_shuffle}
        root = str(Path(__file__).resolve().parents[1])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [root] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), json.dumps(config)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        assert proc.stdout is not None
        line = _readline(proc, startup_timeout)
        if not line:
            proc.kill()
            proc.wait()
            raise RuntimeError("test server process did not start")
        return cls(proc, json.loads(line)["port"])

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://{HOST}:{self.port}/_stats", timeout=10) as resp:
            return json.loads(resp.read())

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()  # the server exits when its stdin closes
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _readline(proc: subprocess.Popen, timeout: float) -> str:
    """The child's first stdout line, or "" when it exits or stays silent for ``timeout``."""
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return lines[0] if lines else ""


def load_responder(spec: str, config: Optional[dict[str, Any]] = None) -> Any:
    """``"module:callable"`` called with ``config`` as keyword arguments."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"responder {spec!r} is not 'module:callable'")
    return getattr(importlib.import_module(module), name)(**(config or {}))


def server_from_config(config: dict[str, Any]) -> LLMTestServer:
    """An :class:`LLMTestServer` from the subprocess JSON config (absent keys: defaults)."""
    hooks: dict[str, Any] = {}
    if config.get("responder"):
        responder = load_responder(config["responder"], config.get("responder_config"))
        hooks = {"responder": responder, "usage": getattr(responder, "usage", None),
                 "label": getattr(responder, "label", None),
                 "extra_stats": getattr(responder, "stats", None)}
    latency_range = config.get("latency_range")
    return LLMTestServer(latency=config.get("latency", 0.0), jitter=config.get("jitter", 0.0),
                         keep_bodies=config.get("keep_bodies", True),
                         rpm_cap=config.get("rpm_cap"), fault_rates=config.get("fault_rates"),
                         seed=config.get("seed", 0), port=config.get("port", 0),
                         latency_range=tuple(latency_range) if latency_range else None,
                         retry_after=config.get("retry_after"),
                         batch_polls=config.get("batch_polls", 2),
                         batch_outcomes=config.get("batch_outcomes"),
                         batch_outcome_rates=config.get("batch_outcome_rates"),
                         batch_line_errors=config.get("batch_line_errors"),
                         batch_partial_share=config.get("batch_partial_share", 0.5),
                         batch_shuffle=config.get("batch_shuffle", True), **hooks)


async def _serve_until_stdin_closes(config: dict[str, Any]) -> None:
    server = server_from_config(config)
    loop = asyncio.get_running_loop()
    await server._open()
    print(json.dumps({"port": server.port}), flush=True)
    # Bounded lifetime: the parent holds our stdin; when it closes (or the parent dies) we go.
    await loop.run_in_executor(None, sys.stdin.read)
    await server._close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help='JSON: {"latency", "jitter", "rpm_cap", "fault_rates", "seed", '
                                       '"latency_range", "retry_after", "responder", '
                                       '"responder_config", "port", "keep_bodies", "batch_polls", '
                                       '"batch_outcomes", "batch_outcome_rates", '
                                       '"batch_line_errors", "batch_partial_share", '
                                       '"batch_shuffle"}')
    config = json.loads(parser.parse_args(argv).config)
    asyncio.run(_serve_until_stdin_closes(config))


if __name__ == "__main__":
    main()
