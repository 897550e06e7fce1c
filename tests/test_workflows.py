"""The quickstart and the DVC workflows users come for, with the real ``make``, ``dvc`` and
``git`` CLIs (issues 1, 7 and 13).

One module-scoped fixture runs ``make quickstart QUICKSTART=<tmp>/quickstart`` — the command
the README gives, in a temp directory instead of the repository's ``quickstart/`` — with
``OPENAI_API_KEY`` set to a marker. The workspace it makes is a git + DVC project with a
default remote beside it, committed after the run; every test drives that workspace as a user
would (no hand-built copy): the quickstart checks come first, then the tests push, clone,
pull, change params, revert them, and kill runs.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from scripts.quickstart import GENERATED, ROOT, offline_env

pytestmark = pytest.mark.slow

DVC = str(Path(sys.executable).parent / "dvc")
KEY_MARKER = "sk-test-MARKER-4f1d9c2e7b0a6d35"


def run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, check: bool = True,
        timeout: int = 900) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n"
                             f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def project_env(project: Path) -> dict[str, str]:
    env = offline_env(project)
    env["OPENAI_API_KEY"] = KEY_MARKER
    return env


def dvc_status(project: Path) -> dict:
    return json.loads(run([DVC, "status", "--json"], project, project_env(project)).stdout or "{}")


def lock_outs(project: Path) -> dict[str, str]:
    """Every output path in dvc.lock → its md5 (data outputs only: cached ones)."""
    lock = yaml.safe_load((project / "dvc.lock").read_text(encoding="utf-8"))
    outs = {}
    for stage in lock["stages"].values():
        for out in stage.get("outs", []):
            outs[out["path"]] = out["md5"]
    return outs


def root_git_status() -> str:
    return run(["git", "status", "--porcelain", "--untracked-files=no"], ROOT).stdout


def run_quickstart(project: Path) -> subprocess.CompletedProcess:
    """``make quickstart`` as the README says, with the workspace in a temp directory."""
    return run(["make", "--no-print-directory", "quickstart", f"QUICKSTART={project}"], ROOT,
               project_env(project), timeout=1800)


def head(project: Path) -> str:
    return run(["git", "rev-parse", "HEAD"], project).stdout.strip()


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("workflows")
    project = base / "quickstart"
    (base / "root_status.txt").write_text(root_git_status(), encoding="utf-8")
    first = run_quickstart(project)
    (base / "quickstart.out").write_text(first.stdout, encoding="utf-8")
    (base / "quickstart.err").write_text(first.stderr, encoding="utf-8")
    return project


# ---------------------------------------------------------------------------- the quickstart
VERSIONS = ("v1", "v2", "v3", "v4", "v5_1", "v5_2", "v5_3", "v6", "v7")


def test_the_quickstart_runs_every_stage_offline(project):
    assert "Quickstart summary" in (project.parent / "quickstart.out").read_text(encoding="utf-8")
    # no third-party warning or progress bar among the stages' output (issue 13 §4): every
    # WARNING line left is a stage's own logger (`<stage>@<key>:`)
    output = [line for name in ("quickstart.out", "quickstart.err")
              for line in (project.parent / name).read_text(encoding="utf-8").splitlines()]
    noise = [line for line in output if re.search(r"Warning\b|warnings\.warn|kernels-community|"
                                                  r"it/s\]|examples/s\]|mtime may not", line)
             or (" WARNING " in line and not re.search(r" WARNING \w+(@\w+)?: ", line))]
    assert not noise, noise[:5]
    metrics = {p.relative_to(project / "metrics").with_suffix("").as_posix():
               json.loads(p.read_text(encoding="utf-8"))
               for p in (project / "metrics").rglob("*.json")}
    for source in ("kmmlu_economics", "kmmlu_accounting", "kmmlu_taxation", "metamath",
                   "enko_translation", "krx_sample", "qa_rules", "table_qa", "top100_companies",
                   "aihub_kozh", "aihub_econ_calc"):
        assert metrics[f"collect/{source}"]["records"] > 0, source
        assert (project / "data/collected" / f"{source}.parquet").is_file()
    assert metrics["collect/kmmlu_economics"]["duplicates_removed"] == 1  # planted in samples
    assert set(metrics["collect/kmmlu_economics"]["splits"]) == {"train", "dev", "test"}
    for collection in ("krx_reports", "financial_reports", "rules"):
        assert metrics[f"extract/{collection}"]["pages"] > 0, collection
        assert any((project / "data/collected" / f"{collection}_json").glob("*.json"))
    assert metrics["extract/krx_reports"]["files_rejected"] >= 1  # the planted broken PDF
    # generation per domain, eight mixtures, eight models, nine evaluations, the report
    for domain in ("financial_market", "accounting", "rules", "company"):
        assert metrics[f"solve/{domain}"]["pairs"] > 0, domain
        assert metrics[f"solve/{domain}"]["llm"]["calls"] == 0  # answered from recorded responses
    # company: the held-out company's question is verified, in questions.parquet, never paired
    assert metrics["company"]["chunks"]["test"] >= 1
    assert metrics["solve/company"]["by_split"]["test"] >= 1
    assert metrics["synthesize/company"]["rejects_by_reason"] == {
        "key_figure_not_in_chunk": 1, "ratio_mismatch": 1}   # the planted bad draws
    assert metrics["summarize"]["records"] > 0
    for version in VERSIONS:
        assert metrics[f"mix/{version}"]["examples"] > 0, version
        assert metrics[f"train/{version}"]["steps"] > 0, version
        assert (project / "models" / version / "lineage.json").is_file()
    for key in ("base",) + VERSIONS:
        assert metrics[f"eval/{key}"]["items"] > 0, key
        # the leaderboard's five categories, every one with items (the quickstart has a set for
        # each), and the open-ended answers scored offline by chrF
        bench = metrics[f"eval/{key}"]["krx_bench"]
        assert bench["averaged_over"] == 5 and all(c["items"] > 0 for c in bench["categories"].values())
        assert metrics[f"judge/{key}"]["scored"] == 8 and metrics[f"judge/{key}"]["judge"].startswith("chrF")
    assert (project / "reports" / "index.html").is_file()
    page = (project / "reports" / "index.html").read_text(encoding="utf-8")
    assert "KRX-Bench categories" in page and "주가 예측" in page and "judged by: chrF" in page


def test_the_workspace_is_a_git_project_committed_after_the_run(project):
    log = run(["git", "log", "--format=%s"], project).stdout.splitlines()
    assert log[0].startswith("quickstart run (repository at ") and len(log) == 2, log
    assert run(["git", "status", "--porcelain"], project).stdout == ""  # outputs are git-ignored
    tracked = set(run(["git", "ls-files"], project).stdout.splitlines())
    assert {"dvc.yaml", "dvc.lock", "params.yaml", "dvc.vars.yaml", ".dvc/config"} <= tracked
    assert not any(p.startswith(("data/collected/", "models/", "metrics/")) for p in tracked)
    assert f"Committed in {project} as " in (project.parent / "quickstart.out").read_text(encoding="utf-8")


def test_token_counts_are_qwen2s_continued_versions_train_on_new_data_v6_scored_in_two_steps(project):
    """Issue 14: models/base holds Qwen2's tokenizer (rebuilt offline) and the manifests count
    in it; v5_2/v5_3 replay at most 5% of their parent's mixture."""
    import math

    from transformers import AutoTokenizer

    from stages.common.io import read_records

    tokenizer = AutoTokenizer.from_pretrained(project / "models" / "base")
    assert len(tokenizer) == 151646
    assert tokenizer("Hello world", add_special_tokens=False).input_ids == [9707, 1879]
    for version in VERSIONS:
        manifest = json.loads((project / f"data/mixtures/{version}.json").read_text(encoding="utf-8"))
        assert manifest["tokenizer"]["name"].startswith("Qwen/Qwen2-7B-Instruct tokenizer, rebuilt offline")
        rows = read_records(project / f"data/mixtures/{version}.parquet")
        direct = sum(len(tokenizer.apply_chat_template(r["prompt"] + r["completion"], tokenize=True,
                                                       return_dict=True)["input_ids"]) for r in rows)
        assert manifest["mixture"]["tokens"] == direct, version
    for child, parent in (("v5_2", "v5_1"), ("v5_3", "v5_2")):
        parent_ids = {r["id"] for r in read_records(project / f"data/mixtures/{parent}.parquet")}
        replayed = [r for r in read_records(project / f"data/mixtures/{child}.parquet")
                    if r["id"] in parent_ids]
        assert len(replayed) <= math.ceil(0.05 * len(parent_ids)), child
        metrics = json.loads((project / f"metrics/mix/{child}.json").read_text(encoding="utf-8"))
        assert metrics["examples"] > len(replayed)  # the new data is the mixture
    # each version scored the way it answers: v6 trained on the two-step pairs
    formats = {v: json.loads((project / f"metrics/eval/{v}.json").read_text(encoding="utf-8"))
               for v in VERSIONS}
    assert {v for v, m in formats.items() if m["answer_format"] == "two_step"} == {"v6", "v7"}
    assert formats["v6"]["scored_as"] == "loglik, per category: two-step for accounting, financial_market; letter for the rest"
    assert "step-2 prompt with the generated solution" in formats["v6"]["scored_as_by_category"]["financial_market"]
    # per contest category (issue 23): the finance categories two-step, where the generated pairs
    # taught it (v7 through its parent v6), stock and agent with a letter
    for version in ("v6", "v7"):
        lineage = json.loads((project / f"models/{version}/lineage.json").read_text(encoding="utf-8"))
        assert lineage["formats_by_source"]["generated_financial_market"] == "two_step", version
        cats = formats[version]["krx_bench"]["categories"]
        assert cats["financial_market"]["two_step"] and cats["accounting"]["two_step"], version
        assert not cats["stock"]["two_step"] and not cats["agent"]["two_step"], version
        company = lineage["formats_by_source"].get("generated_company") == "two_step"
        assert cats["company"]["two_step"] == company, version
    assert not any(c["two_step"] for c in formats["v1"]["krx_bench"]["categories"].values())
    predictions = read_records(project / "data/eval/v6.parquet")
    for row in predictions:
        solved = json.loads(row["detail"]).get("solution") is not None
        assert solved == (row["contest_category"] in ("financial_market", "accounting")), row["id"]
        assert row["answer_format"] == ("two_step" if solved else "single_step")


