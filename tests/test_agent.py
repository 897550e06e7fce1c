"""agent@<key>: every option runs in the sandbox and a question is kept only when exactly the
key reproduces the reference; train tables end before the cutoff and the held-out tickers give
the test split; conversations carry the real tool output and train on the assistant turns only."""
from __future__ import annotations

import json
from datetime import date

import pandas as pd
import pytest
import yaml

from stages.agent import (AgentParams, AgentQuestion, AgentReject, TableSpec, check_cutoff,
                          draw_tables, judge, make_records, read_prices, table_frame, verify_all)
from stages.common.llm import Result, Usage
from stages.common.runlog import StageError
from stages.common.schema import validate_table
from stages.sandbox import Limits, Outcome, Sandbox
from stages.sources.prices import collect_prices
from stages.sources.spec import SourceParams
from tests.conftest import ROOT
from tests.test_prices import PORTAL_COLUMNS

ANSWERS = ROOT / "data/samples/llm_answers/agent.krx.yaml"


@pytest.fixture(scope="module")
def prices(tmp_path_factory) -> pd.DataFrame:
    params = SourceParams.model_validate({
        "kind": "prices", "loader": "local", "input": str(ROOT / "data/samples/raw/prices/stock_prices.csv"),
        "local": {}, "prices": {"series": "stock"}, "columns": PORTAL_COLUMNS})
    path = tmp_path_factory.mktemp("prices") / "krx_stock_prices.parquet"
    import pyarrow.parquet as pq
    pq.write_table(collect_prices(params, "krx_stock_prices").table, path)
    return read_prices([str(path)])


