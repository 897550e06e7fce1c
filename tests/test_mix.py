"""mix@<version>: formats, token counts, exact counts per recipe, dedup, decontamination,
v6's exclusions, determinism, the manifest, and dvc staleness per version (real dvc CLI)."""
from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from dvc.repo import Repo

from stages.base_model import build_tokenizer
from stages.common.io import write_records
from stages import check
from stages.common.params import ParamsError, load_raw
from stages.common.prompts import step1_prompt, step2_prompt
from stages.common.runlog import StageError
from stages.common.schema import SCHEMAS, validate
from stages.common.text import content_id
from stages.mix import build_mixture, count_tokens, dev_groups, selection, truncate_completion
from stages.mix import load_params as load_mix
from stages.mix import main as mix_main
from stages.mixing.formats import (Budget, FormatError, format_report_json, format_raw_text,
                                   load_templates, markdown_table, FORMATTERS)
from stages.mixing.recipe import MixParams, mix_source_input
from stages.mixing.hashing import (EvalIndex, minhash_signatures, near_duplicates,
                                   unspaced)
from stages.sources.evalsets import EvalItem
from tests.conftest import ROOT, run_stage

DVC = str(Path(sys.executable).parent / "dvc")
CORPUS = [
    "다음 문제를 읽고 정답으로 가장 알맞은 것을 고르시요.\n### 질문: 유가증권시장의 가격제한폭은?\n### 선택지:\nA. 15%\nB. 30%",
    "재무상태표는 자산, 부채, 자본으로 구성된다. 유동비율은 유동자산을 유동부채로 나눈 값이다.",
    "The balance sheet lists assets, liabilities and equity. 1234 + 5678 = 6912",
    "다음 영어 문장을 한국어로 번역하시오. 다음 표를 보고 질문에 답하시오. 풀이: 정답:",
    "资产负债表 财务报告 会计 | --- | 매출액 | 영업이익 | 2024년 |",
] * 20


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(CORPUS, 700)


