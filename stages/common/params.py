"""The one params loader: ``params.yaml`` validated by pydantic models with ``extra="forbid"``.

A typo in ``params.yaml`` is an error naming the key, never a silent default. A stage
declares the params paths it reads in a module constant ``PARAMS`` (``"collect.{key}"``)
and gets exactly those from :func:`read_declared`; the dvc.yaml check in
``tests/test_dvc_yaml.py`` compares that constant with the stage's ``params:`` list, so a
param a stage reads can never be missing from dvc.yaml.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Optional, Union

from urllib.parse import urlsplit

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PARAMS_FILE = "params.yaml"
HUB_LOADER_MODULE = "stages/sources/hub.py"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------------------- llm
# The ``llm`` block of every LLM stage's section (stages/common/llm.py uses it).
API_KEY_ENV = "OPENAI_API_KEY"


class Prices(Strict):
    input_per_1m: float = Field(ge=0, description="USD per 1M prompt tokens")
    output_per_1m: float = Field(ge=0, description="USD per 1M completion tokens")


class LLMParams(Strict):
    """The LLM section a stage embeds in its params (``params.<stage>.<key>.llm``).

    Only model, messages, schema and the sampling fields change an answer (and the cache
    key); everything else is throughput, robustness or bookkeeping.
    """
    model: str = Field(min_length=1, description="model name as the endpoint knows it")
    base_url: Optional[str] = Field(
        None, description="OpenAI-compatible endpoint (vLLM, Ollama, Azure…); default: "
                          "OPENAI_BASE_URL, else api.openai.com")
    temperature: float = Field(ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(ge=1, description="completion token limit per answer")
    token_limit_field: Literal["max_tokens", "max_completion_tokens"] = Field(
        "max_tokens", description="request field carrying max_tokens (o-series models need "
                                  "max_completion_tokens; most self-hosted servers max_tokens)")
    seed: Optional[int] = Field(None, ge=0, description="base seed; re-asks and samples derive theirs")
    concurrency: int = Field(100, ge=1, le=1000, description="requests in flight at most")
    rpm: Optional[int] = Field(None, gt=0, description="client-side requests-per-minute cap")
    tpm: Optional[int] = Field(None, gt=0, description="client-side tokens-per-minute cap")
    max_attempts: int = Field(8, ge=1, description="HTTP attempts per answer (transport retries)")
    max_invalid_attempts: int = Field(
        3, ge=1, description="answers per item before an invalid/refused/truncated one is a reject")
    timeout_s: float = Field(120.0, gt=0, description="per HTTP attempt")
    backoff_base_s: float = Field(1.0, gt=0)
    backoff_max_s: float = Field(60.0, gt=0)
    prices: Prices
    offline: bool = Field(False, description="answer from the cache only (LLM_OFFLINE=1 also forces it)")
    cache_dir: str = Field(min_length=1, description="response cache directory (a DVC-tracked out)")

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: Optional[str]) -> Optional[str]:
        if value is not None:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"base_url must be an http(s) URL, got {value!r}")
            if parts.username or parts.password:
                raise ValueError("base_url must not embed credentials (params are committed); "
                                 f"use {API_KEY_ENV}")
        return value


# ---------------------------------------------------------------------------- collect
class HubSpec(Strict):
    """``datasets.load_dataset(repo, name, revision=revision)`` — the hub or a local replica."""
    repo: str = Field(description="hub dataset id, or a local directory laid out like the hub repo")
    name: Optional[str] = Field(None, description="dataset config (KMMLU: one per subject)")
    revision: str = Field(description="pinned commit sha or tag on the hub; ignored for local dirs")
    splits: dict[str, Literal["train", "dev", "test"]] = Field(
        default_factory=lambda: {"train": "train"},
        description="hub split name -> our split name; splits not listed are not loaded")


class LocalSpec(Strict):
    format: Optional[Literal["csv", "tsv", "json", "jsonl", "parquet", "xlsx"]] = Field(
        None, description="file format; inferred from the suffix when omitted")
    encoding: str = Field("utf-8", description="text encoding (Korean public data is often cp949)")
    records_key: Optional[str] = Field(
        None, description="JSON only: dotted key of the list of records inside the document")
    sheet: Union[int, str] = Field(0, description="xlsx only: sheet name or index")
    split: Literal["train", "dev", "test"] = "train"


class SourceParams(Strict):
    kind: Literal["mcq", "qa", "translation", "document"]
    loader: Literal["hub", "local"]
    input: str = Field(description=(
        "the path DVC tracks as this source's input: the local file/dir read; for sources read "
        f"over the network from the hub (pinned by hub.revision) it is {HUB_LOADER_MODULE}"))
    hub: Optional[HubSpec] = None
    local: Optional[LocalSpec] = None
    domain: str = ""
    columns: dict[str, Union[str, list[str]]] = Field(
        description="record field -> source column (or list of columns: MCQ choices, document text)")
    constants: dict[str, str] = Field(default_factory=dict,
                                      description="record fields set to a fixed value")
    meta_columns: list[str] = Field(default_factory=list,
                                    description="source columns kept in the record's meta JSON")
    answer_format: Literal["index1", "index0", "letter", "text"] = Field(
        "index1", description="MCQ only: how the answer column is written (KMMLU: 1-based index)")
    max_reject_rate: float = Field(0.2, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _loader_spec(self) -> "SourceParams":
        if self.loader == "hub":
            if self.hub is None or self.local is not None:
                raise ValueError("loader 'hub' needs a 'hub' block and no 'local' block")
            if is_local_repo(self.hub.repo):
                if os.path.normpath(self.input) != os.path.normpath(self.hub.repo):
                    raise ValueError(f"hub.repo {self.hub.repo!r} is a local directory, so input "
                                     f"must be the same path (got {self.input!r})")
            elif self.input != HUB_LOADER_MODULE:
                raise ValueError(f"hub.repo {self.hub.repo!r} is read over the network; its input "
                                 f"must be {HUB_LOADER_MODULE!r} (got {self.input!r})")
        else:
            if self.local is None or self.hub is not None:
                raise ValueError("loader 'local' needs a 'local' block and no 'hub' block")
        required = {"mcq": ("question", "choices"), "qa": ("question", "answer"),
                    "translation": ("source_text", "target_text"), "document": ("text",)}[self.kind]
        missing = [f for f in required if f not in self.columns]
        if self.kind == "mcq" and "answer" not in self.columns:
            missing.append("answer")
        if missing:
            raise ValueError(f"columns must map {missing} for kind {self.kind!r}")
        if self.kind == "translation":
            for lang in ("source_lang", "target_lang"):
                if lang not in self.constants and lang not in self.columns:
                    raise ValueError(f"translation sources need {lang} in constants or columns")
        return self


def is_local_repo(repo: str) -> bool:
    """Hub ids are ``owner/name``; local replicas are paths (relative with ./, data/… or absolute)."""
    return repo.startswith(("/", "./", "../", "data/", "tests/")) or os.path.isdir(repo)


# ---------------------------------------------------------------------------- extract
class HeaderFooterParams(Strict):
    zone: float = Field(0.12, gt=0, lt=0.5, description="top/bottom fraction of the page searched")
    min_pages: int = Field(3, ge=2, description="only documents with at least this many pages")
    min_share: float = Field(0.5, gt=0, le=1.0,
                             description="a line repeated (digits masked) on this share of pages is dropped")


class ExtractParams(Strict):
    input: str = Field(description="directory of PDFs (searched recursively)")
    workers: int = Field(0, ge=0, description="processes; 0 = one per core")
    tables: bool = Field(True, description="find_tables() per page (slow: switch off for speed)")
    max_garbled_ratio: float = Field(0.3, ge=0, le=1)
    min_text_chars: int = Field(20, ge=0, description="a document below this many characters in "
                                                     "all pages is image-only (no text layer)")
    max_reject_rate: float = Field(0.5, ge=0, le=1)
    header_footer: HeaderFooterParams = Field(default_factory=HeaderFooterParams)


# ---------------------------------------------------------------------------- synthesize / solve
# Their ``llm`` blocks are LLMParams (above), validated with the rest of params.yaml.
class SynthesizeInputs(Strict):
    """Parquet files read; mcq records are existing questions (near-duplicate reference),
    document records are the chunks a grounded domain writes from. Two fixed slots because
    dvc.yaml deps cannot take a list; a domain without a transform repeats ``filtered``."""
    filtered: str
    transformed: str


class SynthesizeParams(Strict):
    domain_description: str = Field(min_length=1, description="the domain, in Korean, for the prompt")
    grounded: bool = Field(False, description="write each question from a document chunk (rules)")
    inputs: SynthesizeInputs
    fewshot: str = Field(description="YAML file of example questions (at least one per option count)")
    fewshot_per_prompt: int = Field(1, ge=1, description="examples shown per request (same option count)")
    target: int = Field(ge=0, description="questions wanted, exactly; a shortfall is reported, never padded")
    topics: list[str] = Field(min_length=1, description="topics, balanced round robin over slots")
    choice_counts: list[int] = Field(default_factory=lambda: [4, 5, 6, 7],
                                     description="option counts cycled over slots (4-7)")
    max_rounds: int = Field(5, ge=1, description="generation rounds; a rejected slot is re-asked next round")
    near_duplicate_threshold: float = Field(0.6, gt=0, le=1,
                                            description="char n-gram Jaccard at or above which a question is a near-duplicate")
    ngram: int = Field(3, ge=1, le=8, description="character n-gram size for the near-duplicate check")
    min_quote_chars: int = Field(10, ge=1, description="grounded: shortest supporting quote accepted")
    max_reject_rate: float = Field(0.5, ge=0, le=1, description="of all draws")
    llm: LLMParams

    @field_validator("choice_counts")
    @classmethod
    def _counts(cls, value: list[int]) -> list[int]:
        if not value or any(not 4 <= n <= 7 for n in value):
            raise ValueError("choice_counts must be a non-empty list of numbers in 4..7")
        return value


class SolveInputs(Strict):
    """mcq parquet files to solve; ``rules`` (no transform) repeats ``synthesized``."""
    transformed: str
    synthesized: str


class QualityParams(Strict):
    enabled: bool = Field(False, description="LLM quality score (0-5) + hallucination flag per item")
    min_score: int = Field(3, ge=0, le=5, description="items scored below this are rejected")
    reject_hallucination: bool = True


class SolveParams(Strict):
    inputs: SolveInputs
    target_pairs: Optional[int] = Field(
        description="pairs wanted, exactly (2 per question); null = every question that verifies")
    max_resamples: int = Field(2, ge=0, description="re-samples (sample_index 1..k) after a wrong first solution")
    quality: QualityParams = Field(default_factory=QualityParams)
    max_reject_rate: float = Field(0.5, ge=0, le=1, description="of the questions attempted")
    llm: LLMParams

    @field_validator("target_pairs")
    @classmethod
    def _even(cls, value: Optional[int]) -> Optional[int]:
        if value is not None and (value < 0 or value % 2):
            raise ValueError("target_pairs must be a non-negative even number (2 pairs per question)")
        return value


# ---------------------------------------------------------------------------- base_model
class TinyModelSpec(Strict):
    """A tiny Qwen2-architecture model built locally (quickstart, tests): random weights,
    tokenizer trained on the corpus. Field names map onto ``Qwen2Config``."""
    vocab_size: int = Field(ge=300, description="BPE vocabulary incl. the 256 byte symbols")
    hidden_size: int = Field(gt=0)
    layers: int = Field(gt=0, description="num_hidden_layers")
    heads: int = Field(gt=0, description="num_attention_heads")
    kv_heads: int = Field(gt=0, description="num_key_value_heads (GQA)")
    intermediate: int = Field(gt=0, description="intermediate_size (SwiGLU)")
    max_position_embeddings: int = Field(gt=0)
    initializer_range: float = Field(0.02, gt=0, description="std of the random weights")
    seed: int = 0

    @model_validator(mode="after")
    def _heads_divide(self) -> "TinyModelSpec":
        if self.hidden_size % self.heads or self.heads % self.kv_heads:
            raise ValueError("hidden_size must be a multiple of heads, heads of kv_heads")
        return self


class BaseModelParams(Strict):
    model: str = Field(description="hub id or local directory of the base weights (production); "
                                   "with `build`, the name given to the built model")
    revision: str = Field(min_length=1, description="pinned hub commit sha (ignored for a local dir)")
    build: Optional[TinyModelSpec] = Field(
        None, description="null: use `model`; set: build a tiny random model + trained tokenizer")


# ---------------------------------------------------------------------------- summarize
class SummarizeParams(Strict):
    """LLM summaries of the KRX company reports (map over chunks, reduce when needed)."""
    max_chunk_tokens: int = Field(ge=200, description="report text per map call (estimated "
                                                       "tokens); also the budget of a merge call's partials")
    tokens_per_char: float = Field(1.0, gt=0, le=4, description="token estimate per character "
                                   "(1.0 over-estimates Hangul in GPT-4o-class tokenizers)")
    min_report_chars: int = Field(20, ge=0, description="reports with fewer non-space characters "
                                                        "of text and tables are rejected empty_report")
    max_reject_rate: float = Field(0.2, ge=0, le=1, description="of the reports")
    llm: LLMParams


# ---------------------------------------------------------------------------- filter / transform
# Their ``llm`` blocks are LLMParams (above), validated with the rest of params.yaml.
class PrefilterParams(Strict):
    """The cheap local prefilter in front of the LLM judge (stages/filter.py)."""
    keywords: dict[str, float] = Field(
        min_length=1, description="lexicon term -> weight (negative: off-domain); each term counts "
                                  "once, matched case- and spacing-insensitively (주식 시장 = 주식시장)")
    min_score: float = Field(description="sum of matched weights an item needs to reach the judge")
    min_chars: int = Field(ge=0, description="text shorter than this (spaces not counted) is too_short")
    min_hangul_share: float = Field(ge=0, le=1, description="Hangul share of the letters below which "
                                                            "text is not_korean")
    max_digit_share: float = Field(ge=0, le=1, description="digit share of the non-space characters "
                                                           "above which text is mostly_digits")


class ChunkingParams(Strict):
    size: int = Field(gt=0, description="characters per chunk at most (a longer sentence is cut)")
    overlap: int = Field(ge=0, description="characters of whole trailing paragraphs/articles repeated "
                                           "at the start of the next chunk, at most")

    @model_validator(mode="after")
    def _overlap_below_size(self) -> "ChunkingParams":
        if self.overlap >= self.size:
            raise ValueError("overlap must be smaller than size")
        return self


class FilterParams(Strict):
    input: str = Field(description="parquet of mcq records (KMMLU) or document pages (extract@rules)")
    splits: list[Literal["train", "dev"]] = Field(
        default_factory=lambda: ["train"], min_length=1,
        description="mcq splits used; never test (the evaluation set)")
    criteria: str = Field(min_length=1, description="the domain's relevance criteria for the judge (Korean)")
    prefilter: PrefilterParams
    chunking: Optional[ChunkingParams] = Field(None, description="document inputs only: page text -> chunks")
    max_reject_rate: float = Field(0.2, ge=0, le=1, description="judge errors / items judged")
    llm: LLMParams


class TransformParams(Strict):
    input: str = Field(description="filtered mcq parquet (4 choices)")
    context: str = Field(min_length=1, description="the setting the 7-choice rewrite is placed in (Korean)")
    max_reject_rate: float = Field(0.3, ge=0, le=1, description="rejects / items sent")
    llm: LLMParams


# ---------------------------------------------------------------------------- evaluate
class EvalCollectedSet(Strict):
    """A collected parquet of mcq records (``collect@<source>``); only ``split`` is read."""
    input: str = Field(description="parquet of mcq records, e.g. data/collected/kmmlu_economics.parquet")
    split: Literal["train", "dev", "test"] = Field(
        "test", description="the held-out split (KMMLU test: never in any mixture)")


class EvalLocalSet(Strict):
    """A local MCQ file (csv/tsv/json/jsonl/parquet/xlsx) read the way ``collect`` reads a local
    mcq source (same loader, same column mapping and answer formats), 4-7 choices."""
    input: str = Field(description="the file; must lie under evaluate.settings.local_dir (the dvc dep)")
    local: LocalSpec = Field(default_factory=LocalSpec)
    columns: dict[str, Union[str, list[str]]] = Field(
        description="question, choices (list of columns, or one column holding a list), answer, "
                    "optional category")
    constants: dict[str, str] = Field(default_factory=dict)
    answer_format: Literal["index1", "index0", "letter", "text"] = "index1"
    strip_choice_labels: bool = Field(
        False, description="drop leading 'A. ' / 'B) ' / '1 ' labels written into the choices")

    def as_source(self) -> SourceParams:
        """The equivalent ``collect`` source (kind mcq, loader local, split test: held out)."""
        local = self.local.model_copy(update={"split": "test"})
        return SourceParams(kind="mcq", loader="local", input=self.input, local=local,
                            columns=self.columns, constants=self.constants,
                            answer_format=self.answer_format, max_reject_rate=1.0)

    @model_validator(mode="after")
    def _valid_source(self) -> "EvalLocalSet":
        self.as_source()  # same checks as a collect source (question/choices/answer mapped)
        return self


class EvalGeneration(Strict):
    """``scoring: generate``: greedy two-step generation (solution, then the letter)."""
    solution_max_new_tokens: int = Field(512, ge=1, description="step 1: the solution")
    letter_max_new_tokens: int = Field(8, ge=1, description="step 2: the answer letter")


class EvaluateSettings(Strict):
    """Shared by every ``evaluate@<key>``: what is evaluated and how."""
    scoring: Literal["loglik", "generate"] = Field(
        "loglik", description="loglik: next-token log-probs of the letters after the step-1 "
                              "prompt; generate: two-step generation, strict letter parsing")
    batch_size: int = Field(8, ge=1)
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on cuda, float32 on cpu")
    max_prompt_tokens: int = Field(2048, ge=16, description="longer prompts are rejected, never cut")
    shuffled: bool = Field(True, description="also score every item with its options permuted")
    shuffle_seed: int = Field(0, description="with the item id, seeds each item's permutation")
    max_items_per_set: Optional[int] = Field(None, ge=1, description="first N items by id per set")
    max_reject_rate: float = Field(0.2, ge=0, le=1)
    generation: EvalGeneration = Field(default_factory=EvalGeneration)
    collected: dict[str, EvalCollectedSet] = Field(default_factory=dict)
    local_dir: str = Field(description="directory holding every local set (one dvc dep)")
    local: dict[str, EvalLocalSet] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _sets(self) -> "EvaluateSettings":
        both = set(self.collected) & set(self.local)
        if both:
            raise ValueError(f"eval set names used twice: {sorted(both)}")
        if not self.collected and not self.local:
            raise ValueError("no eval sets: name at least one in collected or local")
        root = os.path.abspath(self.local_dir)
        for name, spec in self.local.items():
            if os.path.commonpath([root, os.path.abspath(spec.input)]) != root:
                raise ValueError(f"local.{name}.input {spec.input!r} is not under local_dir "
                                 f"{self.local_dir!r} (dvc.yaml depends on local_dir only)")
        return self


class EvaluateModel(Strict):
    model: str = Field(description="models/base for the baseline (no adapter), models/<version> "
                                   "(a PEFT adapter over the base) for a version")


class EvaluateParams(Strict):
    settings: EvaluateSettings
    models: dict[str, EvaluateModel] = Field(description="evaluate@<key>: base + every version")


# ---------------------------------------------------------------------------- report
class ReportParams(Strict):
    baseline: str = Field("base", description="the evaluate key every version is compared with")
    versions: list[str] = Field(min_length=1, description="versions shown, in this order")
    figure_dpi: int = Field(100, ge=50, le=300)


# ---------------------------------------------------------------------------- mix
# Source names a recipe may use, and the file each one reads (the other stages' dvc.yaml outs):
#   <collect key> | <extract key>   data/collected/<name>.parquet (records / PDF pages)
#   <extract key>_json              data/collected/<name>/ (one JSON per PDF: the v3 form)
#   generated_<solve key>           data/generated/<domain>/pairs.parquet (two-step MCQ pairs)
#   report_summaries                data/generated/report_summaries.parquet (summarize)
#   mixture_<mix key>               data/mixtures/<version>.parquet (another version's data)
MIX_FORMATS = {
    # format -> the record kind it formats (``json`` = a directory of extract JSON files)
    "prompt_answer": "qa", "worked_solution": "qa", "table_qa": "qa", "qa_json": "qa",
    "mcq_letter": "mcq", "translation": "translation", "raw_text": "document",
    "document_profile": "document", "summary_json": "document", "report_json": "json",
    "example": "example",
}
MIX_INPUT_SLOTS = tuple("abcdefghijkl")


def mix_source_input(name: str) -> str:
    """The file (or directory) a mixture source reads, from its name alone (table above).
    Whether the name exists is checked against the other sections in :class:`ParamsFile`."""
    if name.startswith("generated_"):
        return f"data/generated/{name[len('generated_'):]}/pairs.parquet"
    if name == "report_summaries":
        return "data/generated/report_summaries.parquet"
    if name.startswith("mixture_"):
        return f"data/mixtures/{name[len('mixture_'):]}.parquet"
    if name.endswith("_json"):
        return f"data/collected/{name}"
    return f"data/collected/{name}.parquet"


class MixSource(Strict):
    """One source of a mixture. Counts are in formatted examples (a translation pair gives
    two, a long page several chunks), taken after filtering, decontamination and dedup."""
    format: Literal[tuple(MIX_FORMATS)] = Field(description="how records become examples "
                                                            "(docs/pipeline.md, stages/mix.py)")
    count: Optional[int] = Field(None, ge=1, description="exactly this many examples")
    fraction: Optional[float] = Field(None, gt=0, description="this share of the available "
                                                              "examples (rounded); >1 upsamples")
    upsample: bool = Field(description="may examples repeat to reach count/fraction? If false "
                                       "and too few are available, the stage fails")
    include: dict[str, list[str]] = Field(default_factory=dict,
                                          description="record field -> values kept (e.g. category)")
    exclude: dict[str, list[str]] = Field(default_factory=dict,
                                          description="record field -> values dropped (e.g. split)")

    @model_validator(mode="after")
    def _amount(self) -> "MixSource":
        if (self.count is None) == (self.fraction is None):
            raise ValueError("give exactly one of count or fraction")
        if self.fraction is not None and self.fraction > 1 and not self.upsample:
            raise ValueError(f"fraction {self.fraction} > 1 needs upsample: true")
        return self


class MixInputs(Strict):
    """The files a mixture reads, in fixed slots: dvc.yaml lists ``${item.inputs.a}`` …
    ``${item.inputs.l}`` as deps (a foreach item cannot have a list of deps). Together the
    slots must name exactly the files of the recipe's sources; unused slots repeat one."""
    a: str
    b: str
    c: str
    d: str
    e: str
    f: str
    g: str
    h: str
    i: str
    j: str
    k: str
    l: str  # noqa: E741


