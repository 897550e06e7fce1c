"""params.yaml: each stage validates its own section (typos are errors naming the key), shared
defaults merge under the sections that declare them, and `python -m stages.check` sees the
whole file at once (unknown sections, cross-section rules)."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from scripts.quickstart import ROOT, quickstart_params
from stages import check
from stages.collect import load_params as load_collect
from stages.common.params import ParamsError, deep_merge, load_raw, read_section
from stages.filter import load_params as load_filter
from stages.sources.spec import HUB_LOADER_MODULE, SourceParams
from stages.train import load_params as load_train


def write(tmp_path: Path, data: dict, name: str = "params.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return path


def test_committed_params_and_quickstart_params_pass_the_check(tmp_path):
    assert check.check(ROOT / "params.yaml", ROOT) == []
    production = load_raw(ROOT / "params.yaml")
    assert {"kmmlu_economics", "kmmlu_accounting", "metamath", "enko_translation", "krx_sample",
            "qa_rules", "table_qa", "top100_companies", "aihub_kozh",
            "aihub_econ_calc"} <= set(production["collect"])
    assert set(production["extract"]) == {"krx_reports", "financial_reports", "rules"}
    assert load_collect("kmmlu_economics", ROOT / "params.yaml").input == HUB_LOADER_MODULE
    quick = write(tmp_path, quickstart_params(ROOT))
    assert check.check(quick) == []
    for key in production["collect"]:  # the quickstart never reads outside the samples
        assert load_collect(key, quick).input.startswith("data/samples/"), key


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
    path = write(tmp_path, {"collect": {"src": source}})
    with pytest.raises(ParamsError) as info:
        load_collect("src", path)
    assert message in str(info.value)
    assert any(message in p for p in check.check(path))  # the check reports the same error


def test_check_reports_every_problem_at_once(tmp_path):
    params = load_raw(ROOT / "params.yaml")
    params["colect"] = {}
    params["collect"]["krx_sample"]["colums"] = params["collect"]["krx_sample"].pop("columns")
    params["versions"]["v6"]["mix"]["sources"]["generated_acounting"] = {"format": "prompt_answer"}
    params["versions"]["v6"]["mix"]["sources"]["mixture_v1"] = {"format": "example"}
    params["versions"]["v4"]["train"]["init_from"] = "v9"
    problems = check.check(write(tmp_path, params))
    text = "\n".join(problems)
    assert "colect: unknown section" in text
    assert "collect.krx_sample.colums: unknown key" in text
    assert "versions.v6.mix: unknown source 'generated_acounting'" in text
    assert "excluded sources ['krx_sample'] are in the recipe" in text  # via mixture_v1
    assert "versions.v4.train.init_from: 'v9' is not a version" in text
    assert check.main(["--params", str(tmp_path / "params.yaml"), "--root", str(tmp_path)]) == 2


def test_train_parent_cycles_are_found(tmp_path):
    params = load_raw(ROOT / "params.yaml")
    params["versions"]["v1"]["train"]["init_from"] = "v3"
    assert any("chain has a cycle" in p for p in check.check(write(tmp_path, params)))


def test_a_mixture_fitted_to_another_length_than_training_is_an_error(tmp_path):
    params = load_raw(ROOT / "params.yaml")
    params["versions"]["v3"]["train"]["sft"] = {"max_length": 512}
    problems = check.check(write(tmp_path, params))
    assert problems == ["versions.v3: mix max_length 2048 (mix_defaults / versions.v3.mix) differs "
                        "from train sft.max_length 512 (train_defaults / versions.v3.train); set "
                        "them to one value"]


def test_a_continued_version_replays_only_a_fraction_of_its_ancestors_data(tmp_path):
    params = load_raw(ROOT / "params.yaml")
    assert params["versions"]["v5_2"]["mix"]["sources"]["mixture_v5_1"]["fraction"] == 0.05
    params["versions"]["v5_2"]["mix"]["sources"]["mixture_v5_1"] = {"format": "example"}  # all of it
    params["versions"]["v5_3"]["mix"]["sources"]["mixture_v5_1"] = {"format": "example", "fraction": 0.6}
    text = "\n".join(check.check(write(tmp_path, params)))
    assert "versions.v5_2.mix.sources.mixture_v5_1: v5_2 continues v5_1's weights, so fraction 1.0" in text
    assert "versions.v5_3.mix.sources.mixture_v5_1: v5_3 continues v5_1's weights, so fraction 0.6" in text
    assert "mixture_v5_2" not in text  # 0.05: replay


def test_llm_defaults_merge_under_each_stage_and_its_own_keys_win(tmp_path):
    params = load_raw(ROOT / "params.yaml")
    path = write(tmp_path, params)
    judge = load_filter("financial_market", path, cache_dir=str(tmp_path / "cache"))
    assert judge.llm.model == params["llm_defaults"]["model"]
    assert judge.llm.max_tokens == 300 and judge.llm.temperature == 0.0
    assert judge.llm.cache_dir == str(tmp_path / "cache") and (tmp_path / "cache").is_dir()
    params["llm_defaults"]["model"] = "gpt-4o-mini"
    params["filter"]["financial_market"]["llm"]["temprature"] = 0.1
    path = write(tmp_path, params)
    with pytest.raises(ParamsError, match="filter.financial_market.llm.temprature: unknown key"):
        load_filter("financial_market", path)
    del params["filter"]["financial_market"]["llm"]["temprature"]
    assert load_filter("financial_market", write(tmp_path, params)).llm.model == "gpt-4o-mini"


def test_train_defaults_merge_key_by_key(tmp_path):
    params = load_raw(ROOT / "params.yaml")
    params["versions"]["v4"]["train"]["sft"] = {"learning_rate": 5.0e-5}
    params["versions"]["v4"]["train"]["lora"] = {"r": 4}
    v4 = load_train("v4", write(tmp_path, params))
    assert v4.sft.learning_rate == 5.0e-5 and v4.sft.max_length == 2048 and v4.lora.r == 4
    assert v4.lora.lora_alpha == 32 and v4.parent is None
    assert load_train("v3", write(tmp_path, params)).parent == "v1"
    params["versions"]["v4"]["train"]["accelerate_config"] = "configs/accelerate/fsdp_qlora.yaml"
    with pytest.raises(ParamsError, match="set it in train_defaults"):
        load_train("v4", write(tmp_path, params))


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


def test_read_section_reads_only_declared_templates(tmp_path):
    path = write(tmp_path, {"collect": {"src": GOOD, "other": GOOD}})
    got = read_section(("collect.{key}",), SourceParams, "src", path=path)
    assert got.input == "a.csv"
    with pytest.raises(ParamsError, match="collect.nope"):
        read_section(("collect.{key}",), SourceParams, "nope", path=path)


def test_deep_merge_overrides_leaves_only():
    base = {"collect": {"a": {"input": "x", "local": {"encoding": "cp949"}}, "b": {"input": "y"}}}
    merged = deep_merge(base, {"collect": {"a": {"input": "z"}}})
    assert merged == {"collect": {"a": {"input": "z", "local": {"encoding": "cp949"}},
                                  "b": {"input": "y"}}}
    assert base["collect"]["a"]["input"] == "x"


def test_params_yaml_restates_no_code_default():
    """A value lives in the code or in params.yaml, not both: every leaf of params.yaml that
    equals its schema field's default is reported."""
    found = restated_defaults(load_raw(ROOT / "params.yaml"))
    assert found == [], found


