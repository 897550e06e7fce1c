"""Price sources (kind: prices): every bad row gets its reason, halts and corporate actions are
flagged, other layouts load through the column map, and collect writes a valid table."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.common.runlog import StageError
from stages.common.schema import SCHEMAS, validate, validate_prices_table
from stages.sources.prices import check_prices, collect_prices
from stages.sources.spec import SourceParams
from tests.conftest import ROOT, run_stage

HEADER = "basDt,srtnCd,isinCd,itmsNm,mrktCtg,clpr,vs,fltRt,mkp,hipr,lopr,trqu,trPrc,lstgStCnt,mrktTotAmt"
PORTAL_COLUMNS = {"date": "basDt", "ticker": "srtnCd", "name": "itmsNm", "market": "mrktCtg",
                  "open": "mkp", "high": "hipr", "low": "lopr", "close": "clpr", "volume": "trqu",
                  "value": "trPrc", "listed_shares": "lstgStCnt"}


def portal(path: Path, **overrides) -> SourceParams:
    data = {"kind": "prices", "loader": "local", "input": str(path), "local": {},
            "prices": {"series": "stock"}, "columns": PORTAL_COLUMNS, "max_reject_rate": 1.0}
    data.update(overrides)
    return SourceParams.model_validate(data)


def row(day: str, code: str, close: float, open_=None, high=None, low=None, volume=1000,
        shares=1_000_000) -> str:
    open_ = close if open_ is None else open_
    high = max(open_, close) if high is None else high
    low = min(open_, close) if low is None else low
    return f"{day},{code},KR7{code}000,종목{code},KOSPI,{close},0,0,{open_},{high},{low},{volume},1,{shares},1"


def collect(tmp_path: Path, lines: list[str], **overrides):
    path = tmp_path / "prices.csv"
    path.write_text("\n".join([HEADER, *lines]) + "\n", encoding="utf-8")
    return collect_prices(portal(path, **overrides), "p")


def reasons(result) -> dict[str, str]:
    return {r["item"]: r["reason"] for r in result.rejects}


def test_every_bad_row_gets_its_reason_and_good_rows_stay(tmp_path):
    lines = [
        row("20240102", "000001", 100),
        row("20240103", "000001", 101),
        row("20240104", "000001", 102, high=99, low=101),          # row 3: high < low
        row("20240105", "000001", 103, low=0),                     # row 4: non-positive
        row("20240108", "000001", 104, open_=110, high=105, low=100),  # row 5: open outside
        row("20240109", "000001", 120, open_=105, high=110, low=100),  # row 6: close outside
        row("2024-01-10", "000001", 104),                          # row 7: unparseable date
        row("20240111", "000001", 104),                            # rows 8-9: identical copies
        row("20240111", "000001", 104),
        row("20240112", "000001", 105),                            # rows 10-11: conflicting
        row("20240112", "000001", 106),
        row("20240115", "000001", 150),                            # row 12: +44%, no share change
        row("20240116", "000001", 106),
        "20240117,000001,x,y,KOSPI,abc,0,0,1,1,1,1,1,1,1",         # row 14: not a number
        row("20240118", "000001", 107, volume=-5),                 # row 15: negative volume
        "20240119,000001,too,few",                                 # a malformed line
    ]
    result = collect(tmp_path, lines)
    got = reasons(result)
    assert got == {"row 3": "high_below_low", "row 4": "non_positive_price",
                   "row 5": "open_outside_range", "row 6": "close_outside_range",
                   "row 7": "bad_date", "row 9": "duplicate_row",
                   "row 10": "conflicting_duplicate", "row 11": "conflicting_duplicate",
                   "row 12": "beyond_price_limit", "row 14": "bad_number",
                   "row 15": "negative_volume", "line 17": "malformed_row"}
    spike = next(r for r in result.rejects if r["reason"] == "beyond_price_limit")
    assert "+44.2%" in spike["detail"] and json.loads(spike["raw"])["clpr"] == "150"
    table = result.table
    validate_prices_table(table)
    assert table["close"].to_pylist() == [100, 101, 104, 106]   # the row after the spike stays
    assert result.counts["rows_read"] == len(lines)
    assert all(r["stage"] == "collect" and r["source"] == "p" for r in result.rejects)


def test_portal_halt_is_normalised_and_flagged_and_a_split_is_a_corporate_action(tmp_path):
    lines = [row("20240102", "000002", 50_000), row("20240103", "000002", 50_500),
             # the portal's halt: volume 0, open/high/low printed as 0
             "20240104,000002,x,종목,KOSPI,50500,0,0,0,0,0,0,0,1000000,1",
             # 1:5 split: shares x5, price /5 (-80%), not a reject
             row("20240105", "000002", 10_100, shares=5_000_000),
             row("20240108", "000002", 10_200, shares=5_000_000)]
    result = collect(tmp_path, lines)
    assert result.rejects == []
    flags = result.table["flags"].to_pylist()
    assert flags == ["", "", "halt", "corporate_action", ""]
    halt = result.table.slice(2, 1).to_pylist()[0]
    assert halt["open"] == halt["high"] == halt["low"] == halt["close"] == 50_500
    assert result.counts["flags"] == {"halt": 1, "corporate_action": 1}


def test_a_lasting_jump_without_a_share_change_is_rejected_not_kept(tmp_path):
    lines = [row(f"202401{d:02d}", "000003", 100) for d in (2, 3)]
    lines += [row(f"202401{d:02d}", "000003", 200) for d in range(4, 20)]
    result = collect(tmp_path, lines)
    assert set(reasons(result).values()) == {"beyond_price_limit"}
    validate_prices_table(result.table)
    closes = result.table["close"].to_pylist()
    assert all(b / a - 1 <= 0.3 for a, b in zip(closes, closes[1:]))


def test_other_layouts_load_through_the_column_map_cp949_and_constants(tmp_path):
    path = tmp_path / "samsung.csv"
    path.write_bytes("날짜,시가,고가,저가,종가,거래량\n2024-01-02,\"78,200\",\"79,800\",\"78,200\",\"79,600\",17142847\n"
                     "2024-01-03,\"78,500\",\"78,800\",\"77,000\",\"77,000\",21753644\n".encode("cp949"))
    params = SourceParams.model_validate({
        "kind": "prices", "loader": "local", "input": str(path), "local": {"encoding": "cp949"},
        "prices": {"series": "stock", "date_format": "%Y-%m-%d"},
        "columns": {"date": "날짜", "open": "시가", "high": "고가", "low": "저가", "close": "종가",
                    "volume": "거래량"},
        "constants": {"ticker": "005930", "name": "삼성전자"}})
    result = collect_prices(params, "samsung")
    rows = result.table.to_pylist()
    assert [r["close"] for r in rows] == [79_600, 77_000] and rows[0]["ticker"] == "005930"
    assert rows[0]["name"] == "삼성전자" and rows[0]["listed_shares"] is None
    with pytest.raises(StageError, match="cp949"):
        collect_prices(params.model_copy(update={"local": params.local.model_copy(update={"encoding": "utf-8"})}), "x")


def test_parquet_input_and_missing_columns(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"basDt": ["20240102", "20240103"], "srtnCd": ["000004"] * 2,
                             "itmsNm": ["a"] * 2, "mrktCtg": ["KOSDAQ"] * 2,
                             "mkp": [10.0, 11.0], "hipr": [12.0, 12.0], "lopr": [9.0, 10.0],
                             "clpr": [11.0, 11.5], "trqu": [5, 6], "trPrc": [1, 1],
                             "lstgStCnt": [100, 100]}), path)
    assert collect_prices(portal(path), "p").table.num_rows == 2
    with pytest.raises(StageError, match=r"columns \[.*'hipr'.*\] not found"):
        check_prices(pa.table({"basDt": ["20240102"]}), portal(path), "p", str(path))


@pytest.mark.parametrize("change, message", [
    ({"prices": None}, "needs one"),
    ({"columns": {**PORTAL_COLUMNS, "colour": "x"}}, "not price fields"),
    ({"columns": {k: v for k, v in PORTAL_COLUMNS.items() if k != "close"}}, r"\['close'\]"),
    ({"prices": {"series": "stock", "max_daily_move": 2}}, "less than or equal"),
])
def test_price_source_params_are_checked(tmp_path, change, message):
    data = {"kind": "prices", "loader": "local", "input": "x.csv", "local": {},
            "prices": {"series": "stock"}, "columns": PORTAL_COLUMNS}
    data.update(change)
    with pytest.raises(ValueError, match=message):
        SourceParams.model_validate(data)


def test_mcq_kind_takes_two_choices_now():
    record = {"id": "1", "source": "s", "domain": "stock", "split": "train", "question": "q",
              "choices": ["상승", "하락"], "answer": 1, "category": "c", "meta": "{}"}
    assert validate("mcq", record) == []
    assert validate("mcq", {**record, "choices": ["상승"], "answer": 0})


def test_collect_stage_on_the_quickstart_sample(tmp_path):
    """The real stage, as dvc.yaml runs it, on the generated sample with its planted rows."""
    params = {"collect": {"prices": {
        "kind": "prices", "loader": "local",
        "input": str(ROOT / "data/samples/raw/prices/stock_prices.csv"), "local": {},
        "prices": {"series": "stock"}, "columns": PORTAL_COLUMNS, "max_reject_rate": 0.01}}}
    (tmp_path / "params.yaml").write_text(json.dumps(params), encoding="utf-8")
    out = tmp_path / "out.parquet"
    result = run_stage("collect", ["prices", "--out", str(out), "--rejects", "rej.parquet",
                                   "--metrics", "m.json", "--log", "l.log"], tmp_path)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["rejects_by_reason"] == {"bad_date": 1, "beyond_price_limit": 1,
                                            "conflicting_duplicate": 2, "high_below_low": 1,
                                            "non_positive_price": 1}
    assert metrics["flags"] == {"corporate_action": 1, "halt": 1} and metrics["tickers"] == 4
    table = pq.read_table(out)
    assert table.schema.equals(SCHEMAS["prices"])
    validate_prices_table(table)
    # a reject rate above the threshold fails the stage and writes no output
    params["collect"]["prices"]["max_reject_rate"] = 0.001
    (tmp_path / "params.yaml").write_text(json.dumps(params), encoding="utf-8")
    out.unlink()
    result = run_stage("collect", ["prices", "--out", str(out), "--rejects", "rej.parquet",
                                   "--metrics", "m.json", "--log", "l.log"], tmp_path)
    assert result.returncode != 0 and "reject" in result.stderr and not out.exists()