class MixDedup(Strict):
    near_threshold: float = Field(gt=0, le=1, description="estimated Jaccard of character "
                                  "shingles (whitespace removed) at or above which a later "
                                  "example is a near-duplicate of an earlier one")
    shingle_chars: int = Field(ge=2, description="shingle length in characters")
    num_perm: int = Field(ge=8, description="MinHash permutations")
    bands: int = Field(ge=1, description="LSH bands; num_perm / bands rows each (at most 4)")

    @model_validator(mode="after")
    def _bands(self) -> "MixDedup":
        if self.num_perm % self.bands or self.num_perm // self.bands > 4:
            raise ValueError(f"num_perm {self.num_perm} must split into {self.bands} bands of "
                             "at most 4 rows")
        return self


class MixDecontamination(Strict):
    """Against every evaluation set of ``evaluate.settings`` (collected and local)."""
    ngram_chars: int = Field(ge=5, description="character n-grams (whitespace removed: Korean "
                                               "spacing varies) of the eval question and choices")
    threshold: float = Field(gt=0, le=1, description="an example containing at least this share "
                             "of an eval item's n-grams is contaminated and removed")


class MixParams(Strict):
    """``mix.<version>``: the recipe of one data mixture (MISSION.md's version table)."""
    seed: int = Field(description="selection, upsampling and the dev split")
    sources: dict[str, MixSource] = Field(min_length=1)
    inputs: MixInputs
    exclude_sources: list[str] = Field(default_factory=list, description=(
        "names this version must never contain, also through mixture_<version> sources"))
    dev_size: float = Field(ge=0, lt=1, description="share of each source's examples held out "
                                                    "as split=dev (whole groups: both steps of a "
                                                    "question, both directions of a pair)")
    max_length: int = Field(ge=16, description="tokens, chat template included: the training "
                                               "max length")
    overlength: Literal["truncate", "drop"] = Field(description=(
        "longer examples: truncate the completion text to fit (the end-of-turn token stays), "
        "or drop them (rejects)"))
    batch_size: int = Field(ge=1, description="records per streamed Parquet batch")
    max_reject_rate: float = Field(ge=0, le=1, description="share of malformed source records "
                                   "(dedup/decontamination removals do not count)")
    dedup: MixDedup
    decontamination: MixDecontamination

    def source_inputs(self) -> dict[str, str]:
        return {name: mix_source_input(name) for name in self.sources}

    @model_validator(mode="after")
    def _inputs_match_sources(self) -> "MixParams":
        wanted = set(self.source_inputs().values())
        slots = set(self.inputs.model_dump().values())
        if slots != wanted:
            raise ValueError(f"inputs must name exactly the files of the sources: missing "
                             f"{sorted(wanted - slots)}, not read {sorted(slots - wanted)}")
        return self


