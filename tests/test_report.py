"""report: the cross-version page, checked the way a person sees it (headless Chromium).

Inputs are built here following the contracts of the stages that write them (evaluate
metrics, mix manifests, train lineage/metrics, dvclive loss TSVs), for all eight versions
and the baseline. Chromium renders the page to a screenshot and a DOM dump; the test skips
only when ``chromium`` is not installed (``.ci/run`` installs it).
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from stages.common.params import load_raw
from stages.report import (FIGURES, accuracy_rows, composition, lineage_rows, read_loss_tsv,
                           render_html)
from tests.conftest import ROOT, run_stage

VERSIONS = ["v1", "v2", "v3", "v4", "v5_1", "v5_2", "v5_3", "v6"]
PARENTS = {"v3": "v1", "v5_2": "v5_1", "v5_3": "v5_2"}
SOURCES = {"v1": ["krx_sample"], "v2": ["krx_sample", "financial_reports"], "v3": ["krx_reports"],
           "v4": ["qa_rules", "rules"], "v5_1": ["metamath"], "v5_2": ["mixture_v5_1", "qa_rules"],
           "v5_3": ["mixture_v5_2", "report_summaries"],
           "v6": ["rules", "generated_financial_market", "metamath", "enko_translation", "table_qa"]}
# evaluate's dev loss of each version and of the base on the version's dev split: every
# version below the base except v2
DEV_LOSS = {v: {"mixture": f"data/mixtures/{v}.parquet", "examples": 4, "tokens": 40,
                "model": 2.0 + (0.9 if v == "v2" else 0.05 * i), "base": 2.5,
                "delta": round(2.0 + (0.9 if v == "v2" else 0.05 * i) - 2.5, 4)}
            for i, v in enumerate(["v1", "v2", "v3", "v4", "v5_1", "v5_2", "v5_3", "v6"])}
MICRO = {"base": 0.25, "v1": 0.30, "v2": 0.20, "v3": 0.35, "v4": 0.40, "v5_1": 0.25,
         "v5_2": 0.45, "v5_3": 0.50, "v6": 0.55}


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _eval_metrics(key: str) -> dict:
    micro = MICRO[key]
    return {"key": key, "model": "models/base" if key == "base" else f"models/{key}",
            "adapter": key != "base", "scoring": "loglik", "items": 40,
            "dev_loss": DEV_LOSS.get(key),
            "accuracy": {"micro": micro, "macro": micro - 0.02, "shuffled_micro": micro - 0.05,
                         "shuffled_macro": micro - 0.06, "choices_4": micro + 0.01,
                         "choices_7": micro - 0.03},
            "unparsed": 0,
            "by_set": {"kmmlu_economics": {"items": 20, "accuracy": micro},
                       "accounting_7": {"items": 20, "accuracy": micro - 0.1}},
            "by_category": {"kmmlu_economics": {"items": 20, "accuracy": micro},
                            "accounting_7/재무회계": {"items": 20, "accuracy": micro - 0.1}},
            "krx_bench": _krx_bench(key)}


def _krx_bench(key: str) -> dict:
    """evaluate's leaderboard block for the planted predictions: items q0-q19 are 금융시장
    (financial_market), q20-q39 주가 예측 (stock); no accounting, company or agent set."""
    from stages.evaluate import wilson
    right = round(MICRO[key] * 40)
    cats = {}
    for category, items in (("financial_market", range(0, 20)), ("stock", range(20, 40))):
        correct = sum(1 for i in items if i < right)
        low, high = wilson(correct, 20)
        cats[category] = {"items": 20, "correct": correct, "accuracy": correct / 20, "ci95_low": low,
                          "ci95_high": high, "majority_rate": 0.6, "two_step": key == "v6" and category != "stock"}
    for category in ("accounting", "company", "agent"):
        cats[category] = {"items": 0}
    return {"categories": cats, "average": (cats["financial_market"]["accuracy"] + cats["stock"]["accuracy"]) / 2,
            "averaged_over": 2}


def write_predictions(ws: Path, key: str) -> None:
    """evaluate's per-item predictions: the first MICRO × 40 items right, so every version
    differs from the baseline (10 right) on items 10.. only: v6 gains 12 (McNemar p = 0.0005),
    v1 gains 2 and v2 loses 2 (p = 0.5, noise)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    right = round(MICRO[key] * 40)
    path = ws / "data" / "eval" / f"{key}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": [f"q{i}" for i in range(40)], "set": ["kmmlu_economics"] * 40,
                             "contest_category": ["financial_market"] * 20 + ["stock"] * 20,
                             "correct": [i < right for i in range(40)]}), path)


