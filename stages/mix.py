"""mix@<version>: the recipe (``mix_defaults`` + ``versions.<version>.mix``) -> one training
mixture + its manifest.

    python -m stages.mix <version> --tokenizer models/base --inputs <the recipe's files> \\
        --out data/mixtures/<v>.parquet --manifest data/mixtures/<v>.json \\
        --rejects data/rejects/mix/<v>.parquet --metrics metrics/mix/<v>.json \\
        --log logs/mix/<v>.log [--params params.yaml]

Contract:
- inputs: the files of the recipe's sources (names -> files: ``stages.mixing.recipe.
  mix_source_input``; ``--inputs`` must name exactly them: it is what dvc.yaml tracks, from
  dvc.vars.yaml), the tokenizer directory, and every evaluation set of
  ``evaluate`` (KMMLU and stock/agent/company test splits, local MCQ files) for decontamination;
- ``--out``: ``example`` records (``id, version, source, split, prompt, completion``) in trl's
  conversational prompt–completion form, in recipe order (source by source, input order within
  a source; upsampled copies follow their original and have ids ``<id>~<version>.<n>``). The trainer
  shuffles; the file is not shuffled so that it can be streamed;
- ``--manifest``: the resolved recipe, sha256 of every input, eval set and of the mixture file,
  the tokenizer (path, model, hashes), per-source counts and tokens, the length distribution —
  what a model's lineage points at. No timestamps: same inputs, same bytes;
- ``--rejects``: records that became no example, each with a reason: malformed records and
  format errors (``invalid_record``, ``bad_table``, …), ``eval_contamination`` (detail names the
  eval item ``<set>/<id>`` and the overlap), ``exact_duplicate`` / ``near_duplicate`` (detail
  names the example kept), ``overlength`` (``overlength: drop``) and ``prompt_too_long``;
- fails (exit 2) on unknown record fields in include/exclude, a format that does not fit the
  source's record kind, too few examples for a count without upsampling, an empty mixture, or
  a malformed-record rate above ``max_reject_rate``.

Order of work, streamed in Parquet batches (memory is O(examples) small integers, not texts):
1. per source, per batch: validate, leave out test splits (counted as ``held_out_test_records``)
   and every record naming a held-out company (``company.held_out``: its profile, reports,
   summaries, and any question about it, by :mod:`stages.common.companies`' rule;
   ``held_out_company_records``),
   filter (include/exclude), format, decontaminate, count
   tokens (the chat template applied exactly as trl will), truncate or drop over-long
   examples, then MinHash; the formatted examples go to a spill file beside the output;
2. exact then near-duplicate removal across all sources (the earlier example is kept: recipe
   order, then input order; examples of one group never remove each other);
3. per source: the selection (count or fraction of what is left, seeded; copies only with
   ``upsample``), then the dev split by whole groups (examples from another mixture keep
   their split, so a continued version never trains on its parent's dev set); a mixture
   that rounding left without any dev group gets one (:func:`ensure_dev_group`);
4. the spill is streamed again into the output, then the manifest and metrics are written.
"""
from __future__ import annotations

import hashlib
import json
import os
import resource
import tempfile
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from stages.common.companies import CompanyMatcher
from stages.common.io import (atomic_path, iter_record_batches, open_parquet_writer, read_records,
                              write_json)
from stages.common.params import (PARAMS_FILE, load_raw, lookup, merged_section, origin_locator,
                                  validate_params)
from stages.common.runlog import (StageError, Timer, progress, require_input, setup_logging, stage_main,
                                  stage_parser, write_metrics)
from stages.common.schema import SCHEMAS, reject, validate
from stages.common.text import content_id, file_sha256, path_sha256
from stages.mixing.formats import (FORMATTERS, Budget, FormatError, check_filter_fields,
                                   count_tokens, load_templates, passes_filters)
from stages.mixing.hashing import (EvalIndex, exact_duplicates, exact_key, mix_keys,
                                   minhash_signatures, near_duplicates, text_key)
from stages.mixing.recipe import MIX_FORMATS, MixParams
from stages.sources.evalsets import (EvalCollectedSet, EvalItem, EvalLocalSet, OpenEndedSet,
                                     items_from_records, load_local_set, load_open_ended)

PARAMS = ("versions.{key}.mix", "mix_defaults", "evaluate.collected", "evaluate.local",
          "company.held_out", "evaluate.open_ended")
STAGE = "mix"
PERCENTILES = (50, 90, 95, 99)
# Rejects that say nothing bad about the input: they do not count towards max_reject_rate.
REMOVALS = {"eval_contamination", "exact_duplicate", "near_duplicate", "overlength",
            "prompt_too_long"}
_SPILL_SCHEMA = pa.schema([
    ("id", pa.string()), ("source", pa.string()), ("parent_split", pa.string()),
    ("prompt", SCHEMAS["example"].field("prompt").type),
    ("completion", SCHEMAS["example"].field("completion").type),
])

