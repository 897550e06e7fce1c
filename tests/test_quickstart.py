"""The quickstart end to end with the real dvc CLI: everything runs offline, the second run
recomputes nothing, dvc status is clean, and the repository's tracked files are untouched."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.quickstart import ROOT

pytestmark = pytest.mark.slow


def git_status() -> str:
    return subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                          capture_output=True, text=True, check=True).stdout


def run_quickstart(workspace: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/quickstart.py", "--workspace", str(workspace)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)


def test_quickstart_runs_everything_then_is_a_noop(tmp_path):
    before = git_status()
    workspace = tmp_path / "qs"
    first = run_quickstart(workspace)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "Quickstart summary" in first.stdout

    metrics = {p.relative_to(workspace / "metrics").with_suffix("").as_posix():
               json.loads(p.read_text(encoding="utf-8"))
               for p in (workspace / "metrics").rglob("*.json")}
    for source in ("kmmlu_economics", "kmmlu_accounting", "kmmlu_taxation", "metamath",
                   "enko_translation", "krx_sample", "qa_rules", "table_qa", "top100_companies",
                   "aihub_kozh", "aihub_econ_calc"):
        assert metrics[f"collect/{source}"]["records"] > 0, source
        assert (workspace / "data/collected" / f"{source}.parquet").is_file()
    assert metrics["collect/kmmlu_economics"]["duplicates_removed"] == 1  # planted in samples
    assert set(metrics["collect/kmmlu_economics"]["splits"]) == {"train", "dev", "test"}
    for collection in ("krx_reports", "financial_reports", "rules"):
        assert metrics[f"extract/{collection}"]["pages"] > 0, collection
        assert any((workspace / "data/collected" / f"{collection}_json").glob("*.json"))
    assert metrics["extract/krx_reports"]["files_rejected"] >= 1  # the planted broken PDF

    # the whole pipeline ran: generation per domain, eight mixtures, eight models, nine evaluations
    versions = ("v1", "v2", "v3", "v4", "v5_1", "v5_2", "v5_3", "v6")
    for domain in ("financial_market", "accounting", "rules"):
        assert metrics[f"solve/{domain}"]["pairs"] > 0, domain
        assert metrics[f"solve/{domain}"]["llm"]["calls"] == 0  # answered from recorded responses
    assert metrics["summarize"]["records"] > 0
    for version in versions:
        assert metrics[f"mix/{version}"]["examples"] > 0, version
        assert metrics[f"train/{version}"]["steps"] > 0, version
        assert (workspace / "models" / version / "lineage.json").is_file()
    for key in ("base",) + versions:
        assert metrics[f"eval/{key}"]["items"] > 0, key
    assert (workspace / "reports" / "index.html").is_file()

    lock = (workspace / "dvc.lock").read_text(encoding="utf-8")
    second = run_quickstart(workspace)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Running stage" not in second.stdout + second.stderr
    assert (workspace / "dvc.lock").read_text(encoding="utf-8") == lock
    status = subprocess.run([Path(sys.executable).parent / "dvc", "status", "--json"],
                            cwd=workspace, capture_output=True, text=True, check=True)
    assert json.loads(status.stdout) == {}
    assert git_status() == before  # params.yaml, dvc.yaml … untouched
