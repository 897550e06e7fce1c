"""What the LLM stages would cost, before anything is paid (``make plan``). Not a DVC stage.

    python -m stages.plan [--json] [--params params.yaml] [--root .]

For every LLM stage of the workspace (``summarize``, ``filter@``, ``transform@``,
``synthesize@``, ``solve@``, ``agent@``) it prints whether ``dvc status`` would run it and, for those that
would, the first-draw requests not yet in the stage's response cache, their prompt tokens,
the expected completion tokens, the expected extra requests (re-asks, re-samples, the quality
gate, re-asked synthesize slots) and the dollars at the params' prices, online and through the
Batch API. It reads; it never calls the network and never writes a file.

How each figure is had, per stage (the table's ``basis`` column says which applied):

- **exact** where the stage's input exists: the real requests are rendered with the stage's
  own code (filter: prefilter survivors' judge prompts; transform: every filtered question;
  synthesize: every slot's first request; solve: every candidate's step prompt; summarize:
  every map chunk; agent: every table drawn from the collected prices) and looked up in the response cache by their cache key;
- **estimated** where an earlier stage has not written the input yet: the count follows from
  the params (``plan.assumed`` for the raw item counts of filter and summarize; the judge's
  keep share ``plan.keep_share`` for transform; ``target_pairs`` for solve), and a request's
  prompt is the stage's template plus the assumed item size;
- prompt tokens are counted with the model's own encoding (``o200k_base`` for gpt-4o, from the
  offline package ``bpe-openai``) over the messages, plus the chat format's few tokens per
  message and the JSON schema sent as ``response_format``;
- completion tokens are the mean of the answers already in the stage's cache, else the mean of
  the bundled sample answers of that stage (``data/samples/llm_cache/<stage>/``, written to the
  same response schemas, counted with the model's encoding), else
  ``plan.completion_share`` × ``max_tokens``;
- the overhead is what the stage's last metrics observed (calls per item), else the defaults
  below, stated in the table.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import math
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from pydantic import Field

from stages.common.llm import LLMParams, LLMRequest, Prices, response_format_for
from stages.common.llm_cache import ENTRY_FORMAT, ResponseCache, cache_key
from stages.common.params import PARAMS_FILE, ParamsError, Strict, load_raw, read_section, read_yaml
from stages.common.runlog import StageError
from stages.common.text import content_id

PARAMS = ("plan",)
LLM_STAGES = ("summarize", "filter", "transform", "synthesize", "solve", "agent", "judge")
# Extra draws per item where no metrics were observed yet: invalid answers re-asked (filter,
# transform, summarize), slots re-asked after a near-duplicate or a bad answer (synthesize).
DEFAULT_OVERHEAD = {"filter": 1.02, "transform": 1.05, "summarize": 1.05, "synthesize": 1.15,
                    "agent": 1.05, "judge": 1.02}
# agent, before prices are collected: tokens of one table's df.head() markdown, dtypes and
# description inside the prompt (measured on the sample tables: 230-330 in o200k_base)
AGENT_TABLE_TOKENS = 320
# solve, per verified question: the share whose first solution is wrong (each wrong one is
# re-sampled) and the share of candidates that never verify (replaced by the next candidate).
SOLVE_WRONG_SHARE = 0.15
SOLVE_FAIL_SHARE = 0.10
MESSAGE_TOKENS, REPLY_TOKENS = 4, 3  # the chat format's per-message and reply-priming tokens
SAMPLE_ANSWERS = Path("data/samples/llm_cache")  # the quickstart's recorded answers, per stage


class AssumedInput(Strict):
    items: int = Field(ge=0, description="items the stage will get (judged items, reports)")
    item_tokens: int = Field(ge=1, description="tokens of one item's text inside the prompt")


class PlanParams(Strict):
    completion_share: float = Field(0.5, gt=0, le=1, description=(
        "expected completion length as a share of max_tokens, where the cache has no answers"))
    keep_share: float = Field(0.75, gt=0, le=1, description=(
        "share of judged items the filter keeps, for transform's estimate before filter ran"))
    assumed: dict[str, AssumedInput] = Field(default_factory=dict, description=(
        "'filter.<domain>' / 'summarize' / 'company' (chunks) / 'judge' (open-ended questions "
        "with their references): input sizes assumed while the input does not exist"))


def load_params(key: str | None = None, path: str = PARAMS_FILE) -> PlanParams:
    """``plan`` (optional: every knob has a default)."""
    if "plan" not in (load_raw(path) or {}):
        return PlanParams()
    return read_section(PARAMS, PlanParams, None, path=path)


# ------------------------------------------------------------------------ counting
class TokenCounter:
    """Prompt tokens of a request with the model's encoding (bpe-openai: offline)."""

    def __init__(self, model: str):
        from bpe_openai import encoding_for_model, get_encoding
        self.encoding, self.name = None, None
        # a dated snapshot (gpt-4o-2024-08-06) has its family's encoding
        for candidate in (model, re.sub(r"-\d{4}-\d{2}-\d{2}$", "", model)):
            try:
                self.encoding = encoding_for_model(candidate)
                break
            except Exception:
                continue
        if self.encoding is None:  # an unknown or self-hosted model: OpenAI's current encoding
            self.encoding = get_encoding("o200k_base")
            self.name = f"o200k_base (no encoding known for {model!r})"
        self.name = self.name or f"{self.encoding.name} ({model})"
        self._schemas: dict[type, int] = {}

    def text(self, text: str) -> int:
        return len(self.encoding.encode_ordinary(text))

    def request(self, request: LLMRequest) -> int:
        model = request.response_model
        if model not in self._schemas:
            self._schemas[model] = self.text(json.dumps(response_format_for(model)["json_schema"],
                                                        ensure_ascii=False))
        body = sum(MESSAGE_TOKENS + self.text(str(m.get("content") or "")) for m in request.messages)
        return body + REPLY_TOKENS + self._schemas[model]


