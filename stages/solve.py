"""solve@<domain>: verified two-step solutions -> data/generated/<domain>/{questions,pairs}.parquet.

Contract:
- inputs (``params.solve.<domain>.inputs``): mcq parquet files (transformed + synthesized for
  the KMMLU domains, synthesized only for ``rules``). Records with the same id are solved
  once; a record from the ``test`` split is rejected (``test_split``): the evaluation set never
  becomes training data. Except with ``test_split: verify`` (``company``, whose held-out
  companies' questions are an evaluation set the pipeline writes): then every test question is
  solved and checked like the others, apart from the target, and a verified one is written to
  ``questions.parquet`` with its split — never to ``pairs.parquet``.
- which questions: candidates in a stable order — sorted by ``id`` (a content hash, so the
  order mixes the inputs evenly and does not depend on file order). The first ``target_pairs
  / 2`` are solved; every question that fails verification is replaced by the next candidate
  in that order, wave after wave, until the target is met or the candidates run out. Nothing
  is truncated blindly and nothing is padded: a shortfall is logged and reported in the
  metrics (``short_pairs``). ``target_pairs: null`` solves every candidate.
- step 1: the solver gets the question without its key and answers as structured output
  (analysis, a review of every choice, derivation, final letter). It is accepted only when
  every choice is reviewed once and the letter equals the known answer; otherwise the item is
  re-sampled with ``sample_index`` 1..``max_resamples``, then rejected (``wrong_letter`` if
  any draw named a wrong letter, else the last reason). For a synthesized question this is
  the independent check of the generator's key: disagreement is a reject.
- optional quality gate (``quality.enabled``): one more structured call scores the question
  and solution 0–5 and flags hallucination; below ``min_score`` -> ``low_quality``, flagged ->
  ``hallucination``.
- outputs: ``questions.parquet`` (mcq, the verified questions by id, solution text in meta as
  ``"solution"``) and ``pairs.parquet`` (qa, two per question: ``step1`` prompt -> solution,
  ``step2`` prompt -> letter; prompts exactly :func:`stages.common.prompts.step1_prompt` /
  ``step2_prompt``), rejects and metrics. Also, outside the DVC outputs (they carry a
  timestamp), the original pipeline's files in ``--exports``: ``final_training_data_<ts>.json``
  (list of ``{prompt, response}``), ``processing_stats_<ts>.json`` and ``processing_<ts>.log``.
- fails (exit 2) when no input question exists or the reject rate over attempted questions is
  above ``max_reject_rate``.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import string
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

from pydantic import BaseModel, Field, field_validator

from stages.common.io import read_records, write_json, write_records
from stages.common.llm import CacheMissError, LLMClient, LLMParams, read_llm_section, run_all
from stages.common.params import PARAMS_FILE, Strict
from stages.common.prompts import (LETTERS, letter, letter_index, load_template,
                                   mcq_question_block, step1_prompt, step2_prompt)
from stages.common.runlog import (StageError, begin_stage, check_reject_rate, require_input,
                                  stage_main, stage_parser, write_metrics)
from stages.common.schema import SCHEMAS, reject, validate_table
from stages.common.text import content_id

PARAMS = ("solve.{key}", "llm_defaults")
STAGE = "solve"
TEMPLATES = ("solve_system.txt", "solve_user.txt", "solve_quality_system.txt",
             "solve_quality_user.txt")


# ---------------------------------------------------------------------------- params
class SolveInputs(Strict):
    """mcq parquet files to solve; ``rules`` (no transform) repeats ``synthesized``."""
    transformed: str
    synthesized: str


class QualityParams(Strict):
    enabled: bool = Field(False, description="LLM quality score (0-5) + hallucination flag per item")
    min_score: int = Field(3, ge=0, le=5, description="items scored below this are rejected")
    reject_hallucination: bool = True


class SolveParams(Strict):
    inputs: SolveInputs
    target_pairs: Optional[int] = Field(
        description="pairs wanted, exactly (2 per question); null = every question that verifies")
    max_resamples: int = Field(2, ge=0, le=20, description="re-samples (sample_index 1..k) after a wrong first solution")
    quality: QualityParams = Field(default_factory=QualityParams)
    max_reject_rate: float = Field(0.5, ge=0, le=1, description="of the questions attempted")
    test_split: Literal["reject", "verify"] = Field("reject", description=(
        "test-split inputs: reject (an evaluation set never reaches solve) or verify (all of "
        "them, apart from the target, written as questions and never as pairs)"))
    llm: LLMParams

    @field_validator("target_pairs")
    @classmethod
    def _even(cls, value: Optional[int]) -> Optional[int]:
        if value is not None and (value < 0 or value % 2):
            raise ValueError("target_pairs must be a non-negative even number (2 pairs per question)")
        return value


def load_params(key: str | None, path: str = PARAMS_FILE, cache_dir: str | None = None) -> SolveParams:
    """``solve.<key>`` with ``llm_defaults`` merged under its ``llm``."""
    return read_llm_section(PARAMS, SolveParams, key, path, cache_dir)


Letter = Literal["A", "B", "C", "D", "E", "F", "G"]


# ------------------------------------------------------------------------ response models
class ChoiceReview(BaseModel):
    letter: Letter
    assessment: str


class Solution(BaseModel):
    """Step 1 as structured output: the solver never sees the key."""
    analysis: str
    choice_reviews: list[ChoiceReview]
    derivation: str
    final_letter: Letter


class QualityVerdict(BaseModel):
    score: Literal[0, 1, 2, 3, 4, 5]
    hallucination: bool
    reason: str


# ------------------------------------------------------------------------ pure helpers
def quality_item_id(question_id: str) -> str:
    return f"{question_id}:quality"


def solve_messages(question: dict[str, Any], templates: dict[str, str]) -> list[dict[str, str]]:
    user = string.Template(templates["solve_user.txt"]).substitute(
        letters=", ".join(LETTERS[:len(question["choices"])]),
        question_block=mcq_question_block(question["question"], question["choices"]))
    return [{"role": "system", "content": templates["solve_system.txt"].strip()},
            {"role": "user", "content": user.strip()}]


def quality_messages(question: dict[str, Any], solution: str,
                     templates: dict[str, str]) -> list[dict[str, str]]:
    user = string.Template(templates["solve_quality_user.txt"]).substitute(
        question_block=mcq_question_block(question["question"], question["choices"]),
        answer_letter=letter(question["answer"]), solution=solution)
    return [{"role": "system", "content": templates["solve_quality_system.txt"].strip()},
            {"role": "user", "content": user.strip()}]


def check_solution(solution: Solution, question: dict[str, Any]) -> Optional[tuple[str, str]]:
    """None when the solution is acceptable, else (reason, detail)."""
    n = len(question["choices"])
    reviewed = [r.letter for r in solution.choice_reviews]
    wanted = list(LETTERS[:n])
    if sorted(reviewed) != wanted or any(not r.assessment.strip() for r in solution.choice_reviews):
        return "incomplete_review", f"reviewed {''.join(reviewed) or 'nothing'}, need {''.join(wanted)}"
    if letter_index(solution.final_letter) != question["answer"]:
        return "wrong_letter", (f"solver answered {solution.final_letter}, "
                                f"key is {letter(question['answer'])}")
    return None


def render_solution(solution: Solution) -> str:
    """The step-1 response: analysis, every choice reviewed in letter order, derivation,
    and the conclusion naming the letter."""
    reviews = sorted(solution.choice_reviews, key=lambda r: r.letter)
    lines = [f"문제 분석: {solution.analysis.strip()}", "선택지 검토:"]
    lines += [f"{r.letter}. {r.assessment.strip()}" for r in reviews]
    lines += [f"정답 도출: {solution.derivation.strip()}",
              f"따라서 정답은 {solution.final_letter}입니다."]
    return "\n".join(lines)


def make_pairs(question: dict[str, Any], solution: str, domain: str) -> list[dict[str, Any]]:
    """The two qa training records of one verified question (step 1, step 2)."""
    p1 = step1_prompt(question["question"], question["choices"])
    p2 = step2_prompt(question["question"], question["choices"], solution)
    answer = letter(question["answer"])
    records = []
    for step, prompt, response in (("step1", p1, solution.strip()), ("step2", p2, answer)):
        meta = json.dumps({"question_id": question["id"], "question_source": question["source"],
                           "step": step}, ensure_ascii=False, sort_keys=True)
        records.append({"id": content_id("qa", prompt, response, ""), "source": f"{STAGE}_{domain}",
                        "domain": domain, "split": "train", "question": prompt, "answer": response,
                        "context": "", "category": step, "meta": meta})
    return records


def seed_format(pairs: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """The original ``final_training_data_*.json``: a list of ``{prompt, response}``."""
    return [{"prompt": p["question"], "response": p["answer"]} for p in pairs]


def select_candidates(inputs: Sequence[Sequence[dict[str, Any]]], domain: str,
                      split: str = "train") -> tuple[list[dict[str, Any]], list[dict[str, str]], int]:
    """(candidates sorted by id, rejects, duplicates): one record per id (first input
    wins), the test split rejected. ``split="test"``: the test split's candidates instead
    (``test_split: verify``), nothing rejected."""
    seen: dict[str, dict[str, Any]] = {}
    rejects, duplicates = [], 0
    for records in inputs:
        for record in records:
            if split == "test":
                if record["split"] == "test" and record["id"] not in seen:
                    seen[record["id"]] = record
            elif record["split"] == "test":
                rejects.append(reject(STAGE, domain, record["id"], "test_split",
                                      "the evaluation split is never used for training"))
            elif record["id"] in seen:
                duplicates += 1
            else:
                seen[record["id"]] = record
    return [seen[i] for i in sorted(seen)], rejects, duplicates


# ------------------------------------------------------------------------ solving
@dataclass
class Outcome:
    question: dict[str, Any]
    solution: Optional[str] = None
    sample_index: Optional[int] = None
    draws: int = 0
    reason: Optional[str] = None
    detail: str = ""
    raw: Optional[str] = None
    quality: Optional[dict[str, Any]] = None
    missing: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.solution is not None


async def solve_one(question: dict[str, Any], llm: LLMClient, params: SolveParams,
                    templates: dict[str, str]) -> Outcome:
    """Draw solutions (sample_index 0..max_resamples) until one is right; then the optional
    quality gate. Offline misses are returned in ``missing`` (collected batch-wide)."""
    outcome = Outcome(question)
    messages = solve_messages(question, templates)
    failures: list[tuple[str, str, Optional[str]]] = []
    try:
        for sample_index in range(params.max_resamples + 1):
            outcome.draws += 1
            result = await llm.complete(messages, Solution, sample_index=sample_index,
                                        item_id=question["id"])
            if not result.ok:
                failures.append((result.error or "llm_error", result.detail, result.raw))
                continue
            problem = check_solution(result.parsed, question)
            if problem is not None:
                failures.append((*problem, result.raw))
                continue
            solution = render_solution(result.parsed)
            if params.quality.enabled:
                verdict = await llm.complete(quality_messages(question, solution, templates),
                                             QualityVerdict, item_id=quality_item_id(question["id"]))
                if not verdict.ok:
                    outcome.reason, outcome.detail, outcome.raw = (
                        f"quality_{verdict.error}", verdict.detail, verdict.raw)
                    return outcome
                v = verdict.parsed
                outcome.quality = {"score": v.score, "hallucination": v.hallucination,
                                   "reason": v.reason}
                if params.quality.reject_hallucination and v.hallucination:
                    outcome.reason, outcome.detail = "hallucination", v.reason
                    return outcome
                if v.score < params.quality.min_score:
                    outcome.reason, outcome.detail = "low_quality", f"score {v.score}: {v.reason}"
                    return outcome
            outcome.solution, outcome.sample_index = solution, sample_index
            return outcome
    except CacheMissError as exc:
        outcome.missing = list(exc.missing)
        return outcome
    reasons = [f[0] for f in failures]
    pick = failures[reasons.index("wrong_letter")] if "wrong_letter" in reasons else failures[-1]
    outcome.reason, outcome.detail, outcome.raw = pick
    if len(failures) > 1:
        outcome.detail += f" (all {len(failures)} draws failed: {', '.join(reasons)})"
    return outcome


async def solve_questions(candidates: Sequence[dict[str, Any]], llm: LLMClient,
                          params: SolveParams, templates: dict[str, str], *, key: str = "",
                          log: Optional[logging.Logger] = None) -> tuple[list[Outcome], int]:
    """Waves over ``candidates`` (already in selection order) until the target number of
    questions verifies or the candidates run out. Returns (outcomes of every attempted
    question, in candidate order; number of candidates not needed)."""
    wanted = None if params.target_pairs is None else params.target_pairs // 2
    outcomes: list[Outcome] = []
    verified, cursor = 0, 0
    while cursor < len(candidates) and (wanted is None or verified < wanted):
        take = len(candidates) - cursor if wanted is None else wanted - verified
        wave = candidates[cursor:cursor + take]
        cursor += len(wave)
        results = await run_all([solve_one(q, llm, params, templates) for q in wave], f"solve@{key}")
        missing = [m for r in results for m in r.missing]
        if missing:
            raise CacheMissError(missing, llm.cache.root)
        outcomes += results
        verified += sum(r.ok for r in results)
        if log:
            log.info("wave of %d: %d verified so far (want %s)", len(wave), verified,
                     "all" if wanted is None else wanted)
    return outcomes, len(candidates) - cursor


def build_outputs(outcomes: Sequence[Outcome], domain: str
                  ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, str]]]:
    """(verified questions by id with the solution in meta, pairs, rejects); a test-split
    question is verified but makes no pairs."""
    questions, pairs, rejects = [], [], []
    for o in sorted(outcomes, key=lambda o: o.question["id"]):
        q = o.question
        if not o.ok:
            rejects.append(reject(STAGE, domain, q["id"], o.reason or "unknown", o.detail, o.raw))
            continue
        meta = json.loads(q["meta"] or "{}")
        meta.update(solution=o.solution, solve={"sample_index": o.sample_index, "draws": o.draws,
                                                "quality": o.quality})
        questions.append({**q, "meta": json.dumps(meta, ensure_ascii=False, sort_keys=True)})
        if q["split"] != "test":
            pairs += make_pairs(q, o.solution, domain)
    return questions, pairs, rejects


# ------------------------------------------------------------------------ I/O
def write_exports(directory: str | Path, stamp: str, pairs: Sequence[dict[str, Any]],
                  stats: dict[str, Any]) -> list[Path]:
    """The original pipeline's files (timestamped; not DVC outputs)."""
    directory = Path(directory)
    data = directory / f"final_training_data_{stamp}.json"
    stats_path = directory / f"processing_stats_{stamp}.json"
    write_json(seed_format(pairs), data)
    write_json({**stats, "timestamp": stamp}, stats_path)
    return [data, stats_path]