def test_v7_trains_on_the_stock_train_split_and_never_on_its_test_split(project):
    """Issue 22: the stock questions reach v7's mixture (near-duplicate removal keeps them), the
    held-out split does not, and no training question's prices reach past the cutoff."""
    from stages.common.io import read_records

    params = yaml.safe_load((project / "params.yaml").read_text(encoding="utf-8"))
    cutoff = str(params["stock"]["krx"]["cutoff"])
    stock = read_records(project / "data/generated/stock/krx.parquet")
    by_split = {s: {r["id"]: r for r in stock if r["split"] == s} for s in ("train", "test")}
    assert by_split["train"] and by_split["test"]
    assert all(json.loads(r["meta"])["target_date"] < cutoff for r in by_split["train"].values())
    manifest = json.loads((project / "data/mixtures/v7.json").read_text(encoding="utf-8"))
    source = manifest["sources"]["stock_krx"]
    assert source["examples"] == len(by_split["train"]) and source["near_duplicates"] == 0
    assert source["held_out_test_records"] == len(by_split["test"])
    prompts = {r["prompt"][0]["content"] for r in read_records(project / "data/mixtures/v7.parquet")
               if r["source"] == "stock_krx"}
    assert len(prompts) == len(by_split["train"])
    assert not any(r["question"] in p for r in by_split["test"].values() for p in prompts)


