"""report: one page comparing every version -> reports/index.html + PNG figures.

Contract:
- inputs (paths from the dvc.yaml cmd; the versions from ``--versions``, the baseline from ``params.report``):
  ``<eval-dir>/<key>.json`` (evaluate metrics, baseline included), ``<mixtures-dir>/<v>.json``
  (mix manifests: per-source examples/tokens, mixture and input sha256s),
  ``<models-dir>/<v>/lineage.json`` (train: parent, mixture hash, base model, loss, time),
  ``<train-dir>/<v>.json`` (train metrics) and ``<live-dir>/<v>/plots/metrics/loss.tsv``
  (dvclive training loss by step; a missing file is drawn from lineage's final loss alone).
- output ``--out`` (a directory, replaced whole): ``index.html`` (self-contained: inline CSS,
  no script, figures by relative path), ``composition.png`` (tokens per source, stacked, per
  version), ``loss.png`` (training loss curves), ``accuracy.png`` (accuracy of each version
  against the baseline), and tables: KRX-Bench (per contest category: accuracy with its 95%
  Wilson interval and items, coloured against the baseline only when the exact McNemar test on
  that category's items says p < ``alpha``, what ±5 points would need, the majority-class rate,
  the average over the categories that have items; missing categories shown as missing; the
  open-ended score from ``--judge-dir`` (judge@'s metrics) with the judge that gave it, compared
  with the baseline only when the same judge scored both),
  accuracy (micro with a 95% Wilson interval, macro,
  shuffled, 4/7-choice, per set, delta to the baseline coloured only when the exact McNemar
  test says p < ``alpha``, how each model was scored), accuracy per category, data
  composition, training, dev loss of each version against the base (evaluate's ``dev_loss``),
  what changed between versions, lineage, the generation funnel per domain (items at each
  step, rejects by reason, LLM calls/tokens/dollars; from ``--llm-metrics``), LLM calls and
  cost per stage, and the git revision the page was built from.
- deterministic apart from that revision: no timestamps, sorted keys, PNGs without a
  Software/date stamp, so the same inputs at the same commit give the same bytes (with the
  pinned matplotlib).
- fails (exit 2) when an input file of a listed version is missing or is not JSON.
"""
from __future__ import annotations

import csv
import html
import json
import os
from pathlib import Path
from typing import Any

from pydantic import Field

from stages.common.io import atomic_dir, read_records, write_text
from stages.common.params import PARAMS_FILE, Strict, read_section
from stages.common.runlog import StageError, Timer, setup_logging, stage_main, stage_parser, write_metrics
from stages.sources.evalsets import CONTEST_CATEGORIES

PARAMS = ("report",)
STAGE = "report"


# ---------------------------------------------------------------------------- params
class ReportParams(Strict):
    """``report``. The versions shown (in params.yaml's ``versions`` order) come from the
    command line, which dvc.yaml writes from the generated ``dvc.vars.yaml``."""
    baseline: str = Field("base", description="the evaluate key every version is compared with")
    figure_dpi: int = Field(ge=50, le=300)
    alpha: float = Field(0.05, gt=0, lt=0.5, description="a change against the baseline is "
                         "coloured only when the exact McNemar test's two-sided p is below this")


def load_params(key: None = None, path: str = PARAMS_FILE) -> ReportParams:
    return read_section(PARAMS, ReportParams, path=path)

FIGURES = ("composition.png", "loss.png", "accuracy.png")
LOSS_TSV = Path("plots") / "metrics" / "loss.tsv"


