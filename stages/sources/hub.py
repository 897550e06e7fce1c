"""Hugging Face hub datasets through ``datasets.load_dataset``, pinned by revision.

``hub.repo`` may also be a local directory laid out like the hub repository (a README with
``configs:`` and the data files): the quickstart and the tests use exactly this code path on
local replicas, so nothing here is exercised only in production. Credentials come from the
environment (``HF_TOKEN``) through ``huggingface_hub``; nothing is written anywhere.
"""
from __future__ import annotations

import sys
import tempfile
from typing import Any

from stages.sources.spec import HubSpec, is_local_repo
from stages.common.runlog import StageError
from stages.sources import RawRow, Rows


def _resolved_revision(repo: str, revision: str) -> str | None:
    """The commit sha a branch or tag resolved to, for lineage (None when unavailable)."""
    try:
        from huggingface_hub import HfApi
        return HfApi().dataset_info(repo, revision=revision).sha
    except Exception:  # offline or gated: lineage then records the requested revision only
        return None


def load_hub(spec: HubSpec, param: str) -> Rows:
    import datasets

    if not sys.stderr.isatty():  # keep logs readable in CI and dvc repro output
        datasets.disable_progress_bars()
    local = is_local_repo(spec.repo)
    if local:  # datasets' Arrow cache does not notice an edited local file: build it afresh
        with tempfile.TemporaryDirectory(prefix="collect-datasets-") as cache:
            return _rows(spec, param, {"cache_dir": cache}, local)
    return _rows(spec, param, {"revision": spec.revision}, local)  # a commit: immutable


def _rows(spec: HubSpec, param: str, kwargs: dict[str, Any], local: bool) -> Rows:
    where = f"{spec.repo!r} config {spec.name!r} at revision {spec.revision}"
    splits = _load_splits(spec, param, kwargs, where)
    empty = [s for s, dataset in splits.items() if dataset is None or len(dataset) == 0]
    refused = [s for s in empty if s not in spec.allow_empty]
    if refused:
        raise StageError(
            f"{param}: split {', '.join(map(repr, refused))} of {where} is empty; select other "
            f"splits in {param}.hub.splits, or list it in {param}.hub.allow_empty when an empty "
            "split is expected")
    out = Rows(info={"repo": spec.repo, "name": spec.name, "revision": spec.revision})
    if empty:
        out.info["empty_splits"] = empty
    if not local:
        out.info["resolved_revision"] = _resolved_revision(spec.repo, spec.revision)
    for hub_split, our_split in spec.splits.items():
        dataset = splits[hub_split]
        if dataset is None:
            continue
        if out.columns is None:
            out.columns = list(dataset.column_names)
        for index, record in enumerate(dataset):
            out.rows.append(RawRow(f"{hub_split}#{index}", our_split, dict(record)))
    return out


def _load_splits(spec: HubSpec, param: str, kwargs: dict[str, Any], where: str) -> dict[str, Any]:
    """hub split -> Dataset (None: the split has no rows). ``datasets`` cannot build a config
    one of whose CSV splits is only a header (every column typed null), so when the whole
    config fails each selected split is loaded on its own to find the empty one."""
    import datasets

    try:
        loaded = _call(datasets.load_dataset, param, spec, spec.repo, spec.name, **kwargs)
        failure = None
    except datasets.exceptions.DatasetGenerationError as exc:
        loaded, failure = None, exc
    if loaded is not None:
        missing = [s for s in spec.splits if s not in loaded]
        if missing:
            raise StageError(f"{param}.hub.splits: {missing} not in {spec.repo!r} "
                             f"(available: {sorted(loaded)})")
        return {s: loaded[s] for s in spec.splits}
    builder = _call(datasets.load_dataset_builder, param, spec, spec.repo, spec.name, **kwargs)
    files = dict(builder.config.data_files or {})
    missing = [s for s in spec.splits if s not in files]
    if missing:
        raise StageError(f"{param}.hub.splits: {missing} not in {spec.repo!r} "
                         f"(available: {sorted(files)})")
    out: dict[str, Any] = {}
    for split in spec.splits:
        try:
            out[split] = datasets.load_dataset(spec.repo, spec.name, data_files={split: files[split]},
                                               split=split, **kwargs)
        except (datasets.exceptions.DatasetGenerationError, ValueError) as exc:
            if not _no_rows(exc):
                raise StageError(f"{param}.hub: split {split!r} of {where}: {exc} "
                                 f"({exc.__cause__ or ''})") from None
            out[split] = None
    if all(d is not None for d in out.values()):  # the failure was not an empty split
        raise StageError(f"{param}.hub: {where}: {failure} ({failure.__cause__})") from None
    return out


def _no_rows(exc: BaseException) -> bool:
    """Whether ``datasets`` failed because a split holds no rows (its two ways of saying so)."""
    text = f"{exc} {exc.__cause__ or ''}"
    return "corresponds to no data" in text or "the first 0 values written" in text


def _call(fn: Any, param: str, spec: HubSpec, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except FileNotFoundError as exc:
        raise StageError(f"{param}.hub.repo={spec.repo!r}: not found ({exc})") from None
    except ConnectionError as exc:
        raise StageError(f"{param}.hub.repo={spec.repo!r}: the hub is unreachable ({exc}); "
                         "run where the network is available, or point hub.repo at a local "
                         "replica") from None
    except ValueError as exc:  # unknown config name, bad data files
        raise StageError(f"{param}.hub: {spec.repo!r} config {spec.name!r}: {exc}") from None