def write_inputs(ws: Path) -> None:
    for key in ["base", *VERSIONS]:
        path = ws / "metrics" / "eval" / f"{key}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_eval_metrics(key)), encoding="utf-8")
        write_predictions(ws, key)
        judge = ws / "metrics" / "judge" / f"{key}.json"  # judge@: v5_1 was scored by another judge
        judge.parent.mkdir(parents=True, exist_ok=True)
        name = "llm:gpt-4o-2024-08-06" if key == "v5_1" else "chrF (sacrebleu 2.6.0, char order 6, word order 0, beta 2)"
        judge.write_text(json.dumps({"judge": name, "scale": "1-10" if key == "v5_1" else "0-100",
                                     "items": 8, "scored": 8, "score_mean": 20 + 30 * MICRO[key]}), encoding="utf-8")
    for index, version in enumerate(VERSIONS):
        sources = {name: {"examples": 10 * (k + 1), "tokens": 1000 * (index + 1) * (k + 1)}
                   for k, name in enumerate(SOURCES[version])}
        manifest = {"version": version,
                    "mixture": {"path": f"data/mixtures/{version}.parquet",
                                "sha256": _sha(f"mixture {version}"),
                                "examples": sum(s["examples"] for s in sources.values()),
                                "tokens": sum(s["tokens"] for s in sources.values())},
                    "inputs": {name: {"path": f"data/collected/{name}.parquet",
                                      "sha256": _sha(f"{name} {version}")} for name in sources},
                    "sources": sources}
        (ws / "data" / "mixtures").mkdir(parents=True, exist_ok=True)
        (ws / "data" / "mixtures" / f"{version}.json").write_text(json.dumps(manifest), encoding="utf-8")
        parent = PARENTS.get(version)
        lineage = {"version": version,
                   "base_model": {"model": "Qwen/Qwen2-7B-Instruct", "revision": "main"},
                   "parent": {"version": parent, "path": f"models/{parent}",
                              "adapter_sha256": _sha(f"adapter {parent}")} if parent else None,
                   "mixture": {"path": manifest["mixture"]["path"],
                               "sha256": manifest["mixture"]["sha256"],
                               "manifest": f"data/mixtures/{version}.json",
                               "manifest_sha256": _sha(f"manifest {version}")},
                   "adapter_sha256": _sha(f"adapter {version}"), "final_loss": 2.0 - 0.1 * index,
                   "train_seconds": 12.5, "tokenizer": "Qwen/Qwen2-7B-Instruct", "steps": 5,
                   "params": {"init_from": parent or "base",
                              "lora": {"r": 16 if version == "v4" else 8},
                              "sft": {"learning_rate": 1e-4}}}
        (ws / "models" / version).mkdir(parents=True, exist_ok=True)
        (ws / "models" / version / "lineage.json").write_text(json.dumps(lineage), encoding="utf-8")
        (ws / "metrics" / "train").mkdir(parents=True, exist_ok=True)
        (ws / "metrics" / "train" / f"{version}.json").write_text(json.dumps(
            {"final_loss": lineage["final_loss"], "eval_loss": 2.5, "steps": 5,
             "train_seconds": 12.5, "tokenizer": "Qwen/Qwen2-7B-Instruct"}), encoding="utf-8")
        if version != "v4":  # v4: no dvclive curve (e.g. logging_steps > steps)
            tsv = ws / "dvclive" / "train" / version / "plots" / "metrics" / "loss.tsv"
            tsv.parent.mkdir(parents=True, exist_ok=True)
            tsv.write_text("step\tloss\n" + "".join(f"{s}\t{3.0 - 0.2 * s - 0.05 * index:.3f}\n"
                                                    for s in range(1, 6)), encoding="utf-8")


