"""Check the whole params.yaml at once: every section against its stage's schema, and the
rules that span sections. Not a DVC stage (it changes nothing); `make check` runs it.

    python -m stages.check [--params params.yaml] [--root .]

Each stage validates its own section when it starts; what only this command sees is
- a top-level section no stage reads (``colect:``: a typo);
- mix source names that no stage writes (``versions.v6.mix.sources.generated_acounting``),
  mixture chains with a cycle, and an excluded source reachable through a ``mixture_<v>``
  source or **by provenance**: a generated source whose inputs, followed stage by stage
  back to the collected data, include an excluded one (a question written from a KRX report
  counts as KRX-report data: v6/v7 must never contain the KRX sample or reports, MISSION.md);
- training parents that are not versions, and init_from cycles;
- a mixture fitted to another ``max_length`` than its version trains with (the train stage
  refuses it as well), and a continued version that takes more than MAX_REPLAY_FRACTION of an
  ancestor's mixture (its weights already hold that data: replay, not retraining);
- a ``dvc.vars.yaml`` out of date with the versions.
Every problem is printed (one line each, naming the key); exit 2 when there is any.

Then (unless ``--schema-only``) what a run of this workspace still lacks, in one list, exit 1:
inputs no stage writes that are neither on disk nor tracked by a ``.dvc`` file (the raw data of
a production run), hub revisions that are placeholders rather than pinned commits, and an unset
``OPENAI_API_KEY`` while an LLM stage would call the API.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable

from stages.common.params import PARAMS_FILE, ParamsError, check_key_names, load_raw
from stages.dvc_vars import VARS_FILE, check_version_entries, is_current

# section -> (per key?, the stage's loader). Imported lazily: each stage module owns its schema.
KEYED = ("collect", "extract", "filter", "transform", "synthesize", "solve", "stock", "agent")
SINGLE = ("base_model", "company", "summarize", "evaluate", "judge", "report", "plan")
SHARED = ("llm_defaults", "mix_defaults", "train_defaults")  # read through the sections above


def _loader(stage: str) -> Callable[..., Any]:
    module = __import__(f"stages.{stage}", fromlist=["load_params"])
    return module.load_params


def _collect(problems: list[str], func: Callable[[], Any]) -> Any:
    """``func()``, or None with its error's lines added to ``problems`` (each line names its
    key; a shared default's typo is named once, not once per stage that merges it)."""
    try:
        return func()
    except (ParamsError, ValueError) as exc:
        for line in str(exc).splitlines():
            line = line.strip()
            if line and not (line.startswith("params ") and line.endswith(" is invalid:")) \
                    and line not in problems:
                problems.append(line)
        return None


def section_problems(raw: dict[str, Any], path: str) -> tuple[list[str], dict[str, Any]]:
    """Every section validated by its stage; returns the problems and the valid recipes."""
    problems: list[str] = []
    known = set(KEYED) | set(SINGLE) | set(SHARED) | {"versions"}
    for name in raw:
        if name not in known:
            problems.append(f"{name}: unknown section (typo?); known: {sorted(known)}")
    for stage in KEYED:
        keys = raw.get(stage) or {}
        _collect(problems, lambda: check_key_names(keys, stage))
        for key in keys:
            _collect(problems, lambda: _loader(stage)(key, path))
    for stage in SINGLE:
        if stage in raw:
            _collect(problems, lambda: _loader(stage)(None, path))
    recipes, trains = {}, {}
    versions = raw.get("versions") or {}
    _collect(problems, lambda: check_version_entries(versions))
    for version in versions:
        got = _collect(problems, lambda: _loader("mix")(version, path))
        if got is not None:
            recipes[version] = got[0]
        trains[version] = _collect(problems, lambda: _loader("train")(version, path))
    return problems, {"recipes": recipes, "trains": trains}