def check_mix_recipes(params: "ParamsFile") -> None:
    """Cross-section checks: source names exist, mixtures chain without cycles, and an excluded
    source is never reachable (v6 excludes the KRX sample and reports, MISSION.md)."""
    known = set(params.collect) | set(params.extract) | {f"{k}_json" for k in params.extract}
    known |= {f"generated_{k}" for k in params.solve} | {"report_summaries"}
    known |= {f"mixture_{k}" for k in params.mix}
    for version, recipe in params.mix.items():
        for name in recipe.sources:
            if name not in known:
                raise ValueError(f"mix.{version}.sources.{name}: unknown source; known: "
                                 f"{sorted(known)}")
        for name in recipe.exclude_sources:
            if name not in known:
                raise ValueError(f"mix.{version}.exclude_sources: unknown source {name!r}")
    for version in params.mix:
        reached, stack, path = set(), [version], []
        while stack:
            current = stack.pop()
            for name in params.mix[current].sources:
                reached.add(name)
                if name.startswith("mixture_"):
                    parent = name[len("mixture_"):]
                    if parent == version:
                        raise ValueError(f"mix.{version}: mixture sources form a cycle via {current}")
                    if parent not in path:
                        path.append(parent)
                        stack.append(parent)
        banned = reached & set(params.mix[version].exclude_sources)
        if banned:
            raise ValueError(f"mix.{version}: excluded sources {sorted(banned)} are in the recipe "
                             "(directly or through a mixture_ source)")


