"""``make plan`` (stages/plan.py): the cost of the LLM stages that would run, offline, writing
nothing — exact where a stage's input exists (its real requests, looked up in its cache),
estimated from params where it does not."""
from __future__ import annotations

import json
import shutil
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages.common.io import write_records
from stages.common.llm import LLMRequest, response_format_for
from stages.common.llm_cache import (ENTRY_FORMAT, CacheEntry, CachedResponse, RequestSummary,
                                     ResponseCache, cache_key)
from stages.common.schema import SCHEMAS
from stages.common.params import load_raw
from stages.common.text import content_id
from stages.filter import Verdict, judge_messages
from stages.plan import load_params as load_plan_params
from stages.plan import (Context, TokenCounter, PlanParams, StagePlan, downstream, load_commands,
                         plan_filter, plan_solve, plan_transform, render, totals)

from tests.conftest import ROOT

LLM_STAGE_ROWS = {"summarize", "filter@financial_market", "filter@accounting", "filter@rules",
                  "transform@financial_market", "transform@accounting",
                  "synthesize@financial_market", "synthesize@accounting", "synthesize@rules",
                  "solve@financial_market", "solve@accounting", "solve@rules", "agent@krx",
                  "synthesize@company", "solve@company",
                  *(f"judge@{k}" for k in ["base", *load_raw(ROOT / "params.yaml")["versions"]])}


def tree_state(root: Path) -> dict[str, float]:
    """Every file's mtime, but dvc's own lock files (``dvc status`` takes its read lock)."""
    return {str(p.relative_to(root)): p.stat().st_mtime for p in root.rglob("*")
            if p.is_file() and ".venv" not in p.parts and "quickstart" not in p.parts
            and "__pycache__" not in p.parts and ".git" not in p.parts
            and p.relative_to(root).parts[:2] != (".dvc", "tmp")
            and p.relative_to(root).parts[0] not in ("bench", "tests", "scripts", "docs")}


