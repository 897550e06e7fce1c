"""synthesize@<domain>: new multiple-choice questions -> data/generated/<domain>/synthesized.parquet.

Contract:
- inputs (``params.synthesize.<domain>.inputs``): parquet files; their mcq records are the
  domain's existing questions (near-duplicate reference), their document records the chunks a
  *grounded* domain (``rules``) writes from. A few-shot YAML file (``fewshot``).
- plan (:func:`plan_slots`): exactly ``target`` slots. Slot ``i`` gets topic
  ``topics[i % len(topics)]`` (topics balanced to within one), an option count from
  ``choice_counts`` (each topic meets every count once per ``len(choice_counts)`` of its slots,
  for any number of topics), an angle from ``angles`` (the perspectives each topic's slots go
  through), in grounded mode the chunk ``chunks[i % len(chunks)]`` (chunks sorted by id), and
  a ``variant`` number when an earlier slot has all of those: every slot's request is
  distinct, so no two slots can be answered by one cached response. A slot's first request
  depends on ``i`` only, so raising ``target`` adds requests for the new slots and leaves the
  cached ones alone.
- rounds: every unfilled slot is asked (``sample_index`` = round; a re-asked slot is also shown
  up to ``avoid_stems`` stems accepted for its topic in earlier rounds); a draw is rejected (reject
  record with the reason) when the LLM item fails, the option count is not the slot's, choices
  are empty or repeated, the supporting quote (grounded) does not occur in the chunk after
  whitespace removal, or the question is a near-duplicate (char n-gram Jaccard ≥ threshold) of
  an existing or an already accepted question. Rejected slots are asked again next round, up
  to ``max_rounds``; slots still empty then are the shortfall: logged and in the metrics
  (``short``), never padded.
- output: mcq records, slot order; the correct choice is moved to a position drawn from a
  hash of the question's content (letters balanced, stable per question); ``id`` = content
  hash; meta keeps topic, slot, draw, generator explanation and, grounded, ``chunk_id``,
  ``doc_id``, ``page`` and the supporting quote. The key is verified later by ``solve``.
- fails (exit 2) when the inputs are unusable (grounded without chunks, few-shot file
  lacking an option count) or when more than ``max_reject_rate`` of the draws are rejected.
"""
from __future__ import annotations

import asyncio
import json
import random
import re
import string
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import yaml
from pydantic import BaseModel, Field, field_validator, model_validator

from stages.common.io import read_records, write_records
from stages.common.llm import LLMClient, LLMParams, LLMRequest, Result, read_llm_section
from stages.common.params import PARAMS_FILE, Strict
from stages.common.prompts import LETTERS, letter, letter_index, load_template, place_answer
from stages.common.runlog import (StageError, begin_stage, check_reject_rate, require_input,
                                  stage_main, stage_parser, write_metrics)
from stages.common.schema import SCHEMAS, reject, validate, validate_table
from stages.common.text import content_id, normalize_text, unspaced

PARAMS = ("synthesize.{key}", "llm_defaults")
STAGE = "synthesize"
TEMPLATES = ("synthesize_system.txt", "synthesize_user.txt", "synthesize_grounded_user.txt",
             "synthesize_company_user.txt")


# ---------------------------------------------------------------------------- params
class SynthesizeInputs(Strict):
    """Parquet files read; mcq records are existing questions (near-duplicate reference),
    document records are the chunks a grounded domain writes from. Two fixed slots because
    dvc.yaml deps cannot take a list; a domain without a transform repeats ``filtered``."""
    filtered: str
    transformed: str


# The default perspectives a topic's questions rotate through (params `angles` overrides).
ANGLES = ("핵심 개념과 정의", "제도·규정의 세부 내용", "실무 사례 적용", "계산과 수치 해석",
          "비교와 구분", "흔한 오해 바로잡기", "위험 요인과 관리", "절차와 순서",
          "시장 상황 변화의 영향", "예외와 한계")
AVOID_STEM_CHARS = 80