def _args() -> list[str]:
    """The arguments of dvc.yaml's report cmd."""
    return ["--versions", *VERSIONS, "--eval-dir", "metrics/eval", "--train-dir", "metrics/train",
            "--mixtures-dir", "data/mixtures", "--models-dir", "models",
            "--live-dir", "dvclive/train", "--predictions-dir", "data/eval", "--judge-dir", "metrics/judge",
            "--out", "reports", "--metrics", "metrics/report.json",
            "--log", "logs/report.log", "--llm-metrics", "metrics/summarize.json", "metrics/filter",
            "metrics/transform", "metrics/synthesize", "metrics/solve"]


LLM_METRICS = {"filter/fm": {"calls": 3, "cache_hits": 7, "prompt_tokens": 900, "completion_tokens": 100,
                             "cost_usd": 0.0033, "cost_saved_usd": 0.0071},
               "summarize": {"calls": 2, "batch_calls": 2, "cache_hits": 0, "prompt_tokens": 4000,
                             "completion_tokens": 1000, "cost_usd": 0.01, "cost_saved_usd": 0.0}}


# the generation stages of domain "fm", as their metrics record them
FUNNEL_METRICS = {
    "filter/fm": {"items": 120, "prefilter_passed": 90, "relevant": 60, "records": 60,
                  "rejects_by_reason": {"low_domain_score": 30, "not_relevant": 30}},
    "transform/fm": {"records": 58, "rejects_by_reason": {"invalid_json": 2}},
    "synthesize/fm": {"records": 40, "target": 40, "rejects_by_reason": {"near_duplicate": 3}},
    "solve/fm": {"records": 95, "pairs": 190, "target_pairs": 190,
                 "rejects_by_reason": {"hallucination": 2, "wrong_letter": 1}},
}


def write_llm_metrics(ws: Path) -> None:
    for rel, metrics in FUNNEL_METRICS.items():
        llm = LLM_METRICS.get(rel, {"calls": 1, "prompt_tokens": 10, "completion_tokens": 5,
                                    "cost_usd": 0.0001})
        path = ws / "metrics" / f"{rel}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**metrics, "llm": llm}), encoding="utf-8")
    path = ws / "metrics" / "summarize.json"
    path.write_text(json.dumps({"records": 1, "llm": LLM_METRICS["summarize"]}), encoding="utf-8")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    ws = tmp_path_factory.mktemp("report_ws")
    write_inputs(ws)
    write_llm_metrics(ws)
    report = load_raw(ROOT / "params.yaml")["report"]
    (ws / "params.yaml").write_text(yaml.safe_dump({"report": report}), encoding="utf-8")
    result = run_stage("report", _args(), ws)
    assert result.returncode == 0, result.stderr
    return ws


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.text: list[str] = []
        self.headings: list[str] = []
        self._in_h2 = False

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        self._in_h2 = tag == "h2"

    def handle_data(self, data):
        self.text.append(data)
        if self._in_h2:
            self.headings.append(data.strip())
            self._in_h2 = False


