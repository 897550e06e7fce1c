"""scripts/quickstart.py without running the pipeline: the user's params edits are kept across
runs (three-way merge), the workspace is a git + DVC project with its remote beside it.
The whole quickstart, driven as a user would, is in tests/test_workflows.py."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from scripts.quickstart import (GENERATED, LEGACY_HEADER, ROOT, init_project, merge_user_params,
                                quickstart_params, remote_dir, write_params)

DVC = str(Path(sys.executable).parent / "dvc")


def test_keys_the_user_did_not_touch_follow_the_root_and_edited_ones_stay():
    base = {"a": 1, "b": {"c": 2, "d": 3}, "gone": 1, "list": [1, 2]}
    mine = {"a": 1, "b": {"c": 20, "d": 3}, "gone": 1, "list": [1, 2], "added": True}
    theirs = {"a": 10, "b": {"c": 2, "d": 30, "e": 4}, "list": [1, 2, 3]}
    merged, kept = merge_user_params(base, mine, theirs)
    assert merged == {"a": 10, "b": {"c": 20, "d": 30, "e": 4}, "list": [1, 2, 3], "added": True}
    assert kept == ["b.c", "added"]


def test_a_removed_key_stays_removed_and_a_conflict_keeps_the_users_value():
    base = {"x": {"lr": 1, "steps": 5}, "y": 1}
    mine = {"x": {"steps": 7}, "y": 1}  # removed lr, changed steps
    theirs = {"x": {"lr": 2, "steps": 6}, "y": 2}  # the root changed both too
    merged, kept = merge_user_params(base, mine, theirs)
    assert merged == {"x": {"steps": 7}, "y": 2}
    assert sorted(kept) == ["x.lr", "x.steps"]
    assert merge_user_params(base, base, theirs) == (theirs, [])  # nothing edited: the root's


def test_params_yaml_edits_survive_the_next_run_and_a_legacy_file_is_replaced(tmp_path):
    workspace = tmp_path / "quickstart"
    workspace.mkdir()
    assert write_params(ROOT, workspace) == []
    derived = quickstart_params(ROOT)
    path = workspace / "params.yaml"
    assert yaml.safe_load(path.read_text(encoding="utf-8")) == derived
    assert yaml.safe_load((workspace / GENERATED).read_text(encoding="utf-8")) == derived

    edited = yaml.safe_load(path.read_text(encoding="utf-8"))
    edited["versions"]["v4"]["train"]["max_steps"] = 3
    text = "# my notes\n" + yaml.safe_dump(edited, allow_unicode=True, sort_keys=False)
    path.write_text(text, encoding="utf-8")
    assert write_params(ROOT, workspace) == ["versions.v4.train.max_steps"]
    assert path.read_text(encoding="utf-8") == text  # same values: the file (and comment) untouched

    # a workspace from before: its params.yaml said "do not edit", so it is derived afresh
    (workspace / GENERATED).unlink()
    path.write_text(f"{LEGACY_HEADER}: params.yaml + …; do not edit\n" + yaml.safe_dump(edited),
                    encoding="utf-8")
    assert write_params(ROOT, workspace) == []
    assert yaml.safe_load(path.read_text(encoding="utf-8")) == derived


@pytest.mark.slow
def test_the_workspace_is_a_git_and_dvc_project_with_its_remote_beside_it(tmp_path):
    workspace = tmp_path / "qs"
    subprocess.run([DVC, "init", "--no-scm", "-q"], cwd=workspace.mkdir() or workspace, check=True)
    init_project(ROOT, workspace)  # a workspace made before issue 13 is turned into a git project
    assert (workspace / ".git").is_dir()
    config = (workspace / ".dvc" / "config").read_text(encoding="utf-8")
    assert "no_scm" not in config and f"url = {remote_dir(workspace)}" in config
    assert "html_template = ../configs/plots/offline.html" in config
    assert remote_dir(workspace) == tmp_path / "qs-dvc-remote"
    remote = subprocess.run([DVC, "remote", "default"], cwd=workspace, check=True,
                            capture_output=True, text=True).stdout.strip()
    assert remote == "storage"
    before = config
    init_project(ROOT, workspace)  # idempotent: nothing rewritten
    assert (workspace / ".dvc" / "config").read_text(encoding="utf-8") == before
    ignored = subprocess.run(["git", "check-ignore", "models/v1", "metrics/train/v1.json",
                              ".quickstart/params.generated.yaml", "data/llm_cache/x"],
                             cwd=workspace, capture_output=True, text=True).stdout.split()
    assert len(ignored) == 4


def test_make_alone_lists_the_users_commands_and_each_is_a_target():
    import subprocess
    shown = subprocess.run(["make", "-s"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    commands = [line.split()[1] for line in shown.splitlines() if line.startswith("make ")]
    assert commands == ["quickstart", "test", "check", "plan", "clean-quickstart", "venv"]
    for command in commands:  # a dry run: the target exists, nothing is executed
        subprocess.run(["make", "-n", command], cwd=ROOT, capture_output=True, check=True)


def test_the_summary_follows_the_data_flow_grouped_with_totals(tmp_path):
    from scripts.quickstart import summary
    written = {"report.json": {}, "eval/v1.json": {"items": 3, "accuracy": {"micro": 0.5}},
               "judge/v1.json": {"scored": 3, "score_mean": 40.0, "scale": "0-100", "judge": "chrF"},
               "train/v1.json": {"steps": 4}, "mix/v1.json": {"examples": 9, "rejects_by_reason": {"x": 2}},
               "solve/fm.json": {"pairs": 8}, "filter/fm.json": {"records": 5, "rejects_by_reason": {"a": 1}},
               "collect/b.json": {"records": 4}, "collect/a.json": {"records": 2, "rejected": 1},
               "extract/rules.json": {"pages": 3}}
    for rel, metrics in written.items():
        path = tmp_path / "metrics" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(metrics), encoding="utf-8")
    lines = summary(tmp_path).splitlines()
    names = [line.split()[0] for line in lines if line.split() and "@" in line.split()[0] or line.startswith("report")]
    assert names == ["collect@a", "collect@b", "extract@rules", "filter@fm", "solve@fm", "mix@v1",
                     "train@v1", "evaluate@v1", "judge@v1", "report"]
    groups = [line[3:] for line in lines if line.startswith("-- ")]
    assert groups == ["collect", "extract", "generation", "mix", "train", "evaluate", "report"]
    totals = {line.split()[1]: line.split() for line in lines if line.startswith("  total ")}
    assert totals["collect"][2:] == ["2", "stages", "1"] and totals["generation"][2:] == ["2", "stages", "1"]
    assert totals["evaluate"][2:] == ["2", "stages", "0"]
    assert any("open-ended 40.00/0-100 by chrF" in line for line in lines)