def test_v7_takes_the_company_pairs_and_no_mixture_carries_the_held_out_company(project):
    """Issue 22 §4: the training companies' verified questions reach v7 as pairs; the held-out
    company's question is only in questions.parquet (test split); no mixture names it (its
    profile and a table question about it leave v6, and so v7's replay of v6)."""
    from stages.common.io import read_records

    params = yaml.safe_load((project / "params.yaml").read_text(encoding="utf-8"))
    held = params["company"]["held_out"][0]
    questions = read_records(project / "data/generated/company/questions.parquet")
    pairs = read_records(project / "data/generated/company/pairs.parquet")
    test_ids = {q["id"] for q in questions if q["split"] == "test"}
    assert test_ids and not test_ids & {json.loads(p["meta"])["question_id"] for p in pairs}
    v7 = json.loads((project / "data/mixtures/v7.json").read_text(encoding="utf-8"))
    assert v7["sources"]["generated_company"]["examples"] > 0
    v6 = json.loads((project / "data/mixtures/v6.json").read_text(encoding="utf-8"))
    assert v6["sources"]["top100_companies"]["held_out_company_records"] == 1
    assert v6["sources"]["table_qa"]["held_out_company_records"] >= 1   # a question about it too
    core = held.split("(")[0]
    for version in ("v6", "v7"):
        texts = [m["content"] for r in read_records(project / f"data/mixtures/{version}.parquet")
                 for m in r["prompt"] + r["completion"]]
        assert not any(core in t for t in texts), version


