"""stages.lineage on a small but real DVC project: a git repo whose dvc.lock was written by the
real `dvc repro` of stand-in collect/base/mix/train stages (same output layout and lineage.json /
manifest fields as stages/train.py and stages/mix.py, a few bytes instead of a model), so the
md5s the tool recomputes are checked against DVC's own."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages.common.text import file_sha256
from stages.lineage import dvc_md5, main, render, trace

ROOT = Path(__file__).resolve().parents[1]
DVC = str(Path(sys.executable).parent / "dvc")
ENV = dict(os.environ, PYTHONPATH=str(ROOT), GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.com",
           GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.com", DVC_NO_ANALYTICS="1")

# The stand-in producer: writes what train@/mix@ write that lineage reads, from params.yaml.
MAKE = r'''
import json, os, sys
import yaml
from stages.common.text import file_sha256
from stages.train import resolve_train

def write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(data if isinstance(data, bytes) else data.encode())

params = yaml.safe_load(open("params.yaml"))
kind, key = sys.argv[1], sys.argv[2]
if kind == "collect":
    write(f"data/collected/{key}.parquet", open(f"raw/{key}.txt", "rb").read() * 3)
elif kind == "base":
    write("models/base/base.json", json.dumps({"model": "tiny-test", "revision": "r0", "built": True}))
    write("models/base/tokenizer.json", '{"vocab": 64}')
elif kind == "mix":
    recipe = params["mix"][key]
    inputs = {name: {"path": path, "sha256": file_sha256(path)} for name, path in recipe["sources"].items()}
    out = f"data/mixtures/{key}.parquet"
    write(out, f"mixture {key} seed {recipe['seed']} " + json.dumps(inputs, sort_keys=True))
    write(f"data/mixtures/{key}.json", json.dumps({
        "version": key,
        "recipe": {"seed": recipe["seed"], "sources": {n: {"format": "prompt_answer", "fraction": 1.0}
                                                       for n in recipe["sources"]}},
        "mixture": {"path": out, "sha256": file_sha256(out), "examples": 3, "tokens": 42},
        "inputs": inputs, "tokenizer": {"path": "models/base", "vocab_size": 64}}, sort_keys=True))
elif kind == "train":
    spec = params["versions"][key]["train"]
    resolved = resolve_train(params["train_defaults"], spec, key)
    mixture, manifest = f"data/mixtures/{key}.parquet", f"data/mixtures/{key}.json"
    parent = None
    if resolved.parent:
        path = "models/" + spec["init_from"]
        parent = {"version": resolved.parent, "path": path,
                  "adapter_sha256": file_sha256(path + "/adapter_model.safetensors")}
    out = f"models/{key}"
    adapter = f"adapter {key} lr {resolved.sft.learning_rate} {file_sha256(mixture)} {parent}"
    write(f"{out}/adapter_model.safetensors", adapter)
    write(f"{out}/adapter_config.json", json.dumps({"r": resolved.lora.r}))
    write(f"{out}/lineage.json", json.dumps({
        "version": key,
        "base_model": {"model": "tiny-test", "revision": "r0", "resolved_revision": None, "built": True,
                       "path": "models/base", "base_json_sha256": file_sha256("models/base/base.json")},
        "parent": parent,
        "mixture": {"path": mixture, "sha256": file_sha256(mixture), "manifest": manifest,
                    "manifest_sha256": file_sha256(manifest)},
        "params": resolved.model_dump(),
        "adapter_sha256": file_sha256(f"{out}/adapter_model.safetensors")}, sort_keys=True))
'''

DVC_YAML = """
stages:
  collect:
    foreach: [metamath]
    do:
      cmd: {py} scripts/make_fake.py collect ${{item}}
      deps: [scripts/make_fake.py, "raw/${{item}}.txt"]
      outs: ["data/collected/${{item}}.parquet"]
  base:
    cmd: {py} scripts/make_fake.py base base
    deps: [scripts/make_fake.py]
    outs: [models/base]
  mix:
    foreach:
      v5_1: {{a: data/collected/metamath.parquet, b: data/collected/metamath.parquet}}
      v5_2: {{a: data/mixtures/v5_1.parquet, b: data/collected/qa_rules.parquet}}
      v5_3: {{a: data/mixtures/v5_2.parquet, b: data/generated/report_summaries.parquet}}
    do:
      cmd: {py} scripts/make_fake.py mix ${{key}}
      deps: [scripts/make_fake.py, "${{item.a}}", "${{item.b}}"]
      params: ["mix.${{key}}"]
      outs: ["data/mixtures/${{key}}.parquet", "data/mixtures/${{key}}.json"]
  train:
    foreach:
      v5_1: {{init_from: models/base}}
      v5_2: {{init_from: models/v5_1}}
      v5_3: {{init_from: models/v5_2}}  # as dvc.yaml writes models/${{item.train.init_from}}
    do:
      cmd: {py} scripts/make_fake.py train ${{key}}
      deps: [scripts/make_fake.py, "data/mixtures/${{key}}.parquet", "data/mixtures/${{key}}.json",
             models/base, "${{item.init_from}}"]
      params: ["versions.${{key}}.train", train_defaults]
      outs: ["models/${{key}}"]
