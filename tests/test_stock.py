"""stock@<key>: no look-ahead (checked from the data alone), the calendar from the index, no
window across a corporate action or gap, causal TA-Lib indicators, balanced train / natural
test, determinism, and stock examples that survive mix."""
from __future__ import annotations

import json
from datetime import date

import numpy as np
import pyarrow as pa
import pytest

from stages.common.runlog import StageError
from stages.common.schema import validate_table
from stages.sources.prices import collect_prices
from stages.sources.spec import SourceParams
from stages.stock import (StockParams, calendar_days, check_no_lookahead, compute_indicators,
                          indicator_names, make_questions)
from tests.conftest import ROOT
from tests.test_prices import PORTAL_COLUMNS

SAMPLES = ROOT / "data/samples/raw/prices"
INDEX_COLUMNS = {"date": "basDt", "ticker": "idxNm", "name": "idxNm", "market": "idxCsf",
                 "open": "mkp", "high": "hipr", "low": "lopr", "close": "clpr", "volume": "trqu"}


def _collect(name: str, series: str, columns: dict) -> pa.Table:
    params = SourceParams.model_validate({
        "kind": "prices", "loader": "local", "input": str(SAMPLES / name), "local": {},
        "prices": {"series": series}, "columns": columns})
    return collect_prices(params, name).table


@pytest.fixture(scope="module")
def sample():
    prices = _collect("stock_prices.csv", "stock", PORTAL_COLUMNS)
    calendar = calendar_days(_collect("index_prices.csv", "index", INDEX_COLUMNS), "코스피", "idx")
    return prices, calendar


def params(**overrides) -> StockParams:
    data = {"prices": ["krx_stock_prices"], "calendar": {"source": "idx", "index": "코스피"},
            "window": 5, "stride": 3, "min_move": 0.002, "cutoff": "2025-09-01", "embargo": 5,
            "target": {"train": 1000, "test": 1000}, "seed": 3}
    data.update(overrides)
    return StockParams.model_validate(data)


def iso(day: int) -> str:
    return date.fromordinal(int(day) + 719163).isoformat()


def test_splits_by_date_with_an_embargo_checkable_from_the_data(sample):
    prices, calendar = sample
    p = params()
    records, _, metrics = make_questions(prices, calendar, p, "krx")
    validate_table("mcq", records)
    days = [iso(d) for d in calendar]
    first_test = days[days.index(min(d for d in days if d >= "2025-09-01")) + p.embargo]
    by_split = {"train": 0, "test": 0}
    for r in records:
        meta = json.loads(r["meta"])
        by_split[r["split"]] += 1
        start, end, target = meta["window_start"], meta["window_end"], meta["target_date"]
        # window = exactly `window` consecutive calendar days ending at t; target = the next one
        assert days.index(end) - days.index(start) == p.window - 1
        assert days[days.index(end) + 1] == target
        if r["split"] == "train":
            assert target < "2025-09-01"
        else:
            assert start >= first_test
        assert r["choices"] == ["상승", "하락"]
        assert r["answer"] == (0 if meta["next_close"] > meta["close"] else 1)
    assert by_split["train"] > 100 and by_split["test"] > 20
    assert metrics["splits"]["train"]["selected_up_share"] == 0.5     # balanced
    assert metrics["splits"]["test"]["natural_up_share"] is not None


def test_a_planted_look_ahead_fails(sample):
    prices, calendar = sample
    p = params()
    records, _, _ = make_questions(prices, calendar, p, "krx")
    train = next(r for r in records if r["split"] == "train")
    leaked = dict(train, meta=json.dumps({**json.loads(train["meta"]), "target_date": "2025-09-02",
                                          "window_end": "2025-09-01"}))
    with pytest.raises(StageError, match="not before the cutoff"):
        check_no_lookahead([leaked], p, calendar)
    test = next(r for r in records if r["split"] == "test")
    early = dict(test, meta=json.dumps({**json.loads(test["meta"]), "window_start": "2025-08-29"}))
    with pytest.raises(StageError, match="before the end of the embargo"):
        check_no_lookahead([early], p, calendar)