def test_the_tiny_model_learns_and_continued_versions_start_from_their_parent(project):
    """Issue 14 §2, on the pretrained tiny base through the QLoRA path: every root version's
    last logged training loss is at most 85% of its first; each continued version starts
    (before step 1) where its parent ended: the same loss on the examples the parent measured
    its end loss on; evaluate's dev loss of every version is below the base's on that version's
    own dev split."""
    import csv

    params = yaml.safe_load((project / "params.yaml").read_text(encoding="utf-8"))
    base = json.loads((project / "metrics/base_model.json").read_text(encoding="utf-8"))
    assert base["pretrain"]["loss_last"] < 0.5 * base["pretrain"]["loss_first"]
    for version in VERSIONS:
        with (project / f"dvclive/train/{version}/plots/metrics/loss.tsv").open(encoding="utf-8") as f:
            losses = [float(row["loss"]) for row in csv.DictReader(f, delimiter="\t")]
        train = json.loads((project / f"metrics/train/{version}.json").read_text(encoding="utf-8"))
        if params["versions"][version]["train"]["init_from"] == "base":
            assert len(losses) >= 3 and losses[-1] <= 0.85 * losses[0], (version, losses)
            assert train["start_loss_base"] is None
        else:  # on the examples its parent measured its end loss on, it starts there
            assert train["start_loss_on_parent"] == pytest.approx(train["parent_end_loss"], rel=0.02), \
                (version, train)
            assert train["start_loss"] != train["start_loss_base"]  # the parent's adapter, not the base
        dev = json.loads((project / f"metrics/eval/{version}.json").read_text(encoding="utf-8"))["dev_loss"]
        assert dev["examples"] >= 1 and dev["model"] < dev["base"], (version, dev)


def test_a_second_quickstart_recomputes_nothing_and_leaves_the_repository_untouched(project):
    lock, commit = (project / "dvc.lock").read_text(encoding="utf-8"), head(project)
    second = run_quickstart(project)
    assert "Running stage" not in second.stdout + second.stderr
    assert (project / "dvc.lock").read_text(encoding="utf-8") == lock
    assert dvc_status(project) == {}
    assert head(project) == commit and "Nothing new to commit" in second.stdout
    # params.yaml, dvc.yaml … of the repository itself are untouched
    assert root_git_status() == (project.parent / "root_status.txt").read_text(encoding="utf-8")