def restated_defaults(raw: dict) -> list[str]:
    from pydantic import BaseModel
    from pydantic_core import PydanticUndefined

    from stages.common.llm import LLMParams
    from stages.mixing.recipe import MixParams
    from stages.train import TrainParams

    def restated(model: type[BaseModel], data: dict, where: str) -> list[str]:
        found = []
        for name, value in (data or {}).items():
            info = model.model_fields.get(name)
            if info is None:
                continue
            sub = info.annotation
            args = getattr(sub, "__args__", ())
            inner = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
            if getattr(sub, "__origin__", None) is dict and inner and isinstance(value, dict):
                for key, item in value.items():  # dict[str, Model]: sources, local, collected
                    found += restated(inner[0], item, f"{where}.{name}.{key}")
                continue
            nested = sub if isinstance(sub, type) and issubclass(sub, BaseModel) else \
                (inner[0] if inner else None)
            if nested is not None and isinstance(value, dict):
                found += restated(nested, value, f"{where}.{name}")
                continue
            default = info.default if info.default_factory is None else info.default_factory()
            if default is not PydanticUndefined and default == value:
                found.append(f"{where}.{name}")
        return found

    from stages.base_model import BaseModelParams
    from stages.evaluate import EvaluateSettings
    from stages.extract import ExtractParams
    from stages.filter import FilterParams
    from stages.report import ReportParams
    from stages.solve import SolveParams
    from stages.summarize import SummarizeParams
    from stages.synthesize import SynthesizeParams
    from stages.transform import TransformParams
    keyed = {"collect": SourceParams, "extract": ExtractParams, "filter": FilterParams,
             "transform": TransformParams, "synthesize": SynthesizeParams, "solve": SolveParams}
    found = []
    for section, model in keyed.items():
        for key, value in raw[section].items():
            found += restated(model, value, f"{section}.{key}")
    for section, model in {"base_model": BaseModelParams, "summarize": SummarizeParams,
                           "evaluate": EvaluateSettings, "report": ReportParams,
                           "llm_defaults": LLMParams, "mix_defaults": MixParams,
                           "train_defaults": TrainParams}.items():
        found += restated(model, raw[section], section)
    for version, spec in raw["versions"].items():
        found += restated(MixParams, spec["mix"], f"versions.{version}.mix")
        found += restated(TrainParams, spec["train"], f"versions.{version}.train")
    return found


