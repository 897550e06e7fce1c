"""The small shared params loader; each stage owns its schema, beside its code.

A stage declares the params it reads in a module constant ``PARAMS`` (``"filter.{key}"``,
``"llm_defaults"``) — the same list its dvc.yaml entry declares, which
``tests/test_dvc_yaml.py`` checks — and reads them only through :func:`read_section`: the
section for its key, a shared defaults section merged under it (``llm_defaults`` under an LLM
stage's ``llm``, ``train_defaults`` under a version's training settings), validated by the
stage's own pydantic model (``extra="forbid"``). A typo is an error naming the full key
(``filter.rules.llm.temprature: unknown key (typo?)``), never a silent default.

This module knows no stage and no schema, so editing one stage's schema re-runs that stage
alone. The checks that span sections (mix source names, training parents, unknown top-level
sections) live in ``python -m stages.check``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

PARAMS_FILE = "params.yaml"
M = TypeVar("M", bound=BaseModel)


class Strict(BaseModel):
    """Every params model: unknown keys are errors, values are read-only."""
    model_config = ConfigDict(extra="forbid", frozen=True)


class ParamsError(Exception):
    """params.yaml is missing, unparsable or invalid; the message names the key."""


def read_yaml(text: str) -> Any:
    """YAML 1.2, as DVC reads and writes params.yaml: ``dvc exp run -S`` rewrites the file with
    ``eval_strategy: no`` unquoted, which a YAML 1.1 loader (PyYAML) would turn into ``False``."""
    return YAML(typ="safe", pure=True).load(text)


def load_raw(path: str | os.PathLike = PARAMS_FILE) -> dict[str, Any]:
    """The whole params file as plain data (not validated)."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file not found: {path}")
    try:
        raw = read_yaml(path.read_text(encoding="utf-8")) or {}
    except YAMLError as exc:
        raise ParamsError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections")
    return raw


def lookup(raw: Any, dotted: str) -> Any:
    node = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ParamsError(f"params key {dotted!r} not found ({part!r} missing)")
        node = node[part]
    return node


def deep_merge(base: Any, override: Any) -> Any:
    """Dicts merge key by key (recursively); anything else in ``override`` replaces ``base``."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = deep_merge(base[key], value) if key in base else value
        return merged
    return override


Locate = Callable[[tuple], str]


def format_error(error: ValidationError, prefix: str = "", locate: Optional[Locate] = None) -> str:
    """One line per error, naming the full key; ``locate(loc)`` names where a merged value
    came from (a shared defaults section) when that is not ``prefix``."""
    lines = []
    for item in error.errors():
        loc = tuple(str(p) for p in item["loc"])
        where = locate(loc) if locate else ".".join([prefix] * bool(prefix) + list(loc))
        message = "unknown key (typo?)" if item["type"] == "extra_forbidden" else item["msg"]
        lines.append(f"  {where}: {message}")
    return "\n".join(lines)


def validate_params(model: type[M], data: Any, where: str, locate: Optional[Locate] = None) -> M:
    """``model`` over ``data``; errors name the full key path (``where`` + the field)."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ParamsError(f"params {where} is invalid:\n{format_error(exc, where, locate)}") from None


def _has(node: Any, path: Sequence[str]) -> bool:
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def origin_locator(raw: dict[str, Any], dotted: str, defaults: Optional[str],
                   at: Optional[str]) -> Locate:
    """Name a merged key by the section it came from: the stage's own (``dotted``) unless only
    the defaults section (merged under field ``at``) has it, e.g. ``llm_defaults.temprature``."""
    own = lookup(raw, dotted)

    def locate(loc: tuple) -> str:
        path = list(loc)
        if defaults is not None and not _has(own, path):
            inner = path[1:] if at is not None and path[:1] == [at] else path if at is None else None
            if inner is not None and defaults in raw and _has(raw[defaults], inner):
                return ".".join([defaults, *inner])
        return ".".join([dotted, *path])
    return locate


def merged_section(raw: dict[str, Any], dotted: str, defaults: Optional[str] = None,
                   at: Optional[str] = None) -> Any:
    """Section ``dotted`` with the section ``defaults`` merged under its field ``at`` (the
    whole section when ``at`` is None): the section's own values win, key by key. A missing
    top-level defaults section counts as empty (DVC refuses a stage whose declared params
    are missing, so in a pipeline it is always there)."""
    value = lookup(raw, dotted)
    if defaults is None:
        return value
    shared = lookup(raw, defaults) if defaults in raw or "." in defaults else {}
    if at is None:
        return deep_merge(shared, value or {})
    if not isinstance(value, dict):
        return value  # the model reports the wrong type
    return {**value, at: deep_merge(shared, value.get(at) or {})}


def read_section(declared: tuple[str, ...], model: type[M], key: Optional[str] = None, *,
                 path: str | os.PathLike = PARAMS_FILE, section: int = 0,
                 defaults: Optional[int] = None, at: Optional[str] = None,
                 raw: Optional[dict[str, Any]] = None) -> M:
    """The stage's params: ``declared[section]`` for ``key``, with ``declared[defaults]``
    merged under field ``at``, validated by ``model``. Only declared templates can be read.
    ``raw``: the file's contents when the caller has read them already."""
    dotted = declared[section].format(key=key)
    shared = None if defaults is None else declared[defaults].format(key=key)
    raw = load_raw(path) if raw is None else raw
    return validate_params(model, merged_section(raw, dotted, shared, at), dotted,
                           origin_locator(raw, dotted, shared, at))


def check_key_names(keys: Any, where: str) -> None:
    """Stage keys become file and stage names: letters, digits and _ only."""
    for key in keys:
        if not isinstance(key, str) or not key.replace("_", "").isalnum() or not key[0].isalpha():
            raise ParamsError(f"{where}.{key}: not a valid stage key (letters, digits, _)")