@dataclass
class StagePlan:
    stage: str
    runs: bool
    basis: str = ""
    requests: int = 0          # first draws the stage makes
    cached: int = 0            # of them, already answered in the cache
    damaged: int = 0           # of the uncached, with an unreadable cache entry (paid again)
    prompt_tokens: int = 0     # of the uncached first draws
    completion_tokens: int = 0  # expected, of the uncached first draws
    completion_basis: str = ""
    overhead: float = 1.0      # expected requests per first draw (re-asks, re-samples, gate)
    overhead_basis: str = ""
    usd_online: float = 0.0
    usd_batch: float = 0.0

    @property
    def uncached(self) -> int:
        return self.requests - self.cached

    def price(self, prices: Prices) -> None:
        p, c = self.prompt_tokens * self.overhead, self.completion_tokens * self.overhead
        self.usd_online = (p * prices.input_per_1m + c * prices.output_per_1m) / 1e6
        self.usd_batch = (p * prices.batch_input + c * prices.batch_output) / 1e6


# ------------------------------------------------------------------------ the workspace
@dataclass
class Context:
    root: Path
    params_path: str
    plan: PlanParams
    commands: dict[str, str]                 # dvc.yaml stage -> its raw cmd
    counters: dict[str, TokenCounter] = field(default_factory=dict)
    # filter domain -> (the records its judge sees, exact?) for transform/synthesize estimates
    judged: dict[str, tuple[list[dict[str, Any]], float]] = field(default_factory=dict)
    assumed_tokens: dict[str, int] = field(default_factory=dict)  # filter domain -> item tokens
    sample_means: dict[str, Optional[float]] = field(default_factory=dict)
    # outputs of the stages that will run (changed, or downstream of one) -> that stage
    rewritten: dict[str, str] = field(default_factory=dict)
    # an LLM stage's output -> the records its planned run is expected to write
    planned: dict[str, float] = field(default_factory=dict)
    pdf_samples: dict[str, Optional["PdfSample"]] = field(default_factory=dict)

    def readable(self, rel: str) -> bool:
        """On disk now (possibly stale: see :meth:`exists`)."""
        return (self.root / rel).exists()

    def exists(self, rel: str) -> bool:
        """On disk and what the stage will read: no stage that runs first rewrites it."""
        return self.readable(rel) and self.rewriter(rel) is None

    def rewriter(self, rel: str) -> Optional[str]:
        rel = rel.rstrip("/")
        for out, stage in self.rewritten.items():
            if rel == out or rel.startswith(out + "/") or out.startswith(rel + "/"):
                return stage
        return None

    def why(self, rel: str) -> str:
        """Why ``rel`` is not read as it is: rewritten by an upstream stage, or missing."""
        stage = self.rewriter(rel)
        return f"input rewritten by {stage}" if stage else "input missing"

    def arg(self, stage: str, key: Optional[str], flag: str) -> Optional[str]:
        """A path the stage's dvc.yaml command passes with ``flag`` (``${key}`` filled in)."""
        found = re.search(rf"{flag}\s+(\S+)", self.commands.get(stage, ""))
        return found.group(1).replace("${key}", key or "") if found else None

    def metrics(self, stage: str, key: Optional[str]) -> Optional[dict[str, Any]]:
        path = self.root / (self.arg(stage, key, "--metrics") or "-")
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def sample_completion_mean(self, stage: str, counter: TokenCounter) -> Optional[float]:
        """Mean length, in the model's encoding, of the bundled sample answers of ``stage``
        (``data/samples/llm_cache/<stage>/``: written to the same schemas): the prior before
        the stage's own cache holds any answer."""
        if stage not in self.sample_means:
            lengths = []
            for path in sorted((self.root / SAMPLE_ANSWERS / stage).glob("**/??/*.json")):
                try:
                    content = json.loads(path.read_bytes())["response"]["content"]
                except (OSError, ValueError, KeyError, TypeError):
                    continue
                if content:
                    lengths.append(counter.text(content))
            self.sample_means[stage] = statistics.fmean(lengths) if lengths else None
        return self.sample_means[stage]

    def counter(self, model: str) -> TokenCounter:
        if model not in self.counters:
            self.counters[model] = TokenCounter(model)
        return self.counters[model]


def load_commands(root: Path) -> dict[str, str]:
    spec = read_yaml((root / "dvc.yaml").read_text(encoding="utf-8")) or {}
    out = {}
    for name, stage in (spec.get("stages") or {}).items():
        body = stage.get("do", stage) if isinstance(stage, dict) else {}
        out[name] = " ".join(str(body.get("cmd", "")).split())
    return out


