"""A production rehearsal: the production dvc.yaml and params.yaml at production size, with
only the outside world replaced (a benchmark, not a CI test).

    .venv/bin/python bench/rehearsal.py [--until mix] [--reports 4000] [--latency 1 3]
                                         [--workdir DIR] [--inputs DIR] [--no-write]

1. Inputs (``bench/rehearsal_data.py``, reused from ``--inputs`` when already there): hub
   replicas laid out like the pinned repositories (KMMLU's configs and CSVs with
   ``Accounting-train.csv`` only a header, MetaMathQA-40K's 40,000 rows, the ko-en parquet),
   the local raw files, the evaluation sets and ~4,000 generated report PDFs.
2. A temp git + DVC project (``--workdir``): a copy of ``stages/``, ``dvc.yaml``, ``configs/``
   and ``data/samples/`` (the few-shot files the production params name), the inputs under
   ``data/raw/`` (``dvc add``-ed, as production would) and ``params.yaml`` = the production
   params with ONLY these replaced: hub sources point at the replicas, ``llm_defaults.base_url``
   at the stand-in, the base model is the quickstart's tiny Qwen2 built locally (the hub is out
   of reach), and training/evaluation use the quickstart's CPU sizes. Targets, prices, models,
   prompts, thresholds and concurrency are production's. ``python -m stages.check`` must find
   nothing missing before anything runs.
3. The OpenAI API is ``bench/standin.py``: a separate process on 127.0.0.1 that answers like a
   model (content a function of the prompt, the JSON schema followed, a share of wrong letters,
   invalid JSON / truncation / refusals, 429 with Retry-After and 5xx at set rates, 1-3 s
   latency, usage counted with o200k_base).
4. ``dvc repro`` of everything up to ``--until`` (``mix``: every mixture, stopping before
   training; ``all``: train and evaluate the tiny model too).
5. Per stage (from its metrics and the stand-in's counters): requests, tokens, cost at the
   params' prices, wall time, accepted / rejected by reason, whether each target was met
   exactly; then the projected production bill. The table is appended to bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.standin import StandIn  # noqa: E402  (after sys.path)
from stages.common.params import deep_merge, read_yaml  # noqa: E402

RESULTS = ROOT / "bench" / "RESULTS.md"
BIN = Path(sys.executable).parent
COPIED = ("stages", "dvc.yaml", "configs", "data/samples")
LLM_STAGES = ("summarize", "filter", "transform", "synthesize", "solve")
QUICKSTART = ROOT / "data" / "samples" / "quickstart.params.yaml"


# ------------------------------------------------------------------------ the project
def sh(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, log: Path | None = None,
       check: bool = True) -> subprocess.CompletedProcess:
    if log is None:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    else:
        with log.open("a", encoding="utf-8") as out:
            proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  text=True)
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout or "")[-3000:] if log is None else f"see {log}"
        raise SystemExit(f"rehearsal: {' '.join(cmd)} failed ({proc.returncode}): {detail}")
    return proc


def make_inputs(inputs: Path, reports: int) -> float:
    """Write the production-size inputs once (``--inputs`` keeps them between runs): the
    documents (``bench/rehearsal_data.py``) and the daily prices of ~2,000 tickers over three
    years that stock@ and agent@ read (``bench/stock_scale.write_inputs``)."""
    start = time.monotonic()
    if (inputs / "overrides.yaml").is_file():
        print(f"inputs: reusing {inputs}")
    else:
        sh([sys.executable, str(ROOT / "bench" / "rehearsal_data.py"), "--out", str(inputs),
            "--reports", str(reports)], cwd=ROOT, log=None)
    if not (inputs / "data/raw/prices/stock_prices.csv").is_file():
        from bench.stock_scale import write_inputs
        write_inputs(inputs, 2000, 3)
    return time.monotonic() - start


def rehearsal_params(inputs: Path, base_url: str, until: str) -> dict[str, Any]:
    """Production params with only the outside world (and the CPU-only model) replaced."""
    production = read_yaml((ROOT / "params.yaml").read_text(encoding="utf-8"))
    replicas = read_yaml((inputs / "overrides.yaml").read_text(encoding="utf-8")) or {}
    quick = read_yaml(QUICKSTART.read_text(encoding="utf-8"))
    profiles = json.loads((inputs / "data/raw/top100_companies.json").read_text(encoding="utf-8"))
    local = {"base_model": quick["base_model"],           # the hub model is out of reach
             "llm_defaults": {"base_url": base_url},      # the stand-in instead of OpenAI
             # production holds out ten real companies; the generated profiles are fictional
             "company": {"held_out": [c["name"] for c in profiles["companies"][:10]]}}
    if until == "all":  # CPU-sized training and evaluation of the tiny model
        local["train_defaults"] = quick["train_defaults"]
        local["evaluate"] = {"batch_size": quick["evaluate"]["batch_size"]}
    return deep_merge(deep_merge(production, replicas), local)


def make_project(project: Path, inputs: Path, params: dict[str, Any], log: Path) -> None:
    project.mkdir(parents=True)
    for rel in COPIED:
        src, dst = ROOT / rel, project / rel
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, dst)
    for rel in ("data/raw", "hub"):
        shutil.copytree(inputs / rel, project / rel, copy_function=os.link)  # hard links: fast
    (project / "params.yaml").write_text(
        yaml.safe_dump(params, allow_unicode=True, sort_keys=False, width=100), encoding="utf-8")
    (project / ".gitignore").write_text("/models/*\n/checkpoints\n/.hf\n", encoding="utf-8")
    env = project_env(project)
    sh([sys.executable, "-m", "stages.dvc_vars"], cwd=project, env=env, log=log)
    sh(["git", "init", "-q"], cwd=project, log=log)
    sh([str(BIN / "dvc"), "init", "-q"], cwd=project, env=env, log=log)
    sh([str(BIN / "dvc"), "add", "-q", "data/raw", *sorted(map(str, (project / "hub").iterdir()))],
       cwd=project, env=env, log=log)
    sh(["git", "add", "-A"], cwd=project, log=log)
    sh(["git", "-c", "user.name=rehearsal", "-c", "user.email=r@localhost", "commit", "-qm",
        "rehearsal inputs"], cwd=project, log=log)


def project_env(project: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", HF_HOME=str(project / ".hf"),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OPENAI_API_KEY="sk-rehearsal-not-a-real-key", PYTHONHASHSEED="0")
    for name in ("OPENAI_BASE_URL", "LLM_OFFLINE"):
        env.pop(name, None)
    return env


def preflight(project: Path, log: Path) -> str:
    """``stages.check`` in the rehearsal project: params valid and nothing missing."""
    proc = sh([sys.executable, "-m", "stages.check"], cwd=project, env=project_env(project),
              check=False)
    with log.open("a", encoding="utf-8") as out:
        out.write(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"rehearsal: stages.check failed in {project}:\n{proc.stdout}{proc.stderr}")
    return (proc.stdout.strip().splitlines() or ["ok"])[-1]


def repro(project: Path, targets: list[str], log: Path) -> tuple[int, float]:
    start = time.monotonic()
    proc = sh([str(BIN / "dvc"), "repro", *targets], cwd=project, env=project_env(project),
              log=log, check=False)
    return proc.returncode, time.monotonic() - start


def plan(project: Path) -> dict[str, dict[str, Any]]:
    """``make plan`` in the project: stage -> its row (tokens include the overhead)."""
    proc = sh([sys.executable, "-m", "stages.plan", "--json"], cwd=project,
              env=project_env(project))
    return {row["stage"]: row for row in json.loads(proc.stdout)["rows"]}


def plan_table(plans: dict[str, dict[str, dict[str, Any]]], rows: list[tuple[str, dict[str, Any]]]
               ) -> str:
    """Each plan's expected tokens and $ per LLM stage against what the rehearsal spent."""
    names = list(plans)
    head = ("| stage | spent tokens | spent $ | " + " | ".join(
        f"plan {n}: tokens (error) | plan {n}: $" for n in names) + " |\n|"
        + "---|" * (3 + 2 * len(names)) + "\n")
    lines, sums = [], {n: [0.0, 0.0] for n in names}
    actual_total = [0, 0.0]
    for name, m in rows:
        llm = m.get("llm")
        if not llm or not any(name in p for p in plans.values()):
            continue
        spent = llm["prompt_tokens"] + llm["completion_tokens"]
        actual_total[0] += spent
        actual_total[1] += llm["cost_usd"]
        cells = []
        for n in names:
            row = plans[n].get(name, {})
            expected = row.get("prompt_tokens", 0) * row.get("overhead", 1) + \
                row.get("completion_tokens", 0) * row.get("overhead", 1)
            sums[n][0] += expected
            sums[n][1] += row.get("usd_online", 0.0)
            cells.append(f"{expected:,.0f} ({_err(expected, spent)}) | {row.get('usd_online', 0):.2f}")
        lines.append(f"| {name} | {spent:,} | {llm['cost_usd']:.2f} | " + " | ".join(cells) + " |")
    total = " | ".join(f"{sums[n][0]:,.0f} ({_err(sums[n][0], actual_total[0])}) | {sums[n][1]:.2f}"
                       for n in names)
    lines.append(f"| **total** | {actual_total[0]:,} | {actual_total[1]:.2f} | {total} |")
    return head + "\n".join(lines) + "\n"


