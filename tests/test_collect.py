"""collect@<source>: every source kind, every reject reason, the hub code path on local
replicas, the real KMMLU rows, the CLI's clear errors and its determinism."""
from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from stages.sources.records import RowError, build_records, parse_answer
from stages.sources.spec import SourceParams
from stages.common.runlog import StageError
from stages.common.schema import validate
from stages.sources.hub import load_hub
from stages.sources.local import read_local
from tests.conftest import run_stage

KMMLU_COLUMNS = ["question", "answer", "A", "B", "C", "D", "Category", "Human Accuracy"]
MCQ_COLUMNS = {"question": "question", "choices": ["A", "B", "C", "D"], "answer": "answer",
               "category": "Category"}


def mcq_params(**overrides) -> SourceParams:
    spec = dict(kind="mcq", loader="local", input="x.csv", local={}, domain="financial_market",
                columns=MCQ_COLUMNS, meta_columns=["Human Accuracy"])
    spec.update(overrides)
    return SourceParams.model_validate(spec)


def write_csv(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


# ------------------------------------------------------------------------ answers
@pytest.mark.parametrize("value,fmt,expected", [
    ("1", "index1", 0), (4, "index1", 3), ("3.0", "index1", 2), (2.0, "index1", 1),
    ("0", "index0", 0), ("B", "letter", 1), ("c.", "letter", 2), ("둘", "text", 1),
])
def test_parse_answer_accepts(value, fmt, expected):
    assert parse_answer(value, ["하나", "둘", "셋", "넷"], fmt) == expected


@pytest.mark.parametrize("value,fmt,reason", [
    ("5", "index1", "answer_out_of_range"), ("0", "index1", "answer_out_of_range"),
    ("B", "index1", "answer_not_an_index"), ("2.5", "index1", "answer_not_an_index"),
    ("", "index1", "missing_answer"), ("H", "letter", "answer_out_of_range"),
    ("다섯", "text", "answer_not_a_choice"),
])
def test_parse_answer_rejects_with_reason(value, fmt, reason):
    with pytest.raises(RowError) as info:
        parse_answer(value, ["하나", "둘", "셋", "넷"], fmt)
    assert info.value.reason == reason


# ------------------------------------------------------------------------ bad CSV input
BAD_CSV = (
    "\ufeffquestion,answer,A,B,C,D,Category,Human Accuracy\r\n"
    '"금리가 오르면 채권 가격은?\r\n(일반적인 경우)",2,상승,하락,불변,알 수 없음,Economics,0.5\r\n'
    "환율 상승의 의미는?,1,원화 약세,원화 강세,무관,금리 인하,Economics,0.4\r\n"
    "열이 모자란 행,1,가,나\r\n"
    ",1,가,나,다,라,Economics,0.3\r\n"
    "범위 밖 정답,5,가,나,다,라,Economics,0.3\r\n"
    "문자 정답,B,가,나,다,라,Economics,0.3\r\n"
    "빈 선택지,1,가,,다,라,Economics,0.3\r\n"
    "중복 선택지,1,가,가,다,라,Economics,0.3\r\n"
    "환율 상승의 의미는?,1,원화 약세,원화 강세,무관,금리 인하,Economics,0.4\r\n"
)


def test_bad_rows_are_rejected_with_reasons_and_good_rows_pass(tmp_path):
    path = write_csv(tmp_path / "bad.csv", BAD_CSV)
    params = mcq_params(input=str(path))
    rows = read_local(str(path), params.local, "collect.t")
    records, rejects, counts = build_records(rows, params, "t", str(path))
    reasons = {r["item"]: r["reason"] for r in rejects}
    assert reasons == {
        "line 5": "malformed_row", "line 6": "empty_question", "line 7": "answer_out_of_range",
        "line 8": "answer_not_an_index", "line 9": "empty_choice", "line 10": "duplicate_choices",
        "line 11": "exact_duplicate"}
    assert len(records) == 2 and counts["rows_read"] == 9 and counts["duplicates_removed"] == 1
    first = records[0]
    # BOM gone from the header, CRLF inside the quoted field normalised, 1-based -> 0-based
    assert first["question"] == "금리가 오르면 채권 가격은?\n(일반적인 경우)"
    assert first["answer"] == 1 and first["choices"][1] == "하락"
    assert json.loads(first["meta"])["Human Accuracy"] == "0.5"
    assert all(validate("mcq", r) == [] for r in records)


def test_text_is_nfc_and_ids_are_content_hashes(tmp_path):
    nfd = unicodedata.normalize("NFD", "채권의 만기수익률은?")
    csv_text = "question,answer,A,B,C,D,Category,Human Accuracy\n" \
               f"{nfd},1,가,나,다,라,Economics,0.1\n"
    path = write_csv(tmp_path / "nfd.csv", csv_text)
    params = mcq_params(input=str(path))
    records, _, _ = build_records(read_local(str(path), params.local, "c"), params, "a", "x")
    assert records[0]["question"] == "채권의 만기수익률은?"
    assert unicodedata.is_normalized("NFC", records[0]["question"])
    again, _, _ = build_records(read_local(str(path), params.local, "c"), params, "b", "y")
    assert again[0]["id"] == records[0]["id"]  # same content, same id, whatever the source


def test_duplicate_across_splits_keeps_the_test_copy(tmp_path):
    from stages.sources import RawRow, Rows
    row = {"question": "q", "A": "1", "B": "2", "C": "3", "D": "4", "answer": "1", "Category": "c",
           "Human Accuracy": 0.1}
    rows = Rows(rows=[RawRow("train#0", "train", dict(row)), RawRow("test#0", "test", dict(row))],
                columns=KMMLU_COLUMNS)
    records, rejects, _ = build_records(rows, mcq_params(), "k", "x")
    assert [r["split"] for r in records] == ["test"]
    assert rejects[0]["item"] == "train#0" and rejects[0]["reason"] == "exact_duplicate"


# ------------------------------------------------------------------------ other formats/kinds
def test_cp949_needs_the_right_encoding(tmp_path):
    text = "문제,정답\n원금 100만원의 연 5% 단리 1년 이자는?,5만원\n"
    path = write_csv(tmp_path / "calc.csv", text, encoding="cp949")
    spec = dict(kind="qa", loader="local", input=str(path), columns={"question": "문제", "answer": "정답"})
    with pytest.raises(StageError, match=r"collect\.calc\.local\.encoding='utf-8'.*cp949"):
        read_local(str(path), SourceParams.model_validate({**spec, "local": {}}).local, "collect.calc")
    params = SourceParams.model_validate({**spec, "local": {"encoding": "cp949"}})
    records, _, _ = build_records(read_local(str(path), params.local, "c"), params, "calc", "x")
    assert records[0]["answer"] == "5만원"


def test_json_jsonl_parquet_xlsx(tmp_path):
    (tmp_path / "qa.json").write_text(json.dumps({"data": {"items": [
        {"q": "PER이란?", "a": "주가수익비율"}, "문자열", {"q": "빈 답", "a": ""}, {"q": "키 없음"}]}},
        ensure_ascii=False), encoding="utf-8")
    params = SourceParams.model_validate(dict(
        kind="qa", loader="local", input=str(tmp_path / "qa.json"),
        local={"records_key": "data.items"}, columns={"question": "q", "answer": "a"}))
    records, rejects, _ = build_records(read_local(params.input, params.local, "c"), params, "j", "x")
    assert [r["question"] for r in records] == ["PER이란?"]
    assert sorted(r["reason"] for r in rejects) == ["missing_answer", "missing_field", "not_an_object"]

    (tmp_path / "t.jsonl").write_text(
        '{"table": [["연도", "매출"], ["2023", "10"]], "question": "2023년 매출?", "answer": "10"}\n'
        '{"broken": \n', encoding="utf-8")
    params = SourceParams.model_validate(dict(
        kind="qa", loader="local", input=str(tmp_path / "t.jsonl"), local={},
        columns={"question": "question", "answer": "answer", "context": "table"}))
    records, rejects, _ = build_records(read_local(params.input, params.local, "c"), params, "t", "x")
    assert json.loads(records[0]["context"]) == [["연도", "매출"], ["2023", "10"]]
    assert [(r["item"], r["reason"]) for r in rejects] == [("line 2", "malformed_json")]

    frame = pd.DataFrame({"한국어": ["주가가 올랐다.", None], "중국어": ["股价上涨了。", "空"], "ID": [1, 2]})
    frame.to_excel(tmp_path / "kozh.xlsx", index=False)
    frame.to_parquet(tmp_path / "kozh.parquet")
    for name in ("kozh.xlsx", "kozh.parquet"):
        params = SourceParams.model_validate(dict(
            kind="translation", loader="local", input=str(tmp_path / name), local={},
            columns={"source_text": "한국어", "target_text": "중국어"},
            constants={"source_lang": "ko", "target_lang": "zh"}, meta_columns=["ID"]))
        records, rejects, _ = build_records(read_local(params.input, params.local, "c"), params, "k", "x")
        assert [(r["source_text"], r["target_lang"]) for r in records] == [("주가가 올랐다.", "zh")]
        assert [r["reason"] for r in rejects] == ["empty_text"]


def test_document_kind_renders_listed_columns(tmp_path):
    (tmp_path / "top.json").write_text(json.dumps({"companies": [
        {"name": "가상전자", "sector": "반도체", "major_products": ["메모리", "센서"]}]},
        ensure_ascii=False), encoding="utf-8")
    params = SourceParams.model_validate(dict(
        kind="document", loader="local", input=str(tmp_path / "top.json"),
        local={"records_key": "companies"},
        columns={"title": "name", "text": ["name", "sector", "major_products"]}))
    records, _, _ = build_records(read_local(params.input, params.local, "c"), params, "top", "x")
    assert records[0]["title"] == "가상전자" and records[0]["page"] == 0
    assert records[0]["text"] == "name: 가상전자\nsector: 반도체\nmajor_products: 메모리, 센서"


# ------------------------------------------------------------------------ the hub code path
def make_hub_replica(root: Path, subject: str, splits: dict[str, list[list]]) -> Path:
    """A directory laid out like HAERAE-HUB/KMMLU: README configs + data/<Subject>-<split>.csv."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    files = []
    for split, rows in splits.items():
        rel = f"data/{subject}-{split}.csv"
        pd.DataFrame(rows, columns=KMMLU_COLUMNS).to_csv(root / rel, index=False)
        files.append({"split": split, "path": rel})
    card = {"configs": [{"config_name": subject, "data_files": files}]}
    (root / "README.md").write_text("---\n" + yaml.safe_dump(card) + "---\n", encoding="utf-8")
    return root


def test_hub_loader_keeps_all_splits(tmp_path):
    row = lambda q, a: [q, a, "가", "나", "다", "라", "Economics", 0.5]  # noqa: E731
    repo = make_hub_replica(tmp_path / "KMMLU", "Economics", {
        "train": [row("훈련 문제", 1)], "dev": [row("개발 문제", 2)], "test": [row("평가 문제", 4)]})
    params = mcq_params(loader="hub", local=None, input=str(repo), hub={
        "repo": str(repo), "name": "Economics", "revision": "main",
        "splits": {"train": "train", "dev": "dev", "test": "test"}})
    rows = load_hub(params.hub, "collect.k")
    records, rejects, _ = build_records(rows, params, "k", "hf://x")
    assert [(r["split"], r["answer"]) for r in records] == [("train", 0), ("dev", 1), ("test", 3)]
    assert not rejects
    with pytest.raises(StageError, match="splits"):
        load_hub(params.hub.model_copy(update={"splits": {"validation": "dev"}}), "collect.k")


def test_an_empty_hub_split_is_an_error_naming_source_split_and_revision(tmp_path):
    """KMMLU Accounting train is reportedly only its header at the pinned revision: datasets
    cannot even build such a config; the loader finds the empty split and names it."""
    row = lambda q, a: [q, a, "가", "나", "다", "라", "Accounting", 0.5]  # noqa: E731
    repo = make_hub_replica(tmp_path / "KMMLU", "Accounting", {
        "train": [], "dev": [row("개발 문제", 2)], "test": [row("평가 문제", 4)]})
    assert (repo / "data/Accounting-train.csv").read_text().count("\n") == 1  # header only
    spec = {"repo": str(repo), "name": "Accounting", "revision": "18dff302",
            "splits": {"train": "train", "dev": "dev", "test": "test"}}
    params = mcq_params(loader="hub", local=None, input=str(repo), hub=spec)
    with pytest.raises(StageError) as err:
        load_hub(params.hub, "collect.kmmlu_accounting")
    message = str(err.value)
    assert "collect.kmmlu_accounting" in message and "'train'" in message
    assert "18dff302" in message and "Accounting" in message and "allow_empty" in message
    # the params may say it can be empty: the other splits load, the empty one is recorded
    allowed = mcq_params(loader="hub", local=None, input=str(repo), hub={**spec, "allow_empty": ["train"]})
    rows = load_hub(allowed.hub, "collect.kmmlu_accounting")
    assert rows.info["empty_splits"] == ["train"]
    assert [(r.split, r.values["question"]) for r in rows.rows] == [("dev", "개발 문제"), ("test", "평가 문제")]
    with pytest.raises(ValueError, match="allow_empty"):
        mcq_params(loader="hub", local=None, input=str(repo), hub={**spec, "allow_empty": ["validation"]})


def test_an_edited_local_replica_is_read_afresh(tmp_path, monkeypatch):
    """datasets' Arrow cache keys a local config by a hash that ignores the files' bytes: the
    quickstart once read an emptied split's old rows from it. collect builds it afresh."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    row = lambda q: [q, 1, "가", "나", "다", "라", "Accounting", 0.5]  # noqa: E731
    repo = make_hub_replica(tmp_path / "KMMLU", "Accounting", {"train": [row("첫 문제")]})
    params = mcq_params(loader="hub", local=None, input=str(repo), hub={
        "repo": str(repo), "name": "Accounting", "revision": "r"})
    assert [r.values["question"] for r in load_hub(params.hub, "c").rows] == ["첫 문제"]
    make_hub_replica(repo, "Accounting", {"train": [row("고친 문제"), row("새 문제")]})
    assert [r.values["question"] for r in load_hub(params.hub, "c").rows] == ["고친 문제", "새 문제"]


def test_a_broken_hub_split_is_not_mistaken_for_an_empty_one(tmp_path):
    row = lambda q, a: [q, a, "가", "나", "다", "라", "Accounting", 0.5]  # noqa: E731
    repo = make_hub_replica(tmp_path / "KMMLU", "Accounting", {"train": [], "test": [row("평가", 1)]})
    (repo / "data/Accounting-test.csv").write_bytes(b"question,answer\n\"unterminated,1\n")
    params = mcq_params(loader="hub", local=None, input=str(repo), hub={
        "repo": str(repo), "name": "Accounting", "revision": "r", "allow_empty": ["train"],
        "splits": {"train": "train", "test": "test"}})
    with pytest.raises(StageError, match="'test'"):
        load_hub(params.hub, "collect.k")


def test_real_kmmlu_rows_through_the_hub_path(tmp_path, real_dir):
    kmmlu = real_dir("kmmlu")
    frame = pd.read_csv(kmmlu / "KMMLU-Economics.sample.csv")
    assert list(frame.columns) == KMMLU_COLUMNS
    repo = make_hub_replica(tmp_path / "KMMLU", "Economics", {"train": frame.values.tolist()})
    params = mcq_params(loader="hub", local=None, input=str(repo), hub={
        "repo": str(repo), "name": "Economics", "revision": "main", "splits": {"train": "train"}})
    records, rejects, counts = build_records(load_hub(params.hub, "c"), params, "k", "hf://x")
    # PROVENANCE: 20 rows, 17 unique questions (sampled with replacement)
    assert counts["rows_read"] == 20 and len(records) == 17
    assert {r["reason"] for r in rejects} == {"exact_duplicate"}
    assert all(0 <= r["answer"] <= 3 and len(r["choices"]) == 4 for r in records)
    for record, (_, source_row) in zip(records, frame.drop_duplicates("question").iterrows()):
        assert record["answer"] == int(source_row["answer"]) - 1


# ------------------------------------------------------------------------ the CLI
def cli_args(key: str) -> list[str]:
    return [key, "--out", f"out/{key}.parquet", "--rejects", f"rej/{key}.parquet",
            "--metrics", f"met/{key}.json", "--log", f"log/{key}.log"]


def write_params(tmp_path: Path, sources: dict) -> None:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"collect": sources}, allow_unicode=True),
                                          encoding="utf-8")