def mix_problems(raw: dict[str, Any], recipes: dict[str, Any]) -> list[str]:
    """Source names exist; mixture chains have no cycle and reach no excluded source."""
    extract = set(raw.get("extract") or {})
    known = set(raw.get("collect") or {}) | extract | {f"{k}_json" for k in extract}
    known |= {f"generated_{k}" for k in raw.get("solve") or {}}
    known |= {f"mixture_{v}" for v in raw.get("versions") or {}}
    known |= {f"stock_{k}" for k in raw.get("stock") or {}}
    known |= {f"agent_{k}{s}" for k in raw.get("agent") or {} for s in ("", "_conversations")}
    if "summarize" in raw:
        known.add("report_summaries")
    problems = []
    for version, recipe in recipes.items():
        for name in [*recipe.sources, *recipe.exclude_sources]:
            if name not in known:
                problems.append(f"versions.{version}.mix: unknown source {name!r}; known: {sorted(known)}")
    for version in recipes:
        reached, stack, seen = set(), [version], set()
        while stack:
            current = stack.pop()
            for name in recipes[current].sources if current in recipes else ():
                reached.add(name)
                parent = name[len("mixture_"):] if name.startswith("mixture_") else None
                if parent == version:
                    problems.append(f"versions.{version}.mix: mixture sources form a cycle via {current}")
                elif parent is not None and parent not in seen:
                    seen.add(parent)
                    stack.append(parent)
        banned = reached & set(recipes[version].exclude_sources)
        if banned:
            problems.append(f"versions.{version}.mix: excluded sources {sorted(banned)} are in the "
                            "recipe (directly or through a mixture_ source)")
    return problems


SUMMARIZE_INPUT = "krx_reports"   # dvc.yaml: summarize reads data/collected/krx_reports.parquet


def path_origins(raw: dict[str, Any], path: str, trail: tuple[str, ...] = ()) -> dict[str, str]:
    """The collected sources a data file derives from -> the chain that leads there
    (``synthesize.company.inputs.filtered <- company.inputs.reports``), following the params
    that name each stage's inputs. A path no stage of the map writes has no origin."""
    if path in trail:
        return {}
    trail = (*trail, path)
    parts = Path(path).parts
    section = lambda *keys: _lookup(raw, keys)  # noqa: E731
    follow: list[tuple[str, Any]] = []
    if len(parts) == 3 and parts[:2] == ("data", "collected"):
        name = Path(parts[2]).stem if parts[2].endswith(".parquet") else parts[2]
        base = name[:-len("_json")] if name.endswith("_json") else name
        return {n: path for n in {name, base}}
    if path == "data/generated/report_summaries.parquet":
        return {SUMMARIZE_INPUT: "summarize"}
    if path == "data/generated/company/chunks.parquet":
        follow = [("company.inputs.profiles", section("company", "inputs", "profiles")),
                  ("company.inputs.reports", section("company", "inputs", "reports"))]
    elif len(parts) == 4 and parts[:2] == ("data", "generated"):
        domain, stem = parts[2], Path(parts[3]).stem
        if stem == "filtered":
            follow = [(f"filter.{domain}.input", section("filter", domain, "input"))]
        elif stem == "transformed":
            follow = [(f"transform.{domain}.input", section("transform", domain, "input"))]
        elif stem == "synthesized":
            inputs = section("synthesize", domain, "inputs") or {}
            follow = [(f"synthesize.{domain}.inputs.{k}", v) for k, v in inputs.items()]
        elif stem in ("questions", "pairs"):
            inputs = section("solve", domain, "inputs") or {}
            follow = [(f"solve.{domain}.inputs.{k}", v) for k, v in inputs.items()]
    found: dict[str, str] = {}
    for param, value in follow:
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str):
                for origin, chain in path_origins(raw, item, trail).items():
                    found.setdefault(origin, f"{param} <- {chain}")
    return found


def _lookup(raw: dict[str, Any], keys: tuple[str, ...]) -> Any:
    node: Any = raw
    for key in keys:
        node = node.get(key) if isinstance(node, dict) else None
    return node


