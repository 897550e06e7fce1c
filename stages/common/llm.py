"""The one LLM layer: every LLM call of every stage goes through :class:`LLMClient`.

Contract
--------
``await llm.complete(messages, ResponseModel, sample_index=0, item_id="q17")`` returns a
:class:`Result` and never raises for a bad *answer*:

- The request is a chat completion with structured outputs: ``response_format`` is the
  pydantic model's JSON schema made strict-compatible (``additionalProperties: false``,
  every property required) with ``"strict": true``; the answer is validated with the
  same pydantic model.
- An answer that is invalid JSON, violates the schema, is a refusal (``message.refusal``
  or ``finish_reason == "content_filter"``) or is truncated (``finish_reason ==
  "length"``) is re-asked; after ``max_invalid_attempts`` answers in total the item is
  returned *rejected* with ``error`` one of :data:`REJECT_REASONS` and a ``detail``. A
  rejected item is a reject with a reason, never a silent "no" (the original scripts
  counted an API error as "not relevant").
- Each re-ask is a new, deterministic draw: it uses the next re-ask index in the cache key
  and a seed derived from (seed, sample index, re-ask index), so a cached bad answer is
  never replayed as the re-ask, and a re-run replays exactly the same sequence.
- Transport errors (429, 408/409, 5xx, timeouts, dropped connections, malformed bodies)
  are retried in this one layer — the SDK's own retries are off — with jittered
  exponential backoff that honours ``retry-after-ms`` / ``Retry-After``, at most
  ``max_attempts`` HTTP attempts per answer; then the item is rejected with
  ``transport_error``. Other 4xx (400 context too long, 422, …) reject the item at once as
  ``bad_request``.
- Failures that would hit every call — 401 / 403, 404 (unknown model or endpoint), 429
  ``insufficient_quota``, no api key — raise :class:`FatalLLMError` (a ``StageError``)
  at once; the client refuses further calls and :meth:`LLMClient.run_many` cancels the
  outstanding ones.
- Every completed HTTP response is cached (:mod:`stages.common.llm_cache`) before it is
  used; cached answers cost nothing and make no call. Offline mode (``offline: true`` or
  ``LLM_OFFLINE=1``) answers from the cache only and raises
  :class:`~stages.common.llm_cache.CacheMissError` for what is missing (in a batch: after
  collecting every miss), without constructing an HTTP client.
- Money: with a cap (``max_usd``, or ``LLM_MAX_USD`` in the environment for every stage of a
  run), a request is sent only while what this run has spent, plus the worst case of the
  requests in flight, plus its own worst case (estimated prompt tokens at the input price +
  ``max_tokens`` at the output price) stays within the cap. The first request that would
  cross it stops the client issuing any more; the ones in flight finish and are cached; then
  :class:`BudgetExceededError` (a ``StageError``) names the cap, the spend and how to resume —
  a re-run with a higher cap pays only for what is not cached yet.
- At most ``concurrency`` requests are in flight; optional client-side ``rpm`` / ``tpm``
  token buckets pace requests (TPM charges an estimate up front and corrects it with the
  usage the server reports).
- Every request carries ``X-Item-Id`` / ``X-Sample-Index`` / ``X-Reask-Index`` headers
  (:func:`item_headers`): not part of the cache key; the replay server of
  ``scripts/record_llm.py`` answers authored responses by them.
- The api key comes from ``OPENAI_API_KEY`` only (never params, which are committed); the
  SDK sends it as the ``Authorization`` header and this module never logs, caches or
  writes it (error details are redacted before they are logged or returned).

Use one client per event loop: ``async with LLMClient(params) as llm: ...``, or
:func:`run_batch` from synchronous stage code. Tokens and cost are summed in
``llm.accounting`` (:class:`Accounting`; ``.as_metrics()`` for the stage's metrics JSON).
"""
from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import logging
import math
import os
import random
import re
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Awaitable, Callable, Literal, Mapping, Optional, Sequence, TypeVar
from urllib.parse import quote, urlsplit

import httpx2
import openai
# The SDK's own strict-schema conversion (what ``client.chat.completions.parse`` sends):
# one implementation of OpenAI's strict-mode rules, kept in step with the pinned SDK.
from openai.lib._pydantic import to_strict_json_schema
from openai.types.chat import ChatCompletion
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from stages.common.llm_batch import Batcher, BatchParams
from stages.common.llm_cache import (ENTRY_FORMAT, CacheEntry, CacheMissError, CachedResponse,
                                     RequestSummary, ResponseCache, cache_key)
from stages.common.llm_errors import API_KEY_ENV, FatalLLMError
from stages.common.llm_errors import redact as _redact
from stages.common.params import PARAMS_FILE, ParamsError, Strict, load_raw, lookup, read_section
from stages.common.runlog import StageError, progress
from stages.common.text import content_id

__all__ = [
    "Accounting", "BudgetExceededError", "CacheMissError", "FatalLLMError", "LLMClient", "LLMParams", "LLMRequest",
    "Prices", "RateLimiter", "REJECT_REASONS", "Result", "Usage", "derive_seed",
    "estimate_tokens", "evaluate_response", "is_offline", "item_headers", "response_format_for",
    "retry_after_seconds", "run_all", "run_batch",
]

OFFLINE_ENV = "LLM_OFFLINE"
BUDGET_ENV = "LLM_MAX_USD"
# Refused connections / failed name lookups, before any request reached the endpoint, that
# end the stage (a wrong base_url fails in seconds instead of max_attempts × items retries).
UNREACHABLE_LIMIT = 3
REJECT_REASONS = ("invalid_json", "schema_violation", "refusal", "truncated",
                  "transport_error", "bad_request")