# ------------------------------------------------------------------------ the stage's files
def test_report_writes_the_page_the_figures_and_metrics(built: Path):
    reports = built / "reports"
    assert sorted(p.name for p in reports.iterdir()) == sorted(["index.html", *FIGURES])
    for name in FIGURES:
        assert (reports / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = _Page()
    page.feed((reports / "index.html").read_text(encoding="utf-8"))
    assert sorted(page.images) == sorted(FIGURES)
    text = " ".join(page.text)
    for version in ["base", *VERSIONS]:
        assert version in text
    assert "+30.0 pt" in text          # v6 0.55 vs baseline 0.25
    assert "-5.0 pt" in text           # v2 0.20 vs baseline 0.25
    metrics = json.loads((built / "metrics" / "report.json").read_text(encoding="utf-8"))
    assert metrics["best_version"] == "v6" and metrics["versions"] == 8
    assert metrics["versions_above_baseline"] == 6
    # the money: per LLM stage and in total
    assert "LLM calls and cost" in page.headings
    assert "filter@fm" in text and "$0.0033" in text and "$0.0071" in text
    assert "$0.0136" in text and "5,000" in text     # total spent; summarize tokens
    # the funnel of domain fm, its rejects by stage and reason, its LLM cost (3 stages at $0.0001)
    assert "Generation funnel per domain" in page.headings
    for cell in ["120", "90", "60", "58", "40 / 40", "95", "190 / 190", "low_domain_score 30",
                 "near_duplicate 3", "hallucination 2", "$0.0036"]:
        assert cell in text, cell
    # dev loss of every version next to the base's; below the base everywhere but v2
    assert "Dev loss: each version against the base" in page.headings
    assert metrics["dev_loss_below_base"] == sorted(v for v in VERSIONS if v != "v2")
    assert "2.5000" in text and "+0.4000" in text
    # built outside a git repository: the page says so instead of inventing a revision
    assert "not a git repository" in text and metrics["git_revision"].startswith("not a git")


def test_git_revision_names_the_commit_and_says_when_the_tree_differs(tmp_path: Path):
    from stages.report import git_revision

    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    git = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True,  # noqa: E731
                                    env={**__import__("os").environ, **env})
    assert git_revision(tmp_path).startswith("not a git repository")
    git("init", "-q")
    (tmp_path / "params.yaml").write_text("a: 1\n")
    git("add", "params.yaml")
    git("commit", "-qm", "one")
    head = git("rev-parse", "HEAD").stdout.decode().strip()
    assert git_revision(tmp_path) == head
    (tmp_path / "params.yaml").write_text("a: 2\n")
    assert git_revision(tmp_path) == head + " + uncommitted changes"


def test_report_is_deterministic(built: Path, tmp_path: Path):
    ws = tmp_path / "again"
    shutil.copytree(built, ws, ignore=shutil.ignore_patterns("reports", "logs"))
    assert run_stage("report", _args(), ws).returncode == 0
    for name in ["index.html", *FIGURES]:
        assert (ws / "reports" / name).read_bytes() == (built / "reports" / name).read_bytes(), name


def test_report_fails_cleanly_on_a_missing_input(built: Path, tmp_path: Path):
    ws = tmp_path / "missing"
    shutil.copytree(built, ws, ignore=shutil.ignore_patterns("reports", "logs"))
    (ws / "models" / "v5_2" / "lineage.json").unlink()
    result = run_stage("report", _args(), ws)
    assert result.returncode == 2
    assert "models/v5_2/lineage.json does not exist" in result.stderr
    assert not (ws / "reports").exists()


# ------------------------------------------------------------------------ in a browser
def _chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    return path


def _browser(chromium: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                           "--disable-dev-shm-usage", "--hide-scrollbars", "--no-first-run",
                           f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=180)


