"""Re-record the quickstart's LLM responses from an authored answers file.

    python scripts/record_llm.py <stage> [<key>] [--workspace DIR] [--answers FILE]

Contract (for every stage module that calls the LLM layer, :mod:`stages.common.llm`):

- **Answers file**: ``data/samples/llm_answers/<stage>.<key>.yaml`` (a stage without a
  key, e.g. summarize: ``<stage>.yaml``), first lines include
  ``# Answers written for this repository by hand (not model output)``, body
  ``answers: {<item_id>: [<draw 0>, <draw 1>, …]}``. ``item_id`` is the
  ``LLMRequest.item_id`` the stage uses; a draw is the JSON object the response model
  validates (see ``scripts/replay_server.py`` for how draws map to sample / re-ask indexes).
- **What the stage must offer**: the dvc.yaml stage ``<stage>@<key>`` (or ``<stage>``) runs
  ``python -m stages.<stage> … --cache-dir DIR``; the module accepts ``--params FILE``
  (default ``params.yaml``) and reads its LLM settings from ``llm_defaults`` merged under the
  ``llm`` block of its params section (``<stage>.<key>.llm``, or ``<stage>.llm`` for a stage
  without keys); and it sets ``item_id`` on every request.
- **What the tool does**: prepares the quickstart workspace (``scripts/quickstart.py``'s
  layout, default ``quickstart/``, seeding every recorded cache), builds the stage's
  upstream stages there with ``dvc repro`` (upstream LLM stages answer offline from their
  recorded caches, so record them first), then runs the stage's own command — output paths
  redirected to ``<workspace>/.record_llm/<stage>/<key>/`` so the workspace's DVC outputs are
  untouched — online against :class:`scripts.replay_server.ReplayServer`, with a params file
  whose ``llm`` block says ``offline: false`` and ``base_url`` = the replay server, and
  ``--cache-dir`` = a fresh directory. ``OPENAI_API_KEY`` is a placeholder (never a real key).
- **Checks**: every request must have an authored answer (otherwise it fails listing the
  missing items and changes nothing); answers never asked are listed as stale (a warning).
  The stage is then run again *offline* from the new cache and its data outputs must be
  byte-identical to the online run's (the round trip the quickstart relies on).
- **Result**: the new cache replaces ``data/samples/llm_cache/<stage>/<key>/`` (summarize:
  ``data/samples/llm_cache/<stage>/``), which is committed; ``scripts/quickstart.py`` seeds
  the workspace's ``data/llm_cache/…`` from it and runs the LLM stages offline. Re-run the
  tool whenever a prompt template, the response model or the quickstart inputs change
  (the cache key covers messages and schema, so stale entries simply stop matching).

Without ``<key>`` for a ``foreach`` stage group, every key that has an answers file is recorded.
Exit status: 0 recorded, 1 a check failed (missing or malformed answers, stage failure,
offline re-run differs), 2 bad usage (unknown stage, no answers file for any key).
"""
from __future__ import annotations

