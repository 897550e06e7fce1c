"""agent@<key>: financial-agent questions over real price tables, kept only when running the code
proves the key -> data/generated/agent/<key>/questions.parquet + conversations.parquet.

The contest's 금융 에이전트 category shows ``df.head()`` of a market table and asks which pandas
code does a task, with 4–7 code options. Peer teams' LLM-written sets carry questions whose
options all give the same frame; here the machine checks every question:

1. **Tables** from the collected stock prices (``agent.<key>.prices``), drawn with a seeded RNG
   so they do not all look alike: one ticker's rows or a panel of 2–4 tickers (long format,
   with 종목코드/종목명), a random subset of the price columns (Korean names, as in the contest),
   a random contiguous run of ``rows`` trading days. Train tables use only tickers outside the
   held-out set and only rows **before** ``cutoff`` (the stock questions' cutoff: a table from
   the held-out period would hand the model the stock labels; ``make check`` compares them);
   the held-out tickers (``test_share`` of them, chosen by a hash) give the ``test`` split.
2. **The LLM** (through :mod:`stages.common.llm`: cached, planned, capped, batch-able) writes a
   task in Korean, ``n`` code options (4–7, varied over the tables), the key's letter and a
   separate reference solution (:class:`AgentQuestion`), from ``df.head()``, the dtypes and a
   task theme (``themes``, rotated).
3. **Every option and the reference run in the sandbox** (:mod:`stages.sandbox`: its own
   process, no network, no secrets, Landlock, seccomp, CPU and memory limits) against the
   **full** table. Kept only when the reference runs, the keyed option gives the reference's
   result, and every other option raises or gives a different result. Reject reasons:
   ``llm_<reason>``, ``wrong_choice_count``, ``duplicate_options``, ``reference_raises``,
   ``key_raises``, ``key_differs``, ``two_options_match`` (another option gives the
   reference's result), ``sandbox_limit`` (an option or the reference hit a limit).
   A kept record's meta lists every option's outcome (``ok`` + the hash of its result, or the
   error type) and the reference's hash. The key then moves to a letter balanced over the
   kept questions (the options are re-ordered; their outcomes move with them).
4. **Outputs**: ``questions.parquet`` — mcq records (question = the head + task, choices =
   code); ``conversations.parquet`` — the same task as a conversation: user asks; assistant
   writes the key's code; a ``tool`` turn holds the real output of running it; assistant
   answers from that output. Training puts the loss on the assistant turns only.

Fails (nothing written) when the sandbox cannot isolate code on this machine, or when the
rejects exceed ``max_reject_rate`` (code questions are rejected often: the rate is a param).
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from datetime import date
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, Field, model_validator

from stages.common.io import write_records
from stages.common.llm import LLMParams, LLMRequest, Result, read_llm_section, run_batch
from stages.common.params import PARAMS_FILE, Strict
from stages.common.prompts import LETTERS, letter, letter_index, render_template
from stages.common.runlog import (StageError, begin_stage, check_reject_rate, stage_main,
                                  stage_parser, write_metrics)
from stages.common.schema import SCHEMAS, reject, validate_table
from stages.common.text import content_id, normalize_text
from stages.sandbox import Limits, Outcome, Sandbox

PARAMS = ("agent.{key}", "llm_defaults")
STAGE = "agent"
TEMPLATES = ("agent_system.txt", "agent_user.txt", "agent_question.txt", "agent_conversation.txt")
COLUMNS = {"open": "시가", "high": "고가", "low": "저가", "close": "종가", "volume": "거래량",
           "value": "거래대금"}
OPTIONAL_COLUMNS = ("open", "high", "low", "volume", "value")
TOOL_OUTPUT_CHARS = 1200


class AgentParams(Strict):
    prices: list[str] = Field(min_length=1, description="collect keys of stock price sources")
    cutoff: date = Field(description="train tables hold rows before this date only (the stock "
                                     "questions' cutoff or earlier: `make check`)")
    test_share: float = Field(0.1, gt=0, lt=1, description="share of tickers held out (by a "
                              "hash of the ticker): their tables form the test split only")
    tables: int = Field(ge=1, description="train tables drawn = LLM requests for the train split")
    test_tables: int = Field(ge=0, description="test tables drawn (held-out tickers)")
    rows: tuple[int, int] = Field((40, 160), description="trading days per table (min, max)")
    panel_share: float = Field(0.3, ge=0, le=1, description="share of tables with 2-4 tickers")
    choice_counts: list[int] = Field([4, 5, 6, 7], min_length=1,
                                     description="option counts, rotated over the tables")
    themes: list[str] = Field(min_length=1, description="task themes, rotated (Korean)")
    seed: int = Field(0, ge=0)
    sandbox: Limits = Field(default_factory=Limits)
    max_reject_rate: float = Field(0.6, ge=0, le=1, description="rejects / questions asked")
    llm: LLMParams

    @model_validator(mode="after")
    def _ranges(self) -> "AgentParams":
        if not 5 <= self.rows[0] <= self.rows[1]:
            raise ValueError(f"rows {list(self.rows)}: need 5 <= min <= max")
        bad = [n for n in self.choice_counts if not 4 <= n <= len(LETTERS)]
        if bad:
            raise ValueError(f"choice_counts {bad}: the contest asks 4-7 options")
        return self


def load_params(key: str, path: str = PARAMS_FILE, cache_dir: str | None = None) -> AgentParams:
    return read_llm_section(PARAMS, AgentParams, key, path, cache_dir)


class AgentQuestion(BaseModel):
    """What the model returns for one table."""
    task: str = Field(description="the analysis request, one Korean sentence")
    options: list[str] = Field(description="pandas code options over df, A first")
    answer: str = Field(description="the letter of the option that does the task")
    reference: str = Field(description="another code that gives the same result as the answer")


class AgentReject(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


# --------------------------------------------------------------------------- tables
@dataclass
class TableSpec:
    id: str
    split: str
    tickers: list[str]
    names: list[str]
    start: str
    end: str
    columns: list[str]
    n_choices: int
    theme: str

    def description(self) -> str:
        who = ", ".join(f"{n}({t})" for t, n in zip(self.tickers, self.names))
        return f"{who}의 {self.start}부터 {self.end}까지 일별 시세"


def held_out_tickers(tickers: list[str], share: float, seed: int) -> list[str]:
    """round(share x n) tickers (at least one), ranked by a seeded hash: the same tickers
    whatever the table order, and an exact count."""
    ranked = sorted(tickers, key=lambda t: hashlib.sha256(f"agent-test:{seed}:{t}".encode()).hexdigest())
    return sorted(ranked[:max(1, round(share * len(tickers)))])


def read_prices(paths: list[str]) -> pd.DataFrame:
    tables = []
    for path in paths:
        table = pq.read_table(path)
        if not table.schema.equals(SCHEMAS["prices"]):
            raise StageError(f"{path} is not a prices table (collect a kind: prices source)")
        tables.append(table)
    frame = pa.concat_tables(tables).to_pandas()
    frame["date"] = pd.to_datetime(frame["date"])
    return frame.sort_values(["ticker", "date"], kind="stable").reset_index(drop=True)


def draw_tables(prices: pd.DataFrame, params: AgentParams) -> tuple[list[TableSpec], dict[str, Any]]:
    """Table specs for both splits, seeded: which tickers, which rows, which columns."""
    rng = np.random.default_rng(params.seed)
    cutoff = pd.Timestamp(params.cutoff)
    names = prices.groupby("ticker")["name"].first().to_dict()
    tickers = sorted(names)
    test_tickers = held_out_tickers(tickers, params.test_share, params.seed)
    train_tickers = [t for t in tickers if t not in test_tickers]
    dates = {t: prices.loc[prices["ticker"] == t, "date"].to_numpy() for t in tickers}
    available = [c for c in OPTIONAL_COLUMNS if prices[c].notna().any()]
    specs: list[TableSpec] = []
    for split, pool, count in (("train", train_tickers, params.tables),
                               ("test", test_tickers, params.test_tables)):
        if count and not pool:
            raise StageError(f"agent: no {split} tickers (test_share {params.test_share} of "
                             f"{len(tickers)} tickers)")
        for i in range(count):
            k = int(rng.integers(2, 5)) if rng.random() < params.panel_share and len(pool) > 1 else 1
            chosen = sorted(rng.choice(pool, size=min(k, len(pool)), replace=False).tolist())
            days = np.unique(np.concatenate([dates[t] for t in chosen]))
            if split == "train":
                days = days[days < np.datetime64(cutoff)]
            n = int(rng.integers(params.rows[0], params.rows[1] + 1))
            if len(days) < params.rows[0]:
                continue
            n = min(n, len(days))
            start = int(rng.integers(0, len(days) - n + 1))
            span = days[start:start + n]
            columns = sorted(rng.choice(available, size=int(rng.integers(1, len(available) + 1)),
                                        replace=False).tolist(), key=OPTIONAL_COLUMNS.index)
            n_choices = params.choice_counts[i % len(params.choice_counts)]
            theme = params.themes[int(rng.integers(0, len(params.themes)))]
            first, last = str(span[0])[:10], str(span[-1])[:10]
            spec_id = content_id("agent-table", split, chosen, first, last, columns, n_choices, theme)
            specs.append(TableSpec(spec_id, split, chosen, [str(names[t]) for t in chosen], first,
                                   last, columns, n_choices, theme))
    info = {"tickers": len(tickers), "test_tickers": len(test_tickers),
            "tables": {s: sum(1 for x in specs if x.split == s) for s in ("train", "test")}}
    return specs, info


def table_frame(prices: pd.DataFrame, spec: TableSpec) -> pd.DataFrame:
    """The DataFrame the code runs on: Korean column names; a panel has 종목코드/종목명."""
    rows = prices[prices["ticker"].isin(spec.tickers) & (prices["date"] >= spec.start)
                  & (prices["date"] <= spec.end)]
    out = pd.DataFrame({"날짜": rows["date"].to_numpy()})
    if len(spec.tickers) > 1:
        out["종목코드"] = rows["ticker"].to_numpy()
        out["종목명"] = rows["name"].to_numpy()
    for column in spec.columns + ["close"]:
        if column in COLUMNS and COLUMNS[column] not in out:
            values = rows[column].to_numpy()
            whole = column == "volume" or bool(np.all(np.isfinite(values)) and np.all(values == np.round(values)))
            out[COLUMNS[column]] = values.astype("int64") if whole else values
    ordered = ["날짜"] + [c for c in ("종목코드", "종목명") if c in out] + \
        [COLUMNS[c] for c in ("open", "high", "low", "close", "volume", "value") if COLUMNS[c] in out]
    frame = out[ordered]
    if len(spec.tickers) > 1:
        frame = frame.sort_values(["날짜", "종목코드"], kind="stable")
    return frame.reset_index(drop=True)


def head_markdown(frame: pd.DataFrame) -> str:
    head = frame.head().copy()
    head["날짜"] = head["날짜"].dt.strftime("%Y-%m-%d")
    return head.to_markdown()


def dtypes_text(frame: pd.DataFrame) -> str:
    return "\n".join(f"- {c}: {t}" for c, t in frame.dtypes.astype(str).items())


# --------------------------------------------------------------------------- requests
def request_messages(spec: TableSpec, frame: pd.DataFrame) -> list[dict[str, str]]:
    user = render_template("agent_user.txt", description=spec.description(),
                           head=head_markdown(frame), dtypes=dtypes_text(frame),
                           rows=len(frame), theme=spec.theme, n_choices=spec.n_choices,
                           last_letter=LETTERS[spec.n_choices - 1])
    return [{"role": "system", "content": render_template("agent_system.txt")},
            {"role": "user", "content": user}]


def build_requests(specs: list[TableSpec], frames: dict[str, pd.DataFrame]) -> list[LLMRequest]:
    return [LLMRequest(request_messages(s, frames[s.id]), AgentQuestion, s.id) for s in specs]


# --------------------------------------------------------------------------- verification
def check_shape(spec: TableSpec, answer: AgentQuestion) -> tuple[str, list[str], int, str]:
    task = normalize_text(answer.task)
    options = [o.strip("\n").rstrip() for o in answer.options]
    if not task:
        raise AgentReject("empty_task")
    if len(options) != spec.n_choices:
        raise AgentReject("wrong_choice_count", f"asked {spec.n_choices}, got {len(options)}")
    if any(not o.strip() for o in options):
        raise AgentReject("empty_option")
    squashed = ["".join(o.split()) for o in options]
    if len(set(squashed)) != len(squashed):
        raise AgentReject("duplicate_options", "two options are the same code")
    try:
        key = letter_index(answer.answer)
    except ValueError as exc:
        raise AgentReject("bad_answer_letter", str(exc)) from None
    if key >= len(options):
        raise AgentReject("bad_answer_letter", f"{answer.answer} with {len(options)} options")
    return task, options, key, answer.reference.strip()


def judge(outcomes: list[Outcome], reference: Outcome, key: int) -> None:
    """Keep only when exactly the key reproduces the reference (module docstring)."""
    limited = [letter(i) for i, o in enumerate(outcomes) if o.status == "sandbox_limit"]
    if reference.status == "sandbox_limit" or limited:
        raise AgentReject("sandbox_limit", f"options {limited} / reference: "
                          f"{reference.detail if reference.status == 'sandbox_limit' else 'ok'}")
    if not reference.ok:
        raise AgentReject("reference_raises", f"{reference.status}: {reference.detail}")
    if not outcomes[key].ok:
        raise AgentReject("key_raises", f"{outcomes[key].status}: {outcomes[key].detail}")
    if outcomes[key].hash != reference.hash:
        raise AgentReject("key_differs", "the keyed option's result is not the reference's")
    twins = [letter(i) for i, o in enumerate(outcomes) if i != key and o.ok and o.hash == reference.hash]
    if twins:
        raise AgentReject("two_options_match", f"options {twins} also give the reference's result")


def balanced_letter(question_id: str, n: int) -> int:
    return int(hashlib.sha256(f"agent-letter:{question_id}".encode()).hexdigest()[:8], 16) % n


def conversation_answer(outcome: Outcome) -> str:
    return f"코드를 실행한 결과는 다음과 같습니다.\n\n{tool_output(outcome)}"


def tool_output(outcome: Outcome) -> str:
    text = outcome.preview
    return text if len(text) <= TOOL_OUTPUT_CHARS else text[:TOOL_OUTPUT_CHARS] + " …"


def make_records(spec: TableSpec, frame: pd.DataFrame, result: Result, box: Sandbox, key: str
                 ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(mcq record, conversation record) of one verified question; AgentReject otherwise."""
    if not result.ok:
        raise AgentReject(f"llm_{result.error}", result.detail)
    task, options, answer, reference_code = check_shape(spec, result.parsed)  # type: ignore[arg-type]
    box.load("t", frame)
    # all side by side; the key's result is shown in the conversation's tool turn: only it
    # needs a preview
    codes = options + ([reference_code] if reference_code else [])
    ran = box.run_many("t", codes, [i == answer for i in range(len(codes))])
    outcomes = ran[:len(options)]
    reference = ran[len(options)] if reference_code else Outcome("reference_raises", "empty")
    judge(outcomes, reference, answer)
    head = head_markdown(frame)
    description = spec.description()
    question = render_template("agent_question.txt", description=description, head=head, task=task)
    qid = content_id("agent", question, sorted(options))
    target = balanced_letter(qid, len(options))
    order = [i for i in range(len(options)) if i != answer]
    order.insert(target, answer)
    choices = [options[i] for i in order]
    meta = {"table": {"tickers": spec.tickers, "start": spec.start, "end": spec.end,
                      "columns": list(frame.columns), "rows": len(frame), "table_id": spec.id},
            "window_start": spec.start, "window_end": spec.end, "task": task, "theme": spec.theme,
            "reference": {"code": reference_code, "hash": reference.hash},
            "outcomes": {letter(j): outcomes[i].brief() for j, i in enumerate(order)},
            "model_answer": letter(answer), "raw": result.raw,
            "tokens": {"prompt": result.usage.prompt_tokens,
                       "completion": result.usage.completion_tokens}}
    meta_json = json.dumps(meta, ensure_ascii=False, sort_keys=True)
    mcq = {"id": qid, "source": f"agent_{key}", "domain": "agent", "split": spec.split,
           "question": question, "choices": choices, "answer": target,
           "category": "pandas_code", "meta": meta_json}
    user = render_template("agent_conversation.txt", description=description, head=head, task=task)
    messages = [{"role": "user", "content": user},
                {"role": "assistant", "content": f"```python\n{options[answer]}\n```"},
                {"role": "tool", "content": tool_output(outcomes[answer])},
                {"role": "assistant", "content": conversation_answer(outcomes[answer])}]
    conversation = {"id": content_id("agent-conversation", messages), "source": f"agent_{key}",
                    "domain": "agent", "split": spec.split, "messages": messages,
                    "meta": json.dumps({**meta, "question_id": qid}, ensure_ascii=False, sort_keys=True)}
    return mcq, conversation