# ---------------------------------------------------------------------------- train
# train@<version> reads `train.<version>` (what is specific to the version: where it starts
# from, overrides) and `train_defaults` (the production settings every version shares). The
# two are merged in ONE place, :func:`resolve_train`; `quant`, `lora` and `sft` then map
# one-to-one onto BitsAndBytesConfig, LoraConfig and trl's SFTConfig (same field names).
class QuantParams(Strict):
    """-> ``transformers.BitsAndBytesConfig(**quant)``; ``load_in_4bit: false`` trains in
    full precision (no bitsandbytes needed for the weights)."""
    load_in_4bit: bool = True
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    bnb_4bit_use_double_quant: bool = True
    bnb_4bit_compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    bnb_4bit_quant_storage: Literal["uint8", "bfloat16"] = Field(
        "uint8", description="bfloat16 for FSDP-QLoRA (shards must share the dtype)")


class LoraParams(Strict):
    """-> ``peft.LoraConfig(**lora)``."""
    r: int = Field(gt=0)
    lora_alpha: int = Field(gt=0)
    lora_dropout: float = Field(ge=0, lt=1)
    target_modules: list[str] = Field(min_length=1)
    bias: Literal["none", "all", "lora_only"] = "none"
    task_type: Literal["CAUSAL_LM"] = "CAUSAL_LM"