"""


def run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)
    if check and done.returncode != 0:
        raise AssertionError(f"{cmd} failed: {done.stdout}\n{done.stderr}")
    return done


def lineage(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "stages.lineage", *args], cwd, check=False)


def cli(capsys, root: Path, *args: str) -> tuple[int, str, str]:
    """The CLI entry point in-process (exit code, stdout, stderr): no interpreter start-up."""
    with pytest.raises(SystemExit) as done:
        main([*args, "--root", str(root)])
    out = capsys.readouterr()
    return done.value.code, out.out, out.err


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A committed git + DVC project with v5_1 <- v5_2 <- v5_3 trained by `dvc repro`."""
    root = tmp_path_factory.mktemp("lineage") / "project"
    (root / "scripts").mkdir(parents=True)
    (root / "scripts/make_fake.py").write_text(MAKE, encoding="utf-8")
    (root / "raw").mkdir()
    (root / "raw/metamath.txt").write_text("1+1=2\n", encoding="utf-8")
    for path, text in (("data/collected/qa_rules.parquet", "rules qa\n"),
                       ("data/generated/report_summaries.parquet", "summaries\n")):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text, encoding="utf-8")
    real = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    params = {
        "train_defaults": real["train_defaults"],
        "versions": {"v5_1": {"train": {"init_from": "base"}},
                     "v5_2": {"train": {"init_from": "v5_1", "sft": {"learning_rate": 5.0e-5}}},
                     "v5_3": {"train": {"init_from": "v5_2"}}},
        "mix": {"v5_1": {"seed": 1, "sources": {"metamath": "data/collected/metamath.parquet"}},
                "v5_2": {"seed": 2, "sources": {"mixture_v5_1": "data/mixtures/v5_1.parquet",
                                                "qa_rules": "data/collected/qa_rules.parquet"}},
                "v5_3": {"seed": 3, "sources": {"mixture_v5_2": "data/mixtures/v5_2.parquet",
                                                "report_summaries": "data/generated/report_summaries.parquet"}}},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    (root / "dvc.yaml").write_text(DVC_YAML.format(py=sys.executable), encoding="utf-8")
    run(["git", "init", "-q"], root)
    run([DVC, "init", "-q"], root)
    run([DVC, "repro", "-q"], root)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-q", "-m", "train v5"], root)
    return root


@pytest.fixture()
def copy(project, tmp_path) -> Path:
    """A private copy of the project for a test that tampers with it."""
    target = tmp_path / "copy"
    shutil.copytree(project, target, symlinks=True)
    return target


def test_dir_md5_is_the_one_dvc_recorded(project):
    lock = yaml.safe_load((project / "dvc.lock").read_text(encoding="utf-8"))["stages"]
    out = lock["train@v5_3"]["outs"][0]
    assert out["md5"].endswith(".dir")
    assert dvc_md5(project / "models/v5_3") == out["md5"]
    dep = next(d for d in lock["mix@v5_2"]["deps"] if d["path"] == "data/mixtures/v5_1.parquet")
    assert dvc_md5(project / dep["path"]) == dep["md5"]


def test_v5_3_chain_has_three_levels_with_the_right_hashes(project):
    report = trace(project, "models/v5_3")
    assert report["consistent"], report["problems"]
    assert report["chain"] == ["v5_3", "v5_2", "v5_1"]
    models = {node["version"]: node for node in report["models"]}
    for version in ("v5_1", "v5_2", "v5_3"):
        node = models[version]
        adapter = file_sha256(str(project / f"models/{version}/adapter_model.safetensors"))
        assert node["adapter"]["sha256"] == node["adapter"]["recorded_sha256"] == adapter
        assert node["mixture"] == f"data/mixtures/{version}.parquet"
        lock = node["dvc_lock"]
        assert lock["stage"] == f"train@{version}"
        assert lock["outs"][f"models/{version}"]["same"] is True
        assert lock["params_match_lineage"] is True
        assert set(lock["params"]) == {f"versions.{version}.train", "train_defaults"}
    assert models["v5_2"]["params"]["sft"]["learning_rate"] == 5.0e-5
    assert models["v5_3"]["parent"]["version"] == "v5_2"
    assert models["v5_3"]["parent"]["recorded_adapter_sha256"] == models["v5_2"]["adapter"]["sha256"]
    assert models["v5_2"]["parent"]["adapter_sha256"] == models["v5_1"]["adapter"]["sha256"]
    assert models["v5_1"]["parent"] is None
    # mixtures: v5_3 <- mixture_v5_2 <- mixture_v5_1 <- metamath (produced by collect@metamath)
    mixtures = report["mixtures"]
    assert set(mixtures) == {f"data/mixtures/{v}.parquet" for v in ("v5_1", "v5_2", "v5_3")}
    v5_3 = mixtures["data/mixtures/v5_3.parquet"]
    assert v5_3["manifest_sha256"] == file_sha256(str(project / "data/mixtures/v5_3.json"))
    assert v5_3["inputs"]["mixture_v5_2"]["produced_by"] == "mix@v5_2"
    assert v5_3["inputs"]["report_summaries"]["produced_by"] is None
    metamath = mixtures["data/mixtures/v5_1.parquet"]["inputs"]["metamath"]
    assert metamath["sha256"] == file_sha256(str(project / "data/collected/metamath.parquet"))
    assert metamath["produced_by"] == "collect@metamath" and metamath["dvc_lock"]["same"] is True
    # git: the commit that last touched dvc.lock, unmodified; each model first committed there
    head = run(["git", "rev-parse", "HEAD"], project).stdout.strip()
    assert report["git"]["dvc_lock_commit"] == head and report["git"]["dvc_lock_modified"] is False
    assert all(node["dvc_lock"]["first_commit"] == head for node in report["models"])


def test_cli_text_and_json_round_trip(project):
    text = lineage(project, "models/v5_3")
    assert text.returncode == 0, text.stderr
    assert "chain: v5_3 -> v5_2 -> v5_1 -> base" in text.stdout
    assert "Result: consistent" in text.stdout
    as_json = lineage(project, "models/v5_3", "--json")
    assert as_json.returncode == 0
    report = json.loads(as_json.stdout)
    assert report == json.loads(json.dumps(trace(project, "models/v5_3")))
    assert render(report) == text.stdout.rstrip("\n")


def test_a_parent_adapter_changed_after_the_child_was_trained_breaks_the_chain(copy, capsys):
    (copy / "models/v5_1/adapter_model.safetensors").write_text("tampered", encoding="utf-8")
    code, out, err = cli(capsys, copy, "models/v5_3")
    assert code == 1
    assert "Result: BROKEN" in out and "chain is broken" in err
    code, out, _ = cli(capsys, copy, "models/v5_3", "--json")
    assert code == 1
    report = json.loads(out)
    assert report["consistent"] is False
    found = {(p["status"], p["subject"]) for p in report["problems"]}
    assert ("modified", "models/v5_1/adapter_model.safetensors") in found  # vs its lineage.json
    assert ("stale", "models/v5_1") in found                               # vs dvc.lock
    messages = " ".join(p["message"] for p in report["problems"])
    assert "the parent changed after the child was trained" in messages
    # v5_3's own links still hold: only the v5_1 level is named
    assert not any("v5_3" in p["subject"] for p in report["problems"])


def test_a_changed_source_file_is_reported_as_modified(copy):
    (copy / "data/generated/report_summaries.parquet").write_text("other\n", encoding="utf-8")
    report = trace(copy, "models/v5_3")
    assert not report["consistent"]
    assert [(p["status"], p["subject"]) for p in report["problems"]] == \
        [("modified", "data/generated/report_summaries.parquet")]
    # a source that a stage produced is also stale against that stage's dvc.lock entry
    (copy / "data/collected/metamath.parquet").write_text("2+2=5\n", encoding="utf-8")
    problems = [(p["status"], p["subject"]) for p in trace(copy, "models/v5_3")["problems"]]
    assert ("modified", "data/collected/metamath.parquet") in problems
    assert ("stale", "data/collected/metamath.parquet") in problems


def test_params_edited_after_training_is_a_warning_not_a_break(copy, capsys):
    params = yaml.safe_load((copy / "params.yaml").read_text(encoding="utf-8"))
    params["versions"]["v5_2"]["train"]["sft"]["learning_rate"] = 1.0e-3
    (copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    code, out, _ = cli(capsys, copy, "models/v5_3")
    assert code == 0
    assert "warning: params.yaml versions.v5_2.train changed since train@v5_2 ran" in out


def test_without_git_says_no_git_and_a_missing_model_is_a_usage_error(copy, capsys):
    shutil.rmtree(copy / ".git")
    code, out, err = cli(capsys, copy, "models/v5_2")
    assert code == 0, out + err
    assert "git: no git" in out
    assert "chain: v5_2 -> v5_1 -> base" in out
    code, _, err = cli(capsys, copy, "models/v9")
    assert code == 2 and "models/v9 has no lineage.json" in err
