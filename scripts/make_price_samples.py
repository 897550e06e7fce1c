#!/usr/bin/env python
"""Daily price series in the layout of the public data portal (SAMPLE DATA, generated for this
repository): fictional tickers on a random walk, on a Korean-style trading calendar.

Not real market data: the companies, codes and prices are invented. The files copy only the
*layouts* of the portal's 금융위원회_주식시세정보 (stock prices: ``basDt, srtnCd, isinCd, itmsNm,
mrktCtg, clpr, vs, fltRt, mkp, hipr, lopr, trqu, trPrc, lstgStCnt, mrktTotAmt``) and
금융위원회_지수시세정보 (index prices: ``basDt, idxNm, idxCsf, clpr, vs, fltRt, mkp, hipr, lopr,
trqu, trPrc, lstgMrktTotAmt``), so that ``collect`` reads them with production settings.

What a real export has and the samples plant on purpose (``events()``):

- unadjusted prices: a 1:5 split (the listed share count x5, prices /5 from that day);
- a trading halt: volume 0 with open/high/low 0 and the previous close (as the portal prints it);
- a gap: trading days missing for one ticker; a delisting: a ticker that ends early;
- bad rows for the rejects: high < low, a zero price, an unparseable date, a conflicting
  duplicate, and a close 80% above the day before with no share change (beyond the ±30% limit).

``generate`` is also what ``bench/rehearsal_stock.py`` uses at production size (~2,000
tickers over three years, ~1.5 M rows), without the planted events.

    python scripts/make_price_samples.py --out data/samples/raw/prices
"""
from __future__ import annotations

import argparse
import io
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

# Fixed-date public holidays + the lunar ones of the sample years (설날, 추석, 부처님오신날 …).
FIXED_HOLIDAYS = ("01-01", "03-01", "05-05", "06-06", "08-15", "10-03", "10-09", "12-25", "12-31")
LUNAR_HOLIDAYS = {
    2023: ("01-23", "01-24", "05-29", "09-28", "09-29", "10-02"),
    2024: ("02-09", "02-12", "04-10", "05-15", "09-16", "09-17", "09-18"),
    2025: ("01-28", "01-29", "01-30", "03-03", "05-06", "06-03", "10-06", "10-07", "10-08"),
    2026: ("02-16", "02-17", "02-18", "05-25", "09-24", "09-25"),
}
STOCK_COLUMNS = ["basDt", "srtnCd", "isinCd", "itmsNm", "mrktCtg", "clpr", "vs", "fltRt", "mkp",
                 "hipr", "lopr", "trqu", "trPrc", "lstgStCnt", "mrktTotAmt"]
INDEX_COLUMNS = ["basDt", "idxNm", "idxCsf", "clpr", "vs", "fltRt", "mkp", "hipr", "lopr", "trqu",
                 "trPrc", "lstgMrktTotAmt"]
SAMPLE_NAMES = ["한빛전자", "누리바이오", "가온화학", "다온금융"]


def trading_days(start: date, end: date) -> list[date]:
    """Weekdays between start and end that are not holidays (the sample exchange's calendar)."""
    days, day = [], start
    while day <= end:
        md = day.strftime("%m-%d")
        if day.weekday() < 5 and md not in FIXED_HOLIDAYS and md not in LUNAR_HOLIDAYS.get(day.year, ()):
            days.append(day)
        day += timedelta(days=1)
    return days


def tick(price: np.ndarray) -> np.ndarray:
    """KRX-style tick sizes: prices are whole multiples of the tick of their band."""
    bands = [(2_000, 1), (5_000, 5), (20_000, 10), (50_000, 50), (200_000, 100), (500_000, 500)]
    size = np.full(price.shape, 1_000.0)
    for limit, step in reversed(bands):
        size = np.where(price < limit, step, size)
    return np.maximum(np.round(price / size) * size, size)