class SynthesizeParams(Strict):
    domain_description: str = Field(min_length=1, description="the domain, in Korean, for the prompt")
    grounded: bool = Field(False, description="write each question from a document chunk (rules)")
    figures: bool = Field(False, description=(
        "company documents (grounded): the company prompt; every figure the key states must be "
        "in the chunk, and a ratio or growth rate is recomputed from the figures it quotes"))
    inputs: SynthesizeInputs
    fewshot: str = Field(description="YAML file of example questions (at least one per option count)")
    fewshot_per_prompt: int = Field(1, ge=1, le=10, description="examples shown per request (same option count)")
    target: int = Field(ge=0, description="questions wanted, exactly; a shortfall is reported, never padded")
    topics: list[str] = Field(min_length=1, description="topics, balanced round robin over slots")
    choice_counts: list[int] = Field(default_factory=lambda: [7], description=(
        "option counts, balanced over slots and topics (4-7; the seed's format is 7, A-G)"))
    angles: list[str] = Field(default_factory=lambda: list(ANGLES), min_length=1, description=(
        "question perspectives; each topic's slots go through them, so no two requests repeat"))
    avoid_stems: int = Field(8, ge=0, le=50, description=(
        "re-asked slots are shown up to this many stems already accepted for their topic"))
    max_rounds: int = Field(5, ge=1, le=50, description="generation rounds; a rejected slot is re-asked next round")
    near_duplicate_threshold: float = Field(0.6, gt=0, le=1,
                                            description="char n-gram Jaccard at or above which a question is a near-duplicate")
    ngram: int = Field(3, ge=1, le=8, description="character n-gram size for the near-duplicate check")
    min_quote_chars: int = Field(10, ge=1, description="grounded: shortest supporting quote accepted")
    max_reject_rate: float = Field(0.5, ge=0, le=1, description="of all draws")
    llm: LLMParams

    @model_validator(mode="after")
    def _figures_grounded(self) -> "SynthesizeParams":
        if self.figures and not self.grounded:
            raise ValueError("figures: true needs grounded: true (figures are checked against the chunk)")
        return self

    @field_validator("choice_counts")
    @classmethod
    def _counts(cls, value: list[int]) -> list[int]:
        if not value or any(not 4 <= n <= 7 for n in value):
            raise ValueError("choice_counts must be a non-empty list of numbers in 4..7")
        return value


def load_params(key: str | None, path: str = PARAMS_FILE, cache_dir: str | None = None) -> SynthesizeParams:
    """``synthesize.<key>`` with ``llm_defaults`` merged under its ``llm``."""
    return read_llm_section(PARAMS, SynthesizeParams, key, path, cache_dir)


Letter = Literal["A", "B", "C", "D", "E", "F", "G"]
_CHOICE_PREFIX = re.compile(r"^\(?[A-Ga-g]\s*[.):]\s+")
_NOT_WORD = re.compile(r"[\W_]+", re.UNICODE)


# ------------------------------------------------------------------------ response models
class GeneratedMCQ(BaseModel):
    """What the generator returns for one slot."""
    question: str
    choices: list[str]
    answer: Letter
    explanation: str


class GroundedMCQ(GeneratedMCQ):
    """Grounded domains also quote the chunk sentence that supports the key."""
    supporting_quote: str


class Figure(BaseModel):
    name: str          # e.g. 영업이익
    value: str         # as the chunk writes it, e.g. "9,870"


class Calculation(BaseModel):
    """A computed figure in the key: ``ratio`` = numerator / denominator, ``growth`` =
    (numerator - denominator) / denominator (numerator the later value); in percent or times."""
    kind: Literal["ratio", "growth"]
    numerator: Figure
    denominator: Figure
    unit: Literal["%", "배"]


class CompanyMCQ(GroundedMCQ):
    """Company questions: a key that states a computed figure names how (null otherwise)."""
    calculation: Optional[Calculation]


def response_model(params: SynthesizeParams) -> type[GeneratedMCQ]:
    """What a slot's answer is validated as: company and grounded domains quote the chunk."""
    return CompanyMCQ if params.figures else GroundedMCQ if params.grounded else GeneratedMCQ


# ------------------------------------------------------------------------ planning
@dataclass(frozen=True)
class Slot:
    index: int
    topic: str
    n_choices: int
    chunk: Optional[dict[str, Any]] = None
    angle: str = ANGLES[0]
    variant: int = 0  # earlier slots with the same topic, count, angle and chunk

    @property
    def item_id(self) -> str:
        """The LLM item id (answers files, rejects, cache-miss lists)."""
        return f"slot{self.index:05d}"


