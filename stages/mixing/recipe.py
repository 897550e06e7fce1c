"""The recipe of one mixture: ``versions.<v>.mix`` merged over ``mix_defaults`` (the schema
``mix@<version>`` validates), and the one mapping from a source name to the file it reads."""
from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field, model_validator

from stages.common.params import Strict

MIX_FORMATS = {
    # format -> the record kind it formats (``json`` = a directory of extract JSON files)
    "prompt_answer": "qa", "worked_solution": "qa", "table_qa": "qa", "qa_json": "qa",
    "mcq_letter": "mcq", "conversation": "conversation", "translation": "translation", "raw_text": "document",
    "document_profile": "document", "summary_json": "document", "report_json": "json",
    "example": "example",
}


def mix_source_input(name: str) -> str:
    """The file (or directory) a mixture source reads, from its name alone (table above).
    Whether the name exists is checked by ``python -m stages.check`` (against the other
    sections) and, when the stage runs, by the file existing."""
    if name.startswith("generated_"):
        return f"data/generated/{name[len('generated_'):]}/pairs.parquet"
    if name.startswith("agent_"):
        rest = name[len("agent_"):]
        if rest.endswith("_conversations"):
            return f"data/generated/agent/{rest[:-len('_conversations')]}/conversations.parquet"
        return f"data/generated/agent/{rest}/questions.parquet"
    if name.startswith("stock_"):
        return f"data/generated/stock/{name[len('stock_'):]}.parquet"
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
                                      "examples (rounded); >1 upsamples; 1.0 when no count")
    upsample: bool = Field(False, description="may examples repeat to reach count/fraction? If "
                                              "false and too few are available, the stage fails")
    include: dict[str, list[str]] = Field(default_factory=dict,
                                          description="record field -> values kept (e.g. category)")
    exclude: dict[str, list[str]] = Field(default_factory=dict,
                                          description="record field -> values dropped (e.g. split)")

    @model_validator(mode="before")
    @classmethod
    def _all_by_default(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("count") is None and data.get("fraction") is None:
            return {**data, "fraction": 1.0}
        return data

    @model_validator(mode="after")
    def _amount(self) -> "MixSource":
        if self.count is not None and self.fraction is not None:
            raise ValueError("give one of count or fraction, not both")
        if self.fraction is not None and self.fraction > 1 and not self.upsample:
            raise ValueError(f"fraction {self.fraction} > 1 needs upsample: true")
        return self


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
    """Against every evaluation set of ``evaluate`` (collected and local)."""
    ngram_chars: int = Field(ge=5, description="character n-grams (whitespace removed: Korean "
                                               "spacing varies) of the eval question and choices")
    threshold: float = Field(gt=0, le=1, description="an example containing at least this share "
                             "of an eval item's n-grams is contaminated and removed")
    max_items_per_ngram: int = Field(
        20, ge=1, description="an n-gram found in more eval items than this is template text "
        "(the stock and agent questions share their wording; only their figures differ) and "
        "counts for no item: an example matches an item on what is its own")
    template_share: float = Field(
        0.05, gt=0, le=1, description="also template: an n-gram in more than this share of one "
        "set's items (at least 2), for sets too small to reach max_items_per_ngram")


class MixParams(Strict):
    """``mix_defaults`` + ``versions.<version>.mix``: the recipe of one data mixture
    (MISSION.md's version table)."""
    seed: int = Field(ge=0, description="selection, upsampling and the dev split")
    sources: dict[str, MixSource] = Field(min_length=1)
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
    batch_size: int = Field(ge=1, le=1_000_000, description="records per streamed Parquet batch")
    max_reject_rate: float = Field(ge=0, le=1, description="share of malformed source records "
                                   "(dedup/decontamination removals do not count)")
    dedup: MixDedup
    decontamination: MixDecontamination

    def source_inputs(self) -> dict[str, str]:
        return {name: mix_source_input(name) for name in self.sources}

    @model_validator(mode="after")
    def _known_name_forms(self) -> "MixParams":
        excluded = set(self.exclude_sources) & set(self.sources)
        if excluded:
            raise ValueError(f"sources {sorted(excluded)} are in exclude_sources")
        return self
