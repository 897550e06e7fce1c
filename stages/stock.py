"""stock@<key>: stock-direction questions from daily prices, no LLM -> data/generated/stock/<key>.parquet.

For a ticker and a date t: the last ``window`` trading days as a table and technical
indicators at t (TA-Lib: moving averages, RSI, MACD, Bollinger bands, and volume against its
moving average), computed only from prices up to t; the question asks whether the next
trading day's close is above t's close, as a two-choice MCQ (A. 상승, B. 하락) keyed by the
realised next close. Params: ``stock.<key>`` (schema :class:`StockParams`).

- **Trading calendar**: the dates of the calendar index (``calendar.index`` in the collected
  index series ``calendar.source``), so holidays are not gaps and "the next trading day" is the
  calendar's. A stock row on a date the index does not have is a reject (``off_calendar``).
- **Segments**: a ticker's rows are cut where the series is not comparable: a gap (calendar
  days missing: suspension, bad rows removed by collect) and a ``corporate_action`` row
  (unadjusted prices after a split or rights issue). Indicators are computed per segment from
  its start, and no window, indicator lookback or target crosses a cut. Delisted tickers (last
  row before the calendar's end) are counted; their earlier windows are fine.
- **Sampling**: one candidate date every ``stride`` calendar days per ticker (offset by a hash
  of the ticker), so two windows of one ticker share fewer than half their rows; a move
  smaller than ``min_move`` is skipped (not a question: noise), as is a halted t or target.
- **Splits by date, no look-ahead**: ``train`` when the target date is before ``cutoff``;
  ``test`` when the window starts ``embargo`` (>= window) trading days after the cutoff or later;
  dates between are unused. So every price a training question shows or was computed from, and
  its key, lies before the cutoff, and no held-out window shares a row with a training one.
  Each record's meta carries ``ticker``, ``window_start``, ``window_end`` (= t) and
  ``target_date``, so the property is checkable from the data alone (and is checked before
  writing).
- **Selection**: ``target.train`` questions, balanced up/down by default (``balance``); the
  ``test`` split keeps its natural up/down share (what a leaderboard scores). The natural share
  of every split and the selected one are in the metrics; a shortfall is reported (``short``),
  never padded.
- rejects (``data/rejects/stock/<key>.parquet``): off-calendar rows and tickers too short for
  one window; what was skipped and why: counts in the metrics.
"""
from __future__ import annotations

import json
import math
import string
from collections import Counter
from dataclasses import dataclass
from datetime import date
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, model_validator

from stages.common.io import write_records
from stages.common.params import PARAMS_FILE, Strict, read_section
from stages.common.prompts import load_template
from stages.common.runlog import (StageError, begin_stage, stage_main, stage_parser,
                                  write_metrics)
from stages.common.schema import SCHEMAS, reject, validate_prices_table, validate_table
from stages.common.text import content_id

PARAMS = ("stock.{key}",)
TEMPLATE = "stock_question.txt"
CHOICES = ("상승", "하락")     # A: the next close is above t's close, B: below
CATEGORY = "stock_direction"
DOMAIN = "stock"


class Calendar(Strict):
    source: str = Field(description="collect key of an index price source (series: index)")
    index: str = Field(description="the index (its ticker in that source, e.g. 코스피) whose "
                                   "dates are the trading calendar")


class Indicators(Strict):
    ma: list[int] = Field([5, 20], min_length=1, description="simple moving averages of the close")
    rsi: int = Field(14, ge=2, description="RSI period")
    macd: tuple[int, int, int] = Field((12, 26, 9), description="fast, slow, signal periods")
    bbands: int = Field(20, ge=2, description="Bollinger band period (±2 standard deviations)")
    volume_ma: int = Field(20, ge=2, description="volume ratio: volume / its moving average")

    @model_validator(mode="after")
    def _periods(self) -> "Indicators":
        if any(p < 2 for p in self.ma) or len(set(self.ma)) != len(self.ma):
            raise ValueError(f"ma {self.ma}: distinct periods of at least 2")
        fast, slow, signal = self.macd
        if not 2 <= fast < slow or signal < 2:
            raise ValueError(f"macd {list(self.macd)}: need 2 <= fast < slow and signal >= 2")
        return self