def would_run(root: Path) -> tuple[Optional[set[str]], dict[str, str], str]:
    """(every stage ``dvc repro`` would run, the outputs those stages rewrite -> the stage,
    how it was found). ``dvc status`` reports only the stages whose own deps or params
    changed; a stage downstream of one of them (dvc.yaml's DAG) runs too: it reads what the
    other rewrites. None: unknown, with why."""
    dvc = Path(sys.executable).parent / "dvc"
    try:
        proc = subprocess.run([str(dvc) if dvc.exists() else "dvc", "status", "--json"],
                              cwd=root, capture_output=True, text=True, timeout=120)
        changed = json.loads(proc.stdout or "{}") if proc.returncode == 0 else None
    except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
        return None, {}, f"dvc status failed ({exc}); every LLM stage counted"
    if changed is None:
        return None, {}, (f"dvc status failed: {(proc.stderr or '').strip()[-200:]}; every LLM "
                          "stage counted")
    graph = stage_graph(root)
    runs = downstream({name.split(":")[-1] for name in changed}, graph)
    rewritten = {out: name for name in sorted(runs) for out in graph.get(name, ((), ()))[1]}
    return runs, rewritten, "dvc status, and every stage downstream of those in dvc.yaml's DAG"


def stage_graph(root: Path) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """dvc.yaml's stages (foreach expanded) -> (dep paths, out paths)."""
    from dvc.repo import Repo
    with Repo(str(root)) as repo:
        return {s.addressing: (tuple(d.def_path.rstrip("/") for d in s.deps if type(d).__name__ == "Dependency"),
                               tuple(o.def_path.rstrip("/") for o in s.outs))
                for s in repo.index.stages}


def downstream(changed: set[str], graph: dict[str, tuple[Sequence[str], Sequence[str]]]) -> set[str]:
    """``changed`` and every stage that reads (directly or not) an output of one of them."""
    def reads(dep: str, out: str) -> bool:
        return dep == out or dep.startswith(out + "/") or out.startswith(dep + "/")
    runs, frontier = set(changed), list(changed)
    while frontier:
        outs = graph.get(frontier.pop(), ((), ()))[1]
        for name, (deps, _) in graph.items():
            if name not in runs and any(reads(d, o) for d in deps for o in outs):
                runs.add(name)
                frontier.append(name)
    return runs


# ------------------------------------------------------------------------ tallying
def cached_completion_mean(cache_dir: Optional[Path]) -> Optional[float]:
    """Mean completion tokens of the answers in a stage's cache (None: no answers yet)."""
    if cache_dir is None or not cache_dir.is_dir():
        return None
    counts = []
    for path in cache_dir.glob("??/*.json"):  # the entries (not batches/ records)
        try:
            entry = json.loads(path.read_bytes())
            if entry.get("format") != ENTRY_FORMAT:  # the stage would not use it either
                continue
            tokens = entry["response"]["completion_tokens"]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        if tokens:
            counts.append(tokens)
    return statistics.fmean(counts) if counts else None


def tally(row: StagePlan, requests: Sequence[LLMRequest], llm: LLMParams, ctx: Context,
          cache_dir: Optional[Path], *, scale: float = 1.0, extra_tokens: int = 0) -> None:
    """Count ``requests`` into ``row``: cached first draws, prompt tokens of the uncached
    (``extra_tokens`` each: assumed item text), expected completions; ``scale`` for a share."""
    counter = ctx.counter(llm.model)
    cache = ResponseCache(cache_dir) if cache_dir is not None and cache_dir.is_dir() else None
    formats: dict[type, dict[str, Any]] = {}
    cached = prompt = damaged = 0
    counted: dict[int, int] = {}  # an estimate repeats one template request n times
    usable: dict[str, bool] = {}  # cache key -> its entry reads as the stage would use it
    for request in requests:
        if request.response_model not in formats:
            formats[request.response_model] = response_format_for(request.response_model)
        fmt = formats[request.response_model]
        key = cache_key(model=llm.model, messages=[dict(m) for m in request.messages],
                        json_schema=fmt["json_schema"], temperature=llm.temperature,
                        top_p=llm.top_p, max_tokens=llm.max_tokens, seed=llm.seed,
                        sample_index=request.sample_index, reask_index=0)
        if cache is not None and cache.path_for(key).is_file():
            # the stage reads an entry it cannot parse as a miss and pays for it again
            if key not in usable:  # an estimate repeats one request: read (and warn) once
                usable[key] = cache.get(key) is not None
            if usable[key]:
                cached += 1
                continue
            damaged += 1
        if id(request) not in counted:
            counted[id(request)] = counter.request(request)
        prompt += counted[id(request)] + extra_tokens
    mean, basis = cached_completion_mean(cache_dir), "cache mean"
    if mean is None:
        mean, basis = ctx.sample_completion_mean(row.stage.split("@")[0], counter), "sample answers' mean"
    each = mean if mean is not None else ctx.plan.completion_share * llm.max_tokens
    row.completion_basis = (f"{basis} {mean:.0f}" if mean is not None else
                            f"{ctx.plan.completion_share:g} x max_tokens {llm.max_tokens}")
    row.requests += round(len(requests) * scale)
    row.cached += round(cached * scale)
    row.damaged += round(damaged * scale)
    row.prompt_tokens += round(prompt * scale)
    row.completion_tokens += round((len(requests) - cached) * scale * each)


