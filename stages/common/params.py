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

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PARAMS_FILE = "params.yaml"
HUB_LOADER_MODULE = "stages/sources/hub.py"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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


# ---------------------------------------------------------------------------- the file
class ParamsFile(Strict):
    collect: dict[str, SourceParams] = Field(default_factory=dict)
    extract: dict[str, ExtractParams] = Field(default_factory=dict)

    @field_validator("collect", "extract")
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


def load_params(path: str | os.PathLike = PARAMS_FILE) -> ParamsFile:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
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