def test_page_in_headless_chromium_names_every_version_and_shows_its_figures(built: Path,
                                                                             tmp_path: Path):
    from PIL import Image

    chromium = _chromium()
    url = (built / "reports" / "index.html").as_uri()
    dom = _browser(chromium, tmp_path / "profile", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = _Page()
    page.feed(dom.stdout)
    text = " ".join(page.text)
    for version in ["base", *VERSIONS]:
        assert version in text, f"{version} not on the rendered page"
    assert page.headings == ["KRX-Bench categories", "Accuracy against the baseline", "Accuracy per category",
                             "Data composition per version", "Training",
                             "Dev loss: each version against the base",
                             "What changed between versions", "Lineage",
                             "Generation funnel per domain", "LLM calls and cost"]
    for rendered in ["McNemar", "95% Wilson", "judged relevant", "hallucination 2", "+0.4000",
                     "git revision", "재무회계", "금융시장", "국내기업 분석", "주가 예측", "금융 에이전트",
                     "over 2 of 5", "majority class", "±5 pt needs"]:
        assert rendered in text, rendered
    assert sorted(page.images) == sorted(FIGURES)
    for src in page.images:                      # relative paths that resolve to real PNGs
        assert (built / "reports" / src).is_file()

    shot = tmp_path / "page.png"
    result = _browser(chromium, tmp_path / "profile", f"--screenshot={shot}",
                      "--window-size=1280,3200", url)
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 3200)
    colors = image.getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 50, "screenshot is blank"
    white = sum(n for n, c in colors if c == (255, 255, 255))
    assert white < 0.97 * image.size[0] * image.size[1]
    # the page's own CSS has no such blue: these pixels come from the rendered figures
    # (matplotlib's tab:blue bars of accuracy.png and tab20's first source of composition.png)
    blue = sum(n for n, c in colors if abs(c[0] - 31) < 8 and abs(c[1] - 119) < 8 and abs(c[2] - 180) < 8)
    assert blue > 500, f"figure colours not on the screenshot ({blue} px)"


def test_a_broken_figure_link_would_be_caught(built: Path, tmp_path: Path):
    """The figure check above is not vacuous: without the PNGs, the blue is gone."""
    from PIL import Image

    chromium = _chromium()
    copy = tmp_path / "reports"
    shutil.copytree(built / "reports", copy)
    for name in FIGURES:
        (copy / name).unlink()
    shot = tmp_path / "broken.png"
    _browser(chromium, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,3200",
             (copy / "index.html").as_uri())
    colors = Image.open(shot).convert("RGB").getcolors(maxcolors=1 << 20)
    blue = sum(n for n, c in colors if abs(c[0] - 31) < 8 and abs(c[1] - 119) < 8 and abs(c[2] - 180) < 8)
    assert blue < 50


# ------------------------------------------------------------------------ pure parts
def test_composition_stacks_tokens_by_source_per_version():
    manifests = {"v1": {"sources": {"b": {"tokens": 5}, "a": {"tokens": 7}}},
                 "v2": {"sources": {"c": {"tokens": 1}, "a": {"tokens": 2}}}}
    order, table = composition(manifests, ["v1", "v2"])
    assert order == ["a", "b", "c"]
    assert table == {"v1": {"a": 7, "b": 5}, "v2": {"a": 2, "c": 1}}


def test_accuracy_rows_compare_with_the_baseline():
    evals = {k: _eval_metrics(k) for k in ("base", "v1", "v2")}
    rows = accuracy_rows(evals, "base", ["v1", "v2"])
    assert [r["key"] for r in rows] == ["base", "v1", "v2"]
    assert [r["delta"] for r in rows] == [None, 0.05, -0.05]
    assert rows[1]["by_set"] == {"accounting_7": pytest.approx(0.2), "kmmlu_economics": 0.3}


def test_lineage_rows_follow_parent_mixture_and_source_hashes(tmp_path: Path):
    write_inputs(tmp_path)
    lineages = {v: json.loads((tmp_path / "models" / v / "lineage.json").read_text()) for v in VERSIONS}
    manifests = {v: json.loads((tmp_path / "data" / "mixtures" / f"{v}.json").read_text()) for v in VERSIONS}
    rows = {r["version"]: r for r in lineage_rows(lineages, manifests, VERSIONS)}
    assert rows["v3"]["parent"] == "v1" and rows["v1"]["parent"] is None
    assert rows["v5_3"]["mixture_sha256"] == _sha("mixture v5_3")
    assert [s[0] for s in rows["v5_3"]["sources"]] == ["mixture_v5_2", "report_summaries"]
    assert rows["v5_3"]["sources"][0][2] == _sha("mixture_v5_2 v5_3")
    html_text = render_html({"baseline": "base", "versions": VERSIONS,
                             "eval": {k: _eval_metrics(k) for k in ["base", *VERSIONS]},
                             "manifests": manifests, "lineage": lineages, "train": {}, "loss": {}},
                            list(FIGURES))
    assert _sha("mixture v5_3") in html_text and "mixture_v5_2" in html_text