Batches = Iterator[list[dict[str, Any]]]


# ------------------------------------------------------------------------------ inputs
def input_kind(path: str) -> str:
    """Record kind of an input file (its Parquet columns), or ``json`` for a JSON directory."""
    if os.path.isdir(path):
        return "json"
    names = pq.read_schema(path).names
    for kind, schema in SCHEMAS.items():
        if kind != "reject" and names == schema.names:
            return kind
    raise StageError(f"{path}: columns {names} match no record kind of stages/common/schema.py")


def read_batches(path: str, batch_size: int) -> Batches:
    """Records of a Parquet file (or the JSON documents of a directory, sorted by name), in
    batches of ``batch_size``: inputs are never loaded whole."""
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if n.endswith(".json"))
        for lo in range(0, len(names), batch_size):
            batch = []
            for name in names[lo:lo + batch_size]:
                with open(os.path.join(path, name), encoding="utf-8") as handle:
                    batch.append(json.load(handle))
            yield batch
        return
    for record_batch in iter_record_batches(path, batch_size):
        yield record_batch.to_pylist()


def load_params(key: str, path: str = PARAMS_FILE
                ) -> tuple[MixParams, dict[str, EvalCollectedSet], dict[str, EvalLocalSet]]:
    """The recipe (``mix_defaults`` + ``versions.<key>.mix``) and the evaluation sets it is
    decontaminated against (``evaluate.collected`` / ``evaluate.local``)."""
    raw = load_raw(path)
    where = PARAMS[0].format(key=key)
    recipe = validate_params(MixParams, merged_section(raw, where, PARAMS[1]), where,
                             origin_locator(raw, where, PARAMS[1], None))
    collected = {name: validate_params(EvalCollectedSet, spec, f"{PARAMS[2]}.{name}")
                 for name, spec in (lookup(raw, PARAMS[2]) or {}).items()}
    local = {name: validate_params(EvalLocalSet, spec, f"{PARAMS[3]}.{name}")
             for name, spec in (lookup(raw, PARAMS[3]) or {}).items()}
    return recipe, collected, local


def load_held_out_companies(path: str = PARAMS_FILE) -> CompanyMatcher:
    """``company.held_out``: the companies no mixture may name (their questions are an
    evaluation set; a paraphrase of their report would slip past the n-gram decontamination,
    so whatever names them goes, by name)."""
    names = lookup(load_raw(path), PARAMS[4]) or []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise StageError(f"{PARAMS[4]}: a list of company names, not {names!r}")
    try:
        return CompanyMatcher(names)
    except ValueError as exc:
        raise StageError(f"{PARAMS[4]}: {exc}") from None


def check_declared_inputs(recipe: MixParams, declared: list[str], version: str) -> None:
    """DVC must track exactly the recipe's files, or a changed source would not re-mix."""
    wanted, got = set(recipe.source_inputs().values()), set(declared)
    if wanted != got:
        raise StageError(f"versions.{version}.mix: dvc.yaml tracks {sorted(got)} but the recipe "
                         f"reads {sorted(wanted)}; run `python -m stages.dvc_vars` (dvc.vars.yaml "
                         "is derived from params.yaml)")


def load_open_sets(path: str = PARAMS_FILE) -> dict[str, OpenEndedSet]:
    """``evaluate.open_ended``: free-form questions no mixture may hold either."""
    return {name: validate_params(OpenEndedSet, spec, f"{PARAMS[5]}.{name}")
            for name, spec in (lookup(load_raw(path), PARAMS[5]) or {}).items()}


def load_eval_items(collected: dict[str, EvalCollectedSet], local: dict[str, EvalLocalSet],
                    open_ended: dict[str, OpenEndedSet] | None = None
                    ) -> tuple[list[EvalItem], dict[str, dict]]:
    """Every evaluation item of ``evaluate``, read by evaluation's own reader
    (:mod:`stages.sources.evalsets`): the same items, ids and choice texts as ``evaluate@``
    scores, uncapped (``max_items_per_set`` limits scoring, not decontamination); an
    open-ended question counts with its reference answer as its one "choice" (a training
    example holding either is contaminated)."""
    items: list[EvalItem] = []
    info: dict[str, dict] = {}
    for name, spec in collected.items():
        require_input(spec.input, f"evaluate.collected.{name}.input", "run its collect stage first")
        got, _ = items_from_records(name, read_records(spec.input), spec.split)
        items += got
        info[name] = {"path": spec.input, "split": spec.split, "items": len(got)}
    for name, spec in local.items():
        require_input(spec.input, f"evaluate.local.{name}.input")
        got, _ = load_local_set(name, spec)
        items += got
        info[name] = {"path": spec.input, "items": len(got)}
    for name, spec in (open_ended or {}).items():
        require_input(spec.input, f"evaluate.open_ended.{name}.input")
        opened, _ = load_open_ended(name, spec)
        items += [EvalItem(name, i.id, i.question, (i.reference,), 0, i.category, "open_ended")
                  for i in opened]
        info[name] = {"path": spec.input, "items": len(opened)}
    return items, info