def check_cutoff(records: list[dict[str, Any]], cutoff: date) -> None:
    """From the data alone: no train table reaches the cutoff."""
    for r in records:
        meta = json.loads(r["meta"])
        if r["split"] == "train" and not meta["window_end"] < cutoff.isoformat():
            raise StageError(f"agent record {r['id']}: its table ends {meta['window_end']}, not "
                             f"before the cutoff {cutoff}")


def verify_all(specs: list[TableSpec], frames: dict[str, pd.DataFrame], results: list[Result],
               params: AgentParams, key: str
               ) -> tuple[list[dict], list[dict], list[dict], dict[str, Any]]:
    import time
    questions, conversations, rejects = [], [], []
    started = time.perf_counter()
    with Sandbox(params.sandbox) as box:
        for spec, result in zip(specs, results, strict=True):
            try:
                mcq, conv = make_records(spec, frames[spec.id], result, box, key)
            except AgentReject as exc:
                rejects.append(reject(STAGE, key, spec.id, exc.reason, exc.detail,
                                      {"raw": result.raw, "table": spec.description()}))
                continue
            questions.append(mcq)
            conversations.append(conv)
        seconds = time.perf_counter() - started
        stats = {"sandbox": {"runs": box.runs, "seconds": round(seconds, 3),
                             "runs_per_second": round(box.runs / seconds, 1) if seconds else None,
                             "child_cpu_seconds": round(box.cpu_seconds, 3),
                             "landlock_abi": box.landlock_abi}}
    check_cutoff(questions, params.cutoff)
    return questions, conversations, rejects, stats


