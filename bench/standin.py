"""A local OpenAI-compatible stand-in that answers the pipeline's LLM stages like a model.

    python bench/standin.py --port 0 --latency 1 3 --wrong-rate 0.1 [--keep-rate 0.75 ...]
    StandIn.start(latency=(0, 0), wrong_rate=0.1) -> .base_url, .stats(), .stop()

Built on ``tests/llm_server.py`` (stdlib asyncio HTTP server; the process mode runs it apart
from the client, so the client's CPU is its own). Each request is a chat completion with a
strict ``response_format``; the stage is known by the schema name (and the prompt text), and
the answer is built from the prompt the stage's own code rendered:

- **filter** (``Verdict``): relevant or not, from a hash of the item text; about
  ``keep_rate`` of the items are kept, those sharing more terms with the domain criteria
  more often; a Korean reason naming the matched terms.
- **transform** (``SevenChoiceMCQ``): the question set in the domain context, the four
  original choices verbatim at new positions (``original_positions``), three new distractors
  (statements from the vocabulary, or the originals with their numbers changed) distinct
  from each other and from the answer, which stays the original key's text.
- **synthesize** (``GeneratedMCQ`` / ``GroundedMCQ``): a question that is a deterministic
  function of the prompt (topic, angle, variant, avoided stems, option count, chunk):
  identical prompts give identical questions, except that the sampling seed re-draws about
  ``2 × temperature`` distractors. Grounded questions quote a sentence of the chunk verbatim
  and ask about it; their distractors change its deadline, actor, modal verb or numbers.
- **solve** (``Solution``, ``QualityVerdict``): knows the key of every question it wrote or
  transformed — from memory (normalised stem -> answer text), else from a key the prompt
  states, else from a watermark: the key is the choice with the highest hash of (stem,
  choice), which the generators make true, so a restarted stand-in (or answers replayed
  from the LLM cache) still knows them — and names a wrong letter with probability
  ``wrong_rate``, drawn per sampling seed so re-samples can fix it. The quality gate passes
  ``quality_pass_rate`` of the questions (score 4-5); the rest score 1-2, half of them
  flagged as hallucination. A question it does not know (not its own) gets the watermark's
  guess: right about 1 in n.
- **summarize** (``ReportSummary``, map and reduce): company, ticker, dates, rating,
  target price and key figures copied from the report text (so the stage's figure check
  keeps them), risk and outlook sentences taken from the text, a 3-5 sentence summary; a
  merge unites the partial summaries.

Replies also model the API: latency uniform in ``latency`` (429s answer at once), faults at
configurable rates (invalid JSON, truncated with ``finish_reason: "length"``, refusal, 429
with ``Retry-After: retry_after`` seconds, 500/502/503), an answer longer than the request's
``max_tokens`` is cut there (``length``), and every 200 carries ``usage``: tokens of the
rendered messages (3 per message + role + content, 3 for the reply, plus the JSON schema,
which OpenAI bills as input) and of the content, with o200k_base from ``bpe-openai`` when it
is importable, else an estimate (ASCII 4 characters a token, other characters 1.6 — what
o200k_base gives for Korean prose). ``/_stats`` reports replies by kind, per stage, tokens,
and the responder's own counts (answers by stage, kept / wrong / guessed, memory size).

What it does not model: meaning. Its questions are grammatical Korean assembled from
vocabulary lists (``bench/standin_vocab.py``), not checked facts; it "knows" only its own
questions' keys; it has no context limit, no streaming, no Batch API, no per-key
rate limits or quota, and its faults are independent draws (no outages or bursts).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import re
import signal
import sys
import threading
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import standin_vocab as V  # noqa: E402
from stages.common.text import normalize_text, unspaced  # noqa: E402
from tests.llm_server import HOST, LLMTestServer, Reply, ServerProcess, echo_responder  # noqa: E402

LETTERS = "ABCDEFG"
RESPONDER = "bench.standin:make_responder"


# ---------------------------------------------------------------------------- config
@dataclass(frozen=True)
class StandInConfig:
    """Every knob of the stand-in, with its default."""
    seed: int = 0                              # changes every answer (the "model")
    latency: tuple[float, float] = (1.0, 3.0)  # seconds, uniform; 429s answer at once
    keep_rate: float = 0.75                    # filter: share of items judged relevant
    wrong_rate: float = 0.1                    # solve: share of draws naming a wrong letter
    quality_pass_rate: float = 0.95            # solve quality gate: share passing
    invalid_json_rate: float = 0.002           # 200 with unparsable content
    truncated_rate: float = 0.002              # 200 cut part-way, finish_reason "length"
    refusal_rate: float = 0.001                # 200 with message.refusal
    rate_limit_rate: float = 0.02              # 429 with Retry-After
    server_error_rate: float = 0.005           # 500 / 502 / 503
    retry_after: float = 1.0                   # seconds in the 429's Retry-After
    enforce_max_tokens: bool = True            # answers over max_tokens are cut ("length")
    port: int = 0                              # 0: a free port

    def __post_init__(self) -> None:
        lo, hi = (float(x) for x in self.latency)
        object.__setattr__(self, "latency", (lo, hi))
        if not 0 <= lo <= hi:
            raise ValueError(f"latency must be 0 <= low <= high, got {self.latency}")
        rates = {**self.fault_rates(), "keep_rate": self.keep_rate, "wrong_rate": self.wrong_rate,
                 "quality_pass_rate": self.quality_pass_rate}
        bad = [name for name, rate in rates.items() if not 0 <= rate <= 1]
        if bad or sum(self.fault_rates().values()) > 1:
            raise ValueError(f"rates must lie in [0, 1] and faults sum to at most 1: {rates}")
        if self.retry_after < 0:
            raise ValueError("retry_after must be >= 0")

    def fault_rates(self) -> dict[str, float]:
        """The server's ``fault_rates`` (names as tests/llm_server.py knows them)."""
        rates = {"invalid_json": self.invalid_json_rate, "truncated": self.truncated_rate,
                 "refusal": self.refusal_rate, "429": self.rate_limit_rate,
                 "5xx": self.server_error_rate}
        return {name: rate for name, rate in rates.items() if rate}

    @classmethod
    def from_options(cls, fault_rates: Optional[dict[str, float]] = None, **options: Any) -> "StandInConfig":
        """The config from keyword options, faults also accepted as a server-style
        ``fault_rates`` mapping (invalid_json, truncated, refusal, 429, 5xx or 500/502/503,
        which add up to ``server_error_rate``)."""
        fields = {"invalid_json": "invalid_json_rate", "truncated": "truncated_rate",
                  "refusal": "refusal_rate", "429": "rate_limit_rate"}
        if fault_rates is not None:  # the mapping names every fault wanted; the rest are off
            options = {**{name: 0.0 for name in (*fields.values(), "server_error_rate")}, **options}
        for name, rate in (fault_rates or {}).items():
            if name in fields:
                options[fields[name]] = float(rate)
            elif name == "5xx" or str(name).isdigit() and 500 <= int(name) <= 599:
                options["server_error_rate"] += float(rate)
            else:
                raise ValueError(f"unknown fault {name!r} (invalid_json, truncated, refusal, 429, 5xx)")
        return cls(**options)

    def responder_config(self) -> dict[str, Any]:
        return {"seed": self.seed, "keep_rate": self.keep_rate, "wrong_rate": self.wrong_rate,
                "quality_pass_rate": self.quality_pass_rate,
                "enforce_max_tokens": self.enforce_max_tokens}


# ---------------------------------------------------------------------------- text helpers
_JOSA = {"은": ("은", "는"), "는": ("은", "는"), "이": ("이", "가"), "가": ("이", "가"),
         "을": ("을", "를"), "를": ("을", "를"), "과": ("과", "와"), "와": ("과", "와"),
         "으로": ("으로", "로"), "로": ("으로", "로")}
_SLOT = re.compile(r"\{(\w+)(?:\|(\w+))?\}")
_PAREN_TAIL = re.compile(r"\s*\([^()]*\)$")
_PARTICLE = re.compile(r"(은|는|이|가|을|를|의|에|에서|에게|로|으로|도|와|과|란)$")


