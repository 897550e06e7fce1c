"""company (chunks for company questions), the figure checks of synthesize@company, solve's
verified test split, mix's held-out companies and make check's provenance rule."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from stages import check
from stages.common.companies import CompanyMatcher, core_name
from stages.common.io import write_records
from stages.common.params import load_raw
from stages.common.runlog import StageError
from stages.common.schema import SCHEMAS
from stages.company import CompanyParams, build_chunks, figures_in, table_pieces
from stages.mix import build_mixture
from stages.solve import Outcome, build_outputs, select_candidates
from stages.synthesize import (CandidateError, CompanyMCQ, Slot, SynthesizeParams, check_figures,
                               to_record)
from tests.conftest import ROOT, run_stage
from tests.test_params import write


def profile(name: str, text: str, source: str = "top100_companies") -> dict:
    return {"id": f"p-{name}", "source": source, "doc_id": f"d-{name}", "path": "top100.json",
            "page": 0, "title": name, "text": text, "tables": [], "meta": "{}"}


def page(doc: str, title: str, number: int, text: str, tables=()) -> dict:
    return {"id": f"{doc}-{number}", "source": "financial_reports", "doc_id": doc,
            "path": f"{doc}.pdf", "page": number, "title": title, "text": text,
            "tables": [list(t) for t in tables], "meta": "{}"}


PROFILES = [
    profile("한빛반도체(가상)", "name: 한빛반도체(가상)\nsummary: 전력반도체 기업이다. 2024년 매출이 11% 늘었다.\n"
                         "revenue_krw_bn: 150\noperating_income_krw_bn: 18"),
    profile("푸른바이오(가상)", "name: 푸른바이오(가상)\nrevenue_krw_bn: 70\noperating_income_krw_bn: 8.4"),
    profile("가람식품(가상)", "name: 가람식품(가상)\nsummary: 식품 기업이다.\nrevenue_krw_bn: 1180.5\n"
                        "operating_income_krw_bn: 70.8"),
]
STATEMENT = [["과목", "제15기", "제14기"], ["매출액", "95,400", "90,120"], ["영업이익", "9,870", "8,412"]]


def params(**overrides) -> CompanyParams:
    data = {"inputs": {"profiles": "p.parquet", "reports": "r.parquet"}, "companies": ["마바사상사(주)"],
            "held_out": ["푸른바이오"], "chunk_chars": 400, "min_figures": 2,
            "keywords": {"매출액": 2, "영업이익": 2}, "max_chunks_per_company": 5,
            "budget": {"train": 10, "test": 10}}
    data.update(overrides)
    return CompanyParams.model_validate(data)


# ------------------------------------------------------------------------------ names
def test_company_names_match_on_their_core():
    assert core_name("한빛반도체(가상)") == core_name("한빛 반도체 주식회사") == "한빛반도체"
    assert core_name("㈜마바사상사") == core_name("마바사상사(주)")
    matcher = CompanyMatcher(["한빛반도체(가상)", "한빛(가상)", "마바사상사(주)"])
    counts = matcher.mentions("한빛 반도체의 매출은 … 한빛반도체와 마바사상사 …")
    assert counts == {"한빛반도체(가상)": 2, "마바사상사(주)": 1}   # the longer name wins
    assert matcher.main_company("마바사상사 재무제표", "한빛반도체 한빛반도체") == "마바사상사(주)"
    assert matcher.main_company("", "한빛반도체 한빛반도체 마바사상사") == "한빛반도체(가상)"
    assert matcher.main_company("재무제표", "어느 회사") is None
    with pytest.raises(ValueError, match="too short"):
        CompanyMatcher(["A(주)"])


# ------------------------------------------------------------------------------ chunks
def test_held_out_companies_are_the_test_split_and_reports_find_their_company():
    reports = [page("mabasa", "마바사상사(주) 재무제표", 1, "마바사상사(주)의 손익계산서 (단위: 백만 원)", [STATEMENT]),
               page("mabasa", "마바사상사(주) 재무제표", 2, "주석: 매출은 인도 시점에 인식한다."),
               page("orphan", "어느 보고서", 1, "매출액 1,000 영업이익 200")]
    records, rejects, metrics = build_chunks(PROFILES, reports, params())
    by_company = {json.loads(r["meta"])["company"]: r for r in records}
    assert json.loads(by_company["푸른바이오(가상)"]["meta"])["split"] == "test"
    assert {json.loads(r["meta"])["split"] for c, r in by_company.items() if c != "푸른바이오(가상)"} == {"train"}
    report = by_company["마바사상사(주)"]
    assert report["text"].startswith("[회사] 마바사상사(주) · [문서] 마바사상사(주) 재무제표")
    assert "매출액 | 95,400 | 90,120" in report["text"]
    assert [(r["item"], r["reason"]) for r in rejects] == [("orphan", "no_company")]  # never guessed
    assert metrics["companies"] == {"train": 3, "test": 1} and metrics["no_company"] == 1
    # DVC refuses a metrics file it takes for binary (mostly non-ASCII first bytes): numbers only
    text = json.dumps(metrics, ensure_ascii=False)
    assert sum(ord(c) > 127 for c in text) == 0, text


def test_held_out_names_must_be_companies_with_documents():
    with pytest.raises(StageError, match=r"\['삼성전자'\] are not companies"):
        build_chunks(PROFILES, [], params(held_out=["삼성전자"]))
    with pytest.raises(StageError, match=r"no document is about \['마바사상사\(주\)'\]"):
        build_chunks(PROFILES, [], params(held_out=["마바사상사(주)"]))
    with pytest.raises(ValueError, match="twice"):
        params(held_out=["푸른바이오", "푸른바이오(가상)"])


def test_chunks_need_figures_and_the_budget_goes_round_the_companies():
    assert figures_in("2024년 12월 31일 제15기 제3조") == 0          # dates, periods, articles
    assert figures_in("매출액 95,400 영업이익률 12.5% 2배") == 3
    long = page("mabasa", "마바사상사(주) 보고서", 1, "\n".join(
        f"{i}번째 사업부의 매출액은 {1000 + i:,}백만 원, 영업이익은 {100 + i}백만 원이다." for i in range(40)))
    plain = page("mabasa", "마바사상사(주) 보고서", 2, "회사는 고객 중심 경영을 한다.\n" * 5)
    records, _, metrics = build_chunks(PROFILES, [long, plain], params(budget={"train": 4, "test": 0}))
    assert metrics["chunks_without_figures"] >= 1
    assert metrics["chunks"] == {"train": 4, "test": 0} and metrics["over_budget"]["test"] == 1
    companies = [json.loads(r["meta"])["company"] for r in records]
    # one chunk for each of the three training companies before a second for any
    assert sorted(set(companies)) == ["가람식품(가상)", "마바사상사(주)", "한빛반도체(가상)"]
    assert all(len(r["text"]) <= 400 for r in records)


def test_a_long_table_is_cut_between_rows_with_its_header_repeated():
    table = [["과목", "금액"]] + [[f"항목{i}", f"{i * 1000:,}"] for i in range(60)]
    parts = table_pieces(table, 120)
    assert len(parts) > 3 and all(p.startswith("과목 | 금액\n") and len(p) <= 120 for p in parts)
    assert sum(p.count("\n") for p in parts) == 60


def test_the_stage_writes_chunks_rejects_and_metrics(tmp_path):
    write_records(PROFILES, SCHEMAS["document"], tmp_path / "p.parquet")
    write_records([page("x", "누구 보고서", 1, "매출액 1,000 영업이익 200")], SCHEMAS["document"],
                  tmp_path / "r.parquet")
    (tmp_path / "params.yaml").write_text(json.dumps({"company": params().model_dump()},
                                                     ensure_ascii=False), encoding="utf-8")
    args = ["--out", "chunks.parquet", "--rejects", "rej.parquet", "--metrics", "m.json", "--log", "c.log"]
    done = run_stage("company", args, tmp_path)
    assert done.returncode == 0, done.stderr
    assert pq.read_table(tmp_path / "chunks.parquet").num_rows == 3
    assert pq.read_table(tmp_path / "rej.parquet").column("reason").to_pylist() == ["no_company"]
    assert json.loads((tmp_path / "m.json").read_text())["chunks"] == {"train": 2, "test": 1}


# ------------------------------------------------------------------------------ figures
CHUNK = "[회사] 마바사상사(주)\n과목 | 제15기 | 제14기\n매출액 | 95,400 | 90,120\n영업이익 | 9,870 | 8,412"
QUESTION = "마바사상사(주)의 매출액은 제14기 90,120백만 원, 제15기 95,400백만 원이다. 제15기 매출액 증가율은?"


def company_mcq(choices, answer="A", calc=None, quote="매출액 | 95,400 | 90,120", question=QUESTION) -> CompanyMCQ:
    return CompanyMCQ(question=question, choices=choices, answer=answer, explanation="…",
                      supporting_quote=quote, calculation=calc)


GROWTH = {"kind": "growth", "numerator": {"name": "제15기 매출액", "value": "95,400"},
          "denominator": {"name": "제14기 매출액", "value": "90,120"}, "unit": "%"}


def test_a_ratio_in_the_key_is_recomputed_from_the_quoted_figures():
    good = company_mcq(["5.9% 증가", "5.9% 감소", "6.2% 증가", "24.6% 증가"], calc=GROWTH)
    meta = check_figures(good, QUESTION, good.choices, 0, CHUNK)
    assert meta["calculation"]["computed"] == pytest.approx(5.8589, abs=1e-3)
    cases = {
        "ratio_mismatch": (["6.2% 증가", "5.9% 증가", "5.5% 증가", "4.0% 증가"], GROWTH, QUESTION),
        "ratio_ambiguous": (["5.9% 증가", "5.86%", "6.2% 증가", "4.0% 증가"], GROWTH, QUESTION),
        "figure_not_in_chunk": (["5.9% 증가", "6.2% 증가", "5.5% 증가", "4.0% 증가"],
                                {**GROWTH, "denominator": {"name": "제14기", "value": "90,000"}}, QUESTION),
        "figure_not_in_question": (["5.9% 증가", "6.2% 증가", "5.5% 증가", "4.0% 증가"], GROWTH,
                                   "마바사상사(주)의 제15기 매출액 증가율은?"),
        "key_figure_not_in_chunk": (["매출액은 954억 원이다.", "9,870", "8,412", "90,120"], None, QUESTION),
    }
    for reason, (choices, calc, question) in cases.items():
        parsed = company_mcq(choices, calc=calc, question=question)
        with pytest.raises(CandidateError) as caught:
            check_figures(parsed, question, choices, 0, CHUNK)
        assert caught.value.reason == reason, (reason, caught.value)
    words = company_mcq(["영업이익 9,870백만 원", "매출원가", "8,412", "부채"])   # figures of the chunk
    assert check_figures(words, QUESTION, words.choices, 0, CHUNK) == {}


def synth_params(**overrides) -> SynthesizeParams:
    data = {"domain_description": "기업", "grounded": True, "figures": True,
            "inputs": {"filtered": "c.parquet", "transformed": "c.parquet"}, "fewshot": "f.yaml",
            "target": 1, "topics": ["t"], "choice_counts": [4],
            "llm": {"model": "m", "temperature": 0, "max_tokens": 100,
                    "prices": {"input_per_1m": 1, "output_per_1m": 1}}}
    data.update(overrides)
    return SynthesizeParams.model_validate(data)


def test_a_held_out_chunk_makes_a_test_question_and_figures_need_grounding():
    chunk = {"id": "c1", "doc_id": "d", "page": 1, "text": CHUNK,
             "meta": json.dumps({"company": "마바사상사(주)", "split": "test"})}
    parsed = company_mcq(["5.9% 증가", "5.9% 감소", "6.2% 증가", "24.6% 증가"], calc=GROWTH)
    record = to_record(parsed, Slot(0, "성장성", 4, chunk), "company", 0, 10)
    meta = json.loads(record["meta"])
    assert record["split"] == "test" and meta["company"] == "마바사상사(주)"
    assert meta["calculation"]["kind"] == "growth"
    assert record["choices"][record["answer"]] == "5.9% 증가"
    with pytest.raises(ValueError, match="figures: true needs grounded: true"):
        synth_params(grounded=False)


# ------------------------------------------------------------------------------ solve
def mcq(n: int, split: str) -> dict:
    return {"id": f"q{n}", "source": "synthesize_company", "domain": "company", "split": split,
            "question": f"질문 {n}", "choices": ["가", "나", "다", "라"], "answer": 0,
            "category": "t", "meta": "{}"}


def test_solve_verifies_a_test_split_but_never_pairs_it():
    train, test = mcq(1, "train"), mcq(2, "test")
    candidates, rejects, _ = select_candidates([[train, test]], "company")
    assert candidates == [train] and [r["reason"] for r in rejects] == ["test_split"]
    assert select_candidates([[train, test]], "company", split="test")[0] == [test]
    outcomes = [Outcome(train, solution="풀이", sample_index=0, draws=1),
                Outcome(test, solution="풀이", sample_index=0, draws=1)]
    questions, pairs, _ = build_outputs(outcomes, "company")
    assert [q["split"] for q in questions] == ["train", "test"]
    assert {p["meta"] and json.loads(p["meta"])["question_id"] for p in pairs} == {"q1"}


# ------------------------------------------------------------------------------ mix
def test_mix_leaves_out_every_record_naming_a_held_out_company(tmp_path):
    from stages.base_model import build_tokenizer
    from tests.test_mix import CORPUS, document, eval_index, qa, recipe, run_build
    tokenizer = build_tokenizer(CORPUS, 700)
    docs = [document("top100_companies", "푸른바이오(가상)", "푸른바이오는 바이오 기업이다. " * 3),
            document("top100_companies", "한빛반도체(가상)", "한빛반도체는 반도체 기업이다. " * 3),
            document("top100_companies", "기타", "보고서: 푸른 바이오 주식회사의 실적 요약 " * 3)]
    pairs = [qa("generated_company", "푸른바이오의 영업이익률은?", "12.0%"),
             qa("generated_company", "한빛반도체의 영업이익률은?", "12.0%")]
    data = {"top100_companies": ("document", docs), "generated_company": ("qa", pairs)}
    r = recipe({"top100_companies": {"format": "document_profile"},
                "generated_company": {"format": "prompt_answer"}})

    def open_source(name):
        kind, records = data[name]
        return kind, iter([records])
    result = build_mixture("v7", r, tokenizer, eval_index(), open_source, tmp_path / "o.parquet",
                           tmp_path / "r.parquet", held_out=CompanyMatcher(["푸른바이오(가상)"]))
    assert result["sources"]["top100_companies"]["held_out_company_records"] == 2
    assert result["sources"]["top100_companies"]["examples"] == 1
    assert result["sources"]["generated_company"]["held_out_company_records"] == 1   # a question too
    without = run_build(tmp_path, "v6", r, data, tokenizer)[0]   # no held-out list: all kept
    assert without["sources"]["top100_companies"]["examples"] == 3
    assert "held_out_company_records" not in without["sources"]["top100_companies"]


# ------------------------------------------------------------------------------ check
def test_make_check_follows_provenance_to_an_excluded_source(tmp_path):
    raw = load_raw(ROOT / "params.yaml")
    assert check.provenance_problems(raw, {}) == []
    assert check.check(ROOT / "params.yaml") == []
    raw["company"]["inputs"]["reports"] = "data/collected/krx_reports.parquet"
    problems = check.check(write(tmp_path, raw))
    assert any(p.startswith("versions.v7.mix: source 'generated_company' derives from excluded "
                            "'krx_reports' (by provenance: solve.company.inputs") for p in problems), problems
    assert not any(p.startswith("versions.v6.") for p in problems)   # v6 does not take it