class Target(Strict):
    train: int = Field(ge=1, description="questions in the train split")
    test: int = Field(ge=0, description="questions in the held-out test split")


class StockParams(Strict):
    prices: list[str] = Field(min_length=1, description="collect keys of stock price sources")
    calendar: Calendar
    window: int = Field(ge=2, le=120, description="trading days shown in the question's table")
    stride: int = Field(ge=1, description="calendar days between two candidate dates of a ticker")
    min_move: float = Field(ge=0, lt=0.3, description="|next close / close - 1| below this: skipped")
    cutoff: date = Field(description="train targets are before this date (ISO)")
    embargo: int = Field(description="trading days after the cutoff before a test window may "
                                     "start (>= window)")
    target: Target
    balance: bool = Field(True, description="train split: as many up as down questions")
    seed: int = Field(0, ge=0)
    indicators: Indicators = Field(default_factory=Indicators)

    @model_validator(mode="after")
    def _no_overlap(self) -> "StockParams":
        if 2 * self.stride <= self.window:
            raise ValueError(f"stride {self.stride} must exceed window/2 ({self.window}/2): two "
                             "windows of one ticker would share most of their rows")
        if self.embargo < self.window:
            raise ValueError(f"embargo {self.embargo} < window {self.window}: a test window "
                             "would show prices of the training period")
        if len(set(self.prices)) != len(self.prices):
            raise ValueError(f"prices {self.prices} repeats a source")
        return self


def load_params(key: str, path: str = PARAMS_FILE) -> StockParams:
    return read_section(PARAMS, StockParams, key, path=path)


# --------------------------------------------------------------------------- reading
def read_prices(path: str, series: str) -> pa.Table:
    table = pq.read_table(path)
    if not table.schema.equals(SCHEMAS["prices"]):
        raise StageError(f"{path} is not a prices table (collect a kind: prices source)")
    kinds = set(table["series"].unique().to_pylist())
    if kinds - {series}:
        raise StageError(f"{path}: series {sorted(kinds)}, expected {series}")
    return table


def calendar_days(index_table: pa.Table, index: str, where: str) -> np.ndarray:
    """The trading calendar: the sorted dates of one index, as int days since 1970."""
    rows = index_table.filter(pa.compute.equal(index_table["ticker"], index))
    if not rows.num_rows:
        names = sorted(set(index_table["ticker"].to_pylist()))[:10]
        raise StageError(f"{where}: no rows of index {index!r} (it has {names})")
    return np.unique(rows["date"].cast(pa.int32()).to_numpy())


# --------------------------------------------------------------------------- indicators
def indicator_names(ind: Indicators) -> list[str]:
    return ([f"ma{p}" for p in ind.ma] + [f"rsi{ind.rsi}", "macd", "macd_signal", "macd_hist",
            "bb_upper", "bb_middle", "bb_lower", f"volume_ratio{ind.volume_ma}"])


def compute_indicators(close: np.ndarray, volume: np.ndarray, ind: Indicators) -> dict[str, np.ndarray]:
    """TA-Lib over one segment (float64, oldest first): value i uses rows 0..i only; NaN
    until an indicator has its lookback."""
    import talib
    out = {f"ma{p}": talib.SMA(close, timeperiod=p) for p in ind.ma}
    out[f"rsi{ind.rsi}"] = talib.RSI(close, timeperiod=ind.rsi)
    fast, slow, signal = ind.macd
    out["macd"], out["macd_signal"], out["macd_hist"] = talib.MACD(
        close, fastperiod=fast, slowperiod=slow, signalperiod=signal)
    out["bb_upper"], out["bb_middle"], out["bb_lower"] = talib.BBANDS(
        close, timeperiod=ind.bbands, nbdevup=2.0, nbdevdn=2.0, matype=0)
    vol = volume.astype("float64")
    vol_ma = talib.SMA(vol, timeperiod=ind.volume_ma)
    with np.errstate(divide="ignore", invalid="ignore"):
        out[f"volume_ratio{ind.volume_ma}"] = np.where(vol_ma > 0, vol / vol_ma, np.nan)
    return out