def observed_overhead(row: StagePlan, metrics: Optional[dict[str, Any]], default: float,
                      per: str = "items") -> None:
    """Requests per item as the stage's last run saw them, else ``default``."""
    llm = (metrics or {}).get("llm") or {}
    items = (metrics or {}).get(per) or llm.get("items")
    if items and (llm.get("calls", 0) + llm.get("cache_hits", 0)):
        row.overhead = max(1.0, (llm["calls"] + llm["cache_hits"]) / items)
        row.overhead_basis = f"observed ({per})"
    else:
        row.overhead, row.overhead_basis = default, "default"


# ------------------------------------------------------------------------ raw inputs
PDF_SAMPLE_PAGES = 40   # pages read to size a PDF collection that is not extracted yet


@dataclass
class PdfSample:
    """A PDF collection measured without extracting it: every file's page count, and the
    text of ``PDF_SAMPLE_PAGES`` pages spread evenly over all of them, as page records."""
    directory: str
    files: int
    pages: int
    sampled: list[dict[str, Any]]

    @property
    def scale(self) -> float:
        return self.pages / len(self.sampled) if self.sampled else 0.0

    def describe(self) -> str:
        return (f"from the raw PDFs in {self.directory}: {self.files:,} files, {self.pages:,} pages, "
                f"a sample of {len(self.sampled)} pages")


def raw_pdfs(ctx: Context, collected: str) -> Optional[PdfSample]:
    """``data/collected/<key>.parquet`` of ``extract@<key>`` not written yet: its PDFs, sized
    (None when they are not on disk either)."""
    if collected not in ctx.pdf_samples:
        match = re.fullmatch(r"data/collected/([\w-]+)\.parquet", collected)
        spec = (load_raw(ctx.params_path).get("extract") or {}).get(match[1]) if match else None
        directory = spec.get("input") if isinstance(spec, dict) else None
        ctx.pdf_samples[collected] = (sample_pdfs(ctx.root / directory, directory, match[1])
                                      if directory and (ctx.root / directory).is_dir() else None)
    return ctx.pdf_samples[collected]


def sample_pdfs(directory: Path, label: str, source: str, wanted: int = PDF_SAMPLE_PAGES
                ) -> Optional[PdfSample]:
    """Page counts of every PDF under ``directory`` and the text of ``wanted`` pages spread
    evenly over them (PyMuPDF, the extractor's library; opening a file reads its page tree
    only, so thousands take seconds). A file PyMuPDF cannot open counts 0 pages."""
    from stages.extract import pymupdf   # imported the extractor's way (no layout models)
    from stages.common.text import normalize_text
    files = sorted(directory.rglob("*.pdf"))
    counts = []
    for path in files:
        try:
            with pymupdf.open(path) as doc:
                counts.append(doc.page_count)
        except Exception:   # noqa: BLE001 — extract rejects it; here it only adds no pages
            counts.append(0)
    total = sum(counts)
    if not total:
        return None
    picks = sorted({round(i * total / min(wanted, total)) for i in range(min(wanted, total))})
    sampled, start = [], 0
    for path, count in zip(files, counts):
        mine = [n - start for n in picks if start <= n < start + count]
        if mine:
            with pymupdf.open(path) as doc:
                for number in mine:
                    text = normalize_text(doc[number].get_text())
                    doc_id = content_id("plan-sample", str(path))
                    sampled.append({"id": content_id(doc_id, number), "source": source, "doc_id": doc_id,
                                    "path": path.name, "page": number + 1, "title": path.stem,
                                    "text": text or " ", "tables": [], "meta": "{}"})
        start += count
    return PdfSample(label, len(files), total, sampled)


# ------------------------------------------------------------------------ the stages
def plan_filter(key: str, ctx: Context, row: StagePlan) -> LLMParams:
    from stages import filter as stage
    params = stage.load_params(key, ctx.params_path)
    cache = ctx.root / (ctx.arg("filter", key, "--cache-dir") or "-")
    documents = params.chunking is not None
    if all(ctx.readable(p) for p in params.inputs):
        kind, records, _ = stage.load_items(params, key)
        survivors, _, _ = stage.select_candidates(records, params, key)
        judged = [record for record, _ in survivors]
        requests = [LLMRequest(stage.judge_messages(r, params.criteria), stage.Verdict, r["id"])
                    for r in judged]
        tally(row, requests, params.llm, ctx, cache)
        row.basis = (f"{stale_prefix(ctx, params.inputs)}{len(records)} {kind} items, {len(judged)} "
                     "pass the prefilter")
        ctx.judged[key] = (judged, float(len(judged)))
    elif documents and len(params.inputs) == 1 and raw_pdfs(ctx, params.inputs[0]) is not None:
        sample = raw_pdfs(ctx, params.inputs[0])
        chunks = stage.chunk_documents(sample.sampled, params.chunking, key)
        survivors, _, _ = stage.select_candidates(chunks, params, key)
        judged = [record for record, _ in survivors]
        requests = [LLMRequest(stage.judge_messages(r, params.criteria), stage.Verdict, r["id"])
                    for r in judged]
        tally(row, requests, params.llm, ctx, cache, scale=sample.scale)
        row.basis = (f"estimated: {ctx.why(params.inputs[0])}; {sample.describe()} -> "
                     f"{len(chunks)} chunks, {len(judged)} pass the prefilter (x {sample.scale:.1f})")
        ctx.judged[key] = (judged, len(judged) * sample.scale)
    else:
        assumed = ctx.plan.assumed.get(f"filter.{key}")
        if assumed is None:
            row.basis = f"unknown: input missing and no plan.assumed.filter.{key}"
            return params.llm
        empty = ({"title": "", "doc_id": "", "text": ""} if documents
                 else {"question": "", "choices": ["", "", "", ""]})
        template = LLMRequest(stage.judge_messages(empty, params.criteria), stage.Verdict, "x")
        tally(row, [template] * assumed.items, params.llm, ctx, None, extra_tokens=assumed.item_tokens)
        row.basis = (f"estimated: input missing; plan.assumed {assumed.items} items of "
                     f"{assumed.item_tokens} tokens (all assumed to pass the prefilter)")
        ctx.assumed_tokens[key] = assumed.item_tokens
        ctx.judged[key] = ([], float(assumed.items))
    ctx.planned[ctx.arg("filter", key, "--out") or ""] = ctx.judged[key][1] * ctx.plan.keep_share
    observed_overhead(row, ctx.metrics("filter", key), DEFAULT_OVERHEAD["filter"])
    return params.llm