def test_read_loss_tsv(tmp_path: Path):
    path = tmp_path / "loss.tsv"
    path.write_text("step\tloss\n2\t1.5\n1\t2.0\nbad\trow\n", encoding="utf-8")
    assert read_loss_tsv(path) == [(1.0, 2.0), (2.0, 1.5)]
    assert read_loss_tsv(tmp_path / "absent.tsv") == []


def test_dvc_yaml_report_covers_every_version_in_params():
    """The report reads five files per version; it depends on the directories holding them and
    gets the versions, in params.yaml's order, on its command line."""
    import shlex

    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        stage = next(s for s in repo.index.stages if s.addressing == "report")
        deps = {d.def_path for d in stage.deps}
        argv = shlex.split(stage.cmd)
    versions = list(load_raw(ROOT / "params.yaml")["versions"])
    assert versions == VERSIONS + ["v7"]  # the fixtures above use the first eight
    assert argv[argv.index("--versions") + 1:argv.index("--versions") + 1 + len(versions)] == versions
    for flag in ("--eval-dir", "--train-dir", "--mixtures-dir", "--models-dir", "--live-dir",
                 "--predictions-dir"):
        assert argv[argv.index(flag) + 1] in deps, flag


def test_wilson_interval_and_exact_mcnemar():
    from stages.report import mcnemar_exact, paired_comparison, wilson_interval

    low, high = wilson_interval(10, 40)
    assert (round(low, 4), round(high, 4)) == (0.1419, 0.4019)
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(0, 0) is None
    assert mcnemar_exact(12, 0) == 2 / 2 ** 12 and mcnemar_exact(2, 0) == 0.5
    assert mcnemar_exact(5, 5) == 1.0 and mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(3, 9) == mcnemar_exact(9, 3)
    version = {"a": True, "b": True, "c": False, "x": True}  # x: not scored by the baseline
    baseline = {"a": True, "b": False, "c": True}
    assert paired_comparison(version, baseline) == {"paired_items": 3, "gained": 1, "lost": 1,
                                                    "p_value": 1.0}


def test_only_a_significant_change_is_coloured(built: Path):
    page = (built / "reports" / "index.html").read_text(encoding="utf-8")
    table = page.split("<table class='accuracy'>")[1].split("</table>")[0]
    rows = {re.sub("<[^>]+>", "", row.split("</td>")[0]): row
            for row in table.split("<tr>") if "<td>" in row}
    assert "class='up'>+30.0" in rows["v6"] and "p=0.000488 (+12/−0 of 40)" in rows["v6"]
    assert "class=''>+5.0" in rows["v1"] and "p=0.5" in rows["v1"]  # 2 items: noise, plain
    assert "class=''>-5.0" in rows["v2"]
    assert "exact McNemar" in page and "Wilson" in page and "[14.2%, 40.2%]" in page
    assert "Accuracy per category" in page and "accounting_7/재무회계" in page
    metrics = json.loads((built / "metrics" / "report.json").read_text(encoding="utf-8"))
    assert metrics["significant_vs_baseline"] == ["v4", "v5_2", "v5_3", "v6"]  # v3: +4, p=0.125