def tokenizer_info(tokenizer: Any, path: str) -> dict[str, Any]:
    """Name and hashes of the tokenizer: what the token counts are counted in."""
    files = {}
    if os.path.isdir(path):
        for name in sorted(os.listdir(path)):
            if name.startswith(("tokenizer", "special_tokens", "chat_template", "vocab", "merges")):
                files[name] = file_sha256(os.path.join(path, name))
    info: dict[str, Any] = {
        "path": path, "class": type(tokenizer).__name__, "vocab_size": len(tokenizer),
        "eos_token": tokenizer.eos_token, "pad_token": tokenizer.pad_token,
        "chat_template_sha256": hashlib.sha256((tokenizer.chat_template or "").encode()).hexdigest(),
        "files_sha256": files,
    }
    base_json = os.path.join(path, "base.json")
    if os.path.isfile(base_json):
        with open(base_json, encoding="utf-8") as handle:
            base = json.load(handle)
        info["model"] = base.get("model")
        info["revision"] = base.get("resolved_revision") or base.get("revision")
        # what the counts are counted in, by name (e.g. Qwen/Qwen2-7B-Instruct's tokenizer, also
        # when rebuilt offline for the quickstart: base.json says from what)
        info["name"] = base.get("tokenizer") or base.get("model")
        if base.get("tokenizer_source"):
            info["source"] = base["tokenizer_source"]
    return info


# ------------------------------------------------------------------------------ pure pieces
def example_text(prompt: list[dict], completion: list[dict]) -> str:
    """The text dedup and decontamination look at: every message, prompt and completion."""
    return "\n".join(m["content"] for m in [*prompt, *completion])


def example_id(prompt: list[dict], completion: list[dict]) -> str:
    return content_id("example", [[m["role"], m["content"]] for m in [*prompt, *completion]])