@stage_main
def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__, "key", cache_dir=True)
    parser.add_argument("--prices", nargs="+", required=True,
                        help="collected stock prices (dvc.yaml's slots; must be agent.<key>.prices)")
    parser.add_argument("--conversations", required=True, help="conversation records (Parquet)")
    args = parser.parse_args(argv)
    key = args.key
    params, log, timer = begin_stage(args, STAGE, key,
                                     lambda k, path: load_params(k, path, args.cache_dir))
    expected = [f"data/collected/{name}.parquet" for name in params.prices]
    if sorted(dict.fromkeys(args.prices)) != sorted(expected):
        raise StageError(f"agent@{key}: --prices {args.prices} are not agent.{key}.prices "
                         f"{expected}: run `python -m stages.dvc_vars` after editing params.yaml")
    prices = read_prices(expected)
    specs, info = draw_tables(prices, params)
    frames = {s.id: table_frame(prices, s) for s in specs}
    log.info("%d tables (%s) from %d tickers; %d held out", len(specs), info["tables"],
             info["tickers"], info["test_tickers"])
    results, accounting = run_batch(params.llm, build_requests(specs, frames), logger=log,
                                    desc=f"agent@{key}")
    questions, conversations, rejects, stats = verify_all(specs, frames, results, params, key)
    for r in rejects:
        log.info("reject %s: %s %s", r["item"], r["reason"], r["detail"][:200])
    write_records(rejects, SCHEMAS["reject"], args.rejects)
    check_reject_rate(len(rejects), len(specs), params.max_reject_rate, f"agent@{key}")
    if not questions:
        raise StageError(f"agent@{key}: no question survived; see {args.rejects}")
    validate_table("mcq", questions)
    validate_table("conversation", conversations)
    write_records(conversations, SCHEMAS["conversation"], args.conversations)
    write_records(questions, SCHEMAS["mcq"], args.out)
    by_split = Counter(r["split"] for r in questions)
    write_metrics(args.metrics, {
        "items": len(specs), "tables": info["tables"], "tickers": info["tickers"], "test_tickers": info["test_tickers"],
        "records": len(questions), "splits": dict(sorted(by_split.items())),
        "acceptance_rate": round(len(questions) / len(specs), 4) if specs else None,
        "rejected": len(rejects),
        "rejects_by_reason": dict(sorted(Counter(r["reason"] for r in rejects).items())),
        "answer_letters": dict(sorted(Counter(letter(r["answer"]) for r in questions).items())),
        **stats,
        "llm": accounting.as_metrics(), "seconds": timer.seconds})
    log.info("%d of %d questions kept (%s), %d rejected -> %s; %d LLM calls, %d cached, $%.4f",
             len(questions), len(specs), dict(by_split), len(rejects), args.out,
             accounting.calls, accounting.cache_hits, accounting.cost_usd)


if __name__ == "__main__":
    main()
