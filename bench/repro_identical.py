"""Reproducibility: two quickstart runs in two fresh workspaces give the same md5s?

    .venv/bin/python bench/repro_identical.py [--parallel] [--keep] [--no-write]

1. Snapshot the work tree the way a fresh clone of it would look (``git ls-files --cached
   --others --exclude-standard``: tracked files plus untracked, not ignored ones, so
   uncommitted stages count) into a temp dir: both runs use the same bytes even while the
   checkout keeps changing.
2. Run ``scripts/quickstart.py --workspace A`` and ``--workspace B`` from that snapshot (one
   after the other, or at the same time with ``--parallel``). When a run's ``dvc repro`` fails,
   ``dvc repro --keep-going`` runs in that workspace (same offline environment) so every stage
   that can run does, and the comparison covers what exists.
3. Compare the md5 of every output in the two ``dvc.lock`` files: a table (path, md5 A, md5 B,
   same?) on stdout, a summary per kind of output (data/…, models/…, dvclive/… and
   checkpoints/…, metrics/…, logs/…), and for each differing output what differs inside
   (files of a directory; top-level keys of a JSON file). A stage whose own inputs (code,
   samples, params: deps that no stage produced) differ between A and B is flagged as not
   comparable.
4. Append the result to ``bench/RESULTS.md`` (unless ``--no-write``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.quickstart import offline_env  # noqa: E402  (after sys.path)
from stages.lineage import load_yaml, md5_file  # noqa: E402

RESULTS = ROOT / "bench" / "RESULTS.md"
DVC = str(Path(sys.executable).parent / "dvc")
_TIMING = re.compile(r"\d{8}_\d{6}|\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d(,\d+)?|\d+(\.\d+)?\s?(s|ms)\b|[\d.]+ (it|items|pages)/s")
KINDS = (("data", ("data/",)), ("models", ("models/",)),
         ("training plots + checkpoints", ("dvclive/", "checkpoints/")),
         ("metrics", ("metrics/",)), ("logs", ("logs/",)), ("reports", ("reports/",)))


# ------------------------------------------------------------------------ running
def snapshot(dst: Path) -> int:
    """Copy the files a fresh clone of the work tree would hold into ``dst``; returns count."""
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], capture_output=True, check=True).stdout
    count = 0
    for rel in sorted({p for p in listed.decode().split("\0") if p}):
        src = ROOT / rel
        if not src.is_file():  # deleted in the work tree but still in the index
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst / rel)
        count += 1
    return count


def run_quickstart(source: Path, workspace: Path, log: Path) -> dict[str, Any]:
    """One quickstart (then ``dvc repro --keep-going`` if it failed); rcs, seconds, log."""
    started = time.perf_counter()
    with open(log, "w", encoding="utf-8") as handle:
        rc = subprocess.run([sys.executable, str(source / "scripts/quickstart.py"), "--workspace",
                             str(workspace)], stdout=handle, stderr=subprocess.STDOUT).returncode
        keep_going_rc = None
        if rc != 0:  # the quickstart's own offline environment, as its dvc repro had
            handle.write("\n==== repro_identical: dvc repro --keep-going ====\n")
            handle.flush()
            keep_going_rc = subprocess.run([DVC, "repro", "--keep-going"], cwd=workspace,
                                           env=offline_env(workspace), stdout=handle,
                                           stderr=subprocess.STDOUT).returncode
    return {"workspace": str(workspace), "rc": rc, "keep_going_rc": keep_going_rc,
            "seconds": round(time.perf_counter() - started, 1), "log": str(log)}


def failed_stages(log: Path) -> list[str]:
    """Stage names of ``ERROR: failed to reproduce '<stage>'`` lines in a run's log."""
    names = []
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        if "failed to reproduce '" in line:
            names.append(line.split("failed to reproduce '", 1)[1].split("'", 1)[0])
    return sorted(set(names))


# ------------------------------------------------------------------------ comparing
def lock_entries(workspace: Path) -> dict[str, Any]:
    path = workspace / "dvc.lock"
    return (load_yaml(path) or {}).get("stages", {}) if path.is_file() else {}


def outputs(stages: dict[str, Any]) -> dict[str, tuple[str, str | None]]:
    """{out path: (stage, md5)} of a dvc.lock."""
    return {out["path"]: (stage, out.get("md5"))
            for stage, entry in stages.items() for out in entry.get("outs", []) or []}