@stage_main
def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__, "domain", out_help="questions.parquet", cache_dir=True)
    parser.add_argument("--pairs", required=True, help="pairs.parquet")
    parser.add_argument("--exports", required=True, help="directory for the original-format files")
    args = parser.parse_args(argv)
    key = args.domain
    params, log, timer = begin_stage(args, "solve", key,
                                     lambda k, path: load_params(k, path, args.cache_dir))
    stamp = datetime.now().strftime("%Y%m%d_%H%M%S")
    export_log, handler = _add_export_log(log, args.exports, stamp)

    inputs = _read_inputs(params, key, log)
    candidates, input_rejects, duplicates = select_candidates(inputs, key)
    if params.test_split == "verify":
        input_rejects = []
        held_out = select_candidates(inputs, key, split="test")[0]
        log.info("%d test-split questions to verify (apart from the target)", len(held_out))
    else:
        held_out = []
    if not candidates:
        raise StageError(f"solve@{key}: no questions in {params.inputs.transformed} / "
                         f"{params.inputs.synthesized}")
    templates = {name: load_template(name) for name in TEMPLATES}
    outcomes, unused, accounting = asyncio.run(_solve_all(candidates, held_out, params, templates,
                                                          key, log))

    questions, pairs, rejects = _write_outputs(args, key, params, outcomes, input_rejects, log)
    target = params.target_pairs
    short = 0 if target is None else target - len(pairs)
    if short:
        log.warning("solve@%s: %d pairs short of the target %d (%d candidates, %d verified); "
                    "not padded", key, short, target, len(candidates), len(questions))
    metrics = _metrics(candidates, duplicates, outcomes, unused, questions, pairs, rejects,
                       target, short, accounting, timer.seconds)
    write_metrics(args.metrics, metrics)
    written = write_exports(args.exports, stamp, pairs, metrics)
    log.info("%d questions verified -> %d pairs (%s) -> %s, %s; exports: %s (%.1fs)",
             len(questions), len(pairs), f"{short} short" if short else "target met",
             args.out, args.pairs, ", ".join(str(p) for p in written + [export_log]), timer.seconds)
    handler.close()
    log.removeHandler(handler)