def source_origins(raw: dict[str, Any], name: str) -> dict[str, str]:
    """The collected sources a mix source name derives from (its own name included)."""
    from stages.mixing.recipe import mix_source_input
    found = {name: name}
    if name.startswith(("stock_", "agent_")):
        stage = name.split("_", 1)[0]
        key = name[len(stage) + 1:].removesuffix("_conversations")
        spec = _lookup(raw, (stage, key)) or {}
        for price in [*(spec.get("prices") or []), (spec.get("calendar") or {}).get("source")]:
            if price:
                found.setdefault(price, f"{stage}.{key}.prices")
        return found
    if name.startswith("mixture_"):   # followed by provenance_problems, recipe by recipe
        return found
    for origin, chain in path_origins(raw, mix_source_input(name)).items():
        found.setdefault(origin, chain)
    return found


def provenance_problems(raw: dict[str, Any], recipes: dict[str, Any]) -> list[str]:
    """No version takes data derived from a source it excludes — through a mixture_ source
    (:func:`mix_problems`) or through the stages that made it (this check)."""
    problems = []
    for version, recipe in recipes.items():
        excluded = set(recipe.exclude_sources)
        if not excluded:
            continue
        reached, stack, seen = [], [version], set()
        while stack:   # the version's own sources and those of every mixture_ it takes
            current = stack.pop()
            for name in recipes[current].sources if current in recipes else ():
                parent = name[len("mixture_"):] if name.startswith("mixture_") else None
                if parent is None:
                    reached.append(name)
                elif parent not in seen:
                    seen.add(parent)
                    stack.append(parent)
        for name in dict.fromkeys(reached):
            for origin, chain in sorted(source_origins(raw, name).items()):
                if origin in excluded and origin != name:
                    problems.append(f"versions.{version}.mix: source {name!r} derives from excluded "
                                    f"{origin!r} (by provenance: {chain})")
    return problems


def stock_problems(raw: dict[str, Any]) -> list[str]:
    """``stock.<key>`` reads collected price sources of the right series; ``stock_<key>`` is a
    mix source name, so no collect key may start with ``stock_``."""
    collect = raw.get("collect") or {}
    problems = [f"collect.{k}: a collect key starting with '{prefix}' reads as the {prefix[:-1]} "
                "stage's mix source; rename it" for k in collect for prefix in ("stock_", "agent_")
                if str(k).startswith(prefix)]

    def series(name: str) -> Any:
        spec = collect.get(name)
        if not isinstance(spec, dict) or spec.get("kind") != "prices":
            return None
        return (spec.get("prices") or {}).get("series")

    def expect(where: str, names: list[Any], want: str) -> None:
        problems.extend(f"{where}: {name!r} is not a collect source of kind prices with series "
                        f"{want}" for name in names if series(name) != want)

    for stage in ("stock", "agent"):
        for key, spec in (raw.get(stage) or {}).items():
            if isinstance(spec, dict):
                expect(f"{stage}.{key}.prices", spec.get("prices") or [], "stock")
    for key, spec in (raw.get("stock") or {}).items():
        if isinstance(spec, dict):
            expect(f"stock.{key}.calendar.source", [(spec.get("calendar") or {}).get("source")], "index")
    # every price-derived training table ends before the cutoff of every stock key that asks
    # questions about the same prices: a later table would hand the model the stock labels
    for key, spec in (raw.get("agent") or {}).items():
        if not isinstance(spec, dict):
            continue
        for skey, sspec in (raw.get("stock") or {}).items():
            shared = set(spec.get("prices") or []) & set((sspec or {}).get("prices") or [])
            if shared and str(spec.get("cutoff")) > str((sspec or {}).get("cutoff")):
                problems.append(f"agent.{key}.cutoff {spec.get('cutoff')} is after "
                                f"stock.{skey}.cutoff {sspec.get('cutoff')} over {sorted(shared)}: "
                                "agent training tables would reach into the held-out stock period")
    return problems