def kind_of(path: str) -> str:
    for kind, prefixes in KINDS:
        if path.startswith(prefixes):
            return kind
    return "other"


def flat_json(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        flat: dict[str, Any] = {}
        for key, value in obj.items():
            flat.update(flat_json(value, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): obj}


def explain_file(a: Path, b: Path) -> str:
    """What differs between two versions of one file, in a few words."""
    if not a.is_file() or not b.is_file():
        return "only in " + ("A" if a.is_file() else "B")
    if a.suffix == ".json":
        try:
            fa = flat_json(json.loads(a.read_text(encoding="utf-8")))
            fb = flat_json(json.loads(b.read_text(encoding="utf-8")))
        except ValueError:
            return "differs"
        keys = sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))
        return "keys " + ", ".join(keys[:8]) + (f" (+{len(keys) - 8})" if len(keys) > 8 else "")
    if a.suffix == ".tsv":  # dvclive curves: which columns differ (a timestamp column always does)
        rows_a = [line.split("\t") for line in a.read_text(encoding="utf-8").splitlines()]
        rows_b = [line.split("\t") for line in b.read_text(encoding="utf-8").splitlines()]
        if rows_a and rows_b and rows_a[0] == rows_b[0] and len(rows_a) == len(rows_b):
            columns = [name for i, name in enumerate(rows_a[0])
                       if any(ra[i:i + 1] != rb[i:i + 1] for ra, rb in zip(rows_a[1:], rows_b[1:]))]
            return "columns " + ", ".join(columns)
    if a.suffix == ".log":  # log lines carry a timestamp and often a duration
        ta, tb = (_TIMING.sub("<t>", p.read_text(encoding="utf-8", errors="replace")) for p in (a, b))
        return "only timestamps/durations" if ta == tb else "differs beyond timestamps/durations"
    return f"differs ({a.stat().st_size} vs {b.stat().st_size} bytes)"


def explain(a_root: Path, b_root: Path, path: str) -> dict[str, str]:
    """{relative file: what differs} inside a differing output (a file: its own entry)."""
    a, b = a_root / path, b_root / path
    if not a.exists() or not b.exists():
        return {path: "not on disk in " + ("A" if not a.exists() else "B")}
    if a.is_file():
        return {path: explain_file(a, b)}
    files = {p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file()}
    files |= {p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file()}
    found = {}
    for rel in sorted(files):
        fa, fb = a / rel, b / rel
        if not (fa.is_file() and fb.is_file() and md5_file(fa) == md5_file(fb)):
            found[rel] = explain_file(fa, fb)
    return found


def source_deps(stages: dict[str, Any], outs: set[str]) -> dict[str, dict[str, str | None]]:
    """{stage: {dep path: md5}} for deps no stage produced (code, samples), plus params."""
    deps = {}
    for stage, entry in stages.items():
        own = {d["path"]: d.get("md5") for d in entry.get("deps", []) or []
               if d["path"] not in outs and not any(d["path"].startswith(o + "/") for o in outs)}
        own["<params>"] = json.dumps(entry.get("params"), sort_keys=True, default=str)
        deps[stage] = own
    return deps


def compare(a_root: Path, b_root: Path) -> dict[str, Any]:
    stages_a, stages_b = lock_entries(a_root), lock_entries(b_root)
    outs_a, outs_b = outputs(stages_a), outputs(stages_b)
    deps_a = source_deps(stages_a, set(outs_a))
    deps_b = source_deps(stages_b, set(outs_b))
    not_comparable = {stage: sorted(p for p in set(deps_a[stage]) | set(deps_b[stage])
                                    if deps_a[stage].get(p) != deps_b[stage].get(p))
                      for stage in set(deps_a) & set(deps_b)}
    not_comparable = {s: p for s, p in not_comparable.items() if p}
    rows = []
    for path in sorted(set(outs_a) | set(outs_b)):
        stage = (outs_a.get(path) or outs_b.get(path))[0]
        md5_a = outs_a.get(path, (None, None))[1]
        md5_b = outs_b.get(path, (None, None))[1]
        row = {"path": path, "stage": stage, "kind": kind_of(path), "md5_a": md5_a, "md5_b": md5_b,
               "same": md5_a is not None and md5_a == md5_b,
               "comparable": md5_a is not None and md5_b is not None and stage not in not_comparable}
        if row["comparable"] and not row["same"]:
            row["differences"] = explain(a_root, b_root, path)
        rows.append(row)
    # the weights alone: is the adapter of each version bitwise the same?
    adapters = {}
    for row in rows:
        if row["kind"] == "models" and row["path"] != "models/base" and row["comparable"]:
            fa = a_root / row["path"] / "adapter_model.safetensors"
            fb = b_root / row["path"] / "adapter_model.safetensors"
            if fa.is_file() and fb.is_file():
                adapters[row["path"]] = md5_file(fa) == md5_file(fb)
    return {"rows": rows, "not_comparable": not_comparable, "adapters": adapters,
            "stages_a": len(stages_a), "stages_b": len(stages_b)}