def _err(expected: float, actual: float) -> str:
    return f"{(expected - actual) / actual:+.0%}" if actual else "–"


# ------------------------------------------------------------------------ the numbers
def stage_metrics(project: Path) -> list[tuple[str, dict[str, Any]]]:
    """(stage@key, metrics) of every stage that ran, in DAG order of the stage kinds."""
    order = ("collect", "extract", "summarize", "filter", "transform", "company", "synthesize",
             "solve", "stock", "agent", "mix", "train", "evaluate")
    found = []
    for kind in order:
        single = project / "metrics" / f"{kind}.json"
        paths = [single] if single.is_file() else sorted((project / "metrics" / kind).glob("*.json"))
        for path in paths:
            name = kind if path == single else f"{kind}@{path.stem}"
            found.append((name, json.loads(path.read_text(encoding="utf-8"))))
    return found


def target_of(name: str, m: dict[str, Any]) -> tuple[str, str]:
    """(target, met) for the stages that have one; ("", "") otherwise."""
    if name.startswith("synthesize@"):
        return str(m["target"]), "yes" if m["short"] == 0 and m["records"] == m["target"] else \
            f"NO ({m['short']} short)"
    if name.startswith("solve@") and m.get("target_pairs") is not None:
        return f"{m['target_pairs']} pairs", "yes" if m["short_pairs"] == 0 and \
            m["pairs"] == m["target_pairs"] else f"NO ({m['short_pairs']} short)"
    return "", ""