def train_problems(trains: dict[str, Any]) -> list[str]:
    """Parents are versions; no init_from cycles (v3 <- v1, v5_3 <- v5_2 <- v5_1)."""
    problems = []
    parents = {v: t.parent for v, t in trains.items() if t is not None}
    for version, parent in parents.items():
        if parent is not None and parent not in trains:
            problems.append(f"versions.{version}.train.init_from: {parent!r} is not a version")
    for version in parents:
        seen, node = set(), version
        while node is not None and node in parents:
            if node in seen:
                problems.append(f"versions.{version}.train.init_from: the chain has a cycle")
                break
            seen.add(node)
            node = parents[node]
    return problems


def length_problems(recipes: dict[str, Any], trains: dict[str, Any]) -> list[str]:
    """A mixture is fitted to the max_length its version trains with (trl truncates after
    labelling: a longer example would lose its <|im_end|>)."""
    problems = []
    for version, recipe in recipes.items():
        train = trains.get(version)
        if train is not None and recipe.max_length != train.sft.max_length:
            problems.append(f"versions.{version}: mix max_length {recipe.max_length} (mix_defaults / "
                            f"versions.{version}.mix) differs from train sft.max_length "
                            f"{train.sft.max_length} (train_defaults / versions.{version}.train); "
                            "set them to one value")
    return problems


MAX_REPLAY_FRACTION = 0.5  # above half of an ancestor's data it is retraining, not replay


def replay_problems(recipes: dict[str, Any], trains: dict[str, Any]) -> list[str]:
    """A continued version (init_from a parent) already carries its ancestors' training in its
    weights: its mixture takes their data only as replay, a fraction of at most
    MAX_REPLAY_FRACTION (params.yaml uses 0.05), never their whole mixtures again."""
    parents = {v: t.parent for v, t in trains.items() if t is not None}
    problems = []
    for version, recipe in recipes.items():
        ancestors, node = set(), parents.get(version)
        while node is not None and node not in ancestors:
            ancestors.add(node)
            node = parents.get(node)
        for name, spec in recipe.sources.items():
            if name.startswith("mixture_") and name[len("mixture_"):] in ancestors and \
                    spec.count is None and (spec.fraction or 0) > MAX_REPLAY_FRACTION:
                problems.append(
                    f"versions.{version}.mix.sources.{name}: {version} continues "
                    f"{name[len('mixture_'):]}'s weights, so fraction {spec.fraction} would train "
                    f"that data again; replay a small share (fraction <= {MAX_REPLAY_FRACTION}, "
                    "e.g. 0.05) or drop the source")
    return problems


def check(path: str | Path = PARAMS_FILE, root: str | Path | None = None) -> list[str]:
    """All problems of ``path`` (and of ``root``'s dvc.vars.yaml when ``root`` is given)."""
    raw = load_raw(path)
    problems, valid = section_problems(raw, str(path))
    problems += mix_problems(raw, valid["recipes"])
    problems += provenance_problems(raw, valid["recipes"])
    problems += stock_problems(raw)
    problems += train_problems(valid["trains"])
    problems += length_problems(valid["recipes"], valid["trains"])
    problems += replay_problems(valid["recipes"], valid["trains"])
    if root is not None and raw.get("versions"):
        if _collect(problems, lambda: is_current(Path(root), Path(path))) is False:
            problems.append(f"{VARS_FILE} is out of date with params.yaml versions: run "
                            "`python -m stages.dvc_vars`")
    return problems


PINNED = re.compile(r"^[0-9a-f]{40}$")
LLM_SECTIONS = ("filter", "transform", "synthesize", "solve", "agent")