def test_the_restated_default_check_sees_nested_sections():
    """The check above must be able to fail: a restated default deep inside is found."""
    raw = load_raw(ROOT / "params.yaml")
    raw["versions"]["v1"]["mix"]["sources"]["krx_sample"]["upsample"] = False
    raw["evaluate"]["collected"]["kmmlu_economics"]["split"] = "test"
    raw["llm_defaults"]["top_p"] = 1.0
    assert restated_defaults(raw) == ["evaluate.collected.kmmlu_economics.split",
                                      "llm_defaults.top_p",
                                      "versions.v1.mix.sources.krx_sample.upsample"]


def test_each_version_is_named_once_in_params_yaml():
    """A version is declared once, as a key of ``versions`` (mentions as a parent or a
    ``mixture_<v>`` source are references); no DVC dep slots are left."""
    import re

    text = (ROOT / "params.yaml").read_text(encoding="utf-8")
    versions = list(load_raw(ROOT / "params.yaml")["versions"])
    assert versions == ["v1", "v2", "v3", "v4", "v5_1", "v5_2", "v5_3", "v6", "v7"]
    for version in versions:
        assert len(re.findall(rf"^\s*{version}:", text, flags=re.M)) == 1, version
    assert not re.search(r"^\s*inputs:\s*\n\s*a:", text, flags=re.M)
    assert not any(section in load_raw(ROOT / "params.yaml") for section in ("mix", "train"))