def test_the_production_plan_is_offline_covers_every_llm_stage_and_writes_nothing():
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               HF_HUB_OFFLINE="1", HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9")
    before = tree_state(ROOT)
    proc = subprocess.run([sys.executable, "-m", "stages.plan", "--json"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert tree_state(ROOT) == before
    plan = json.loads(proc.stdout)
    rows = {r["stage"]: r for r in plan["rows"]}
    assert set(rows) == LLM_STAGE_ROWS
    # nothing exists in the root: every stage runs, estimated from params except the slots
    assert all(r["runs"] for r in rows.values())
    assert rows["filter@financial_market"]["basis"].startswith("estimated")
    assert rows["filter@financial_market"]["requests"] == 1500  # plan.assumed
    assert rows["synthesize@accounting"]["requests"] == 700 and \
        rows["synthesize@accounting"]["basis"].startswith("exact")
    assert rows["solve@rules"]["requests"] == round(1000 / 0.9)  # 1,000 questions / pass share
    assert rows["synthesize@company"]["requests"] == 1120 and \
        "plan.assumed.company" in rows["synthesize@company"]["basis"]
    assert rows["agent@krx"]["requests"] == 1600 + 200 and \
        rows["agent@krx"]["basis"].startswith("estimated: prices not collected")
    assert rows["judge@v7"]["requests"] == 200 and "plan.assumed 200" in rows["judge@v7"]["basis"]
    assert all(r["prompt_tokens"] > 0 and r["usd_online"] > 0 for r in rows.values())
    total = plan["total"]
    assert total["usd_online"] == pytest.approx(sum(r["usd_online"] for r in rows.values()), abs=0.02)
    assert total["usd_batch"] == pytest.approx(total["usd_online"] / 2, abs=0.02)  # batch: half
    assert "o200k_base" in plan["encodings"][0]


def mcq(i: int) -> dict:
    question = f"문항 {i}: 채권 가격과 시장 금리의 관계에 대한 설명으로 옳은 것은? 주식 투자 포트폴리오"
    choices = [f"채권 선택지 {i}-{k}" for k in range(4)]
    return {"id": content_id("mcq", question, choices, 0), "source": "kmmlu_economics",
            "domain": "", "split": "train", "question": question, "choices": choices,
            "answer": 0, "category": "Economics", "meta": "{}"}


def filter_workspace(tmp_path: Path, monkeypatch) -> tuple[list[dict], list[Path], Context]:
    """A project with filter@fm's input (5 MCQs) and two of its five judge requests answered
    in the cache (80 completion tokens each); the entries' paths and a plan context."""
    monkeypatch.chdir(tmp_path)
    records = [mcq(i) for i in range(5)]
    write_records(records, SCHEMAS["mcq"], tmp_path / "data/collected/k.parquet")
    llm = {"model": "gpt-4o", "temperature": 0.0, "max_tokens": 300, "seed": 1,
           "prices": {"input_per_1m": 2.5, "output_per_1m": 10.0}}
    params = {"filter": {"fm": {"input": "data/collected/k.parquet", "criteria": "금융시장 문항",
                                "prefilter": {"keywords": {"채권": 2, "주식": 2}, "min_score": 2.0,
                                              "min_chars": 10, "min_hangul_share": 0.3,
                                              "max_digit_share": 0.5},
                                "llm": llm}},
              "transform": {"fm": {"input": "data/generated/fm/filtered.parquet",
                                   "context": "시장", "llm": llm}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    (tmp_path / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    # two of the five judge requests are already answered (80 completion tokens each)
    cache = ResponseCache(tmp_path / "data/llm_cache/filter/fm")
    fmt = response_format_for(Verdict)
    paths = []
    for record in records[:2]:
        key = cache_key(model="gpt-4o", messages=judge_messages(record, "금융시장 문항"),
                        json_schema=fmt["json_schema"], temperature=0.0, top_p=1.0,
                        max_tokens=300, seed=1, sample_index=0, reask_index=0)
        paths.append(cache.put(key, CacheEntry(format=ENTRY_FORMAT, response=CachedResponse(
            content="{}", finish_reason="stop", prompt_tokens=1, completion_tokens=80),
            request=RequestSummary(model="gpt-4o", schema_name="Verdict", temperature=0.0,
                                   top_p=1.0, max_tokens=300, seed=1, sample_index=0, reask_index=0))))
    return records, paths, Context(Path("."), "params.yaml", PlanParams(), load_commands(Path(".")))


def test_a_stage_whose_input_exists_is_counted_exactly_against_its_cache(tmp_path, monkeypatch):
    records, _, ctx = filter_workspace(tmp_path, monkeypatch)
    row = StagePlan("filter@fm", runs=True)
    plan_filter("fm", ctx, row)
    assert (row.requests, row.cached, row.uncached) == (5, 2, 3)
    counter = TokenCounter("gpt-4o")
    expected = sum(counter.request(LLMRequest(judge_messages(r, "금융시장 문항"), Verdict))
                   for r in records[2:])
    assert row.prompt_tokens == expected and row.basis.startswith("exact: 5 mcq items, 5 pass")
    assert row.completion_tokens == 3 * 80 and row.completion_basis == "cache mean 80"
    # transform has no input yet: its requests are the judged questions x the keep share
    later = StagePlan("transform@fm", runs=True)
    plan_transform("fm", ctx, later)
    assert later.requests == round(5 * 0.75) and later.basis.startswith("estimated: input missing")
    assert later.completion_basis == "0.5 x max_tokens 300"
    assert not (tmp_path / "data/generated").exists()  # nothing written


def test_a_stage_downstream_of_one_that_runs_is_planned_from_the_upstream_plan(tmp_path, monkeypatch):
    """Issue 24: filter's params changed, so filter -> transform -> solve all run. transform's
    and solve's files on disk are stale (1 question each): they are planned from filter's and
    synthesize's planned outputs, never "exact" from the stale files."""
    records, _, ctx = filter_workspace(tmp_path, monkeypatch)
    stale = [mcq(100)]
    for path in ("data/generated/fm/filtered.parquet", "data/generated/fm/transformed.parquet",
                 "data/generated/fm/synthesized.parquet"):
        write_records(stale, SCHEMAS["mcq"], tmp_path / path)
    graph = {"filter@fm": (("data/collected/k.parquet",), ("data/generated/fm/filtered.parquet",)),
             "transform@fm": (("data/generated/fm/filtered.parquet",), ("data/generated/fm/transformed.parquet",)),
             "synthesize@fm": (("data/generated/fm/transformed.parquet",), ("data/generated/fm/synthesized.parquet",)),
             "solve@fm": (("data/generated/fm/transformed.parquet", "data/generated/fm/synthesized.parquet"),
                          ("data/generated/fm/pairs.parquet",)),
             "mix@v1": (("data/collected/other.parquet",), ("data/mixtures/v1.parquet",))}
    runs = downstream({"filter@fm"}, graph)
    assert runs == {"filter@fm", "transform@fm", "synthesize@fm", "solve@fm"}   # not mix@v1
    ctx.rewritten = {out: name for name in runs for out in graph[name][1]}
    plan_filter("fm", ctx, StagePlan("filter@fm", runs=True))
    transform = StagePlan("transform@fm", runs=True)
    plan_transform("fm", ctx, transform)
    assert transform.requests == round(5 * 0.75)            # filter's judged x keep share, not 1
    assert transform.basis.startswith("estimated: input rewritten by filter@fm")
    ctx.planned["data/generated/fm/synthesized.parquet"] = 200  # synthesize's target
    params = yaml.safe_load((tmp_path / "params.yaml").read_text(encoding="utf-8"))
    params["solve"] = {"fm": {"inputs": {"transformed": "data/generated/fm/transformed.parquet",
                                         "synthesized": "data/generated/fm/synthesized.parquet"},
                              "target_pairs": None, "llm": params["transform"]["fm"]["llm"]}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    solve = StagePlan("solve@fm", runs=True)
    plan_solve("fm", ctx, solve)
    assert solve.requests == round(5 * 0.75) + 200          # the upstream plan, not the stale 1
    assert solve.basis.startswith("estimated: input rewritten by transform@fm; input rewritten by "
                                  "synthesize@fm") and "planned upstream" in solve.basis
    ctx.rewritten = {}                                      # nothing runs first: the files are exact
    exact = StagePlan("solve@fm", runs=True)
    plan_solve("fm", ctx, exact)
    assert exact.requests == 1 and exact.basis.startswith("exact")


def test_a_damaged_cache_entry_is_planned_as_a_paid_request(tmp_path, monkeypatch, caplog):
    """The stage reads an entry it cannot parse as a miss and asks again, so the plan must
    price it: a file cut off mid-write and one of another entry format are not "cached"."""
    records, paths, ctx = filter_workspace(tmp_path, monkeypatch)
    paths[0].write_bytes(paths[0].read_bytes()[:40])
    paths[1].write_text(paths[1].read_text(encoding="utf-8").replace(
        f'"format": {ENTRY_FORMAT}', f'"format": {ENTRY_FORMAT + 1}'), encoding="utf-8")
    row = StagePlan("filter@fm", runs=True)
    plan_filter("fm", ctx, row)
    assert (row.requests, row.cached, row.uncached, row.damaged) == (5, 0, 5, 2)
    counter = TokenCounter("gpt-4o")
    assert row.prompt_tokens == sum(counter.request(LLMRequest(judge_messages(r, "금융시장 문항"),
                                                               Verdict)) for r in records)
    assert caplog.text.count("damaged or partial") == 1 and caplog.text.count("has format") == 1
    assert row.completion_basis == "0.5 x max_tokens 300"  # neither entry's tokens are a mean
    table = render({"rows": [row], "total": totals([row]), "status": "test", "encodings": ["o200k_base"]})
    assert "; 2 damaged cache entries, asked again |" in table
    assert paths[0].is_file() and paths[1].is_file()  # the plan only reads


def test_the_judge_is_priced_from_the_answers_on_disk_and_free_when_offline(tmp_path, monkeypatch):
    """judge@v1: exact from evaluate@v1's open-ended answers against its cache; with the
    chrF judge (the quickstart's) no LLM call is planned."""
    from stages.evaluate import OPEN_ANSWER_SCHEMA
    from stages.judge import judge_requests
    from stages.plan import plan_judge
    monkeypatch.chdir(tmp_path)
    rows = [{"id": f"o{i}", "set": "open", "category": "", "question": f"질문 {i}?", "reference": "모범 답안",
             "answer": "답변 " * (i + 1), "answer_chars": 3 * (i + 1), "answer_tokens": i + 1, "truncated": False}
            for i in range(3)]
    write_records(rows, OPEN_ANSWER_SCHEMA, tmp_path / "data/eval/v1.open.parquet")
    llm = {"model": "gpt-4o", "temperature": 0.0, "max_tokens": 300, "seed": 1,
           "prices": {"input_per_1m": 2.5, "output_per_1m": 10.0}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"judge": {"method": "llm", "llm": llm}}),
                                          encoding="utf-8")
    (tmp_path / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    ctx = Context(Path("."), "params.yaml", PlanParams(), load_commands(Path(".")))
    row = StagePlan("judge@v1", runs=True)
    plan_judge("v1", ctx, row)
    counter = TokenCounter("gpt-4o")
    assert row.requests == 3 and row.basis == "exact: 3 answers of evaluate@v1"
    assert row.prompt_tokens == sum(counter.request(r) for r in judge_requests(rows))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"judge": {"method": "chrf", "llm": llm}}),
                                          encoding="utf-8")
    offline = StagePlan("judge@v1", runs=True)
    plan_judge("v1", ctx, offline)
    assert offline.requests == 0 and offline.basis == "chrf: scored offline, no LLM call"


def test_the_encoding_is_the_models_own():
    assert TokenCounter("gpt-4o").encoding.encode("Hello world") == [13225, 2375]
    assert TokenCounter("gpt-4o-2024-08-06").name.startswith("o200k_base")
    assert "no encoding known" in TokenCounter("my-local-llama").name


def test_before_anything_ran_pdf_stages_are_sized_from_the_raw_pdfs(tmp_path, monkeypatch):
    """Issue 24: raw PDFs on disk, nothing extracted: filter@rules is sized in article chunks
    and summarize in tokens per report from a sample of pages — not from plan.assumed."""
    from stages.plan import plan_summarize
    monkeypatch.chdir(tmp_path)
    for name in ("rules", "krx_reports"):
        shutil.copytree(ROOT / "data/samples/pdfs" / name, tmp_path / "data/raw/pdfs" / name)
    raw = load_raw(ROOT / "params.yaml")
    raw["filter"]["rules"]["chunking"] = {"size": 260, "overlap": 80}
    raw["summarize"]["max_chunk_tokens"] = 200
    params = {k: raw[k] for k in ("extract", "filter", "summarize", "llm_defaults", "plan")}
    params["extract"] = {"rules": {"input": "data/raw/pdfs/rules"},
                         "krx_reports": {"input": "data/raw/pdfs/krx_reports"}}
    params["filter"] = {"rules": params["filter"]["rules"]}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    (tmp_path / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    ctx = Context(Path("."), "params.yaml", load_plan_params(None, "params.yaml"), load_commands(Path(".")))
    rules = StagePlan("filter@rules", runs=True)
    plan_filter("rules", ctx, rules)
    assert "from the raw PDFs in data/raw/pdfs/rules: 1 files, 3 pages" in rules.basis
    assert "plan.assumed" not in rules.basis and 1 < rules.requests < 700   # not the assumed 700
    summary = StagePlan("summarize", runs=True)
    plan_summarize(None, ctx, summary)
    assert "from the raw PDFs in data/raw/pdfs/krx_reports: 3 files" in summary.basis
    assert "plan.assumed" not in summary.basis
    assert summary.requests >= 3 and summary.requests % 3 == 0   # reports x map calls each
    assert not (tmp_path / "data/collected").exists()             # nothing extracted or written