def test_make_plan_after_the_quickstart_has_nothing_to_pay(project):
    """Every LLM stage is up to date, and even forced each first draw is in its cache: the
    plan's cache keys are the client's (issue 15)."""
    proc = run([sys.executable, "-m", "stages.plan", "--json"], project, env=project_env(project))
    plan = json.loads(proc.stdout)
    assert plan["total"]["uncached"] == 0 and plan["total"]["usd_online"] == 0
    assert not any(r["runs"] for r in plan["rows"])
    judged = [r for r in plan["rows"] if r["stage"].startswith("judge@")]
    rows = [r for r in plan["rows"] if not r["stage"].startswith("judge@")]
    assert len(rows) == 15 and all(r["requests"] == r["cached"] > 0 for r in rows), rows
    # the quickstart's judge is chrF: ten judge@ rows that would ask nothing
    assert len(judged) == 10 and all(r["requests"] == 0 and "no LLM call" in r["basis"] for r in judged)


def test_default_remote_lies_outside_the_work_tree(project):
    url = run([DVC, "remote", "list"], project).stdout.split()
    assert url[0] == "storage" and "(default)" in url
    remote = Path(url[1]).resolve()
    assert remote == (project.parent / "quickstart-dvc-remote").resolve()
    assert project.resolve() not in remote.parents


def test_push_clone_pull_gives_a_clean_tree_and_nothing_to_rerun(project):
    env = project_env(project)
    run([DVC, "push"], project, env)
    clone = project.parent / "clone"
    run(["git", "clone", "-q", str(project), str(clone)], project.parent)
    run([DVC, "pull"], clone, project_env(clone))
    assert dvc_status(clone) == {}
    dry = run([DVC, "repro", "--dry"], clone, project_env(clone)).stdout
    assert "Running stage" not in dry, dry
    for path, md5 in lock_outs(project).items():
        assert (clone / path).exists(), path
    llm_caches = [p for p in lock_outs(project) if p.startswith("data/llm_cache/")]
    for path in llm_caches:  # the response cache travels too: a teammate's re-run is free
        if path.startswith("data/llm_cache/judge/"):  # chrF in the quickstart: no answer, a note
            assert "no LLM call" in (clone / path / "README.txt").read_text(encoding="utf-8"), path
            continue
        assert any((clone / path).rglob("*.json")), path


def test_no_file_anywhere_contains_the_api_key(project):
    remote = project.parent / "quickstart-dvc-remote"
    places = [project, remote]
    marker = KEY_MARKER.encode()
    leaks = []
    for place in places:
        for path in place.rglob("*"):
            if path.is_file() and ".git" not in path.relative_to(place).parts[:1]:
                if marker in path.read_bytes():
                    leaks.append(str(path))
    assert leaks == []