def accepted_of(name: str, m: dict[str, Any]) -> str:
    if name.startswith("solve@"):
        return f"{m['pairs']} pairs ({m['records']} q)"
    if name.startswith("mix@"):
        return f"{m.get('examples', m.get('records', '?'))} examples"
    for key in ("records", "pages", "items"):
        if key in m:
            return str(m[key])
    return ""


def rejects_of(name: str, m: dict[str, Any]) -> str:
    reasons = dict(m.get("rejects_by_reason") or {})
    text = ", ".join(f"{r} {n}" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1]))
    if name.startswith("synthesize@") and m.get("draws"):
        share = reasons.get("near_duplicate", 0) / m["draws"]
        text += f" (near-dup {share:.1%} of {m['draws']} draws)"
    return text or "0"


def table(rows: list[tuple[str, dict[str, Any]]], prices: dict[str, float]) -> tuple[str, dict]:
    head = ("| stage | requests | retries | prompt tok | completion tok | cost $ | wall s | "
            "accepted | rejected by reason | target | met |\n|" + "---|" * 11 + "\n")
    lines, total = [], {"calls": 0, "prompt": 0, "completion": 0, "cost": 0.0, "seconds": 0.0,
                        "unmet": []}
    for name, m in rows:
        llm = m.get("llm") or {}
        target, met = target_of(name, m)
        if met.startswith("NO"):
            total["unmet"].append(name)
        calls, p, c = llm.get("calls", 0), llm.get("prompt_tokens", 0), llm.get("completion_tokens", 0)
        cost = llm.get("cost_usd", 0.0)
        total["calls"] += calls
        total["prompt"] += p
        total["completion"] += c
        total["cost"] += cost
        total["seconds"] += m.get("seconds", 0.0)
        lines.append(f"| {name} | {calls if llm else '–'} | {llm.get('transport_retries', '–')} | "
                     f"{p if llm else '–'} | {c if llm else '–'} | {f'{cost:.2f}' if llm else '–'} | "
                     f"{m.get('seconds', 0):.1f} | {accepted_of(name, m)} | {rejects_of(name, m)} | "
                     f"{target} | {met} |")
    lines.append(f"| **total** | {total['calls']} | | {total['prompt']} | {total['completion']} | "
                 f"**{total['cost']:.2f}** | {total['seconds']:.0f} | | | | "
                 f"{'all met' if not total['unmet'] else 'NOT met: ' + ', '.join(total['unmet'])} |")
    return head + "\n".join(lines) + "\n", total