def stale_prefix(ctx: Context, paths: Sequence[str]) -> str:
    """"exact: " for inputs the stage will read as they are; for inputs a non-LLM stage that
    runs first rewrites (collect, extract), the size of the current file is the best there is."""
    stale = sorted({ctx.rewriter(p) for p in paths} - {None})
    return (f"estimated: input rewritten by {', '.join(stale)}; sized from the file on disk now: "
            if stale else "exact: ")


def _domain_of(filtered_path: str, ctx: Context) -> Optional[str]:
    """The filter domain whose output ``filtered_path`` is (from dvc.yaml's filter --out)."""
    for domain in ctx.judged:
        if ctx.arg("filter", domain, "--out") == filtered_path:
            return domain
    return None


def plan_transform(key: str, ctx: Context, row: StagePlan) -> LLMParams:
    from stages import transform as stage
    from stages.common.io import read_records
    params = stage.load_params(key, ctx.params_path)
    cache = ctx.root / (ctx.arg("transform", key, "--cache-dir") or "-")
    build = lambda r: LLMRequest(stage.transform_messages(r, params.context),  # noqa: E731
                                 stage.SevenChoiceMCQ, r["id"])
    domain = _domain_of(params.input, ctx)
    if ctx.exists(params.input):
        records = read_records(ctx.root / params.input)
        tally(row, [build(r) for r in records], params.llm, ctx, cache)
        row.basis = f"exact: {len(records)} filtered questions"
    elif domain is not None and ctx.judged[domain][0]:
        judged, count = ctx.judged[domain]
        tally(row, [build(r) for r in judged], params.llm, ctx, cache,
              scale=ctx.plan.keep_share * count / len(judged))
        row.basis = (f"estimated: {ctx.why(params.input)}; its filter's {len(judged)} judged questions x keep "
                     f"share {ctx.plan.keep_share:g}")
    elif domain is not None and ctx.judged[domain][1]:
        n = round(ctx.judged[domain][1] * ctx.plan.keep_share)
        empty = {"question": "", "choices": ["", "", "", ""], "answer": 0, "id": "x"}
        tally(row, [build(empty)] * n, params.llm, ctx, None,
              extra_tokens=2 * ctx.assumed_tokens.get(domain, 0))  # question + answer repeated
        row.basis = f"estimated: {n} questions (plan.assumed x keep share {ctx.plan.keep_share:g})"
    else:
        row.basis = f"unknown: {ctx.why(params.input)} and no estimate upstream"
    ctx.planned[ctx.arg("transform", key, "--out") or ""] = row.requests
    observed_overhead(row, ctx.metrics("transform", key), DEFAULT_OVERHEAD["transform"])
    return params.llm


def company_chunks(ctx: Context) -> Optional[list[dict[str, Any]]]:
    """The chunks ``company`` would write, computed from its inputs (no LLM, seconds), or None
    when they are not on disk either."""
    from stages import company
    from stages.common.io import read_records
    from stages.common.params import ParamsError
    from stages.common.runlog import StageError
    try:
        params = company.load_params(path=ctx.params_path)
        paths = [params.inputs.profiles, params.inputs.reports]
        if not all(ctx.readable(p) for p in paths):
            return None
        return company.build_chunks(*(read_records(ctx.root / p) for p in paths), params)[0]
    except (ParamsError, StageError):   # no company section, or inputs it refuses
        return None