def plan_slots(target: int, topics: Sequence[str], choice_counts: Sequence[int],
               chunks: Sequence[dict[str, Any]] = (), angles: Sequence[str] = ANGLES) -> list[Slot]:
    """Exactly ``target`` slots; slot ``i`` depends on ``i`` only (see module contract).

    Topic ``i mod T``; the ``k``-th slot of a topic (``k = i div T``) takes option count
    ``(i mod T + k) mod C`` — every topic meets every count once per ``C`` of its slots, for
    any number of topics — and angle ``(k div C) mod A``; ``variant`` numbers the slots that
    would otherwise ask the same thing, so every slot's request is distinct."""
    chunks = sorted(chunks, key=lambda c: c["id"])
    slots, seen = [], Counter()
    for i in range(target):
        topic_index, k = i % len(topics), i // len(topics)
        n = choice_counts[(topic_index + k) % len(choice_counts)]
        angle = angles[(k // len(choice_counts)) % len(angles)]
        chunk = chunks[i % len(chunks)] if chunks else None
        same = (topic_index, n, angle, chunk["text"] if chunk else None)  # what the prompt shows
        slots.append(Slot(i, topics[topic_index], n, chunk, angle, seen[same]))
        seen[same] += 1
    return slots


# ------------------------------------------------------------------------ few-shot examples
@dataclass(frozen=True)
class Example:
    question: str
    choices: tuple[str, ...]
    answer: str
    explanation: str
    topic: str = ""
    source_text: str = ""
    supporting_quote: str = ""
    calculation: Optional[dict[str, Any]] = None


def load_fewshot(path: str | Path) -> list[Example]:
    """``examples:`` list of {question, choices, answer (letter), explanation, topic?,
    source_text?, supporting_quote?}; StageError naming the file when malformed."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        examples = [Example(question=e["question"], choices=tuple(e["choices"]),
                            answer=e["answer"], explanation=e["explanation"],
                            topic=e.get("topic", ""), source_text=e.get("source_text", ""),
                            supporting_quote=e.get("supporting_quote", ""),
                            calculation=e.get("calculation"))
                    for e in data["examples"]]
    except FileNotFoundError:
        raise StageError(f"few-shot file {path} does not exist (param fewshot)") from None
    except (yaml.YAMLError, KeyError, TypeError) as exc:
        raise StageError(f"few-shot file {path} is malformed: {exc!r}") from None
    for e in examples:
        if not 4 <= len(e.choices) <= 7 or letter_index(e.answer) >= len(e.choices):
            raise StageError(f"few-shot file {path}: example {e.question[:30]!r} has "
                             f"{len(e.choices)} choices / answer {e.answer}")
    return examples


def fewshot_for(examples: Sequence[Example], n_choices: int, count: int, offset: int) -> list[Example]:
    """``count`` examples with exactly ``n_choices`` options, rotated by ``offset`` (slot)."""
    matching = [e for e in examples if len(e.choices) == n_choices]
    if not matching:
        raise StageError(f"no few-shot example with {n_choices} choices")
    return [matching[(offset + k) % len(matching)] for k in range(min(count, len(matching)))]


def render_example(example: Example, grounded: bool, figures: bool = False) -> str:
    """An example as the JSON answer the model should give (plus the chunk it came from)."""
    answer: dict[str, Any] = {"question": example.question, "choices": list(example.choices),
                              "answer": example.answer, "explanation": example.explanation}
    head = ""
    if grounded:
        answer["supporting_quote"] = example.supporting_quote
        head = f"[예시 근거 {'문서' if figures else '조문'}]\n{example.source_text}\n[예시 답]\n"
    if figures:
        answer["calculation"] = example.calculation
    return head + json.dumps(answer, ensure_ascii=False, indent=2)


def build_messages(slot: Slot, params: SynthesizeParams, examples: Sequence[Example],
                   templates: dict[str, str], avoid: Sequence[str] = ()) -> list[dict[str, str]]:
    """The request of one slot: its topic, angle and option count (and chunk), a few-shot
    example rotated by slot, and, for a re-asked slot, stems already accepted for its topic."""
    shots = fewshot_for(examples, slot.n_choices, params.fewshot_per_prompt, slot.index)
    variant = (f" (같은 주제·관점의 {slot.variant + 1}번째 문항: 앞의 문항들과 다른 상황·대상·수치를 쓰세요)"
               if slot.variant else "")
    avoid_block = ("\n\n이미 출제된 같은 주제의 문항입니다. 이들과 겹치지 않는 내용으로 출제하세요:\n"
                   + "\n".join(f"- {stem}" for stem in avoid)) if avoid else ""
    values = {"domain_description": params.domain_description, "topic": slot.topic,
              "angle": slot.angle, "variant": variant, "avoid": avoid_block,
              "n_choices": str(slot.n_choices),
              "letters": ", ".join(LETTERS[:slot.n_choices]),
              "fewshot": "\n\n".join(render_example(e, params.grounded, params.figures) for e in shots),
              "chunk": slot.chunk["text"] if slot.chunk else ""}
    name = ("synthesize_company_user.txt" if params.figures else
            "synthesize_grounded_user.txt" if params.grounded else "synthesize_user.txt")
    user = string.Template(templates[name]).substitute(values)
    return [{"role": "system", "content": templates["synthesize_system.txt"].strip()},
            {"role": "user", "content": user.strip()}]


# ------------------------------------------------------------------------ checks
def squeeze(text: str) -> str:
    """NFC without any whitespace: PDF line breaks and Korean spacing never decide a match."""
    return unspaced(unicodedata.normalize("NFC", text))


def quote_is_grounded(quote: str, chunk_text: str, min_chars: int) -> bool:
    """The quote occurs in the chunk after whitespace removal and is long enough to mean it."""
    q = squeeze(quote)
    return len(q) >= min_chars and q in squeeze(chunk_text)


def char_ngrams(text: str, n: int) -> frozenset[str]:
    """Character n-grams of the text lower-cased without spaces/punctuation (Korean-aware:
    syllables are characters, so no tokenizer is needed)."""
    flat = _NOT_WORD.sub("", unicodedata.normalize("NFC", text).lower())
    if len(flat) <= n:
        return frozenset([flat]) if flat else frozenset()
    return frozenset(flat[i:i + n] for i in range(len(flat) - n + 1))


def mcq_text(question: str, choices: Sequence[str]) -> str:
    """What near-duplicates are judged on: the stem plus the choices in a fixed order (a
    stem like "다음 중 옳은 것은?" alone says nothing; choice order must not matter)."""
    return question + "\n" + "\n".join(sorted(choices))


class NearDuplicateIndex:
    """Exact Jaccard over char n-gram sets, with an inverted index so a query only meets
    the items it shares n-grams with. Deterministic: ties go to the earliest added."""

    def __init__(self, n: int, threshold: float):
        self.n, self.threshold = n, threshold
        self._sets: list[frozenset[str]] = []
        self._ids: list[str] = []
        self._postings: dict[str, list[int]] = defaultdict(list)

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, item_id: str, text: str) -> None:
        grams = char_ngrams(text, self.n)
        position = len(self._ids)
        self._ids.append(item_id)
        self._sets.append(grams)
        for gram in grams:
            self._postings[gram].append(position)

    def nearest(self, text: str) -> tuple[Optional[str], float]:
        """(id, Jaccard) of the most similar indexed item, (None, 0.0) when none shares a gram."""
        grams = char_ngrams(text, self.n)
        shared: Counter = Counter()
        for gram in grams:
            shared.update(self._postings.get(gram, ()))
        best, best_score = None, 0.0
        for position in sorted(shared):
            inter = shared[position]
            score = inter / (len(grams) + len(self._sets[position]) - inter)
            if score > best_score:
                best, best_score = position, score
        return (self._ids[best] if best is not None else None), best_score

    def duplicate_of(self, text: str) -> Optional[tuple[str, float]]:
        item, score = self.nearest(text)
        return (item, score) if item is not None and score >= self.threshold else None


class CandidateError(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


_NUMBER = re.compile(r"(?<![\d.,])(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def numbers_in(text: str) -> list[tuple[float, int]]:
    """(value, decimals) of every number written in ``text`` ("95,400" -> (95400.0, 0))."""
    found = []
    for m in _NUMBER.finditer(unicodedata.normalize("NFKC", text)):
        digits = m.group(0).replace(",", "")
        found.append((float(digits), len(digits.split(".")[1]) if "." in digits else 0))
    return found


_DOWN = re.compile(r"감소|하락|줄었|줄어|악화|적자|(?<![\w.])[-−△]\s*\d")
_UP = re.compile(r"증가|상승|늘었|늘어|개선|흑자")


def direction(choice: str) -> int:
    """-1 when the choice says its figure fell ("3.2% 감소", "-3.2%", "△3.2"), +1 when it rose,
    0 when it does not say (a ratio)."""
    down, up = bool(_DOWN.search(choice)), bool(_UP.search(choice))
    return -1 if down and not up else 1 if up and not down else 0


def states(choice: str, value: float) -> bool:
    """The choice writes ``value`` rounded to the places it uses; a growth's sign is read from
    the choice's words ("3.2% 감소" states -3.2), a choice without direction words is read as
    the magnitude."""
    sign = direction(choice)
    if sign and (value > 0) != (sign > 0) and value != 0:
        return False
    return any(abs(abs(n) - abs(value)) <= 0.5 * 10 ** -d + 1e-9 for n, d in numbers_in(choice))


def check_figures(parsed: CompanyMCQ, question: str, choices: Sequence[str], answer: int,
                  chunk_text: str) -> dict[str, Any]:
    """Company questions: a ratio the key states is recomputed from the figures the model
    quotes, which must be in the chunk and in the question (whoever answers — solve, the
    evaluated model — sees the question, not the document); every other number in the key
    must be in the chunk. CandidateError with the reason otherwise; the checked calculation
    for the meta."""
    in_chunk = {value for value, _ in numbers_in(chunk_text)}
    in_question = {value for value, _ in numbers_in(question)}
    key_numbers = numbers_in(choices[answer])
    calc, computed = parsed.calculation, None
    if calc is not None:
        values = []
        for figure in (calc.numerator, calc.denominator):
            found = numbers_in(figure.value)
            if len(found) != 1 or found[0][0] not in in_chunk:
                raise CandidateError("figure_not_in_chunk",
                                     f"{figure.name} {figure.value!r} is not a figure of the chunk")
            if found[0][0] not in in_question:
                raise CandidateError("figure_not_in_question",
                                     f"{figure.name} {figure.value!r} is not stated in the question")
            values.append(found[0][0])
        a, b = values
        if b == 0:
            raise CandidateError("ratio_undefined", f"{calc.denominator.name} is 0")
        computed = (a / b if calc.kind == "ratio" else (a - b) / b) * (100 if calc.unit == "%" else 1)
        if not states(choices[answer], computed):
            raise CandidateError("ratio_mismatch", f"{calc.kind} {a:g}/{b:g} = {computed:.4g}{calc.unit}; "
                                                   f"the key says {choices[answer]!r}")
        twins = [LETTERS[i] for i, c in enumerate(choices) if i != answer
                 and states(c, computed)]
        if twins:
            raise CandidateError("ratio_ambiguous", f"choices {twins} also state {computed:.4g}{calc.unit}")
    for n, d in key_numbers:
        if n not in in_chunk and not (computed is not None
                                      and abs(abs(n) - abs(computed)) <= 0.5 * 10 ** -d + 1e-9):
            raise CandidateError("key_figure_not_in_chunk",
                                 f"{n:g} in the key is neither in the chunk nor computed from it")
    return {} if calc is None else {"calculation": {**calc.model_dump(), "computed": round(computed, 6)}}


def balance_answer(question: str, choices: list[str], answer: int) -> tuple[list[str], int]:
    """Move the correct choice to a position drawn from a hash of the content (not of the
    generator's letter: models favour some letters), keeping the other choices' order."""
    seed = int(content_id("answer-position", question, sorted(choices)), 16)
    target = random.Random(seed).randrange(len(choices))
    return place_answer(choices, answer, target), target


def to_record(parsed: GeneratedMCQ, slot: Slot, key: str, sample_index: int,
              min_quote_chars: int) -> dict[str, Any]:
    """A validated draw -> an mcq record; CandidateError with the reject reason otherwise."""
    question = normalize_text(parsed.question)
    choices = [normalize_text(_CHOICE_PREFIX.sub("", normalize_text(c))) for c in parsed.choices]
    if not question:
        raise CandidateError("empty_question")
    if len(choices) != slot.n_choices:
        raise CandidateError("wrong_choice_count", f"asked {slot.n_choices}, got {len(choices)}")
    if any(not c for c in choices):
        raise CandidateError("empty_choice")
    if len(set(choices)) != len(choices):
        raise CandidateError("duplicate_choices")
    answer = letter_index(parsed.answer)
    if answer >= len(choices):
        raise CandidateError("answer_out_of_range", f"answer {parsed.answer} with {len(choices)} choices")
    meta: dict[str, Any] = {"topic": slot.topic, "slot": slot.index, "sample_index": sample_index,
                            "generator_answer": parsed.answer,
                            "explanation": normalize_text(parsed.explanation)}
    if slot.chunk is not None:
        quote = normalize_text(getattr(parsed, "supporting_quote", ""))
        if not quote_is_grounded(quote, slot.chunk["text"], min_quote_chars):
            raise CandidateError("ungrounded", f"supporting quote not found in chunk "
                                               f"{slot.chunk['id']}: {quote[:80]!r}")
        meta.update(chunk_id=slot.chunk["id"], doc_id=slot.chunk.get("doc_id", ""),
                    page=slot.chunk.get("page", 0), supporting_quote=quote)
        if isinstance(parsed, CompanyMCQ):
            meta.update(check_figures(parsed, question, choices, answer, slot.chunk["text"]))
        chunk_meta = json.loads(slot.chunk.get("meta") or "{}")
        split = chunk_meta.get("split", "train")   # company: held-out companies -> test
        if "company" in chunk_meta:
            meta["company"] = chunk_meta["company"]
    else:
        split = "train"
    choices, answer = balance_answer(question, choices, answer)
    record = {"id": content_id("mcq", question, choices, answer), "source": f"{STAGE}_{key}",
              "domain": key, "split": split, "question": question, "choices": choices,
              "answer": answer, "category": slot.topic,
              "meta": json.dumps(meta, ensure_ascii=False, sort_keys=True)}
    problems = validate("mcq", record)
    if problems:
        raise CandidateError("invalid_record", "; ".join(problems))
    return record


# ------------------------------------------------------------------------ the rounds
@dataclass
class Synthesis:
    records: list[dict[str, Any]]
    rejects: list[dict[str, str]]
    short: int
    rounds: int
    draws: int
    reasons: Counter = field(default_factory=Counter)


async def synthesize(slots: Sequence[Slot], llm: LLMClient, *, key: str, params: SynthesizeParams,
                     examples: Sequence[Example], templates: dict[str, str],
                     index: NearDuplicateIndex, log: Any = None) -> Synthesis:
    """Fill ``slots`` over at most ``params.max_rounds`` rounds (module contract).

    ``index`` holds the existing questions; accepted ones are added to it as they come
    (in slot order within a round, so the outcome does not depend on response timing).
    """
    model = response_model(params)
    accepted: dict[int, dict[str, Any]] = {}
    rejects: list[dict[str, str]] = []
    reasons: Counter = Counter()
    pending, rounds, draws = list(slots), 0, 0
    for round_index in range(params.max_rounds):
        if not pending:
            break
        rounds += 1
        stems = accepted_stems(slots, accepted, params.avoid_stems)  # from earlier rounds only
        requests = [LLMRequest(build_messages(s, params, examples, templates, stems.get(s.topic, ())),
                               model, s.item_id, sample_index=round_index) for s in pending]
        results: list[Result] = await llm.run_many(requests, desc=f"synthesize@{key} round {round_index}")
        still = []
        for slot, result in zip(pending, results):
            draws += 1
            try:
                if not result.ok:
                    raise CandidateError(result.error or "llm_error", result.detail)
                record = to_record(result.parsed, slot, key, round_index, params.min_quote_chars)
                text = mcq_text(record["question"], record["choices"])
                dup = index.duplicate_of(text)
                if dup is not None:
                    raise CandidateError("near_duplicate", f"Jaccard {dup[1]:.2f} with {dup[0]}")
            except CandidateError as exc:
                reasons[exc.reason] += 1
                rejects.append(reject(STAGE, key, f"{slot.item_id}#{round_index}", exc.reason,
                                      exc.detail, result.raw))
                if log:
                    log.info("slot %s draw %d rejected: %s %s", slot.item_id, round_index,
                             exc.reason, exc.detail)
                still.append(slot)
                continue
            index.add(record["id"], text)
            accepted[slot.index] = record
        pending = still
    records = [accepted[s.index] for s in slots if s.index in accepted]
    return Synthesis(records, rejects, len(pending), rounds, draws, reasons)


def accepted_stems(slots: Sequence[Slot], accepted: dict[int, dict[str, Any]], limit: int
                   ) -> dict[str, list[str]]:
    """topic -> the last ``limit`` accepted question stems (slot order, cut to
    ``AVOID_STEM_CHARS``): what a re-asked slot of that topic is told not to repeat."""
    stems: dict[str, list[str]] = {}
    for slot in slots:
        if slot.index in accepted and limit:
            stems.setdefault(slot.topic, []).append(accepted[slot.index]["question"][:AVOID_STEM_CHARS])
    return {topic: found[-limit:] for topic, found in stems.items()}


# ------------------------------------------------------------------------ I/O
def read_inputs(paths: Sequence[str], param: str = "synthesize.<domain>.inputs"
                ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(existing mcq records, document chunks) from the input parquet files (each read once)."""
    questions: list[dict[str, Any]] = []
    chunks: list[dict[str, Any]] = []
    for path in dict.fromkeys(paths):
        require_input(path, param)
        records = read_records(path)
        if not records:
            continue
        columns = set(records[0])
        kind = next((k for k in ("mcq", "document") if columns == set(SCHEMAS[k].names)), None)
        if kind is None:
            raise StageError(f"input {path} holds neither mcq nor document records")
        validate_table(kind, records)
        (questions if kind == "mcq" else chunks).extend(records)
    return questions, chunks


@stage_main
def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__, "domain", cache_dir=True)
    args = parser.parse_args(argv)
    key = args.domain
    params, log, timer = begin_stage(args, "synthesize", key,
                                     lambda k, path: load_params(k, path, args.cache_dir))

    existing, chunks = read_inputs([params.inputs.filtered, params.inputs.transformed],
                                   f"synthesize.{key}.inputs")
    if params.grounded and not chunks:
        raise StageError(f"synthesize@{key}: grounded, but no document chunks in "
                         f"{params.inputs.filtered}")
    examples = load_fewshot(params.fewshot)
    for n in sorted(set(params.choice_counts)):
        fewshot_for(examples, n, 1, 0)  # fail now, naming the missing option count
    templates = {name: load_template(name) for name in TEMPLATES}
    index = NearDuplicateIndex(params.ngram, params.near_duplicate_threshold)
    for record in sorted(existing, key=lambda r: r["id"]):
        index.add(record["id"], mcq_text(record["question"], record["choices"]))
    slots = plan_slots(params.target, params.topics, params.choice_counts,
                       chunks if params.grounded else (), params.angles)

    async def run() -> tuple[Synthesis, dict[str, Any]]:
        async with LLMClient(params.llm, logger=log) as llm:
            outcome = await synthesize(slots, llm, key=key, params=params, examples=examples,
                                       templates=templates, index=index, log=log)
            return outcome, llm.accounting.as_metrics()
    outcome, accounting = asyncio.run(run())

    write_records(outcome.rejects, SCHEMAS["reject"], args.rejects)
    check_reject_rate(len(outcome.rejects), outcome.draws, params.max_reject_rate,
                      f"synthesize@{key}")
    validate_table("mcq", outcome.records)
    write_records(outcome.records, SCHEMAS["mcq"], args.out)
    if outcome.short:
        log.warning("synthesize@%s: %d of %d questions short after %d rounds (not padded)",
                    key, outcome.short, params.target, outcome.rounds)
    metrics = {"target": params.target, "records": len(outcome.records), "short": outcome.short,
               "rounds": outcome.rounds, "draws": outcome.draws, "rejected": len(outcome.rejects),
               "rejects_by_reason": dict(sorted(outcome.reasons.items())),
               "existing_questions": len(existing), "chunks": len(chunks),
               "topics": dict(sorted(Counter(r["category"] for r in outcome.records).items())),
               "splits": dict(sorted(Counter(r["split"] for r in outcome.records).items())),
               "choice_counts": {str(n): c for n, c in sorted(
                   Counter(len(r["choices"]) for r in outcome.records).items())},
               "answer_letters": dict(sorted(Counter(letter(r["answer"]) for r in outcome.records).items())),
               "llm": accounting, "seconds": timer.seconds}
    write_metrics(args.metrics, metrics)
    log.info("%d of %d questions (%d short) in %d rounds, %d draws rejected -> %s (%.1fs)",
             len(outcome.records), params.target, outcome.short, outcome.rounds,
             len(outcome.rejects), args.out, timer.seconds)


if __name__ == "__main__":
    main()