def test_cli_writes_outputs_deterministically(tmp_path):
    write_csv(tmp_path / "in.csv", BAD_CSV)
    write_params(tmp_path, {"src": dict(kind="mcq", loader="local", input="in.csv", local={},
                                        columns=MCQ_COLUMNS, max_reject_rate=0.9)})
    first = run_stage("collect", cli_args("src"), tmp_path)
    assert first.returncode == 0, first.stderr
    out = (tmp_path / "out/src.parquet").read_bytes()
    metrics = json.loads((tmp_path / "met/src.json").read_text())
    assert metrics["records"] == 2 and metrics["rejected"] == 6 and metrics["duplicates_removed"] == 1
    assert metrics["rejects_by_reason"]["malformed_row"] == 1
    assert pq.read_table(tmp_path / "rej/src.parquet").num_rows == 7
    assert "reject line 5: malformed_row" in (tmp_path / "log/src.log").read_text()
    second = run_stage("collect", cli_args("src"), tmp_path)
    assert second.returncode == 0 and (tmp_path / "out/src.parquet").read_bytes() == out


def test_cli_fails_cleanly_over_the_reject_threshold(tmp_path):
    write_csv(tmp_path / "in.csv", BAD_CSV)
    write_params(tmp_path, {"src": dict(kind="mcq", loader="local", input="in.csv", local={},
                                        columns=MCQ_COLUMNS, max_reject_rate=0.2)})
    result = run_stage("collect", cli_args("src"), tmp_path)
    assert result.returncode == 2
    assert "6 of 9 records rejected" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out/src.parquet").exists()
    assert (tmp_path / "rej/src.parquet").exists()  # so the user can see why