def bill(total: dict[str, Any], prices: dict[str, float], model: str) -> str:
    online = total["prompt"] / 1e6 * prices["input_per_1m"] + total["completion"] / 1e6 * prices["output_per_1m"]
    return (f"Projected production bill at the params' prices ({model}: "
            f"${prices['input_per_1m']}/1M input, ${prices['output_per_1m']}/1M output): "
            f"{total['calls']:,} requests, {total['prompt']:,} prompt + {total['completion']:,} "
            f"completion tokens = **${online:,.2f}** online (the stages' own accounting: "
            f"${total['cost']:,.2f}); at the Batch API's half price ≈ ${online / 2:,.2f}. Prompt "
            "tokens are counted with o200k_base over the real rendered prompts; completion "
            "lengths are the stand-in's, so the output share is an estimate.")


def standin_summary(stats: dict[str, Any]) -> str:
    kinds = stats.get("replies") or stats.get("by_kind") or {}
    stages = stats.get("by_stage") or stats.get("stages") or {}
    return ("Stand-in replies by kind: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))
            + "; requests by stage: " + ", ".join(f"{k} {v}" for k, v in sorted(stages.items())))


def machine() -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{os.cpu_count()} CPUs, {mem:.1f} GiB RAM; Python {platform.python_version()}, "
            f"{platform.system()} {platform.release()}")


def record(text: str) -> None:
    with RESULTS.open("a", encoding="utf-8") as out:
        out.write("\n" + text)
    print(f"appended to {RESULTS}")