# ------------------------------------------------------------------------ inputs
def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise StageError(f"report: {path} does not exist (run the stage that writes it)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise StageError(f"report: {path} is not valid JSON ({exc})") from None


def read_loss_tsv(path: Path) -> list[tuple[float, float]]:
    """dvclive's ``step<TAB>loss`` table -> [(step, loss)], sorted by step; [] when absent."""
    if not path.is_file():
        return []
    with path.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    points = []
    for row in rows:
        try:
            points.append((float(row["step"]), float(row["loss"])))
        except (KeyError, TypeError, ValueError):
            continue
    return sorted(points)


def load_inputs(params: ReportParams, versions: list[str], eval_dir: str, train_dir: str,
                mixtures_dir: str, models_dir: str, live_dir: str) -> dict[str, Any]:
    """Everything the page shows, read from the pipeline's outputs."""
    data: dict[str, Any] = {"baseline": params.baseline, "versions": list(versions),
                            "eval": {}, "manifests": {}, "lineage": {}, "train": {}, "loss": {}}
    for key in [params.baseline, *versions]:
        data["eval"][key] = _read_json(Path(eval_dir) / f"{key}.json")
    data["alpha"] = params.alpha
    for version in versions:
        data["manifests"][version] = _read_json(Path(mixtures_dir) / f"{version}.json")
        data["lineage"][version] = _read_json(Path(models_dir) / version / "lineage.json")
        data["train"][version] = _read_json(Path(train_dir) / f"{version}.json")
        data["loss"][version] = read_loss_tsv(Path(live_dir) / version / LOSS_TSV)
    return data


def read_predictions(predictions_dir: str, keys: list[str]
                     ) -> tuple[dict[str, dict[str, bool]], dict[str, str]]:
    """Per key: item id (set-qualified) -> correct, from evaluate's ``data/eval/<key>.parquet``;
    and each item's contest category (for the paired test within a category)."""
    out: dict[str, dict[str, bool]] = {}
    categories: dict[str, str] = {}
    for key in keys:
        path = Path(predictions_dir) / f"{key}.parquet"
        if not path.is_file():
            raise StageError(f"report: predictions {path} of {key!r} do not exist (run evaluate@{key})")
        rows = read_records(path)
        out[key] = {f"{r['set']}/{r['id']}": bool(r["correct"]) for r in rows}
        categories.update({f"{r['set']}/{r['id']}": r.get("contest_category") or "" for r in rows})
    return out, categories


# ------------------------------------------------------------------------ statistics
def wilson_interval(correct: int, n: int, z: float = 1.959964) -> tuple[float, float] | None:
    """The 95% Wilson score interval of a proportion (sound at small n and near 0 or 1)."""
    if n <= 0:
        return None
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(gained: int, lost: int) -> float:
    """Two-sided exact McNemar p: under no difference the discordant items (right only for the
    version: ``gained``; right only for the baseline: ``lost``) split like a fair coin."""
    from math import comb

    n = gained + lost
    if n == 0:
        return 1.0
    tail = sum(comb(n, k) for k in range(min(gained, lost) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_comparison(version: dict[str, bool], baseline: dict[str, bool]) -> dict[str, Any]:
    """The version against the baseline on the items both scored."""
    shared = sorted(set(version) & set(baseline))
    gained = sum(1 for i in shared if version[i] and not baseline[i])
    lost = sum(1 for i in shared if baseline[i] and not version[i])
    return {"paired_items": len(shared), "gained": gained, "lost": lost,
            "p_value": round(mcnemar_exact(gained, lost), 6)}


def load_judge_metrics(judge_dir: str | None, keys: list[str]) -> dict[str, dict[str, Any]]:
    """Per key: judge@<key>'s metrics (the open-ended score and who gave it), where written."""
    out = {}
    for key in keys:
        path = Path(judge_dir or "-") / f"{key}.json"
        if judge_dir and path.is_file():
            out[key] = _read_json(path)
    return out


def open_ended_cells(judges: dict[str, dict[str, Any]], keys: list[str], baseline: str
                     ) -> dict[str, str]:
    """Per key: the mean open-ended score with its scale, and the change against the baseline
    only when the same judge scored both (scores of different judges are never compared)."""
    base = judges.get(baseline) or {}
    cells = {}
    for key in keys:
        j = judges.get(key) or {}
        if not j.get("scored"):
            cells[key] = "<span class='note'>missing</span>"
            continue
        text = f"{j['score_mean']:.2f} <span class='note'>/{html.escape(str(j.get('scale', '')))} n={j['scored']}"
        if key != baseline and base.get("scored") and base.get("judge") == j.get("judge"):
            text += f", {j['score_mean'] - base['score_mean']:+.2f} vs baseline"
        elif key != baseline and base.get("scored"):
            text += ", another judge than the baseline's: not compared"
        cells[key] = text + "</span>"
    return cells


def load_stage_metrics(paths: list[str]) -> dict[str, dict[str, Any]]:
    """stage@key -> the whole metrics of that LLM stage (for the generation funnel)."""
    found: dict[str, dict[str, Any]] = {}
    for raw in paths:
        path = Path(raw)
        files = sorted(path.glob("*.json")) if path.is_dir() else [path] if path.is_file() else []
        for file in files:
            found[file.stem if file == path else f"{path.name}@{file.stem}"] = _read_json(file)
    return found


# (column, stage, metric) of the funnel, in pipeline order
FUNNEL = (("collected", "filter", "items"), ("prefilter passed", "filter", "prefilter_passed"),
          ("judged relevant", "filter", "relevant"), ("transformed", "transform", "records"),
          ("synthesized", "synthesize", "records"), ("solved", "solve", "records"),
          ("pairs", "solve", "pairs"))
FUNNEL_STAGES = ("filter", "transform", "synthesize", "solve")


def funnel_rows(stages: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Per generation domain: items at each step (collected -> prefilter -> judge -> transform
    / synthesize -> solved questions -> step pairs), the synthesis target, the rejects by stage
    and reason, and the LLM calls, tokens and dollars of the domain's stages."""
    domains = sorted({k.split("@", 1)[1] for k in stages
                      if "@" in k and k.split("@", 1)[0] in FUNNEL_STAGES})
    rows = []
    for domain in domains:
        got = {stage: stages.get(f"{stage}@{domain}") for stage in FUNNEL_STAGES}
        counts = {column: (got[stage] or {}).get(metric) for column, stage, metric in FUNNEL}
        rejects = {stage: dict((m or {}).get("rejects_by_reason") or {}) for stage, m in got.items()}
        llm = [(m or {}).get("llm") or {} for m in got.values()]
        rows.append({"domain": domain, **counts,
                     "target": (got["synthesize"] or {}).get("target"),
                     "target_pairs": (got["solve"] or {}).get("target_pairs"),
                     "rejects": {k: v for k, v in rejects.items() if v},
                     "calls": sum(m.get("calls", 0) for m in llm),
                     "tokens": sum(m.get("prompt_tokens", 0) + m.get("completion_tokens", 0) for m in llm),
                     "cost_usd": round(sum(m.get("cost_usd", 0.0) for m in llm), 6)})
    return rows


def llm_blocks(stages: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """stage@key -> the ``llm`` block of its metrics (calls, tokens, dollars)."""
    return {name: m["llm"] for name, m in stages.items() if isinstance(m.get("llm"), dict)}


def dev_loss_rows(evals: dict[str, dict[str, Any]], versions: list[str]) -> list[dict[str, Any]]:
    """Per version: evaluate's answer loss on the dev split of its own mixture, with the
    version and with the base (adapter off)."""
    rows = []
    for v in versions:
        dev = (evals.get(v) or {}).get("dev_loss") or {}
        rows.append({"version": v, "examples": dev.get("examples"), "tokens": dev.get("tokens"),
                     "model": dev.get("model"), "base": dev.get("base"), "delta": dev.get("delta")})
    return rows


def _dev_loss_cells(rows: list[dict[str, Any]]) -> list[list[str]]:
    cells = []
    for r in rows:
        delta = r["delta"]
        cls = "" if delta is None else "up" if delta < 0 else "down" if delta > 0 else ""
        cells.append([html.escape(r["version"]), _fmt(r["examples"]), _fmt(r["tokens"]),
                      _fmt(r["model"], 4), _fmt(r["base"], 4),
                      f"<span class='{cls}'>{'–' if delta is None else f'{delta:+.4f}'}</span>"])
    return cells


def _funnel_cells(rows: list[dict[str, Any]]) -> list[list[str]]:
    cells = []
    for r in rows:
        synthesized = _fmt(r["synthesized"]) + (f" / {_fmt(r['target'])}" if r["target"] else "")
        pairs = _fmt(r["pairs"]) + (f" / {_fmt(r['target_pairs'])}" if r["target_pairs"] else "")
        reasons = "<br>".join(f"{html.escape(stage)}: " + ", ".join(
            f"{html.escape(reason)} {n:,}" for reason, n in sorted(by.items()))
            for stage, by in r["rejects"].items()) or "–"
        cells.append([html.escape(r["domain"]), *[_fmt(r[c]) for c, _, _ in FUNNEL[:4]], synthesized,
                      _fmt(r["solved"]), pairs, f"<span class='l'>{reasons}</span>", f"{r['calls']:,}",
                      f"{r['tokens']:,}", f"${r['cost_usd']:.4f}"])
    return cells


def git_revision(cwd: str | os.PathLike = ".") -> str:
    """The commit the report is built from, with a note when the work tree differs from it
    (a report of uncommitted params says so); a sentence when there is no git repository."""
    import subprocess

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    head = git("rev-parse", "HEAD")
    if head is None:
        return "not a git repository (or no commit yet)"
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return head + (" + uncommitted changes" if dirty else "")


def llm_rows(llm: dict[str, dict[str, Any]]) -> list[list[str]]:
    """One row per LLM stage and a total: calls, tokens and dollars spent and saved."""
    rows, total = [], {"calls": 0, "batch_calls": 0, "cache_hits": 0, "tokens": 0,
                       "cost_usd": 0.0, "cost_saved_usd": 0.0}
    for name, m in llm.items():
        tokens = m.get("prompt_tokens", 0) + m.get("completion_tokens", 0)
        values = {"calls": m.get("calls", 0), "batch_calls": m.get("batch_calls", 0),
                  "cache_hits": m.get("cache_hits", 0), "tokens": tokens,
                  "cost_usd": m.get("cost_usd", 0.0), "cost_saved_usd": m.get("cost_saved_usd", 0.0)}
        for k, v in values.items():
            total[k] += v
        rows.append([html.escape(name), *_llm_cells(values)])
    rows.append(["<b>total</b>", *_llm_cells(total)])
    return rows


def _llm_cells(v: dict[str, Any]) -> list[str]:
    return [f"{v['calls']:,}", f"{v['batch_calls']:,}", f"{v['cache_hits']:,}", f"{v['tokens']:,}",
            f"${v['cost_usd']:.4f}", f"${v['cost_saved_usd']:.4f}"]


# ------------------------------------------------------------------------ tables (pure)
def composition(manifests: dict[str, dict[str, Any]], versions: list[str]
                ) -> tuple[list[str], dict[str, dict[str, int]]]:
    """(sources in a stable order, {version: {source: tokens}}) from the manifests'
    ``sources``; sources ordered by first appearance over the versions, then by name."""
    order: list[str] = []
    table: dict[str, dict[str, int]] = {}
    for version in versions:
        sources = manifests.get(version, {}).get("sources", {})
        table[version] = {name: int(s.get("tokens", 0)) for name, s in sorted(sources.items())}
        order += [name for name in sorted(sources) if name not in order]
    return order, table


def accuracy_rows(evals: dict[str, dict[str, Any]], baseline: str, versions: list[str],
                  predictions: dict[str, dict[str, bool]] | None = None) -> list[dict[str, Any]]:
    """One row per key (baseline first): accuracies, the micro delta to the baseline, the 95%
    Wilson interval of micro and, with ``predictions``, the paired McNemar test."""
    base_micro = evals.get(baseline, {}).get("accuracy", {}).get("micro")
    predictions = predictions or {}
    rows = []
    for key in [baseline, *versions]:
        metrics = evals.get(key, {})
        acc = metrics.get("accuracy", {})
        micro = acc.get("micro")
        rows.append({
            "key": key, "items": metrics.get("items"), "micro": micro, "macro": acc.get("macro"),
            "shuffled_micro": acc.get("shuffled_micro"), "choices_4": acc.get("choices_4"),
            "choices_7": acc.get("choices_7"), "unparsed": metrics.get("unparsed"),
            "scoring": metrics.get("scoring"), "scored_as": metrics.get("scored_as"),
            "delta": None if micro is None or base_micro is None or key == baseline
            else round(micro - base_micro, 6),
            "by_set": {name: s.get("accuracy") for name, s in sorted(metrics.get("by_set", {}).items())},
            "by_category": metrics.get("by_category") or {},
            "interval": None, "paired": None,
        })
        items = predictions.get(key)
        if items is not None:
            rows[-1]["interval"] = wilson_interval(sum(items.values()), len(items))
            if key != baseline and baseline in predictions:
                rows[-1]["paired"] = paired_comparison(items, predictions[baseline])
    return rows


def items_for_half_width(p: float, half_width: float = 0.05) -> int:
    """Items a 95% interval of ±``half_width`` needs at accuracy ``p`` (about 384 at 50%)."""
    import math
    p = min(max(p, 0.05), 0.95)  # an observed 0 or 1 says little about the next set
    return math.ceil(1.959964 ** 2 * p * (1 - p) / half_width ** 2)


def krx_rows(evals: dict[str, dict[str, Any]], baseline: str, versions: list[str],
             predictions: dict[str, dict[str, bool]] | None = None,
             item_categories: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """The leaderboard's table: one row per key (baseline first), per contest category the
    ``krx_bench`` entry of evaluate's metrics with, for a version, the paired McNemar test
    against the baseline on that category's items; the average and over how many categories."""
    predictions, item_categories = predictions or {}, item_categories or {}
    rows = []
    for key in [baseline, *versions]:
        bench = evals.get(key, {}).get("krx_bench") or {}
        cells = {}
        for category in CONTEST_CATEGORIES:
            entry = dict((bench.get("categories") or {}).get(category) or {"items": 0})
            mine, base = predictions.get(key), predictions.get(baseline)
            if entry["items"] and key != baseline and mine is not None and base is not None:
                pick = {i for i, c in item_categories.items() if c == category}
                entry["paired"] = paired_comparison({i: v for i, v in mine.items() if i in pick},
                                                    {i: v for i, v in base.items() if i in pick})
            cells[category] = entry
        rows.append({"key": key, "categories": cells, "average": bench.get("average"),
                     "averaged_over": bench.get("averaged_over", 0)})
    return rows


def lineage_rows(lineages: dict[str, dict[str, Any]], manifests: dict[str, dict[str, Any]],
                 versions: list[str]) -> list[dict[str, Any]]:
    """version -> parent -> base -> mixture (sha256) -> source inputs (sha256)."""
    rows = []
    for version in versions:
        lineage, manifest = lineages.get(version, {}), manifests.get(version, {})
        parent = lineage.get("parent") or {}
        mixture = lineage.get("mixture") or {}
        base = lineage.get("base_model") or {}
        inputs = manifest.get("inputs", {})
        rows.append({
            "version": version, "parent": parent.get("version"),
            "base": base.get("model"), "base_revision": base.get("revision"),
            "mixture": mixture.get("path") or manifest.get("mixture", {}).get("path"),
            "mixture_sha256": mixture.get("sha256") or manifest.get("mixture", {}).get("sha256"),
            "manifest_sha256": mixture.get("manifest_sha256"),
            "adapter_sha256": lineage.get("adapter_sha256"),
            "sources": [(name, spec.get("path"), spec.get("sha256"))
                        for name, spec in sorted(inputs.items())],
        })
    return rows


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def version_diffs(lineages: dict[str, dict[str, Any]], manifests: dict[str, dict[str, Any]],
                  versions: list[str]) -> list[dict[str, Any]]:
    """What changed from the version each one is compared with — its parent (a continued
    version) or the first version (a root one): resolved training params that differ, and the
    mixture's sources added, removed or resized (examples)."""
    rows = []
    for version in versions:
        parent = (lineages.get(version, {}).get("parent") or {}).get("version")
        against = parent or (versions[0] if version != versions[0] else None)
        row = {"version": version, "against": against, "why": "parent" if parent else "first version",
               "params": [], "data": []}
        if against is not None:
            now = _flat(lineages.get(version, {}).get("params", {}))
            then = _flat(lineages.get(against, {}).get("params", {}))
            row["params"] = [(key, then.get(key), now.get(key)) for key in sorted(set(now) | set(then))
                             if now.get(key) != then.get(key)]
            mine = {n: s.get("examples") for n, s in manifests.get(version, {}).get("sources", {}).items()}
            theirs = {n: s.get("examples") for n, s in manifests.get(against, {}).get("sources", {}).items()}
            row["data"] = [(name, theirs.get(name), mine.get(name)) for name in sorted(set(mine) | set(theirs))
                           if mine.get(name) != theirs.get(name)]
        rows.append(row)
    return rows


def _diff_cells(diffs: list[dict[str, Any]]) -> list[list[str]]:
    def show(changes: list[tuple[str, Any, Any]]) -> str:
        if not changes:
            return "–"
        return "<br>".join(f"<code>{html.escape(k)}</code>: {html.escape(str(a if a is not None else '–'))}"
                           f" → {html.escape(str(b if b is not None else '–'))}" for k, a, b in changes)
    return [[html.escape(d["version"]),
             "–" if d["against"] is None else f"{html.escape(d['against'])} ({d['why']})",
             show(d["params"]), show(d["data"])] for d in diffs]


def training_rows(lineages: dict[str, dict[str, Any]], train: dict[str, dict[str, Any]],
                  manifests: dict[str, dict[str, Any]], versions: list[str]) -> list[dict[str, Any]]:
    rows = []
    for version in versions:
        lineage, metrics = lineages.get(version, {}), train.get(version, {})
        mixture = manifests.get(version, {}).get("mixture", {})
        rows.append({
            "version": version,
            "examples": mixture.get("examples"), "tokens": mixture.get("tokens"),
            "start_loss": metrics.get("start_loss", lineage.get("start_loss")),
            "start_loss_base": metrics.get("start_loss_base", lineage.get("start_loss_base")),
            "start_loss_on_parent": metrics.get("start_loss_on_parent"),
            "parent_end_loss": metrics.get("parent_end_loss"),
            "parent": (lineage.get("parent") or {}).get("version"),
            "final_loss": metrics.get("final_loss", lineage.get("final_loss")),
            "eval_loss": metrics.get("eval_loss", lineage.get("eval_loss")),
            "steps": metrics.get("steps", lineage.get("steps")),
            "train_seconds": metrics.get("train_seconds", lineage.get("train_seconds")),
            "tokenizer": metrics.get("tokenizer", lineage.get("tokenizer")),
        })
    return rows


# ------------------------------------------------------------------------ figures
def _figure_setup() -> Any:
    import matplotlib
    matplotlib.use("Agg")  # no display; also the deterministic raster backend
    import matplotlib.pyplot as plt
    plt.rcParams.update({"font.family": "DejaVu Sans", "font.size": 9, "svg.hashsalt": "report"})
    return plt


def _save(fig: Any, path: Path, dpi: int) -> None:
    # no Software/creation stamp: same inputs -> same PNG bytes
    fig.savefig(path, dpi=dpi, metadata={"Software": None}, bbox_inches="tight")


def plot_composition(sources: list[str], table: dict[str, dict[str, int]], versions: list[str],
                     path: Path, dpi: int) -> None:
    plt = _figure_setup()
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(versions) + 1.6))
    cmap = plt.get_cmap("tab20")
    left = [0.0] * len(versions)
    y = list(range(len(versions)))[::-1]
    for index, source in enumerate(sources):
        widths = [table[v].get(source, 0) for v in versions]
        ax.barh(y, widths, left=left, color=cmap(index % 20), label=source, edgecolor="white",
                linewidth=0.5)
        left = [a + b for a, b in zip(left, widths)]
    ax.set_yticks(y, versions)
    ax.set_xlabel("training tokens (mixture manifest, all splits)")
    ax.set_title("Data composition per version (tokens by source)")
    if sources:
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7, frameon=False)
    _save(fig, path, dpi)
    plt.close(fig)


def plot_loss(loss: dict[str, list[tuple[float, float]]],
              final: dict[str, tuple[float, float | None]], versions: list[str], path: Path,
              dpi: int) -> None:
    """One curve per version; a version without a logged curve shows its final loss at its
    last step (``final[v] = (step, loss)``)."""
    plt = _figure_setup()
    fig, ax = plt.subplots(figsize=(8, 3.6))
    cmap = plt.get_cmap("tab10")
    for index, version in enumerate(versions):
        points = loss.get(version) or []
        color = cmap(index % 10)
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=2.5,
                    linewidth=1.2, color=color, label=version)
        elif final.get(version) and final[version][1] is not None:
            step, value = final[version]
            ax.plot([step], [value], marker="s", color=color, label=f"{version} (final only)")
    ax.set_xlabel("global step")
    ax.set_ylabel("training loss (completion tokens)")
    ax.set_title("Training loss by version")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, frameon=False)
    _save(fig, path, dpi)
    plt.close(fig)


def plot_accuracy(rows: list[dict[str, Any]], baseline: str, path: Path, dpi: int) -> None:
    plt = _figure_setup()
    versions = [r for r in rows if r["key"] != baseline]
    base = next((r for r in rows if r["key"] == baseline), {})
    fig, ax = plt.subplots(figsize=(8, 3.6))
    series = (("micro", "micro", "tab:blue"), ("macro", "macro", "tab:orange"),
              ("shuffled_micro", "shuffled options", "tab:green"))
    width = 0.8 / len(series)
    for offset, (column, label, color) in enumerate(series):
        xs = [i + (offset - 1) * width for i in range(len(versions))]
        ax.bar(xs, [r[column] or 0 for r in versions], width=width, color=color, label=label)
        if base.get(column) is not None:
            ax.axhline(base[column], color=color, linestyle="--", linewidth=1)
    ax.set_xticks(range(len(versions)), [r["key"] for r in versions])
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(f"Accuracy per version (dashed: baseline '{baseline}', no adapter)")
    ax.legend(fontsize=7, frameon=False, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path, dpi)
    plt.close(fig)


def render_figures(data: dict[str, Any], out_dir: Path, dpi: int) -> list[str]:
    versions, baseline = data["versions"], data["baseline"]
    sources, table = composition(data["manifests"], versions)
    plot_composition(sources, table, versions, out_dir / "composition.png", dpi)
    final = {}
    for row in training_rows(data["lineage"], data["train"], data["manifests"], versions):
        final[row["version"]] = (float(row["steps"] or 0), row["final_loss"])
    plot_loss(data["loss"], final, versions, out_dir / "loss.png", dpi)
    plot_accuracy(accuracy_rows(data["eval"], baseline, versions), baseline,
                  out_dir / "accuracy.png", dpi)
    return list(FIGURES)


# ------------------------------------------------------------------------ html
def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _pct(value: Any) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _signed(value: Any) -> str:
    return "" if value is None else f"{100 * value:+.1f} pt"


def _short(sha: Any) -> str:
    return f"<code title='{html.escape(str(sha))}'>{html.escape(str(sha)[:12])}</code>" if sha else "–"


def _table(headers: list[str], rows: list[list[str]], cls: str) -> str:
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = "\n".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return (f"<div class='scroll'><table class='{cls}'><thead><tr>{head}</tr></thead><tbody>\n"
            f"{body}\n</tbody></table></div>")


CSS = """
body { font-family: "DejaVu Sans", "Noto Sans CJK KR", sans-serif; margin: 24px auto;
       max-width: 1100px; color: #222; background: #fff; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 12px; margin: 8px 0; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; vertical-align: top; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; font-weight: bold; }
td.l, table.lineage td { text-align: left; }
.up { color: #176317; } .down { color: #9b1c1c; } .note { color: #555; font-size: 12px; }
img { max-width: 100%; border: 1px solid #eee; margin: 6px 0; }
code { font-size: 11px; } div.scroll { overflow-x: auto; }
"""


def render_html(data: dict[str, Any], figures: list[str]) -> str:
    """The page. Every version appears in every table; figures by relative path."""
    versions, baseline = data["versions"], data["baseline"]
    acc = accuracy_rows(data["eval"], baseline, versions, data.get("predictions"))
    scoring = sorted({str(r["scoring"]) for r in acc if r["scoring"]})
    lineage_html = _lineage_cells(lineage_rows(data["lineage"], data["manifests"], versions))
    sources, table = composition(data["manifests"], versions)
    comp_rows = [[html.escape(v)] + [_fmt(table[v].get(s)) if s in table[v] else "" for s in sources]
                 + [_fmt(sum(table[v].values()))] for v in versions]
    figure = {name: f"<img src='{name}' alt='{name[:-4]}'>" for name in figures}
    parts = [
        "<!DOCTYPE html>",
        "<html lang='en'><head><meta charset='utf-8'>",
        "<title>KRX financial LLM — versions report</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>KRX financial LLM — versions report</h1>",
        f"<p class='note'>Versions: {', '.join(html.escape(v) for v in versions)}; baseline "
        f"<b>{html.escape(baseline)}</b> = the base model without adapter. Scoring: "
        f"{html.escape(', '.join(scoring) or '–')}. Built by <code>dvc repro report</code> from "
        "metrics/eval, metrics/train, data/mixtures/*.json and models/*/lineage.json, at git "
        f"revision <code>{html.escape(str(data.get('git_revision') or 'unknown'))}</code>.</p>",
        *_krx_section(krx_rows(data["eval"], baseline, versions, data.get("predictions"),
                               data.get("item_categories")), baseline, data.get("alpha", 0.05),
                      data.get("judge")),
        *_accuracy_section(acc, baseline, data.get("alpha", 0.05), figure.get("accuracy.png", "")),
        "<h2 id='composition'>Data composition per version</h2>",
        figure.get("composition.png", ""),
        _table(["version", *[html.escape(s) for s in sources], "total tokens"], comp_rows, "composition"),
        *_training_section(data, figure.get("loss.png", "")),
        "<h2 id='changes'>What changed between versions</h2>",
        "<p class='note'>Each version against its parent (a continued version) or the first "
        "version: the resolved training params that differ and the mixture sources whose "
        "examples differ (from lineage.json and the mixture manifests).</p>",
        _table(["version", "compared with", "training params", "data (examples per source)"],
               _diff_cells(version_diffs(data["lineage"], data["manifests"], versions)), "changes"),
        "<h2 id='lineage'>Lineage</h2>",
        "<p class='note'>version → parent → base → mixture (sha256) → manifest → adapter → "
        "source inputs (sha256 as recorded by mix). Full hashes on hover; "
        "<code>python -m stages.lineage models/&lt;version&gt;</code> re-checks them.</p>",
        _table(["version", "parent", "base model", "mixture", "manifest", "adapter", "sources"],
               lineage_html, "lineage"),
        *_generation_section(data),
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _training_section(data: dict[str, Any], figure: str) -> list[str]:
    """Training (loss curves, start/final/dev losses) and the dev loss against the base."""
    versions = data["versions"]
    return [
        "<h2 id='training'>Training</h2>",
        figure,
        "<p class='note'>start loss: the answer loss of the weights training starts from, on "
        "its first 32 examples; a continued version starts from its parent's adapter: its loss "
        "on the examples its parent measured its end loss on (where the parent ended) and the "
        "base's loss on its own examples are shown below. final: the last logged training "
        "loss; dev: trl's loss on the dev split after training (4-bit).</p>",
        _table(["version", "examples", "tokens", "start loss", "final loss", "dev loss", "steps",
                "seconds", "tokenizer"], _training_cells(training_rows(data["lineage"], data["train"], data["manifests"],
                                             versions)), "training"),
        "<h2 id='dev-loss'>Dev loss: each version against the base</h2>",
        "<p class='note'>The answer loss (mean negative log-likelihood of the answer tokens, as "
        "training computes it) on the dev split of the version's own mixture, held out of its "
        "training: with the version's adapter and with the base model (adapter off), measured "
        "by evaluate. Green: the version is better than the base on it.</p>",
        _table(["version", "dev examples", "answer tokens", "version", "base", "Δ vs base"],
               _dev_loss_cells(dev_loss_rows(data["eval"], versions)), "devloss"),
    ]


def _generation_section(data: dict[str, Any]) -> list[str]:
    """The generation funnel per domain and the LLM calls and cost per stage."""
    return [
        "<h2 id='funnel'>Generation funnel per domain</h2>",
        "<p class='note'>Items at each step of the question generation, from each stage's "
        "metrics: collected (the split the filter reads) → passed the local prefilter → judged "
        "relevant by the LLM → transformed into 7-choice questions; synthesized new questions "
        "(of the target) → questions solved and verified → two-step training pairs (of the "
        "target). Rejects by stage and reason, and the LLM calls, tokens and dollars of the "
        "domain's four stages.</p>",
        _table(["domain", *[c for c, _, _ in FUNNEL[:5]], "solved", "pairs", "rejected (reason)",
                "LLM calls", "tokens", "spent"], _funnel_cells(funnel_rows(data.get("stages", {}))),
               "funnel"),
        "<h2 id='llm'>LLM calls and cost</h2>",
        "<p class='note'>Per LLM stage, from its last run's metrics: paid calls (of them through "
        "the Batch API), answers served by the response cache, paid tokens, dollars spent and "
        "what the cached answers would have cost. <code>make plan</code> gives the cost of a run "
        "before it starts.</p>",
        _table(["stage", "calls", "batch", "from cache", "tokens", "spent", "saved by cache"],
               llm_rows(llm_blocks(data.get("stages", {}))), "llm"),
    ]


def _accuracy_section(acc: list[dict[str, Any]], baseline: str, alpha: float, figure: str
                      ) -> list[str]:
    """The accuracy and per-category parts of the page."""
    sets = sorted({name for row in acc for name in row["by_set"]})
    category_headers, category_rows = _category_cells(acc)
    return [
        "<h2 id='accuracy'>Accuracy against the baseline</h2>",
        figure,
        f"<p class='note'>micro = share of items right, with its 95% Wilson interval. A change "
        f"against the baseline is coloured (green up, red down) only when the exact McNemar "
        f"test on the same items gives p &lt; {alpha:g} (two-sided; +gained/−lost are the items "
        "only the version / only the baseline got right); otherwise it is within noise. "
        "<i>scored as</i>: how each model was scored (the way it was trained to answer).</p>",
        _table(["version", "items", "micro [95% CI]", "Δ micro vs baseline", "McNemar vs baseline",
                "macro", "shuffled options", "4-choice", "7-choice", *[html.escape(s) for s in sets],
                "scored as"], _accuracy_cells(acc, baseline, sets, alpha), "accuracy"),
        "<h2 id='categories'>Accuracy per category</h2>",
        "<p class='note'>Items per category in brackets.</p>",
        _table(["version", *category_headers], category_rows, "categories"),
    ]


def _krx_section(rows: list[dict[str, Any]], baseline: str, alpha: float,
                 judges: dict[str, dict[str, Any]] | None = None) -> list[str]:
    """The KRX-Bench table: versions as rows, the five categories and their average as columns,
    then the open-ended score and its judge."""
    judges = judges or {}
    names = sorted({str(j.get("judge")) for j in judges.values() if j.get("scored")})
    open_cells = open_ended_cells(judges, [r["key"] for r in rows], baseline)
    base = rows[0]["categories"] if rows else {}
    headers = []
    for category, name in CONTEST_CATEGORIES.items():
        entry = base.get(category) or {"items": 0}
        if entry["items"]:
            half = (entry["ci95_high"] - entry["ci95_low"]) / 2
            need = items_for_half_width(entry["accuracy"])
            headers.append(f"{html.escape(name)} <span class='note'>({html.escape(category)}; "
                           f"{_fmt(entry['items'])} items, ±{100 * half:.1f} pt; ±5 pt needs "
                           f"≈{need:,})</span>")
        else:
            headers.append(f"{html.escape(name)} <span class='note'>({html.escape(category)}; "
                           "no items)</span>")
    body = [_krx_cells(row, baseline, alpha) + [open_cells[row["key"]]] for row in rows]
    body.append(["majority class <span class='note'>(always the most frequent key)</span>",
                 *[_pct(base.get(c, {}).get("majority_rate")) if base.get(c, {}).get("items")
                   else "missing" for c in CONTEST_CATEGORIES], "", ""])
    judged_by = ("; ".join(html.escape(n) for n in names) if names else "no open-ended answers")
    return [
        "<h2 id='krx-bench'>KRX-Bench categories</h2>",
        "<p class='note'>The leaderboard's view: accuracy per contest category with its 95% "
        "Wilson interval and items, and the mean over the categories that have items (it says "
        "over how many of the five). A change against the baseline is coloured only when the "
        f"exact McNemar test on that category's items gives p &lt; {alpha:g}. A category "
        "without items is <i>missing</i>, never 0. <i>2-step</i>: the version answered that "
        "category with a solution, then the letter (its sources taught it so); otherwise with a "
        "letter. The majority row: the accuracy of always giving the set's most frequent answer "
        "(for 주가 예측, always the more frequent direction). <i>open-ended</i>: the mean score "
        f"of the free-form answers (judge@), judged by: {judged_by}; the average of the five "
        "categories leaves it out.</p>",
        _table(["version", *headers, "average", "open-ended"], body, "krx"),
    ]


def _krx_cells(row: dict[str, Any], baseline: str, alpha: float) -> list[str]:
    cells = [html.escape(row["key"]) + (" (baseline)" if row["key"] == baseline else "")]
    for category in CONTEST_CATEGORIES:
        entry = row["categories"][category]
        if not entry.get("items"):
            cells.append("<span class='note'>missing</span>")
            continue
        paired = entry.get("paired")
        cls = ""
        if paired and paired["p_value"] < alpha and paired["gained"] != paired["lost"]:
            cls = "up" if paired["gained"] > paired["lost"] else "down"
        test = "" if not paired else (f" <span class='note'>p={paired['p_value']:.3g} "
                                      f"(+{paired['gained']}/−{paired['lost']})</span>")
        mode = " <span class='note'>2-step</span>" if entry.get("two_step") else ""
        cells.append(f"<span class='{cls}'>{_pct(entry['accuracy'])}</span> <span class='note'>"
                     f"[{_pct(entry['ci95_low'])}, {_pct(entry['ci95_high'])}] n={_fmt(entry['items'])}"
                     f"</span>{test}{mode}")
    over = row.get("averaged_over") or 0
    cells.append("–" if row.get("average") is None else
                 f"{_pct(row['average'])} <span class='note'>over {over} of {len(CONTEST_CATEGORIES)}</span>")
    return cells


def _accuracy_cells(acc: list[dict[str, Any]], baseline: str, sets: list[str],
                    alpha: float) -> list[list[str]]:
    """The accuracy table's HTML cells. A delta is coloured only when the exact McNemar test
    on the paired items says p < alpha; otherwise it is shown plain (not distinguishable from
    noise on these items)."""
    acc_rows = []
    for row in acc:
        delta, paired, interval = row["delta"], row["paired"], row["interval"]
        significant = paired is not None and delta is not None and paired["p_value"] < alpha
        cls = ("up" if delta > 0 else "down" if delta < 0 else "") if significant else ""
        name = html.escape(row["key"]) + (" (baseline)" if row["key"] == baseline else "")
        ci = f" <span class='note'>[{_pct(interval[0])}, {_pct(interval[1])}]</span>" if interval else ""
        test = "–" if paired is None else (f"p={paired['p_value']:.3g} (+{paired['gained']}/"
                                           f"−{paired['lost']} of {paired['paired_items']})")
        acc_rows.append([name, _fmt(row["items"]), _pct(row["micro"]) + ci,
                         f"<span class='{cls}'>{_signed(delta)}</span>", test, _pct(row["macro"]),
                         _pct(row["shuffled_micro"]), _pct(row["choices_4"]), _pct(row["choices_7"]),
                         *[_pct(row["by_set"].get(s)) for s in sets],
                         html.escape(str(row.get("scored_as") or row.get("scoring") or "–"))])
    return acc_rows


def _category_cells(acc: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Per-category accuracy (categories as columns, one row per key) and items per category."""
    categories = sorted({c for row in acc for c in row["by_category"]})
    rows = []
    for row in acc:
        cells = []
        for c in categories:
            entry = row["by_category"].get(c) or {}
            cells.append(_pct(entry.get("accuracy")) if entry else "")
        rows.append([html.escape(row["key"]), *cells])
    items = {c: next((row["by_category"][c].get("items") for row in acc if c in row["by_category"]), None)
             for c in categories}
    headers = [f"{html.escape(c)} <span class='note'>({_fmt(items[c])})</span>" for c in categories]
    return headers, rows


def _training_cells(train: list[dict[str, Any]]) -> list[list[str]]:
    """The training table's HTML cells."""
    def start(r: dict[str, Any]) -> str:
        text = _fmt(r.get("start_loss"), 4)
        if r.get("start_loss_on_parent") is not None:
            parent = html.escape(str(r.get("parent")))
            text += (f"<br><span class='note'>on {parent}'s examples {_fmt(r['start_loss_on_parent'], 4)}"
                     f" ({parent} ended at {_fmt(r.get('parent_end_loss'), 4)})</span>")
        if r.get("start_loss_base") is not None:
            text += f"<br><span class='note'>base {_fmt(r['start_loss_base'], 4)}</span>"
        return text

    return [[html.escape(r["version"]), _fmt(r["examples"]), _fmt(r["tokens"]), start(r),
             _fmt(r["final_loss"], 4), _fmt(r["eval_loss"], 4), _fmt(r["steps"]),
             _fmt(r["train_seconds"], 1), f"<span class='l'>{html.escape(str(r['tokenizer'] or '–'))}</span>"]
            for r in train]


def _lineage_cells(lineage: list[dict[str, Any]]) -> list[list[str]]:
    """The lineage table's HTML cells: names, then short hashes (full ones on hover)."""
    lineage_html = []
    for r in lineage:
        sources = "<br>".join(f"{html.escape(name)}: <code>{html.escape(str(path))}</code> {_short(sha)}"
                              for name, path, sha in r["sources"]) or "–"
        lineage_html.append([html.escape(r["version"]), html.escape(r["parent"] or "– (base)"),
                             f"{html.escape(str(r['base']))}<br><span class='note'>"
                             f"{html.escape(str(r['base_revision']))}</span>",
                             f"<code>{html.escape(str(r['mixture']))}</code><br>{_short(r['mixture_sha256'])}",
                             _short(r["manifest_sha256"]), _short(r["adapter_sha256"]), sources])
    return lineage_html


def report_metrics(data: dict[str, Any], figures: list[str]) -> dict[str, Any]:
    rows = accuracy_rows(data["eval"], data["baseline"], data["versions"], data.get("predictions"))
    versions = [r for r in rows if r["key"] != data["baseline"] and r["micro"] is not None]
    # ties go to the version listed first (params order): the earlier, simpler recipe
    best = max(versions, key=lambda r: (r["micro"], -versions.index(r)), default=None)
    dev = dev_loss_rows(data["eval"], data["versions"])
    krx = [r for r in krx_rows(data["eval"], data["baseline"], data["versions"])
           if r["key"] != data["baseline"] and r["average"] is not None]
    best_krx = max(krx, key=lambda r: (r["average"], -krx.index(r)), default=None)
    return {"versions": len(data["versions"]), "figures": figures,
            "krx_average": {r["key"]: r["average"] for r in krx_rows(
                data["eval"], data["baseline"], data["versions"])},
            "best_krx_version": best_krx["key"] if best_krx else None,
            "best_krx_average": best_krx["average"] if best_krx else None,
            "open_ended": {k: j.get("score_mean") for k, j in sorted((data.get("judge") or {}).items())},
            "git_revision": data.get("git_revision"),
            "dev_loss_below_base": sorted(r["version"] for r in dev if (r["delta"] or 0) < 0),
            "baseline_micro": rows[0]["micro"],
            "best_version": best["key"] if best else None,
            "best_micro": best["micro"] if best else None,
            "versions_above_baseline": sum(1 for r in versions if (r["delta"] or 0) > 0),
            "significant_vs_baseline": sorted(
                r["key"] for r in versions
                if r["paired"] and r["paired"]["p_value"] < data.get("alpha", 0.05))}


@stage_main
def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__, rejects=False)
    parser.add_argument("--eval-dir", required=True)
    parser.add_argument("--train-dir", required=True)
    parser.add_argument("--mixtures-dir", required=True)
    parser.add_argument("--models-dir", required=True)
    parser.add_argument("--live-dir", required=True)
    parser.add_argument("--predictions-dir", required=True,
                        help="evaluate's per-item predictions <dir>/<key>.parquet (paired tests)")
    parser.add_argument("--judge-dir", help="judge@'s metrics <dir>/<key>.json (open-ended scores)")
    parser.add_argument("--versions", required=True, nargs="+", help="the versions, in order")
    parser.add_argument("--llm-metrics", nargs="*", default=[],
                        help="metrics files / directories of the LLM stages (calls and cost)")
    args = parser.parse_args(argv)
    timer = Timer()
    params = load_params(None, args.params)
    log = setup_logging(args.log, STAGE)

    data = load_inputs(params, args.versions, args.eval_dir, args.train_dir, args.mixtures_dir,
                       args.models_dir, args.live_dir)
    data["predictions"], data["item_categories"] = read_predictions(
        args.predictions_dir, [params.baseline, *args.versions])
    data["judge"] = load_judge_metrics(args.judge_dir, [params.baseline, *args.versions])
    data["stages"] = load_stage_metrics(args.llm_metrics)
    data["git_revision"] = git_revision()
    with atomic_dir(args.out) as tmp:
        figures = render_figures(data, Path(tmp), params.figure_dpi)
        write_text(render_html(data, figures), Path(tmp) / "index.html")
    metrics = {**report_metrics(data, figures), "seconds": timer.seconds}
    write_metrics(args.metrics, metrics)
    log.info("report for %d versions (baseline %s) -> %s/index.html (%.1fs)", len(args.versions),
             params.baseline, args.out, timer.seconds)


if __name__ == "__main__":
    main()