@pytest.fixture(scope="module")
def tokenizer_dir(tokenizer, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "base"
    tokenizer.save_pretrained(path)
    (path / "base.json").write_text(json.dumps({"model": "tiny-test", "revision": "local",
                                                "built": True}), encoding="utf-8")
    return path


def qa(source: str, question: str, answer: str, context: str = "", category: str = "",
       split: str = "train", meta: dict | None = None) -> dict:
    return {"id": content_id("qa", question, answer, context), "source": source, "domain": "",
            "split": split, "question": question, "answer": answer, "context": context,
            "category": category, "meta": json.dumps(meta or {})}


def mcq(source: str, question: str, choices: list[str], answer: int, split: str) -> dict:
    return {"id": content_id("mcq", question, choices, answer), "source": source,
            "domain": "financial_market", "split": split, "question": question,
            "choices": choices, "answer": answer, "category": "Economics", "meta": "{}"}


def translation(source: str, src: str, tgt: str, langs=("en", "ko")) -> dict:
    return {"id": content_id("translation", *langs, src, tgt), "source": source, "split": "train",
            "source_lang": langs[0], "target_lang": langs[1], "source_text": src,
            "target_text": tgt, "meta": "{}"}


def document(source: str, title: str, text: str, page: int = 0, doc_id: str = "") -> dict:
    doc_id = doc_id or content_id("document", title, text)
    return {"id": content_id(doc_id, page), "source": source, "doc_id": doc_id, "path": "x.pdf",
            "page": page, "title": title, "text": text, "tables": [], "meta": "{}"}


def recipe(sources: dict, **overrides) -> MixParams:
    data = {"seed": 1, "sources": sources, "dev_size": 0.0, "max_length": 512, "overlength": "truncate", "batch_size": 7,
            "max_reject_rate": 0.5,
            "dedup": {"near_threshold": 0.8, "shingle_chars": 5, "num_perm": 64, "bands": 16},
            "decontamination": {"ngram_chars": 13, "threshold": 0.5}}
    data.update(overrides)
    return MixParams.model_validate(data)


EVAL_QUESTION = "국채 수익률 곡선이 역전되었을 때 시장이 예상하는 것으로 흔히 해석되는 것은?"
EVAL_CHOICES = ["향후 경기 둔화와 정책금리 인하", "급격한 인플레이션 가속", "중앙은행의 연속적인 금리 인상",
                "기업 이익의 빠른 증가"]


def eval_index(threshold: float = 0.5) -> EvalIndex:
    return EvalIndex([EvalItem("kmmlu_economics", "evalitem1", EVAL_QUESTION, tuple(EVAL_CHOICES), 0)],
                     13, threshold)


def run_build(tmp_path: Path, version: str, r: MixParams, data: dict[str, tuple[str, list]],
              tokenizer, index: EvalIndex | None = None):
    def open_source(name):
        kind, records = data[name]
        return kind, iter([records[i:i + r.batch_size] for i in range(0, len(records), r.batch_size)])
    out, rej = tmp_path / f"{version}.parquet", tmp_path / f"{version}.rejects.parquet"
    result = build_mixture(version, r, tokenizer, index or eval_index(), open_source, out, rej)
    return result, pq.read_table(out).to_pylist(), pq.read_table(rej).to_pylist()


# ------------------------------------------------------------------------------ formats
def test_formats_write_trl_prompt_completion_messages(tokenizer):
    t, b = load_templates(), Budget(tokenizer, 512)
    [ex] = FORMATTERS["prompt_answer"](qa("krx_sample", "질문?", "답."), t, b)
    assert ex["prompt"] == [{"role": "user", "content": "질문?"}]
    assert ex["completion"] == [{"role": "assistant", "content": "답."}]
    pair = translation("enko", "Stocks fell.", "주가가 하락했다.")
    forward, backward = FORMATTERS["translation"](pair, t, b)
    assert "영어 문장을 한국어로" in forward["prompt"][0]["content"]
    assert forward["completion"][0]["content"] == "주가가 하락했다."
    assert "한국어 문장을 영어로" in backward["prompt"][0]["content"]
    assert backward["completion"][0]["content"] == "Stocks fell."
    assert forward["group"] == backward["group"]
    table = json.dumps([["항목", "2024년"], ["매출액", "1|500"]], ensure_ascii=False)
    [ex] = FORMATTERS["table_qa"](qa("table_qa", "매출액은?", "1,500", context=table), t, b)
    assert "| 항목 | 2024년 |\n| --- | --- |\n| 매출액 | 1\\|500 |" in ex["prompt"][0]["content"]
    with pytest.raises(FormatError, match="bad_table"):
        FORMATTERS["table_qa"](qa("table_qa", "q", "a", context="not json"), t, b)
    [ex] = FORMATTERS["worked_solution"](qa("calc", "이자는?", "240원", context="2000*0.04*3"), t, b)
    assert ex["completion"][0]["content"] == "풀이: 2000*0.04*3\n정답: 240원"
    [ex] = FORMATTERS["qa_json"](qa("qa_rules", "듀레이션?", "가중평균 만기", "참고문", "financial_market"), t, b)
    assert json.loads(ex["prompt"][0]["content"].split("\n\n", 1)[1]) == {
        "질문": "듀레이션?", "분야": "financial_market", "참고": "참고문"}
    assert json.loads(ex["completion"][0]["content"]) == {"답변": "가중평균 만기"}
    record = mcq("kmmlu", "질문?", ["가", "나", "다", "라"], 2, "train")
    [ex] = FORMATTERS["mcq_letter"](record, t, b)
    assert ex["prompt"][0]["content"] == step1_prompt("질문?", ["가", "나", "다", "라"])
    assert ex["completion"][0]["content"] == "C"
    summary = document("report_summaries", "가나전자(주)", json.dumps({"요약": "매출 증가"}, ensure_ascii=False))
    [ex] = FORMATTERS["summary_json"](summary, t, b)
    assert "가나전자(주)" in ex["prompt"][0]["content"]
    assert json.loads(ex["completion"][0]["content"]) == {"요약": "매출 증가"}
    assert markdown_table([["a"], ["b", "c"]]) == "| a |  |\n| --- | --- |\n| b | c |"


def test_token_counts_are_what_apply_chat_template_gives(tokenizer):
    conversations = [[{"role": "user", "content": "다음 표를 보고 질문에 답하시오. 매출액?"},
                      {"role": "assistant", "content": "1,500억 원"}],
                     [{"role": "user", "content": "Stocks fell."},
                      {"role": "assistant", "content": "주가가 하락했다."}]]
    expected = []
    for conversation in conversations:
        ids = tokenizer.apply_chat_template(conversation, tokenize=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        expected.append(len(ids))
    assert count_tokens(tokenizer, conversations) == expected


def test_raw_text_chunks_fit_max_length_and_keep_the_text(tokenizer):
    text = "\n".join(f"{i}번째 줄: 재무상태표는 자산, 부채, 자본으로 구성된다. 유동비율은 유동자산을 유동부채로 나눈 값이다."
                     for i in range(60))
    page = document("financial_reports", "마바사상사 재무제표", text, page=3)
    examples = format_raw_text(page, load_templates(), Budget(tokenizer, 300))
    assert len(examples) > 3
    lengths = count_tokens(tokenizer, [e["prompt"] + e["completion"] for e in examples])
    assert max(lengths) <= 300
    assert all("「마바사상사 재무제표」 문서 3쪽" in e["prompt"][0]["content"] for e in examples)
    rebuilt = "".join(e["prompt"][0]["content"].split("\n\n", 1)[1] + e["completion"][0]["content"]
                      if "\n\n" in e["prompt"][0]["content"] else e["completion"][0]["content"]
                      for e in examples)
    assert unspaced(rebuilt) == unspaced(text)


def test_report_json_parts_fit_and_hold_every_page_in_order(tokenizer):
    pages = [{"page": p, "text": f"{p}쪽 본문. " + "영업이익은 96억 원으로 개선되었다. " * (5 if p != 3 else 80),
              "tables": [[["구분", "2024년"], ["매출액", "1,284억"]]] if p == 2 else []}
             for p in range(1, 6)]
    doc = {"doc_id": "abc", "title": "가나전자(주) 기업분석 보고서", "pages": pages, "path": "a.pdf"}
    examples = format_report_json(doc, load_templates(), Budget(tokenizer, 400))
    lengths = count_tokens(tokenizer, [e["prompt"] + e["completion"] for e in examples])
    assert len(examples) > 2 and max(lengths) <= 400
    parts = [json.loads(e["completion"][0]["content"]) for e in examples]
    assert all(p["doc_id"] == "abc" and p["title"] == doc["title"] for p in parts)
    seen = [entry["page"] for p in parts for entry in p["pages"]]
    assert seen == sorted(seen) and set(seen) == {1, 2, 3, 4, 5}
    assert f"(1/{len(examples)})" in examples[0]["prompt"][0]["content"]


def test_overlength_is_truncated_to_fit_or_dropped(tokenizer, tmp_path):
    long_answer = "자산은 부채와 자본의 합이다. " * 200
    prompt = [{"role": "user", "content": "재무상태표의 등식은?"}]
    completion, n = truncate_completion(tokenizer, prompt, [{"role": "assistant", "content": long_answer}], 128)
    assert n <= 128 and count_tokens(tokenizer, [prompt + completion])[0] == n
    assert long_answer.startswith(completion[0]["content"])
    data = {"krx_sample": ("qa", [qa("krx_sample", "재무상태표의 등식은?", long_answer),
                                  qa("krx_sample", "짧은 질문?", "짧은 답.")])}
    src = {"krx_sample": {"format": "prompt_answer", "fraction": 1.0, "upsample": False}}
    result, rows, _ = run_build(tmp_path, "t", recipe(src, max_length=128), data, tokenizer)
    assert result["sources"]["krx_sample"]["overlength_truncated"] == 1 and len(rows) == 2
    result, rows, rejects = run_build(tmp_path, "d", recipe(src, max_length=128, overlength="drop"),
                                      data, tokenizer)
    assert len(rows) == 1 and [r["reason"] for r in rejects] == ["overlength"]
    assert result["totals"]["over_max_length"] == 1


# ------------------------------------------------------------------------------ selection
def test_selection_is_exact_and_upsamples_only_when_allowed():
    keys = np.arange(10, dtype=np.uint64)
    assert selection(10, keys, 4, None, False, "w").sum() == 4
    assert selection(10, keys, None, 0.25, False, "w").sum() == 2  # round(2.5) = 2 (banker's)
    copies = selection(10, keys, 23, None, True, "w")
    assert copies.sum() == 23 and set(copies.tolist()) == {2, 3}
    with pytest.raises(StageError, match="23 examples wanted but only 10 available"):
        selection(10, keys, 23, None, False, "mix.v1.sources.x")
    groups = np.array([1, 1, 2, 2, 3, 4, 5, 6, 7, 8], dtype=np.uint64)
    dev = dev_groups(groups, 0.25, seed=3)
    assert dev[0] == dev[1] and dev[2] == dev[3] and len(set(groups[dev].tolist())) == 2


def words(seed: int, n: int) -> str:
    """``n`` random Hangul words: fixture texts that are no near-duplicates of each other."""
    rng = np.random.default_rng(seed)
    return " ".join("".join(chr(0xAC00 + int(c)) for c in rng.integers(0, 11172, size=3))
                    for _ in range(n))


def _mixed_sources():
    krx = [qa("krx_sample", f"{words(i, 6)}에 대해 설명하시오.", f"{words(100 + i, 8)}이다.")
           for i in range(12)]
    rules = [qa("qa_rules", f"{words(200 + 10 * k + i, 6)}의 취지는?", f"{words(300 + 10 * k + i, 8)}.",
                category=field)
             for k, field in enumerate(("financial_market", "accounting", "rules")) for i in range(4)]
    pairs = []
    for i in range(5):
        question, choices = f"{words(400 + i, 6)} 옳은 설명은?", ["가", "나", "다", "라"]
        solution = f"{words(500 + i, 10)}. 정답은 B이다."
        meta = {"question_id": f"q{i}"}
        pairs.append(qa("generated_financial_market", step1_prompt(question, choices), solution,
                        category="step1", meta=meta))
        pairs.append(qa("generated_financial_market", step2_prompt(question, choices, solution), "B",
                        category="step2", meta=meta))
    enko = [translation("enko_translation", f"Sentence {i}: " + " ".join(
        ["stocks", "bonds", "rallied", "fell", "market", "yield", "rates", "fund"][(i + k) % 8]
        for k in range(i + 3)), f"{words(600 + i, 6)}.") for i in range(6)]
    return {"krx_sample": ("qa", krx), "qa_rules": ("qa", rules),
            "generated_financial_market": ("qa", pairs), "enko_translation": ("translation", enko)}


def test_exact_per_source_counts_of_a_recipe(tokenizer, tmp_path):
    src = {"krx_sample": {"format": "prompt_answer", "count": 5, "upsample": False},
           "qa_rules": {"format": "qa_json", "fraction": 1.0, "upsample": False,
                        "include": {"category": ["financial_market", "accounting"]}},
           "generated_financial_market": {"format": "prompt_answer", "count": 25, "upsample": True},
           "enko_translation": {"format": "translation", "fraction": 0.5, "upsample": False}}
    result, rows, _ = run_build(tmp_path, "vt", recipe(src, dev_size=0.2), _mixed_sources(), tokenizer)
    by_source = {name: sum(r["source"] == name for r in rows) for name in src}
    assert by_source == {"krx_sample": 5, "qa_rules": 8, "generated_financial_market": 25,
                         "enko_translation": 6}
    assert {n: s["examples"] for n, s in result["sources"].items()} == by_source
    assert result["sources"]["qa_rules"]["filtered_out"] == 4
    assert result["sources"]["generated_financial_market"]["upsampled_copies"] == 15
    assert len({r["id"] for r in rows}) == len(rows)  # copies get ~n ids
    for r in rows:
        assert validate("example", r) == [] and r["version"] == "vt"
    # both directions of a translation pair, both steps of a question: one split
    split_of = {}
    for r in rows:
        key = r["id"].split("~")[0]
        split_of.setdefault(r["source"], []).append((key, r["split"]))
    assert {r["split"] for r in rows} == {"train", "dev"}
    assert result["totals"]["tokens"] == sum(s["tokens"] for s in result["sources"].values()) > 0
    with pytest.raises(StageError, match="krx_sample: 50 examples wanted but only 12"):
        run_build(tmp_path, "vx", recipe({"krx_sample": {"format": "prompt_answer", "count": 50,
                                                          "upsample": False}}),
                  _mixed_sources(), tokenizer)


def test_a_format_for_another_kind_is_an_error(tokenizer, tmp_path):
    with pytest.raises(StageError, match="formats qa records, but enko_translation holds translation"):
        run_build(tmp_path, "vk", recipe({"enko_translation": {"format": "prompt_answer",
                                                               "fraction": 1.0, "upsample": False}}),
                  _mixed_sources(), tokenizer)
    with pytest.raises(StageError, match="include/exclude name fields \\['categry'\\]"):
        run_build(tmp_path, "vk", recipe({"qa_rules": {"format": "prompt_answer", "fraction": 1.0,
                                                       "upsample": False,
                                                       "include": {"categry": ["rules"]}}}),
                  _mixed_sources(), tokenizer)


# ------------------------------------------------------------------------------ dedup / decontamination
def test_planted_eval_item_is_removed_with_its_eval_id(tokenizer, tmp_path):
    data = _mixed_sources()
    # the test question, spacing changed, embedded in an MCQ prompt: contaminated
    leaked = step1_prompt(EVAL_QUESTION.replace(" ", "  ").replace("곡선이 역전", "곡선이역전"), EVAL_CHOICES)
    data["krx_sample"][1].append(qa("krx_sample", leaked, "A. 향후 경기 둔화와 정책금리 인하"))
    # shares only a few words with the eval item: not contaminated
    data["krx_sample"][1].append(qa("krx_sample", "국채 수익률 곡선의 의미를 설명하시오.", "금리의 기간구조이다."))
    src = {"krx_sample": {"format": "prompt_answer", "fraction": 1.0, "upsample": False}}
    result, rows, rejects = run_build(tmp_path, "ve", recipe(src), data, tokenizer)
    [hit] = [r for r in rejects if r["reason"] == "eval_contamination"]
    assert "eval_id=kmmlu_economics/evalitem1" in hit["detail"]
    assert len(rows) == 13 and result["sources"]["krx_sample"]["eval_contamination"] == 1
    # independent check: no example holds the eval question (spacing ignored)
    assert not any(unspaced(EVAL_QUESTION) in unspaced(json.dumps(r, ensure_ascii=False)) for r in rows)


def test_planted_near_duplicate_is_removed_across_sources(tokenizer, tmp_path):
    data = _mixed_sources()
    original = data["krx_sample"][1][3]
    near = qa("qa_rules", original["question"].replace("설명하시오", "설명 하시오"),
              original["answer"] + " 참고.", category="rules")  # spacing + 3 characters
    data["qa_rules"][1].append(near)
    data["qa_rules"][1].append(qa("qa_rules", original["question"], original["answer"], category="rules"))
    src = {"krx_sample": {"format": "prompt_answer", "fraction": 1.0, "upsample": False},
           "qa_rules": {"format": "prompt_answer", "fraction": 1.0, "upsample": False},
           "generated_financial_market": {"format": "prompt_answer", "fraction": 1.0, "upsample": False}}
    result, rows, rejects = run_build(tmp_path, "vn", recipe(src), data, tokenizer)
    reasons = {r["reason"] for r in rejects}
    assert reasons == {"near_duplicate", "exact_duplicate"}
    kept_id = content_id("example", [["user", original["question"]], ["assistant", original["answer"]]])
    assert all(kept_id in r["detail"] for r in rejects)
    assert sum(r["source"] == "krx_sample" for r in rows) == 12  # the earlier copy is kept
    assert sum(r["source"] == "qa_rules" for r in rows) == 12
    # step 1 and step 2 of one question are near-identical texts but one group: both kept
    assert sum(r["source"] == "generated_financial_market" for r in rows) == 10


def test_template_wording_of_a_generated_set_is_no_evidence_of_contamination():
    """Stock questions share their wording and differ in their figures: a training question on
    other days is not contaminated (and does not hit every item through the template), a copy
    of a test question is."""
    def question(k: int) -> str:
        closes = ", ".join(f"{10_000 + 37 * k + 13 * d:,}원" for d in range(5))
        return (f"다음은 한빛전자(1000{k:02d}) 주식의 최근 5거래일 일별 시세와 2024-03-{k % 28 + 1:02d} 기준 "
                f"기술적 지표이다. 종가: {closes}. RSI {30 + k % 40}. 지표 설명: 이동평균선은 일정 기간 "
                "종가의 평균으로 추세를 보여 주고, 볼린저 밴드는 이동평균에서 표준편차의 두 배만큼 "
                "떨어진 상하한선이며, 상대강도지수는 일정 기간 상승폭과 하락폭의 비율로 과매수와 "
                "과매도를 가늠한다. 이 정보만으로 판단할 때 다음 거래일의 종가는 오늘보다 오를까?")
    items = [EvalItem("stock_krx", f"t{k}", question(k), ("상승", "하락"), k % 2, "", "stock")
             for k in range(60)]
    index = EvalIndex(items, 13, 0.5)
    assert index.template_ngrams > 0 and index.templated == 0
    other_days = [question(100 + k) for k in range(30)]
    assert index.match(other_days) == [None] * 30
    # counted on every n-gram, the shared wording alone would make each of them "contaminated"
    assert all(EvalIndex(items, 13, 0.5, max_items_per_ngram=10**6, template_share=1.0).match(other_days))
    copied = index.match([f"훈련 예시: {question(7)} 정답: 상승"])[0]
    assert copied is not None and copied[0] == "stock_krx/t7" and copied[1] == 1.0
    # the same wording in three items of a 10-item set is template text too (5%, at least 2)
    small = EvalIndex(items[:10], 13, 0.5)
    assert small.match(other_days[:5]) == [None] * 5
    # items that are nothing but shared wording (one stem, choices under 13 characters) are
    # still caught when copied: by their question and every choice, labels in between
    stem = "다음 중 자본시장법상 금융투자상품에 해당하지 않는 것은 무엇인가요?"
    same = [EvalItem("local", f"s{k}", stem, (f"주식{k}", "채권", "예금", "펀드"), 2, "", "financial_market")
            for k in range(3)]
    index = EvalIndex(same + items[:27], 13, 0.5)
    assert index.templated == 3
    copied = index.match([f"{stem}\nA. 주식1\nB. 채권\nC. 예금\nD. 펀드\n정답: C", stem + " 다른 보기"])
    assert copied[0] == ("local/s1", 1.0) and copied[1] is None


def test_decontamination_reads_eval_sets_exactly_as_evaluation_does():
    """Labelled choices ("A. …") are stripped and ids re-derived as evaluate@ does, so the
    reject names the id evaluation reports and an unlabelled copy of a choice still matches."""
    from stages.sources.evalsets import EvalLocalSet, load_local_set
    from stages.mix import load_eval_items

    raw = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))["evaluate"]
    spec = EvalLocalSet.model_validate(dict(raw["local"]["fin_market_mcq"],
                                            input=str(ROOT / "data/samples/eval/fin_market_mcq.jsonl")))
    items, info = load_eval_items({}, {"fin_market_mcq": spec})
    expected, _ = load_local_set("fin_market_mcq", spec)
    assert info["fin_market_mcq"]["items"] == len(expected) == len(items) > 0
    assert [f"{item.set}/{item.id}" for item in items] == [f"fin_market_mcq/{e.id}" for e in expected]
    labelled = [json.loads(line)["options"] for line in
                (ROOT / "data/samples/eval/fin_market_mcq.jsonl").read_text(encoding="utf-8").splitlines()]
    assert any(option.startswith("A.") for options in labelled for option in options)
    assert not any(choice.startswith(("A.", "B.")) for item in items for choice in item.choices)