# Internal marker of an offline miss; never reaches a caller (it becomes CacheMissError).
_CACHE_MISS = "cache_miss"
# Internal marker of a request not sent because it could cross the budget cap (it becomes
# BudgetExceededError once the requests in flight are done).
_OVER_BUDGET = "over_budget"
# Statuses worth retrying besides 5xx: rate limited, request timeout, conflict.
_RETRY_STATUSES = frozenset({408, 409, 429})
_SCHEMA_NAME = re.compile(r"[^a-zA-Z0-9_-]")
_FENCE = re.compile(r"^```[a-zA-Z]*\s*\n?(.*?)\n?```$", re.S)

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")


# ---------------------------------------------------------------------------- llm
# The ``llm`` block of every LLM stage's section: ``llm_defaults`` merged under the stage's own
# ``llm`` overrides (stages.common.params.read_section). The cache directory is not a param: it
# is the stage's DVC out, passed on its command line (``--cache-dir``).

class Prices(Strict):
    input_per_1m: float = Field(ge=0, description="USD per 1M prompt tokens")
    output_per_1m: float = Field(ge=0, description="USD per 1M completion tokens")
    batch_input_per_1m: Optional[float] = Field(None, ge=0, description=(
        "Batch API price per 1M prompt tokens; default half of input_per_1m (OpenAI's discount)"))
    batch_output_per_1m: Optional[float] = Field(None, ge=0, description=(
        "Batch API price per 1M completion tokens; default half of output_per_1m"))

    @property
    def batch_input(self) -> float:
        return self.input_per_1m / 2 if self.batch_input_per_1m is None else self.batch_input_per_1m

    @property
    def batch_output(self) -> float:
        return self.output_per_1m / 2 if self.batch_output_per_1m is None else self.batch_output_per_1m


class LLMParams(Strict):
    """``llm_defaults`` + a stage's ``llm`` overrides (``params.<stage>.<key>.llm``).

    Only model, messages, schema and the sampling fields change an answer (and the cache
    key); everything else is throughput, robustness or bookkeeping.
    """
    model: str = Field(min_length=1, description="model name as the endpoint knows it")
    base_url: Optional[str] = Field(
        None, description="OpenAI-compatible endpoint (vLLM, Ollama, Azure…); default: "
                          "OPENAI_BASE_URL, else api.openai.com")
    temperature: float = Field(ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(ge=1, le=1_000_000, description="completion token limit per answer")
    token_limit_field: Literal["max_tokens", "max_completion_tokens"] = Field(
        "max_tokens", description="request field carrying max_tokens (o-series models need "
                                  "max_completion_tokens; most self-hosted servers max_tokens)")
    seed: Optional[int] = Field(None, ge=0, description="base seed; re-asks and samples derive theirs")
    concurrency: int = Field(100, ge=1, le=1000, description="requests in flight at most")
    rpm: Optional[int] = Field(None, gt=0, description="client-side requests-per-minute cap")
    tpm: Optional[int] = Field(None, gt=0, description="client-side tokens-per-minute cap")
    max_attempts: int = Field(8, ge=1, le=50, description="HTTP attempts per answer (transport retries)")
    max_invalid_attempts: int = Field(
        3, ge=1, le=20, description="answers per item before an invalid/refused/truncated one is a reject")
    timeout_s: float = Field(120.0, gt=0, le=3600, description="per HTTP attempt")
    backoff_base_s: float = Field(1.0, gt=0, le=600)
    backoff_max_s: float = Field(60.0, gt=0, le=3600)
    prices: Prices
    offline: bool = Field(False, description="answer from the cache only (LLM_OFFLINE=1 also forces it)")
    mode: Literal["online", "batch"] = Field("online", description=(
        "online: one HTTP call per answer; batch: through the Batch API at its lower price "
        "(stages/common/llm_batch.py)"))
    batch: BatchParams = Field(default_factory=BatchParams)
    max_usd: Optional[float] = Field(None, gt=0, description=(
        f"spend cap of one stage run in USD (worst case of each request counted before it is "
        f"sent); {BUDGET_ENV} in the environment overrides it for every stage"))
    cache_dir: Optional[str] = Field(None, min_length=1, description=(
        "response cache directory (a DVC out): set by the stage from --cache-dir"))

    @model_validator(mode="after")
    def _backoff_order(self) -> "LLMParams":
        if self.backoff_base_s > self.backoff_max_s:
            raise ValueError(f"backoff_base_s {self.backoff_base_s} > backoff_max_s {self.backoff_max_s}")
        return self

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: Optional[str]) -> Optional[str]:
        if value is not None:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"base_url must be an http(s) URL, got {value!r}")
            if parts.username or parts.password:
                raise ValueError("base_url must not embed credentials (params are committed); "
                                 f"use {API_KEY_ENV}")
        return value