def replan(done: Path, inputs: Path, until: str, write: bool) -> int:
    """``make plan`` (as the code is now) in a fresh copy of a finished rehearsal's project,
    before anything ran and after collect + extract, against what that rehearsal spent."""
    finished = done / "project"
    if not (finished / "metrics").is_dir():
        raise SystemExit(f"rehearsal: no finished rehearsal under {done}")
    fresh, log = done / "replan", done / "replan.log"
    shutil.rmtree(fresh, ignore_errors=True)
    # the plan never calls the endpoint: a closed port proves it
    make_project(fresh, inputs, rehearsal_params(inputs, "http://127.0.0.1:9/v1", until), log)
    plans = {"before the run": plan(fresh)}
    rc, _ = repro(fresh, ["collect", "extract"], log)
    if rc != 0:
        raise SystemExit(f"rehearsal: collect/extract failed in {fresh}; see {log}")
    plans["after collect + extract"] = plan(fresh)
    commit = sh(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT).stdout.strip()
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = (f"### `make plan` against that rehearsal's spend — {when} (`bench/rehearsal.py "
            f"--replan`, plan code of {commit}; completion prior: the bundled sample answers' "
            "mean per stage)\n\n" + plan_table(plans, stage_metrics(finished)))
    print(text)
    if write:
        record(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--until", choices=("mix", "all"), default="mix")
    parser.add_argument("--reports", type=int, default=4000, help="KRX report PDFs")
    parser.add_argument("--latency", type=float, nargs=2, default=(1.0, 3.0), metavar=("MIN", "MAX"))
    parser.add_argument("--wrong-rate", type=float, default=0.1, help="share of wrong letters")
    parser.add_argument("--fault-rate", type=float, default=0.01,
                        help="rate of each fault: invalid JSON, truncation, refusal, 429, 5xx")
    parser.add_argument("--workdir", type=Path, help="project directory (default: a temp dir)")
    parser.add_argument("--inputs", type=Path, default=Path(tempfile.gettempdir()) / "rehearsal-inputs",
                        help="where the generated inputs live (reused; default: %(default)s)")
    parser.add_argument("--no-write", action="store_true", help="do not append to bench/RESULTS.md")
    parser.add_argument("--replan", type=Path, metavar="WORKDIR",
                        help="only re-run the plans for the finished rehearsal in WORKDIR")
    args = parser.parse_args(argv)
    if args.replan:
        return replan(args.replan, args.inputs, args.until, not args.no_write)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="rehearsal-"))
    project, log = work / "project", work / "rehearsal.log"
    if project.exists():
        raise SystemExit(f"rehearsal: {project} exists; pass another --workdir")
    work.mkdir(parents=True, exist_ok=True)
    gen_s = make_inputs(args.inputs, args.reports)
    faults = {k: args.fault_rate for k in ("invalid_json", "truncated", "refusal", "429", "500")}
    server = StandIn.start(latency=tuple(args.latency), wrong_rate=args.wrong_rate,
                           fault_rates=faults, seed=0)
    try:
        params = rehearsal_params(args.inputs, server.base_url, args.until)
        make_project(project, args.inputs, params, log)
        check = preflight(project, log)
        print(f"project {project}; stages.check: {check}; dvc repro (log: {log}) …", flush=True)
        plans = {"before the run": plan(project)}
        rc, wall = repro(project, ["collect", "extract"], log)
        if rc == 0:  # the inputs of filter and summarize exist now: their plans are exact
            plans["after collect + extract"] = plan(project)
            rc, rest = repro(project, ["mix"] if args.until == "mix" else [], log)
            wall += rest
        stats = server.stats()
    finally:
        server.stop()
    rows = stage_metrics(project)
    prices = params["llm_defaults"]["prices"]
    text, total = table(rows, prices)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    report = (f"## Production rehearsal — {when} (`bench/rehearsal.py --until {args.until}`)\n\n"
              f"Machine: {machine()}. Inputs: `bench/rehearsal_data.py` ({args.reports} report "
              f"PDFs; generated in {gen_s:.0f} s" + (", reused" if not gen_s else "") + "). "
              f"Stand-in: latency {args.latency[0]:g}–{args.latency[1]:g} s, wrong letters "
              f"{args.wrong_rate:.0%}, each fault {args.fault_rate:.1%}. `dvc repro` exit {rc}, "
              f"wall {wall / 60:.1f} min; `stages.check`: {check}.\n\n{text}\n"
              f"{bill(total, prices, params['llm_defaults']['model'])}\n\n{standin_summary(stats)}\n\n"
              "`make plan` in the rehearsal project (before anything ran, and once collect and "
              "extract had run) against what each stage then spent (tokens include the plan's "
              "re-ask / re-sample overhead; error = plan vs spent):\n\n"
              f"{plan_table(plans, rows)}")
    print("\n" + report)
    if not args.no_write:
        record(report)
    if rc != 0:
        print(f"rehearsal: dvc repro failed ({rc}); see {log}", file=sys.stderr)
    return 0 if rc == 0 and not total["unmet"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
