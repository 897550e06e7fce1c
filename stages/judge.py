"""judge@<key>: score one model's open-ended answers against the references.

Contract:
- input ``--answers``: evaluate@<key>'s answers to the open-ended sets
  (``data/eval/<key>.open.parquet``: question, reference, answer, its length). Judging lives
  here, not in evaluate@: GPU evaluation stays restorable from DVC's run-cache and an edit of
  the LLM layer never re-runs it.
- method (``judge.method``):
  ``llm`` (production): an LLM judge through the LLM layer (``stages.common.llm``). Rubric
  (``stages/prompts/judge_system.txt``): correctness against the reference, completeness,
  Korean fluency, 1-10 each, and a 1-10 ``score`` with a one-line ``reason``, as structured
  output (:class:`Verdict`). The request holds the question, the reference, the answer and
  the rubric, and is cached under the judge model and its settings: an unchanged answer is
  never judged (or paid) twice. Priced by ``make plan``, stopped by the budget cap, batchable
  (``llm.batch``) like every LLM stage.
  ``chrf`` (offline, the quickstart's): sacrebleu's chrF (character 1-6-grams, beta 2) of the
  answer against the reference, 0-100. Character n-grams work on Hangul; ROUGE's default
  tokenizer drops it.
- output ``--out``: one row per answer with the reference shown to the judge, the answer and
  its length beside the score, the reason (llm) and the judge; scores of different judges are
  never mixed: the metrics and every row name the judge.
- metrics: ``judge`` (who scored), ``scale``, items, scored, ``score_mean`` (over the scored),
  per set, answer length, LLM calls and cost.
- rejects: a judge failure (transport, invalid answer after re-asks) is a reject
  ``judge_<reason>``, never a score; the stage fails (exit 2) above ``max_reject_rate``.
"""
from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
from pydantic import BaseModel, Field

from stages.common.io import read_records, write_records
from stages.common.llm import Accounting, LLMParams, LLMRequest, read_llm_section, run_batch
from stages.common.params import PARAMS_FILE, Strict
from stages.common.prompts import render_template
from stages.common.runlog import (StageError, begin_stage, check_reject_rate, require_input,
                                  stage_main, stage_parser, write_metrics)
from stages.common.schema import SCHEMAS, reject

PARAMS = ("judge", "llm_defaults")
STAGE = "judge"
TEMPLATES = ("judge_system.txt", "judge_user.txt")


class JudgeParams(Strict):
    """``judge``, shared by every ``judge@<key>``."""
    method: Literal["llm", "chrf"] = Field(description="llm: the rubric judge (production, "
                                           "paid); chrf: reference chrF, offline")
    max_reject_rate: float = Field(0.1, ge=0, le=1, description="judge failures / answers")
    llm: LLMParams


def load_params(key: str | None = None, path: str = PARAMS_FILE, cache_dir: str | None = None
                ) -> JudgeParams:
    """``judge`` with ``llm_defaults`` merged under its ``llm``."""
    return read_llm_section(PARAMS, JudgeParams, key, path, cache_dir)


class Verdict(BaseModel):
    """The judge's structured answer (the rubric in judge_system.txt)."""
    correctness: int = Field(ge=1, le=10, description="facts, figures and reasoning against the reference")
    completeness: int = Field(ge=1, le=10, description="the reference's key points covered")
    fluency: int = Field(ge=1, le=10, description="natural, correct Korean")
    score: int = Field(ge=1, le=10, description="overall; at most 5 when correctness is low")
    reason: str = Field(description="one sentence in Korean")


JUDGED_SCHEMA = pa.schema([
    ("id", pa.string()), ("set", pa.string()), ("question", pa.string()),
    ("reference", pa.string()), ("answer", pa.string()), ("answer_chars", pa.int32()),
    ("score", pa.float64()), ("reason", pa.string()), ("judge", pa.string()),
])


def judge_messages(row: dict[str, Any]) -> list[dict[str, str]]:
    """The rubric and the item: question, the reference shown to the judge, the answer."""
    return [{"role": "system", "content": render_template("judge_system.txt")},
            {"role": "user", "content": render_template(
                "judge_user.txt", question=row["question"], reference=row["reference"],
                answer=row["answer"] or "(빈 답변)")}]


def judge_requests(rows: list[dict[str, Any]]) -> list[LLMRequest]:
    return [LLMRequest(judge_messages(r), Verdict, r["id"]) for r in rows]


def chrf_name() -> str:
    """Which chrF: the library version and the metric's settings (scores of two settings are
    different judges)."""
    import sacrebleu
    from sacrebleu.metrics import CHRF
    metric = CHRF()
    return (f"chrF (sacrebleu {sacrebleu.__version__}, char order {metric.char_order}, "
            f"word order {metric.word_order}, beta {metric.beta})")