class SftParams(Strict):
    """-> ``trl.SFTConfig(**sft)`` (plus output_dir and reporting, set by the stage)."""
    per_device_train_batch_size: int = Field(gt=0)
    per_device_eval_batch_size: int = Field(gt=0)
    gradient_accumulation_steps: int = Field(gt=0)
    learning_rate: float = Field(gt=0)
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup",
                               "cosine_with_min_lr", "polynomial", "inverse_sqrt"]
    warmup_steps: float = Field(ge=0, description="int: steps; float in [0, 1): ratio of total steps")
    num_train_epochs: float = Field(gt=0)
    max_steps: int = Field(-1, description="> 0 overrides num_train_epochs")
    max_length: int = Field(gt=0)
    optim: str = Field(description="adamw_8bit needs bitsandbytes")
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    bf16: bool
    gradient_checkpointing: bool
    gradient_checkpointing_kwargs: dict[str, bool] = Field(
        default_factory=lambda: {"use_reentrant": False})
    logging_steps: int = Field(gt=0)
    save_steps: int = Field(gt=0, description="checkpoint every N steps (resume points)")
    save_total_limit: int = Field(gt=0)
    eval_strategy: Literal["no", "steps", "epoch"] = "no"
    eval_steps: Optional[int] = None
    seed: int
    packing: bool = False
    padding_free: bool = False
    completion_only_loss: bool = Field(True, description="loss on the completion (answer) only")
    ddp_find_unused_parameters: Optional[bool] = False
    dataloader_num_workers: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _non_reentrant(self) -> "SftParams":
        if self.gradient_checkpointing and self.gradient_checkpointing_kwargs.get("use_reentrant", True):
            raise ValueError("gradient_checkpointing_kwargs.use_reentrant must be false "
                             "(reentrant checkpointing drops LoRA gradients on frozen 4-bit inputs)")
        return self


