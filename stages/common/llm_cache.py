"""The LLM response cache: one JSON file per completed HTTP response, keyed by what shapes it.

Contract
--------
- **Key** (:func:`cache_key`): sha256 over the canonical JSON of exactly the inputs that
  change a response — model, messages, the ``json_schema`` block sent as
  ``response_format`` (name, schema, strict), temperature, top_p, max_tokens, seed, sample
  index and re-ask index. Nothing else: not the api key, base URL, concurrency, rate
  limits, timeouts or retry settings, so moving to another endpoint or tuning throughput
  never invalidates paid-for answers. (A different server serving the *same* model name is
  assumed to serve the same model; change ``model`` when that is not true.)
- **What is cached**: every completed HTTP 200 response, valid or not. A response that
  fails validation (invalid JSON, schema violation, refusal, truncation) is stored under
  its own re-ask index, and the next re-ask uses the next index (and a different seed), so
  a re-run replays the same sequence of answers from disk, reaches the same verdict, and
  repeats no completed call. Transport failures (429/5xx/timeouts) have no response and
  are never cached: a re-run tries them again.
- **Layout**: ``<root>/<key[:2]>/<key>.json``. Entries are written as each call completes
  (temp file in the same directory, fsync, ``os.replace``), so a stage killed with SIGKILL
  loses at most the calls in flight, concurrent writers of the same key are safe (last
  rename wins; both wrote the same kind of complete entry), and a reader never sees half a
  file. A file that does not parse as an entry (damaged copy, foreign file) is a miss,
  logged, and is replaced by the next successful call.
- **Contents**: a request summary (model, sampling params, sample/re-ask index, schema
  name), the raw response (content, refusal, finish_reason, usage, served model). Never
  the api key, headers, or the cache key itself (it is the file name). Written as
  canonical JSON (sorted keys, UTF-8) so equal entries are equal bytes and the directory
  is friendly to DVC (it is meant to be a tracked output that travels with push/pull).
- **Offline mode** is enforced by the client (:mod:`stages.common.llm`): a miss there is a
  :class:`CacheMissError` listing the missing items, never a network call.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from stages.common.io import atomic_path, dumps_json
from stages.common.runlog import StageError

# Bump when the key material changes meaning; old entries then simply stop matching.
KEY_VERSION = 1
# Bump when the entry layout changes incompatibly; old entries then read as misses.
ENTRY_FORMAT = 1
# How many missing items a CacheMissError names (the count is always complete).
MISSES_SHOWN = 10

_KEY = re.compile(r"[0-9a-f]{64}")

log = logging.getLogger(__name__)


class CacheMissError(StageError):
    """Offline mode met requests the cache cannot answer.

    ``missing`` holds every missing item id (in request order); the message gives the count
    and the first few, and says how to get the entries (run online, or ``dvc pull``).
    """

    def __init__(self, missing: Sequence[str], cache_dir: str | os.PathLike):
        self.missing = list(missing)
        shown = ", ".join(self.missing[:MISSES_SHOWN])
        more = f" (and {len(self.missing) - MISSES_SHOWN} more)" if len(self.missing) > MISSES_SHOWN else ""
        super().__init__(
            f"offline mode: {len(self.missing)} LLM request(s) not in the response cache "
            f"{cache_dir}: {shown}{more}. Run online once (unset LLM_OFFLINE / set offline: "
            "false) or `dvc pull` the cache; no network call was made.")


def canonical_json(obj: Any) -> str:
    """Compact JSON with sorted keys, UTF-8 kept: the byte string the key hashes."""
    return json.dumps(obj, ensure_ascii=False, sort_keys=True, separators=(",", ":"),
                      allow_nan=False)


def key_material(*, model: str, messages: Sequence[dict[str, Any]], json_schema: dict[str, Any],
                 temperature: float, top_p: float, max_tokens: int, seed: Optional[int],
                 sample_index: int, reask_index: int) -> dict[str, Any]:
    """Everything that changes a response, normalised (floats as floats) — and nothing else."""
    return {
        "v": KEY_VERSION,
        "model": model,
        "messages": [dict(m) for m in messages],
        "response_format": json_schema,
        # float(): temperature 1 and 1.0 are the same request and must be the same key.
        "temperature": float(temperature),
        "top_p": float(top_p),
        "max_tokens": int(max_tokens),
        "seed": None if seed is None else int(seed),
        "sample_index": int(sample_index),
        "reask_index": int(reask_index),
    }


def cache_key(**material: Any) -> str:
    """sha256 hex of :func:`key_material` (same keyword arguments)."""
    payload = canonical_json(key_material(**material))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class RequestSummary(BaseModel):
    """What was asked, for a human reading the cache (the messages are not repeated)."""
    model_config = ConfigDict(extra="forbid", frozen=True)
    model: str
    schema_name: str
    temperature: float
    top_p: float
    max_tokens: int
    seed: Optional[int]
    sample_index: int
    reask_index: int


class CachedResponse(BaseModel):
    """One completed HTTP response as the client saw it."""
    model_config = ConfigDict(extra="forbid", frozen=True)
    content: Optional[str]
    refusal: Optional[str] = None
    finish_reason: Optional[str]
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    served_model: Optional[str] = None
    batch: bool = False  # answered through the Batch API (priced at the batch prices)


class CacheEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    format: int
    request: RequestSummary
    response: CachedResponse


class ResponseCache:
    """The on-disk cache under ``root``. Safe for many concurrent writers (threads or
    processes): every write is a complete file renamed into place."""

    def __init__(self, root: str | os.PathLike, logger: logging.Logger | None = None):
        self.root = Path(root)
        self.log = logger or log

    def path_for(self, key: str) -> Path:
        if not _KEY.fullmatch(key):
            raise ValueError(f"not a cache key: {key!r}")
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> CacheEntry | None:
        """The entry for ``key``; ``None`` when absent or unreadable (logged as a warning)."""
        path = self.path_for(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            self.log.warning("LLM cache entry %s cannot be read (%s); treating it as a miss", path, exc)
            return None
        try:
            entry = CacheEntry.model_validate_json(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            self.log.warning("LLM cache entry %s is damaged or partial (%s at %s); treating it "
                             "as a miss", path, first["msg"], ".".join(map(str, first["loc"])) or "top")
            return None
        if entry.format != ENTRY_FORMAT:
            self.log.warning("LLM cache entry %s has format %s (expected %s); treating it as a "
                             "miss", path, entry.format, ENTRY_FORMAT)
            return None
        return entry

    def put(self, key: str, entry: CacheEntry) -> Path:
        """Write ``entry`` atomically (temp file beside it, fsync, rename); return its path."""
        path = self.path_for(key)
        data = entry.model_dump(mode="json")
        if not data["response"]["batch"]:  # online entries keep their bytes of before
            del data["response"]["batch"]
        text = dumps_json(data)
        with atomic_path(path, suffix=".part") as tmp:
            tmp.write_text(text, encoding="utf-8")
        return path

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None

    def keys(self) -> Iterator[str]:
        """Keys of the entry files present (not validated; temp files are skipped)."""
        if not self.root.is_dir():
            return
        for shard in sorted(self.root.iterdir()):
            if shard.is_dir() and len(shard.name) == 2:
                for file in sorted(shard.glob("*.json")):
                    if not file.name.startswith("."):
                        yield file.stem

    def __len__(self) -> int:
        return sum(1 for _ in self.keys())
