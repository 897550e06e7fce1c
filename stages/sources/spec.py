"""What a source is: the params of one ``collect@<source>`` (also the shape an evaluation set's
local file is read with), shared by the loaders, ``collect``, ``evaluate`` and ``mix``."""
from __future__ import annotations

import os
from typing import Literal, Optional, Union

from pydantic import Field, model_validator

from stages.common.params import Strict

HUB_LOADER_MODULE = "stages/sources/hub.py"


class HubSpec(Strict):
    """``datasets.load_dataset(repo, name, revision=revision)`` — the hub or a local replica."""
    repo: str = Field(description="hub dataset id, or a local directory laid out like the hub repo")
    name: Optional[str] = Field(None, description="dataset config (KMMLU: one per subject)")
    revision: str = Field(description="pinned commit sha or tag on the hub; ignored for local dirs")
    splits: dict[str, Literal["train", "dev", "test"]] = Field(
        default_factory=lambda: {"train": "train"},
        description="hub split name -> our split name; splits not listed are not loaded")
    allow_empty: list[str] = Field(
        default_factory=list,
        description="selected hub splits that may hold no rows at this revision (otherwise an "
                    "empty split is an error naming source, split and revision)")

    @model_validator(mode="after")
    def _allow_empty_selected(self) -> "HubSpec":
        unknown = [s for s in self.allow_empty if s not in self.splits]
        if unknown:
            raise ValueError(f"allow_empty {unknown} are not in splits {sorted(self.splits)}")
        return self


class LocalSpec(Strict):
    format: Optional[Literal["csv", "tsv", "json", "jsonl", "parquet", "xlsx"]] = Field(
        None, description="file format; inferred from the suffix when omitted")
    encoding: str = Field("utf-8", description="text encoding (Korean public data is often cp949)")
    records_key: Optional[str] = Field(
        None, description="JSON only: dotted key of the list of records inside the document")
    sheet: Union[int, str] = Field(0, description="xlsx only: sheet name or index")
    split: Literal["train", "dev", "test"] = "train"


PRICE_FIELDS = ("date", "ticker", "name", "market", "open", "high", "low", "close", "volume",
                "value", "listed_shares")
PRICE_REQUIRED = ("date", "ticker", "open", "high", "low", "close", "volume")


class PriceSpec(Strict):
    """``kind: prices`` only: what the series is and how its rows are checked
    (:mod:`stages.sources.prices`)."""
    series: Literal["stock", "index"] = Field(description="listed stocks or market indices")
    date_format: str = Field("%Y%m%d", description="strptime format of the date column (the "
                             "data portal's basDt: %Y%m%d; other exports e.g. %Y-%m-%d)")
    max_daily_move: float = Field(0.30, gt=0, le=1, description=(
        "the exchange's daily price limit (KRX: ±30%): a larger close-to-close move is a "
        "reject, unless the listed share count changed that day (a corporate action)"))
    min_share_change: float = Field(0.01, gt=0, le=1, description=(
        "a change of the listed share count (lstgStCnt) of at least this share is a corporate "
        "action (split, rights or bonus issue): the row is flagged and no window spans it"))


class SourceParams(Strict):
    kind: Literal["mcq", "qa", "translation", "document", "prices"]
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
    prices: Optional[PriceSpec] = Field(None, description="kind prices only: the series and "
                                        "its row checks")

    @model_validator(mode="after")
    def _loader_spec(self) -> "SourceParams":
        if self.kind == "prices" or self.prices is not None:
            return self._prices_spec()
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


    def _prices_spec(self) -> "SourceParams":
        if self.kind != "prices" or self.prices is None:
            raise ValueError("a 'prices' block goes with kind 'prices', and kind 'prices' needs one")
        if self.loader != "local" or self.local is None or self.hub is not None:
            raise ValueError("price sources are local files (loader 'local' with a 'local' block)")
        unknown = sorted(set(self.columns) - set(PRICE_FIELDS))
        if unknown:
            raise ValueError(f"columns {unknown} are not price fields {list(PRICE_FIELDS)}")
        not_one = sorted(f for f, c in self.columns.items() if not isinstance(c, str))
        if not_one:
            raise ValueError(f"columns {not_one}: a price field maps to one source column")
        missing = [f for f in PRICE_REQUIRED if f not in self.columns and f not in self.constants]
        if missing:
            raise ValueError(f"columns must map {missing} for kind 'prices' (ticker may be a "
                             "constant for a one-ticker export)")
        both = sorted(set(self.columns) & set(self.constants))
        if both:
            raise ValueError(f"{both} are in both columns and constants")
        if self.meta_columns:
            raise ValueError("meta_columns: price rows carry no meta")
        return self


def is_local_repo(repo: str) -> bool:
    """Hub ids are ``owner/name``; local replicas are paths (relative with ./, data/… or absolute)."""
    return repo.startswith(("/", "./", "../", "data/", "tests/")) or os.path.isdir(repo)