class TrainDefaults(Strict):
    quant: QuantParams
    lora: LoraParams
    sft: SftParams
    resume: bool = Field(True, description="resume from the last complete checkpoint of an "
                                           "interrupted run with the same inputs and params")
    processes: int = Field(1, ge=1, description="> 1: relaunched under `accelerate launch`")
    max_reject_rate: float = Field(0.1, ge=0, le=1)


class TrainVersion(Strict):
    init_from: str = Field(description="models/base (root version) or models/<parent version> "
                                       "whose adapter this version continues training")
    accelerate_config: str = Field(description="accelerate config file used when processes > 1")
    quant: dict[str, Any] = Field(default_factory=dict, description="overrides of train_defaults.quant")
    lora: dict[str, Any] = Field(default_factory=dict, description="overrides of train_defaults.lora")
    sft: dict[str, Any] = Field(default_factory=dict, description="overrides of train_defaults.sft")
    resume: Optional[bool] = None
    processes: Optional[int] = None


class TrainParams(Strict):
    """One version's resolved training settings: train_defaults + train.<version>."""
    init_from: str
    parent: Optional[str] = Field(description="the parent version, None for a root version")
    accelerate_config: str
    quant: QuantParams
    lora: LoraParams
    sft: SftParams
    resume: bool
    processes: int
    max_reject_rate: float