def plan_synthesize(key: str, ctx: Context, row: StagePlan) -> LLMParams:
    from stages import synthesize as stage
    params = stage.load_params(key, ctx.params_path)
    cache = ctx.root / (ctx.arg("synthesize", key, "--cache-dir") or "-")
    templates = {name: stage.load_template(name) for name in stage.TEMPLATES}
    examples = stage.load_fewshot(params.fewshot)
    chunks, extra, how = [], 0, "exact"
    if params.grounded:
        paths = [params.inputs.filtered, params.inputs.transformed]
        domain = _domain_of(params.inputs.filtered, ctx)
        of_company = params.inputs.filtered == ctx.arg("company", None, "--out")  # dvc.yaml's path
        if all(ctx.exists(p) for p in paths):
            chunks = stage.read_inputs(paths)[1]
        elif of_company and (computed := company_chunks(ctx)) is not None:
            chunks = computed
            how = f"estimated: {ctx.why(params.inputs.filtered)}; its chunks computed from its inputs"
        elif of_company and "company" in ctx.plan.assumed:
            chunks = [{"id": "x", "text": ""}]
            extra = ctx.plan.assumed["company"].item_tokens
            how = f"estimated: chunks of {extra} tokens (plan.assumed.company)"
        elif domain is not None and ctx.judged[domain][0]:
            chunks, how = ctx.judged[domain][0], f"estimated: {ctx.why(params.inputs.filtered)}; its filter's judged chunks"
        else:
            chunks = [{"id": "x", "text": ""}]
            extra = ctx.assumed_tokens.get(domain or "", 0)
            how = f"estimated: chunks of {extra} tokens (plan.assumed)"
    slots = stage.plan_slots(params.target, params.topics, params.choice_counts, chunks,
                             params.angles)
    model = stage.response_model(params)
    requests = [LLMRequest(stage.build_messages(s, params, examples, templates), model, s.item_id)
                for s in slots]
    tally(row, requests, params.llm, ctx, cache, extra_tokens=extra)
    row.basis = f"{how}: {len(slots)} slots (first round)"
    ctx.planned[ctx.arg("synthesize", key, "--out") or ""] = params.target
    observed_overhead(row, ctx.metrics("synthesize", key), DEFAULT_OVERHEAD["synthesize"],
                      per="target")
    return params.llm


def plan_solve(key: str, ctx: Context, row: StagePlan) -> LLMParams:
    from stages import solve as stage
    from stages.common.io import read_records
    params = stage.load_params(key, ctx.params_path)
    cache = ctx.root / (ctx.arg("solve", key, "--cache-dir") or "-")
    templates = {name: stage.load_template(name) for name in stage.TEMPLATES}
    paths = list(dict.fromkeys([params.inputs.transformed, params.inputs.synthesized]))
    known = [read_records(p) for p in paths if ctx.exists(p)]
    stale = [p for p in paths if not ctx.exists(p)]   # missing, or rewritten by a stage that runs first
    candidates = stage.select_candidates(known, key)[0] if known else []
    if known and params.test_split == "verify":   # every test question is solved as well
        candidates += stage.select_candidates(known, key, split="test")[0]
    wanted = None if params.target_pairs is None else params.target_pairs // 2
    build = lambda q: LLMRequest(stage.solve_messages(q, templates), stage.Solution, q["id"])  # noqa: E731
    if not stale:
        attempts = len(candidates) if wanted is None else min(len(candidates),
                                                              round(wanted / (1 - SOLVE_FAIL_SHARE)))
        tally(row, [build(q) for q in candidates[:attempts]], params.llm, ctx, cache)
        row.basis = f"exact: first {attempts} of {len(candidates)} candidates"
    else:
        # the questions the upstream rows plan to write (transform: its requests; synthesize:
        # its target), not the stale files: solve reads what they will have written
        planned = [ctx.planned[p] for p in stale if p in ctx.planned]
        expected = len(candidates) + round(sum(planned)) if planned else None
        attempts = (expected if wanted is None else min(expected, round(wanted / (1 - SOLVE_FAIL_SHARE)))
                    ) if expected is not None else round((wanted or 0) / (1 - SOLVE_FAIL_SHARE))
        why = "; ".join(dict.fromkeys(ctx.why(p) for p in stale))
        source = (f"{len(candidates)} on disk + {round(sum(planned))} planned upstream"
                  if planned else "from target_pairs")
        if candidates:
            tally(row, [build(q) for q in candidates], params.llm, ctx, cache,
                  scale=attempts / len(candidates))
            row.basis = f"estimated: {why}; {attempts} questions ({source}) like the {len(candidates)} known ones"
        else:
            empty = {"id": "x", "question": "", "choices": [""] * 7, "answer": 0}
            tally(row, [build(empty)] * attempts, params.llm, ctx, None, extra_tokens=250)
            row.basis = f"estimated: {why}; {attempts} questions of ~250 tokens ({source})"
    resamples = sum(SOLVE_WRONG_SHARE ** k for k in range(1, params.max_resamples + 1))
    default = 1 + resamples + (1.0 if params.quality.enabled else 0.0)
    observed_overhead(row, ctx.metrics("solve", key), default, per="attempted")
    if row.overhead_basis == "default":
        row.overhead_basis = (f"default: {SOLVE_WRONG_SHARE:.0%} wrong first solutions re-sampled"
                              + (", + the quality gate" if params.quality.enabled else ""))
    return params.llm