async def run_all(coroutines: Sequence[Awaitable[T]], desc: str) -> list[T]:
    """Run ``coroutines`` concurrently with a progress bar; results in input order. The first
    exception (or a cancellation) cancels every other one, waits for them, and is raised."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        for next_done in progress(asyncio.as_completed(tasks), desc=desc, total=len(tasks)):
            await next_done
    except BudgetExceededError as exc:
        # at the cap nothing new is sent, but the answers in flight are paid for: let them
        # arrive and be cached (each other task ends soon: its next request is refused); the
        # error's message and log line then count them
        await asyncio.gather(*tasks, return_exceptions=True)
        exc.settle()
        raise
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    return [task.result() for task in tasks]


def read_llm_section(declared: tuple[str, ...], model: type[M], key: str | None,
                     path: str | os.PathLike = PARAMS_FILE, cache_dir: str | None = None) -> M:
    """An LLM stage's params: ``declared[0]`` for ``key`` with ``declared[1]``
    (``llm_defaults``) merged under its ``llm``, and the response cache directory from the
    stage's command line. The directory is created: it is a DVC out, and must exist even when
    no request is made."""
    raw = load_raw(path)
    for where, block in ((f"{declared[0].format(key=key)}.llm",
                          (lookup(raw, declared[0].format(key=key)) or {}).get("llm")),
                         (declared[1], raw.get(declared[1]))):
        if isinstance(block, dict) and "cache_dir" in block:
            raise ParamsError(f"{where}.cache_dir: not a param; the response cache is the stage's "
                              "--cache-dir (its DVC out, in dvc.yaml)")
    params = read_section(declared, model, key, defaults=1, at="llm", raw=raw)
    if cache_dir is None:
        return params
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    return params.model_copy(update={"llm": params.llm.model_copy(update={"cache_dir": cache_dir})})


def is_offline(params: LLMParams) -> bool:
    return params.offline or os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


# ---------------------------------------------------------------------------- errors
class BudgetExceededError(StageError):
    """The next request could take the run's spend over its cap; nothing more was sent.

    Raised at the first refused request, while other answers may still be in flight (they are
    paid for, so they are awaited and cached). Its message is therefore composed when it is
    read, from the client's figures at that time — calls paid and dollars spent including the
    answers that landed after the refusal — and :meth:`settle` writes it to the stage's log
    once they have (``run_all`` and ``stage_main`` call it)."""

    def __init__(self, describe: Callable[[], str], log: Optional[logging.Logger] = None) -> None:
        super().__init__("stopped at the budget cap")
        self._describe, self._log, self._settled = describe, log, False

    def __str__(self) -> str:
        return self._describe()

    def settle(self) -> None:
        """Log the final message once (the requests in flight have landed)."""
        if not self._settled and self._log is not None:
            self._log.error("%s", self)
        self._settled = True


def _usd(amount: float) -> str:
    return f"${amount:.2f}" if amount >= 0.01 else f"${amount:.6f}".rstrip("0")


def budget_cap(params: LLMParams) -> tuple[Optional[float], str]:
    """(cap in USD or None, where it comes from): ``LLM_MAX_USD`` wins over ``llm.max_usd``."""
    raw = os.environ.get(BUDGET_ENV, "").strip()
    if not raw:
        return params.max_usd, "llm.max_usd"
    try:
        cap = float(raw)
    except ValueError:
        cap = -1.0
    if not math.isfinite(cap) or cap <= 0:
        raise StageError(f"{BUDGET_ENV}={raw!r}: expected a positive number of USD")
    return cap, BUDGET_ENV


def _endpoint(base_url: str | None) -> str:
    base = base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"
    parts = urlsplit(base)
    return f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}{parts.path}"


# ---------------------------------------------------------------------------- requests/results
@dataclass(frozen=True)
class LLMRequest:
    """One answer wanted: ``messages`` answered as ``response_model``.

    ``item_id`` names the item in rejects, logs and cache-miss lists (default: a hash of
    the messages); ``sample_index`` asks for an independent draw of the same prompt.
    """
    messages: Sequence[Mapping[str, Any]]
    response_model: type[BaseModel]
    item_id: Optional[str] = None
    sample_index: int = 0


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def __add__(self, other: "Usage") -> "Usage":
        return Usage(self.prompt_tokens + other.prompt_tokens,
                     self.completion_tokens + other.completion_tokens)


@dataclass(frozen=True)
class Result:
    """The outcome for one request.

    ``parsed`` is the validated model instance, or ``None`` when rejected — then ``error``
    is one of :data:`REJECT_REASONS` and ``detail`` says why. ``raw`` / ``finish_reason``
    are from the last answer received (``None`` if none). ``usage`` sums every answer of
    this item (cached or not: what the item costs from scratch). ``cached`` is true when
    no HTTP call was made for it in this run. ``attempts`` counts answers evaluated (1 =
    first answer valid); ``retries`` counts transport retries.
    """
    item_id: str
    sample_index: int
    parsed: Optional[BaseModel]
    raw: Optional[str]
    finish_reason: Optional[str]
    usage: Usage
    cached: bool
    attempts: int
    retries: int = 0
    error: Optional[str] = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.parsed is not None


@dataclass
class Accounting:
    """Tokens, cost and outcomes of one client (one stage run).

    Paid figures (``calls``, ``prompt_tokens``, ``completion_tokens``, ``cost_usd``) count
    HTTP responses received in this run; answers served from the cache are counted apart
    (``cache_hits``, ``cached_*_tokens``, ``cost_saved_usd``).
    """
    prices: Prices
    items: int = 0
    items_ok: int = 0
    calls: int = 0
    cache_hits: int = 0
    transport_retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    cached_completion_tokens: int = 0
    batch_calls: int = 0           # of ``calls``: answered through the Batch API
    batch_prompt_tokens: int = 0   # of the paid tokens: at the batch prices
    batch_completion_tokens: int = 0
    saved_usd: float = 0.0         # what the cached answers cost when they were paid
    rejects: Counter = field(default_factory=Counter)

    def price(self, prompt: int, completion: int) -> float:
        """USD for ``prompt`` + ``completion`` tokens at this stage's prices."""
        return (prompt * self.prices.input_per_1m + completion * self.prices.output_per_1m) / 1e6

    def price_of(self, response: CachedResponse) -> float:
        """What ``response`` costs: online prices, or the batch prices for a batch answer."""
        if response.batch:
            return (response.prompt_tokens * self.prices.batch_input
                    + response.completion_tokens * self.prices.batch_output) / 1e6
        return self.price(response.prompt_tokens, response.completion_tokens)

    @property
    def cost_usd(self) -> float:
        online = self.price(self.prompt_tokens - self.batch_prompt_tokens,
                            self.completion_tokens - self.batch_completion_tokens)
        return online + (self.batch_prompt_tokens * self.prices.batch_input
                         + self.batch_completion_tokens * self.prices.batch_output) / 1e6

    @property
    def cost_saved_usd(self) -> float:
        return self.saved_usd

    def add_response(self, response: CachedResponse, *, from_cache: bool) -> None:
        if from_cache:
            self.cache_hits += 1
            self.cached_prompt_tokens += response.prompt_tokens
            self.cached_completion_tokens += response.completion_tokens
            self.saved_usd += self.price_of(response)
        else:
            self.calls += 1
            self.prompt_tokens += response.prompt_tokens
            self.completion_tokens += response.completion_tokens
            if response.batch:
                self.batch_calls += 1
                self.batch_prompt_tokens += response.prompt_tokens
                self.batch_completion_tokens += response.completion_tokens

    def add_result(self, result: Result) -> None:
        self.items += 1
        if result.ok:
            self.items_ok += 1
        else:
            self.rejects[result.error or "unknown"] += 1

    def as_metrics(self) -> dict[str, Any]:
        """Flat, JSON-ready figures for a stage's metrics file (nest them under ``llm``)."""
        return {
            "items": self.items, "items_ok": self.items_ok,
            "rejects": {reason: self.rejects[reason] for reason in sorted(self.rejects)},
            "calls": self.calls, "cache_hits": self.cache_hits,
            "transport_retries": self.transport_retries,
            "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
            "cost_usd": round(self.cost_usd, 6),
            "cached_prompt_tokens": self.cached_prompt_tokens,
            "cached_completion_tokens": self.cached_completion_tokens,
            "cost_saved_usd": round(self.cost_saved_usd, 6),
            **({"batch_calls": self.batch_calls} if self.batch_calls else {}),
        }