def _paths(rng: np.random.Generator, n_tickers: int, n_days: int, start_price: np.ndarray,
           vol: float) -> np.ndarray:
    """Daily closes (float) of a random walk with a little momentum, within ±29% a day."""
    shocks = rng.standard_normal((n_tickers, n_days)) * vol
    returns = np.empty_like(shocks)
    returns[:, 0] = 0.0
    for d in range(1, n_days):
        returns[:, d] = np.clip(0.08 * returns[:, d - 1] + shocks[:, d], -0.29, 0.29)
    return start_price[:, None] * np.exp(np.cumsum(returns, axis=1))


def generate(n_tickers: int, start: date, end: date, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(stock rows, index rows) in the portal's layouts, as strings, sorted by date then code."""
    rng = np.random.default_rng(seed)
    days = trading_days(start, end)
    n = len(days)
    base = np.exp(rng.uniform(np.log(2_000), np.log(300_000), n_tickers))
    close = tick(_paths(rng, n_tickers, n, base, 0.021))
    prev = np.concatenate([base[:, None], close[:, :-1]], axis=1)
    prev = tick(prev)
    gap_open = np.clip(rng.normal(0, 0.006, close.shape), -0.05, 0.05)
    open_ = tick(prev * (1 + gap_open))
    span = np.abs(rng.normal(0, 0.012, close.shape))
    high = np.maximum(np.maximum(open_, close), tick(np.maximum(open_, close) * (1 + span)))
    low = np.minimum(np.minimum(open_, close), tick(np.minimum(open_, close) * (1 - span)))
    volume = np.round(np.exp(rng.normal(11, 1.0, close.shape))).astype(np.int64)
    shares = np.round(np.exp(rng.uniform(np.log(5e6), np.log(6e8), n_tickers))).astype(np.int64)
    codes = [f"{100000 + 7919 * i % 900000:06d}" for i in range(n_tickers)]
    names = [SAMPLE_NAMES[i] if i < len(SAMPLE_NAMES) else f"샘플기업{i:04d}" for i in range(n_tickers)]
    markets = np.where(np.arange(n_tickers) % 3 == 2, "KOSDAQ", "KOSPI")
    dates = np.array([d.strftime("%Y%m%d") for d in days])

    stock = pd.DataFrame({
        "basDt": np.tile(dates, n_tickers),
        "srtnCd": np.repeat(codes, n),
        "isinCd": np.repeat([f"KR7{c}00{i % 10}" for i, c in enumerate(codes)], n),
        "itmsNm": np.repeat(names, n),
        "mrktCtg": np.repeat(markets, n),
        "clpr": close.ravel(), "prev": prev.ravel(), "mkp": open_.ravel(), "hipr": high.ravel(),
        "lopr": low.ravel(), "trqu": volume.ravel(), "lstgStCnt": np.repeat(shares, n),
    })
    index_close = 2_500 * np.exp(np.cumsum(np.r_[0, rng.normal(0.0002, 0.009, n - 1)]))
    index_prev = np.r_[index_close[0], index_close[:-1]]
    index = pd.DataFrame({
        "basDt": dates, "idxNm": "코스피", "idxCsf": "KOSPI시리즈", "clpr": index_close.round(2),
        "prev": index_prev.round(2), "mkp": (index_prev * (1 + rng.normal(0, 0.003, n))).round(2),
        "trqu": rng.integers(300_000_000, 900_000_000, n), "lstgMrktTotAmt": 2_000_000_000_000_000,
    })
    index["hipr"] = np.maximum(index[["mkp", "clpr"]].max(axis=1) * (1 + np.abs(rng.normal(0, 0.004, n))), 0).round(2)
    index["lopr"] = (index[["mkp", "clpr"]].min(axis=1) * (1 - np.abs(rng.normal(0, 0.004, n)))).round(2)
    return stock, index


def finish(stock: pd.DataFrame, index: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The derived portal columns (vs, fltRt, trPrc, mrktTotAmt), as the portal writes them."""
    stock = stock.copy()
    stock["vs"] = stock["clpr"] - stock["prev"]
    stock["fltRt"] = (100 * stock["vs"] / stock["prev"]).round(2)
    stock["trPrc"] = (stock["trqu"] * (stock["mkp"] + stock["clpr"]) / 2).round().astype(np.int64)
    stock["mrktTotAmt"] = (stock["clpr"] * stock["lstgStCnt"]).round().astype(np.int64)
    for col in ("clpr", "vs", "mkp", "hipr", "lopr"):
        stock[col] = stock[col].round().astype(np.int64)
    index = index.copy()
    index["vs"] = (index["clpr"] - index["prev"]).round(2)
    index["fltRt"] = (100 * index["vs"] / index["prev"]).round(2)
    index["trPrc"] = (index["trqu"] * 12_000).astype(np.int64)
    return stock[STOCK_COLUMNS], index[INDEX_COLUMNS]


def plant_events(stock: pd.DataFrame) -> pd.DataFrame:
    """The sample's corporate action, halt, gap, delisting and bad rows (module docstring)."""
    df = stock.copy()
    code = df["srtnCd"].unique()
    days = sorted(df["basDt"].unique())
    # ticker 0: a 1:5 split a third of the way in (unadjusted prices, shares x5)
    split_day = days[len(days) // 3]
    after = (df["srtnCd"] == code[0]) & (df["basDt"] >= split_day)
    for col in ("clpr", "prev", "mkp", "hipr", "lopr"):
        df.loc[after, col] = tick(df.loc[after, col].to_numpy() / 5)
    df.loc[after & (df["basDt"] == split_day), "prev"] = \
        df.loc[(df["srtnCd"] == code[0]) & (df["basDt"] < split_day), "clpr"].iloc[-1]
    df.loc[after, "lstgStCnt"] *= 5
    df.loc[after, "trqu"] *= 5
    # ticker 1: a halt (volume 0; open/high/low printed as 0) and a gap of three trading days
    halt_day, gap = days[len(days) // 2], days[2 * len(days) // 3: 2 * len(days) // 3 + 3]
    one = df["srtnCd"] == code[1]
    prev_close = df.loc[one & (df["basDt"] < halt_day), "clpr"].iloc[-1]
    df.loc[one & (df["basDt"] == halt_day), ["clpr", "prev", "mkp", "hipr", "lopr", "trqu"]] = \
        [prev_close, prev_close, 0, 0, 0, 0]
    df = df[~(one & df["basDt"].isin(gap))]
    # ticker 2: delisted two months before the end
    df = df[~((df["srtnCd"] == code[2]) & (df["basDt"] > days[-42]))]
    # bad rows on ticker 3
    three = np.flatnonzero((df["srtnCd"] == code[3]).to_numpy())
    bad = df.iloc[three[[40, 80, 120, 160]]].copy()
    df.loc[df.index[three[40]], ["hipr", "lopr"]] = [bad.iloc[0]["lopr"] - 10, bad.iloc[0]["hipr"]]
    df.loc[df.index[three[80]], "lopr"] = 0
    spike = df.index[three[200]]
    df.loc[spike, ["clpr", "hipr"]] = [tick(np.array([df.at[spike, "prev"] * 1.8]))[0]] * 2
    odd_date = bad.iloc[2:3].copy()
    odd_date["basDt"] = odd_date["basDt"].str[:4] + "1345"
    conflict = bad.iloc[3:4].copy()
    conflict["trqu"] = conflict["trqu"] + 1000
    rows = [df, odd_date, conflict]
    return pd.concat(rows).sort_values(["basDt", "srtnCd"], kind="stable").reset_index(drop=True)


def csv_bytes(frame: pd.DataFrame) -> bytes:
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False, lineterminator="\n")
    return buffer.getvalue().encode("utf-8")


def sample_files() -> dict[str, bytes]:
    """The quickstart's files: four tickers and 코스피 over 2024-2025."""
    stock, index = generate(4, date(2024, 1, 2), date(2025, 12, 30), seed=20240102)
    stock = plant_events(stock)
    stock, index = finish(stock, index)
    return {"stock_prices.csv": csv_bytes(stock), "index_prices.csv": csv_bytes(index)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/samples/raw/prices")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, data in sample_files().items():
        (out / name).write_bytes(data)
        print(f"{out / name}: {len(data):,} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