def test_parquet_batches_hold_one_row_group_at_a_time(tmp_path):
    """mix streams its inputs and its spill through iter_record_batches: all rows in order,
    batches of at most batch_size, and Arrow's pool holds about one row group, not the
    file (ParquetFile.iter_batches kept everything it had decoded until the end: 176 MiB
    after 300k rows of text)."""
    import pyarrow as pa
    from stages.common.io import iter_record_batches
    rng = np.random.default_rng(0)
    schema = pa.schema([("id", pa.int64()), ("text", pa.string())])
    path = tmp_path / "many_groups.parquet"
    writer = pq.ParquetWriter(path, schema)
    rows, groups, chars = 1000, 40, 300
    for group in range(groups):  # random Hangul: plain-encoded, as real prompts are
        flat = (0xAC00 + rng.integers(0, 11172, size=rows * chars)).astype("<u4").tobytes().decode("utf-32-le")
        texts = [flat[k * chars:(k + 1) * chars] for k in range(rows)]
        writer.write_table(pa.table({"id": list(range(group * rows, (group + 1) * rows)), "text": texts},
                                    schema=schema))
    writer.close()
    one_group = pq.ParquetFile(path).read_row_group(0).nbytes
    base = pa.total_allocated_bytes()
    ids, peak = [], 0
    for batch in iter_record_batches(path, 700):
        assert batch.num_rows <= 700
        ids += batch.column("id").to_pylist()
        peak = max(peak, pa.total_allocated_bytes() - base)
    assert ids == list(range(rows * groups))
    assert peak < 10 * one_group  # the file holds 40; iter_batches reaches ~40x