# ---------------------------------------------------------------------------- pure helpers
def response_format_for(model: type[BaseModel]) -> dict[str, Any]:
    """The ``response_format`` sent for ``model``: a strict JSON-schema block."""
    name = _SCHEMA_NAME.sub("_", model.__name__)[:64] or "response"
    return {"type": "json_schema",
            "json_schema": {"name": name, "schema": to_strict_json_schema(model), "strict": True}}


def derive_seed(seed: Optional[int], sample_index: int, reask_index: int) -> Optional[int]:
    """The seed sent for one draw. The first draw uses ``seed`` as configured (``None``:
    no seed); every other (sample, re-ask) gets its own stable seed so that it is a new
    draw even at temperature 0 — otherwise a re-ask would return the same bad answer."""
    if sample_index == 0 and reask_index == 0:
        return seed
    digest = hashlib.sha256(f"{seed or 0}/{sample_index}/{reask_index}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def estimate_tokens(messages: Sequence[Mapping[str, Any]], max_tokens: int) -> int:
    """Upper-leaning estimate of the tokens a request is charged for rate limiting.

    ASCII at three characters per token (English averages about four) and one token per
    other character (a Hangul syllable is one to two tokens in GPT tokenizers); being high
    only delays requests until the usage the server reports corrects the bucket.
    """
    ascii_chars = other_chars = 0
    for message in messages:
        text = str(message.get("content") or "")
        ascii_count = len(text.encode("ascii", "ignore"))  # C speed; prompts can be long
        ascii_chars += ascii_count
        other_chars += len(text) - ascii_count
    return math.ceil(ascii_chars / 3) + other_chars + 4 * len(messages) + max_tokens


def retry_after_seconds(headers: Mapping[str, str] | None) -> Optional[float]:
    """Seconds the server asked us to wait (``retry-after-ms``, ``Retry-After`` as seconds
    or HTTP date); ``None`` when absent or unparsable."""
    if not headers:
        return None
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            return max(0.0, float(value) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


ITEM_HEADER = "X-Item-Id"
SAMPLE_HEADER = "X-Sample-Index"
REASK_HEADER = "X-Reask-Index"


def item_headers(item_id: str, sample_index: int, reask_index: int) -> dict[str, str]:
    """Request headers naming the item and draw (item id percent-encoded: headers are ASCII).

    Sent with every request, never part of the cache key; a replay server
    (``scripts/replay_server.py``) answers by them."""
    return {ITEM_HEADER: quote(item_id, safe=""), SAMPLE_HEADER: str(int(sample_index)),
            REASK_HEADER: str(int(reask_index))}


def _strip_fence(text: str) -> str:
    # Self-hosted servers without constrained decoding sometimes wrap JSON in ```json fences.
    match = _FENCE.match(text.strip())
    return match.group(1) if match else text


def evaluate_response(response: CachedResponse, model: type[BaseModel]
                      ) -> tuple[Optional[BaseModel], Optional[str], str]:
    """``(parsed, None, "")`` for a valid answer, else ``(None, reason, detail)``."""
    if response.refusal:
        return None, "refusal", response.refusal[:300]
    if response.finish_reason == "content_filter":
        return None, "refusal", "finish_reason=content_filter"
    if response.finish_reason == "length":
        return None, "truncated", f"finish_reason=length after {response.completion_tokens} tokens"
    text = response.content
    if text is None or not text.strip():
        return None, "invalid_json", "empty content"
    try:
        return model.model_validate_json(_strip_fence(text)), None, ""
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        if any(e["type"] == "json_invalid" for e in errors):
            return None, "invalid_json", errors[0]["msg"][:300]
        detail = "; ".join(f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}"
                           for e in errors[:5])
        return None, "schema_violation", detail[:500]


# ---------------------------------------------------------------------------- rate limiting
class RateLimiter:
    """Token bucket refilled at ``per_minute / 60`` per second, holding one second's worth.

    A one-second burst (not a minute's) keeps the rate smooth: providers enforce limits
    on short windows too, and a full minute's burst would trip them. A request larger
    than the bucket waits for a full bucket and then goes into debt, so big requests are
    neither starved nor allowed to exceed the long-run rate. Waiters are served FIFO.
    """

    def __init__(self, per_minute: float, *, burst_seconds: float = 1.0):
        if per_minute <= 0:
            raise ValueError("per_minute must be positive")
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate * burst_seconds)
        self._tokens = self.capacity
        self._stamp = time.monotonic()
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = time.monotonic()
        self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    async def acquire(self, amount: float = 1.0) -> None:
        async with self._lock:
            need = min(amount, self.capacity)
            while True:
                self._refill()
                if self._tokens >= need:
                    self._tokens -= amount
                    return
                await asyncio.sleep((need - self._tokens) / self.rate)

    def credit(self, amount: float) -> None:
        """Give back (positive) or charge more (negative) once the true cost is known."""
        self._refill()
        self._tokens = min(self.capacity, self._tokens + amount)

    @property
    def available(self) -> float:
        """Tokens in the bucket now (negative while in debt)."""
        self._refill()
        return self._tokens


