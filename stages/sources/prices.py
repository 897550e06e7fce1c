"""Daily price series (``kind: prices``): a local CSV/TSV/Parquet export -> checked rows, columnar.

The layouts this reads through ``columns`` (record field -> source column):

- the public data portal's stock-price service (주식시세정보): ``basDt, srtnCd, isinCd, itmsNm,
  mrktCtg, clpr, vs, fltRt, mkp, hipr, lopr, trqu, trPrc, lstgStCnt, mrktTotAmt`` — prices are
  *unadjusted*, so a split shows as a jump of the close together with a change of ``lstgStCnt``;
- its index-price service (지수시세정보): ``basDt, idxNm, idxCsf, clpr, vs, fltRt, mkp, hipr,
  lopr, trqu, trPrc, …`` (``ticker`` <- ``idxNm``);
- any other export, e.g. one ticker's ``날짜, 시가, 고가, 저가, 종가, 거래량`` with ``ticker`` (and
  ``name``) as ``constants``.

Everything stays in Arrow/NumPy/pandas columns: 1.5 M rows never become a list of dicts. Only
rejected rows (few) are turned into reject records, each with its reason:

==========================  ==============================================================
reason                      the row
==========================  ==============================================================
``malformed_row``           a CSV line with the wrong number of fields
``bad_date``                a date that does not parse with ``prices.date_format``
``missing_ticker``          an empty ticker
``bad_number``              an open/high/low/close/volume cell that is empty or not a number
``non_positive_price``      a price <= 0 (a halt row of the portal — volume 0, open/high/low
                            0, a positive close — is not: its open/high/low become the close
                            and it is flagged ``halt``)
``negative_volume``         volume < 0
``high_below_low``          high < low
``open_outside_range``      open outside [low, high]
``close_outside_range``     close outside [low, high]
``duplicate_row``           a second copy of an identical (ticker, date) row (the first is kept)
``conflicting_duplicate``   (ticker, date) rows that disagree: every copy (which is right?)
``beyond_price_limit``      a close-to-close move beyond ``prices.max_daily_move`` (±30%) with
                            no change of the listed share count; rows are re-checked against
                            the previous *kept* row until none is left
==========================  ==============================================================

Flags on kept rows (column ``flags``): ``halt`` (volume 0) and ``corporate_action`` (the listed
share count changed by at least ``prices.min_share_change`` from the ticker's previous row:
split, rights or bonus issue — the price jump it comes with is real, not an error, but prices
before and after are not comparable, so ``stock`` never builds a window across it). Gaps,
delistings and the trading calendar need the index series: ``stock`` derives them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from stages.common.runlog import StageError
from stages.common.schema import SCHEMAS, reject
from stages.sources.spec import SourceParams

NUMERIC = ("open", "high", "low", "close", "volume")
OPTIONAL_NUMERIC = ("value", "listed_shares")
MAX_LIMIT_PASSES = 10


@dataclass
class PriceResult:
    table: pa.Table
    rejects: list[dict[str, Any]] = field(default_factory=list)
    counts: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- reading
def _read_delimited(path: str, delimiter: str, encoding: str, param: str
                    ) -> tuple[pa.Table, list[tuple[str, str, str]]]:
    """Every cell as a string; malformed lines come back as (item, reason, detail)."""
    import pyarrow.csv as pcsv
    bad: list[tuple[str, str, str]] = []

    def on_invalid(row: Any) -> str:
        where = f"line {row.number}" if row.number is not None else "a line"
        bad.append((where, "malformed_row", f"{row.actual_columns} fields, header has "
                    f"{row.expected_columns}: {row.text[:200]}"))
        return "skip"

    codec = "utf-8" if encoding.lower().replace("_", "-") in ("utf-8", "utf8", "utf-8-sig") else encoding
    with open(path, "rb") as handle:
        head = handle.readline()
    try:
        header = head.decode("utf-8-sig" if codec == "utf-8" else codec).strip("\r\n")
    except (LookupError, UnicodeDecodeError) as exc:
        hint = " (Korean public data is often cp949/euc-kr)" if "utf" in codec.lower() else ""
        raise StageError(f"{path}: cannot read the header with {param}.local.encoding="
                         f"{encoding!r}{hint} ({exc})") from None
    names = [h.strip() for h in header.split(delimiter)]
    try:
        table = pcsv.read_csv(
            path,
            read_options=pcsv.ReadOptions(encoding=codec, use_threads=False, column_names=names,
                                          skip_rows=1, block_size=1 << 24),
            parse_options=pcsv.ParseOptions(delimiter=delimiter, invalid_row_handler=on_invalid,
                                            newlines_in_values=True),
            convert_options=pcsv.ConvertOptions(column_types={n: pa.string() for n in names},
                                                strings_can_be_null=False))
    except (pa.ArrowInvalid, UnicodeDecodeError, LookupError) as exc:
        hint = " (Korean public data is often cp949/euc-kr)" if "utf" in codec.lower() else ""
        raise StageError(f"{path}: not readable as {delimiter!r}-separated text with "
                         f"{param}.local.encoding={encoding!r}{hint}: {exc}") from None
    return table, bad


def read_price_table(path: str, params: SourceParams, param: str
                     ) -> tuple[pa.Table, list[tuple[str, str, str]]]:
    """The source as an Arrow table (columns as the file has them) + malformed lines."""
    import os
    from stages.sources.local import detect_format, read_local
    if not os.path.isfile(path):
        raise StageError(f"{param}.input: file not found: {path}")
    fmt = detect_format(path, params.local, param)
    if fmt in ("csv", "tsv"):
        return _read_delimited(path, "," if fmt == "csv" else "\t", params.local.encoding, param)
    if fmt == "parquet":
        import pyarrow.parquet as pq
        try:
            return pq.read_table(path), []
        except Exception as exc:  # pyarrow raises several types for a bad file
            raise StageError(f"{path}: not a readable Parquet file ({exc})") from None
    # json / jsonl / xlsx: small exports; the row reader, then columns
    rows = read_local(path, params.local, param)
    frame = pd.DataFrame([r.values for r in rows.rows], dtype=object)
    return pa.Table.from_pandas(frame.astype(str).where(frame.notna(), ""), preserve_index=False), \
        [(b.item, b.reason, b.detail) for b in rows.bad]


# --------------------------------------------------------------------------- checking
def _numbers(column: pd.Series) -> pd.Series:
    """Numbers from strings as exports write them ('71,200', ' 5 '); NaN where not a number."""
    if pd.api.types.is_numeric_dtype(column):
        return column.astype("float64")
    text = column.astype(str).str.replace(",", "", regex=False).str.strip()
    return pd.to_numeric(text.where(text != "", None), errors="coerce").astype("float64")


def _dates(column: pd.Series, date_format: str) -> pd.Series:
    if pd.api.types.is_datetime64_any_dtype(column):
        return column.dt.normalize()
    text = column.astype(str).str.strip()
    return pd.to_datetime(text, format=date_format, errors="coerce")


def _frame(table: pa.Table, params: SourceParams, where: str) -> pd.DataFrame:
    missing = sorted({c for c in params.columns.values() if c not in table.column_names})
    if missing:
        raise StageError(f"{where}: columns {missing} not found; the file has "
                         f"{table.column_names}")
    out = pd.DataFrame({f: table[c].to_pandas() for f, c in params.columns.items()})
    for f, value in params.constants.items():
        out[f] = value
    out.index = pd.RangeIndex(len(out))
    return out


def _move_check(df: pd.DataFrame, keep: np.ndarray, spec: Any) -> tuple[np.ndarray, np.ndarray]:
    """Rows beyond the price limit (to reject) and corporate-action rows, each against the
    previous *kept* row of its ticker. A bad print makes two violations (up, then back down):
    of a run of consecutive violations only the first is rejected per pass, then the moves are
    recomputed, so the row after a spike is judged against the row before it. After
    ``MAX_LIMIT_PASSES`` a remaining violation is a level that did not come back: the rows of
    that ticker from it on are rejected (never kept across an unexplained jump)."""
    tickers = df["ticker"].to_numpy()
    close = df["close"].to_numpy()
    shares = df["listed_shares"].to_numpy() if "listed_shares" in df else np.full(len(df), np.nan)
    beyond = np.zeros(len(df), dtype=bool)
    action = np.zeros(len(df), dtype=bool)
    for attempt in range(MAX_LIMIT_PASSES + 1):
        idx = np.flatnonzero(keep & ~beyond)
        action[:] = False
        if len(idx) < 2:
            break
        prev, cur = idx[:-1], idx[1:]
        same = tickers[cur] == tickers[prev]
        move = np.abs(close[cur] / close[prev] - 1.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            share_change = np.abs(shares[cur] / shares[prev] - 1.0)
        changed = same & (np.nan_to_num(share_change, nan=0.0) >= spec.min_share_change)
        action[cur[changed]] = True
        violation = same & (move > spec.max_daily_move + 1e-12) & ~changed
        if not violation.any():
            break
        if attempt < MAX_LIMIT_PASSES:
            beyond[cur[violation & ~np.r_[False, violation[:-1]]]] = True
            continue
        # a level that never came back: everything of that ticker from the first violation on
        for i in cur[violation]:
            if not beyond[i]:
                beyond[i:][(tickers[i:] == tickers[i])] = True
    return beyond, action


class _Marks:
    """The first reject reason of each row (and its detail), filled check by check."""

    def __init__(self, n: int) -> None:
        self.reason = np.full(n, "", dtype=object)
        self.detail = np.full(n, "", dtype=object)

    def ok(self) -> np.ndarray:
        return self.reason == ""

    def mark(self, mask: Any, why: str, describe: Any = None) -> None:
        """Give rows of ``mask`` not rejected yet the reason ``why``; ``describe(i)`` writes
        the detail of row ``i`` (called for those rows only: most rows are fine)."""
        idx = np.flatnonzero(np.asarray(mask, dtype=bool) & self.ok())
        self.reason[idx] = why
        if describe is not None:
            for i in idx:
                self.detail[i] = describe(i)


def _parse_and_check_rows(raw: pd.DataFrame, spec: Any, marks: _Marks) -> pd.DataFrame:
    """Parsed columns (dates, numbers) and the row-level rejects; the portal's halt rows
    (volume 0, open/high/low 0, a close) get the close as open/high/low."""
    df = pd.DataFrame(index=raw.index)   # parsed columns only: no second copy of the text
    mark = marks.mark
    df["date"] = _dates(raw["date"], spec.date_format)
    mark(df["date"].isna(), "bad_date", lambda i: f"date {raw.at[i, 'date']!r}")
    df["ticker"] = raw["ticker"].astype(str).str.strip()
    for f in ("name", "market"):
        if f in raw:
            df[f] = raw[f]
    mark(df["ticker"].isin(["", "nan", "None"]), "missing_ticker")
    for f in NUMERIC:
        df[f] = _numbers(raw[f])
        mark(df[f].isna(), "bad_number", lambda i, f=f: f"{f} {raw.at[i, f]!r}")
    for f in OPTIONAL_NUMERIC:
        if f in raw:
            df[f] = _numbers(raw[f])
    o, h, l, c, v = (df[f].to_numpy() for f in NUMERIC)
    portal_halt = (v == 0) & (o == 0) & (h == 0) & (l == 0) & (c > 0)
    for f in ("open", "high", "low"):
        df.loc[portal_halt, f] = df.loc[portal_halt, "close"]
    o, h, l = (df[f].to_numpy() for f in ("open", "high", "low"))
    with np.errstate(invalid="ignore"):
        mark((o <= 0) | (h <= 0) | (l <= 0) | (c <= 0), "non_positive_price",
             lambda i: f"open {o[i]:g} high {h[i]:g} low {l[i]:g} close {c[i]:g}")
        mark(v < 0, "negative_volume", lambda i: f"volume {v[i]:g}")
        mark(v != np.floor(v), "bad_number", lambda i: f"volume {v[i]:g} is not a whole number")
        mark(h < l, "high_below_low", lambda i: f"high {h[i]:g} < low {l[i]:g}")
        mark((o < l) | (o > h), "open_outside_range", lambda i: f"open {o[i]:g} outside [{l[i]:g}, {h[i]:g}]")
        mark((c < l) | (c > h), "close_outside_range", lambda i: f"close {c[i]:g} outside [{l[i]:g}, {h[i]:g}]")
    return df


def _check_duplicates(df: pd.DataFrame, marks: _Marks) -> None:
    """Among the rows still in: identical copies keep the first, conflicting ones lose all."""
    n = len(df)
    ok_idx = np.flatnonzero(marks.ok())
    keys = df.loc[ok_idx, ["ticker", "date"]]
    dup_any = keys.duplicated(keep=False).to_numpy()
    if not dup_any.any():
        return
    cols = ["ticker", "date", *NUMERIC, *[f for f in OPTIONAL_NUMERIC if f in df]]
    distinct = df.loc[ok_idx[dup_any], cols].drop_duplicates().groupby(["ticker", "date"]).size()
    conflicting = set(distinct[distinct > 1].index)
    bad = [i for i in ok_idx[dup_any] if (df.at[i, "ticker"], df.at[i, "date"]) in conflicting]
    marks.mark(np.isin(np.arange(n), bad), "conflicting_duplicate",
               lambda i: f"{df.at[i, 'ticker']} {df.at[i, 'date'].date()}: the copies differ")
    again = keys.duplicated(keep="first").to_numpy()
    marks.mark(np.isin(np.arange(n), ok_idx[again]), "duplicate_row",
               lambda i: f"{df.at[i, 'ticker']} {df.at[i, 'date'].date()}: an identical earlier row")


def check_prices(table: pa.Table, params: SourceParams, key: str, where: str) -> PriceResult:
    """Raw columns -> the ``prices`` table (sorted by ticker, date) + rejects with reasons."""
    raw = _frame(table, params, where)   # the cells as read: kept for the rejects' raw values
    del table
    marks = _Marks(len(raw))
    df = _parse_and_check_rows(raw, params.prices, marks)
    _check_duplicates(df, marks)
    # the price limit, in (ticker, date) order
    order = np.lexsort((df["date"].to_numpy(), df["ticker"].to_numpy()))
    df = df.iloc[order].reset_index(drop=True)
    reason, detail = marks.reason[order], marks.detail[order]
    beyond, action = _move_check(df, reason == "", params.prices)
    close = df["close"].to_numpy()
    kept = np.flatnonzero((reason == "") & ~beyond)
    for i in np.flatnonzero(beyond):
        before = kept[kept < i]
        p = before[-1] if len(before) else i
        detail[i] = f"close {close[i]:g} after {close[p]:g} ({close[i] / close[p] - 1:+.1%})"
    reason[beyond] = "beyond_price_limit"
    keep = reason == ""
    rejects = []
    for i in np.flatnonzero(~keep):
        source_row = int(order[i])
        values = {params.columns.get(f, f): raw.at[source_row, f] for f in raw.columns}
        rejects.append(reject("collect", key, f"row {source_row + 1}", reason[i], detail[i], values))
    out = df[keep].reset_index(drop=True)
    halted, act = out["volume"].to_numpy() == 0, action[keep]
    flags = np.where(halted & act, "halt;corporate_action",
                     np.where(halted, "halt", np.where(act, "corporate_action", ""))).astype(object)
    counts = {"rows_read": len(raw), "tickers": int(out["ticker"].nunique()),
              "first_date": str(out["date"].min().date()) if len(out) else None,
              "last_date": str(out["date"].max().date()) if len(out) else None,
              "flags": {"halt": int(halted.sum()), "corporate_action": int(act.sum())}}
    return PriceResult(_to_arrow(out, params, flags), rejects, counts)


def _to_arrow(out: pd.DataFrame, params: SourceParams, flags: np.ndarray) -> pa.Table:
    schema = SCHEMAS["prices"]
    n = len(out)

    def text(f: str) -> pa.Array:
        if f in out:
            return pa.array(out[f].astype(str).str.strip().to_numpy(dtype=object), pa.string())
        return pa.array([""] * n, pa.string())

    def optional(f: str, kind: pa.DataType) -> pa.Array:
        if f not in out:
            return pa.nulls(n, kind)
        values = out[f].to_numpy(dtype="float64")
        mask = np.isnan(values)
        return pa.array(np.where(mask, 0, values).astype(kind.to_pandas_dtype()), kind, mask=mask)

    name = text("name") if "name" in out else text("ticker")
    columns = {
        "date": pa.array(out["date"].dt.date.to_numpy(), pa.date32()) if n else pa.array([], pa.date32()),
        "ticker": text("ticker"), "name": name, "market": text("market"),
        "series": pa.array([params.prices.series] * n, pa.string()),
        **{f: pa.array(out[f].to_numpy(dtype="float64"), pa.float64()) for f in ("open", "high", "low", "close")},
        "volume": pa.array(out["volume"].to_numpy(dtype="float64").astype("int64"), pa.int64()),
        "value": optional("value", pa.float64()),
        "listed_shares": optional("listed_shares", pa.int64()),
        "flags": pa.array(flags.astype(object), pa.string()),
    }
    return pa.Table.from_arrays([columns[f] for f in schema.names], schema=schema)


def collect_prices(params: SourceParams, key: str) -> PriceResult:
    """``collect@<key>`` for a price source: read, check, and the malformed lines as rejects."""
    param = f"collect.{key}"
    read = list(read_price_table(params.input, params, param))
    bad = read.pop()
    # handed over, not kept here: check_prices frees the Arrow table once it has the columns
    result = check_prices(read.pop(), params, key, params.input)
    result.rejects = [reject("collect", key, item, why, text) for item, why, text in bad] + result.rejects
    result.counts["rows_read"] += len(bad)
    return result