def test_minhash_estimates_jaccard():
    a = "유가증권시장에서 주식의 하루 가격제한폭은 기준가격 대비 얼마인가? 상하 30퍼센트이다." * 3
    b = a.replace("얼마인가", "얼마 인가")
    c = "채권의 듀레이션은 현금흐름 현재가치의 가중평균 만기를 뜻한다. 금리 위험을 관리한다." * 3
    sig = minhash_signatures([a, b, c, "짧음"], 5, 64)
    assert sig.shape == (4, 64) and (sig[0] == sig[1]).mean() > 0.8 and (sig[0] == sig[2]).mean() < 0.2
    found = near_duplicates(sig, np.array([1, 2, 3, 4], dtype=np.uint64), np.ones(4, bool), 16, 0.8)
    assert list(found) == [1] and found[1][0] == 0
    same_group = near_duplicates(sig, np.array([1, 1, 3, 4], dtype=np.uint64), np.ones(4, bool), 16, 0.8)
    assert same_group == {}


def test_near_duplicates_over_row_chunks_equal_the_whole_matrix():
    """The build passes its per-batch signature chunks without concatenating them."""
    rng = np.random.default_rng(3)
    sig = rng.integers(0, 4, size=(300, 64), dtype=np.uint16)  # few values: many candidates
    sig[150] = sig[20]
    sig[299] = sig[7]
    groups = np.arange(300, dtype=np.uint64)
    alive = np.ones(300, bool)
    alive[5] = False
    whole = near_duplicates(sig, groups, alive, 16, 0.5)
    chunks = [sig[:1], sig[1:128], sig[128:128], sig[128:256], sig[256:]]
    assert near_duplicates(chunks, groups, alive, 16, 0.5) == whole
    assert whole[150] == (20, 1.0) and whole[299] == (7, 1.0)


