"""solve@<domain>: verified two-step solutions -> data/generated/<domain>/{questions,pairs}.parquet.

Contract:
- inputs (``params.solve.<domain>.inputs``): mcq parquet files (transformed + synthesized for
  the KMMLU domains, synthesized only for ``rules``). Records with the same id are solved
  once; a record from the ``test`` split is rejected (``test_split``): the evaluation set never
  becomes training data.
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

import asyncio
import json
import logging
import string
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

from pydantic import BaseModel

from stages.common.io import read_records, write_json, write_records
from stages.common.llm import CacheMissError, LLMClient
from stages.common.params import SolveParams
from stages.common.prompts import (LETTERS, letter, letter_index, load_template,
                                   mcq_question_block, step1_prompt, step2_prompt)
from stages.common.runlog import (StageError, begin_stage, check_reject_rate, progress,
                                  stage_main, stage_parser, write_metrics)
from stages.common.schema import SCHEMAS, reject, validate_table
from stages.common.text import content_id

PARAMS = ("solve.{key}",)
STAGE = "solve"
TEMPLATES = ("solve_system.txt", "solve_user.txt", "solve_quality_system.txt",
             "solve_quality_user.txt")

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


def select_candidates(inputs: Sequence[Sequence[dict[str, Any]]], domain: str
                      ) -> tuple[list[dict[str, Any]], list[dict[str, str]], int]:
    """(candidates sorted by id, rejects, duplicates): one record per id (first input
    wins), the test split rejected."""
    seen: dict[str, dict[str, Any]] = {}
    rejects, duplicates = [], 0
    for records in inputs:
        for record in records:
            if record["split"] == "test":
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
        tasks = [asyncio.create_task(solve_one(q, llm, params, templates)) for q in wave]
        try:
            for done in progress(asyncio.as_completed(tasks), desc=f"solve@{key}", total=len(tasks)):
                await done
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        results = [t.result() for t in tasks]
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
    """(verified questions by id with the solution in meta, pairs, rejects)."""
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
    parser = stage_parser(__doc__, "domain", out_help="questions.parquet")
    parser.add_argument("--pairs", required=True, help="pairs.parquet")
    parser.add_argument("--exports", required=True, help="directory for the original-format files")
    args = parser.parse_args(argv)
    key = args.domain
    params: SolveParams
    params, log, timer = begin_stage(args, "solve", PARAMS, key)
    stamp = datetime.now().strftime("%Y%m%d_%H%M%S")
    export_log = Path(args.exports) / f"processing_{stamp}.log"
    export_log.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(export_log, mode="w", encoding="utf-8")
    handler.setFormatter(log.handlers[0].formatter)
    log.addHandler(handler)

    inputs = []
    for path in dict.fromkeys([params.inputs.transformed, params.inputs.synthesized]):
        if not Path(path).is_file():
            raise StageError(f"input {path} does not exist (params solve.{key}.inputs)")
        records = read_records(path)
        validate_table("mcq", records)
        inputs.append(records)
        log.info("%d questions from %s", len(records), path)
    candidates, input_rejects, duplicates = select_candidates(inputs, key)
    if not candidates:
        raise StageError(f"solve@{key}: no questions in {params.inputs.transformed} / "
                         f"{params.inputs.synthesized}")
    templates = {name: load_template(name) for name in TEMPLATES}

    async def run() -> tuple[list[Outcome], int, dict[str, Any]]:
        async with LLMClient(params.llm, logger=log) as llm:
            outcomes, unused = await solve_questions(candidates, llm, params, templates,
                                                     key=key, log=log)
            return outcomes, unused, llm.accounting.as_metrics()
    outcomes, unused, accounting = asyncio.run(run())

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

    target = params.target_pairs
    short = 0 if target is None else target - len(pairs)
    if short:
        log.warning("solve@%s: %d pairs short of the target %d (%d candidates, %d verified); "
                    "not padded", key, short, target, len(candidates), len(questions))
    metrics = {"candidates": len(candidates), "duplicates": duplicates,
               "attempted": len(outcomes), "not_needed": unused, "records": len(questions),
               "pairs": len(pairs), "target_pairs": target, "short_pairs": short,
               "rejected": len(rejects),
               "rejects_by_reason": dict(sorted(Counter(r["reason"] for r in rejects).items())),
               "accepted_at_sample": {str(k): v for k, v in sorted(
                   Counter(o.sample_index for o in outcomes if o.ok).items())},
               "answer_letters": dict(sorted(Counter(letter(q["answer"]) for q in questions).items())),
               "by_source": dict(sorted(Counter(q["source"] for q in questions).items())),
               "llm": accounting, "seconds": timer.seconds}
    write_metrics(args.metrics, metrics)
    written = write_exports(args.exports, stamp, pairs, metrics)
    log.info("%d questions verified -> %d pairs (%s) -> %s, %s; exports: %s (%.1fs)",
             len(questions), len(pairs), f"{short} short" if short else "target met",
             args.out, args.pairs, ", ".join(str(p) for p in written + [export_log]), timer.seconds)
    handler.close()
    log.removeHandler(handler)


if __name__ == "__main__":
    main()
