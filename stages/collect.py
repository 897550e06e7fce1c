"""collect@<source>: one source (HF hub or local file) -> data/collected/<source>.parquet.

Contract:
- input: the source named by ``params.collect.<source>`` (hub dataset at a pinned revision,
  or a local csv/tsv/json/jsonl/parquet/xlsx file with an explicit encoding);
- output: records of the source's ``kind`` (see :mod:`stages.common.schema`), text NFC
  normalised, ids = content hashes, KMMLU's 1-4 answers as 0-based indexes, exact duplicates
  removed (the copy in the most held-out split is kept: test > dev > train, so a question
  that leaks into train is removed from train, never from the evaluation split);
- rejects (``data/rejects/collect/<source>.parquet``, always written): malformed rows, empty
  fields, answers that are not an index into the choices, duplicate choices, duplicates —
  each with a reason; counts in the metrics JSON;
- price sources (``kind: prices``) take a columnar path of their own
  (:mod:`stages.sources.prices`): rows checked in columns, rejects with reasons, a ``prices``
  table sorted by (ticker, date);
- fails (exit 2, nothing written) when the input is unusable as a whole (missing path,
  wrong encoding, missing column) or the reject rate exceeds ``max_reject_rate``.
"""
from __future__ import annotations

from collections import Counter
from typing import Any

from stages.common.io import write_records
from stages.common.params import PARAMS_FILE, read_section
from stages.common.runlog import (StageError, begin_stage, check_reject_rate, stage_main,
                                  stage_parser, write_metrics)
from stages.common.schema import SCHEMAS
from stages.common.text import file_sha256
from stages.sources import Rows
from stages.sources.records import build_records, check_columns
from stages.sources.spec import SourceParams

PARAMS = ("collect.{key}",)


def load_params(key: str, path: str = PARAMS_FILE) -> SourceParams:
    """``collect.<key>``: the schema is :class:`stages.sources.spec.SourceParams`."""
    return read_section(PARAMS, SourceParams, key, path=path)


def load_rows(params: SourceParams, key: str) -> Rows:
    if params.loader == "hub":
        from stages.sources.hub import load_hub
        return load_hub(params.hub, f"collect.{key}")
    from stages.sources.local import read_local
    return read_local(params.input, params.local, f"collect.{key}")


@stage_main
def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__, "source")
    args = parser.parse_args(argv)
    key = args.source
    params, log, timer = begin_stage(args, "collect", key, load_params)
    if params.kind == "prices":
        return collect_prices_stage(params, key, args, log, timer)

    rows = load_rows(params, key)
    where = params.hub.repo if params.loader == "hub" else params.input
    check_columns(rows, params, f"collect.{key}", where)
    input_label = (f"hf://{params.hub.repo}" + (f"/{params.hub.name}" if params.hub.name else "")
                   if params.loader == "hub" else params.input)
    records, rejects, counts = build_records(rows, params, key, input_label)

    reasons = Counter(r["reason"] for r in rejects)
    bad = sum(n for reason, n in reasons.items() if reason != "exact_duplicate")
    for r in rejects:
        log.info("reject %s: %s %s", r["item"], r["reason"], r["detail"])
    write_records(rejects, SCHEMAS["reject"], args.rejects)
    check_reject_rate(bad, counts["rows_read"], params.max_reject_rate, f"collect@{key}")
    if not records:
        raise StageError(f"collect@{key}: no records from {where}")

    write_records(records, SCHEMAS[params.kind], args.out)
    metrics = {"kind": params.kind, "rows_read": counts["rows_read"], "records": len(records),
               "rejected": bad, "duplicates_removed": counts["duplicates_removed"],
               "rejects_by_reason": dict(sorted(reasons.items())),
               "splits": {s: counts[f"split_{s}"] for s in ("train", "dev", "test")
                          if counts[f"split_{s}"]},
               "seconds": timer.seconds}
    if params.loader == "local":
        metrics["input_sha256"] = file_sha256(params.input)
    metrics.update({f"hub_{k}": v for k, v in rows.info.items()})
    write_metrics(args.metrics, metrics)
    log.info("%d records, %d rejected, %d duplicates removed -> %s (%.1fs)", len(records), bad,
             counts["duplicates_removed"], args.out, timer.seconds)


def collect_prices_stage(params: SourceParams, key: str, args: Any, log: Any, timer: Any) -> None:
    from stages.common.io import write_parquet
    from stages.common.schema import validate_prices_table
    from stages.sources.prices import collect_prices
    result = collect_prices(params, key)
    reasons = Counter(r["reason"] for r in result.rejects)
    for r in result.rejects:
        log.info("reject %s: %s %s", r["item"], r["reason"], r["detail"])
    write_records(result.rejects, SCHEMAS["reject"], args.rejects)
    rows = result.counts["rows_read"]
    check_reject_rate(len(result.rejects), rows, params.max_reject_rate, f"collect@{key}")
    if not result.table.num_rows:
        raise StageError(f"collect@{key}: no price rows from {params.input}")
    validate_prices_table(result.table)
    write_parquet(result.table, args.out)
    write_metrics(args.metrics, {
        "kind": "prices", "series": params.prices.series, "rows_read": rows,
        "records": result.table.num_rows, "rejected": len(result.rejects),
        "rejects_by_reason": dict(sorted(reasons.items())), "tickers": result.counts["tickers"],
        "first_date": result.counts["first_date"], "last_date": result.counts["last_date"],
        "flags": result.counts["flags"], "input_sha256": file_sha256(params.input),
        "seconds": timer.seconds})
    log.info("%d price rows of %d tickers (%s..%s), %d rejected, flags %s -> %s (%.1fs)",
             result.table.num_rows, result.counts["tickers"], result.counts["first_date"],
             result.counts["last_date"], len(result.rejects), result.counts["flags"], args.out,
             timer.seconds)


if __name__ == "__main__":
    main()