# --------------------------------------------------------------------------- candidates
class Candidates:
    """Candidate questions as parallel arrays (row = index into the sorted price table)."""

    def __init__(self) -> None:
        self.rows: list[np.ndarray] = []
        self.split: list[np.ndarray] = []
        self.up: list[np.ndarray] = []
        self.values: list[np.ndarray] = []   # indicator values at t, one column per name

    def add(self, rows: np.ndarray, split: np.ndarray, up: np.ndarray, values: np.ndarray) -> None:
        self.rows.append(rows)
        self.split.append(split)
        self.up.append(up)
        self.values.append(values)

    def arrays(self, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        if not self.rows:
            return (np.zeros(0, np.int64), np.zeros(0, "U5"), np.zeros(0, bool),
                    np.zeros((0, width)))
        return (np.concatenate(self.rows), np.concatenate(self.split), np.concatenate(self.up),
                np.concatenate(self.values))


def ticker_offset(ticker: str, seed: int, stride: int) -> int:
    return int(content_id("stock-stride", seed, ticker), 16) % stride


@dataclass
class Series:
    """The price table's columns as arrays, and where each row sits on the calendar."""
    days: np.ndarray
    tickers: np.ndarray
    close: np.ndarray
    volume: np.ndarray
    action: np.ndarray      # corporate_action rows
    halt: np.ndarray        # volume 0
    pos: np.ndarray         # calendar position of each row
    on_calendar: np.ndarray

    @classmethod
    def of(cls, table: pa.Table, calendar: np.ndarray) -> "Series":
        days = table["date"].cast(pa.int32()).to_numpy()
        flags = table["flags"].to_numpy(zero_copy_only=False).astype(str)
        volume = table["volume"].to_numpy()
        pos = np.searchsorted(calendar, days)
        on = (pos < len(calendar)) & (calendar[np.minimum(pos, len(calendar) - 1)] == days)
        return cls(days, table["ticker"].to_numpy(zero_copy_only=False), table["close"].to_numpy(),
                   volume, np.char.find(flags, "corporate_action") >= 0, volume == 0, pos, on)


def segment_candidates(s: Series, r: np.ndarray, p: np.ndarray, offset: int, bounds: tuple[int, int],
                       params: StockParams, skipped: Counter, cand: "Candidates") -> None:
    """The candidates of one segment (rows ``r`` at calendar positions ``p``, no gap and no
    corporate action inside): indicators from the segment's start, sampled every ``stride``
    calendar days, skipped where not ready, halted or too small a move; split by date."""
    cutoff_pos, test_start = bounds
    names = indicator_names(params.indicators)
    ind = compute_indicators(s.close[r], s.volume[r], params.indicators)
    values = np.column_stack([ind[n] for n in names])
    t = np.arange(len(r) - 1)                       # t needs its target in the segment
    sampled = (p[t] + offset) % params.stride == 0
    ready = (t >= params.window - 1) & ~np.isnan(values[t]).any(axis=1)
    skipped["warmup_or_segment_start"] += int((sampled & ~ready).sum())
    t = t[sampled & ready]
    halted = s.halt[r[t]] | s.halt[r[t + 1]]
    skipped["halt"] += int(halted.sum())
    t = t[~halted]
    move = s.close[r[t + 1]] / s.close[r[t]] - 1.0
    small = (np.abs(move) < params.min_move) | (move == 0)
    skipped["small_move"] += int(small.sum())
    t, move = t[~small], move[~small]
    split = np.where(p[t + 1] < cutoff_pos, "train",
                     np.where(p[t - params.window + 1] >= test_start, "test", ""))
    skipped["embargo"] += int((split == "").sum())
    keep = split != ""
    cand.add(r[t[keep]], split[keep], move[keep] > 0, values[t[keep]])


def find_candidates(table: pa.Table, calendar: np.ndarray, params: StockParams
                    ) -> tuple[Candidates, Counter, list[dict[str, Any]], dict[str, Any]]:
    """Every usable (ticker, t) of the price table (sorted by ticker, date), with its split."""
    s = Series.of(table, calendar)
    rejects = [reject("stock", str(s.tickers[i]), f"{s.tickers[i]} {_iso(s.days[i])}",
                      "off_calendar", "a trading day the calendar index does not have")
               for i in np.flatnonzero(~s.on_calendar)]
    cutoff_pos = int(np.searchsorted(calendar, (params.cutoff - date(1970, 1, 1)).days))
    if not 0 < cutoff_pos < len(calendar):
        raise StageError(f"stock.cutoff {params.cutoff} is outside the calendar "
                         f"({_iso(calendar[0])} .. {_iso(calendar[-1])})")
    bounds = (cutoff_pos, cutoff_pos + params.embargo)
    cand, skipped = Candidates(), Counter()
    info = {"tickers": 0, "delisted": [], "segments": 0, "corporate_actions": int(s.action.sum()),
            "gaps": 0}
    starts = np.flatnonzero(np.r_[True, s.tickers[1:] != s.tickers[:-1]])
    for start, end in zip(starts, np.r_[starts[1:], len(s.tickers)]):
        ticker = str(s.tickers[start])
        rows = np.arange(start, end)[s.on_calendar[start:end]]
        if len(rows) < params.window + 1:
            rejects.append(reject("stock", ticker, ticker, "too_short",
                                  f"{len(rows)} rows on the calendar, a window needs {params.window + 1}"))
            continue
        info["tickers"] += 1
        p = s.pos[rows]
        if p[-1] < len(calendar) - 1:
            info["delisted"].append(ticker)
        gap = np.r_[False, np.diff(p) != 1]
        info["gaps"] += int(gap.sum())
        offset = ticker_offset(ticker, params.seed, params.stride)
        for seg in np.split(np.arange(len(rows)), np.flatnonzero(gap | s.action[rows])):
            if len(seg) >= 2:
                info["segments"] += 1
                segment_candidates(s, rows[seg], p[seg], offset, bounds, params, skipped, cand)
    skipped["corporate_action_or_gap_cuts"] = int(info["segments"] - info["tickers"])
    return cand, skipped, rejects, info


def _iso(day: int) -> str:
    return date.fromordinal(int(day) + 719163).isoformat()


# --------------------------------------------------------------------------- selection
def select(split: np.ndarray, up: np.ndarray, params: StockParams) -> tuple[np.ndarray, dict[str, Any]]:
    """Indexes of the chosen candidates (sorted) and, per split, natural and chosen up shares."""
    rng = np.random.default_rng(params.seed)
    chosen, report = [], {}
    for name, target in (("train", params.target.train), ("test", params.target.test)):
        idx = np.flatnonzero(split == name)
        natural = float(up[idx].mean()) if len(idx) else None
        if name == "train" and params.balance:
            ups, downs = idx[up[idx]], idx[~up[idx]]
            each = min(len(ups), len(downs), target // 2)
            pick = np.r_[rng.choice(ups, each, replace=False), rng.choice(downs, each, replace=False)]
        else:
            pick = rng.choice(idx, min(target, len(idx)), replace=False) if len(idx) else idx
        pick = np.sort(pick.astype(np.int64))
        chosen.append(pick)
        report[name] = {"candidates": int(len(idx)), "natural_up_share": _round(natural),
                        "selected": int(len(pick)),
                        "selected_up_share": _round(float(up[pick].mean()) if len(pick) else None),
                        "target": target, "short": int(target - len(pick))}
    return np.sort(np.concatenate(chosen)), report


def _round(x: Optional[float]) -> Optional[float]:
    return None if x is None else round(x, 4)


# --------------------------------------------------------------------------- questions
def _num(x: float) -> str:
    if math.isfinite(x) and x == round(x) and abs(x) >= 100:
        return f"{int(round(x)):,}"
    return f"{x:,.2f}"


INDICATOR_LABELS = {"rsi": "RSI({p})", "macd": "MACD", "macd_signal": "MACD 시그널",
                    "macd_hist": "MACD 히스토그램", "bb_upper": "볼린저 밴드 상단",
                    "bb_middle": "볼린저 밴드 중심", "bb_lower": "볼린저 밴드 하단"}


def indicator_label(name: str) -> str:
    if name.startswith("ma") and name[2:].isdigit():
        return f"{name[2:]}일 이동평균"
    if name.startswith("rsi"):
        return f"RSI({name[3:]})"
    if name.startswith("volume_ratio"):
        return f"거래량 비율(거래량/{name[12:]}일 평균)"
    return INDICATOR_LABELS[name]


def build_records(table: pa.Table, rows: np.ndarray, split: np.ndarray, up: np.ndarray,
                  values: np.ndarray, params: StockParams, key: str) -> list[dict[str, Any]]:
    names = indicator_names(params.indicators)
    labels = [indicator_label(n) for n in names]
    days = table["date"].cast(pa.int32()).to_numpy()
    cols = {f: table[f].to_numpy(zero_copy_only=False)
            for f in ("ticker", "name", "market", "open", "high", "low", "close", "volume")}
    w = params.window
    template = string.Template(load_template(TEMPLATE))
    records = []
    for k, t in enumerate(rows):
        span = range(t - w + 1, t + 1)
        lines = ["| 날짜 | 시가 | 고가 | 저가 | 종가 | 거래량 |", "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {_iso(days[i])} | {_num(cols['open'][i])} | {_num(cols['high'][i])} | "
                  f"{_num(cols['low'][i])} | {_num(cols['close'][i])} | {int(cols['volume'][i]):,} |"
                  for i in span]
        shown = {n: round(float(v), 4) for n, v in zip(names, values[k])}
        indicators = "\n".join(f"- {label}: {_num(float(v))}" for label, v in zip(labels, values[k]))
        ticker, name = str(cols["ticker"][t]), str(cols["name"][t])
        question = template.substitute(company=name, ticker=ticker, window=w, date=_iso(days[t]),
                                       table="\n".join(lines), indicators=indicators).strip()
        answer = 0 if up[k] else 1
        meta = {"ticker": ticker, "name": name, "market": str(cols["market"][t]),
                "window_start": _iso(days[t - w + 1]), "window_end": _iso(days[t]),
                "target_date": _iso(days[t + 1]), "close": float(cols["close"][t]),
                "next_close": float(cols["close"][t + 1]),
                "move": round(float(cols["close"][t + 1] / cols["close"][t] - 1), 6),
                "indicators": shown, "calendar_index": params.calendar.index,
                "price_sources": params.prices}
        records.append({"id": content_id("stock", key, ticker, meta["window_end"]),
                        "source": f"stock_{key}", "domain": DOMAIN, "split": str(split[k]),
                        "question": question, "choices": list(CHOICES), "answer": answer,
                        "category": CATEGORY,
                        "meta": json.dumps(meta, ensure_ascii=False, sort_keys=True)})
    return records


def check_no_lookahead(records: list[dict[str, Any]], params: StockParams,
                       calendar: np.ndarray) -> None:
    """From the data alone: train targets before the cutoff; test windows start after the
    embargo. A violation is a bug here, never a question to write."""
    cutoff = params.cutoff.isoformat()
    cutoff_pos = int(np.searchsorted(calendar, (params.cutoff - date(1970, 1, 1)).days))
    first_test = _iso(calendar[cutoff_pos + params.embargo]) if cutoff_pos + params.embargo < len(calendar) else "9999-12-31"
    for r in records:
        meta = json.loads(r["meta"])
        if not meta["window_start"] <= meta["window_end"] < meta["target_date"]:
            raise StageError(f"stock record {r['id']}: dates out of order {meta}")
        if r["split"] == "train" and not meta["target_date"] < cutoff:
            raise StageError(f"stock record {r['id']}: train target {meta['target_date']} is not "
                             f"before the cutoff {cutoff}")
        if r["split"] == "test" and not meta["window_start"] >= first_test:
            raise StageError(f"stock record {r['id']}: test window starts {meta['window_start']}, "
                             f"before the end of the embargo {first_test}")


def make_questions(prices: pa.Table, calendar: np.ndarray, params: StockParams, key: str
                   ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """The stage's work on values: records, rejects and metrics."""
    cand, skipped, rejects, info = find_candidates(prices, calendar, params)
    rows, split, up, values = cand.arrays(len(indicator_names(params.indicators)))
    order = np.lexsort((rows,))           # deterministic: by table row
    rows, split, up, values = rows[order], split[order], up[order], values[order]
    chosen, splits = select(split, up, params)
    records = build_records(prices, rows[chosen], split[chosen], up[chosen], values[chosen],
                            params, key)
    check_no_lookahead(records, params, calendar)
    metrics = {"records": len(records), "splits": splits, "skipped": dict(sorted(skipped.items())),
               "tickers": info["tickers"], "delisted_tickers": len(info["delisted"]),
               "gaps": info["gaps"], "corporate_actions": info["corporate_actions"],
               "segments": info["segments"],
               "calendar": {"index": params.calendar.index, "days": int(len(calendar)),
                            "first": _iso(calendar[0]), "last": _iso(calendar[-1])},
               "cutoff": params.cutoff.isoformat(), "embargo_days": params.embargo,
               "rejects_by_reason": dict(sorted(Counter(r["reason"] for r in rejects).items()))}
    return records, rejects, metrics


@stage_main
def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__, "key")
    parser.add_argument("--calendar", required=True, help="the collected index prices")
    parser.add_argument("--prices", nargs="+", required=True, help="the collected stock prices "
                        "(dvc.yaml's fixed slots: repeats allowed, must name stock.<key>.prices)")
    args = parser.parse_args(argv)
    key = args.key
    params, log, timer = begin_stage(args, "stock", key, load_params)
    expected = [f"data/collected/{name}.parquet" for name in params.prices]
    given = list(dict.fromkeys(args.prices))
    if sorted(given) != sorted(expected):
        raise StageError(f"stock@{key}: --prices {given} are not stock.{key}.prices {expected}: "
                         "run `python -m stages.dvc_vars` after editing params.yaml")
    if args.calendar != f"data/collected/{params.calendar.source}.parquet":
        raise StageError(f"stock@{key}: --calendar {args.calendar} is not "
                         f"stock.{key}.calendar.source ({params.calendar.source})")
    calendar = calendar_days(read_prices(args.calendar, "index"), params.calendar.index, args.calendar)
    tables = [read_prices(path, "stock") for path in expected]
    prices = pa.concat_tables(tables)
    if len(tables) > 1:
        prices = prices.sort_by([("ticker", "ascending"), ("date", "ascending")])
        try:
            validate_prices_table(prices)
        except ValueError as exc:
            raise StageError(f"stock@{key}: the price sources overlap ({exc})") from None
    log.info("%d price rows of %d sources; calendar %s: %d days", prices.num_rows, len(tables),
             params.calendar.index, len(calendar))
    records, rejects, metrics = make_questions(prices, calendar, params, key)
    for r in rejects:
        log.info("reject %s: %s %s", r["item"], r["reason"], r["detail"])
    validate_table("mcq", records)
    write_records(rejects, SCHEMAS["reject"], args.rejects)
    if not records:
        raise StageError(f"stock@{key}: no questions (metrics: {metrics['skipped']})")
    write_records(records, SCHEMAS["mcq"], args.out)
    metrics["seconds"] = timer.seconds
    write_metrics(args.metrics, metrics)
    for name, s in metrics["splits"].items():
        log.info("%s: %d of %d candidates (natural up share %s, selected %s), short %d", name,
                 s["selected"], s["candidates"], s["natural_up_share"], s["selected_up_share"],
                 s["short"])
    log.info("%d questions -> %s; skipped %s (%.1fs)", len(records), args.out,
             metrics["skipped"], timer.seconds)


if __name__ == "__main__":
    main()