def _add_export_log(log: logging.Logger, exports: str, stamp: str) -> tuple[Path, logging.FileHandler]:
    """Also log to ``<exports>/processing_<stamp>.log`` (the original pipeline's log file)."""
    export_log = Path(exports) / f"processing_{stamp}.log"
    export_log.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(export_log, mode="w", encoding="utf-8")
    handler.setFormatter(log.handlers[0].formatter)
    log.addHandler(handler)
    return export_log, handler


def _read_inputs(params: SolveParams, key: str, log: logging.Logger) -> list[list[dict[str, Any]]]:
    """The records of each distinct input file, validated as ``mcq``."""
    inputs = []
    for path in dict.fromkeys([params.inputs.transformed, params.inputs.synthesized]):
        require_input(path, f"solve.{key}.inputs")
        records = read_records(path)
        validate_table("mcq", records)
        inputs.append(records)
        log.info("%d questions from %s", len(records), path)
    return inputs


async def _solve_all(candidates: Sequence[dict[str, Any]], held_out: Sequence[dict[str, Any]],
                     params: SolveParams, templates: dict[str, str], key: str, log: logging.Logger
                     ) -> tuple[list[Outcome], int, dict[str, Any]]:
    """:func:`solve_questions` with a client of its own, then every test-split question
    (``test_split: verify``); also returns the LLM accounting."""
    async with LLMClient(params.llm, logger=log) as llm:
        outcomes, unused = await solve_questions(candidates, llm, params, templates,
                                                 key=key, log=log)
        if held_out:
            every = params.model_copy(update={"target_pairs": None})
            outcomes += (await solve_questions(held_out, llm, every, templates,
                                               key=f"{key} (test split)", log=log))[0]
        return outcomes, unused, llm.accounting.as_metrics()