def agent_params(**overrides) -> AgentParams:
    """The quickstart's agent.krx (the answers file is written against its tables)."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    quick = yaml.safe_load((ROOT / "data/samples/quickstart.params.yaml").read_text(encoding="utf-8"))
    data = {**raw["agent"]["krx"], **quick["agent"]["krx"], **overrides}
    data["llm"] = {**raw["llm_defaults"], **data.get("llm", {}), "offline": True}
    return AgentParams.model_validate(data)


def result_for(spec: TableSpec, answer: dict) -> Result:
    return Result(spec.id, 0, AgentQuestion(**answer), json.dumps(answer, ensure_ascii=False),
                  "stop", Usage(100, 50), True, 1)


@pytest.fixture(scope="module")
def box():
    with Sandbox(Limits(cpu_seconds=1, wall_seconds=5)) as sandbox:
        yield sandbox


def test_tables_vary_train_ends_before_the_cutoff_and_test_is_the_held_out_tickers(prices):
    params = agent_params(tables=40, test_tables=10)
    specs, info = draw_tables(prices, params)
    train = [s for s in specs if s.split == "train"]
    test = [s for s in specs if s.split == "test"]
    assert len(train) == 40 and len(test) == 10 and info["test_tickers"] == 1
    held = {t for s in test for t in s.tickers}
    assert not held & {t for s in train for t in s.tickers}
    assert all(s.end < params.cutoff.isoformat() for s in train)
    assert len({tuple(s.columns) for s in specs}) > 5            # tables do not all look alike
    assert any(len(s.tickers) > 1 for s in train) and any(len(s.tickers) == 1 for s in train)
    frame = table_frame(prices, train[0])
    assert frame["날짜"].max() < pd.Timestamp(params.cutoff)
    assert draw_tables(prices, params)[0] == specs                # seeded: the same tables


def test_the_recorded_sample_answers_are_verified_by_running_them(prices):
    """The quickstart's answers: 7 of 8 kept, one rejected for two equivalent options; a kept
    question's meta shows exactly one option with the reference's result."""
    params = agent_params()
    specs, _ = draw_tables(prices, params)
    answers = yaml.safe_load(ANSWERS.read_text(encoding="utf-8"))["answers"]
    frames = {s.id: table_frame(prices, s) for s in specs}
    results = [result_for(s, answers[s.id][0]) for s in specs]
    questions, conversations, rejects, _ = verify_all(specs, frames, results, params, "krx")
    assert [(r["item"], r["reason"]) for r in rejects] == [("47dbc28a301f08f4", "two_options_match")]
    validate_table("mcq", questions)
    validate_table("conversation", conversations)
    for q in questions:
        meta = json.loads(q["meta"])
        same = [k for k, o in meta["outcomes"].items() if o.get("hash") == meta["reference"]["hash"]]
        assert same == ["ABCDEFG"[q["answer"]]]
        assert len(q["choices"]) == len(meta["outcomes"]) and 4 <= len(q["choices"]) <= 7
    spawner = next(q for q in questions if "subprocess" in "".join(q["choices"]))
    outcomes = json.loads(spawner["meta"])["outcomes"].values()
    assert {"status": "PermissionError", "detail": "[Errno 1] Operation not permitted"} in outcomes
    assert {q["split"] for q in questions} == {"train", "test"}


def test_equivalent_options_are_rejected_as_two_options_match(prices, box):
    params = agent_params()
    spec = draw_tables(prices, params)[0][0]
    frame = table_frame(prices, spec)
    options = ["df['종가'].mean()", "df['종가'].sum() / len(df)", "df['종가'].max()",
               "df['종가'].min()"][:spec.n_choices]
    options += [f"df['종가'].iloc[{i}]" for i in range(spec.n_choices - len(options))]
    answer = {"task": "평균 종가를 구하시오.", "options": options, "answer": "A",
              "reference": "df['종가'].to_numpy().mean()"}
    with pytest.raises(AgentReject) as info:
        make_records(spec, frame, result_for(spec, answer), box, "krx")
    assert info.value.reason == "two_options_match" and "B" in info.value.detail


@pytest.mark.parametrize("outcomes, reference, key, reason", [
    (["ok:a", "ok:b", "ok:c", "ok:d"], "KeyError", 0, "reference_raises"),
    (["KeyError", "ok:b", "ok:c", "ok:d"], "ok:a", 0, "key_raises"),
    (["ok:x", "ok:b", "ok:c", "ok:d"], "ok:a", 0, "key_differs"),
    (["ok:a", "ok:b", "ok:a", "ok:d"], "ok:a", 0, "two_options_match"),
    (["ok:a", "sandbox_limit", "ok:c", "ok:d"], "ok:a", 0, "sandbox_limit"),
])
def test_each_failure_has_its_reason(outcomes, reference, key, reason):
    def outcome(text: str) -> Outcome:
        status, _, digest = text.partition(":")
        return Outcome(status, hash=digest or None)
    with pytest.raises(AgentReject) as info:
        judge([outcome(o) for o in outcomes], outcome(reference), key)
    assert info.value.reason == reason
    judge([outcome(o) for o in ["ok:a", "ok:b", "KeyError", "ok:d"]], outcome("ok:a"), 0)  # kept


def test_a_planted_look_ahead_in_a_training_table_fails():
    record = {"id": "q1", "split": "train", "meta": json.dumps({"window_end": "2025-09-05"})}
    with pytest.raises(StageError, match="not before the cutoff"):
        check_cutoff([record], date(2025, 9, 1))
    check_cutoff([{**record, "split": "test"}], date(2025, 9, 1))   # held out by ticker: fine


def test_a_conversation_holds_the_real_output_and_trains_on_the_assistant_turns_only(prices, box):
    """The tool turn is what running the code printed; on Qwen2's vocabulary the labels trl
    gets cover both assistant turns (and their end-of-turn) and not one token of the tool turn."""
    import tempfile

    from stages.base_model import build_qwen2_tokenizer, build_tiny_model
    from stages.common.chat import tokenized_example
    from stages.mixing.formats import format_conversation
    from stages.train import attach_adapter, build_trainer
    from tests.test_train import _resolved

    params = agent_params()
    specs, _ = draw_tables(prices, params)
    answers = yaml.safe_load(ANSWERS.read_text(encoding="utf-8"))["answers"]
    spec = specs[0]
    _, conversation = make_records(spec, table_frame(prices, spec), result_for(spec, answers[spec.id][0]),
                                   box, "krx")
    roles = [m["role"] for m in conversation["messages"]]
    assert roles == ["user", "assistant", "tool", "assistant"]
    tool = conversation["messages"][2]["content"]
    box.load("check", table_frame(prices, spec))
    code = conversation["messages"][1]["content"].removeprefix("```python\n").removesuffix("\n```")
    assert box.run("check", code).preview == tool      # the tool turn is the real output

    example = format_conversation(conversation, {}, None)[0]
    qwen2, _ = build_qwen2_tokenizer()
    tokens = tokenized_example(qwen2, example)
    labelled = qwen2.decode([i for i, m in zip(tokens["input_ids"], tokens["completion_mask"]) if m])
    first, last = conversation["messages"][1]["content"], conversation["messages"][3]["content"]
    assert labelled == f"{first}<|im_end|>\n{last}<|im_end|>\n"
    assert "<|im_start|>tool" not in labelled

    model = build_tiny_model(qwen2, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             num_key_value_heads=1, intermediate_size=64)
    resolved = _resolved("v1", "models/base")
    train_params = resolved.model_copy(update={
        "quant": resolved.quant.model_copy(update={"load_in_4bit": False}),
        "sft": resolved.sft.model_copy(update={"max_length": 4096})})
    peft_model = attach_adapter(model, train_params, "models/base", "v1")
    with tempfile.TemporaryDirectory() as out:
        trainer = build_trainer(peft_model, qwen2, [example], [], train_params, out)
        batch = trainer.data_collator([trainer.train_dataset[0]])
    labels = [l for l in batch["labels"][0].tolist() if l != -100]
    assert qwen2.decode(labels) == labelled


def test_make_check_refuses_an_agent_cutoff_after_the_stock_cutoff_and_wrong_series(tmp_path):
    from stages import check
    from stages.common.params import load_raw

    raw = load_raw(ROOT / "params.yaml")
    raw["agent"]["krx"]["cutoff"] = "2025-12-01"            # later than stock.krx.cutoff
    raw["stock"]["krx"]["calendar"]["source"] = "krx_stock_prices"   # not an index series
    raw["collect"]["stock_prices_extra"] = raw["collect"]["krx_stock_prices"]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    problems = check.check(path)
    assert any(p.startswith("agent.krx.cutoff 2025-12-01 is after stock.krx.cutoff") for p in problems)
    assert any(p.startswith("stock.krx.calendar.source: 'krx_stock_prices' is not") for p in problems)
    assert any(p.startswith("collect.stock_prices_extra: a collect key starting with 'stock_'")
               for p in problems)
    assert check.check(ROOT / "params.yaml") == []