def _final_consonant(word: str) -> int:
    """Index of the final consonant of the word's last spoken syllable (0: none; 8: ㄹ)."""
    text = _PAREN_TAIL.sub("", word.strip()) or word.strip()
    ch = text[-1] if text else "가"
    if "가" <= ch <= "힣":
        return (ord(ch) - 0xAC00) % 28
    if ch.isdigit():
        return {"0": 21, "1": 8, "3": 16, "6": 1, "7": 8, "8": 8}.get(ch, 0)
    return {"l": 8, "m": 16, "n": 4, "r": 8}.get(ch.lower(), 0)


def josa(word: str, particle: str) -> str:
    """``word`` + the form of ``particle`` that fits it (은/는, 이/가, 을/를, 과/와, 으로/로)."""
    with_final, without = _JOSA[particle]
    final = _final_consonant(word)
    if with_final == "으로":
        return word + ("로" if final in (0, 8) else "으로")
    return word + (with_final if final else without)


def fill(template: str, values: dict[str, str]) -> str:
    return _SLOT.sub(lambda m: josa(values[m[1]], m[2]) if m[2] else values[m[1]], template)


def _digest(*parts: Any) -> bytes:
    return hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()


def rng_for(*parts: Any) -> random.Random:
    return random.Random(int.from_bytes(_digest(*parts)[:8], "big"))


def unit(*parts: Any) -> float:
    """A uniform draw in [0, 1) fixed by ``parts``."""
    return int.from_bytes(_digest(*parts)[:7], "big") / 2 ** 56


def fold(text: str) -> str:
    """Comparison form: normalised, no whitespace, case-folded, final period dropped."""
    return unspaced(normalize_text(text)).casefold().rstrip(".")


def mark(stem: str, choice: str) -> int:
    """The watermark: the key of a question written here has the highest mark of its choices."""
    return int.from_bytes(_digest("standin-key", fold(stem), fold(choice))[:8], "big")


def sentences(text: str) -> list[str]:
    """Sentences of prose (split after a period, at line breaks)."""
    parts = re.split(r"(?<=[.!?])\s+|\n+", text)
    return [p.strip() for p in parts if p.strip()]


def hangul_share(text: str) -> float:
    chars = [c for c in text if not c.isspace()]
    return sum("가" <= c <= "힣" for c in chars) / len(chars) if chars else 0.0


