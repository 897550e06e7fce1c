"""A local OpenAI-compatible server that answers from an authored answers file.

Used by ``scripts/record_llm.py`` to (re-)record the quickstart's LLM responses through the
real client code: the stage runs online against this server, and the client caches what it
answers. Standard library only; bound to 127.0.0.1 on a free port; one thread per connection.

Answers file (YAML; ``data/samples/llm_answers/<stage>.<key>.yaml``)::

    # Answers written for this repository by hand (not model output)
    answers:
      <item_id>:            # the LLMRequest.item_id the stage uses
        - {relevant: true, reason: "…"}   # draw 0: the JSON object the response model validates
        - …                               # draw 1, 2, …

A draw is one (sample_index, re-ask index) pair of an item. The client names them in the
request headers ``X-Item-Id`` (percent-encoded), ``X-Sample-Index`` and ``X-Reask-Index``
(:func:`stages.common.llm.item_headers`); the server hands out the item's answers in the
order it first sees each pair (a transport retry of the same pair gets the same answer).
For the usual stage — one sample, valid answers — draw ``n`` is sample ``n``. A string
instead of an object is sent verbatim as the message content (to author an invalid answer
that the client must re-ask).

An item the file does not answer, or a draw beyond its list, gets HTTP 400 whose message
says so; the client turns that into a ``bad_request`` reject of the item, and the server
keeps the list in :attr:`ReplayServer.misses` for the recording tool to report.
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import yaml

HOST = "127.0.0.1"
HEADER_COMMENT = "# Answers written for this repository by hand (not model output)"
ITEM_HEADER, SAMPLE_HEADER, REASK_HEADER = "X-Item-Id", "X-Sample-Index", "X-Reask-Index"


class AnswersFileError(ValueError):
    """The answers file is missing, unparsable or not in the documented shape."""


def load_answers(path: str | Path) -> dict[str, list[Any]]:
    """``{item_id: [draw 0, draw 1, …]}`` from an answers file (validated shape); the marker
    comment must be within its first five lines."""
    path = Path(path)
    if not path.is_file():
        raise AnswersFileError(f"answers file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if not any(line.strip() == HEADER_COMMENT for line in text.splitlines()[:5]):
        raise AnswersFileError(f"{path}: the first lines must include the marker comment "
                               f"{HEADER_COMMENT!r} (authored answers are marked as such)")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise AnswersFileError(f"{path} is not valid YAML: {exc}") from exc
    answers = data.get("answers") if isinstance(data, dict) else None
    if not isinstance(answers, dict) or set(data) != {"answers"}:
        raise AnswersFileError(f"{path}: expected exactly one top-level key `answers: "
                               "{item_id: [answer, …]}`")
    out: dict[str, list[Any]] = {}
    for item_id, draws in answers.items():
        if not isinstance(draws, list) or not draws:
            raise AnswersFileError(f"{path}: answers[{item_id!r}] must be a non-empty list of draws")
        for n, draw in enumerate(draws):
            if not isinstance(draw, (dict, str)):
                raise AnswersFileError(f"{path}: answers[{item_id!r}][{n}] must be a JSON object "
                                       "(or a string sent verbatim)")
        out[str(item_id)] = draws
    return out


def _tokens(text: str) -> int:
    # A deterministic stand-in for the usage a real server reports (about one token per
    # Hangul syllable, four ASCII characters per token), so accounting shows plausible
    # numbers and the recorded entries are byte-stable.
    ascii_chars = len(text.encode("ascii", "ignore"))
    return max(1, (ascii_chars + 3) // 4 + (len(text) - ascii_chars))


@dataclass
class ReplayState:
    answers: dict[str, list[Any]]
    draws: dict[str, dict[tuple[int, int], int]] = field(default_factory=dict)
    misses: list[str] = field(default_factory=list)
    served: dict[str, int] = field(default_factory=dict)  # item -> draws served
    requests: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, item_id: str, sample: int, reask: int) -> tuple[Any | None, str]:
        with self.lock:
            self.requests += 1
            if item_id not in self.answers:
                self.misses.append(f"{item_id} (no answers)")
                return None, (f"replay: no authored answer for item {item_id!r} "
                              f"(sample {sample}, re-ask {reask}); add it to the answers file")
            seen = self.draws.setdefault(item_id, {})
            draw = seen.setdefault((sample, reask), len(seen))
            draws = self.answers[item_id]
            if draw >= len(draws):
                self.misses.append(f"{item_id} (draw {draw})")
                return None, (f"replay: item {item_id!r} has {len(draws)} authored answer(s) but "
                              f"draw {draw} (sample {sample}, re-ask {reask}) was asked")
            self.served[item_id] = max(self.served.get(item_id, 0), draw + 1)
            return draws[draw], ""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the SDK pools connections
    server: "ReplayServer"

    def log_message(self, *args: Any) -> None:  # quiet: the recording tool reports
        pass

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:  # noqa: N802 (http.server API)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        if not self.path.rstrip("/").endswith("/chat/completions"):
            self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found",
                                       "code": None, "param": None}})
            return
        try:
            body = json.loads(raw or b"{}")
            item_id = unquote(self.headers[ITEM_HEADER])
            sample = int(self.headers.get(SAMPLE_HEADER, "0"))
            reask = int(self.headers.get(REASK_HEADER, "0"))
        except (ValueError, TypeError):
            self._send(400, {"error": {"message": "replay: request without a JSON body or the "
                                                  f"{ITEM_HEADER} header", "type": "invalid_request_error",
                                       "code": None, "param": None}})
            return
        answer, problem = self.server.state.answer(item_id, sample, reask)
        if answer is None:
            self._send(400, {"error": {"message": problem, "type": "invalid_request_error",
                                       "code": "replay_missing_answer", "param": None}})
            return
        content = answer if isinstance(answer, str) else json.dumps(answer, ensure_ascii=False)
        prompt = "\n".join(str(m.get("content", "")) for m in body.get("messages") or [])
        self._send(200, {
            "id": "replay", "object": "chat.completion", "created": 0,
            "model": body.get("model", "replay"),
            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                         "message": {"role": "assistant", "content": content, "refusal": None}}],
            "usage": {"prompt_tokens": _tokens(prompt), "completion_tokens": _tokens(content),
                      "total_tokens": _tokens(prompt) + _tokens(content)},
        })


class ReplayServer(ThreadingHTTPServer):
    """``with ReplayServer(answers) as server: … server.base_url …``"""
    daemon_threads = True

    def __init__(self, answers: dict[str, list[Any]]):
        super().__init__((HOST, 0), _Handler)
        self.state = ReplayState(answers)
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.server_address[1]}/v1"

    @property
    def misses(self) -> list[str]:
        with self.state.lock:
            return list(self.state.misses)

    def unused(self) -> list[str]:
        """Items with authored draws that were never asked for (stale answers)."""
        with self.state.lock:
            return [item for item, draws in self.state.answers.items()
                    if self.state.served.get(item, 0) < len(draws)]

    def __enter__(self) -> "ReplayServer":
        self._thread = threading.Thread(target=self.serve_forever, name="replay-server", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()
        self.server_close()
