"""transform@<domain>: 4-choice questions -> 7-choice (A–G) questions, correct answer tracked.

Contract:
- input (``params.transform.<domain>.input``): the filtered mcq records of the domain;
- the LLM rewrites each question into the domain's ``context`` with 7 choices, as a
  structured answer (:class:`SevenChoiceMCQ`): the choices in order, which one is correct,
  where each original choice went (``original_positions``), and whether the correct
  choice keeps the original correct answer's meaning (``keeps_original_answer``);
- checks (:func:`check_rewrite`), each failure a reject with its reason: ``empty_question``,
  ``wrong_choice_count`` (not 7), ``empty_choice``, ``duplicate_choices`` (also after
  whitespace/case folding), ``not_exactly_one_correct``, ``answer_meaning_changed`` (the model
  says the meaning changed), ``bad_mapping`` (positions not 4 distinct letters),
  ``answer_mismatch`` (the original correct choice did not go to the choice marked correct),
  ``mapping_inconsistent`` (an original choice kept verbatim sits elsewhere than its stated
  position). The original answer is therefore never lost, unlike the original scripts;
- LLM failures (transport errors, invalid answers after re-asks) are rejects
  ``llm_<reason>``; offline misses stop the stage listing them;
- letters: the correct choice is then moved to a letter balanced across A–G — the accepted
  items ranked by a hash of their id take A, B, …, G in turn — and the six distractors are
  shuffled with a RNG seeded by the item id: deterministic, and the letter histogram (in the
  metrics) differs by at most one between letters;
- output: mcq records (7 choices, ``answer`` = the correct index), input order; ``id`` = the
  content hash of the new question, meta = original question/choices/answer and id, the
  model's letter and raw answer, tokens. Fails when rejects exceed ``max_reject_rate``.
"""
from __future__ import annotations

import hashlib
import json
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from stages.common.io import read_records, write_records
from stages.common.llm import LLMParams, LLMRequest, Result, read_llm_section, run_batch
from stages.common.params import PARAMS_FILE, Strict
from stages.common.prompts import LETTERS, letter, letter_index, lettered, place_answer, render_template
from stages.common.runlog import (StageError, begin_stage, check_reject_rate, require_input,
                                  stage_main, stage_parser, write_metrics)
from stages.common.schema import SCHEMAS, reject, validate_table
from stages.common.text import content_id, normalize_text, unspaced

PARAMS = ("transform.{key}", "llm_defaults")
STAGE = "transform"
N_CHOICES = 7
TEMPLATES = ("transform_system.txt", "transform_user.txt")


# ---------------------------------------------------------------------------- params
class TransformParams(Strict):
    input: str = Field(description="filtered mcq parquet (4 choices)")
    context: str = Field(min_length=1, description="the setting the 7-choice rewrite is placed in (Korean)")
    max_reject_rate: float = Field(0.3, ge=0, le=1, description="rejects / items sent")
    llm: LLMParams


def load_params(key: str, path: str = PARAMS_FILE, cache_dir: str | None = None) -> TransformParams:
    """``transform.<key>`` with ``llm_defaults`` merged under its ``llm``."""
    return read_llm_section(PARAMS, TransformParams, key, path, cache_dir)


class TransformedChoice(BaseModel):
    text: str = Field(description="the choice sentence, without a leading letter")
    is_correct: bool


class SevenChoiceMCQ(BaseModel):
    """The rewrite as the model returns it (choices in order A–G)."""
    question: str = Field(description="the rewritten question (Korean)")
    choices: list[TransformedChoice] = Field(description="exactly 7 choices, A to G")
    original_positions: list[str] = Field(
        description="for the original choices A, B, C, D in order: the new letter (A-G) of each")
    keeps_original_answer: bool = Field(
        description="the correct choice has the same meaning as the original correct answer")


