"""params.yaml is validated section by section: typos are errors naming the key."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from scripts.quickstart import ROOT, deep_merge, quickstart_params
from stages.common.params import (HUB_LOADER_MODULE, ParamsError, ParamsFile, SourceParams,
                                  load_params, read_declared)


def test_committed_params_and_quickstart_params_validate():
    production = load_params(ROOT / "params.yaml")
    assert {"kmmlu_economics", "kmmlu_accounting", "metamath", "enko_translation", "krx_sample",
            "qa_rules", "table_qa", "top100_companies", "aihub_kozh",
            "aihub_econ_calc"} <= set(production.collect)
    assert set(production.extract) == {"krx_reports", "financial_reports", "rules"}
    assert production.collect["kmmlu_economics"].input == HUB_LOADER_MODULE
    quick = ParamsFile.model_validate(quickstart_params(ROOT))
    for key, source in quick.collect.items():  # the quickstart never reads outside the samples
        assert source.input.startswith("data/samples/"), key
    for key, collection in quick.extract.items():
        assert collection.input.startswith("data/samples/"), key


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return path


GOOD = {"kind": "qa", "loader": "local", "input": "a.csv", "local": {},
        "columns": {"question": "q", "answer": "a"}}


@pytest.mark.parametrize("mutate,message", [
    (lambda s: s.update(colums=s.pop("columns")), "collect.src.colums: unknown key"),
    (lambda s: s["local"].update(encodng="cp949"), "collect.src.local.encodng: unknown key"),
    (lambda s: s.update(kind="mcqq"), "collect.src.kind"),
    (lambda s: s.update(max_reject_rate=2), "collect.src.max_reject_rate"),
    (lambda s: s.update(columns={"question": "q"}), "columns must map ['answer']"),
    (lambda s: s.update(loader="hub"), "loader 'hub' needs a 'hub' block"),
])
def test_typos_and_bad_values_are_errors_naming_the_key(tmp_path, mutate, message):
    source = yaml.safe_load(yaml.safe_dump(GOOD))
    mutate(source)
    with pytest.raises(ParamsError) as info:
        load_params(write(tmp_path, {"collect": {"src": source}}))
    assert message in str(info.value)


def test_unknown_section_is_an_error(tmp_path):
    with pytest.raises(ParamsError, match="colect: unknown key"):
        load_params(write(tmp_path, {"colect": {}}))


def test_hub_input_must_match_where_the_data_comes_from():
    hub = {"repo": "HAERAE-HUB/KMMLU", "name": "Economics", "revision": "abc"}
    mcq = {"kind": "mcq", "loader": "hub", "hub": hub,
           "columns": {"question": "q", "choices": ["A", "B", "C", "D"], "answer": "answer"}}
    assert SourceParams.model_validate({**mcq, "input": HUB_LOADER_MODULE})
    with pytest.raises(ValueError, match="read over the network"):
        SourceParams.model_validate({**mcq, "input": "data/raw/kmmlu"})
    local = {**mcq, "hub": {**hub, "repo": "data/samples/hub/KMMLU"}}
    assert SourceParams.model_validate({**local, "input": "data/samples/hub/KMMLU"})
    with pytest.raises(ValueError, match="must be the same path"):
        SourceParams.model_validate({**local, "input": HUB_LOADER_MODULE})


def test_read_declared_returns_only_declared_sections(tmp_path):
    path = write(tmp_path, {"collect": {"src": GOOD, "other": GOOD}})
    got = read_declared(("collect.{key}",), "src", path=path)
    assert list(got) == ["collect.{key}"] and got["collect.{key}"].input == "a.csv"
    with pytest.raises(ParamsError, match="collect.nope"):
        read_declared(("collect.{key}",), "nope", path=path)


def test_deep_merge_overrides_leaves_only():
    base = {"collect": {"a": {"input": "x", "local": {"encoding": "cp949"}}, "b": {"input": "y"}}}
    merged = deep_merge(base, {"collect": {"a": {"input": "z"}}})
    assert merged == {"collect": {"a": {"input": "z", "local": {"encoding": "cp949"}},
                                  "b": {"input": "y"}}}
    assert base["collect"]["a"]["input"] == "x"