def _wait_for(predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError("timed out waiting")


SLOW_STAGE = "evaluate@v1"  # long enough (model load + scoring) to be caught mid-run


def test_second_repro_gets_the_lock_error_and_a_killed_repro_leaves_nothing_half_done(project):
    env = project_env(project)
    before = lock_outs(project)
    log = project.parent / "repro.log"
    with open(log, "w") as handle:
        first = subprocess.Popen([DVC, "repro", "-f", "-s", SLOW_STAGE], cwd=project, env=env,
                                 stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for(lambda: "Running stage" in log.read_text())
        second = run([DVC, "repro"], project, env, check=False)
        assert second.returncode != 0
        assert "lock" in (second.stdout + second.stderr).lower()
        os.killpg(first.pid, signal.SIGKILL)
    finally:
        first.wait(timeout=60)
    # nothing half-written was recorded: the re-run completes and gives the same bytes
    run([DVC, "repro"], project, env)
    data = lambda outs: {p: m for p, m in outs.items() if p.startswith("data/")}  # noqa: E731
    assert data(lock_outs(project)) == data(before)  # timings in logs/metrics may differ
    assert dvc_status(project) == {}


# ---------------------------------------------------------------------------- only what changed
def stale_stages(project: Path) -> set[str]:
    """Stages a ``dvc repro`` would run: those ``dvc status`` reports changed (params, deps)
    and every stage downstream of them in DVC's own graph (``dvc repro --dry`` cannot know
    whether a changed stage's outputs will change, so it lists only the first ones)."""
    import networkx as nx
    from dvc.repo import Repo

    changed = set(dvc_status(project))
    with Repo(str(project)) as repo:
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        names = {stage: stage.name for stage in graph.nodes}  # addressing is cwd-relative
        hit = [stage for stage in graph.nodes if names[stage] in changed]
        return {names[stage] for stage in graph.nodes
                if any(nx.has_path(graph, stage, target) for target in hit)}


def edit_params(project: Path, change) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text(encoding="utf-8"))
    change(params)
    (project / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True, sort_keys=False),
                                         encoding="utf-8")


def users_of(params: dict, generated: str) -> dict[str, set[str]]:
    """Mixtures that read ``generated`` directly or through a parent mixture (``mixture_<v>``),
    and the versions to retrain: those mixtures' versions and their chained children."""
    recipes = {v: spec["mix"] for v, spec in params["versions"].items()}
    mixes = {v for v, recipe in recipes.items() if generated in recipe["sources"]}
    while True:
        more = {v for v, recipe in recipes.items()
                if any(f"mixture_{m}" in recipe["sources"] for m in mixes)}
        if more <= mixes:
            break
        mixes |= more
    trained = set(mixes)
    while True:
        more = {v for v, spec in params["versions"].items() if spec["train"]["init_from"] in trained}
        if more <= trained:
            break
        trained |= more
    return {"mix": mixes, "train": trained}


def test_a_training_param_of_v4_makes_only_its_training_evaluation_and_report_stale(project):
    try:
        edit_params(project, lambda p: p["versions"]["v4"]["train"].setdefault("lora", {}).update(r=4))
        assert stale_stages(project) == {"train@v4", "evaluate@v4", "judge@v4", "report"}
    finally:
        run(["git", "checkout", "params.yaml"], project)
    assert dvc_status(project) == {}


def test_the_judge_criteria_of_a_domain_reach_exactly_the_versions_that_use_it(project):
    params = yaml.safe_load((project / "params.yaml").read_text(encoding="utf-8"))
    users = users_of(params, "generated_financial_market")
    assert "v6" in users["mix"] and "v1" not in users["train"]
    expected = {f"{stage}@financial_market" for stage in ("filter", "transform", "synthesize", "solve")}
    expected |= {f"mix@{v}" for v in users["mix"]} | {f"train@{v}" for v in users["train"]}
    expected |= {f"{stage}@{v}" for v in users["train"] for stage in ("evaluate", "judge")} | {"report"}
    try:
        edit_params(project, lambda p: p["filter"]["financial_market"].update(
            criteria=p["filter"]["financial_market"]["criteria"] + " 파생상품 포함."))
        assert stale_stages(project) == expected
    finally:
        run(["git", "checkout", "params.yaml"], project)


# ---------------------------------------------------------------------------- edits and reverts
def repro_output(project: Path, check: bool = True) -> str:
    done = run([DVC, "repro"], project, project_env(project), check=check, timeout=1800)
    return done.stdout + done.stderr


def ran(output: str, prefix: str) -> list[str]:
    return re.findall(rf"Running stage '({prefix}[^']*)'", output)


def restore(project: Path, commit: str) -> None:
    run(["git", "reset", "-q", "--hard", commit], project)
    run([DVC, "checkout", "-f"], project, project_env(project))
    assert dvc_status(project) == {}