def plan_summarize(key: Optional[str], ctx: Context, row: StagePlan) -> LLMParams:
    from stages import summarize as stage
    params = stage.load_params(None, ctx.params_path)
    cache = ctx.root / (ctx.arg("summarize", None, "--cache-dir") or "-")
    prompts = stage.Prompts.load()
    source = ctx.arg("summarize", None, "--input")
    if source and ctx.readable(source):
        reports = stage.read_reports(source)
        requests, multi = [], 0
        for report in reports:
            chunks = stage.chunk_report(report, params.max_chunk_tokens, params.tokens_per_char)
            requests += [stage.map_request(report, c, len(chunks), prompts) for c in chunks]
            multi += len(chunks) > 1
        tally(row, requests, params.llm, ctx, cache)
        row.basis = (f"{stale_prefix(ctx, [source])}{len(reports)} reports, {len(requests)} map calls; "
                     f"+ {multi} merges (in the overhead)")
        default = 1 + multi / max(1, len(requests)) + DEFAULT_OVERHEAD["summarize"] - 1
    elif source and raw_pdfs(ctx, source) is not None:
        sample = raw_pdfs(ctx, source)
        counter = ctx.counter(params.llm.model)
        page_tokens = statistics.fmean(counter.text(p["text"]) for p in sample.sampled)
        report_tokens = page_tokens * sample.pages / sample.files
        calls = max(1, math.ceil(report_tokens * params.tokens_per_char / params.max_chunk_tokens))
        report = stage.Report(doc_id="x", source="x", path="x", title="", pages=())
        template = stage.map_request(report, stage.Chunk(0, (), 0), calls, prompts)
        tally(row, [template] * (sample.files * calls), params.llm, ctx, None,
              extra_tokens=round(report_tokens / calls))
        row.basis = (f"estimated: {ctx.why(source)}; {sample.describe()} ({page_tokens:.0f} tokens a "
                     f"page): {sample.files:,} reports of ~{report_tokens:.0f} tokens, {calls} map call(s) each")
        default = 1 + (1 if calls > 1 else 0) / calls + DEFAULT_OVERHEAD["summarize"] - 1
    else:
        assumed = ctx.plan.assumed.get("summarize")
        if assumed is None:
            row.basis = "unknown: input missing and no plan.assumed.summarize"
            return params.llm
        report = stage.Report(doc_id="x", source="x", path="x", title="", pages=())
        chunk = stage.Chunk(0, (), 0)
        template = stage.map_request(report, chunk, 1, prompts)
        tally(row, [template] * assumed.items, params.llm, ctx, None, extra_tokens=assumed.item_tokens)
        row.basis = (f"estimated: {assumed.items} reports of {assumed.item_tokens} tokens "
                     "(plan.assumed), one map call each")
        default = DEFAULT_OVERHEAD["summarize"]
    observed_overhead(row, ctx.metrics("summarize", None), default, per="reports")
    return params.llm


def plan_agent(key: str, ctx: Context, row: StagePlan) -> LLMParams:
    from stages import agent as stage
    params = stage.load_params(key, ctx.params_path)
    cache = ctx.root / (ctx.arg("agent", key, "--cache-dir") or "-")
    paths = [f"data/collected/{name}.parquet" for name in params.prices]
    if all(ctx.readable(p) for p in paths):
        prices = stage.read_prices([str(ctx.root / p) for p in paths])
        specs, _ = stage.draw_tables(prices, params)
        frames = {s.id: stage.table_frame(prices, s) for s in specs}
        tally(row, stage.build_requests(specs, frames), params.llm, ctx, cache)
        row.basis = f"{stale_prefix(ctx, paths)}{len(specs)} tables drawn from the collected prices"
    else:
        n = params.tables + params.test_tables
        spec = stage.TableSpec("x", "train", ["000000"], ["-"], "", "", [], params.choice_counts[0],
                               params.themes[0])
        empty = stage.pd.DataFrame({"날짜": stage.pd.to_datetime([]), "종가": []})
        template = stage.build_requests([spec], {"x": empty})[0]
        tally(row, [template] * n, params.llm, ctx, None, extra_tokens=AGENT_TABLE_TOKENS)
        row.basis = (f"estimated: prices not collected yet; {n} tables of ~{AGENT_TABLE_TOKENS} "
                     "tokens")
    observed_overhead(row, ctx.metrics("agent", key), DEFAULT_OVERHEAD["agent"])
    return params.llm


def plan_judge(key: str, ctx: Context, row: StagePlan) -> LLMParams:
    """judge@<key>: one verdict per open-ended answer of evaluate@<key>; exact from the answers
    on disk, else the open-ended sets' questions with answers at evaluate's length bound."""
    from stages import evaluate, judge as stage
    from stages.common.io import read_records
    from stages.sources.evalsets import load_open_ended
    params = stage.load_params(key, ctx.params_path)
    if params.method != "llm":
        row.basis = f"{params.method}: scored offline, no LLM call"
        return params.llm
    cache = ctx.root / (ctx.arg("judge", key, "--cache-dir") or "-")
    answers = ctx.arg("judge", key, "--answers") or "-"
    if ctx.exists(answers):
        rows = read_records(ctx.root / answers)
        tally(row, stage.judge_requests(rows), params.llm, ctx, cache)
        row.basis = f"exact: {len(rows)} answers of evaluate@{key}"
    else:
        settings = evaluate.load_params(None, ctx.params_path)
        items = []
        for name, spec in sorted(settings.open_ended.items()):
            if ctx.readable(spec.input):
                items += load_open_ended(name, spec)[0]
        bound = settings.generation.open_ended_max_new_tokens
        rows = [{"id": i.id, "question": i.question, "reference": i.reference, "answer": ""}
                for i in items]
        assumed = ctx.plan.assumed.get("judge")
        if rows:
            tally(row, stage.judge_requests(rows), params.llm, ctx, None, extra_tokens=bound)
            row.basis = (f"estimated: {ctx.why(answers)}; {len(items)} open-ended questions, "
                         f"answers at evaluate's bound of {bound} tokens")
        elif assumed is not None:  # the team's open-ended file is not in data/raw yet
            empty = [{"id": "x", "question": "", "reference": "", "answer": ""}]
            tally(row, stage.judge_requests(empty) * assumed.items, params.llm, ctx, None,
                  extra_tokens=assumed.item_tokens + bound)
            row.basis = (f"estimated: open-ended sets not on disk; plan.assumed {assumed.items} "
                         f"questions of {assumed.item_tokens} tokens, answers at {bound} tokens")
        else:
            row.basis = "unknown: no open-ended set on disk and no plan.assumed.judge"
    observed_overhead(row, ctx.metrics("judge", key), DEFAULT_OVERHEAD["judge"])
    return params.llm