# ---------------------------------------------------------------------------- tokens
class TokenCounter:
    """o200k_base (gpt-4o's encoding) from ``bpe-openai`` when importable, else an estimate."""

    def __init__(self) -> None:
        try:
            with warnings.catch_warnings():  # bpe-openai 0.1.4 loads its data with a deprecated call
                warnings.simplefilter("ignore", DeprecationWarning)
                from bpe_openai import encoding_for_model
                self._enc: Any = encoding_for_model("gpt-4o")
            self.name = "o200k_base"
        except Exception:  # noqa: BLE001 - not installed, or no data: estimate
            self._enc = None
            self.name = "estimate"
        self._schemas: dict[str, int] = {}

    def count(self, text: str) -> int:
        if not text:
            return 0
        if self._enc is not None:
            return len(self._enc.encode_ordinary(text))
        ascii_chars = len(text.encode("ascii", "ignore"))
        return math.ceil(ascii_chars / 4 + (len(text) - ascii_chars) / 1.6)

    def cut(self, text: str, limit: int) -> str:
        """The first ``limit`` tokens of ``text``."""
        if self._enc is not None:
            return self._enc.decode(self._enc.encode_ordinary(text)[:limit]).rstrip("\ufffd")
        total = self.count(text)
        return text[:max(0, len(text) * limit // max(1, total))]

    def prompt(self, body: dict[str, Any]) -> int:
        """Tokens of the rendered request: the cookbook's per-message count plus the schema."""
        total = 3
        for message in body.get("messages") or []:
            total += 3 + self.count(str(message.get("role", "")))
            total += self.count(str(message.get("content") or ""))
        schema = ((body.get("response_format") or {}).get("json_schema") or {}).get("schema")
        if schema:
            key = json.dumps(schema, ensure_ascii=False, sort_keys=True)
            if key not in self._schemas:
                self._schemas[key] = self.count(key)
            total += self._schemas[key]
        return total


# ---------------------------------------------------------------------------- requests
STAGE_BY_SCHEMA = {"Verdict": "filter", "SevenChoiceMCQ": "transform", "GeneratedMCQ": "synthesize",
                   "GroundedMCQ": "synthesize", "CompanyMCQ": "synthesize", "Solution": "solve", "QualityVerdict": "solve_quality",
                   "ReportSummary": "summarize", "AgentQuestion": "agent"}
STAGE_BY_TEXT = (("판정하세요", "filter"), ("7지선다", "transform"), ("출제하세요", "synthesize"),
                 ("심사하세요", "solve_quality"), ("풀이하세요", "solve"), ("요약", "summarize"))


def message_text(body: dict[str, Any], role: str) -> str:
    return "\n".join(str(m.get("content") or "") for m in body.get("messages") or []
                     if m.get("role") == role)


def stage_of(body: dict[str, Any]) -> str:
    """The pipeline stage a request comes from (summarize split into map and reduce)."""
    name = ((body.get("response_format") or {}).get("json_schema") or {}).get("name", "")
    stage = STAGE_BY_SCHEMA.get(name)
    text = message_text(body, "system") + "\n" + message_text(body, "user")
    if stage is None:
        stage = next((s for marker, s in STAGE_BY_TEXT if marker in text), "unknown")
    if stage == "summarize":
        return "summarize_reduce" if "[부분 1]" in text else "summarize_map"
    return stage


@dataclass(frozen=True)
class Draw:
    """What makes two requests with the same messages different draws."""
    seed: Any
    temperature: float

    @classmethod
    def of(cls, body: dict[str, Any]) -> "Draw":
        return cls(body.get("seed"), float(body.get("temperature") or 0.0))


@dataclass(frozen=True)
class Question:
    stem: str
    choices: tuple[str, ...]


_QUESTION = re.compile(r"### 질문: (.*?)\n### 선택지:\n(.*?)(?=\n\n|\Z)", re.S)
_CHOICE_LINE = re.compile(r"([A-G])\. ?(.*)\Z", re.S)


def parse_choices(block: str) -> list[str]:
    """``A. …`` lines (A, B, C… in order; other lines continue the previous choice)."""
    choices: list[str] = []
    for line in block.split("\n"):
        match = _CHOICE_LINE.match(line)
        if match and len(choices) < len(LETTERS) and match[1] == LETTERS[len(choices)]:
            choices.append(match[2])
        elif choices:
            choices[-1] += "\n" + line
    return choices


def parse_question(text: str) -> Optional[Question]:
    """The ``### 질문:`` / ``### 선택지:`` block (stages.common.prompts.mcq_question_block)."""
    match = _QUESTION.search(text)
    if not match:
        return None
    return Question(match[1].strip(), tuple(parse_choices(match[2])))


# ---------------------------------------------------------------------------- vocabulary pools
@dataclass(frozen=True)
class Pool:
    """The words one question is built from."""
    kind: str                   # finance | accounting | rules
    terms: tuple[str, ...]      # the topic's terms
    others: tuple[str, ...]     # every term of the domain
    topic: str
    aspects: tuple[str, ...]


def _tables(kind: str) -> tuple[dict[str, tuple[str, ...]], dict[str, str]]:
    return {"finance": (V.FINANCE_TERMS, V.FINANCE_KEYS),
            "accounting": (V.ACCOUNTING_TERMS, V.ACCOUNTING_KEYS),
            "rules": (V.RULES_TERMS, V.RULES_KEYS)}[kind]


def domain_kind(text: str, grounded: bool = False) -> str:
    if grounded or "법령" in text or "시행규칙" in text or "규정" in text and "회계" not in text:
        return "rules"
    return "accounting" if "회계" in text or "재무제표" in text else "finance"


def make_pool(kind: str, topic: str, angle: str) -> Pool:
    table, keys = _tables(kind)
    picked = list(dict.fromkeys(t for key, name in keys.items() if key in topic for t in table[name]))
    every = tuple(dict.fromkeys(t for terms in table.values() for t in terms))
    aspects = V.ANGLE_ASPECTS.get(angle.strip(), (angle.strip() or "핵심 내용",))
    return Pool(kind, tuple(picked) or every, every, topic.strip() or kind, aspects)


def number(rng: random.Random) -> str:
    suffix, low, high, digits = rng.choice(V.UNITS)
    value = rng.uniform(low, high)
    text = f"{value:,.{digits}f}" if digits else f"{round(value):,}"
    return text + suffix


def slots(rng: random.Random, pool: Pool) -> dict[str, str]:
    """Fresh values for every template slot."""
    term = rng.choice(pool.terms)
    term2 = rng.choice(pool.others)
    while term2 == term and len(pool.others) > 1:
        term2 = rng.choice(pool.others)
    actors = V.RULE_ACTORS if pool.kind == "rules" else V.ACTORS
    return {"term": term, "term2": term2, "actor": rng.choice(actors),
            "situation": rng.choice(V.SITUATIONS), "factor": rng.choice(V.FACTORS),
            "direction": rng.choice(V.DIRECTIONS), "effect": rng.choice(V.EFFECTS),
            "benefit": rng.choice(V.BENEFITS), "goal": rng.choice(V.GOALS), "verb": rng.choice(V.VERBS),
            "property": rng.choice(V.PROPERTIES), "change": rng.choice(V.CHANGES),
            "metric": rng.choice(V.METRICS), "company": rng.choice(V.COMPANIES) + "(주)",
            "num": number(rng), "num2": number(rng), "amount": f"{rng.randrange(5, 9000):,}억 원",
            "period": rng.choice(V.PERIODS),
            "aspect": rng.choice(pool.aspects), "topic": pool.topic, "ask": rng.choice(V.ASKS),
            "fine": rng.choice(V.FINES), "cycle": rng.choice(V.CYCLES),
            "object": rng.choice(V.RULE_OBJECTS), "rule_verb": rng.choice(V.RULE_VERBS),
            "sanction": rng.choice(V.SANCTIONS), "years": f"{rng.randint(1, 10)}년",
            "percent": f"{rng.randint(1, 40) * 2.5:g}%"}


def statement(rng: random.Random, pool: Pool, focus: str = "") -> str:
    """One choice sentence from the pool (about ``focus`` half of the time)."""
    values = slots(rng, pool)
    if focus and rng.random() < 0.5:
        values["term"] = focus
    templates = V.RULE_CHOICES if pool.kind == "rules" else V.CHOICES
    return fill(rng.choice(templates), values)


def draw_distractor(make: Callable[[random.Random], str], rng: random.Random, stem: str,
                    top: int, seen: set[str]) -> str:
    """A text from ``make`` not in ``seen`` (folded; added to it) whose watermark is below the
    key's ``top`` — after 200 tries any distinct text, after 300 one marked as a variant."""
    for attempt in range(400):
        text = make(rng) if attempt < 300 else f"{make(rng)} ({attempt}번 사례)"
        if fold(text) not in seen and (mark(stem, text) < top or attempt >= 200):
            seen.add(fold(text))
            return text
    raise RuntimeError("no distinct distractor in 400 draws")


def keyed_choices(rng: random.Random, stem: str, n: int, make: Callable[[random.Random], str],
                  correct: str, minor: Optional[random.Random] = None, redraw: int = 0
                  ) -> tuple[list[str], int]:
    """``n`` choices, pairwise distinct after folding, ``correct`` among them with the highest
    watermark; ``redraw`` distractors are then re-drawn from ``minor`` (the sampling seed)."""
    top = mark(stem, correct)
    seen = {fold(correct)}
    distractors = [draw_distractor(make, rng, stem, top, seen) for _ in range(n - 1)]
    for k in range(min(redraw, len(distractors))):
        seen.discard(fold(distractors[k]))
        distractors[k] = draw_distractor(make, minor or rng, stem, top, seen)
    answer = rng.randrange(n)
    return distractors[:answer] + [correct] + distractors[answer:], answer


# ---------------------------------------------------------------------------- synthesize
@dataclass(frozen=True)
class SynthPrompt:
    domain: str
    topic: str
    angle: str
    n: int
    chunk: Optional[str]
    avoid: tuple[str, ...]


def _field(text: str, label: str) -> str:
    """The value of a ``label: value`` line ("" when absent)."""
    match = re.search(rf"^{label}: (.*)$", text, re.M)
    return match[1].strip() if match else ""


def parse_synthesize(user: str) -> SynthPrompt:
    """Topic, angle, option count, chunk and avoided stems of a synthesize prompt."""
    view = re.sub(r" \(같은 주제·관점의 .*$", "", _field(user, "출제 관점"))
    topic = _field(user, "주제")
    chunk_match = re.search(r"\[근거 조문\]\n(.*?)\n\n선택지 \d+개짜리 문항의 예시", user, re.S)
    if chunk_match and not topic and " · " in view:
        topic, view = view.split(" · ", 1)
    count = re.search(r"선택지는 정확히 (\d+)개", user)
    avoid_block = user.split("이미 출제된 같은 주제의 문항입니다.", 1)
    avoid = tuple(line[2:] for line in avoid_block[-1].split("\n")
                  if line.startswith("- ")) if len(avoid_block) > 1 else ()
    return SynthPrompt(_field(user, "분야"), topic, view, int(count[1]) if count else 7,
                       chunk_match[1] if chunk_match else None, avoid)


def synthesize_plain(prompt: SynthPrompt, rng: random.Random, minor: random.Random,
                     redraw: int) -> tuple[dict[str, Any], str, str]:
    """(answer JSON, stem, key text) of an ungrounded question."""
    pool = make_pool(domain_kind(prompt.domain), prompt.topic, prompt.angle)
    avoided = {fold(s)[:30] for s in prompt.avoid}
    for _ in range(4):
        values = slots(rng, pool)
        stem = fill(rng.choice(V.STEMS), values)
        if fold(stem)[:30] not in avoided:
            break
    focus = values["term"]
    correct = max((statement(rng, pool, focus) for _ in range(6)), key=lambda c: mark(stem, c))
    choices, answer = keyed_choices(rng, stem, prompt.n, lambda r: statement(r, pool, focus),
                                    correct, minor, redraw)
    letter = LETTERS[answer]
    explanation = " ".join(fill(rng.choice(t), {**values, "letter": letter})
                           for t in (V.EXPLAIN_OK, V.EXPLAIN_REST))
    return ({"question": stem, "choices": choices, "answer": letter, "explanation": explanation},
            stem, correct)


_ARTICLE = re.compile(r"제\s*\d+\s*조(?:의\s*\d+)?(?:\([^()\n]{1,30}\))?")
_LEAD = re.compile(r"^(?:" + _ARTICLE.pattern + r"\s*)?(?:[\u2460-\u2473]\s*)?(?:\d{1,2}\.\s+)?")


def rule_sentences(chunk: str) -> list[tuple[str, str]]:
    """(sentence without its article heading, the article it belongs to) of a rule chunk."""
    flat = re.sub(r"\s*\n\s*", " ", normalize_text(chunk))
    cuts = [0] + [m.end() for m in re.finditer(
        r"(?<=\.)\s+|\s+(?=[\u2460-\u2473])|\s+(?=제\s*\d+\s*조)", flat)] + [len(flat)]
    found, article = [], ""
    for start, end in zip(cuts, cuts[1:]):
        piece = flat[start:end].strip()
        heading = _ARTICLE.match(piece)
        article = heading[0] if heading else article
        body = piece[_LEAD.match(piece).end():].strip()
        if 12 <= len(unspaced(body)) and hangul_share(body) >= 0.5:
            found.append((body[:150].rsplit(" ", 1)[0] if len(body) > 150 else body, article))
    return found or [(flat[:60], "")]


_VAGUE = frozenset(("다만", "같은", "해당", "이러한", "그러한", "다음", "제시된", "규정", "위의", "각호"))


def subject_of(text: str) -> str:
    """The first meaningful word of a sentence or stem, without its particle."""
    for word in re.findall(r"[가-힣A-Za-z]{2,}", text):
        word = _PARTICLE.sub("", word)
        if len(word) >= 2 and word not in _VAGUE:
            return word
    return "해당 사항"


def mutate_rule(rng: random.Random, sentence: str) -> Optional[str]:
    """The sentence made wrong: a swapped modal/actor/deadline word, or a changed number."""
    swaps = [(a, b) for a, b in V.RULE_SWAPS if a in sentence]
    numbers = list(re.finditer(r"\d+", sentence))
    if numbers and (not swaps or rng.random() < 0.5):
        m = rng.choice(numbers)
        value = int(m[0])
        new = rng.choice([v for v in (value * 2, value + 5, max(1, value // 2), value * 3, value + 1)
                          if v != value])
        return sentence[:m.start()] + str(new) + sentence[m.end():]
    if swaps:
        old, new = rng.choice(swaps)
        return sentence.replace(old, new, 1)
    return None


def synthesize_grounded(prompt: SynthPrompt, rng: random.Random, minor: random.Random,
                        redraw: int) -> tuple[dict[str, Any], str, str]:
    """(answer JSON, stem, key text) of a question written from the prompt's chunk."""
    pool = make_pool("rules", prompt.topic, prompt.angle)
    found = rule_sentences(prompt.chunk or "")
    quote, article = rng.choice(found)
    values = {**slots(rng, pool), "law": rng.choice(V.RULE_LAWS), "article": article or "해당 조문",
              "focus": subject_of(quote) + rng.choice(("의 의무", "에 관한 사항", "의 요건", "의 처리",
                                                       "의 기준")),
              "ask": rng.choice(("옳은 것은?", "가장 적절한 것은?"))}
    stem = fill(rng.choice(V.RULE_STEMS), values)
    others = [s for s, _ in found if s != quote]

    def make(r: random.Random) -> str:
        if r.random() < 0.2:
            wrong = mutate_rule(r, r.choice(others) if others and r.random() < 0.5 else quote)
            if wrong:
                return wrong
        return statement(r, pool, values["term"])

    choices, answer = keyed_choices(rng, stem, prompt.n, make, quote, minor, redraw)
    letter = LETTERS[answer]
    cited = quote if len(quote) <= 60 else quote[:60].rsplit(" ", 1)[0] + "…"
    explanation = (f"{josa(values['article'], '은')} '{cited}'라고 정하므로 {letter}가 정답이다. "
                   "나머지 선택지는 조문의 주체, 기한, 요건이나 수치를 바꾸어 서술하였다.")
    return ({"question": stem, "choices": choices, "answer": letter, "explanation": explanation,
             "supporting_quote": quote}, stem, quote)


# ---------------------------------------------------------------------------- company
_COMPANY = re.compile(r"^\[회사\] (.+?) · \[문서\]", re.M)
_CELL_NUMBER = re.compile(r"^-?\d{1,3}(?:,\d{3})*(?:\.\d+)?$|^-?\d+(?:\.\d+)?$")


def company_figures(chunk: str) -> tuple[list[tuple[str, list[str], str]], list[tuple[str, str, str]]]:
    """(table rows ``name | v1 | v2 …`` with their number cells and line, ``key: number``
    profile lines) of a company chunk."""
    rows, lines = [], []
    for line in chunk.split("\n"):
        cells = [c.strip() for c in line.split(" | ")]
        if len(cells) >= 3 and all(_CELL_NUMBER.match(c) for c in cells[1:]):
            rows.append((cells[0], cells[1:], line))
        match = re.match(r"^([a-z_]+): (\d+(?:\.\d+)?)$", line)
        if match:
            lines.append((match[1], match[2], line))
    return rows, lines


def _num(text: str) -> float:
    return float(text.replace(",", ""))


def synthesize_company(prompt: SynthPrompt, rng: random.Random, error_rate: float
                       ) -> tuple[dict[str, Any], str, str, str]:
    """(answer JSON, stem, key text, kind) of a company question, like a model writes them: a
    growth rate from a statement row or a ratio of two figures (the figures in the stem, the
    calculation named), else a statement quoted from the chunk; with ``error_rate`` the key is
    rounded wrong or a figure is quoted in another unit — what synthesize's checks must catch."""
    chunk = prompt.chunk or ""
    company = (_COMPANY.search(chunk) or [None, "이 회사"])[1]
    rows, lines = company_figures(chunk)
    n, kind = prompt.n, "keyed"
    if rows and rng.random() < 0.6:
        name, values, quote = rng.choice(rows)
        cur, prev = values[0], values[1]
        value = (_num(cur) - _num(prev)) / _num(prev) * 100 if _num(prev) else 0.0
        stem = rng.choice((
            f"{company}의 {name}은(는) 전기 {prev}에서 당기 {cur}(으)로 바뀌었다. 당기 {name} 증가율(전기 대비)로 옳은 것은?",
            f"재무제표에 따르면 {company}의 당기 {name}은(는) {cur}, 전기는 {prev}이다. 전기 대비 변화율은?",
            f"{prev} → {cur}: {company}의 {name} 추이이다. 이 기간의 {name} 성장률로 가장 적절한 것은?"))
        calc = {"kind": "growth", "numerator": {"name": f"당기 {name}", "value": cur},
                "denominator": {"name": f"전기 {name}", "value": prev}, "unit": "%"}
        word = lambda v: f"{abs(v):.1f}% {'증가' if v >= 0 else '감소'}"  # noqa: E731
    elif len(rows) >= 2 or len(lines) >= 2:
        (na, va, quote), (nb, vb, _) = rng.sample([(r[0], r[1][0], r[2]) for r in rows] or lines, 2)
        value = _num(va) / _num(vb) * 100 if _num(vb) else 0.0
        stem = rng.choice((
            f"{company}의 {na}은(는) {va}, {nb}은(는) {vb}이다. {na} ÷ {nb}의 비율은 얼마인가?",
            f"{na} {va}와(과) {nb} {vb}를 공시한 {company}에 대해, {nb} 대비 {na}의 비중을 구하면?",
            f"{company}의 재무 수치({na}: {va}, {nb}: {vb})로 계산한 {na}/{nb} 비율로 옳은 것은?"))
        calc = {"kind": "ratio", "numerator": {"name": na, "value": va},
                "denominator": {"name": nb, "value": vb}, "unit": "%"}
        word = lambda v: f"{v:.1f}%"  # noqa: E731
    else:
        found = [s for s in sentences(chunk) if hangul_share(s) > 0.5 and len(s) > 15] or [chunk[-60:]]
        quote = rng.choice(found)
        stem = f"{company}에 관한 다음 설명 중 문서 내용과 일치하는 것은? ({quote[:20]}…)"
        choices = [quote] + [f"{company}는 {w} 사업에서 철수하였다." for w in rng.sample(V_COMPANY_LINES, n - 1)]
        rng.shuffle(choices)
        return ({"question": stem, "choices": choices, "answer": LETTERS[choices.index(quote)],
                 "explanation": "문서의 서술과 일치한다.", "supporting_quote": quote,
                 "calculation": None}, stem, quote, "statement")
    key_value = value
    if rng.random() < error_rate:
        key_value, kind = value + rng.choice((-0.4, 0.3, 0.6)), "wrong_rounding"
    elif rng.random() < error_rate / 2:
        calc["numerator"]["value"] = f"{_num(calc['numerator']['value']) / 10:g}"
        kind = "other_unit"
    key = word(key_value)
    offsets = [o for o in (-7.3, -4.1, -2.2, 1.9, 3.6, 5.4, 8.8, 12.5) if abs(abs(key_value + o) - abs(value)) > 0.15]
    rng.shuffle(offsets)
    choices = list(dict.fromkeys([key] + [word(key_value + o) for o in offsets]))[:n]
    rng.shuffle(choices)
    return ({"question": stem, "choices": choices, "answer": LETTERS[choices.index(key)],
             "explanation": f"계산하면 {key}이다.", "supporting_quote": quote, "calculation": calc},
            stem, key, kind)


V_COMPANY_LINES = ["반도체", "건설", "유통", "해운", "화장품", "게임", "제약", "철강", "통신", "보험"]


# ---------------------------------------------------------------------------- filter
_STOPWORDS = frozenset("문항 다루는 내용 실제 해당하지 않음 관련 있는 있어 발췌 담고 같은 위한 쓰이는 지식을 "
                       "연결되지 않는 순수 이론 미치는 영향 상황을 거래와 다루는 실질적인 근거로 쓸 수 "
                       "기업과 실무에서 일반 상식이나 계산만 형식적 조항만 있는 등의 등 만 다루는 다루 미치 상황 "
                       "담은 쓰일 만큼 온전한".split())


def criteria_terms(criteria: str) -> tuple[set[str], set[str]]:
    """(terms of the criteria's positive sentences, terms of the excluding ones)."""
    positive, negative = set(), set()
    for sentence in re.split(r"[.。]\s*", criteria):
        words = re.findall(r"[가-힣A-Za-z][가-힣A-Za-z0-9\-]+", sentence)
        terms = {_PARTICLE.sub("", re.sub(r"만$", "", w)) for w in words}
        terms = {t for t in terms if len(t) >= 2 and t not in _STOPWORDS}
        (negative if "않" in sentence or "제외" in sentence else positive).update(terms)
    return positive, negative - positive


def filter_verdict(system: str, user: str, keep_rate: float, seed: int) -> dict[str, Any]:
    """relevant from a hash of the item; on-topic items (criteria terms) kept more often."""
    criteria = (re.search(r"분야 기준:\n(.*?)\n\n판정 규칙:", system, re.S) or [None, system])[1]
    item = user.split("\n", 1)[1] if "\n" in user else user
    squashed = unspaced(item).casefold()
    positive, negative = criteria_terms(criteria)
    hits = sorted(t for t in positive if t.casefold() in squashed)
    misses = sorted(t for t in negative if t.casefold() in squashed)
    on_topic = min(4, max(0, len(hits) - 2 * len(misses))) / 4
    broken = len(unspaced(item)) < 15 or hangul_share(item) < 0.3
    chance = min(0.98, max(0.02, keep_rate + 0.4 * (on_topic - 0.5))) * (0.3 if broken else 1.0)
    relevant = unit("filter", seed, fold(item)) < chance
    if relevant:
        named = "·".join(hits[:3]) or "분야의 핵심 개념"
        reason = f"{named} 등 분야 기준에 해당하는 내용을 다루고 있어 학습 자료로 쓸 수 있다."
    elif misses:
        reason = f"{'·'.join(misses[:2])} 등 분야 기준에서 제외되는 내용이 중심이어서 해당하지 않는다."
    else:
        reason = "분야 기준의 핵심 주제와의 관련성이 낮거나 내용이 온전하지 않아 해당하지 않는다."
    return {"relevant": relevant, "reason": reason}


# ---------------------------------------------------------------------------- transform
_TRANSFORM = re.compile(r"질문: (.*?)\n선택지:\n(.*)\n정답: ([A-G])\. ?(.*)\Z", re.S)


def numeric_variant(rng: random.Random, text: str) -> Optional[str]:
    """``text`` with one of its numbers changed (a wrong option for a calculation)."""
    numbers = list(re.finditer(r"\d[\d,]*(?:\.\d+)?", text))
    if not numbers:
        return None
    m = rng.choice(numbers)
    value = float(m[0].replace(",", ""))
    new = value * rng.choice((0.5, 0.8, 1.25, 1.5, 2.0, 3.0)) + rng.choice((0, 1, 10))
    digits = len(m[0].split(".")[1]) if "." in m[0] else 0
    shown = f"{new:,.{digits}f}" if "," in m[0] else f"{new:.{digits}f}"
    return text[:m.start()] + shown + text[m.end():]


def transform_answer(system: str, user: str, rng: random.Random) -> tuple[dict[str, Any], str, str]:
    """(answer JSON, new stem, key text): the original choices kept, three new distractors."""
    match = _TRANSFORM.search(user)
    if not match:
        raise ValueError("not a transform prompt")
    question, originals = match[1].strip(), parse_choices(match[2])
    key = LETTERS.index(match[3])
    context = (re.search(r"바꾸지 마세요: (.*)$", system, re.M) or [None, "금융 실무 상황"])[1].strip()
    n = int((re.findall(r"(\d+)지선다", system) or ["7"])[-1])
    pool = make_pool(domain_kind(context), context, "실무 사례 적용")
    correct = originals[key]
    best = None
    for _ in range(16):  # the scene whose stem gives the key the top watermark
        scene = fill(rng.choice(V.SCENES), {**slots(rng, pool), "context": context})
        stem = f"{scene} {question}"
        margin = mark(stem, correct) - max(mark(stem, c) for i, c in enumerate(originals) if i != key)
        if best is None or margin > best[0]:
            best = (margin, stem)
    stem = best[1]
    positions = rng.sample(range(n), len(originals))

    def make(r: random.Random) -> str:
        variant = numeric_variant(r, r.choice(originals)) if r.random() < 0.5 else None
        return variant or statement(r, pool)

    seen = {fold(c) for c in originals}
    texts = [draw_distractor(make, rng, stem, mark(stem, correct), seen)
             for _ in range(n - len(originals))]
    out = [originals[positions.index(p)] if p in positions else texts.pop() for p in range(n)]
    answer = {"question": stem,
              "choices": [{"text": t, "is_correct": p == positions[key]} for p, t in enumerate(out)],
              "original_positions": [LETTERS[p] for p in positions], "keeps_original_answer": True}
    return answer, stem, correct


# ---------------------------------------------------------------------------- solve
def focus_of(stem: str) -> str:
    """What a question is about: the article it cites, a known term it names, else its
    first meaningful word."""
    article = _ARTICLE.search(stem)
    if article:
        return article[0]
    for table in (V.FINANCE_TERMS, V.ACCOUNTING_TERMS, V.RULES_TERMS):
        for terms in table.values():
            for term in terms:
                if term in stem:
                    return term
    return subject_of(stem)


def solution(question: Question, final: int, rng: random.Random) -> dict[str, Any]:
    """A step-1 solution (solve.Solution) concluding ``final``."""
    focus = focus_of(question.stem)
    letter = LETTERS[final]
    reviews = []
    for i, choice in enumerate(question.choices):
        snippet = re.sub(r"\s+", " ", choice).strip()
        snippet = snippet if len(snippet) <= 24 else snippet[:24] + "…"
        review = rng.choice(V.REVIEW_OK if i == final else V.REVIEW_BAD)
        reviews.append({"letter": LETTERS[i], "assessment": f"{snippet} — {fill(review, {'focus': focus})}"})
    return {"analysis": fill(rng.choice(V.ANALYSIS), {"focus": focus}), "choice_reviews": reviews,
            "derivation": fill(rng.choice(V.DERIVATION), {"focus": focus, "letter": letter}),
            "final_letter": letter}


def quality_verdict(user: str, pass_rate: float, seed: int) -> tuple[dict[str, Any], bool]:
    question = parse_question(user)
    stem = question.stem if question else user
    if unit("quality", seed, fold(stem)) < pass_rate:
        score = 5 if unit("quality-score", seed, fold(stem)) < 0.6 else 4
        return {"score": score, "hallucination": False,
                "reason": "정답이 하나로 분명하고 풀이가 선택지를 빠짐없이 논리적으로 검토한다."}, True
    flagged = unit("quality-flag", seed, fold(stem)) < 0.5
    reason = ("풀이에 근거가 확인되지 않는 제도나 수치가 포함되어 있다." if flagged
              else "선택지 간 구별이 모호하여 정답이 하나로 확정되지 않는다.")
    return {"score": 2 if flagged else 1 + int(unit("quality-low", seed, fold(stem)) < 0.5),
            "hallucination": flagged, "reason": reason}, False


# ---------------------------------------------------------------------------- summarize
_METRIC_NAMES = ("영업이익률", "매출액 증가율", "영업이익 증가율", "매출총이익", "매출액", "영업이익",
                 "당기순이익", "순이익", "부채비율", "자기자본이익률", "ROE", "EPS", "PER", "PBR",
                 "배당수익률", "배당성향", "시가총액", "현금성 자산", "영업현금흐름", "EBITDA", "매출 비중",
                 "점유율", "수주잔고", "순차입금", "설비투자", "연구개발비", "의존도", "회전일수")
_NUMBER = r"(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?)"
_FIGURE = re.compile(_NUMBER + r"\s*(조\s?원|억\s?원|백만\s?원|만\s?원|원|%|배|곳|명|일|조|억)")
_DATE = r"20\d{2}[.\-/]\s?\d{1,2}[.\-/]\s?\d{1,2}\.?|20\d{2}년\s?\d{1,2}월\s?\d{1,2}일"
_PERIOD = re.compile(r"20\d{2}년(?:\s?(?:[1-4]분기|상반기|하반기))?")
_COMPANY = re.compile(r"[가-힣A-Za-z0-9]{1,20}\(주\)|\(주\)[가-힣A-Za-z0-9]{1,20}|주식회사\s?[가-힣A-Za-z0-9]{1,20}")
_NOT_NAMES = frozenset(("전년", "대비", "기준", "수준", "단위", "전기", "동기", "이상", "이하", "최대"))
_RISK_WORDS = ("위험", "리스크", "우려", "부담", "불확실", "지연", "둔화", "하락하면", "줄어드는", "악화")
_OUTLOOK_WORDS = ("전망", "예정", "계획", "기대", "예상", "목표")


def report_prose(text: str) -> list[str]:
    """The report's sentences: page lines re-joined (PDF layout breaks lines mid-sentence),
    page and table markers, table rows and section labels left out."""
    paragraphs, current = [], []
    for line in text.split("\n"):
        line = line.strip()
        if not line or " | " in line or re.fullmatch(r"\[(\d+쪽[^\]]*|표 \d+)\]", line):
            paragraphs.append(" ".join(current))
            current = []
        else:
            current.append(line)
    paragraphs.append(" ".join(current))
    found = []
    for paragraph in paragraphs:
        for sentence in re.split(r"(?<=다\.)\s+|\s+(?=\[[^\]]{1,20}\])", paragraph):
            sentence = re.sub(r"^(\[[^\]]{1,20}\]\s*)+", "", sentence.strip())
            if 15 <= len(sentence) <= 200 and sentence.endswith(".") and hangul_share(sentence) >= 0.5:
                found.append(sentence)
    return found


def _figure_name(before: str, unit_text: str) -> str:
    """The metric a number belongs to: the last known metric name before it, else the
    nearest preceding word (particle dropped); a % after a change word is a growth rate."""
    found = [(before.rfind(name), name) for name in _METRIC_NAMES if name in before]
    if found:
        name = max(found)[1]
        tail = before[before.rfind(name) + len(name):]
        changed = unit_text == "%" and not name.endswith(("률", "율", "비중", "성향", "의존도"))
        return name + (" 증가율" if changed and re.search("대비|증가|늘", tail) else "")
    for word in reversed(re.findall(r"[가-힣A-Za-z]{2,}", before)):
        word = _PARTICLE.sub("", word)
        if len(word) >= 2 and word not in _NOT_NAMES:
            return word
    return "주요 수치"


def table_figures(text: str) -> list[dict[str, Any]]:
    """Figures of ``[표 N]`` blocks: the row label, its last column's number, that column's header."""
    figures = []
    for block in re.findall(r"\[표 \d+\]\n((?:.* \| .*(?:\n|$))+)", text):
        rows = [[cell.strip() for cell in line.split(" | ")] for line in block.strip().split("\n")]
        header = rows[0]
        for row in rows[1:]:
            match = re.search(_NUMBER + r"\s*(조|억|만|%|원)?", row[-1])
            if match and row[0] and hangul_share(row[0]) > 0.5:
                period = header[-1] if _PERIOD.fullmatch(header[-1]) else None
                figures.append({"name": row[0], "value": match[1], "unit": match[2], "period": period})
    return figures


def key_figures(text: str, prose: Sequence[str], limit: int = 10) -> list[dict[str, Any]]:
    """Figures exactly as the text writes them: tables first, then numbers in the prose."""
    figures = table_figures(text)
    for sentence in prose:
        for match in _FIGURE.finditer(sentence):
            before = sentence[max(0, match.start() - 24):match.start()]
            years = _PERIOD.findall(sentence[:match.start()])
            figures.append({"name": _figure_name(before, match[2]), "value": match[1],
                            "unit": re.sub(r"(\S)(원)$", r"\1 \2", match[2]),
                            "period": years[-1] if years else None})
    unique, seen = [], set()
    for figure in figures:
        identity = (figure["name"], figure["value"], figure["unit"])
        if identity not in seen:
            seen.add(identity)
            unique.append(figure)
    return unique[:limit]


def _first(pattern: str, text: str, group: int = 0) -> Optional[str]:
    match = re.search(pattern, text)
    return match[group] if match else None


def _summary_sentences(about: str, prose: Sequence[str], figures: Sequence[dict[str, Any]],
                       skip: Sequence[str]) -> list[str]:
    """3-5 sentences: the text's own first statements, a key figure, templated filler."""
    summary = [s for s in prose if s not in skip][:2]
    if figures:
        f = figures[0]
        when = f"{f['period']} " if f["period"] else ""
        summary.append(f"{about}의 {when}{josa(f['name'], '은')} "
                       f"{josa(f['value'] + (f['unit'] or ''), '으로')} 제시되었다.")
    summary += [s for s in prose if s in skip][:1]
    while len(summary) < 3:
        summary.append(f"보고서는 {about}의 사업 현황과 실적 흐름을 다룬다." if len(summary) < 2
                       else "세부 수치와 전망은 본문의 기재 내용을 따른다.")
    return summary[:5]


def summarize_map(user: str) -> dict[str, Any]:
    """A ReportSummary of one chunk, every field copied from (or absent in) the text."""
    title = _first(r"「(.*?)」", user, 1) or ""
    text = user.split("\n\n", 1)[1] if "\n\n" in user else user
    prose = report_prose(text)
    company = _first(_COMPANY.pattern, text) or (title if title and not title.endswith(".pdf") else None)
    figures = key_figures(text, prose)
    risks = [s for s in prose if any(w in s for w in _RISK_WORDS)][:3]
    outlook = next((s for s in prose if any(w in s for w in _OUTLOOK_WORDS) and s not in risks), None)
    summary = _summary_sentences(company or title or "이 보고서", prose, figures, risks + [outlook])
    return {"company": company, "ticker": _first(r"(?:종목코드|코드)\s*[:：]?\s*A?(\d{6})", text, 1)
            or _first(r"\(A?(\d{6})\)", text, 1),
            "report_date": _first(_DATE, text),
            "period": _first(_PERIOD.pattern, text),
            "report_type": "실적 리뷰" if "실적 리뷰" in text else "산업분석" if "산업분석" in text else "기업분석",
            "summary": " ".join(summary), "key_figures": figures, "risks": risks, "outlook": outlook,
            "rating": _first(r"투자의견\s*[:：]?\s*['\"‘“]?(매수|중립|보유|매도|Buy|BUY|Hold|HOLD|Sell|SELL)", text, 1),
            "target_price": _first(r"목표주가\s*[:：]?\s*(\d{1,3}(?:,\d{3})+|\d+)\s*원", text, 1)}


def summarize_reduce(user: str) -> dict[str, Any]:
    """The partial summaries of the prompt merged: first values, united lists."""
    partials = []
    for block in re.split(r"\n*\[부분 \d+\]\n", user)[1:]:
        try:
            partials.append(json.loads(block.strip()))
        except ValueError:
            continue
    merged: dict[str, Any] = {name: next((p.get(name) for p in partials if p.get(name)), None)
                              for name in ("company", "ticker", "report_date", "period", "report_type",
                                           "outlook", "rating", "target_price")}
    figures, risks, seen = [], [], set()
    for p in partials:
        for f in p.get("key_figures") or []:
            identity = (f.get("name"), f.get("value"), f.get("unit"), f.get("period"))
            if identity not in seen and len(figures) < 12:
                seen.add(identity)
                figures.append(f)
        risks += [r for r in p.get("risks") or [] if r not in risks]
    firsts = [sentences(p.get("summary") or "")[:1] for p in partials]
    summary = [s for first in firsts for s in first][:4]
    about = merged["company"] or "이 보고서"
    summary.append(f"종합하면 {about}의 실적과 전망은 {len(partials)}개 부분의 내용을 함께 보아야 한다.")
    return {**merged, "summary": " ".join(summary[:5]), "key_figures": figures, "risks": risks[:5]}


# ---------------------------------------------------------------------------- agent
def agent_question(user: str, wrong_rate: float, seed: int) -> tuple[dict[str, Any], str]:
    """A pandas code question over the table the prompt describes, like a model writes them:
    the key is right, most distractors differ, but some are equivalent to the key (``>=`` where
    ``>`` makes no difference, ``sort_values().head()`` for ``nlargest``), some name a column the
    table does not have, and with probability ``wrong_rate`` the letter names a distractor —
    what the sandbox must catch. Deterministic in the prompt."""
    columns = re.findall(r"^- (\S+): (\S+)$", user, re.M)
    numeric = [c for c, t in columns if t.startswith(("int", "float")) and c not in ("종목코드",)]
    n = int(re.search(r"선택지 개수: (\d+)", user).group(1))
    rng = rng_for("agent", seed, user)
    x = rng.choice(numeric)
    y = rng.choice(numeric)
    w = rng.choice([3, 5, 10, 20])
    k = rng.choice([3, 5, 10])
    panel = any(c == "종목명" for c, _ in columns)
    families = [
        (f"{y}이(가) 중앙값보다 큰 날의 평균 {x}을(를) 구하시오.",
         f"df[df['{y}'] > df['{y}'].median()]['{x}'].mean()",
         f"df.loc[df['{y}'].gt(df['{y}'].median()), '{x}'].mean()",
         [f"df[df['{y}'] >= df['{y}'].median()]['{x}'].mean()", f"df['{x}'].mean()",
          f"df[df['{y}'] < df['{y}'].median()]['{x}'].mean()",
          f"df[df['{y}'] > df['{y}'].median()]['{x}'].median()",
          f"df[df['{y}'] > df['{y}'].median()]['{x}'].sum()", f"df[df['{y}'] > df['{y}'].mean()]['{x}'].mean()"]),
        (f"{x}이(가) 가장 큰 {k}개 행의 날짜를 구하시오.",
         f"df.nlargest({k}, '{x}')['날짜']",
         f"df.sort_values('{x}', ascending=False, kind='stable').head({k})['날짜']",
         [f"df.sort_values('{x}', ascending=False).head({k})['날짜']", f"df.nsmallest({k}, '{x}')['날짜']",
          f"df.head({k})['날짜']", f"df.sort_values('{x}').tail({k})['날짜']", f"df.nlargest({k + 1}, '{x}')['날짜']",
          f"df.nlargest({k}, '{x}')['{x}']"]),
        (f"최근 {w}거래일 {x}의 이동평균(마지막 값)을 구하시오.",
         f"df['{x}'].rolling({w}).mean().iloc[-1]", f"df['{x}'].iloc[-{w}:].mean()",
         [f"df['{x}'].rolling({w + 1}).mean().iloc[-1]", f"df['{x}'].rolling({w}).mean().iloc[0]",
          f"df['{x}'].ewm(span={w}).mean().iloc[-1]", f"df['{x}'].rolling({w}).sum().iloc[-1]",
          f"df['{x}'].tail({w}).median()", f"df['{x}'].rolling({w}).mean().dropna().iloc[-1]"]),
        (f"기간 첫날 대비 마지막 날 {x}의 변화율(%)을 구하시오.",
         f"(df['{x}'].iloc[-1] / df['{x}'].iloc[0] - 1) * 100",
         f"(df['{x}'].pct_change().fillna(0) + 1).prod() * 100 - 100",
         [f"(df['{x}'].iloc[0] / df['{x}'].iloc[-1] - 1) * 100", f"df['{x}'].pct_change().mean() * 100",
          f"(df['{x}'].max() / df['{x}'].min() - 1) * 100", f"df['{x}'].iloc[-1] - df['{x}'].iloc[0]",
          f"(df['{x}'].iloc[-1] / df['시가총액'].iloc[0] - 1) * 100"]),
        (f"월별 {x} 평균을 구하시오.",
         f"df.groupby(df['날짜'].dt.month)['{x}'].mean()",
         f"df.set_index('날짜')['{x}'].groupby(lambda d: d.month).mean()",
         [f"df.groupby(df['날짜'].dt.month)['{x}'].sum()", f"df.groupby(df['날짜'].dt.day)['{x}'].mean()",
          f"df.groupby(df['날짜'].dt.month)['{x}'].median()", f"df['{x}'].mean()",
          f"df.groupby(df['날짜'].dt.month)['{x}'].max()"]),
    ]
    if panel:
        families.append((f"종목별 최대 {x}을(를) 구하시오.", f"df.groupby('종목명')['{x}'].max()",
                         f"df.sort_values('{x}').groupby('종목명')['{x}'].last()",
                         [f"df.groupby('종목명')['{x}'].min()", f"df['{x}'].max()",
                          f"df.groupby('종목명')['{x}'].mean()", f"df.groupby('종목코드')['{x}'].first()",
                          f"df.groupby('종목명')['{y}'].max()"]))
    task, key, reference, distractors = rng.choice(families)
    distractors = list(dict.fromkeys(d for d in distractors if d != key))
    rng.shuffle(distractors)
    options = [key] + distractors[:n - 1]
    while len(options) < n:
        options.append(f"df['{x}'].iloc[{len(options)}]")
    rng.shuffle(options)
    answer = options.index(key)
    kind = "keyed"
    if rng.random() < wrong_rate:
        answer, kind = (answer + 1) % n, "wrong_letter"
    return {"task": task, "options": options, "answer": "ABCDEFG"[answer],
            "reference": reference}, kind


# ---------------------------------------------------------------------------- the responder
class StandInResponder:
    """``responder(body)`` for tests/llm_server.py, with its ``label`` / ``usage`` / ``stats``
    hooks. Remembers the key of every question it writes (normalised stem -> key text)."""

    def __init__(self, seed: int = 0, keep_rate: float = 0.75, wrong_rate: float = 0.1,
                 quality_pass_rate: float = 0.95, enforce_max_tokens: bool = True):
        self.seed, self.keep_rate, self.wrong_rate = seed, keep_rate, wrong_rate
        self.quality_pass_rate, self.enforce_max_tokens = quality_pass_rate, enforce_max_tokens
        self.tokens = TokenCounter()
        self.memory: dict[str, str] = {}
        self.counts: Counter = Counter()
        self._lock = threading.Lock()
        self._handlers: dict[str, Callable[[dict[str, Any], Draw], dict[str, Any]]] = {
            "filter": self._filter, "transform": self._transform, "synthesize": self._synthesize,
            "solve": self._solve, "solve_quality": self._quality,
            "summarize_map": lambda body, draw: summarize_map(message_text(body, "user")),
            "summarize_reduce": lambda body, draw: summarize_reduce(message_text(body, "user")),
            "agent": self._agent}

    # -- hooks
    def __call__(self, body: dict[str, Any]) -> Any:
        stage = stage_of(body)
        handler = self._handlers.get(stage)
        try:
            content = json.dumps(handler(body, Draw.of(body)), ensure_ascii=False) if handler else None
        except (ValueError, IndexError, KeyError) as exc:  # a prompt it cannot read
            self._count(f"{stage}.unparsed ({type(exc).__name__})")
            content = None
        if content is None:
            content = echo_responder(body)
        self._count(f"{stage}.answers")
        limit = body.get("max_tokens") or body.get("max_completion_tokens")
        if self.enforce_max_tokens and limit and self.tokens.count(content) > int(limit):
            self._count(f"{stage}.over_max_tokens")
            return Reply(content=self.tokens.cut(content, int(limit)), finish_reason="length")
        return content

    def label(self, body: dict[str, Any]) -> str:
        return stage_of(body)

    def usage(self, body: dict[str, Any], text: str) -> tuple[int, int]:
        return self.tokens.prompt(body), max(1, self.tokens.count(text))

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"tokenizer": self.tokens.name, "memory": len(self.memory),
                    "counts": dict(sorted(self.counts.items()))}

    def _count(self, name: str) -> None:
        with self._lock:
            self.counts[name] += 1

    def _remember(self, stem: str, key: str) -> None:
        with self._lock:
            self.memory[fold(stem)] = fold(key)

    # -- stages
    def _filter(self, body: dict[str, Any], draw: Draw) -> dict[str, Any]:
        verdict = filter_verdict(message_text(body, "system"), message_text(body, "user"),
                                 self.keep_rate, self.seed)
        self._count("filter.relevant" if verdict["relevant"] else "filter.not_relevant")
        return verdict

    def _agent(self, body: dict[str, Any], draw: Draw) -> dict[str, Any]:
        answer, kind = agent_question(message_text(body, "user"), self.wrong_rate, self.seed)
        self._count(f"agent.{kind}")
        return answer

    def _transform(self, body: dict[str, Any], draw: Draw) -> dict[str, Any]:
        user = message_text(body, "user")
        rng = rng_for("transform", self.seed, user, draw.seed if draw.temperature else None)
        answer, stem, key = transform_answer(message_text(body, "system"), user, rng)
        self._remember(stem, key)
        return answer

    def _synthesize(self, body: dict[str, Any], draw: Draw) -> dict[str, Any]:
        user = message_text(body, "user")
        prompt = parse_synthesize(user)
        rng = rng_for("synthesize", self.seed, message_text(body, "system"), user)
        minor = rng_for("synthesize-draw", self.seed, user, draw.seed, draw.temperature)
        redraw = math.ceil(2 * draw.temperature)
        if "[근거 문서]" in user:   # company
            prompt = replace(prompt, chunk=user.split("[근거 문서]\n", 1)[1].split(
                "\n\n선택지 ", 1)[0])
            answer, stem, key, kind = synthesize_company(prompt, rng, self.wrong_rate)
            self._count(f"synthesize.company_{kind}")
        else:
            build = synthesize_grounded if prompt.chunk is not None else synthesize_plain
            answer, stem, key = build(prompt, rng, minor, redraw)
        self._remember(stem, key)
        return answer

    def known_key(self, question: Question, prompt: str = "") -> tuple[int, str]:
        """(key index, how it is known): memory of its own questions, a key the prompt states
        (``정답: X`` / ``[정답]``), else the watermark (right for its own questions)."""
        folded = [fold(c) for c in question.choices]
        remembered = self.memory.get(fold(question.stem))
        if remembered in folded:
            return folded.index(remembered), "memory"
        stated = re.search(r"(?:정답\s*[:：]\s*|\[정답\]\n)([A-G])\b", prompt)
        if stated and LETTERS.index(stated[1]) < len(folded):
            return LETTERS.index(stated[1]), "prompt"
        return max(range(len(folded)), key=lambda i: mark(question.stem, question.choices[i])), "watermark"

    def _solve(self, body: dict[str, Any], draw: Draw) -> dict[str, Any]:
        user = message_text(body, "user")
        question = parse_question(user)
        if question is None or not question.choices:
            raise ValueError("no question block")
        key, how = self.known_key(question, user)
        final = key
        if unit("wrong", self.seed, fold(question.stem), draw.seed, draw.temperature) < self.wrong_rate:
            final = rng_for("wrong-letter", fold(question.stem), draw.seed).choice(
                [i for i in range(len(question.choices)) if i != key] or [key])
        self._count(f"solve.key_from_{how}")
        self._count("solve.wrong" if final != key else "solve.right")
        return solution(question, final, rng_for("solution", self.seed, fold(question.stem), draw.seed))

    def _quality(self, body: dict[str, Any], draw: Draw) -> dict[str, Any]:
        verdict, passed = quality_verdict(message_text(body, "user"), self.quality_pass_rate, self.seed)
        self._count("solve_quality.pass" if passed else "solve_quality.fail")
        return verdict


def make_responder(**config: Any) -> StandInResponder:
    """The factory tests/llm_server.py calls in the server process (``"module:callable"``)."""
    return StandInResponder(**config)


# ---------------------------------------------------------------------------- the process
class StandIn:
    """The stand-in server in its own process: ``StandIn.start(**config)``, ``.base_url``,
    ``.stats()`` (``/_stats``), ``.stop()``; also a context manager."""

    def __init__(self, process: ServerProcess, config: StandInConfig):
        self.process, self.config = process, config
        self.base_url, self.port = process.base_url, process.port

    @classmethod
    def start(cls, **config: Any) -> "StandIn":
        """Options: :class:`StandInConfig`'s fields, faults also as ``fault_rates={...}``."""
        cfg = StandInConfig.from_options(**config)
        process = ServerProcess.start(latency_range=cfg.latency, fault_rates=cfg.fault_rates(),
                                      retry_after=cfg.retry_after, seed=cfg.seed, port=cfg.port,
                                      responder=RESPONDER, responder_config=cfg.responder_config(),
                                      keep_bodies=False)
        return cls(process, cfg)

    def stats(self) -> dict[str, Any]:
        """``/_stats`` plus ``replies`` (replies by kind) and ``by_stage`` (replies per stage)."""
        stats = self.process.stats()
        stats["replies"] = dict(stats.get("kinds") or {})
        stats["by_stage"] = {name: sum(entry["kinds"].values())
                             for name, entry in (stats.get("labels") or {}).items()}
        return stats

    def stop(self) -> None:
        self.process.stop()

    def __enter__(self) -> "StandIn":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def in_process_server(config: StandInConfig) -> LLMTestServer:
    """The same server on a background thread of this process (tests, the CLI)."""
    responder = StandInResponder(**config.responder_config())
    return LLMTestServer(responder, latency_range=config.latency, fault_rates=config.fault_rates(),
                         retry_after=config.retry_after, seed=config.seed, port=config.port,
                         usage=responder.usage, label=responder.label, extra_stats=responder.stats,
                         keep_bodies=False)


def parse_args(argv: Optional[Sequence[str]] = None) -> StandInConfig:
    d = StandInConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=d.port, help="0: a free port")
    parser.add_argument("--latency", type=float, nargs=2, default=d.latency, metavar=("LOW", "HIGH"))
    parser.add_argument("--seed", type=int, default=d.seed)
    for name in ("keep_rate", "wrong_rate", "quality_pass_rate", "invalid_json_rate", "truncated_rate",
                 "refusal_rate", "rate_limit_rate", "server_error_rate", "retry_after"):
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, type=float, default=getattr(d, name), help=f"default {getattr(d, name)}")
    parser.add_argument("--no-max-tokens", action="store_true", help="never cut at max_tokens")
    args = vars(parser.parse_args(argv))
    args["enforce_max_tokens"] = not args.pop("no_max_tokens")
    return StandInConfig(**args)


def _interrupt(*_: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM ends the CLI like Ctrl-C: stats printed, port closed


def main(argv: Optional[Sequence[str]] = None) -> None:
    config = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    server = in_process_server(config).start()
    print(server.base_url, flush=True)
    print(f"stand-in: {json.dumps(asdict(config), ensure_ascii=False)}; stats at "
          f"http://{HOST}:{server.port}/_stats; Ctrl-C stops", file=sys.stderr, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        print(json.dumps(server.stats(), ensure_ascii=False), file=sys.stderr)


if __name__ == "__main__":
    main()