def test_a_user_edit_survives_make_quickstart_and_its_revert_comes_back_from_the_run_cache(project):
    """Issue 13 §1 + §2: the next `make quickstart` keeps an edited knob (and commits the run);
    reverting it restores train/evaluate from DVC's run-cache: no training step."""
    commit = head(project)
    try:
        edit_params(project, lambda p: p["versions"]["v4"]["train"].setdefault("lora", {}).update(r=4))
        edited = run_quickstart(project)
        assert "kept your edits to" in edited.stdout and "versions.v4.train.lora.r" in edited.stdout
        assert ran(edited.stdout + edited.stderr, "train@") == ["train@v4"]
        params = yaml.safe_load((project / "params.yaml").read_text(encoding="utf-8"))
        assert params["versions"]["v4"]["train"]["lora"]["r"] == 4
        assert head(project) != commit and dvc_status(project) == {}  # the run was committed
        model = (project / "models/v4/adapter_model.safetensors").read_bytes()

        run(["git", "checkout", commit, "--", "params.yaml"], project)  # the revert
        output = repro_output(project)
        # no training, no scoring: only judge@v4 runs again — DVC keeps no run-cache for a stage
        # with a persistent out (its response cache), and it scores the restored answers again,
        # from that cache or offline (chrF), without a paid call — and the report after it (the
        # judge's metrics hold its timing, so the report's inputs differ from the cached run's)
        assert ran(output, "") == ["judge@v4", "report"], output[-3000:]
        for stage in ("train@v4", "evaluate@v4"):
            assert f"Stage '{stage}' is cached - skipping run, checking out outputs" in output
        judged = json.loads((project / "metrics/judge/v4.json").read_text(encoding="utf-8"))
        assert (judged["llm"] or {}).get("calls", 0) == 0
        assert dvc_status(project) == {}
        assert (project / "models/v4/adapter_model.safetensors").read_bytes() != model
        lock = yaml.safe_load((project / "dvc.lock").read_text(encoding="utf-8"))
        original = yaml.safe_load(run(["git", "show", f"{commit}:dvc.lock"], project).stdout)
        for stage in ("train@v4", "evaluate@v4"):  # the very outputs of the first run, metrics too
            assert lock["stages"][stage]["outs"] == original["stages"][stage]["outs"], stage
    finally:
        restore(project, commit)


def test_after_a_params_typo_fails_a_run_fixing_it_restores_instead_of_retraining(project):
    commit = head(project)
    try:
        edit_params(project, lambda p: p["train_defaults"]["sft"].update(
            lerning_rate=p["train_defaults"]["sft"].pop("learning_rate")))
        failed = run([DVC, "repro"], project, project_env(project), check=False, timeout=1800)
        assert failed.returncode != 0 and "lerning_rate" in failed.stdout + failed.stderr
        broken = ran(failed.stdout + failed.stderr, "train@")
        assert len(broken) == 1 and not (project / "models" / broken[0][6:]).exists()  # DVC removed it

        run(["git", "checkout", "params.yaml"], project)  # the fix
        output = repro_output(project)
        assert ran(output, "") == [], output[-3000:]
        assert f"Stage '{broken[0]}' is cached - skipping run, checking out outputs" in output
        assert (project / "models" / broken[0][6:] / "adapter_model.safetensors").is_file()
        assert dvc_status(project) == {}
    finally:
        restore(project, commit)


def test_dvc_plots_show_writes_the_offline_page(project):
    run([DVC, "plots", "show"], project, project_env(project))
    page = (project / "dvc_plots" / "index.html").read_text(encoding="utf-8")
    assert "cdn.jsdelivr" not in page and "vegaEmbed" in page and "train_loss" in page
    assert "dvc_plots" not in run(["git", "status", "--porcelain"], project).stdout  # ignored