def test_no_window_spans_the_split_a_gap_or_a_halted_target_and_holidays_are_not_gaps(sample):
    prices, calendar = sample
    records, _, metrics = make_questions(prices, calendar, params(), "krx")
    rows = prices.to_pylist()
    action_days = {(r["ticker"], r["date"].isoformat()) for r in rows if "corporate_action" in r["flags"]}
    assert len(action_days) == 1
    (split_ticker, split_day), = action_days
    have = {(r["ticker"], r["date"].isoformat()) for r in rows}
    days = [iso(d) for d in calendar]
    crossing_holiday = 0
    for r in records:
        meta = json.loads(r["meta"])
        span = days[days.index(meta["window_start"]):days.index(meta["target_date"]) + 1]
        assert all((meta["ticker"], d) in have for d in span), "a window over a gap"
        if meta["ticker"] == split_ticker:
            assert not meta["window_start"] < split_day <= meta["target_date"]
        pairs = zip(map(date.fromisoformat, span), map(date.fromisoformat, span[1:]))
        crossing_holiday += any(date.fromordinal(o).weekday() < 5
                                for a, b in pairs for o in range(a.toordinal() + 1, b.toordinal()))
    assert crossing_holiday >= 1   # a weekday holiday inside a window is not a gap
    assert metrics["gaps"] >= 2 and metrics["delisted_tickers"] == 1
    assert metrics["corporate_actions"] == 1
    # the calendar skips weekends and holidays, so windows run across them
    assert "2024-02-09" not in days and "2024-02-08" in days and "2024-02-13" in days


def test_indicators_at_t_use_prices_up_to_t_only(sample):
    prices, calendar = sample
    p = params()
    records, _, _ = make_questions(prices, calendar, p, "krx")
    rows = [r for r in prices.to_pylist() if r["ticker"] == json.loads(records[0]["meta"])["ticker"]]
    meta = json.loads(records[0]["meta"])
    # the segment runs from the ticker's first row (record 0 is before the sample's events)
    end = next(i for i, r in enumerate(rows) if r["date"].isoformat() == meta["window_end"])
    close = np.array([r["close"] for r in rows], dtype="float64")
    volume = np.array([r["volume"] for r in rows], dtype="float64")
    upto = compute_indicators(close[:end + 1], volume[:end + 1], p.indicators)
    full = compute_indicators(close, volume, p.indicators)
    for name in indicator_names(p.indicators):
        assert upto[name][end] == pytest.approx(full[name][end])
        assert round(float(upto[name][end]), 4) == pytest.approx(meta["indicators"][name])
    # and it is TA-Lib's own SMA/RSI, not a hand-written formula
    import talib
    assert upto["ma5"][end] == pytest.approx(close[end - 4:end + 1].mean())
    assert upto["rsi14"][end] == pytest.approx(talib.RSI(close[:end + 1], 14)[end])


def test_same_inputs_same_questions_and_the_target_is_met_or_short_is_reported(sample):
    prices, calendar = sample
    a, _, m = make_questions(prices, calendar, params(target={"train": 10, "test": 4}), "krx")
    b, _, _ = make_questions(prices, calendar, params(target={"train": 10, "test": 4}), "krx")
    assert a == b and len(a) == 14 and m["splits"]["train"]["short"] == 0
    _, _, m = make_questions(prices, calendar, params(target={"train": 100_000, "test": 4}), "krx")
    assert m["splits"]["train"]["short"] > 0


@pytest.mark.parametrize("change, message", [
    ({"stride": 2}, "share most of their rows"),
    ({"embargo": 3}, "training period"),
    ({"cutoff": "2031-01-01"}, None),
])
def test_params_that_would_overlap_or_leak_are_refused(sample, change, message):
    if message is None:
        prices, calendar = sample
        with pytest.raises(StageError, match="outside the calendar"):
            make_questions(prices, calendar, params(**change), "krx")
        return
    with pytest.raises(ValueError, match=message):
        params(**change)


def test_stock_examples_survive_mix(sample, tmp_path):
    """Tables of one template must not be eaten by mix's near-duplicate removal, and the test
    split never reaches a mixture."""
    from tests.test_mix import eval_index, recipe, run_build
    from stages.base_model import build_tokenizer
    prices, calendar = sample
    records, _, _ = make_questions(prices, calendar, params(target={"train": 60, "test": 20}), "krx")
    train = [r for r in records if r["split"] == "train"]
    tokenizer = build_tokenizer([r["question"] for r in records[:20]] * 3, 900)
    result, examples, rejects = run_build(
        tmp_path, "v7", recipe({"stock_krx": {"format": "mcq_letter"}}, max_length=1024),
        {"stock_krx": ("mcq", records)}, tokenizer, eval_index())
    assert len(examples) == len(train) == 60
    assert {e["completion"][0]["content"] for e in examples} == {"A", "B"}
    summary = result["sources"]["stock_krx"] if "sources" in result else result
    assert json.dumps(summary).count("held_out_test_records") >= 1
    assert not [r for r in rejects if r["reason"] == "near_duplicate"]
