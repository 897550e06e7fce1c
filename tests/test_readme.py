"""The front door and the manual behind it: README.md stays short, its pipeline diagram stays
true to dvc.yaml, and every link and repository path the README and docs/ name exists in a
fresh clone."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

from stages.plan import stage_graph
from tests.conftest import ROOT

README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
# Backticked paths that a fresh clone does not hold, by design (the rule of the path test):
MADE_BY_A_RUN = ("data/collected", "data/generated", "data/mixtures", "data/eval", "data/judge",
                 "data/rejects", "data/llm_cache", "metrics", "logs", "reports", "dvclive",
                 "checkpoints", "exports", "dvc_plots", "quickstart", "quickstart-dvc-remote",
                 "models/base", "models/v", "dvc.lock", ".dvc/cache", ".dvc/tmp", ".venv",
                 "rehearsal-inputs", "/tmp/")
PRODUCTION_INPUTS = ("data/raw",)   # the team's inputs: `dvc add`ed in production, never committed
IN_HUB_REPOS = ("data/train-",)     # files inside a hub dataset repository, not this one


def test_the_readme_is_a_front_door():
    text = README.read_text(encoding="utf-8")
    assert len(text) <= 12_000, len(text)
    for needed in ("make quickstart", "make test", "```mermaid", "make check", "make plan",
                   "dvc metrics diff", "docs/"):
        assert needed in text, needed


def _mermaid_edges(text: str) -> tuple[set[str], set[tuple[str, str]]]:
    block = text.split("```mermaid", 1)[1].split("```", 1)[0]
    nodes, edges = set(), set()
    for line in block.splitlines():
        if not line.strip() or line.strip().startswith("flowchart"):
            continue
        ids = [re.match(r"\s*([A-Za-z_]+)", part).group(1) for part in line.split("-->") if part.strip()]
        nodes |= set(ids)
        edges |= set(zip(ids, ids[1:]))
    return nodes, edges


def _group_edges() -> tuple[set[str], set[tuple[str, str]]]:
    """dvc.yaml's stage groups (``filter@rules`` -> ``filter``) and which group reads what
    another writes."""
    graph = stage_graph(ROOT)
    writer = {out: name.split("@")[0] for name, (_, outs) in graph.items() for out in outs}
    edges = set()
    for name, (deps, _) in graph.items():
        for dep in deps:
            for out, group in writer.items():
                related = dep == out or dep.startswith(out + "/") or out.startswith(dep + "/")
                if related and group != name.split("@")[0]:
                    edges.add((group, name.split("@")[0]))
    return {name.split("@")[0] for name in graph}, edges


def test_the_pipeline_diagram_draws_every_stage_group_and_only_real_flows():
    nodes, edges = _mermaid_edges(README.read_text(encoding="utf-8"))
    groups, real = _group_edges()
    assert nodes == groups, (sorted(nodes - groups), sorted(groups - nodes))
    assert edges <= real, sorted(edges - real)
    sources = {"collect", "extract", "base_model"}  # read only what no stage writes (and the base)
    assert {b for _, b in edges} >= groups - sources, "a stage group without an incoming arrow"
    assert {a for a, _ in edges} >= groups - {"report"}, "a stage group without an outgoing arrow"


def _tracked() -> set[str]:
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.splitlines()
    dirs = {str(Path(f).parents[i]) for f in files for i in range(len(Path(f).parents) - 1)}
    return set(files) | dirs


def _named_paths(text: str) -> set[str]:
    """Backticked single tokens that look like repository paths."""
    found = set()
    for token in re.findall(r"`([^`\s]+)`", text):
        token = token.rstrip(".,:;")
        if re.search(r"[<>*{}$=|\\]|^\.\.|^https?:|^-", token) or not re.fullmatch(r"[\w.\-/]+", token):
            continue
        if "/" in token or re.search(r"\.(py|ya?ml|md|txt|json|jsonl|csv|toml|lock|html)$", token):
            found.add(token)
    return found


def test_every_link_and_repository_path_the_docs_name_exists_in_a_fresh_clone():
    tracked = _tracked()
    top = {p.split("/")[0] for p in tracked}
    missing = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)#\s]+)", text):  # markdown links
            if not re.match(r"https?:", target) and not (page.parent / target).exists():
                missing.append(f"{page.name}: link {target}")
        for path in _named_paths(text):
            clean = path.rstrip("/")
            if clean.startswith(MADE_BY_A_RUN + PRODUCTION_INPUTS + IN_HUB_REPOS):
                continue
            if clean.split("/")[0] not in top:
                continue  # not under the repository's root: a hub repo id (`Qwen/Qwen2-7B-Instruct`),
                # a path inside a collection or the workspace, a bare file name
            if clean not in tracked:
                missing.append(f"{page.name}: {path}")
    assert not missing, missing