class TransformReject(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def _fold(text: str) -> str:
    """Comparison form: NFC, case-folded, whitespace removed, final period dropped."""
    return unspaced(unicodedata.normalize("NFC", text).casefold()).rstrip(".")


# ---------------------------------------------------------------------------- pure steps
def transform_messages(record: dict[str, Any], context: str) -> list[dict[str, str]]:
    answer = record["answer"]
    system = render_template("transform_system.txt", context=context.strip())
    user = render_template("transform_user.txt", question=record["question"],
                           choices=lettered(record["choices"]), answer_letter=letter(answer),
                           answer_text=record["choices"][answer])
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def check_rewrite(original: dict[str, Any], rewrite: SevenChoiceMCQ) -> tuple[str, list[str], int]:
    """(question, 7 choices, correct index) of a rewrite that keeps the original answer;
    :class:`TransformReject` naming the first failed check otherwise (module contract)."""
    question = normalize_text(rewrite.question)
    if not question:
        raise TransformReject("empty_question")
    if len(rewrite.choices) != N_CHOICES:
        raise TransformReject("wrong_choice_count", f"{len(rewrite.choices)} choices, need {N_CHOICES}")
    choices = [normalize_text(c.text) for c in rewrite.choices]
    empty = [letter(i) for i, c in enumerate(choices) if not c]
    if empty:
        raise TransformReject("empty_choice", f"choice(s) {', '.join(empty)} empty")
    folded = [_fold(c) for c in choices]
    duplicates = sorted({letter(i) for i, f in enumerate(folded) if folded.count(f) > 1})
    if duplicates:
        raise TransformReject("duplicate_choices", f"choices {', '.join(duplicates)} say the same")
    correct = [i for i, c in enumerate(rewrite.choices) if c.is_correct]
    if len(correct) != 1:
        raise TransformReject("not_exactly_one_correct",
                              f"{len(correct)} choices marked correct: {[letter(i) for i in correct]}")
    if not rewrite.keeps_original_answer:
        raise TransformReject("answer_meaning_changed",
                              "the model says the correct choice no longer means the original answer")
    n_original = len(original["choices"])
    try:
        positions = [letter_index(p) for p in rewrite.original_positions]
    except ValueError as exc:
        raise TransformReject("bad_mapping", str(exc)) from None
    if len(positions) != n_original or len(set(positions)) != n_original:
        raise TransformReject("bad_mapping", f"original_positions {rewrite.original_positions} are "
                                             f"not {n_original} distinct letters")
    if positions[original["answer"]] != correct[0]:
        raise TransformReject("answer_mismatch",
                              f"original answer {letter(original['answer'])} went to "
                              f"{letter(positions[original['answer']])}, but {letter(correct[0])} "
                              "is marked correct")
    for i, text in enumerate(original["choices"]):
        where = [j for j, f in enumerate(folded) if f == _fold(text)]
        if where and where[0] != positions[i]:
            raise TransformReject("mapping_inconsistent",
                                  f"original {letter(i)} appears verbatim at {letter(where[0])}, "
                                  f"not at its stated position {letter(positions[i])}")
    return question, choices, correct[0]


def _hash_int(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def balanced_targets(item_ids: list[str]) -> dict[str, int]:
    """Correct-answer index per item: items ranked by a hash of their id take A…G in turn,
    so every letter is used equally (±1) and an item's letter does not depend on the
    model's choice of position or on the input order."""
    ranked = sorted(item_ids, key=lambda i: (_hash_int(i), i))
    return {item: rank % N_CHOICES for rank, item in enumerate(ranked)}


def split_askable(records: list[dict[str, Any]], key: str
                  ) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """(records worth a request, rejects): an original whose choices repeat (after folding
    case and spacing) can never pass :func:`check_rewrite` — kept word for word it fails
    ``duplicate_choices``, reworded it fails ``mapping_inconsistent`` — so it is not sent."""
    askable, rejects = [], []
    for record in records:
        folded = [_fold(normalize_text(c)) for c in record["choices"]]
        twins = sorted({letter(i) for i, f in enumerate(folded) if folded.count(f) > 1})
        if twins:
            rejects.append(reject(STAGE, key, record["id"], "original_duplicate_choices",
                                  f"original choices {', '.join(twins)} say the same"))
        else:
            askable.append(record)
    return askable, rejects


def build_records(records: list[dict[str, Any]], results: list[Result], key: str
                  ) -> tuple[list[dict[str, Any]], list[dict[str, str]], Counter]:
    """LLM results -> (7-choice records, rejects, model-letter counts). Pure."""
    accepted: list[tuple[dict[str, Any], Result, str, list[str], int]] = []
    rejects = []
    model_letters: Counter = Counter()
    for record, result in zip(records, results, strict=True):
        if not result.ok:
            rejects.append(reject(STAGE, key, record["id"], f"llm_{result.error}", result.detail,
                                  {"raw": result.raw}))
            continue
        try:
            question, choices, correct = check_rewrite(record, result.parsed)  # type: ignore[arg-type]
        except TransformReject as exc:
            rejects.append(reject(STAGE, key, record["id"], exc.reason, exc.detail, {"raw": result.raw}))
            continue
        model_letters[letter(correct)] += 1
        accepted.append((record, result, question, choices, correct))
    targets = balanced_targets([record["id"] for record, *_ in accepted])
    out = []
    for record, result, question, choices, correct in accepted:
        target = targets[record["id"]]
        # the distractors shuffled by a RNG seeded with the item id: deterministic per item
        placed = place_answer(choices, correct, target, shuffle_seed=_hash_int(record["id"]))
        meta = {"source_id": record["id"],
                "original": {"question": record["question"], "choices": record["choices"],
                             "answer": record["answer"]},
                "model_answer": letter(correct), "raw": result.raw,
                "tokens": {"prompt": result.usage.prompt_tokens,
                           "completion": result.usage.completion_tokens}}
        out.append({"id": content_id("mcq", question, placed, target), "source": record["source"],
                    "domain": key, "split": record["split"], "question": question,
                    "choices": placed, "answer": target, "category": record["category"],
                    "meta": json.dumps(meta, ensure_ascii=False, sort_keys=True)})
    return out, rejects, model_letters


def letter_histogram(records: list[dict[str, Any]]) -> dict[str, int]:
    counts = Counter(LETTERS[r["answer"]] for r in records)
    return {ch: counts[ch] for ch in LETTERS[:N_CHOICES]}


@stage_main
def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__, "domain", cache_dir=True)
    args = parser.parse_args(argv)
    key = args.domain
    params, log, timer = begin_stage(args, "transform", key,
                                     lambda k, path: load_params(k, path, args.cache_dir))

    path = Path(params.input)
    require_input(path, f"transform.{key}.input", "run filter first")
    records = read_records(path)
    try:
        validate_table("mcq", records)
    except ValueError as exc:
        raise StageError(f"transform@{key}: {path}: {exc}") from None
    if not records:
        raise StageError(f"transform@{key}: {path} has no questions")
    askable, unaskable = split_askable(records, key)
    requests = [LLMRequest(transform_messages(r, params.context), SevenChoiceMCQ, r["id"]) for r in askable]
    log.info("%d questions -> 7 choices with %s", len(records), params.llm.model)
    results, accounting = run_batch(params.llm, requests, logger=log, desc=f"transform@{key}")
    out, rejects, model_letters = build_records(askable, results, key)
    rejects = unaskable + rejects
    for r in rejects:
        log.info("reject %s: %s %s", r["item"], r["reason"], r["detail"])
    write_records(rejects, SCHEMAS["reject"], args.rejects)
    check_reject_rate(len(rejects), len(records), params.max_reject_rate, f"transform@{key}")
    if not out:
        raise StageError(f"transform@{key}: no question survived; see {args.rejects}")
    validate_table("mcq", out)
    write_records(out, SCHEMAS["mcq"], args.out)
    letters = letter_histogram(out)
    write_metrics(args.metrics, {
        "items": len(records), "records": len(out), "rejected": len(rejects),
        "rejects_by_reason": dict(sorted(Counter(r["reason"] for r in rejects).items())),
        "answer_letters": letters,
        "answer_letters_from_model": {ch: model_letters[ch] for ch in LETTERS[:N_CHOICES]},
        "letter_spread": max(letters.values()) - min(letters.values()),
        "llm": accounting.as_metrics(), "seconds": timer.seconds})
    log.info("%d of %d questions -> 7 choices (%d rejected), letters %s -> %s; %d LLM calls, "
             "%d cached, $%.4f", len(out), len(records), len(rejects), letters, args.out,
             accounting.calls, accounting.cache_hits, accounting.cost_usd)


if __name__ == "__main__":
    main()