def missing_inputs(root: Path) -> list[str]:
    """Deps of dvc.yaml's stages that no stage writes and that are neither on disk nor
    tracked by a ``.dvc`` file (``dvc pull`` would bring them): a run would stop at them."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        stages = list(repo.index.stages)
    outs = {o.def_path.rstrip("/") for stage in stages for o in stage.outs}
    wanted: dict[str, list[str]] = {}
    for stage in stages:
        for dep in stage.deps:
            if type(dep).__name__ != "Dependency":
                continue
            path = dep.def_path.rstrip("/")
            produced = any(path == o or path.startswith(o + "/") or o.startswith(path + "/")
                           for o in outs)
            if not produced and not (root / path).exists() and not (root / f"{path}.dvc").exists():
                wanted.setdefault(path, []).append(stage.name)
    return [f"{path}: missing (input of {', '.join(sorted(names)[:3])}"
            + (f" and {len(names) - 3} more" if len(names) > 3 else "") + "); add it and `dvc add` it"
            for path, names in sorted(wanted.items())]


def placeholder_revisions(raw: dict[str, Any]) -> list[str]:
    """Hub revisions that are not a pinned commit (a moving branch such as ``main``)."""
    from stages.sources.spec import is_local_repo

    found = []
    for key, source in (raw.get("collect") or {}).items():
        hub = source.get("hub") if isinstance(source, dict) else None
        if isinstance(hub, dict) and not is_local_repo(str(hub.get("repo", ""))) \
                and not PINNED.match(str(hub.get("revision", ""))):
            found.append(f"collect.{key}.hub.revision: {hub.get('revision')!r} is not a pinned "
                         f"commit of {hub.get('repo')} (40 hex digits)")
    base = raw.get("base_model") or {}
    if isinstance(base, dict) and not base.get("build") and not os.path.isdir(str(base.get("model"))) \
            and not PINNED.match(str(base.get("revision", ""))):
        found.append(f"base_model.revision: {base.get('revision')!r} is not a pinned commit of "
                     f"{base.get('model')} (40 hex digits)")
    return found


def online_llm_stages(raw: dict[str, Any]) -> list[str]:
    """LLM stages that would call the API (not offline by params or LLM_OFFLINE=1)."""
    if os.environ.get("LLM_OFFLINE", "").strip().lower() in ("1", "true", "yes"):
        return []
    default = bool((raw.get("llm_defaults") or {}).get("offline", False))
    online = []
    sections = {f"{s}@{k}": v for s in LLM_SECTIONS for k, v in (raw.get(s) or {}).items()}
    if "summarize" in raw:
        sections["summarize"] = raw["summarize"]
    for name, section in sections.items():
        llm = section.get("llm") if isinstance(section, dict) else None
        if not (llm if isinstance(llm, dict) else {}).get("offline", default):
            online.append(name)
    return online


def missing_for_run(path: str | Path, root: str | Path) -> list[str]:
    """Everything a run of the workspace at ``root`` still lacks, in one list."""
    raw = load_raw(path)
    missing = missing_inputs(Path(root)) + placeholder_revisions(raw)
    online = online_llm_stages(raw)
    if online and not os.environ.get("OPENAI_API_KEY"):
        from stages.common.llm import API_KEY_ENV
        missing.append(f"{API_KEY_ENV} is not set, and {len(online)} LLM stage(s) would call the API "
                       f"({', '.join(online[:4])}{' …' if len(online) > 4 else ''})")
    return missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=PARAMS_FILE)
    parser.add_argument("--root", default=".", help="the DVC project holding dvc.vars.yaml")
    parser.add_argument("--schema-only", action="store_true",
                        help="only the params themselves, not what a run still lacks")
    args = parser.parse_args(argv)
    try:
        problems = check(args.params, args.root)
    except ParamsError as exc:
        problems = [str(exc)]
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        print(f"{args.params}: {len(problems)} problem(s)", file=sys.stderr)
        return 2
    print(f"{args.params}: ok")
    if args.schema_only:
        return 0
    missing = missing_for_run(args.params, args.root)
    for item in missing:
        print(f"missing: {item}", file=sys.stderr)
    if missing:
        print(f"{len(missing)} thing(s) a run of {Path(args.root).resolve()} still lacks",
              file=sys.stderr)
        return 1
    print("nothing missing for a run")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