PLANNERS: dict[str, Callable[[Optional[str], Context, StagePlan], LLMParams]] = {
    "summarize": plan_summarize, "filter": plan_filter, "transform": plan_transform,
    "synthesize": plan_synthesize, "solve": plan_solve, "agent": plan_agent, "judge": plan_judge}


# ------------------------------------------------------------------------ the plan
def stage_keys(stage: str, raw: dict[str, Any]) -> list[Optional[str]]:
    """The foreach keys of an LLM stage: its params section's keys; judge@: the evaluated
    keys (the base and every version); summarize has none."""
    if stage == "summarize":
        return [None]
    if stage == "judge":
        from stages.dvc_vars import BASE_KEY
        return [BASE_KEY, *(raw.get("versions") or {})]
    return list(raw.get(stage) or {})


def make_plan(root: Path, params_path: str = PARAMS_FILE) -> dict[str, Any]:
    """The plan of the workspace at ``root`` (the current directory: paths are relative)."""
    raw = load_raw(params_path) or {}
    ctx = Context(root, params_path, load_params(None, params_path), load_commands(root))
    names = [s for s in LLM_STAGES if s in raw]
    changed, ctx.rewritten, status_basis = would_run(root)
    rows, prices, encodings = [], {}, set()
    # filter before the stages that estimate from it; the table keeps the DAG order
    order = sorted(names, key=lambda s: (s != "filter", LLM_STAGES.index(s)))
    for stage in order:
        for key in stage_keys(stage, raw):
            name = stage if key is None else f"{stage}@{key}"
            row = StagePlan(name, runs=changed is None or name in changed)
            llm = PLANNERS[stage](key, ctx, row)
            if row.runs:
                row.price(llm.prices)
            else:  # up to date: dvc repro would not run it; what it asks is shown, unpriced
                row.basis = f"up to date (dvc status); if forced: {row.basis}"
            prices[name] = llm.prices
            encodings.add(ctx.counter(llm.model).name)
            rows.append(row)
    rows.sort(key=lambda r: LLM_STAGES.index(r.stage.split("@")[0]))
    return {"rows": rows, "status": status_basis, "encodings": sorted(encodings),
            "total": totals(rows)}


def totals(rows: Sequence[StagePlan]) -> dict[str, Any]:
    return {"requests": sum(r.requests for r in rows if r.runs),
            "uncached": sum(r.uncached for r in rows if r.runs),
            "expected_calls": round(sum(r.uncached * r.overhead for r in rows if r.runs)),
            "prompt_tokens": round(sum(r.prompt_tokens * r.overhead for r in rows if r.runs)),
            "completion_tokens": round(sum(r.completion_tokens * r.overhead for r in rows if r.runs)),
            "usd_online": round(sum(r.usd_online for r in rows), 2),
            "usd_batch": round(sum(r.usd_batch for r in rows), 2)}


def render(plan: dict[str, Any]) -> str:
    head = ("| stage | runs | first draws | cached | uncached | prompt tok | completion tok | "
            "x overhead | $ online | $ batch | basis |\n|" + "---|" * 11)
    lines = [head]
    for r in plan["rows"]:
        lines.append(f"| {r.stage} | {'yes' if r.runs else 'no'} | {r.requests:,} | {r.cached:,} | "
                     f"{r.uncached:,} | {r.prompt_tokens:,} | {r.completion_tokens:,} "
                     f"({r.completion_basis or '–'}) | {r.overhead:.2f} ({r.overhead_basis or '–'}) | "
                     f"{r.usd_online:,.2f} | {r.usd_batch:,.2f} | {r.basis}"
                     + (f"; {r.damaged:,} damaged cache entries, asked again" if r.damaged else "")
                     + " |")
    t = plan["total"]
    lines.append(f"| **total** | | {t['requests']:,} | | {t['uncached']:,} | {t['prompt_tokens']:,} | "
                 f"{t['completion_tokens']:,} | {t['expected_calls']:,} calls | "
                 f"**{t['usd_online']:,.2f}** | **{t['usd_batch']:,.2f}** | |")
    notes = (f"Stages that would run: {plan['status']}. Prompt tokens: {', '.join(plan['encodings'])} "
             "over the rendered messages + the JSON schema; tokens and $ include the overhead. "
             "Nothing was sent and nothing written.")
    return "\n".join(lines) + "\n\n" + notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=PARAMS_FILE)
    parser.add_argument("--root", default=".", help="the workspace (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    os.chdir(args.root)
    try:
        plan = make_plan(Path("."), args.params)
    except (ParamsError, StageError, ValueError, OSError) as exc:  # one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        out = {**plan, "rows": [{**asdict(r), "uncached": r.uncached} for r in plan["rows"]]}
        print(json.dumps(out, ensure_ascii=False, indent=2))
    else:
        print(render(plan))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