def summary(result: dict[str, Any]) -> list[dict[str, Any]]:
    table = []
    for kind in [k for k, _ in KINDS] + ["other"]:
        rows = [r for r in result["rows"] if r["kind"] == kind]
        if not rows:
            continue
        comparable = [r for r in rows if r["comparable"]]
        same = [r for r in comparable if r["same"]]
        table.append({"kind": kind, "outputs": len(rows), "compared": len(comparable),
                      "identical": len(same),
                      "differ": [r["path"] for r in comparable if not r["same"]]})
    return table


# ------------------------------------------------------------------------ report
def short(md5: str | None) -> str:
    return "—" if md5 is None else md5[:10] + (".dir" if md5.endswith(".dir") else "")


def findings(result: dict[str, Any]) -> list[str]:
    """Plain statements derived from the measurement."""
    lines = []
    for item in summary(result):
        verdict = ("all identical" if item["identical"] == item["compared"]
                   else f"{len(item['differ'])} differ")
        lines.append(f"- {item['kind']}: {item['identical']}/{item['compared']} compared outputs "
                     f"identical ({verdict}).")
    adapters = result["adapters"]
    if adapters:
        same = sorted(p for p, s in adapters.items() if s)
        lines.append(f"- Adapter weights (`adapter_model.safetensors`): {len(same)}/{len(adapters)} "
                     "versions bitwise identical between the two runs"
                     + ("." if len(same) == len(adapters)
                        else f"; different: {', '.join(sorted(set(adapters) - set(same)))}."))
        model_rows = [r for r in result["rows"] if r["kind"] == "models" and r.get("differences")]
        reasons: dict[str, set[str]] = {}
        for row in model_rows:
            for name, why in row["differences"].items():
                if name != "adapter_model.safetensors":  # sizes vary by version: keep the gist
                    reasons.setdefault(name, set()).add(why.split(" (")[0])
        inside = [f"`{name}` ({'; '.join(sorted(why))})" for name, why in sorted(reasons.items())]
        if inside:
            lines.append("- Inside `models/<v>/` besides the weights, these files differ: "
                         + "; ".join(inside[:6]) + (" …" if len(inside) > 6 else "") + ".")
    if result["not_comparable"]:
        lines.append("- Not comparable (their own inputs differed between A and B): "
                     + ", ".join(f"{s} ({', '.join(p)})" for s, p in sorted(result["not_comparable"].items())))
    return lines