import argparse
import filecmp
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python scripts/record_llm.py`
    sys.path.insert(0, str(ROOT))

from scripts.quickstart import DVC, offline_env, prepare_workspace  # noqa: E402
from stages.common.params import read_yaml  # noqa: E402
from scripts.replay_server import AnswersFileError, ReplayServer, load_answers  # noqa: E402

ANSWERS_DIR = Path("data/samples/llm_answers")
RECORDED_DIR = Path("data/samples/llm_cache")
SCRATCH = ".record_llm"
PLACEHOLDER_KEY = "replay-placeholder-not-a-key"


class RecordError(Exception):
    """A check failed; the message says which and what to do."""


def answers_path(root: Path, stage: str, key: str | None) -> Path:
    return root / ANSWERS_DIR / (f"{stage}.{key}.yaml" if key else f"{stage}.yaml")


def recorded_dir(root: Path, stage: str, key: str | None) -> Path:
    return root / RECORDED_DIR / stage / key if key else root / RECORDED_DIR / stage


def _stages(workspace: Path) -> list[Any]:
    from dvc.repo import Repo
    with Repo(str(workspace)) as repo:
        return list(repo.index.stages)


def resolve_targets(workspace: Path, root: Path, stage: str, key: str | None) -> list[str | None]:
    """Keys to record: ``[key]``, ``[None]`` for a stage without keys, or every key of the
    foreach group that has an answers file."""
    names = {s.name for s in _stages(workspace)}
    if key is not None:
        if f"{stage}@{key}" not in names:
            raise RecordError(f"no dvc.yaml stage {stage}@{key}")
        return [key]
    if stage in names:
        return [None]
    keys = sorted(n.split("@", 1)[1] for n in names if n.startswith(f"{stage}@"))
    if not keys:
        raise RecordError(f"no dvc.yaml stage {stage} or {stage}@<key>")
    with_answers = [k for k in keys if answers_path(root, stage, k).is_file()]
    if not with_answers:
        raise RecordError(f"no answers file for any of {stage}@{keys} under {ANSWERS_DIR}")
    return with_answers


def _covers(out: str, dep: str) -> bool:
    return dep == out or dep.startswith(out.rstrip("/") + "/")


def llm_block(params: dict[str, Any], stage: str, key: str | None) -> dict[str, Any]:
    """The stage's own ``llm`` overrides (created when absent: llm_defaults fill the rest)."""
    section = params.get(stage, {})
    section = section.get(key) if key is not None else section
    if not isinstance(section, dict):
        where = f"{stage}.{key}" if key else stage
        raise RecordError(f"params.yaml has no {where} section")
    block = section.setdefault("llm", {})
    if not isinstance(block, dict):
        raise RecordError(f"params.yaml {stage}{'.' + key if key else ''}.llm is not a mapping")
    return block


def _run(argv: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)


def _tail(proc: subprocess.CompletedProcess, lines: int = 15) -> str:
    return "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-lines:])


def _same_tree(a: Path, b: Path) -> list[str]:
    """Relative paths that differ between two files/directories (empty: identical)."""
    if a.is_file() or b.is_file():
        return [] if a.is_file() and b.is_file() and filecmp.cmp(a, b, shallow=False) else [a.name]
    names = {p.relative_to(a) for p in a.rglob("*") if p.is_file()} | \
            {p.relative_to(b) for p in b.rglob("*") if p.is_file()}
    return sorted(str(n) for n in names if not ((a / n).is_file() and (b / n).is_file()
                                                 and filecmp.cmp(a / n, b / n, shallow=False)))


def record_one(root: Path, workspace: Path, stage: str, key: str | None,
               answers_file: Path | None = None, log=None) -> dict[str, Any]:
    """Record one stage (key). Returns a summary; raises RecordError when a check fails."""
    log = log or (lambda message: print(message, flush=True))
    name = f"{stage}@{key}" if key else stage
    answers_file = answers_file or answers_path(root, stage, key)
    try:
        answers = load_answers(answers_file)
    except AnswersFileError as exc:
        raise RecordError(str(exc)) from None
    env = offline_env(workspace)
    env.pop("LLM_OFFLINE", None)

    stages = {s.name: s for s in _stages(workspace)}
    target = stages[name]
    deps = [d.def_path for d in target.deps if type(d).__name__ == "Dependency"]
    upstream = sorted({s.name for s in stages.values() if s is not target
                       for o in s.outs for d in deps if _covers(o.def_path, d)})
    if upstream:
        log(f"record {name}: building upstream {upstream} (offline)")
        built = _run([DVC, "repro", *upstream], workspace, dict(env, LLM_OFFLINE="1"))
        if built.returncode != 0:
            raise RecordError(f"upstream stages {upstream} failed in {workspace} (record upstream "
                              f"LLM stages first):\n{_tail(built)}")

    scratch = workspace / SCRATCH / (f"{stage}/{key}" if key else stage)
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    new_cache = scratch / "llm_cache"
    params = read_yaml((workspace / "params.yaml").read_text(encoding="utf-8"))
    llm_block(params, stage, key)  # fail early with a clear message

    out_paths = sorted({o.def_path for o in target.outs if not o.persist}, key=len, reverse=True)
    # logs are cached outs but hold timestamps: not data, not compared (docs/pipeline.md)
    data_outs = [o.def_path for o in target.outs if o.use_cache and not o.metric and not o.persist
                 and not o.def_path.startswith("logs/")]

    def command(run_dir: str, offline: bool, base_url: str | None) -> list[str]:
        """The stage's own argv, outputs under scratch/run_dir, params from a scratch file."""
        run_params = yaml.safe_load(yaml.safe_dump(params))
        block = llm_block(run_params, stage, key)
        block.update(offline=offline)
        if base_url:
            block["base_url"] = base_url
        params_file = scratch / f"params.{run_dir}.yaml"
        params_file.write_text(yaml.safe_dump(run_params, allow_unicode=True, sort_keys=False),
                               encoding="utf-8")
        argv = shlex.split(target.cmd)
        if argv[:2] != ["python", "-m"]:
            raise RecordError(f"{name}: cmd is not `python -m stages.…`: {target.cmd}")
        argv[0] = sys.executable
        if "--cache-dir" not in argv:
            raise RecordError(f"{name}: cmd has no --cache-dir (an LLM stage's response cache)")
        argv[argv.index("--cache-dir") + 1] = str(new_cache)
        argv = [str(scratch / run_dir / a) if a in out_paths else a for a in argv]
        return argv + ["--params", str(params_file)]

    with ReplayServer(answers) as server:
        online_env = dict(env, OPENAI_API_KEY=PLACEHOLDER_KEY, OPENAI_BASE_URL=server.base_url)
        log(f"record {name}: running the stage online against the replay server "
            f"({len(answers)} authored items in {answers_file.relative_to(root) if answers_file.is_relative_to(root) else answers_file})")
        online = _run(command("online", False, server.base_url), workspace, online_env)
        misses, unused, asked = server.misses, server.unused(), server.state.requests
    if misses:
        shown = ", ".join(misses[:20]) + (f" (and {len(misses) - 20} more)" if len(misses) > 20 else "")
        raise RecordError(f"{name}: {len(misses)} request(s) have no authored answer in "
                          f"{answers_file}: {shown}. Nothing was recorded.")
    if online.returncode != 0:
        raise RecordError(f"{name}: the stage failed online against the replay server "
                          f"(exit {online.returncode}); nothing was recorded:\n{_tail(online)}")
    if not new_cache.is_dir():
        new_cache.mkdir(parents=True)

    offline_env_ = dict(env, LLM_OFFLINE="1")
    offline_env_.pop("OPENAI_API_KEY", None)
    offline_env_.pop("OPENAI_BASE_URL", None)
    replay = _run(command("offline", True, None), workspace, offline_env_)
    if replay.returncode != 0:
        raise RecordError(f"{name}: the offline re-run from the new cache failed; nothing was "
                          f"recorded:\n{_tail(replay)}")
    differing = [f"{out}: {diff}" for out in data_outs
                 for diff in _same_tree(scratch / "online" / out, scratch / "offline" / out)]
    if differing:
        raise RecordError(f"{name}: the offline re-run differs from the online run in "
                          f"{differing[:10]}; the stage is not deterministic given its cache")

    destination = recorded_dir(root, stage, key)
    if destination.exists():
        shutil.rmtree(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(new_cache, destination)
    for path in [destination, *destination.rglob("*")]:
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    entries = sum(1 for _ in destination.rglob("*.json"))
    summary = {"stage": name, "requests": asked, "entries": entries,
               "authored_items": len(answers), "unused": unused,
               "destination": str(destination.relative_to(root))}
    log(f"record {name}: {asked} request(s) answered, {entries} cache entries -> "
        f"{summary['destination']}; offline re-run reproduces the outputs")
    if unused:
        log(f"record {name}: warning: {len(unused)} authored item(s) never (fully) asked "
            f"(stale answers?): {', '.join(unused[:20])}")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage")
    parser.add_argument("key", nargs="?")
    parser.add_argument("--workspace", default=str(ROOT / "quickstart"),
                        help="quickstart workspace to build upstream stages in")
    parser.add_argument("--answers", help="answers file (default: data/samples/llm_answers/…)")
    args = parser.parse_args(argv)
    workspace = Path(args.workspace).resolve()
    prepare_workspace(ROOT, workspace)
    try:
        keys = resolve_targets(workspace, ROOT, args.stage, args.key)
    except RecordError as exc:
        print(f"record_llm: {exc}", file=sys.stderr)
        return 2
    if args.answers and len(keys) != 1:
        print("record_llm: --answers needs a single stage key", file=sys.stderr)
        return 2
    for key in keys:
        try:
            record_one(ROOT, workspace, args.stage, key,
                       Path(args.answers).resolve() if args.answers else None)
        except RecordError as exc:
            print(f"record_llm: {exc}", file=sys.stderr)
            return 1
        prepare_workspace(ROOT, workspace)  # seed the new recording for downstream stages
    return 0


if __name__ == "__main__":
    sys.exit(main())