def truncate_completion(tokenizer: Any, prompt: list[dict], completion: list[dict],
                        max_length: int) -> tuple[list[dict] | None, int]:
    """Cut the last completion message's text so that the templated example fits
    ``max_length`` (the end-of-turn token stays, so the model still learns to stop).
    Returns ``(completion, tokens)``, or ``(None, prompt tokens)`` when the prompt alone does
    not leave room for one completion token."""
    content = completion[-1]["content"]
    overhead = count_tokens(tokenizer, [prompt + completion[:-1] + [{"role": "assistant", "content": ""}]])[0]
    budget = max_length - overhead
    offsets = tokenizer(content, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    for _ in range(8):  # merges across the cut may add a token or two: shrink and retry
        if budget < 1:
            return None, overhead
        cut = offsets[min(budget, len(offsets)) - 1][1]
        new = completion[:-1] + [{"role": "assistant", "content": content[:cut].rstrip() or content[:cut]}]
        tokens = count_tokens(tokenizer, [prompt + new])[0]
        if tokens <= max_length:
            return new, tokens
        budget -= tokens - max_length
    return None, overhead


def selection(n_available: int, order_keys: np.ndarray, count: int | None,
              fraction: float | None, upsample: bool, where: str) -> np.ndarray:
    """Copies of each available example (0 = not selected) so that the total is exactly the
    count (or ``round(fraction × available)``): every example ``n // available`` times, plus
    one more for the first ``n % available`` in seeded order."""
    wanted = count if count is not None else int(round(fraction * n_available))
    if wanted > n_available and not upsample:
        raise StageError(f"{where}: {wanted} examples wanted but only {n_available} available "
                         "after filtering, decontamination and dedup (upsample: false)")
    copies = np.zeros(n_available, dtype=np.int64)
    if n_available == 0:
        return copies
    copies += wanted // n_available
    rank = np.empty(n_available, dtype=np.int64)
    rank[np.lexsort((np.arange(n_available), order_keys))] = np.arange(n_available)
    copies[rank < wanted % n_available] += 1
    return copies


def dev_groups(groups: np.ndarray, dev_size: float, seed: int) -> np.ndarray:
    """Boolean per example: in a dev group. ``round(dev_size × distinct groups)`` groups,
    the ones with the smallest seeded keys."""
    distinct = np.unique(groups)
    n_dev = int(round(dev_size * len(distinct)))
    if n_dev == 0:
        return np.zeros(len(groups), dtype=bool)
    keys = mix_keys(distinct, seed)
    chosen = distinct[np.lexsort((distinct, keys))[:n_dev]]
    return np.isin(groups, chosen)


def length_stats(tokens: np.ndarray) -> dict[str, Any]:
    if not len(tokens):
        return {"examples": 0}
    stats = {"examples": int(len(tokens)), "min": int(tokens.min()), "max": int(tokens.max()),
             "mean": round(float(tokens.mean()), 2)}
    for p in PERCENTILES:
        stats[f"p{p}"] = int(np.percentile(tokens, p, method="nearest"))
    return stats


# ------------------------------------------------------------------------------ the build
class _Columns:
    """Per-example integers kept in memory between the passes (compact arrays)."""

    def __init__(self) -> None:
        self.ids = array("Q")
        self.groups = array("Q")
        self.exact = array("Q")
        self.source = array("l")
        self.tokens = array("l")
        self.signatures: list[np.ndarray] = []

    def __len__(self) -> int:
        return len(self.ids)


class _RejectWriter:
    def __init__(self, path: str | os.PathLike, batch_size: int) -> None:
        self.writer = open_parquet_writer(path, SCHEMAS["reject"])
        self.buffer: list[dict[str, str]] = []
        self.batch_size = batch_size
        self.reasons: Counter = Counter()
        self.by_source: dict[str, Counter] = {}

    def add(self, source: str, item: str, reason: str, detail: str = "", raw: Any = None) -> None:
        self.buffer.append(reject(STAGE, source, item, reason, detail, raw))
        self.reasons[reason] += 1
        self.by_source.setdefault(source, Counter())[reason] += 1
        if len(self.buffer) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            self.writer.write_table(pa.Table.from_pylist(self.buffer, schema=SCHEMAS["reject"]))
            self.buffer = []

    def close(self) -> None:
        self.flush()
        self.writer.close()


def _phase(log: Any, message: str) -> None:
    """One line per pass of the build, with the peak memory so far (the scaling benchmark
    and anyone watching a 1M-example build read where the memory goes)."""
    if log is not None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        log.info("%s (peak RSS so far %.0f MiB)", message, peak)


@dataclass
class _Build:
    """The state the four passes of one build share: the recipe, the per-example columns,
    the per-source counters and the rejects writer; the arrays are set after pass 1."""
    version: str
    recipe: MixParams
    tokenizer: Any
    eval_index: EvalIndex
    log: Any
    rejects: _RejectWriter
    names: list[str]
    stats: dict[str, Counter]
    cols: _Columns = field(default_factory=_Columns)
    parent_split: dict[int, str] = field(default_factory=dict)
    groups: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    sources: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    tokens: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    exact: dict[int, int] = field(default_factory=dict)
    near: dict[int, tuple[int, float]] = field(default_factory=dict)
    copies: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    is_dev: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    held_out: Optional[CompanyMatcher] = None


def build_mixture(version: str, recipe: MixParams, tokenizer: Any, eval_index: EvalIndex,
                  open_source: Callable[[str], tuple[str, Batches]], out_path: str | os.PathLike,
                  rejects_path: str | os.PathLike, log: Any = None,
                  held_out: Optional[CompanyMatcher] = None) -> dict[str, Any]:
    """Build the mixture into ``out_path`` and the rejects into ``rejects_path`` (both plain
    paths: the caller makes them atomic). ``open_source(name)`` gives ``(kind, batches)``;
    ``held_out``: companies whose documents are left out. Returns the statistics the manifest
    and metrics are made of."""
    names = list(recipe.sources)
    build = _Build(version, recipe, tokenizer, eval_index, log,
                   _RejectWriter(rejects_path, recipe.batch_size), names,
                   {name: Counter() for name in names}, held_out=held_out)
    with tempfile.TemporaryDirectory(prefix=".mix-spill-", dir=Path(out_path).parent) as spill_dir:
        spill_path = Path(spill_dir) / "spill.parquet"
        format_sources(build, open_source, spill_path)
        _phase(log, f"pass 1 done: {len(build.cols)} examples formatted and hashed")
        remove_duplicates(build)
        _phase(log, f"pass 2 done: {len(build.exact)} exact, {len(build.near)} near duplicates")
        select_examples(build)
        _phase(log, "pass 3 done: selection and dev split")
        emitted = write_output(build, spill_path, out_path)
        _phase(log, "pass 4 done: mixture written")
    build.rejects.close()
    banned = sorted(set(emitted) & set(recipe.exclude_sources))
    if banned:  # recipes naming them are refused on load; this guards the data itself
        raise StageError(f"versions.{version}.mix: excluded sources {banned} reached the mixture")
    return summarize_build(build)


# ---- pass 1: format, decontaminate, count, MinHash
def format_sources(build: _Build, open_source: Callable[[str], tuple[str, Batches]],
                   spill_path: Path) -> None:
    """Every source, batch by batch, into the spill file and the in-memory columns."""
    templates = load_templates()
    budget = Budget(build.tokenizer, build.recipe.max_length)
    spill = pq.ParquetWriter(spill_path, _SPILL_SCHEMA)
    for source_index, name in enumerate(build.names):
        kind, batches = open_source(name)
        check_source_fits(build, name, kind)
        pending: list[dict[str, Any]] = []
        for batch in progress(batches, desc=f"mix@{build.version} {name}"):
            for record in batch:
                pending.extend(format_record(build, name, kind, record, templates, budget))
                if len(pending) >= build.recipe.batch_size:
                    keep_examples(build, source_index, name, pending, spill)
                    pending = []
        if pending:
            keep_examples(build, source_index, name, pending, spill)
    spill.close()
    n = len(build.cols)
    if n:
        build.groups = np.frombuffer(build.cols.groups, dtype=np.uint64)
        build.sources = np.frombuffer(build.cols.source, dtype=np.int64)
        build.tokens = np.frombuffer(build.cols.tokens, dtype=np.int64)
        build.ids = np.frombuffer(build.cols.ids, dtype=np.uint64)


def check_source_fits(build: _Build, name: str, kind: str) -> None:
    spec = build.recipe.sources[name]
    where = f"versions.{build.version}.mix.sources.{name}"
    if MIX_FORMATS[spec.format] != kind:
        raise StageError(f"{where}.format: {spec.format} formats {MIX_FORMATS[spec.format]} "
                         f"records, but {name} holds {kind}")
    fields = SCHEMAS[kind].names if kind in SCHEMAS else ["doc_id", "title", "path", "source"]
    unknown = check_filter_fields(fields, spec.include, spec.exclude)
    if unknown:
        raise StageError(f"{where}: include/exclude name fields {unknown} that {kind} records "
                         f"do not have ({list(fields)})")


HELD_OUT_KINDS = ("mcq", "qa", "translation", "conversation")  # kinds with a split field


def format_record(build: _Build, name: str, kind: str, record: dict[str, Any],
                  templates: dict[str, Any], budget: Budget) -> list[dict[str, Any]]:
    """One source record -> its examples ([] when it is invalid, filtered out or unformattable)."""
    spec, stats = build.recipe.sources[name], build.stats[name]
    stats["records_read"] += 1
    item = str(record.get("id") or record.get("doc_id") or stats["records_read"])
    if kind in SCHEMAS:
        problems = validate(kind, record)
        if problems:
            stats["invalid_record"] += 1
            build.rejects.add(name, item, "invalid_record", "; ".join(problems), record)
            return []
    if record.get("split") == "test" and kind in HELD_OUT_KINDS:
        stats["held_out"] += 1   # a source's test split is an evaluation set, never training
        return []
    if build.held_out and build.held_out.names_in(json.dumps(record, ensure_ascii=False, default=str)):
        stats["held_out_company"] += 1   # names a held-out company (company.held_out)
        return []
    if not passes_filters(record, spec.include, spec.exclude):
        stats["filtered_out"] += 1
        return []
    try:
        made = FORMATTERS[spec.format](record, templates, budget)
    except FormatError as exc:
        stats[exc.reason] += 1
        build.rejects.add(name, item, exc.reason, exc.detail, record)
        return []
    stats["examples_formatted"] += len(made)
    return made


def keep_examples(build: _Build, source_index: int, name: str, pending: list[dict[str, Any]],
                  spill: pq.ParquetWriter) -> None:
    """Decontaminate, fit to max_length, hash and spill one batch of formatted examples."""
    kept = decontaminate(build, name, pending)
    final, lengths = fit_lengths(build, name, kept)
    if not final:
        return
    texts = [example_text(e["prompt"], e["completion"]) for e in final]
    dedup = build.recipe.dedup
    signatures = minhash_signatures(texts, dedup.shingle_chars, dedup.num_perm)
    cols, rows = build.cols, []
    for e, text, n in zip(final, texts, lengths):
        eid = e.get("id") or example_id(e["prompt"], e["completion"])
        if "split" in e:
            build.parent_split[len(cols)] = e["split"]
        cols.ids.append(int(eid.split("~", 1)[0], 16))
        cols.groups.append(text_key(f"{name}\x1f{e['group']}"))
        cols.exact.append(exact_key(text))
        cols.source.append(source_index)
        cols.tokens.append(n)
        rows.append({"id": eid, "source": e.get("source", name), "parent_split": e.get("split", ""),
                     "prompt": e["prompt"], "completion": e["completion"]})
    cols.signatures.append(signatures)
    spill.write_table(pa.Table.from_pylist(rows, schema=_SPILL_SCHEMA))
    build.stats[name]["formatted_kept"] += len(rows)


def _raw(example: dict[str, Any]) -> dict[str, Any]:
    return {"prompt": example["prompt"], "completion": example["completion"]}


def decontaminate(build: _Build, name: str, pending: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The examples that overlap no evaluation item; the others become rejects naming it."""
    texts = [example_text(e["prompt"], e["completion"]) for e in pending]
    kept = []
    for e, match in zip(pending, build.eval_index.match(texts)):
        if match is None:
            kept.append(e)
            continue
        build.stats[name]["eval_contamination"] += 1
        build.rejects.add(name, example_id(e["prompt"], e["completion"]), "eval_contamination",
                          f"eval_id={match[0]} overlap={match[1]:.2f} "
                          f"(threshold {build.recipe.decontamination.threshold})", _raw(e))
    return kept


def fit_lengths(build: _Build, name: str, examples: list[dict[str, Any]]
                ) -> tuple[list[dict[str, Any]], list[int]]:
    """Token counts; an example over max_length is truncated or dropped (``overlength``)."""
    recipe, stats = build.recipe, build.stats[name]
    lengths = count_tokens(build.tokenizer, [e["prompt"] + e["completion"] for e in examples])
    final, final_lengths = [], []
    for e, n in zip(examples, lengths):
        if n > recipe.max_length:
            eid = example_id(e["prompt"], e["completion"])
            if recipe.overlength == "drop":
                stats["overlength_dropped"] += 1
                build.rejects.add(name, eid, "overlength",
                                  f"{n} tokens > max_length {recipe.max_length}", _raw(e))
                continue
            completion, n = truncate_completion(build.tokenizer, e["prompt"], e["completion"],
                                                recipe.max_length)
            if completion is None:
                stats["overlength_dropped"] += 1
                build.rejects.add(name, eid, "prompt_too_long",
                                  f"prompt uses {n} of max_length {recipe.max_length} tokens", _raw(e))
                continue
            stats["overlength_truncated"] += 1
            e = {**e, "completion": completion}
        final.append(e)
        final_lengths.append(n)
    return final, final_lengths


# ---- pass 2: exact, then near-duplicate removal across the sources
def remove_duplicates(build: _Build) -> None:
    n = len(build.cols)
    if not n:
        return
    build.exact = exact_duplicates(np.frombuffer(build.cols.exact, dtype=np.uint64), build.groups)
    alive = np.ones(n, dtype=bool)
    alive[list(build.exact)] = False
    build.near = near_duplicates(build.cols.signatures, build.groups, alive,
                                 build.recipe.dedup.bands, build.recipe.dedup.near_threshold)
    build.cols.signatures = []


# ---- pass 3: selection per source, then the dev split
def select_examples(build: _Build) -> None:
    recipe, n = build.recipe, len(build.cols)
    alive = np.ones(n, dtype=bool)
    alive[list(build.exact)] = False
    alive[list(build.near)] = False
    build.copies = np.zeros(n, dtype=np.int64)
    build.is_dev = np.zeros(n, dtype=bool)
    for source_index, name in enumerate(build.names):
        spec = recipe.sources[name]
        members = np.flatnonzero((build.sources == source_index) & alive)
        build.stats[name]["available"] = len(members)
        build.copies[members] = selection(
            len(members), mix_keys(build.groups[members], recipe.seed), spec.count,
            spec.fraction, spec.upsample, f"versions.{build.version}.mix.sources.{name}")
        chosen = members[build.copies[members] > 0]
        if spec.format == "example":
            build.is_dev[chosen] = [build.parent_split.get(int(i)) == "dev" for i in chosen]
        else:
            build.is_dev[chosen] = dev_groups(build.groups[chosen], recipe.dev_size, recipe.seed + 1)
    if recipe.dev_size > 0:
        ensure_dev_group(build)


def ensure_dev_group(build: _Build) -> None:
    """Every mixture holds a dev split (evaluate measures each version's dev loss on it): when
    rounding per source left none, the source with the most groups (first in the recipe on a
    tie) gives one group, chosen as :func:`dev_groups` chooses, if it has two or more."""
    chosen = build.copies > 0
    if build.is_dev[chosen].any():
        return
    best, best_groups = None, 1
    for source_index, name in enumerate(build.names):
        if build.recipe.sources[name].format == "example":
            continue  # a replayed parent keeps its own splits
        members = np.flatnonzero((build.sources == source_index) & chosen)
        groups = len(np.unique(build.groups[members]))
        if groups > best_groups:
            best, best_groups = members, groups
    if best is not None:
        distinct = len(np.unique(build.groups[best]))
        build.is_dev[best] = dev_groups(build.groups[best], 1 / distinct, build.recipe.seed + 1)


# ---- pass 4: stream the spill into the output, dedup rejects with their text
def write_output(build: _Build, spill_path: Path, out_path: str | os.PathLike) -> Counter:
    """The mixture file; returns the examples written per source."""
    writer = open_parquet_writer(out_path, SCHEMAS["example"])
    buffer: list[dict[str, Any]] = []
    emitted: Counter = Counter()
    index = 0
    for record_batch in iter_record_batches(spill_path, build.recipe.batch_size):
        for row in record_batch.to_pylist():
            reject_duplicate(build, index, row)
            split = "dev" if build.is_dev[index] else "train"
            for copy in range(int(build.copies[index])):
                buffer.append({"id": row["id"] if copy == 0 else f"{row['id']}~{build.version}.{copy}",
                               "version": build.version, "source": row["source"], "split": split,
                               "prompt": row["prompt"], "completion": row["completion"]})
                emitted[row["source"]] += 1
                if len(buffer) >= build.recipe.batch_size:
                    writer.write_table(pa.Table.from_pylist(buffer, schema=SCHEMAS["example"]))
                    buffer = []
            index += 1
    if buffer:
        writer.write_table(pa.Table.from_pylist(buffer, schema=SCHEMAS["example"]))
    writer.close()
    return emitted


def reject_duplicate(build: _Build, index: int, row: dict[str, Any]) -> None:
    """The reject of a removed duplicate, written with its text now that the spill is read."""
    if index not in build.exact and index not in build.near:
        return
    name = build.names[build.sources[index]]
    if index in build.exact:
        reason, detail = "exact_duplicate", f"same as {int(build.ids[build.exact[index]]):016x}"
    else:
        kept, similarity = build.near[index]
        reason = "near_duplicate"
        detail = f"similar to {int(build.ids[kept]):016x} (estimated Jaccard {similarity:.2f})"
    build.stats[name][reason] += 1
    build.rejects.add(name, row["id"], reason, detail, _raw(row))


# ---- the statistics of the manifest and metrics
def source_summary(build: _Build, source_index: int, name: str) -> dict[str, Any]:
    member = build.sources == source_index
    c, t, d = build.copies[member], build.tokens[member], build.is_dev[member]
    s = build.stats[name]
    return {
        "records_read": s["records_read"], "filtered_out": s["filtered_out"],
        "examples_formatted": s["examples_formatted"],
        "eval_contamination": s["eval_contamination"],
        "overlength_truncated": s["overlength_truncated"],
        "overlength_dropped": s["overlength_dropped"],
        "exact_duplicates": s["exact_duplicate"], "near_duplicates": s["near_duplicate"],
        "format_rejects": dict(sorted((k, v) for k, v in build.rejects.by_source.get(name, {}).items()
                                      if k not in REMOVALS)),
        "available": s["available"], "examples": int(c.sum()),
        "distinct_examples": int((c > 0).sum()), "upsampled_copies": int((c - (c > 0)).sum()),
        "train": int(c[~d].sum()), "dev": int(c[d].sum()),
        "tokens": int((c * t).sum()), "tokens_train": int((c * t)[~d].sum()),
        "tokens_dev": int((c * t)[d].sum()),
        # only where there were any: older manifests stay byte-identical (no needless retrain)
        **({"held_out_test_records": s["held_out"]} if s["held_out"] else {}),
        **({"held_out_company_records": s["held_out_company"]} if s["held_out_company"] else {}),
    }


def summarize_build(build: _Build) -> dict[str, Any]:
    copies, tokens, is_dev, recipe = build.copies, build.tokens, build.is_dev, build.recipe
    per_source = {name: source_summary(build, i, name) for i, name in enumerate(build.names)}
    reasons = build.rejects.reasons
    totals = {
        "examples": int(copies.sum()), "train": int(copies[~is_dev].sum()),
        "dev": int(copies[is_dev].sum()), "tokens": int((copies * tokens).sum()),
        "tokens_train": int((copies * tokens)[~is_dev].sum()),
        "tokens_dev": int((copies * tokens)[is_dev].sum()),
        "records_read": sum(s["records_read"] for s in build.stats.values()),
        "malformed_rejects": sum(n for r, n in reasons.items() if r not in REMOVALS),
        "over_max_length": int(sum(s["overlength_truncated"] + s["overlength_dropped"]
                                   for s in build.stats.values())),
        "overlength_policy": recipe.overlength, "max_length": recipe.max_length,
    }
    if build.log is not None:
        build.log.info("mix@%s: %d examples (%d train, %d dev), %d tokens; rejects %s",
                       build.version, totals["examples"], totals["train"], totals["dev"],
                       totals["tokens"], dict(sorted(reasons.items())))
    return {"sources": per_source, "totals": totals, "length": length_stats(np.repeat(tokens, copies)),
            "rejects_by_reason": dict(sorted(reasons.items()))}


# ------------------------------------------------------------------------------ main
def manifest(version: str, recipe: MixParams, out: str, result: dict[str, Any],
             inputs: dict[str, dict], eval_sets: dict[str, dict], tokenizer: dict[str, Any]
             ) -> dict[str, Any]:
    """What the mixture is made of: train@ depends on it. The evaluation sets appear by path
    only, and decontamination by what it removed (``sources``, ``rejects_by_reason``): a
    regenerated evaluation set that removes nothing new leaves this file, and so every
    version's training, unchanged (item counts are in the stage's metrics)."""
    return {
        "version": version,
        "recipe": recipe.model_dump(mode="json"),
        "mixture": {"path": out, "sha256": file_sha256(out), **result["totals"]},
        "inputs": inputs,
        "eval_sets": {name: {k: v for k, v in info.items() if k != "items"}
                      for name, info in sorted(eval_sets.items())},
        "decontamination": recipe.decontamination.model_dump(mode="json"),
        "tokenizer": tokenizer,
        "sources": result["sources"],
        "length": result["length"],
        "rejects_by_reason": result["rejects_by_reason"],
    }


def metrics_of(result: dict[str, Any], seconds: float, eval_sets: dict[str, dict]
               ) -> dict[str, Any]:
    totals = result["totals"]
    return {
        "examples": totals["examples"], "train": totals["train"], "dev": totals["dev"],
        "tokens": totals["tokens"], "tokens_train": totals["tokens_train"],
        "tokens_dev": totals["tokens_dev"], "over_max_length": totals["over_max_length"],
        "length_p50": result["length"].get("p50", 0), "length_p99": result["length"].get("p99", 0),
        "length_max": result["length"].get("max", 0),
        "rejected": result["rejects_by_reason"],
        "sources": {name: {"examples": s["examples"], "tokens": s["tokens"]}
                    for name, s in result["sources"].items()},
        "eval_items": {name: info["items"] for name, info in sorted(eval_sets.items())},
        "seconds": seconds,
    }


@stage_main
def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__, "version")
    parser.add_argument("--tokenizer", required=True, help="directory for AutoTokenizer")
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--inputs", nargs="+", required=True,
                        help="the files dvc.yaml tracks for this recipe (dvc.vars.yaml's slots)")
    args = parser.parse_args(argv)
    version = args.version
    timer = Timer()
    recipe, collected, local = load_params(version, args.params)
    check_declared_inputs(recipe, args.inputs, version)
    log = setup_logging(args.log, f"mix@{version}")

    inputs = {}
    for name, path in recipe.source_inputs().items():
        require_input(path, f"versions.{version}.mix.sources.{name}", "run the stage that writes it",
                      directory=name.endswith("_json"))
        inputs[name] = {"path": path, "sha256": path_sha256(path)}
    if not os.path.isdir(args.tokenizer):
        raise StageError(f"--tokenizer {args.tokenizer} is not a directory (run base_model)")
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    if not tokenizer.chat_template:
        raise StageError(f"--tokenizer {args.tokenizer}: no chat template")
    items, eval_sets = load_eval_items(collected, local, load_open_sets(args.params))
    cfg = recipe.decontamination
    index = EvalIndex(items, cfg.ngram_chars, cfg.threshold, cfg.max_items_per_ngram, cfg.template_share)
    log.info("decontaminating against %d eval items of %s (%d template n-grams ignored; %d items "
             "all template)", len(index), sorted(eval_sets), index.template_ngrams, index.templated)

    def open_source(name: str) -> tuple[str, Batches]:
        path = inputs[name]["path"]
        return input_kind(path), read_batches(path, recipe.batch_size)

    with atomic_path(args.out) as tmp_out, atomic_path(args.rejects) as tmp_rejects:
        result = build_mixture(version, recipe, tokenizer, index, open_source, tmp_out,
                               tmp_rejects, log, held_out=load_held_out_companies(args.params))
        totals = result["totals"]
        if totals["records_read"] and \
                totals["malformed_rejects"] / totals["records_read"] > recipe.max_reject_rate:
            # The rejects file is still written (the user needs the reasons); not the mixture.
            os.replace(tmp_rejects, args.rejects)
            os.chmod(args.rejects, 0o644)
            raise StageError(f"mix@{version}: {totals['malformed_rejects']} of "
                             f"{totals['records_read']} records malformed > max_reject_rate "
                             f"{recipe.max_reject_rate:.1%}; see {args.rejects}")
        if totals["examples"] == 0:
            raise StageError(f"mix@{version}: the mixture is empty")
    write_json(manifest(version, recipe, args.out, result, inputs, eval_sets,
                        tokenizer_info(tokenizer, args.tokenizer)), args.manifest)
    write_metrics(args.metrics, metrics_of(result, timer.seconds, eval_sets))
    log.info("-> %s (%d examples, %d tokens) and %s (%.1fs)", args.out, totals["examples"],
             totals["tokens"], args.manifest, timer.seconds)


if __name__ == "__main__":
    main()