# ------------------------------------------------------------------------------ params
def write_params(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    return path


def test_v6_excludes_krx_sample_and_reports_directly_and_through_mixtures(tmp_path):
    v6, _, _ = load_mix("v6", ROOT / "params.yaml")
    assert {"krx_sample", "krx_reports", "krx_reports_json"} <= set(v6.exclude_sources)
    assert not set(v6.sources) & set(v6.exclude_sources)
    assert {"generated_financial_market", "generated_accounting", "generated_rules", "metamath",
            "enko_translation", "aihub_kozh", "table_qa", "top100_companies",
            "aihub_econ_calc", "qa_rules"} == set(v6.sources)
    raw = load_raw(ROOT / "params.yaml")
    with pytest.raises(ParamsError, match="are in exclude_sources"):  # directly: the stage refuses
        bad = copy.deepcopy(raw)
        bad["versions"]["v6"]["mix"]["sources"]["krx_sample"] = {"format": "prompt_answer"}
        load_mix("v6", write_params(tmp_path, bad))
    bad = copy.deepcopy(raw)  # through another version's mixture: the whole-file check refuses
    bad["versions"]["v6"]["mix"]["sources"]["mixture_v1"] = {"format": "example"}
    assert any("excluded sources ['krx_sample']" in p
               for p in check.check(write_params(tmp_path, bad)))


def test_recipes_follow_the_mission_table():
    mix = {v: load_mix(v, ROOT / "params.yaml")[0] for v in load_raw(ROOT / "params.yaml")["versions"]}
    assert list(mix) == ["v1", "v2", "v3", "v4", "v5_1", "v5_2", "v5_3", "v6", "v7"]
    assert set(mix["v1"].sources) == {"krx_sample"}
    assert set(mix["v2"].sources) == {"krx_sample", "financial_reports"}
    assert mix["v2"].sources["financial_reports"].format == "raw_text"
    assert set(mix["v3"].sources) == {"krx_reports_json"}
    assert mix["v4"].sources["qa_rules"].format == "qa_json"
    assert set(mix["v5_1"].sources) == {"metamath"}
    assert set(mix["v5_2"].sources) == {"mixture_v5_1", "qa_rules"}
    assert set(mix["v5_3"].sources) == {"mixture_v5_2", "report_summaries"}
    # v7: v6's data plus the contest categories v6 lacks; v6's exclusions hold for it too
    assert set(mix["v7"].sources) == {"mixture_v6", "stock_krx", "agent_krx", "agent_krx_conversations",
                                      "generated_company"}
    assert set(mix["v6"].exclude_sources) <= set(mix["v7"].exclude_sources)


@pytest.mark.parametrize("mutate,message", [
    (lambda v: v["sources"]["metamath"].update(fracton=1.0),
     "versions.v5_1.mix.sources.metamath.fracton: unknown key"),
    (lambda v: v["sources"]["metamath"].update(count=3, fraction=0.5), "one of count or fraction, not both"),
    (lambda v: v["sources"]["metamath"].update(upsample="sometimes"), "versions.v5_1.mix.sources.metamath.upsample"),
    (lambda v: v["sources"]["metamath"].update(fraction=2.0), "needs upsample: true"),
    (lambda v: v.update(overlength="cut"), "versions.v5_1.mix.overlength"),
    (lambda v: v.update(dedup={"near_threshold": 1.5}), "versions.v5_1.mix.dedup.near_threshold"),
])
def test_recipe_typos_and_bad_values_are_errors_naming_the_key(tmp_path, mutate, message):
    raw = load_raw(ROOT / "params.yaml")
    mutate(raw["versions"]["v5_1"]["mix"])
    with pytest.raises(ParamsError, match=message.replace("[", "\\[")):
        load_mix("v5_1", write_params(tmp_path, raw))


def test_an_unknown_source_name_is_reported_by_the_check(tmp_path):
    raw = load_raw(ROOT / "params.yaml")
    sources = raw["versions"]["v5_1"]["mix"]["sources"]
    sources["metamth"] = sources.pop("metamath")
    assert any("versions.v5_1.mix: unknown source 'metamth'" in p
               for p in check.check(write_params(tmp_path, raw)))


def test_mix_refuses_dep_slots_that_do_not_name_its_recipe_files(tmp_path, tokenizer_dir, capsys):
    ws = _workspace(tmp_path, tokenizer_dir)
    with pytest.raises(SystemExit):
        mix_main(["v1", "--tokenizer", str(ws / "models/base"), "--inputs",
                  "data/collected/krx_sample.parquet", "--out", str(ws / "o.parquet"),
                  "--manifest", str(ws / "m.json"), "--rejects", str(ws / "r.parquet"),
                  "--metrics", str(ws / "x.json"), "--log", str(ws / "l.log"),
                  "--params", str(ws / "params.yaml")])
    assert "run `python -m stages.dvc_vars`" in capsys.readouterr().err


def test_each_mix_stage_depends_on_exactly_its_recipe_inputs():
    raw = load_raw(ROOT / "params.yaml")
    code = {"stages/__init__.py", "stages/common/__init__.py", "stages/common/chunking.py", "stages/common/companies.py",
            "stages/sources/evalsets.py", "stages/common/io.py", "stages/common/params.py", "stages/common/prompts.py",
            "stages/common/runlog.py", "stages/common/schema.py", "stages/common/text.py",
            "stages/mix.py", "stages/mixing/__init__.py", "stages/mixing/formats.py",
            "stages/mixing/hashing.py", "stages/mixing/recipe.py", "stages/prompts/mix_formats.yaml",
            "stages/sources/__init__.py", "stages/sources/local.py", "stages/sources/records.py",
            "stages/sources/spec.py"}
    settings = raw["evaluate"]
    evals = {s["input"] for s in settings["collected"].values()} | {settings["local_dir"]}
    with Repo(str(ROOT)) as repo:
        stages = {s.addressing: s for s in repo.index.stages if s.addressing.startswith("mix@")}
    assert set(stages) == {f"mix@{v}" for v in raw["versions"]}
    for version in raw["versions"]:
        r = load_mix(version, ROOT / "params.yaml")[0]
        stage = stages[f"mix@{version}"]
        deps = {d.def_path for d in stage.deps if type(d).__name__ == "Dependency"}
        assert deps == code | evals | {"models/base"} | set(r.source_inputs().values()), version
        outs = {o.def_path for o in stage.outs}
        assert outs == {f"data/mixtures/{version}.parquet", f"data/mixtures/{version}.json",
                        f"data/rejects/mix/{version}.parquet", f"logs/mix/{version}.log",
                        f"metrics/mix/{version}.json"}


# ------------------------------------------------------------------------------ the stage
def _workspace(tmp_path: Path, tokenizer_dir: Path) -> Path:
    """A project dir laid out like the repo: params.yaml (production, with test recipes and
    eval sets), the contract input paths, models/base."""
    ws = tmp_path / "ws"
    raw = load_raw(ROOT / "params.yaml")
    settings = raw["evaluate"]
    settings["local_dir"] = "data/raw/eval"
    settings["local"] = {"fin_security": {**settings["local"]["fin_security"],
                                          "input": "data/raw/eval/fin_security.jsonl"}}
    src1 = {"krx_sample": {"format": "prompt_answer", "fraction": 1.0, "upsample": False},
            "generated_financial_market": {"format": "prompt_answer", "count": 12, "upsample": True}}
    src2 = {"mixture_v1": {"format": "example", "fraction": 1.0, "upsample": False},
            "enko_translation": {"format": "translation", "count": 4, "upsample": False}}
    raw["versions"] = {version: {"mix": {"seed": 5, "sources": sources}, "train": {"init_from": "base"}}
                       for version, sources in (("v1", src1), ("v2", src2))}
    raw["mix_defaults"].update(dev_size=0.25, max_length=256)
    ws.mkdir()
    (ws / "params.yaml").write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    data = _mixed_sources()
    security = json.loads((ROOT / "data/samples/eval/fin_security.jsonl").read_text(
        encoding="utf-8").splitlines()[0])
    data["krx_sample"][1].append(qa("krx_sample", security["question"], "다중 요소 인증"))
    open_item = json.loads((ROOT / "data/samples/eval/finance_open.jsonl").read_text(
        encoding="utf-8").splitlines()[0])  # an open-ended question with its reference answer
    data["krx_sample"][1].append(qa("krx_sample", open_item["question"], open_item["answer"]))
    for name in ("krx_sample", "generated_financial_market", "enko_translation"):
        kind, records = data[name]
        write_records(records, SCHEMAS[kind], ws / mix_source_input(name))
    kmmlu = [mcq("kmmlu_economics", EVAL_QUESTION, EVAL_CHOICES, 0, "test"),
             mcq("kmmlu_economics", "훈련용 문제?", ["가", "나", "다", "라"], 1, "train")]
    for spec in settings["collected"].values():  # KMMLU subjects, stock/agent/company questions
        write_records(kmmlu, SCHEMAS["mcq"], ws / spec["input"])
    (ws / "data/raw/eval").mkdir(parents=True)
    shutil.copy(ROOT / "data/samples/eval/fin_security.jsonl", ws / "data/raw/eval/fin_security.jsonl")
    shutil.copy(ROOT / "data/samples/eval/finance_open.jsonl", ws / "data/raw/eval/finance_open.jsonl")
    shutil.copytree(tokenizer_dir, ws / "models/base")
    return ws


def _inputs(ws: Path, version: str) -> list[str]:
    """What dvc.yaml passes: the recipe's files (dvc.vars.yaml's slots)."""
    return list(load_mix(version, ws / "params.yaml")[0].source_inputs().values())


def _run(ws: Path, version: str):
    return run_stage("mix", [version, "--tokenizer", "models/base", "--inputs", *_inputs(ws, version),
                             "--out", f"data/mixtures/{version}.parquet",
                             "--manifest", f"data/mixtures/{version}.json",
                             "--rejects", f"data/rejects/mix/{version}.parquet",
                             "--metrics", f"metrics/mix/{version}.json",
                             "--log", f"logs/mix/{version}.log"], ws)


def test_stage_writes_mixture_manifest_metrics_deterministically(tmp_path, tokenizer_dir, monkeypatch):
    ws = _workspace(tmp_path, tokenizer_dir)
    for version in ("v1", "v2"):
        result = _run(ws, version)
        assert result.returncode == 0, result.stderr
    first = {p: (ws / p).read_bytes() for p in ("data/mixtures/v1.parquet", "data/mixtures/v1.json",
                                                "data/mixtures/v2.parquet", "data/rejects/mix/v1.parquet")}
    v1 = pq.read_table(ws / "data/mixtures/v1.parquet").to_pylist()
    v2 = pq.read_table(ws / "data/mixtures/v2.parquet").to_pylist()
    manifest = json.loads((ws / "data/mixtures/v1.json").read_text(encoding="utf-8"))
    metrics = json.loads((ws / "metrics/mix/v1.json").read_text(encoding="utf-8"))
    rejects = pq.read_table(ws / "data/rejects/mix/v1.parquet").to_pylist()
    # the local eval item planted in krx_sample is gone, named by its eval id
    assert any(r["reason"] == "eval_contamination" and "fin_security/" in r["detail"] for r in rejects)
    # and the planted open-ended question with its reference answer: the open-ended sets count too
    assert any(r["reason"] == "eval_contamination" and "finance_open/" in r["detail"] for r in rejects)
    assert manifest["eval_sets"]["finance_open"] == {"path": "data/raw/eval/finance_open.jsonl"}
    assert manifest["sources"]["krx_sample"]["examples"] == 12
    assert manifest["sources"]["generated_financial_market"]["examples"] == 12
    assert len(v1) == 24 == metrics["examples"] and metrics["sources"]["krx_sample"]["examples"] == 12
    assert manifest["tokenizer"]["model"] == "tiny-test" and manifest["tokenizer"]["files_sha256"]
    assert manifest["mixture"]["sha256"] == __import__("hashlib").sha256(first["data/mixtures/v1.parquet"]).hexdigest()
    assert set(manifest["inputs"]) == {"krx_sample", "generated_financial_market"}
    assert manifest["eval_sets"]["fin_security"] == {"path": "data/raw/eval/fin_security.jsonl"}
    assert metrics["eval_items"]["fin_security"] > 0 and metrics["eval_items"]["kmmlu_economics"] == 1
    assert manifest["length"]["max"] <= 256 and manifest["mixture"]["tokens"] == metrics["tokens"] > 0
    # v2 = v1's examples (splits kept) + 4 translations
    v1_split = {r["id"]: r["split"] for r in v1}
    from_v1 = [r for r in v2 if r["id"] in v1_split]
    assert len(from_v1) == 24 and all(v1_split[r["id"]] == r["split"] for r in from_v1)
    assert sum(r["source"] == "enko_translation" for r in v2) == 4
    assert {r["version"] for r in v2} == {"v2"}
    # same inputs, same bytes (second run in-process: the subprocess path is proven above)
    monkeypatch.chdir(ws)
    for version in ("v1", "v2"):
        mix_main([version, "--tokenizer", "models/base", "--inputs", *_inputs(ws, version),
                  "--out", f"data/mixtures/{version}.parquet",
                  "--manifest", f"data/mixtures/{version}.json",
                  "--rejects", f"data/rejects/mix/{version}.parquet",
                  "--metrics", f"metrics/mix/{version}.json", "--log", f"logs/mix/{version}.log"])
    assert {p: (ws / p).read_bytes() for p in first} == first


def test_a_regenerated_evaluation_set_leaves_the_mixture_and_its_training_unchanged(tmp_path, tokenizer_dir):
    """An evaluation set written again (more test questions, none overlapping the data) re-runs
    mix@ (a dep changed), but the files train@ depends on keep their bytes, so DVC leaves every
    version's training up to date; only the mix metrics count the new items."""
    ws = _workspace(tmp_path, tokenizer_dir)
    assert _run(ws, "v1").returncode == 0
    kept = {p: (ws / p).read_bytes() for p in ("data/mixtures/v1.parquet", "data/mixtures/v1.json")}
    stock = ws / load_raw(ws / "params.yaml")["evaluate"]["collected"]["stock_krx"]["input"]
    records = pq.read_table(stock).to_pylist()
    records.append(mcq("stock_krx", "다음 거래일 종가는 오늘 종가보다 오를까요, 내릴까요? (새 시험 문항)",
                       ["상승", "하락"], 1, "test"))
    write_records(records, SCHEMAS["mcq"], stock)
    assert _run(ws, "v1").returncode == 0
    assert {p: (ws / p).read_bytes() for p in kept} == kept
    metrics = json.loads((ws / "metrics/mix/v1.json").read_text(encoding="utf-8"))
    assert metrics["eval_items"]["stock_krx"] == 2
    # what train@ depends on: the mixture, its manifest, the base and the parent; no eval set
    train = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]["train"]["do"]
    evals = [d for d in train["deps"] if "eval" in d]
    assert evals == [] and "data/mixtures/${key}.json" in train["deps"]