def chrf_scores(rows: list[dict[str, Any]]) -> list[float]:
    """chrF of each answer against its reference, 0-100 (an empty answer scores 0)."""
    from sacrebleu.metrics import CHRF
    metric = CHRF()
    return [round(metric.sentence_score(r["answer"], [r["reference"]]).score, 4) if r["answer"]
            else 0.0 for r in rows]


def score_rows(rows: list[dict[str, Any]], params: JudgeParams, key: str, log: Any
               ) -> tuple[list[dict[str, Any]], list[dict[str, str]], str, Accounting | None]:
    """(judged rows, rejects, the judge's name, LLM accounting or None)."""
    if params.method == "chrf":
        name = chrf_name()
        return ([_judged(r, s, "", name) for r, s in zip(rows, chrf_scores(rows))], [], name, None)
    name = f"llm:{params.llm.model}"
    results, accounting = run_batch(params.llm, judge_requests(rows), logger=log, desc=f"judge@{key}")
    judged, rejects = [], []
    for row, result in zip(rows, results, strict=True):
        if not result.ok:
            rejects.append(reject(STAGE, row["set"], row["id"], f"judge_{result.error}",
                                  result.detail, {"raw": result.raw}))
            continue
        verdict: Verdict = result.parsed  # type: ignore[assignment]
        judged.append(_judged(row, float(verdict.score), verdict.reason, name))
    return judged, rejects, name, accounting


def _judged(row: dict[str, Any], score: float, reason: str, judge: str) -> dict[str, Any]:
    return {"id": row["id"], "set": row["set"], "question": row["question"],
            "reference": row["reference"], "answer": row["answer"],
            "answer_chars": row["answer_chars"], "score": score, "reason": reason, "judge": judge}


def judge_metrics(rows: list[dict[str, Any]], judged: list[dict[str, Any]], rejects: list[dict],
                  name: str, params: JudgeParams, accounting: Accounting | None) -> dict[str, Any]:
    by_set: dict[str, list[float]] = defaultdict(list)
    for row in judged:
        by_set[row["set"]].append(row["score"])
    return {"judge": name, "method": params.method,
            "scale": "1-10" if params.method == "llm" else "0-100",
            "items": len(rows), "scored": len(judged), "rejected": len(rejects),
            "score_mean": round(statistics.fmean(r["score"] for r in judged), 4) if judged else None,
            "by_set": {s: {"scored": len(v), "score_mean": round(statistics.fmean(v), 4)}
                       for s, v in sorted(by_set.items())},
            "answer_chars_mean": round(statistics.fmean(r["answer_chars"] for r in rows), 1)
            if rows else None,
            "rejects_by_reason": dict(sorted(Counter(r["reason"] for r in rejects).items())),
            "llm": accounting.as_metrics() if accounting else None}


def note_cache(cache_dir: str, method: str, key: str) -> None:
    """A line in the response cache saying what it holds: the directory is a DVC out, and an
    offline (chrF) run leaves it without answers, which DVC would warn about on every run."""
    text = (f"Response cache of judge@{key}: the LLM judge's answers, one file per request "
            f"(stages/common/llm_cache.py). Last run: judge.method = {method}"
            + (" (scored offline, no LLM call).\n" if method != "llm" else ".\n"))
    path = Path(cache_dir) / "README.txt"
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


@stage_main
def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__, "key", cache_dir=True)
    parser.add_argument("--answers", required=True, help="evaluate@<key>'s open-ended answers")
    args = parser.parse_args(argv)
    key = args.key
    params, log, timer = begin_stage(args, STAGE, key,
                                     lambda k, path: load_params(k, path, args.cache_dir))
    require_input(args.answers, "--answers", f"run evaluate@{key} first")
    rows = read_records(args.answers)
    log.info("%d open-ended answers of %s; judge: %s", len(rows), key,
             params.llm.model if params.method == "llm" else "chrF")
    judged, rejects, name, accounting = score_rows(rows, params, key, log)
    for r in rejects:
        log.info("reject %s: %s %s", r["item"], r["reason"], r["detail"])
    write_records(rejects, SCHEMAS["reject"], args.rejects)
    check_reject_rate(len(rejects), len(rows), params.max_reject_rate, f"judge@{key}")
    if rows and not judged:
        raise StageError(f"judge@{key}: no answer of {len(rows)} was scored; see {args.rejects}")
    write_records(judged, JUDGED_SCHEMA, args.out)
    note_cache(args.cache_dir, params.method, key)
    metrics = {**judge_metrics(rows, judged, rejects, name, params, accounting), "seconds": timer.seconds}
    write_metrics(args.metrics, metrics)
    log.info("%d of %d answers scored by %s: mean %s -> %s (%.1fs)", len(judged), len(rows), name,
             metrics["score_mean"], args.out, timer.seconds)


if __name__ == "__main__":
    main()
