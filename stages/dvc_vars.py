"""dvc.vars.yaml: what dvc.yaml needs from the version list, derived from params.yaml.

    python -m stages.dvc_vars            # (re)write dvc.vars.yaml from params.yaml
    python -m stages.dvc_vars --check    # exit 1 when dvc.vars.yaml is out of date

The versions are written once, in ``params.yaml`` (``versions``). dvc.yaml cannot derive the
rest itself: a ``foreach`` item cannot list its own deps (dvc #7151), and DVC interpolation has
no expressions to compute file names or to add ``base`` to the evaluated keys. So this module
derives, from the recipes and the version list,

- ``mix_inputs.<version>``: the files of the recipe's sources (``stages.mixing.recipe.
  mix_source_input``) spread over the fixed dep slots ``a`` … of ``mix@<version>`` (unused
  slots repeat the first file) — changing one source re-mixes only the versions that read it;
- ``filter_inputs.<domain>``: the file(s) of ``filter.<domain>.input`` in the fixed dep slots
  ``a`` … ``c`` of ``filter@<domain>`` (a domain may pool several KMMLU subjects);
- ``stock_inputs.<key>``: the collected calendar index and stock price files of
  ``stock.<key>`` (slots ``a`` … ``d``); ``agent_inputs.<key>``: the price files of
  ``agent.<key>`` (slots ``a`` … ``d``);
- ``eval_inputs``: the parquet files of ``evaluate.collected`` (slots ``a`` … ``h``), deps of
  every mix@ (decontamination) and evaluate@ stage;
- ``evaluate_keys``: ``base`` and every version (``evaluate@<key>``), each with ``dev``: the
  version's mixture, whose dev split's answer loss evaluate measures (the baseline gets its
  own model dir: it has no mixture, and its dev losses are measured in each version's stage);
- ``version_list``: the version names, space-separated, for the report's command line;
- ``plot_curves``: the dvclive curves of every version, for dvc.yaml's top-level plots.

dvc.yaml reads the file through ``vars:``. ``mix@<version>`` refuses to run when its slots do
not name exactly its recipe's files (an edit of params.yaml not followed by this command, e.g.
``dvc exp run -S`` adding a source), and ``python -m stages.check`` reports a stale file.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from stages.common.params import PARAMS_FILE, ParamsError, check_key_names, load_raw, lookup
from stages.mixing.recipe import mix_source_input

VARS_FILE = "dvc.vars.yaml"
MIX_SLOTS = tuple("abcdefghijkl")  # dvc.yaml's mix deps ${item.a} … ${item.l}
FILTER_SLOTS = tuple("abc")        # dvc.yaml's filter deps ${item.a} … ${item.c}
STOCK_SLOTS = tuple("abcd")        # dvc.yaml's stock price deps ${item.a} … ${item.d}
EVAL_SLOTS = tuple("abcdefgh")     # dvc.yaml's evaluation-set deps ${eval_inputs.a} … ${eval_inputs.h}
BASE_KEY = "base"
VERSION_KEYS = {"mix", "train"}
LIVE_PLOTS = "dvclive/train/{version}/plots/metrics/{metric}.tsv"
PLOTTED = ("loss", "learning_rate")
HEADER = ("# GENERATED from params.yaml (versions, filter, stock, agent and evaluation inputs) by `python -m stages.dvc_vars`; do not edit.\n"
          "# dvc.yaml reads it (vars:). See stages/dvc_vars.py for why it exists.\n")


def slots(files: list[str], names: tuple[str, ...], where: str, stage: str) -> dict[str, str]:
    """``files`` in a stage's fixed dep slots; unused slots repeat the first file."""
    if len(files) > len(names):
        raise ParamsError(f"{where}: {len(files)} files, but dvc.yaml has {len(names)} dep slots "
                          f"for {stage} (add slots in stages/dvc_vars.py and dvc.yaml)")
    return {slot: files[i] if i < len(files) else files[0] for i, slot in enumerate(names)}


def mix_slots(version: str, sources: Any) -> dict[str, str]:
    """The files of one recipe's sources in the fixed slots (order: the recipe's)."""
    if not isinstance(sources, dict) or not sources:
        raise ParamsError(f"versions.{version}.mix.sources: expected a mapping of sources")
    files = list(dict.fromkeys(mix_source_input(name) for name in sources))
    return slots(files, MIX_SLOTS, f"versions.{version}.mix.sources", "mix")


def filter_slots(domain: str, spec: Any) -> dict[str, str]:
    """The input file(s) of ``filter.<domain>`` in filter's fixed slots."""
    value = spec.get("input") if isinstance(spec, dict) else None
    files = [value] if isinstance(value, str) else value
    if not isinstance(files, list) or not files or not all(isinstance(f, str) for f in files):
        raise ParamsError(f"filter.{domain}.input: expected a file or a list of files")
    return slots(list(dict.fromkeys(files)), FILTER_SLOTS, f"filter.{domain}.input", "filter")