@pytest.mark.parametrize("case,message", [
    ("missing_path", "collect.src.input: file not found: nope.csv"),
    ("wrong_encoding", "collect.src.local.encoding='utf-8' at byte"),
    ("missing_column", "collect.src.columns.question: column 'question' not in in.csv"),
    ("typo_in_params", "collect.src.colums: unknown key"),
])
def test_cli_whole_input_errors_name_the_param_and_path(tmp_path, case, message):
    write_csv(tmp_path / "in.csv", "질문,정답\n가,나\n", encoding="cp949")
    spec = dict(kind="qa", loader="local", input="in.csv", local={},
                columns={"question": "질문", "answer": "정답"})
    if case == "missing_path":
        spec["input"] = "nope.csv"
    elif case == "wrong_encoding":
        pass
    elif case == "missing_column":
        spec["local"] = {"encoding": "cp949"}
        spec["columns"] = {"question": "question", "answer": "정답"}
    else:
        spec["colums"] = spec.pop("columns")
    write_params(tmp_path, {"src": spec})
    result = run_stage("collect", cli_args("src"), tmp_path)
    assert result.returncode == 2, result.stderr
    assert message.replace("at byte", "") .split("'utf-8'")[0] in result.stderr
    if case == "wrong_encoding":
        assert "at byte" in result.stderr and "cp949" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()  # nothing half-written
