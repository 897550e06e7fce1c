"""Hugging Face hub datasets through ``datasets.load_dataset``, pinned by revision.

``hub.repo`` may also be a local directory laid out like the hub repository (a README with
``configs:`` and the data files): the quickstart and the tests use exactly this code path on
local replicas, so nothing here is exercised only in production. Credentials come from the
environment (``HF_TOKEN``) through ``huggingface_hub``; nothing is written anywhere.
"""
from __future__ import annotations

import sys
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
    kwargs: dict[str, Any] = {} if local else {"revision": spec.revision}
    try:
        loaded = datasets.load_dataset(spec.repo, spec.name, **kwargs)
    except FileNotFoundError as exc:
        raise StageError(f"{param}.hub.repo={spec.repo!r}: not found ({exc})") from None
    except ValueError as exc:  # unknown config name, bad data files
        raise StageError(f"{param}.hub: {spec.repo!r} config {spec.name!r}: {exc}") from None
    except ConnectionError as exc:
        raise StageError(f"{param}.hub.repo={spec.repo!r}: the hub is unreachable ({exc}); "
                         "run where the network is available, or point hub.repo at a local "
                         "replica") from None
    missing = [s for s in spec.splits if s not in loaded]
    if missing:
        raise StageError(f"{param}.hub.splits: {missing} not in {spec.repo!r} "
                         f"(available: {sorted(loaded)})")
    out = Rows(info={"repo": spec.repo, "name": spec.name, "revision": spec.revision})
    if not local:
        out.info["resolved_revision"] = _resolved_revision(spec.repo, spec.revision)
    for hub_split, our_split in spec.splits.items():
        dataset = loaded[hub_split]
        if out.columns is None:
            out.columns = list(dataset.column_names)
        for index, record in enumerate(dataset):
            out.rows.append(RawRow(f"{hub_split}#{index}", our_split, dict(record)))
    return out