def price_files(section: str, key: str, spec: Any) -> list[str]:
    """The collected files of ``<section>.<key>.prices`` (a list of collect keys)."""
    prices = spec.get("prices") if isinstance(spec, dict) else None
    if not isinstance(prices, list) or not prices or not all(isinstance(p, str) for p in prices):
        raise ParamsError(f"{section}.{key}.prices: expected a list of collect keys")
    return [f"data/collected/{name}.parquet" for name in dict.fromkeys(prices)]


def stock_slots(key: str, spec: Any) -> dict[str, str]:
    """The collected price files of ``stock.<key>``: the calendar index and the stock sources
    in stock's fixed slots."""
    files = price_files("stock", key, spec)
    calendar = (spec.get("calendar") or {}).get("source")
    if not isinstance(calendar, str):
        raise ParamsError(f"stock.{key}.calendar.source: expected a collect key")
    return {"calendar": f"data/collected/{calendar}.parquet",
            **slots(files, STOCK_SLOTS, f"stock.{key}.prices", "stock")}


def agent_slots(key: str, spec: Any) -> dict[str, str]:
    """The collected price files of ``agent.<key>`` in agent's fixed slots ``a`` … ``d``."""
    return slots(price_files("agent", key, spec), STOCK_SLOTS, f"agent.{key}.prices", "agent")


def eval_slots(collected: Any) -> dict[str, str]:
    """The parquet files of ``evaluate.collected`` (KMMLU test splits, the stock/agent/company
    questions) in the fixed slots ``a`` … that mix@ (decontamination) and evaluate@ depend on."""
    if not isinstance(collected, dict) or not collected:
        raise ParamsError("evaluate.collected: expected a mapping of evaluation sets")
    files = [spec.get("input") if isinstance(spec, dict) else None for spec in collected.values()]
    if not all(isinstance(f, str) for f in files):
        raise ParamsError("evaluate.collected.<set>.input: expected a file")
    return slots(list(dict.fromkeys(files)), EVAL_SLOTS, "evaluate.collected", "mix and evaluate")


def check_version_entries(versions: Any) -> None:
    """``versions``: a mapping of valid names, each holding exactly ``mix`` and ``train`` (a
    typo beside them, ``trian:``, would otherwise be read by no stage)."""
    if not isinstance(versions, dict) or not versions:
        raise ParamsError("versions: expected a mapping of model versions")
    check_key_names(versions, "versions")
    if BASE_KEY in versions:
        raise ParamsError(f"versions.{BASE_KEY}: reserved for the base model")
    problems = []
    for version, entry in versions.items():
        keys = set(entry) if isinstance(entry, dict) else set()
        problems += [f"versions.{version}.{k}: unknown key (typo?); a version has mix and train"
                     for k in sorted(keys - VERSION_KEYS)]
        problems += [f"versions.{version}.{k}: missing" for k in sorted(VERSION_KEYS - keys)]
    if problems:
        raise ParamsError("\n".join(problems))


def derive(params: dict[str, Any]) -> dict[str, Any]:
    versions = lookup(params, "versions")
    check_version_entries(versions)
    names = list(versions)
    domains = lookup(params, "filter") or {}
    return {
        "filter_inputs": {d: filter_slots(d, spec) for d, spec in domains.items()},
        "stock_inputs": {k: stock_slots(k, spec) for k, spec in (params.get("stock") or {}).items()},
        "agent_inputs": {k: agent_slots(k, spec) for k, spec in (params.get("agent") or {}).items()},
        "eval_inputs": eval_slots(lookup(params, "evaluate.collected")),
        "mix_inputs": {v: mix_slots(v, lookup(params, f"versions.{v}.mix.sources")) for v in names},
        "evaluate_keys": {BASE_KEY: {"dev": f"models/{BASE_KEY}"},
                          **{v: {"dev": f"data/mixtures/{v}.parquet"} for v in names}},
        "version_list": " ".join(names),
        "plot_curves": {metric: {LIVE_PLOTS.format(version=v, metric=metric): metric for v in names}
                  for metric in PLOTTED},
    }


def render(params: dict[str, Any]) -> str:
    return HEADER + yaml.safe_dump(derive(params), sort_keys=False, allow_unicode=True, width=100)


def is_current(root: Path, params_path: Path | None = None) -> bool:
    path = root / VARS_FILE
    params = load_raw(params_path or root / PARAMS_FILE)
    return path.is_file() and path.read_text(encoding="utf-8") == render(params)


def write(root: Path, params_path: Path | None = None) -> bool:
    """Write dvc.vars.yaml when its bytes change; True when it was written."""
    text = render(load_raw(params_path or root / PARAMS_FILE))
    path = root / VARS_FILE
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return False
    path.write_text(text, encoding="utf-8")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=".", help="the DVC project (default: %(default)s)")
    parser.add_argument("--check", action="store_true", help="only report whether it is current")
    args = parser.parse_args(argv)
    root = Path(args.root)
    try:
        if args.check:
            if is_current(root):
                return 0
            print(f"{root / VARS_FILE} is out of date with params.yaml: run `python -m "
                  "stages.dvc_vars`", file=sys.stderr)
            return 1
        print(f"{root / VARS_FILE}: {'written' if write(root) else 'already current'}")
        return 0
    except ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
