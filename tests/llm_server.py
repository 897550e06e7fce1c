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
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import importlib
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

HOST = "127.0.0.1"
_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
            404: "Not Found", 429: "Too Many Requests", 500: "Internal Server Error",
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
                 keep_bodies: bool = True):
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
        if self.extra_stats is not None:
            stats["responder"] = self.extra_stats()
        return stats

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
                    body = await reader.readexactly(length) if length else b""
                except (asyncio.IncompleteReadError, ConnectionError):
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
                     headers: dict[str, str], raw_body: Optional[bytes] = None) -> bool:
        data = raw_body if raw_body is not None else json.dumps(payload, ensure_ascii=False).encode("utf-8")
        head = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}",
                "content-type: application/json", f"content-length: {len(data)}"]
        head += [f"{name}: {value}" for name, value in headers.items()]
        try:
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + data)
            await writer.drain()
        except (ConnectionError, RuntimeError):
            return False
        return not writer.is_closing()


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
              keep_bodies: bool = True, startup_timeout: float = 60.0) -> "ServerProcess":
        """``responder``: ``"module:callable"``, a factory called with ``responder_config``
        in the server process (the repository root is on its ``sys.path``)."""
        config = {"latency": latency, "jitter": jitter, "rpm_cap": rpm_cap,
                  "fault_rates": fault_rates or {}, "seed": seed, "latency_range": latency_range,
                  "retry_after": retry_after, "responder": responder,
                  "responder_config": responder_config or {}, "port": port,
                  "keep_bodies": keep_bodies}
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
                         retry_after=config.get("retry_after"), **hooks)


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
                                       '"responder_config", "port", "keep_bodies"}')
    config = json.loads(parser.parse_args(argv).config)
    asyncio.run(_serve_until_stdin_closes(config))


if __name__ == "__main__":
    main()