def _write_outputs(args: argparse.Namespace, key: str, params: SolveParams, outcomes: Sequence[Outcome],
                   input_rejects: list[dict[str, str]], log: logging.Logger
                   ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, str]]]:
    """Write rejects, check the reject rate, then write questions and pairs; return all three."""
    questions, pairs, rejects = build_outputs(outcomes, key)
    rejects = input_rejects + rejects
    for r in rejects:
        log.info("reject %s: %s %s", r["item"], r["reason"], r["detail"])
    write_records(rejects, SCHEMAS["reject"], args.rejects)
    check_reject_rate(len(outcomes) - len(questions), len(outcomes), params.max_reject_rate,
                      f"solve@{key}")
    validate_table("mcq", questions)
    validate_table("qa", pairs)
    write_records(questions, SCHEMAS["mcq"], args.out)
    write_records(pairs, SCHEMAS["qa"], args.pairs)
    return questions, pairs, rejects


def _metrics(candidates: Sequence[dict[str, Any]], duplicates: int, outcomes: Sequence[Outcome],
             unused: int, questions: Sequence[dict[str, Any]], pairs: Sequence[dict[str, Any]],
             rejects: Sequence[dict[str, str]], target: Optional[int], short: int,
             accounting: dict[str, Any], seconds: float) -> dict[str, Any]:
    """The stage's metrics (also written to the exports' processing_stats file)."""
    return {"candidates": len(candidates), "duplicates": duplicates,
            "attempted": len(outcomes), "not_needed": unused, "records": len(questions),
            "pairs": len(pairs), "target_pairs": target, "short_pairs": short,
            "rejected": len(rejects),
            "rejects_by_reason": dict(sorted(Counter(r["reason"] for r in rejects).items())),
            "accepted_at_sample": {str(k): v for k, v in sorted(
                Counter(o.sample_index for o in outcomes if o.ok).items())},
            "answer_letters": dict(sorted(Counter(letter(q["answer"]) for q in questions).items())),
            "by_source": dict(sorted(Counter(q["source"] for q in questions).items())),
            "by_split": dict(sorted(Counter(q["split"] for q in questions).items())),
            "llm": accounting, "seconds": seconds}


if __name__ == "__main__":
    main()