def test_stage_fails_clearly_when_an_input_is_missing(tmp_path, tokenizer_dir, monkeypatch, capsys):
    ws = _workspace(tmp_path, tokenizer_dir)
    (ws / mix_source_input("generated_financial_market")).unlink()
    monkeypatch.chdir(ws)
    with pytest.raises(SystemExit) as info:
        mix_main(["v1", "--tokenizer", "models/base", "--inputs", *_inputs(ws, "v1"),
                  "--out", "data/mixtures/v1.parquet",
                  "--manifest", "data/mixtures/v1.json", "--rejects", "data/rejects/mix/v1.parquet",
                  "--metrics", "metrics/mix/v1.json", "--log", "logs/mix/v1.log"])
    assert info.value.code == 2
    assert ("versions.v1.mix.sources.generated_financial_market: input "
            "data/generated/financial_market/pairs.parquet does not exist") in capsys.readouterr().err
    assert not (ws / "data/mixtures/v1.parquet").exists()


@pytest.mark.slow
def test_dvc_status_marks_only_the_changed_version_stale(tmp_path, monkeypatch):
    """Real dvc in a temp git repo: record every mix@ stage as up to date (dvc commit), then
    change one version's recipe, then one generated domain's file."""
    proj = tmp_path / "proj"
    shutil.copytree(ROOT, proj, ignore=shutil.ignore_patterns(
        ".venv", "quickstart", ".git", "data", "__pycache__", ".dvc", "models", "metrics", "logs"))
    subprocess.run(["git", "init", "-q"], cwd=proj, check=True)
    subprocess.run([DVC, "init", "-q"], cwd=proj, check=True)
    raw = load_raw(proj / "params.yaml")
    monkeypatch.chdir(proj)  # dvc's index of a repo is read relative to the working directory
    with Repo(str(proj)) as repo:
        stages = [s for s in repo.index.stages if s.addressing.startswith("mix@")]
        assert len(stages) == len(raw["versions"])
        for stage in stages:  # placeholder bytes for every dep and out
            for entry in [*stage.deps, *stage.outs]:
                if type(entry).__name__ == "ParamsDependency":
                    continue
                path = proj / entry.def_path
                if entry.def_path in ("models/base", raw["evaluate"]["local_dir"]) or \
                        entry.def_path.endswith("_json"):
                    path.mkdir(parents=True, exist_ok=True)
                    (path / "x.txt").write_text(entry.def_path)
                elif not path.exists():
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(entry.def_path)
    targets = [f"mix@{v}" for v in raw["versions"]]
    done = subprocess.run([DVC, "commit", "-f", *targets], cwd=proj, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr + done.stdout

    def stale() -> set[str]:
        out = subprocess.run([DVC, "status", "--json", *targets], cwd=proj, check=True,
                             capture_output=True, text=True).stdout
        return set(json.loads(out))

    # one version's recipe and one generated domain's file change: only their mixes are stale
    text = (proj / "params.yaml").read_text(encoding="utf-8")
    (proj / "params.yaml").write_text(text.replace("      seed: 4\n", "      seed: 44\n"), encoding="utf-8")
    (proj / "data/generated/accounting/pairs.parquet").write_text("changed")
    assert stale() == {"mix@v4", "mix@v6"}
    # a re-mixed v5_1 makes the versions built on it stale (v5_2 reads mixture_v5_1)
    (proj / "params.yaml").write_text(text, encoding="utf-8")
    (proj / "data/generated/accounting/pairs.parquet").write_text("data/generated/accounting/pairs.parquet")
    (proj / "data/mixtures/v5_1.parquet").write_text("v5_1 re-mixed")
    assert stale() == {"mix@v5_1", "mix@v5_2"}


def test_a_mixture_too_small_for_its_dev_share_still_gets_one_dev_group(tmp_path: Path, tokenizer):
    """round(0.05 x 6 groups) = 0 per source; every mixture still holds a dev split (evaluate
    measures each version's dev loss on it): one group of its largest source, here krx (6
    groups) rather than rules (2)."""
    krx = [qa("krx_sample", f"{words(700 + i, 6)}에 대해 설명하시오.", f"{words(800 + i, 8)}이다.")
           for i in range(6)]
    rules = [qa("qa_rules", f"{words(900 + i, 6)}의 취지는?", f"{words(950 + i, 8)}.")
             for i in range(2)]
    data = {"krx_sample": ("qa", krx), "qa_rules": ("qa", rules)}
    src = {"krx_sample": {"format": "prompt_answer", "fraction": 1.0, "upsample": False},
           "qa_rules": {"format": "prompt_answer", "fraction": 1.0, "upsample": False}}
    _, rows, _ = run_build(tmp_path, "small", recipe(src, dev_size=0.05), data, tokenizer)
    dev = [r for r in rows if r["split"] == "dev"]
    assert len(rows) == 8 and len(dev) == 1 and dev[0]["source"] == "krx_sample"
    _, rows, _ = run_build(tmp_path, "none", recipe(src, dev_size=0.0), data, tokenizer)
    assert not [r for r in rows if r["split"] == "dev"]  # dev_size 0: no dev split asked for
