"""Trace a trained version back to its data: ``python -m stages.lineage models/<version> [--json]``.

A tool, not a DVC stage: it reads what the stages left and checks that it still holds.

The chain, from the model down:
- the adapter (``models/<v>/adapter_model.safetensors``, sha256) against the ``adapter_sha256``
  that ``train@<v>`` recorded in ``models/<v>/lineage.json``;
- the parent version(s) this one continued from (lineage.json ``parent``; v5_3 -> v5_2 -> v5_1,
  v3 -> v1), recursively, each checked the same way, and the parent adapter's sha256 the
  child was trained from against the parent's adapter now;
- the mixture and its manifest (lineage.json ``mixture``: path/sha256, manifest/manifest_sha256),
  the manifest's recipe, and the source files it lists under ``inputs`` (sha256 per path, a
  directory hashed as ``stages.common.text.path_sha256`` does); a source that is itself a mixture
  (``mixture_v5_1``) is followed through its own manifest;
- the base model (``base.json`` sha256);
- from ``dvc.lock``: the ``train@<v>`` and ``mix@<v>`` entries (the md5 of their deps and outs,
  the params they ran with) and the stage that produced each source file; each md5 is compared
  with the file or directory on disk (DVC 3 md5: a directory's is the md5 of its sorted
  ``[{"md5", "relpath"}]`` listing, suffixed ``.dir``);
- git: the last commit that touched ``dvc.lock``, whether the work tree's ``dvc.lock`` differs
  from it, and per model the first commit whose ``dvc.lock`` recorded its current md5.

Findings per check: ``modified`` (bytes differ from the hash a producer recorded in lineage.json
or a manifest: the chain is broken), ``stale`` (``dvc.lock`` records another md5 than the file
on disk, or other params than lineage.json), ``missing`` (a file of the chain is gone) — any of
these makes the exit code 1 — and ``warning`` (not failing: no dvc.lock entry, no git, a
stage's code or params.yaml changed since it ran, which ``dvc status`` reports as well).
Exit codes: 0 every check holds, 1 the chain is broken or stale, 2 nothing to trace (not a
model directory, no lineage.json).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from stages.common.params import ParamsError
from stages.common.runlog import StageError, stage_main
from stages.common.text import file_sha256, path_sha256

ADAPTER_FILE = "adapter_model.safetensors"
LINEAGE_FILE = "lineage.json"
LOCK_FILE = "dvc.lock"
PARAMS_FILE = "params.yaml"
FAILING = ("modified", "stale", "missing")
# deps of a stage that are code/config, not data: a change there is reported, not failed
CODE_PREFIXES = ("stages/", "configs/", "scripts/")


def load_yaml(path: Path) -> Any:
    """YAML 1.2, as DVC reads dvc.lock and params.yaml: DVC writes ``eval_strategy: no``
    unquoted into dvc.lock, a string in YAML 1.2 but ``False`` to a YAML 1.1 loader."""
    return YAML(typ="safe", pure=True).load(path.read_text(encoding="utf-8"))


# ------------------------------------------------------------------------ hashing
def md5_file(path: str | os.PathLike) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def dvc_md5(path: str | os.PathLike) -> str:
    """The md5 DVC 3 records for ``path`` in dvc.lock (``hash: md5``): a file's plain md5; a
    directory's is the md5 of the JSON list of its files ``{"md5", "relpath"}`` sorted by
    relpath, plus ``.dir`` (dvc_data ``Tree.as_bytes``; .dvcignore'd files are not excluded)."""
    path = Path(path)
    if not path.is_dir():
        return md5_file(path)
    entries = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for name in filenames:
            full = Path(dirpath) / name
            entries.append({"md5": md5_file(full), "relpath": full.relative_to(path).as_posix()})
    entries.sort(key=lambda entry: entry["relpath"])
    listing = json.dumps(entries, sort_keys=True).encode("utf-8")
    return hashlib.md5(listing).hexdigest() + ".dir"


def source_sha256(path: str | os.PathLike) -> str:
    """sha256 of a mixture input the way mix@<v> recorded it in its manifest."""
    return path_sha256(str(path))


def short(digest: str | None, width: int = 12) -> str:
    if not digest:
        return "—"
    suffix = ".dir" if digest.endswith(".dir") else ""
    digest = digest[: len(digest) - len(suffix)]
    return digest[:width] + ("…" if len(digest) > width else "") + suffix


# ------------------------------------------------------------------------ git
def git_info(root: Path) -> dict[str, Any]:
    """The last commit that touched dvc.lock and whether the work tree's dvc.lock differs."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)

    try:
        inside = git("rev-parse", "--is-inside-work-tree")
    except FileNotFoundError:
        return {"repo": False, "reason": "git is not installed"}
    if inside.returncode != 0 or inside.stdout.strip() != "true":
        return {"repo": False, "reason": "not a git repository"}
    head = git("rev-parse", "HEAD").stdout.strip() or None
    commit = git("log", "-1", "--format=%H", "--", LOCK_FILE).stdout.strip() or None
    info: dict[str, Any] = {"repo": True, "head": head, "dvc_lock_commit": commit,
                            "dvc_lock_commit_date": None, "dvc_lock_modified": None}
    if commit:
        info["dvc_lock_commit_date"] = git("log", "-1", "--format=%cI", commit).stdout.strip()
        # exit 1 when the work tree's dvc.lock differs from the commit that last touched it
        info["dvc_lock_modified"] = git("diff", "--quiet", commit, "--", LOCK_FILE).returncode != 0
    return info


def first_commit_with(root: Path, text: str) -> str | None:
    """The oldest commit whose change to dvc.lock added ``text`` (a model's md5)."""
    done = subprocess.run(["git", "-C", str(root), "log", "--reverse", "--format=%H", "-S", text,
                           "--", LOCK_FILE], capture_output=True, text=True)
    lines = done.stdout.split()
    return lines[0] if done.returncode == 0 and lines else None


# ------------------------------------------------------------------------ tracing
class Tracer:
    """Reads a project at ``root`` and collects the chain and its checks."""

    def __init__(self, root: Path):
        self.root = root
        self.checks: list[dict[str, str]] = []
        self.mixtures: dict[str, dict[str, Any]] = {}
        self._hashes: dict[tuple[str, str], str | None] = {}
        lock_path = root / LOCK_FILE
        self.lock: dict[str, Any] | None = None
        if lock_path.is_file():
            self.lock = (load_yaml(lock_path) or {}).get("stages", {})
        params_path = root / PARAMS_FILE
        self.params = (load_yaml(params_path) or {}) if params_path.is_file() else None
        # path -> the lock stage that outputs it (the producer of a source file)
        self.producers: dict[str, str] = {}
        for stage, entry in (self.lock or {}).items():
            for out in entry.get("outs", []) or []:
                self.producers[os.path.normpath(out["path"])] = stage

    # ---- helpers
    def check(self, status: str, subject: str, message: str) -> None:
        item = {"status": status, "subject": subject, "message": message}
        if item not in self.checks:  # a file shared by two links of the chain is reported once
            self.checks.append(item)

    def _hash(self, kind: str, rel: str) -> str | None:
        """Memoised hash of a project path (None when it does not exist)."""
        path = self.root / rel
        if kind == "source" and not path.is_dir():
            kind = "sha256"  # a file source is hashed like any file
        key = (kind, os.path.normpath(rel))
        if key not in self._hashes:
            if not path.exists():
                self._hashes[key] = None
            else:
                self._hashes[key] = {"sha256": lambda: file_sha256(str(path)),
                                     "source": lambda: source_sha256(path),
                                     "md5": lambda: dvc_md5(path)}[kind]()
        return self._hashes[key]

    def lock_stage(self, stage: str) -> dict[str, Any] | None:
        return None if self.lock is None else self.lock.get(stage)

    def compare_lock(self, stage: str, entry: dict[str, Any], section: str,
                     wanted: list[str] | None = None) -> dict[str, dict[str, Any]]:
        """{path: {lock md5, disk md5, same}} for the deps/outs of a lock entry (``wanted``
        paths only, when given); a data path whose md5 differs is ``stale``, code a warning."""
        rows = {}
        wanted_norm = None if wanted is None else {os.path.normpath(p) for p in wanted}
        for item in entry.get(section, []) or []:
            path = item["path"]
            if wanted_norm is not None and os.path.normpath(path) not in wanted_norm:
                continue
            recorded = item.get("md5")
            if item.get("hash") != "md5":  # DVC 2 lock entries (md5-dos2unix): not recomputed
                rows[path] = {"lock_md5": recorded, "disk_md5": None, "same": None}
                continue
            disk = self._hash("md5", path)
            same = disk == recorded
            rows[path] = {"lock_md5": recorded, "disk_md5": disk, "same": same}
            if same:
                continue
            role = "output" if section == "outs" else "input"
            if disk is None:
                self.check("missing", path, f"{path} ({role} of {stage} in dvc.lock) does not exist")
            elif path.startswith(CODE_PREFIXES):
                self.check("warning", path, f"{path} changed since {stage} ran (dvc.lock md5 "
                           f"{short(recorded)}, now {short(disk)}): `dvc status` lists it")
            else:
                self.check("stale", path, f"{path}: dvc.lock {stage} {role} md5 {short(recorded)} "
                           f"but the {'directory' if disk.endswith('.dir') else 'file'} on disk "
                           f"has {short(disk)} (changed after {stage} ran)")
        return rows

    # ---- models
    def trace_model(self, model_dir: str, seen: list[str], chain: list[dict[str, Any]]) -> None:
        """Append the node of ``model_dir`` and then its ancestors to ``chain``."""
        path = self.root / model_dir
        lineage_path = path / LINEAGE_FILE
        if not lineage_path.is_file():
            if not chain:
                raise StageError(f"lineage: {model_dir} has no {LINEAGE_FILE} "
                                 f"({'not a directory' if not path.is_dir() else 'not a trained version'}; "
                                 "run train@<version> first)")
            self.check("missing", model_dir, f"{model_dir}/{LINEAGE_FILE} does not exist: the "
                       f"parent of {chain[-1]['version']} is gone")
            return
        lineage = json.loads(lineage_path.read_text(encoding="utf-8"))
        version = lineage.get("version") or path.name
        if version != path.name:
            self.check("warning", model_dir, f"{LINEAGE_FILE} says version {version!r} but lives in {model_dir}")
        node: dict[str, Any] = {"version": version, "path": model_dir}
        chain.append(node)

        adapter_rel = f"{model_dir}/{ADAPTER_FILE}"
        adapter_now = self._hash("sha256", adapter_rel)
        node["adapter"] = {"path": adapter_rel, "sha256": adapter_now,
                           "recorded_sha256": lineage.get("adapter_sha256")}
        if adapter_now is None:
            self.check("missing", adapter_rel, f"{adapter_rel} does not exist")
        elif adapter_now != lineage.get("adapter_sha256"):
            self.check("modified", adapter_rel, f"{adapter_rel} sha256 {short(adapter_now)} != "
                       f"{LINEAGE_FILE} adapter_sha256 {short(lineage.get('adapter_sha256'))}: "
                       f"the adapter of {version} changed after it was trained")

        node["base_model"] = self.trace_base(lineage.get("base_model") or {}, version)
        node["params"] = lineage.get("params")
        node["dvc_lock"] = self.trace_train_lock(version, model_dir, lineage)
        mixture = lineage.get("mixture") or {}
        node["mixture"] = mixture.get("path")
        if mixture:
            self.trace_mixture(mixture["path"], mixture.get("manifest"), mixture.get("sha256"),
                               mixture.get("manifest_sha256"), f"{version} was trained on")
        else:
            self.check("missing", model_dir, f"{LINEAGE_FILE} of {version} names no mixture")

        parent = lineage.get("parent")
        node["parent"] = None
        if not parent:
            return
        parent_dir = os.path.normpath(parent.get("path") or f"models/{parent['version']}")
        parent_adapter = f"{parent_dir}/{ADAPTER_FILE}"
        parent_now = self._hash("sha256", parent_adapter)
        node["parent"] = {"version": parent["version"], "path": parent_dir,
                          "recorded_adapter_sha256": parent.get("adapter_sha256"),
                          "adapter_sha256": parent_now}
        if parent_now is not None and parent_now != parent.get("adapter_sha256"):
            self.check("modified", parent_adapter, f"{version} was trained from {parent['version']}'s "
                       f"adapter sha256 {short(parent.get('adapter_sha256'))}, which is now "
                       f"{short(parent_now)}: the parent changed after the child was trained")
        if parent_dir in seen:
            self.check("modified", parent_dir, f"parent cycle through {parent_dir}")
            return
        self.trace_model(parent_dir, seen + [parent_dir], chain)

    def trace_base(self, base: dict[str, Any], version: str) -> dict[str, Any]:
        base_json = f"{base.get('path', 'models/base')}/base.json"
        now = self._hash("sha256", base_json)
        info = {"model": base.get("model"), "revision": base.get("resolved_revision") or base.get("revision"),
                "base_json": base_json, "recorded_sha256": base.get("base_json_sha256"), "sha256": now}
        if now is None:
            self.check("missing", base_json, f"{base_json} (base model of {version}) does not exist")
        elif base.get("base_json_sha256") and now != base["base_json_sha256"]:
            self.check("modified", base_json, f"{version} was trained on {base_json} sha256 "
                       f"{short(base['base_json_sha256'])}, now {short(now)}: the base model changed")
        return info

    def trace_train_lock(self, version: str, model_dir: str, lineage: dict[str, Any]) -> dict[str, Any] | None:
        stage = f"train@{version}"
        entry = self.lock_stage(stage)
        if entry is None:
            self.check("warning", stage, f"{stage} is not in {LOCK_FILE}"
                       + (" (no dvc.lock)" if self.lock is None else "")
                       + ": the model was not produced by `dvc repro` here")
            return None
        info: dict[str, Any] = {"stage": stage}
        info["outs"] = self.compare_lock(stage, entry, "outs", [model_dir])
        info["deps"] = self.compare_lock(stage, entry, "deps")
        lock_params = (entry.get("params") or {}).get(PARAMS_FILE, {})
        info["params"] = lock_params
        info["first_commit"] = None
        recorded = lineage.get("params")
        try:
            from stages.train import resolve_train  # the one merge train@ itself uses
            resolved = resolve_train(lock_params["train_defaults"],
                                     lock_params[f"versions.{version}.train"], version)
            same = json.loads(json.dumps(resolved.model_dump())) == json.loads(json.dumps(recorded))
        except (KeyError, ValueError, ParamsError) as exc:  # ValidationError is a ValueError
            same = None
            self.check("warning", stage, f"{stage} params in {LOCK_FILE} cannot be resolved "
                       f"({str(exc).splitlines()[0]})")
        info["params_match_lineage"] = same
        if same is False:
            self.check("stale", stage, f"{stage} params in {LOCK_FILE} differ from those {model_dir}/"
                       f"{LINEAGE_FILE} was trained with")
        self.compare_params(stage, lock_params)
        return info

    def compare_params(self, stage: str, lock_params: dict[str, Any]) -> None:
        """params.yaml now vs what the lock recorded: a warning (dvc repro would rerun)."""
        if self.params is None:
            return
        for dotted, value in lock_params.items():
            node: Any = self.params
            for part in dotted.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            if node != value:
                self.check("warning", stage, f"{PARAMS_FILE} {dotted} changed since {stage} ran "
                           "(`dvc repro` would rerun it)")

    # ---- mixtures
    def trace_mixture(self, path: str, manifest: str | None, recorded_sha: str | None,
                      recorded_manifest_sha: str | None, context: str) -> None:
        """Check one mixture and its manifest (once per path), then its inputs, recursively."""
        path = os.path.normpath(path)
        if manifest is None:
            manifest = str(Path(path).with_suffix(".json"))
        manifest = os.path.normpath(manifest)
        now = self._hash("sha256", path)
        manifest_now = self._hash("sha256", manifest)
        if recorded_sha is not None:
            if now is None:
                self.check("missing", path, f"{path} ({context}) does not exist")
            elif now != recorded_sha:
                self.check("modified", path, f"{path} sha256 {short(now)} != {short(recorded_sha)} "
                           f"that {context}: the mixture changed after it was used")
        if recorded_manifest_sha is not None and manifest_now is not None \
                and manifest_now != recorded_manifest_sha:
            self.check("modified", manifest, f"{manifest} sha256 {short(manifest_now)} != "
                       f"{short(recorded_manifest_sha)} that {context}")
        if path in self.mixtures:
            return
        node: dict[str, Any] = {"path": path, "sha256": now, "manifest": manifest,
                                "manifest_sha256": manifest_now}
        self.mixtures[path] = node
        if manifest_now is None:
            self.check("missing", manifest, f"{manifest} (manifest of {path}) does not exist")
            return
        data = json.loads((self.root / manifest).read_text(encoding="utf-8"))
        node["version"] = data.get("version")
        recipe = data.get("recipe") or {}
        node["recipe"] = {"seed": recipe.get("seed"),
                          "sources": {name: {k: v for k, v in (spec or {}).items() if v is not None}
                                      for name, spec in (recipe.get("sources") or {}).items()}}
        totals = data.get("mixture") or {}
        node["examples"] = totals.get("examples")
        node["tokens"] = totals.get("tokens")
        if totals.get("sha256") and now is not None and totals["sha256"] != now:
            self.check("modified", path, f"{manifest} describes a mixture with sha256 "
                       f"{short(totals['sha256'])}, but {path} has {short(now)}")
        tokenizer = data.get("tokenizer") or {}
        node["tokenizer"] = {"path": tokenizer.get("path"), "vocab_size": tokenizer.get("vocab_size")}
        stage = f"mix@{data.get('version') or Path(path).stem}"
        entry = self.lock_stage(stage)
        if entry is None:
            node["dvc_lock"] = None
            self.check("warning", stage, f"{stage} is not in {LOCK_FILE}"
                       + (" (no dvc.lock)" if self.lock is None else ""))
        else:
            lock_params = (entry.get("params") or {}).get(PARAMS_FILE, {})
            node["dvc_lock"] = {"stage": stage,
                                "outs": self.compare_lock(stage, entry, "outs", [path, manifest]),
                                "params": lock_params}
            self.compare_params(stage, lock_params)
        node["inputs"] = {}
        for name, spec in sorted((data.get("inputs") or {}).items()):
            node["inputs"][name] = self.trace_source(name, spec, path)

    def trace_source(self, name: str, spec: dict[str, Any], mixture: str) -> dict[str, Any]:
        path = os.path.normpath(spec["path"])
        recorded = spec.get("sha256")
        now = self._hash("source", path)
        info: dict[str, Any] = {"path": path, "recorded_sha256": recorded, "sha256": now,
                                "produced_by": self.producers.get(path), "dvc_lock": None}
        if now is None:
            self.check("missing", path, f"{path} (source {name} of {mixture}) does not exist")
        elif now != recorded:
            self.check("modified", path, f"{path} sha256 {short(now)} != {short(recorded)} in the "
                       f"manifest of {mixture}: the source changed after the mixture was made")
        producer = info["produced_by"]
        if producer is not None:
            info["dvc_lock"] = self.compare_lock(producer, self.lock_stage(producer), "outs", [path]).get(path)
        sub_manifest = Path(path).with_suffix(".json")
        if path.startswith("data/mixtures/") and (self.root / sub_manifest).is_file():
            info["mixture"] = path
            self.trace_mixture(path, str(sub_manifest), recorded, None,
                               f"the manifest of {mixture} recorded")
        return info


def trace(root: str | os.PathLike, model: str) -> dict[str, Any]:
    """The lineage report of ``model`` (``models/<version>``, relative to ``root``)."""
    root_path = Path(root).resolve()
    model_dir = Path(model)
    if model_dir.is_absolute():
        model_dir = model_dir.resolve().relative_to(root_path)
    model_rel = os.path.normpath(model_dir.as_posix())
    tracer = Tracer(root_path)
    chain: list[dict[str, Any]] = []
    tracer.trace_model(model_rel, [model_rel], chain)
    git = git_info(root_path)
    if not git["repo"]:
        tracer.check("warning", "git", f"no git ({git['reason']}): no revision to name")
    elif git["dvc_lock_commit"] is None:
        tracer.check("warning", LOCK_FILE, f"{LOCK_FILE} is not committed")
    elif git["dvc_lock_modified"]:
        tracer.check("warning", LOCK_FILE, f"the work tree's {LOCK_FILE} differs from commit "
                     f"{git['dvc_lock_commit'][:10]} (uncommitted runs)")
    if git["repo"]:
        for node in chain:
            out = ((node.get("dvc_lock") or {}).get("outs") or {}).get(node["path"])
            if out and out.get("lock_md5"):
                node["dvc_lock"]["first_commit"] = first_commit_with(root_path, out["lock_md5"])
    problems = [c for c in tracer.checks if c["status"] in FAILING]
    return {
        "model": model_rel,
        "root": str(root_path),
        "git": git,
        "chain": [node["version"] for node in chain],
        "models": chain,
        "mixtures": tracer.mixtures,
        "problems": problems,
        "warnings": [c for c in tracer.checks if c["status"] not in FAILING],
        "consistent": not problems,
    }


def exit_code(report: dict[str, Any]) -> int:
    return 0 if report["consistent"] else 1


# ------------------------------------------------------------------------ text
def _mark(ok: bool | None) -> str:
    return {True: "ok", False: "MISMATCH", None: "?"}[ok]


def _params_line(params: dict[str, Any] | None) -> str:
    if not params:
        return "—"
    lora, sft, quant = params.get("lora", {}), params.get("sft", {}), params.get("quant", {})
    parts = [f"init_from {params.get('init_from')}",
             f"LoRA r={lora.get('r')} alpha={lora.get('lora_alpha')}",
             f"lr {sft.get('learning_rate')}", f"epochs {sft.get('num_train_epochs')}",
             f"max_steps {sft.get('max_steps')}", f"seed {sft.get('seed')}",
             f"optim {sft.get('optim')}",
             "4-bit " + str(quant.get("bnb_4bit_quant_type")) if quant.get("load_in_4bit") else "no quantization"]
    return " · ".join(parts)


def _render_mixture(report: dict[str, Any], path: str, indent: str, lines: list[str],
                    shown: set[str]) -> None:
    node = report["mixtures"].get(path)
    if node is None:
        return
    if path in shown:
        lines.append(f"{indent}(mixture {path}: shown above)")
        return
    shown.add(path)
    lines.append(f"{indent}mixture   {path}  sha256 {short(node['sha256'])}"
                 + (f"  ({node.get('examples')} examples, {node.get('tokens')} tokens)" if node.get("examples") is not None else ""))
    lines.append(f"{indent}manifest  {node['manifest']}  sha256 {short(node['manifest_sha256'])}")
    lock = node.get("dvc_lock")
    if lock:
        outs = ", ".join(f"{os.path.basename(p)} {short(r['lock_md5'])} {_mark(r['same'])}"
                         for p, r in lock["outs"].items())
        lines.append(f"{indent}dvc.lock  {lock['stage']}: {outs}")
    if "recipe" in node:
        sources = ", ".join(f"{name} ({', '.join(f'{k}={v}' for k, v in spec.items() if k in ('format', 'count', 'fraction'))})"
                            for name, spec in node["recipe"]["sources"].items())
        lines.append(f"{indent}recipe    seed {node['recipe']['seed']} · {sources}")
    for name, source in (node.get("inputs") or {}).items():
        same = None if source["sha256"] is None else source["sha256"] == source["recorded_sha256"]
        producer = source.get("produced_by") or "not a dvc.lock output"
        lock_row = source.get("dvc_lock") or {}
        lock_text = f", dvc.lock md5 {short(lock_row.get('lock_md5'))} {_mark(lock_row.get('same'))}" if lock_row else ""
        lines.append(f"{indent}  source {name}: {source['path']}  sha256 {short(source['recorded_sha256'])} "
                     f"{_mark(same)}  <- {producer}{lock_text}")
        if source.get("mixture"):
            _render_mixture(report, source["mixture"], indent + "    ", lines, shown)


def render(report: dict[str, Any]) -> str:
    """The human-readable chain (the --json report holds the same facts)."""
    lines = [f"Lineage of {report['model']}  ({report['root']})", _git_line(report["git"])]
    lines.append("chain: " + " -> ".join(report["chain"]) + " -> base")
    lines.append("(sha256: recorded by the stages in lineage.json / manifests; md5: recorded by DVC "
                 "in dvc.lock; ok = the file on disk has it)")
    shown: set[str] = set()
    for node in report["models"]:
        lines.append("")
        _render_model(report, node, lines, shown)
    lines.append("")
    _render_result(report, lines)
    return "\n".join(lines)


def _git_line(git: dict[str, Any]) -> str:
    """Where dvc.lock stands in git."""
    if not git["repo"]:
        return "git: no git"
    if git["dvc_lock_commit"] is None:
        return f"git: HEAD {(git['head'] or 'none')[:10]}; dvc.lock not committed"
    return (f"git: dvc.lock last committed in {git['dvc_lock_commit']} "
            f"({git['dvc_lock_commit_date']}); work tree dvc.lock "
            f"{'MODIFIED since' if git['dvc_lock_modified'] else 'same as that commit'}")


def _render_model(report: dict[str, Any], node: dict[str, Any], lines: list[str],
                  shown: set[str]) -> None:
    """Append one model's block: adapter, dvc.lock entry, params, base, parent, mixture."""
    adapter = node["adapter"]
    lines.append(f"[{node['version']}] {node['path']}")
    lines.append(f"  adapter   {adapter['path']}  sha256 {short(adapter['sha256'])}  "
                 f"lineage.json {_mark(adapter['sha256'] == adapter['recorded_sha256'] if adapter['sha256'] else None)}")
    _render_model_lock(node, bool(report["git"]["repo"]), lines)
    base = node["base_model"]
    lines.append(f"  base      {base['model']} @ {base['revision']}  {base['base_json']} sha256 "
                 f"{short(base['sha256'])} {_mark(base['sha256'] == base['recorded_sha256'] if base['sha256'] and base['recorded_sha256'] else None)}")
    parent = node.get("parent")
    if parent:
        same = None if parent["adapter_sha256"] is None else parent["adapter_sha256"] == parent["recorded_adapter_sha256"]
        lines.append(f"  parent    {parent['version']} ({parent['path']}), trained from its adapter sha256 "
                     f"{short(parent['recorded_adapter_sha256'])} {_mark(same)}")
    else:
        lines.append("  parent    none (a new adapter on the base model)")
    if node.get("mixture"):
        _render_mixture(report, node["mixture"], "  ", lines, shown)


def _render_model_lock(node: dict[str, Any], in_git: bool, lines: list[str]) -> None:
    """Append a model's dvc.lock lines (out, deps, params), or say it has no train@ entry."""
    lock = node.get("dvc_lock")
    if not lock:
        lines.append(f"  dvc.lock  no train@{node['version']} entry")
        lines.append(f"  params    {_params_line(node.get('params'))}  (lineage.json)")
        return
    out = lock["outs"].get(node["path"], {})
    commit = lock.get("first_commit")
    lines.append(f"  dvc.lock  {lock['stage']} out md5 {short(out.get('lock_md5'))} "
                 f"{_mark(out.get('same'))}"
                 + (f" · first committed in {commit[:10]}" if commit else
                    " · not in any commit" if in_git else ""))
    deps = [f"{p} {short(r['lock_md5'])} {_mark(r['same'])}" for p, r in lock["deps"].items()
            if not p.startswith(CODE_PREFIXES)]
    lines.append("  deps      " + "; ".join(deps))
    lines.append(f"  params    {_params_line(node.get('params'))}  "
                 f"(dvc.lock {' + '.join(lock['params'])} vs lineage.json: "
                 f"{_mark(lock.get('params_match_lineage'))})")


def _render_result(report: dict[str, Any], lines: list[str]) -> None:
    """Append the warnings and the verdict: consistent, or each problem."""
    for item in report["warnings"]:
        lines.append(f"warning: {item['message']}")
    if report["consistent"]:
        lines.append(f"Result: consistent — {len(report['chain'])} model(s), every recorded hash "
                     "matches the files on disk.")
    else:
        lines.append(f"Result: BROKEN — {len(report['problems'])} problem(s):")
        for item in report["problems"]:
            lines.append(f"  {item['status']}: {item['message']}")


@stage_main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="models/<version>")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--root", default=".", help="the project root (default: the current directory)")
    args = parser.parse_args(argv)
    report = trace(args.root, args.model)
    if args.json:
        print(json.dumps(report, ensure_ascii=False, indent=2, sort_keys=True))
    else:
        print(render(report))
    if not report["consistent"]:
        print(f"lineage: {args.model}: the chain is broken or stale "
              f"({len(report['problems'])} problem(s), see above)", file=sys.stderr)
    raise SystemExit(exit_code(report))


if __name__ == "__main__":
    main()