# ---------------------------------------------------------------------------- the client
@dataclass
class _Failure:
    kind: Literal["retry", "reject", "fatal", "unreachable"]
    detail: str
    retry_after: Optional[float] = None


@dataclass
class _Fetched:
    response: Optional[CachedResponse]
    from_cache: bool = False
    retries: int = 0
    reason: Optional[str] = None
    detail: str = ""


class LLMClient:
    """See the module docstring for the contract. Not thread-safe; one event loop."""

    def __init__(self, params: LLMParams, *, logger: logging.Logger | None = None,
                 cache: ResponseCache | None = None):
        self.params = params
        self.log = logger or log
        if cache is None and not params.cache_dir:
            raise StageError("LLM client needs a cache directory (the stage's --cache-dir)")
        self.cache = cache or ResponseCache(params.cache_dir, self.log)
        self.accounting = Accounting(params.prices)
        self.offline = is_offline(params)
        self._api_client: openai.AsyncOpenAI | None = None
        self._semaphore = asyncio.Semaphore(params.concurrency)
        self._rpm = RateLimiter(params.rpm) if params.rpm else None
        self._tpm = RateLimiter(params.tpm) if params.tpm else None
        self._fatal: FatalLLMError | None = None
        self._cap, self._cap_source = budget_cap(params)
        self._spent = self._reserved = 0.0  # paid in this run; worst case of those in flight
        self._paid = 0                       # answers paid for in this run
        self._over_cap, self._not_sent = False, 0
        self._batcher = (Batcher(self, params.batch, self.cache.root / "batches")
                         if params.mode == "batch" and not self.offline else None)
        # Whether any request has reached the endpoint (any HTTP response). Until one has, a
        # refused connection or a failed name lookup is not a transient drop: the endpoint is
        # wrong or down, and UNREACHABLE_LIMIT of them end the stage at once.
        self._reached = False
        self._unreachable = 0
        # One lock per key being fetched: identical concurrent requests make one call and
        # the others read its cache entry.
        self._key_locks: dict[str, asyncio.Lock] = {}
        self._key_users: Counter = Counter()
        self._formats: dict[type[BaseModel], dict[str, Any]] = {}
        self._jitter = random.Random()  # timing only; never affects an answer

    # -- lifecycle
    async def __aenter__(self) -> "LLMClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._api_client is not None:
            await self._api_client.close()
            self._api_client = None

    def _api(self) -> openai.AsyncOpenAI:
        if self._api_client is None:
            if not os.environ.get(API_KEY_ENV):
                self._fatal = FatalLLMError(
                    f"{API_KEY_ENV} is not set; export it (for a local server without auth any "
                    f"placeholder works) or run offline from the cache ({OFFLINE_ENV}=1)")
                raise self._fatal
            # api_key from the environment by the SDK; base_url None -> OPENAI_BASE_URL.
            self._api_client = openai.AsyncOpenAI(base_url=self.params.base_url, max_retries=0,
                                                  timeout=self.params.timeout_s,
                                                  http_client=self._http_client())
        return self._api_client

    def _http_client(self) -> httpx2.AsyncClient:
        concurrency = self.params.concurrency
        limits = httpx2.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency)
        try:
            # The SDK's aiohttp transport: about half the client CPU per request of httpx's
            # pool at 100 concurrent requests (bench/llm_throughput.py), which matters on
            # small machines where the client would otherwise be CPU-bound.
            return openai.DefaultAioHttpClient(limits=limits, timeout=self.params.timeout_s)
        except RuntimeError:  # aiohttp not installed
            return openai.DefaultAsyncHttpxClient(limits=limits, timeout=self.params.timeout_s)

    def _format(self, model: type[BaseModel]) -> dict[str, Any]:
        fmt = self._formats.get(model)
        if fmt is None:
            fmt = self._formats[model] = response_format_for(model)
        return fmt

    def _raise_if_fatal(self) -> None:
        if self._fatal is not None:
            raise self._fatal

    # -- public API
    async def complete(self, messages: Sequence[Mapping[str, Any]], response_model: type[BaseModel],
                       *, sample_index: int = 0, item_id: Optional[str] = None) -> Result:
        """One answer (see module contract). Raises only FatalLLMError / CacheMissError."""
        result = await self._complete(LLMRequest(messages, response_model, item_id, sample_index))
        if result.error == _CACHE_MISS:
            raise CacheMissError([result.item_id], self.cache.root)
        if result.error == _OVER_BUDGET:
            raise self.budget_error("llm")
        return result

    async def run_many(self, requests: Sequence[LLMRequest], *, desc: str = "llm") -> list[Result]:
        """Answer all ``requests`` concurrently (bounded), results in input order.

        A fatal error cancels every outstanding request and is raised. In offline mode every
        miss of the batch is collected first, then one CacheMissError lists them. At the
        budget cap the requests in flight finish (and are cached), then BudgetExceededError.
        """
        results = await run_all([self._complete(request) for request in requests], desc)
        missing = [r.item_id for r in results if r.error == _CACHE_MISS]
        if missing:
            raise CacheMissError(missing, self.cache.root)
        if any(r.error == _OVER_BUDGET for r in results):
            error = self.budget_error(desc)
            error.settle()   # every request of the batch has ended
            raise error
        return results

    # -- one item: the re-ask loop over cached or fetched answers
    async def _complete(self, request: LLMRequest) -> Result:
        self._raise_if_fatal()
        p = self.params
        fmt = self._format(request.response_model)
        messages = [dict(m) for m in request.messages]
        item_id = request.item_id or content_id(messages, request.sample_index)
        usage, network, retries = Usage(), False, 0
        response: Optional[CachedResponse] = None
        reason, detail = None, ""
        for reask in range(p.max_invalid_attempts):
            key = cache_key(model=p.model, messages=messages, json_schema=fmt["json_schema"],
                            temperature=p.temperature, top_p=p.top_p, max_tokens=p.max_tokens,
                            seed=p.seed, sample_index=request.sample_index, reask_index=reask)
            entry = self.cache.get(key)
            if entry is not None:
                response, from_cache = entry.response, True
            elif self.offline:
                return Result(item_id, request.sample_index, None, None, None, usage, True,
                              reask, retries, _CACHE_MISS, f"no cache entry {key}")
            else:
                fetched = await self._fetch(key, messages, fmt, request, reask, item_id)
                retries += fetched.retries
                if fetched.reason == _OVER_BUDGET:  # not sent: no reject, no log line each
                    return Result(item_id, request.sample_index, None, None, None, usage, False,
                                  reask, retries, _OVER_BUDGET, "over the budget cap")
                if fetched.response is None:
                    result = Result(item_id, request.sample_index, None,
                                    response.content if response else None,
                                    response.finish_reason if response else None,
                                    usage, False, reask, retries, fetched.reason, fetched.detail)
                    self.log.warning("LLM item %s rejected: %s (%s)", item_id, fetched.reason,
                                     fetched.detail)
                    self.accounting.add_result(result)
                    return result
                response, from_cache = fetched.response, fetched.from_cache
            network = network or not from_cache
            self.accounting.add_response(response, from_cache=from_cache)
            usage = usage + Usage(response.prompt_tokens, response.completion_tokens)
            parsed, reason, detail = evaluate_response(response, request.response_model)
            if parsed is not None:
                result = Result(item_id, request.sample_index, parsed, response.content,
                                response.finish_reason, usage, not network, reask + 1, retries)
                self.accounting.add_result(result)
                return result
            self.log.info("LLM item %s answer %d/%d is %s (%s)", item_id, reask + 1,
                          p.max_invalid_attempts, reason, _redact(detail))
        assert response is not None and reason is not None
        result = Result(item_id, request.sample_index, None, response.content,
                        response.finish_reason, usage, not network, p.max_invalid_attempts,
                        retries, reason, _redact(detail))
        self.log.warning("LLM item %s rejected after %d answers: %s (%s)", item_id,
                         p.max_invalid_attempts, reason, result.detail)
        self.accounting.add_result(result)
        return result

    async def _fetch(self, key: str, messages: list[dict[str, Any]], fmt: dict[str, Any],
                     request: LLMRequest, reask: int, item_id: str) -> _Fetched:
        """Get the answer for ``key`` over HTTP and cache it before returning it."""
        lock = self._key_locks.setdefault(key, asyncio.Lock())
        self._key_users[key] += 1
        try:
            async with lock:
                entry = self.cache.get(key)  # an identical request may have just written it
                if entry is not None:
                    return _Fetched(entry.response, from_cache=True)
                seed = derive_seed(self.params.seed, request.sample_index, reask)
                p = self.params
                summary = RequestSummary(
                    model=p.model, schema_name=fmt["json_schema"]["name"],
                    temperature=p.temperature, top_p=p.top_p, max_tokens=p.max_tokens,
                    seed=seed, sample_index=request.sample_index, reask_index=reask)
                if self._batcher is not None:
                    fetched = await self._fetch_batch(key, messages, fmt, seed, summary)
                    if fetched is not None:
                        return fetched  # the batcher filed it in the cache
                fetched = await self._call(messages, fmt, seed, item_id,
                                           request.sample_index, reask)
                if fetched.response is not None:
                    entry = CacheEntry(format=ENTRY_FORMAT, response=fetched.response, request=summary)
                    try:
                        # In a thread: the fsync must not stall the event loop.
                        await asyncio.to_thread(self.cache.put, key, entry)
                    except OSError as exc:
                        raise StageError(f"cannot write LLM cache entry under {self.cache.root}: "
                                         f"{exc}") from exc
                return fetched
        finally:
            self._key_users[key] -= 1
            if not self._key_users[key]:
                del self._key_users[key]
                self._key_locks.pop(key, None)

    async def _fetch_batch(self, key: str, messages: list[dict[str, Any]], fmt: dict[str, Any],
                           seed: Optional[int], summary: RequestSummary) -> Optional[_Fetched]:
        """Batch mode: the answer through the Batch API (None: send it online after all)."""
        worst = self._worst_cost(messages, fmt, batch=True) if self._cap is not None else 0.0
        if not self._within_budget(worst):
            return _Fetched(None, reason=_OVER_BUDGET)
        self._reserved += worst
        try:
            outcome = await self._batcher.fetch(key, self._body(messages, fmt, seed), summary)
        finally:
            self._reserved -= worst
        if outcome.online:
            self.log.info("LLM item %s: %s; asking online", key[:16], outcome.detail)
            return None
        if outcome.response is None:
            return _Fetched(None, reason=outcome.reason, detail=outcome.detail)
        self._spent += self.accounting.price_of(outcome.response)
        self._paid += 1
        return _Fetched(outcome.response)

    def _body(self, messages: list[dict[str, Any]], fmt: dict[str, Any],
              seed: Optional[int]) -> dict[str, Any]:
        """The chat completion request, online or as a batch line."""
        p = self.params
        body: dict[str, Any] = {"model": p.model, "messages": messages, "response_format": fmt,
                                "temperature": p.temperature, "top_p": p.top_p,
                                p.token_limit_field: p.max_tokens}
        if seed is not None:
            body["seed"] = seed
        return body

    # -- one answer over HTTP: the single retry layer
    async def _call(self, messages: list[dict[str, Any]], fmt: dict[str, Any],
                    seed: Optional[int], item_id: str, sample_index: int = 0,
                    reask: int = 0) -> _Fetched:
        p = self.params
        # Which item and draw this is, for a replay server answering from an authored
        # answers file (scripts/record_llm.py) and for server-side logs. Headers are not
        # part of the cache key: they never change the answer of a real model.
        options = {"headers": item_headers(item_id, sample_index, reask)}
        body = self._body(messages, fmt, seed)
        estimate = estimate_tokens(messages, p.max_tokens) if self._tpm else 0
        worst = self._worst_cost(messages, fmt) if self._cap is not None else 0.0
        for attempt in range(1, p.max_attempts + 1):
            self._raise_if_fatal()
            async with self._semaphore:
                # Re-check: a fatal error may have arrived while this task queued.
                self._raise_if_fatal()
                if not self._within_budget(worst):
                    return _Fetched(None, retries=attempt - 1, reason=_OVER_BUDGET)
                outcome = await self._attempt(body, options, estimate, worst)
            if isinstance(outcome, CachedResponse):
                return _Fetched(outcome, retries=attempt - 1)
            failure = outcome
            if failure.kind == "fatal":
                raise self._fatal  # type: ignore[misc]
            if failure.kind == "reject":
                return _Fetched(None, retries=attempt - 1, reason="bad_request", detail=failure.detail)
            if attempt == p.max_attempts:
                return _Fetched(None, retries=attempt - 1, reason="transport_error",
                                detail=f"{failure.detail} (gave up after {attempt} attempts)")
            delay = self._backoff(attempt, failure.retry_after)
            self.accounting.transport_retries += 1
            self.log.info("LLM item %s: %s; retry %d/%d in %.2fs", item_id, failure.detail,
                          attempt, p.max_attempts - 1, delay)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def _attempt(self, body: dict[str, Any], options: dict[str, Any], estimate: int,
                       worst: float) -> "CachedResponse | _Failure":
        """One HTTP attempt (inside the concurrency slot): the answer, or why it failed."""
        if self._rpm:
            await self._rpm.acquire(1)
        if self._tpm:
            await self._tpm.acquire(estimate)
        self._reserved += worst
        try:
            # The SDK's documented raw-request path: the body is plain JSON already, and
            # chat.completions.create() would spend ~40% of the client's CPU re-walking it
            # (schema included) against its TypedDicts.
            completion = await self._api().post("/chat/completions", body=body,
                                                cast_to=ChatCompletion, options=options)
        except openai.APIError as exc:
            if self._tpm:
                self._tpm.credit(estimate)  # a failed request is not charged tokens
            self._reached |= isinstance(exc, openai.APIStatusError)
            failure = self._unreachable_or(self._classify(exc))
            if failure.kind == "fatal":
                self._fatal = FatalLLMError(failure.detail)
            return failure
        except ValueError as exc:  # a 200 whose body is not JSON (JSONDecodeError)
            return _Failure("retry", f"malformed response body ({type(exc).__name__})")
        finally:
            self._reserved -= worst
        self._reached = True
        response = self._to_cached(completion)
        if response is None:
            return _Failure("retry", "malformed response (no chat completion choices)")
        self._spent += self.accounting.price(response.prompt_tokens, response.completion_tokens)
        self._paid += 1
        if self._tpm:
            self._tpm.credit(estimate - response.prompt_tokens - response.completion_tokens)
        return response

    def _worst_cost(self, messages: Sequence[Mapping[str, Any]], fmt: Mapping[str, Any],
                    batch: bool = False) -> float:
        """What one answer can cost at most: the prompt (estimated high) with the JSON schema
        it carries (billed as prompt tokens), and all of max_tokens; at the batch prices for a
        batch line."""
        prompt = estimate_tokens(messages, 0) + math.ceil(len(json.dumps(fmt)) / 3)
        if batch:
            prices = self.params.prices
            return (prompt * prices.batch_input + self.params.max_tokens * prices.batch_output) / 1e6
        return self.accounting.price(prompt, self.params.max_tokens)

    def _within_budget(self, worst: float) -> bool:
        """Whether a request of worst case ``worst`` may be sent; the first that may not stops
        every later one (the run ends at the cap instead of trickling on with small ones)."""
        if self._cap is None:
            return True
        if not self._over_cap and self._spent + self._reserved + worst <= self._cap:
            return True
        self._over_cap = True
        self._not_sent += 1
        return False

    def budget_error(self, desc: str) -> BudgetExceededError:
        return BudgetExceededError(lambda: self._budget_message(desc), self.log)

    def _budget_message(self, desc: str) -> str:
        """The cap's message from the figures as they are now (see BudgetExceededError)."""
        stage = self.log.name if "@" in self.log.name or desc == "llm" else desc
        batch = " (Batch API lines, at batch prices)" if self.params.mode == "batch" else ""
        return (f"{stage}: stopped at the budget cap {_usd(self._cap)} ({self._cap_source}): "
                f"paid {self._paid} calls{batch}, ${self._spent:.4f}, in this run (the answers "
                f"in flight at the stop included); {self._not_sent} requests not sent, as the next "
                "could cross the cap. Every paid answer is cached: re-run with a higher cap to "
                f"continue without paying for them again, e.g. `{BUDGET_ENV}="
                f"{max(2 * (self._cap or 0), self._spent + 1):.2f} dvc repro {stage}` (or raise "
                "llm.max_usd).")

    def _unreachable_or(self, failure: _Failure) -> _Failure:
        """A refused connection / failed lookup: fatal once UNREACHABLE_LIMIT of them arrive
        before any request reached the endpoint; after that, a drop like any other (retry)."""
        if failure.kind != "unreachable":
            return failure
        if self._reached:
            return _Failure("retry", failure.detail)
        self._unreachable += 1
        if self._unreachable < UNREACHABLE_LIMIT:
            return _Failure("retry", failure.detail)
        return _Failure("fatal", f"LLM endpoint {_endpoint(self.params.base_url)} is unreachable: "
                                 f"{failure.detail}; no request has reached it. Check llm.base_url / "
                                 "OPENAI_BASE_URL and the network.")

    def _backoff(self, attempt: int, retry_after: Optional[float]) -> float:
        if retry_after is not None:
            # The server said when; a little jitter on top keeps a crowd of waiters from
            # coming back in the same instant.
            return retry_after + self._jitter.uniform(0, min(1.0, 0.1 * retry_after + 0.05))
        ceiling = min(self.params.backoff_max_s, self.params.backoff_base_s * 2 ** (attempt - 1))
        # "Equal jitter": at least half the exponential delay, never more than all of it.
        return ceiling * (0.5 + 0.5 * self._jitter.random())

    def _classify(self, exc: openai.APIError) -> _Failure:
        where = _endpoint(self.params.base_url)
        if isinstance(exc, openai.APIConnectionError):  # includes APITimeoutError
            # Name the root cause: transports re-wrap errors (aiohttp's "server
            # disconnected" reaches the SDK as a ConnectTimeout).
            root: BaseException = exc
            while root.__cause__ is not None:
                root = root.__cause__
            name = type(root).__name__
            what = "timeout" if "Timeout" in name or isinstance(root, TimeoutError) else "connection error"
            kind = "unreachable" if isinstance(root, (ConnectionRefusedError, socket.gaierror)) else "retry"
            return _Failure(kind, _redact(f"{what} ({name}: {root})"[:300]))
        if not isinstance(exc, openai.APIStatusError):  # e.g. a 200 whose body is not JSON
            return _Failure("retry", _redact(f"{type(exc).__name__}: {exc.message}"[:300]))
        status = exc.status_code
        message = _redact(str(exc.message))[:300]
        code = exc.code or getattr(exc, "type", None)
        if isinstance(exc, (openai.AuthenticationError, openai.PermissionDeniedError)):
            return _Failure("fatal", f"LLM endpoint {where} refused the credentials (HTTP {status}: "
                                     f"{message}). Check {API_KEY_ENV} and the base URL.")
        if status == 429 and code == "insufficient_quota":
            return _Failure("fatal", f"LLM account at {where} has no quota left (HTTP 429 "
                                     f"insufficient_quota: {message}). Add credits or use another "
                                     "key; retrying cannot help.")
        if isinstance(exc, openai.NotFoundError):
            return _Failure("fatal", f"LLM endpoint {where} answered 404 for model "
                                     f"{self.params.model!r} ({message}). Check model and base URL.")
        if status in _RETRY_STATUSES or status >= 500:
            return _Failure("retry", f"HTTP {status}: {message}",
                            retry_after_seconds(exc.response.headers))
        return _Failure("reject", f"HTTP {status}: {message}")

    @staticmethod
    def _to_cached(completion: Any) -> Optional[CachedResponse]:
        """The parts of a completion we keep; None when it is not a usable completion (the
        SDK builds models without validation, and returns plain text for non-JSON bodies)."""
        choices = getattr(completion, "choices", None)
        message = getattr(choices[0], "message", None) if choices else None
        if not isinstance(completion, ChatCompletion) or message is None:
            return None
        usage = getattr(completion, "usage", None)
        try:
            return CachedResponse(
                content=getattr(message, "content", None), refusal=getattr(message, "refusal", None),
                finish_reason=getattr(choices[0], "finish_reason", None),
                prompt_tokens=getattr(usage, "prompt_tokens", None) or 0,
                completion_tokens=getattr(usage, "completion_tokens", None) or 0,
                served_model=getattr(completion, "model", None))
        except ValidationError:  # e.g. content that is not a string
            return None


def run_batch(params: LLMParams, requests: Sequence[LLMRequest], *,
              logger: logging.Logger | None = None, desc: str = "llm"
              ) -> tuple[list[Result], Accounting]:
    """Synchronous entry point for stage code: answer ``requests`` with a fresh client."""
    async def main() -> tuple[list[Result], Accounting]:
        async with LLMClient(params, logger=logger) as llm:
            return await llm.run_many(requests, desc=desc), llm.accounting
    return asyncio.run(main())