def markdown(result: dict[str, Any], runs: list[dict[str, Any]], files: int, failed: dict[str, list[str]]) -> str:
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    try:
        import torch
        torch_info = f"torch {torch.__version__}, {torch.get_num_threads()} threads, CUDA {torch.cuda.is_available()}"
    except Exception:  # noqa: BLE001 - informational only
        torch_info = "torch not importable"
    lines = [f"## repro_identical — {now}", "",
             f"Machine: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}; Python "
             f"{platform.python_version()}, {torch_info}. Snapshot of the work tree ({files} files, "
             "as a fresh clone would hold them) → two quickstart workspaces A and B"
             f"{' run at the same time' if len(runs) == 2 and runs[0].get('parallel') else ', one after the other'}; "
             "the md5 of every output in the two `dvc.lock` files compared.", ""]
    for name, run in zip("AB", runs):
        kg = "" if run["keep_going_rc"] is None else f", then `dvc repro --keep-going` rc {run['keep_going_rc']}"
        lines.append(f"- run {name}: quickstart rc {run['rc']}{kg}, {run['seconds']} s; "
                     f"failed stages: {', '.join(failed[name]) or 'none'}")
    lines += ["", f"Stages in dvc.lock: A {result['stages_a']}, B {result['stages_b']}.", "",
              "| outputs | in dvc.lock | compared | identical | differing |", "|---|---|---|---|---|"]
    for item in summary(result):
        differ = ", ".join(f"`{p}`" for p in item["differ"][:4])
        more = len(item["differ"]) - 4
        lines.append(f"| {item['kind']} | {item['outputs']} | {item['compared']} | {item['identical']} | "
                     f"{differ or '—'}{f' … (+{more})' if more > 0 else ''} |")
    lines += ["", "Findings:", *findings(result), ""]
    differing = [r for r in result["rows"] if r.get("differences")]
    if differing:
        lines += ["What differs inside each differing output:", "",
                  "| output | file | difference |", "|---|---|---|"]
        grouped: dict[tuple[str, str], list[str]] = {}
        for row in differing:
            for rel, why in row["differences"].items():
                if row["kind"] in ("metrics", "logs"):  # one line per kind and reason
                    grouped.setdefault((row["kind"], why), []).append(row["path"])
                else:
                    lines.append(f"| `{row['path']}` | `{rel}` | {why} |")
        for (kind, why), paths in sorted(grouped.items()):
            lines.append(f"| {kind} ({len(paths)} files) | {', '.join(f'`{p}`' for p in paths[:3])}"
                         f"{' …' if len(paths) > 3 else ''} | {why} |")
        lines.append("")
    lines += ["<details><summary>Every output (path, md5 A, md5 B, same?)</summary>", "",
              "| path | stage | md5 A | md5 B | same |", "|---|---|---|---|---|"]
    for row in result["rows"]:
        mark = "yes" if row["same"] else ("no" if row["comparable"] else "n/a")
        lines.append(f"| `{row['path']}` | {row['stage']} | {short(row['md5_a'])} | {short(row['md5_b'])} | {mark} |")
    lines += ["", "</details>", ""]
    return "\n".join(lines)


def print_table(result: dict[str, Any]) -> None:
    width = max((len(r["path"]) for r in result["rows"]), default=10)
    print(f"{'path':{width}}  {'md5 A':36}  {'md5 B':36}  same?")
    for row in result["rows"]:
        mark = "yes" if row["same"] else ("NO" if row["comparable"] else "n/a")
        print(f"{row['path']:{width}}  {row['md5_a'] or '—':36}  {row['md5_b'] or '—':36}  {mark}")
    print()
    for item in summary(result):
        print(f"{item['kind']:30} {item['identical']}/{item['compared']} identical"
              + (f"; differ: {', '.join(item['differ'])}" if item["differ"] else ""))
    print()
    print("\n".join(findings(result)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", help="where the snapshot and workspaces go (default: a new temp dir)")
    parser.add_argument("--parallel", action="store_true", help="run A and B at the same time")
    parser.add_argument("--keep", action="store_true", help="keep the workspaces")
    parser.add_argument("--no-write", action="store_true", help=f"do not append to {RESULTS}")
    parser.add_argument("--compare-only", nargs=2, metavar=("A", "B"),
                        help="compare two existing workspaces, run nothing")
    args = parser.parse_args(argv)

    if args.compare_only:
        a, b = (Path(p).resolve() for p in args.compare_only)
        result = compare(a, b)
        print_table(result)
        return 0

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="repro_identical_")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    source, ws = workdir / "source", {n: workdir / f"ws_{n}" for n in "AB"}
    for path in (source, *ws.values()):
        if path.exists():
            raise SystemExit(f"{path} exists: the runs must start from fresh workspaces")
    files = snapshot(source)
    print(f"snapshot: {files} files -> {source}", flush=True)
    jobs = [(source, ws[n], workdir / f"run_{n}.log") for n in "AB"]
    if args.parallel:
        with ThreadPoolExecutor(2) as pool:
            runs = list(pool.map(lambda job: run_quickstart(*job), jobs))
    else:
        runs = [run_quickstart(*job) for job in jobs]
    for run in runs:
        run["parallel"] = args.parallel
        print(f"{run['workspace']}: rc {run['rc']} keep-going rc {run['keep_going_rc']} "
              f"{run['seconds']} s (log {run['log']})", flush=True)
    failed = {n: failed_stages(Path(run["log"])) for n, run in zip("AB", runs)}
    result = compare(ws["A"], ws["B"])
    print_table(result)
    if not args.no_write:
        with open(RESULTS, "a", encoding="utf-8") as handle:
            handle.write("\n" + markdown(result, runs, files, failed))
        print(f"appended to {RESULTS}")
    if not args.keep:
        shutil.rmtree(workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