# ---------------------------------------------------------------------------- experiments
def test_dvc_exp_run_of_one_versions_lora_rank_is_listed(project):
    """The rank the edit test above already trained: the experiment comes from the run-cache."""
    env = project_env(project)
    try:
        run([DVC, "exp", "run", "-S", "+versions.v4.train.lora.r=4", "--name", "v4-rank4"], project, env,
            timeout=1800)
        shown = json.loads(run([DVC, "exp", "show", "--json"], project, env).stdout)
        text = json.dumps(shown)
        assert "v4-rank4" in text
        assert run([DVC, "exp", "show", "--csv"], project, env).stdout.count("v4-rank4") == 1
        # the README's narrowed table: just the experiment's param and v4's metrics
        keep = (r"Experiment|Created|versions\.v4\.train\.lora\.r|"
                r"metrics/(train|eval)/v4\.json:(final_loss|accuracy\.micro|dev_loss\.model)")
        assert f"--drop '.*' --keep '{keep}'" in (ROOT / "README.md").read_text(encoding="utf-8")
        table = run([DVC, "exp", "show", "--md", "--drop", ".*", "--keep", keep], project, env).stdout
        cells = [[c.strip() for c in line.strip().strip("|").split("|")]
                 for line in table.splitlines() if line.startswith("|")]
        assert sorted(cells[0]) == sorted(
            ["Experiment", "Created", "versions.v4.train.lora.r", "metrics/train/v4.json:final_loss",
             "metrics/eval/v4.json:accuracy.micro", "metrics/eval/v4.json:dev_loss.model"])
        (ours,) = [row for row in cells if "v4-rank4" in row[0]]
        assert ours[cells[0].index("versions.v4.train.lora.r")] == "4"
        assert float(ours[cells[0].index("metrics/eval/v4.json:dev_loss.model")]) > 0
    finally:
        run(["git", "checkout", "params.yaml", "dvc.lock"], project)
        run([DVC, "checkout", "-f"], project, env, check=False)


# ---------------------------------------------------------------------------- diffs and lineage
def test_params_and_metrics_diff_between_two_revisions(project):
    env = project_env(project)
    params = yaml.safe_load((project / "params.yaml").read_text(encoding="utf-8"))
    before_examples = json.loads((project / "metrics/mix/v4.json").read_text())["examples"]
    source = next(iter(params["versions"]["v4"]["mix"]["sources"]))
    edit_params(project, lambda p: p["versions"]["v4"]["mix"]["sources"][source].update(fraction=0.5))
    run([DVC, "repro"], project, env, timeout=1800)
    run(["git", "add", "params.yaml", "dvc.lock"], project)  # metrics are DVC's (cached outs)
    run(["git", "commit", "-q", "-m", "v4: half of its source"], project)

    params_diff = json.loads(run([DVC, "params", "diff", "HEAD~1", "--json"], project, env).stdout)
    changed = params_diff["params.yaml"]
    fraction = changed[f"versions.v4.mix.sources.{source}.fraction"]
    assert (fraction["old"], fraction["new"]) == (None, 0.5)  # the code default was 1.0
    assert not any(k.startswith(("versions.v1", "train_defaults", "filter.")) for k in changed)

    metrics_diff = json.loads(run([DVC, "metrics", "diff", "HEAD~1", "--json"], project, env).stdout)
    examples = metrics_diff["metrics/mix/v4.json"]["examples"]
    assert examples["old"] == before_examples and examples["new"] < before_examples
    assert "metrics/mix/v1.json" not in metrics_diff  # unchanged versions are not in the diff
    assert any(path.startswith("metrics/train/v4") for path in metrics_diff)


def test_lineage_traces_v5_3_through_three_levels(project):
    result = run([sys.executable, "-m", "stages.lineage", "models/v5_3", "--json"], project,
                 dict(project_env(project), PYTHONPATH=str(project)))
    report = json.loads(result.stdout)
    text = json.dumps(report)
    for version in ("v5_3", "v5_2", "v5_1"):
        assert f"models/{version}" in text
    assert "data/mixtures/v5_3.json" in text