def test_the_krx_bench_table_colours_only_tested_moves_and_shows_missing_categories(built: Path):
    """base gets q0-q9 right; v6 q0-q21: +10 items in 금융시장 (p = 0.002, coloured), +2 in
    주가 예측 (p = 0.5: noise, plain). Accounting, company and agent have no items: missing, and
    the average is over the two categories that have them."""
    page = (built / "reports" / "index.html").read_text(encoding="utf-8")
    table = page.split("<table class='krx'>")[1].split("</table>")[0]
    rows = {re.sub("<[^>]+>", "", row.split("</td>")[0]): row.split("</td>")[1:]
            for row in table.split("<tr>") if "<td>" in row}
    headers = table.split("</thead>")[0]
    assert headers.index("재무회계") < headers.index("금융시장") < headers.index("국내기업 분석") \
        < headers.index("주가 예측") < headers.index("금융 에이전트") < headers.index("average")
    assert "no items" in headers and "20 items" in headers and "±5 pt needs ≈" in headers
    v6 = rows["v6"]
    assert "class='up'>100.0%" in v6[1] and "p=0.00195 (+10/−0)" in v6[1] and "2-step" in v6[1]
    assert "class=''>10.0%" in v6[3] and "p=0.5 (+2/−0)" in v6[3] and "2-step" not in v6[3]
    assert all("missing" in v6[i] for i in (0, 2, 4))
    assert "55.0%" in v6[5] and "over 2 of 5" in v6[5]
    # open-ended: compared with the baseline only under the same judge
    assert "36.50" in v6[6] and "+9.00 vs baseline" in v6[6]
    assert "another judge than the baseline's: not compared" in rows["v5_1"][6]
    assert "judged by: chrF (sacrebleu 2.6.0" in page and "llm:gpt-4o-2024-08-06" in page
    assert "missing" in rows["majority class (always the most frequent key)"][0]
    assert "60.0%" in rows["majority class (always the most frequent key)"][1]
    metrics = json.loads((built / "metrics" / "report.json").read_text(encoding="utf-8"))
    assert metrics["best_krx_version"] == "v6" and metrics["best_krx_average"] == 0.55
    assert metrics["krx_average"]["base"] == 0.25


def test_each_version_is_compared_with_its_parent_or_the_first_version():
    from stages.report import version_diffs

    lineages = {"v1": {"parent": None, "params": {"init_from": "base", "lora": {"r": 8}}},
                "v3": {"parent": {"version": "v1"}, "params": {"init_from": "v1", "lora": {"r": 8}}},
                "v4": {"parent": None, "params": {"init_from": "base", "lora": {"r": 16}}}}
    manifests = {"v1": {"sources": {"krx_sample": {"examples": 12}}},
                 "v3": {"sources": {"krx_reports_json": {"examples": 2}}},
                 "v4": {"sources": {"krx_sample": {"examples": 6}, "qa_rules": {"examples": 14}}}}
    diffs = {d["version"]: d for d in version_diffs(lineages, manifests, ["v1", "v3", "v4"])}
    assert diffs["v1"]["against"] is None and diffs["v1"]["params"] == []
    assert (diffs["v3"]["against"], diffs["v3"]["why"]) == ("v1", "parent")
    assert diffs["v3"]["params"] == [("init_from", "base", "v1")]
    assert diffs["v3"]["data"] == [("krx_reports_json", None, 2), ("krx_sample", 12, None)]
    assert (diffs["v4"]["against"], diffs["v4"]["why"]) == ("v1", "first version")
    assert diffs["v4"]["params"] == [("lora.r", 8, 16)]
    assert diffs["v4"]["data"] == [("krx_sample", 12, 6), ("qa_rules", None, 14)]


def test_the_page_shows_what_changed(built: Path):
    page = (built / "reports" / "index.html").read_text(encoding="utf-8")
    table = page.split("<table class='changes'>")[1].split("</table>")[0]
    assert "v3</td><td>v1 (parent)" in table and "v4</td><td>v1 (first version)" in table
    assert "<code>lora.r</code>: 8 → 16" in table