BASE_MODEL_DIR = "models/base"


def resolve_train(defaults: TrainDefaults, version: TrainVersion) -> TrainParams:
    """The one place train defaults and a version's overrides are merged (per sub-section,
    key by key), then validated as a whole: a typo in an override is an error."""
    parent = None
    if os.path.normpath(version.init_from) != BASE_MODEL_DIR:
        head, name = os.path.split(os.path.normpath(version.init_from))
        if head != "models" or not name:
            raise ValueError(f"init_from {version.init_from!r} must be {BASE_MODEL_DIR} or models/<version>")
        parent = name
    merged: dict[str, Any] = {
        "init_from": version.init_from, "parent": parent,
        "accelerate_config": version.accelerate_config,
        "quant": {**defaults.quant.model_dump(), **version.quant},
        "lora": {**defaults.lora.model_dump(), **version.lora},
        "sft": {**defaults.sft.model_dump(), **version.sft},
        "resume": defaults.resume if version.resume is None else version.resume,
        "processes": defaults.processes if version.processes is None else version.processes,
        "max_reject_rate": defaults.max_reject_rate,
    }
    return TrainParams.model_validate(merged)


def check_train_versions(params: "ParamsFile") -> None:
    """Every version resolves; parents are versions; no cycles (v3 <- v1, v5_3 <- v5_2 <- v5_1)."""
    if not params.train:
        return
    if params.train_defaults is None:
        raise ValueError("train needs a train_defaults section")
    parents = {}
    for version, spec in params.train.items():
        try:
            resolved = resolve_train(params.train_defaults, spec)
        except (ValueError, ValidationError) as exc:
            raise ValueError(f"train.{version}: {exc}") from None
        if resolved.parent is not None and resolved.parent not in params.train:
            raise ValueError(f"train.{version}.init_from: {resolved.parent!r} is not a train version")
        parents[version] = resolved.parent
    for version in parents:
        seen, node = set(), version
        while node is not None:
            if node in seen:
                raise ValueError(f"train.{version}: init_from chain has a cycle")
            seen.add(node)
            node = parents[node]