def test_a_typo_in_a_shared_default_is_named_once_by_its_own_section(tmp_path):
    raw = load_raw(ROOT / "params.yaml")
    raw["llm_defaults"]["temprature"] = 0.5
    raw["train_defaults"]["sft"]["learnig_rate"] = 1.0e-4
    raw["versions"]["v4"]["trian"] = {"lora": {"r": 4}}
    raw["filter"]["rules"]["llm"]["cache_dir"] = "data/llm_cache/elsewhere"
    path = write(tmp_path, raw)
    problems = check.check(path)
    assert problems.count("llm_defaults.temprature: unknown key (typo?)") == 1
    assert problems.count("train_defaults.sft.learnig_rate: unknown key (typo?)") == 1
    assert "versions.v4.trian: unknown key (typo?); a version has mix and train" in problems
    assert any(p.startswith("filter.rules.llm.cache_dir: not a param") for p in problems)
    assert not any("filter.accounting.llm.temprature" in p for p in problems)
    with pytest.raises(ParamsError, match="llm_defaults.temprature: unknown key"):
        load_filter("accounting", path)  # the stage names the shared section too


@pytest.mark.parametrize("section,key,value,message", [
    ("train_defaults", "sft.max_steps", -5, "train_defaults.sft.max_steps: Input should be greater than or equal to -1"),
    ("train_defaults", "sft.max_steps", 0, "max_steps 0 trains nothing"),
    ("train_defaults", "sft.warmup_steps", 1.5, "a ratio must be < 1"),
    ("train_defaults", "sft.seed", -1, "train_defaults.sft.seed"),
    ("train_defaults", "lora.lora_dropout", 1.0, "train_defaults.lora.lora_dropout"),
    ("llm_defaults", "max_tokens", 0, "llm_defaults.max_tokens"),
    ("llm_defaults", "backoff_base_s", 120.0, "backoff_base_s 120.0 > backoff_max_s 60.0"),
    ("mix_defaults", "dev_size", 1.0, "mix_defaults.dev_size"),
    ("mix_defaults", "batch_size", 0, "mix_defaults.batch_size"),
    ("synthesize", "financial_market.target", -1, "synthesize.financial_market.target"),
    ("solve", "rules.target_pairs", 3, "target_pairs must be a non-negative even number"),
    ("evaluate", "batch_size", 0, "evaluate.batch_size"),
    ("extract", "rules.workers", -2, "extract.rules.workers"),
])
def test_numeric_knobs_are_range_checked_naming_the_key(tmp_path, section, key, value, message):
    raw = load_raw(ROOT / "params.yaml")
    node = raw[section]
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    problems = check.check(write(tmp_path, raw))
    assert any(message in p for p in problems), problems


def test_check_lists_everything_a_production_run_lacks_at_once(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("LLM_OFFLINE", raising=False)
    missing = check.missing_for_run(ROOT / "params.yaml", ROOT)
    text = "\n".join(missing)
    for expected in ("data/raw/krx_sample.csv: missing (input of collect@krx_sample)",
                     "data/raw/pdfs/krx_reports: missing", "data/raw/eval: missing",
                     "OPENAI_API_KEY is not set, and 15 LLM stage(s) would call the API"):
        assert expected in text, missing
    assert "revision" not in text  # production params pin every hub revision
    raw = load_raw(ROOT / "params.yaml")
    raw["collect"]["kmmlu_economics"]["hub"]["revision"] = "main"
    raw["base_model"]["revision"] = "v1.0"
    unpinned = check.placeholder_revisions(raw)
    assert unpinned == [
        "collect.kmmlu_economics.hub.revision: 'main' is not a pinned commit of HAERAE-HUB/KMMLU "
        "(40 hex digits)",
        "base_model.revision: 'v1.0' is not a pinned commit of Qwen/Qwen2-7B-Instruct (40 hex digits)"]
    assert not any("data/collected" in m or "models/" in m for m in missing)  # stage outputs
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-placeholder")
    assert not any("OPENAI_API_KEY" in m for m in check.missing_for_run(ROOT / "params.yaml", ROOT))


def test_the_quickstart_workspace_lacks_nothing(tmp_path, monkeypatch):
    from scripts.quickstart import prepare_workspace

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("LLM_OFFLINE", raising=False)
    workspace = tmp_path / "qs"
    prepare_workspace(ROOT, workspace)
    assert check.check(workspace / "params.yaml", workspace) == []
    assert check.missing_for_run(workspace / "params.yaml", workspace) == []