# ---------------------------------------------------------------------------- the file
class ParamsFile(Strict):
    collect: dict[str, SourceParams] = Field(default_factory=dict)
    extract: dict[str, ExtractParams] = Field(default_factory=dict)
    synthesize: dict[str, SynthesizeParams] = Field(default_factory=dict)
    solve: dict[str, SolveParams] = Field(default_factory=dict)
    base_model: Optional[BaseModelParams] = None
    filter: dict[str, FilterParams] = Field(default_factory=dict)
    transform: dict[str, TransformParams] = Field(default_factory=dict)
    summarize: Optional[SummarizeParams] = None
    evaluate: Optional[EvaluateParams] = None
    report: Optional[ReportParams] = None
    mix: dict[str, MixParams] = Field(default_factory=dict)
    train_defaults: Optional[TrainDefaults] = None
    train: dict[str, TrainVersion] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _mix_recipes(self) -> "ParamsFile":
        check_mix_recipes(self)
        check_train_versions(self)
        return self

    @field_validator("filter", "transform", "collect", "extract", "synthesize", "solve", "train")
    @classmethod
    def _keys_are_names(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in value:
            if not key.replace("_", "").isalnum() or not key[0].isalpha():
                raise ValueError(f"{key!r} is not a valid stage key (letters, digits, _)")
        return value


class ParamsError(Exception):
    """params.yaml is missing, unparsable or invalid; the message names the key."""


def _format_error(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"])
        message = "unknown key (typo?)" if item["type"] == "extra_forbidden" else item["msg"]
        lines.append(f"  {where}: {message}")
    return "\n".join(lines)


def read_yaml(text: str) -> Any:
    """YAML 1.2, as DVC reads and writes params.yaml: ``dvc exp run -S`` rewrites the file with
    ``eval_strategy: no`` unquoted, which a YAML 1.1 loader (PyYAML) would turn into ``False``."""
    return YAML(typ="safe", pure=True).load(text)


def load_params(path: str | os.PathLike = PARAMS_FILE) -> ParamsFile:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file not found: {path}")
    try:
        raw = read_yaml(path.read_text(encoding="utf-8")) or {}
    except YAMLError as exc:
        raise ParamsError(f"{path} is not valid YAML: {exc}") from exc
    try:
        return ParamsFile.model_validate(raw)
    except ValidationError as exc:
        raise ParamsError(f"{path} is invalid:\n{_format_error(exc)}") from exc


def lookup(params: ParamsFile, dotted: str) -> Any:
    node: Any = params
    for part in dotted.split("."):
        if isinstance(node, dict):
            if part not in node:
                raise ParamsError(f"params key {dotted!r} not found ({part!r} missing)")
            node = node[part]
        else:
            if part not in type(node).model_fields:
                raise ParamsError(f"params key {dotted!r} not found ({part!r} missing)")
            node = getattr(node, part)
    return node


def read_declared(declared: tuple[str, ...], key: str | None = None,
                  path: str | os.PathLike = PARAMS_FILE) -> dict[str, Any]:
    """Read exactly the params a stage declares (``"collect.{key}"`` templates), validated.

    Returns ``{template: value}`` so a stage cannot reach a key it did not declare.
    """
    params = load_params(path)
    return {template: lookup(params, template.format(key=key)) for template in declared}
