"""evaluate@<key>: accuracy on planted cases, shuffled scoring, strict letter parsing, the stage.

The models are real tiny Qwen2 models (``stages.base_model.build_tiny_model``) whose weights
are set so that one letter always wins ("planted"): the residual stream's dimension 0 is held
at a constant, the final norm keeps only that dimension, and ``lm_head`` reads it into the
chosen letter's logit alone. A LoRA adapter on ``lm_head`` (saved with ``save_pretrained``)
plants another letter, so the baseline and a version must score differently.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from stages.base_model import build_tiny_model, build_tokenizer
from stages.common.io import read_records, write_records
from stages.common.params import load_raw
from stages.common.prompts import LETTERS, step1_prompt
from stages.common.runlog import StageError
from stages.common.schema import SCHEMAS
from stages.common.text import content_id
from stages.evaluate import (EvaluateSettings, chat_text, evaluate_items, generate_texts, letter_logprobs,
                             letter_token_ids, load_model, parse_letter, permutation,
                             Scored, score_generate, score_loglik, shuffle_item, summarize, unshuffle)
from stages.evaluate import load_params as load_evaluate
from stages.evaluate import main as evaluate_main
from stages.sources.evalsets import EvalItem, items_from_records, load_sets, strip_labels
from tests.conftest import ROOT, run_stage

SAMPLES = ROOT / "data" / "samples" / "eval"
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, max_position_embeddings=1024)


# ------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tokenizer():
    texts = [line for path in sorted(SAMPLES.glob("*.jsonl"))
             for line in path.read_text(encoding="utf-8").splitlines()] * 2
    tok = build_tokenizer(texts, 400)
    tok.padding_side = "left"
    return tok


def plant_letter(model, token_id: int, strength: float = 10.0):
    """Make ``model`` put the highest next-token logit on ``token_id`` for every input."""
    with torch.no_grad():
        inner = model.model
        inner.embed_tokens.weight[:, 0] = strength          # x_0 = strength for every token
        for layer in inner.layers:                           # ... and no sublayer writes to it
            layer.self_attn.o_proj.weight[0, :] = 0
            layer.mlp.down_proj.weight[0, :] = 0
        inner.norm.weight.zero_()
        inner.norm.weight[0] = 1.0                           # h = (x_0 / rms(x), 0, …, 0), h_0 > 0
        model.lm_head.weight.zero_()
        model.lm_head.weight[token_id, 0] = 1.0              # logit(token) = h_0 > 0 = others
    return model


def planted_model(tokenizer, letter: str):
    model = build_tiny_model(tokenizer, **TINY)
    return plant_letter(model, tokenizer.encode(letter, add_special_tokens=False)[0]).eval()


def save_base(tokenizer, model, path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(path)
    model.save_pretrained(path)
    (path / "base.json").write_text(json.dumps({"model": str(path), "revision": "local",
                                                "built": True}), encoding="utf-8")
    return path


def save_letter_adapter(tokenizer, base_dir: Path, letter: str, path: Path) -> Path:
    """A LoRA adapter on lm_head whose update adds 2*h_0 to ``letter``'s logit (beats the
    planted base letter's h_0), saved the way train saves one (+ the tokenizer)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=2, lora_alpha=2, target_modules=["lm_head"], lora_dropout=0.0)
    peft_model = get_peft_model(base, config)
    token = tokenizer.encode(letter, add_special_tokens=False)[0]
    lora = peft_model.base_model.model.lm_head
    with torch.no_grad():
        lora.lora_A["default"].weight.zero_()
        lora.lora_A["default"].weight[0, 0] = 1.0
        lora.lora_B["default"].weight.zero_()
        lora.lora_B["default"].weight[token, 0] = 2.0 / lora.scaling["default"]
    peft_model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def items_with_answers(answers: list[int], sizes: list[int]) -> list[EvalItem]:
    items = []
    for index, (answer, size) in enumerate(zip(answers, sizes)):
        choices = tuple(f"보기 {index}-{k}" for k in range(size))
        items.append(EvalItem("set_a" if index % 2 else "set_b", f"item{index:02d}",
                              f"문제 {index}: 다음 중 옳은 것은?", choices, answer,
                              "cat_x" if index % 3 else "cat_y"))
    return items


# ------------------------------------------------------------------------ strict letter parser
@pytest.mark.parametrize("text, n, expected", [
    ("C", 4, 2), ("C.", 4, 2), ("(C)", 4, 2), ("C)", 4, 2), ("  D  \n", 4, 3),
    ("정답: C", 4, 2), ("### 정답: G", 7, 6), ("정답은 E", 7, 4), ("답: B", 4, 1), ("Answer: A", 4, 0),
    ("F\n해설: F가 옳다", 7, 5),
    ("AB", 4, None), ("A, B", 4, None), ("A B", 4, None), ("C. 블록체인 암호화", 4, None),
    ("c", 4, None), ("E", 4, None), ("H", 7, None), ("", 4, None), ("정답:", 4, None),
    ("정답: CC", 7, None), ("1", 4, None),
])
def test_parse_letter_is_strict(text, n, expected):
    assert parse_letter(text, n) == expected


def test_parse_letter_accepts_every_letter_of_a_seven_choice_item():
    assert [parse_letter(f"정답: {letter}", 7) for letter in LETTERS] == list(range(7))
    assert [parse_letter(letter, 4) for letter in LETTERS] == [0, 1, 2, 3, None, None, None]


# ------------------------------------------------------------------------ shuffling
def test_permutation_is_deterministic_per_item_and_never_identity():
    for n in range(4, 8):
        for i in range(50):
            perm = permutation(f"id{i}", n, seed=3)
            assert sorted(perm) == list(range(n)) and perm != list(range(n))
            assert perm == permutation(f"id{i}", n, seed=3)
    assert any(permutation(f"id{i}", 7, 3) != permutation(f"id{i}", 7, 4) for i in range(5))


def test_shuffled_item_keeps_the_correct_option_text():
    item = items_with_answers([5], [7])[0]
    shuffled, perm = shuffle_item(item, seed=0)
    assert shuffled.choices[shuffled.answer] == item.choices[item.answer]
    for shown in range(7):   # each shown letter maps back to the option shown under it
        assert item.choices[unshuffle(shown, perm)] == shuffled.choices[shown]
    assert unshuffle(None, perm) is None


# ------------------------------------------------------------------------ planted accuracy
def test_loglik_accuracy_on_a_model_that_always_answers_c(tokenizer):
    model = planted_model(tokenizer, "C")
    answers = [2, 0, 2, 1, 2, 3, 6, 2, 4, 2, 5, 0]
    sizes = [4, 4, 7, 4, 7, 5, 7, 6, 7, 4, 7, 4]
    items = items_with_answers(answers, sizes)
    rows = evaluate_items(items, lambda batch: score_loglik(model, tokenizer, batch, 3),
                          shuffled=True, seed=7)
    assert [r["predicted"] for r in rows] == [2] * len(items)
    expected = [a == 2 for a in answers]
    assert [r["correct"] for r in rows] == expected
    # shuffled: the model still says C, i.e. whatever option the permutation put third
    for item, row in zip(items, rows):
        shuffled, _ = shuffle_item(item, 7)
        shown_third = shuffled.choices[2]
        assert row["shuffled_correct"] == (shown_third == item.choices[item.answer])
        assert item.choices[row["shuffled_predicted"]] == shown_third
    metrics = summarize(rows, shuffled=True)
    assert metrics["accuracy"]["micro"] == round(sum(expected) / len(expected), 6)
    four = [e for e, s in zip(expected, sizes) if s == 4]
    seven = [e for e, s in zip(expected, sizes) if s == 7]
    assert metrics["accuracy"]["choices_4"] == round(sum(four) / len(four), 6)
    assert metrics["accuracy"]["choices_7"] == round(sum(seven) / len(seven), 6)
    assert metrics["by_choices"]["7"]["items"] == len(seven)
    per_category = {}
    for item, ok in zip(items, expected):
        per_category.setdefault(item.category_key, []).append(ok)
    assert set(metrics["by_category"]) == set(per_category)
    macro = sum(sum(v) / len(v) for v in per_category.values()) / len(per_category)
    assert metrics["accuracy"]["macro"] == pytest.approx(macro, abs=1e-6)
    shuffled_micro = sum(r["shuffled_correct"] for r in rows) / len(rows)
    assert metrics["accuracy"]["shuffled_micro"] == round(shuffled_micro, 6)
    detail = json.loads(rows[0]["detail"])
    logprobs = detail["letter_logprobs"]
    assert len(logprobs) == 4 and max(logprobs) == logprobs[2] and logprobs.count(logprobs[0]) == 3
    assert 0 < detail["letter_mass"] <= 1


def test_a_letter_beyond_an_items_choices_is_never_predicted(tokenizer):
    model = planted_model(tokenizer, "G")      # G wins, but a 4-choice item has no G
    items = items_with_answers([0, 6], [4, 7])
    rows = evaluate_items(items, lambda batch: score_loglik(model, tokenizer, batch, 2), False, 0)
    assert rows[0]["predicted"] in range(4) and rows[1]["predicted"] == 6
    assert rows[1]["correct"] and rows[0]["permutation"] == [] and rows[0]["shuffled_predicted"] == -1


def test_generation_scoring_parses_the_step2_letter_strictly(tokenizer):
    model = planted_model(tokenizer, "B")
    items = items_with_answers([1, 0, 1, 3], [4, 4, 7, 7])
    one_letter = evaluate_items(
        items, lambda batch: score_generate(model, tokenizer, batch, 2, 3, 1), False, 0)
    assert [r["predicted"] for r in one_letter] == [1, 1, 1, 1]
    assert [r["correct"] for r in one_letter] == [True, False, True, False]
    assert json.loads(one_letter[0]["detail"]) == {"solution": "BBB", "answer_text": "B"}
    # two tokens -> "BB": not a single letter, so unparsed and wrong
    two_letters = evaluate_items(
        items, lambda batch: score_generate(model, tokenizer, batch, 2, 3, 2), True, 0)
    assert all(r["predicted"] == -1 and not r["correct"] for r in two_letters)
    assert summarize(two_letters, True)["unparsed"] == len(items)


def test_batching_with_left_padding_does_not_change_scores(tokenizer):
    model = build_tiny_model(tokenizer, **TINY).eval()   # random weights: real differences
    items = items_with_answers([0] * 6, [4, 7, 5, 4, 6, 7])
    items = [EvalItem(i.set, i.id, i.question + " 추가 설명" * k, i.choices, 0)
             for k, i in enumerate(items)]               # different prompt lengths
    texts = [chat_text(tokenizer, step1_prompt(i.question, i.choices)) for i in items]
    one = torch.tensor(letter_logprobs(model, tokenizer, texts, 1))
    four = torch.tensor(letter_logprobs(model, tokenizer, texts, 4))
    assert one.shape == (6, 7)
    assert torch.allclose(one, four, atol=1e-4)
    greedy_one = generate_texts(model, tokenizer, texts, 4, 1)
    greedy_four = generate_texts(model, tokenizer, texts, 4, 4)
    assert greedy_one == greedy_four


def test_prompt_is_the_training_step1_format_through_the_chat_template(tokenizer):
    item = items_with_answers([0], [4])[0]
    text = chat_text(tokenizer, step1_prompt(item.question, item.choices))
    assert text.endswith("### 정답:<|im_end|>\n<|im_start|>assistant\n")
    assert "<|im_start|>user\n다음 문제를 읽고 정답으로 가장 알맞은 것을 고르시요." in text
    assert len(letter_token_ids(tokenizer)) == 7


# ------------------------------------------------------------------------ sets
def test_strip_labels_only_when_every_choice_carries_its_own_label():
    assert strip_labels(["A. 가", "B. 나", "C) 다", "D. 라"]) == ["가", "나", "다", "라"]
    assert strip_labels(["1 가", "2 나", "3 다", "4 라"]) == ["가", "나", "다", "라"]
    assert strip_labels(["B. 가", "A. 나", "C. 다", "D. 라"]) == ["B. 가", "A. 나", "C. 다", "D. 라"]
    assert strip_labels(["A. 가", "나", "C. 다", "D. 라"]) == ["A. 가", "나", "C. 다", "D. 라"]


def test_collected_sets_use_only_the_held_out_split():
    record = {"id": "x", "source": "kmmlu_economics", "domain": "d", "split": "test",
              "question": "q", "choices": ["a", "b", "c", "d"], "answer": 1, "category": "Economics",
              "meta": "{}"}
    records = [record, dict(record, id="y", split="train"),
               dict(record, id="z", choices=["a", "a", "c", "d"])]
    items, rejects = items_from_records("kmmlu_economics", records, "test")
    assert [i.id for i in items] == ["x"]
    assert [r["reason"] for r in rejects] == ["invalid_record"] and "duplicate" in rejects[0]["detail"]


def _settings(**overrides) -> EvaluateSettings:
    params = load_evaluate(None, ROOT / "params.yaml").model_dump()
    local = params["local"]
    for name, spec in [*local.items(), *params["open_ended"].items()]:
        spec["input"] = str(SAMPLES / Path(spec["input"]).name)
    params.update(local_dir=str(SAMPLES), collected={}, **overrides)
    return EvaluateSettings.model_validate(params)


def test_the_sample_local_sets_load_with_the_production_mapping():
    items, rejects = load_sets(_settings())
    assert rejects == []
    by_set = {}
    for item in items:
        by_set.setdefault(item.set, []).append(item)
    assert {k: len(v) for k, v in by_set.items()} == {"accounting_7": 5, "fin_market_mcq": 8,
                                                      "fin_security": 6}
    assert {len(i.choices) for i in items} == {4, 5, 6, 7}
    assert all(len(i.choices) == 7 for i in by_set["accounting_7"])
    market = {i.question[:10]: i for i in by_set["fin_market_mcq"]}
    dividend = next(i for q, i in market.items() if q.startswith("다음 중 주식의"))
    assert dividend.choices[dividend.answer] == "주당 배당금을 주가로 나눈 값이다."  # label stripped
    assert not any(c[:2] in ("A.", "B.") for i in by_set["fin_market_mcq"] for c in i.choices)
    otp = next(i for i in by_set["fin_security"] if "OTP" in i.question)
    assert otp.answer == 1 and otp.category == "인증"                        # 1-based answer 2
    capped, _ = load_sets(_settings(max_items_per_set=2))
    assert len(capped) == 6


def test_bad_local_rows_are_rejected_with_a_reason(tmp_path: Path):
    good = json.loads((SAMPLES / "fin_security.jsonl").read_text(encoding="utf-8").splitlines()[0])
    lines = [json.dumps(good, ensure_ascii=False), "{not json",
             json.dumps(dict(good, question="다른 문제", answer=9), ensure_ascii=False),
             # one choice is no question (2-7 are: up/down stock sets have two)
             json.dumps(dict(good, question="한 개", options=["a"], answer=1), ensure_ascii=False),
             json.dumps(dict(good, question="두 개", options=["상승", "하락"], answer=2), ensure_ascii=False)]
    (tmp_path / "fin_security.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    params = _settings().model_dump()
    params["local"] = {"fin_security": dict(params["local"]["fin_security"],
                                            input=str(tmp_path / "fin_security.jsonl"))}
    params["local_dir"], params["open_ended"] = str(tmp_path), {}
    items, rejects = load_sets(EvaluateSettings.model_validate(params))
    assert sorted(len(i.choices) for i in items) == [2, 4]
    assert sorted(r["reason"] for r in rejects) == ["answer_out_of_range", "invalid_record",
                                                    "malformed_json"]
    assert all(r["stage"] == "evaluate" for r in rejects)


def test_a_local_set_outside_local_dir_is_a_params_error():
    params = _settings().model_dump()
    params["local_dir"] = "data/raw/elsewhere"
    with pytest.raises(ValueError, match="not under local_dir"):
        EvaluateSettings.model_validate(params)


def test_every_eval_set_in_params_is_a_dep_of_every_evaluate_stage(tmp_path: Path):
    """The set files reach dvc.yaml through dvc.vars.yaml's ``eval_inputs`` slots (derived from
    params; a foreach item cannot take a list of deps): a set added to params but not to the
    slots would go stale silently, so check both params files."""
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        stages = [s for s in repo.index.stages if s.addressing.startswith("evaluate@")]
        deps = {s.addressing: {d.def_path for d in s.deps} for s in stages}
    production = load_evaluate(None, ROOT / "params.yaml")
    keys = ["base", *load_raw(ROOT / "params.yaml")["versions"]]
    assert set(deps) == {f"evaluate@{k}" for k in keys}
    assert {"base", "v1", "v2", "v3", "v4", "v5_1", "v5_2", "v5_3", "v6", "v7"} == set(keys)
    for settings in (production, _quickstart_settings(tmp_path)):
        wanted = [s.input for s in settings.collected.values()]
        for stage, paths in deps.items():
            for path in wanted:
                assert path in paths, f"{stage}: eval set {path} is not a dep"
            assert "models/base" in paths
    for key in keys:
        assert f"models/{key}" in deps[f"evaluate@{key}"]


def _quickstart_settings(tmp_path: Path) -> EvaluateSettings:
    import scripts.quickstart as quickstart

    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(quickstart.quickstart_params(ROOT), allow_unicode=True),
                    encoding="utf-8")
    settings = load_evaluate(None, path)
    assert settings.local_dir == "data/samples/eval" and settings.scoring == "loglik"
    return settings


# ------------------------------------------------------------------------ models on disk
def test_load_model_applies_the_adapter_only_for_versions(tokenizer, tmp_path: Path):
    base_dir = save_base(tokenizer, planted_model(tokenizer, "A"), tmp_path / "models" / "base")
    adapter_dir = save_letter_adapter(tokenizer, base_dir, "D", tmp_path / "models" / "v1")
    items = items_with_answers([0, 3, 3], [4, 7, 4])
    predictions = {}
    for name, model_dir in (("base", base_dir), ("v1", adapter_dir)):
        model, tok, info = load_model(str(base_dir), str(model_dir), "cpu", "auto")
        assert info["adapter"] == (name == "v1") and info["dtype"] == "float32"
        rows = evaluate_items(items, lambda batch: score_loglik(model, tok, batch, 2), False, 0)
        predictions[name] = [r["predicted"] for r in rows]
    assert predictions == {"base": [0, 0, 0], "v1": [3, 3, 3]}
    with pytest.raises(StageError, match="adapter_config.json"):
        load_model(str(base_dir), str(tmp_path / "models"), "cpu", "auto")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tokenizer) -> Path:
    """A stage workspace: planted base (always A), v1 adapter (always D), a collected KMMLU-like
    parquet with train and test rows, the sample local sets, params.yaml."""
    ws = tmp_path_factory.mktemp("evaluate_ws")
    base_dir = save_base(tokenizer, planted_model(tokenizer, "A"), ws / "models" / "base")
    save_letter_adapter(tokenizer, base_dir, "D", ws / "models" / "v1")
    (ws / "models" / "base" / "base.json").write_text(
        json.dumps({"model": "models/base", "revision": "local", "built": True}), encoding="utf-8")
    records = []
    for index, (split, answer) in enumerate([("test", 0), ("test", 3), ("test", 0), ("train", 0),
                                             ("dev", 3)]):
        question, choices = f"경제 문제 {index}", [f"선택 {index}-{k}" for k in range(4)]
        records.append({"id": content_id("mcq", question, choices, answer), "source": "kmmlu_economics",
                        "domain": "financial_market", "split": split, "question": question,
                        "choices": choices, "answer": answer, "category": "Economics", "meta": "{}"})
    write_records(records, SCHEMAS["mcq"], ws / "data" / "collected" / "kmmlu_economics.parquet")
    # v1's mixture: its dev split answers "D", the letter the v1 adapter always gives
    examples = [{"id": f"e{i}", "version": "v1", "source": "krx_sample", "split": split,
                 "prompt": [{"role": "user", "content": f"질문 {i}\n### 정답:"}],
                 "completion": [{"role": "assistant", "content": "D"}]}
                for i, split in enumerate(["train", "dev", "train", "dev", "dev"])]
    write_records(examples, SCHEMAS["example"], ws / "data" / "mixtures" / "v1.parquet")
    shutil.copytree(SAMPLES, ws / "data" / "samples" / "eval")
    settings = load_evaluate(None, ROOT / "params.yaml").model_dump()
    settings["collected"] = {"kmmlu_economics": {"input": "data/collected/kmmlu_economics.parquet",
                                                 "split": "test", "contest_category": "financial_market"}}
    settings["local_dir"] = "data/samples/eval"
    for name, spec in settings["local"].items():
        spec["input"] = f"data/samples/eval/{Path(spec['input']).name}"
    settings["open_ended"]["finance_open"]["input"] = "data/samples/eval/finance_open.jsonl"
    settings["generation"]["open_ended_max_new_tokens"] = 6
    settings["batch_size"] = 4
    settings["scoring"] = "loglik"  # the planted models repeat their letter: scored by log-prob
    (ws / "params.yaml").write_text(yaml.safe_dump({"evaluate": settings}, allow_unicode=True),
                                    encoding="utf-8")
    return ws


def _args(key: str) -> list[str]:
    """The arguments dvc.yaml's evaluate cmd passes."""
    dev = "models/base" if key == "base" else f"data/mixtures/{key}.parquet"
    return [key, "--base", "models/base", "--model", f"models/{key}", "--dev", dev,
            "--out", f"data/eval/{key}.parquet", "--open-answers", f"data/eval/{key}.open.parquet",
            "--rejects", f"data/rejects/evaluate/{key}.parquet",
            "--metrics", f"metrics/eval/{key}.json", "--log", f"logs/evaluate/{key}.log"]


def _run(ws: Path, key: str):
    return run_stage("evaluate", _args(key), ws)


@pytest.mark.slow
def test_stage_scores_base_and_version_side_by_side(workspace: Path, monkeypatch):
    for key in ("base", "v1"):
        result = _run(workspace, key)
        assert result.returncode == 0, result.stderr
    base = json.loads((workspace / "metrics/eval/base.json").read_text(encoding="utf-8"))
    v1 = json.loads((workspace / "metrics/eval/v1.json").read_text(encoding="utf-8"))
    # 3 KMMLU test items (train/dev ignored) + 19 local items
    assert base["items"] == v1["items"] == 22 and base["rejected"] == 0
    assert base["by_set"]["kmmlu_economics"]["items"] == 3
    assert base["by_set"]["kmmlu_economics"]["accuracy"] == round(2 / 3, 6)
    assert v1["by_set"]["kmmlu_economics"]["accuracy"] == round(1 / 3, 6)
    assert base["adapter"] is False and v1["adapter"] is True and v1["model"] == "models/v1"
    # the dev loss: v1's 3 dev examples (the train ones are not read), each scored on its
    # answer "D", <|im_end|> and the newline, with the adapter and without it (the base)
    dev = v1["dev_loss"]
    assert dev["examples"] == 3 and dev["tokens"] == 9 and dev["mixture"] == "data/mixtures/v1.parquet"
    assert dev["model"] != dev["base"] and dev["delta"] == pytest.approx(dev["model"] - dev["base"], abs=1e-3)
    assert base["dev_loss"] is None  # the baseline has no mixture of its own
    predictions = {key: read_records(workspace / f"data/eval/{key}.parquet") for key in ("base", "v1")}
    assert {r["predicted"] for r in predictions["base"]} == {0}
    assert {r["predicted"] for r in predictions["v1"]} == {3}
    # answer key of the samples: A is right exactly where the answer index is 0
    expected_base = sum(r["answer"] == 0 for r in predictions["base"]) / 22
    assert base["accuracy"]["micro"] == round(expected_base, 6)
    assert set(base["by_choices"]) == {"4", "5", "6", "7"} and "choices_7" in base["accuracy"]
    assert base["items_per_second"] > 0
    # the leaderboard block: kmmlu_economics + fin_market_mcq + fin_security are 금융시장, the
    # 7-choice CSV 재무회계; no stock/agent/company set here -> missing, left out of the average
    bench = base["krx_bench"]
    assert bench["categories"]["financial_market"]["items"] + bench["categories"]["accounting"]["items"] == 22
    assert bench["categories"]["stock"] == {"items": 0} and bench["averaged_over"] == 2
    assert bench["average"] == round((bench["categories"]["financial_market"]["accuracy"]
                                      + bench["categories"]["accounting"]["accuracy"]) / 2, 6)
    # open-ended: every sample question answered greedily, at most 6 new tokens, the plain
    # question as the prompt for both models; judge@ scores the file
    answers = {key: read_records(workspace / f"data/eval/{key}.open.parquet") for key in ("base", "v1")}
    assert len(answers["base"]) == len(answers["v1"]) == 8 == base["open_ended"]["items"]
    assert all(r["answer_tokens"] <= 6 and r["reference"] for r in answers["v1"])
    assert [r["id"] for r in answers["base"]] == [r["id"] for r in answers["v1"]]
    # deterministic outputs: a second run (in-process: no second interpreter start-up) writes
    # the same prediction bytes
    first = (workspace / "data/eval/base.parquet").read_bytes()
    monkeypatch.chdir(workspace)
    evaluate_main(_args("base"))
    assert (workspace / "data/eval/base.parquet").read_bytes() == first


def test_stage_fails_cleanly_when_the_adapter_is_missing(workspace: Path, monkeypatch, capsys):
    monkeypatch.chdir(workspace)
    with pytest.raises(SystemExit) as exit_info:
        evaluate_main(_args("v2"))
    assert exit_info.value.code == 2
    assert "models/v2 has no adapter_config.json" in capsys.readouterr().err
    assert not (workspace / "metrics/eval/v2.json").exists()


@pytest.mark.gpu
def test_planted_scores_match_on_gpu_in_bfloat16(tokenizer, tmp_path: Path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    base_dir = save_base(tokenizer, planted_model(tokenizer, "C"), tmp_path / "base")
    items = items_with_answers([2, 0, 2, 1], [4, 7, 7, 4])
    model, tok, info = load_model(str(base_dir), str(base_dir), "cuda", "auto")
    assert info["device"] == "cuda" and info["dtype"] == "bfloat16"
    rows = evaluate_items(items, lambda batch: score_loglik(model, tok, batch, 4), True, 0)
    assert [r["predicted"] for r in rows] == [2, 2, 2, 2]
    assert [r["correct"] for r in rows] == [True, False, True, False]


# ------------------------------------------------------------------------ each version as it answers
def test_each_model_is_scored_the_way_it_was_trained_to_answer(tokenizer, tmp_path: Path):
    """Issue 14 §3: a two-step version (lineage answer_format two_step) generates its solution,
    then answers after the step-2 prompt; a single-step one answers the step-1 prompt."""
    from stages.evaluate import EvaluateSettings, first_letter, make_scorer, trained_answer_format

    model = planted_model(tokenizer, "B")
    items = items_with_answers([1, 0, 1], [4, 4, 7])
    base = dict(local_dir=str(tmp_path), collected={"x": {"input": "x.parquet", "contest_category": "accounting"}}, batch_size=2,
                generation={"solution_max_new_tokens": 3, "letter_max_new_tokens": 1})
    cheap, full = EvaluateSettings(scoring="loglik", **base), EvaluateSettings(**base)
    assert full.scoring == "generate"  # the production default: generation for every version
    two_step = make_scorer(model, tokenizer, cheap, "two_step")(items)
    assert two_step.predicted == [1, 1, 1]
    assert two_step.detail[0]["solution"] == "BBB" and len(two_step.detail[0]["letter_logprobs"]) == 4
    single = make_scorer(model, tokenizer, cheap, "single_step")(items)
    assert single.predicted == [1, 1, 1] and "solution" not in single.detail[0]
    generated = make_scorer(model, tokenizer, full, "two_step")(items)
    assert generated.detail[0] == {"solution": "BBB", "answer_text": "B"}
    answered = make_scorer(model, tokenizer, full, "single_step")(items)
    assert answered.predicted == [1, 1, 1] and answered.detail[0] == {"answer_text": "B"}
    assert first_letter("C. 블록체인 암호화\n해설", 4) == 2 and first_letter("정답: D", 4) == 3
    assert first_letter("블록체인", 4) is None and first_letter("", 4) is None
    (tmp_path / "v6").mkdir()
    (tmp_path / "v6" / "lineage.json").write_text(json.dumps({"answer_format": "two_step"}))
    assert trained_answer_format(str(tmp_path / "v6")) == "two_step"
    assert trained_answer_format(str(tmp_path)) == "single_step"  # no lineage: the base model


def test_train_records_whether_a_version_learns_the_two_step_format():
    from stages.common.prompts import step1_prompt, step2_prompt
    from stages.train import answer_format

    def row(content: str, answer: str) -> dict:
        return {"prompt": [{"role": "user", "content": content}],
                "completion": [{"role": "assistant", "content": answer}]}

    single = [row(step1_prompt("질문?", ["a", "b", "c", "d"]), "B")]
    pairs = [row(step1_prompt("질문?", ["a", "b", "c", "d"]), "문제 분석: … 따라서 B"),
             row(step2_prompt("질문?", ["a", "b", "c", "d"], "문제 분석: … 따라서 B"), "B")]
    assert answer_format(single)["answer_format"] == "single_step" and answer_format(single)["step2_examples"] == 0
    assert answer_format(single + pairs)["answer_format"] == "two_step" and answer_format(single + pairs)["step2_examples"] == 1


# ------------------------------------------------------------------ KRX-Bench categories
def test_every_set_names_a_known_contest_category_and_make_check_says_which_does_not(tmp_path):
    from stages import check
    from stages.sources.evalsets import CONTEST_CATEGORIES
    raw = load_raw(ROOT / "params.yaml")
    sets = {**raw["evaluate"]["collected"], **raw["evaluate"]["local"]}
    assert {s["contest_category"] for s in sets.values()} == set(CONTEST_CATEGORIES)  # all five
    assert raw["evaluate"]["collected"]["stock_krx"]["input"] == "data/generated/stock/krx.parquet"
    del raw["evaluate"]["local"]["accounting_7"]["contest_category"]
    raw["evaluate"]["collected"]["stock_krx"]["contest_category"] = "stocks"
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    problems = "\n".join(check.check(path))
    assert "local.accounting_7.contest_category" in problems and "Field required" in problems
    assert "collected.stock_krx.contest_category" in problems and "'stocks'" not in problems.split(
        "collected.stock_krx.contest_category")[0]


def _row(category: str, answer: int, correct: bool, set_name: str = "s") -> dict:
    return {"set": set_name, "contest_category": category, "answer": answer, "correct": correct}


def test_krx_bench_has_majority_baselines_intervals_and_leaves_missing_categories_out():
    from stages.evaluate import krx_bench, majority_rate, wilson
    # a planted stock set: 7 "up" (A) and 3 "down" (B) keys -> always answering up scores 70%
    stock = [_row("stock", 0, k < 6) for k in range(7)] + [_row("stock", 1, False) for _ in range(3)]
    accounting = [_row("accounting", k % 4, k % 2 == 0) for k in range(8)]
    assert majority_rate(stock) == 0.7 and majority_rate(accounting) == 0.25
    bench = krx_bench(stock + accounting, {"accounting": "two_step", "stock": "single_step"})
    cats = bench["categories"]
    assert list(cats) == ["accounting", "financial_market", "company", "stock", "agent"]
    assert cats["stock"]["accuracy"] == 0.6 and cats["stock"]["majority_rate"] == 0.7
    assert cats["stock"]["ci95_low"] < 0.6 < cats["stock"]["ci95_high"]
    assert cats["accounting"]["two_step"] and not cats["stock"]["two_step"]
    # no items: shown as missing (no accuracy at all, never 0) and left out of the average
    assert cats["company"] == {"items": 0} and cats["agent"] == {"items": 0}
    assert bench["averaged_over"] == 2 and bench["average"] == round((0.6 + 0.5) / 2, 6)
    assert krx_bench([], {})["average"] is None
    low, high = wilson(0, 20)  # sound at the edges, where the normal interval collapses
    assert low == 0.0 and 0.1 < high < 0.2 and wilson(20, 20)[1] == 1.0


def test_each_category_is_scored_in_the_format_the_version_learned_for_it(tmp_path):
    from stages.evaluate import category_formats, score_by_category
    source_categories = load_evaluate(None, ROOT / "params.yaml").source_categories
    v7 = tmp_path / "v7"
    v7.mkdir()
    # v7 continued v6: the generated finance pairs taught two-step, stock and agent a letter
    (v7 / "lineage.json").write_text(json.dumps({"answer_format": "two_step", "formats_by_source": {
        "generated_financial_market": "two_step", "generated_accounting": "two_step",
        "stock_krx": "single_step", "agent_krx": "single_step", "qa_rules": "single_step"}}))
    formats = category_formats(str(v7), source_categories)
    assert formats == {"accounting": "two_step", "financial_market": "two_step",
                       "company": "single_step", "stock": "single_step", "agent": "single_step"}
    assert set(category_formats(str(tmp_path), source_categories).values()) == {"single_step"}  # base
    (tmp_path / "old").mkdir()  # a lineage from before per-source formats: its one format
    (tmp_path / "old" / "lineage.json").write_text(json.dumps({"answer_format": "two_step"}))
    assert set(category_formats(str(tmp_path / "old"), source_categories).values()) == {"two_step"}

    items = [EvalItem("kmmlu_economics", "e1", "질문 1", ("가", "나", "다", "라"), 1, "", "financial_market"),
             EvalItem("stock_krx", "s1", "오를까?", ("상승", "하락"), 0, "", "stock"),
             EvalItem("agent_krx", "a1", "코드?", ("df.head()", "df.tail()", "df.sum()"), 2, "", "agent")]
    seen = {}

    def scorer_for(fmt):
        def score(batch):  # two-step answers B, the letter scorer A; records who scored what
            seen.setdefault(fmt, []).extend(i.id for i in batch)
            return Scored([1 if fmt == "two_step" else 0] * len(batch))
        return score
    rows = score_by_category(items, formats, scorer_for, shuffled=False, seed=0)
    assert [r["id"] for r in rows] == ["e1", "s1", "a1"]  # the items' order, whatever the groups
    assert seen == {"two_step": ["e1"], "single_step": ["s1", "a1"]}
    assert [(r["answer_format"], r["correct"]) for r in rows] == [
        ("two_step", True), ("single_step", True), ("single_step", False)]


def test_train_records_per_source_formats_and_keeps_what_the_parent_learned():
    from stages.common.prompts import step2_prompt
    from stages.train import answer_format

    def row(source: str, content: str) -> dict:
        return {"source": source, "prompt": [{"role": "user", "content": content}],
                "completion": [{"role": "assistant", "content": "B"}]}
    q, c = "질문?", ["a", "b", "c", "d"]
    parent = {"formats_by_source": {"generated_accounting": "two_step", "krx_sample": "single_step"}}
    rows = [row("stock_krx", step1_prompt(q, c)), row("generated_accounting", step1_prompt(q, c)),
            row("generated_financial_market", step2_prompt(q, c, "풀이 … 따라서 B"))]
    got = answer_format(rows, parent)
    assert got["formats_by_source"] == {"generated_accounting": "two_step", "generated_financial_market": "two_step",
                                        "krx_sample": "single_step", "stock_krx": "single_step"}
    assert got["answer_format"] == "two_step" and got["step2_examples"] == 1


def test_the_reject_rate_counts_the_open_ended_rows_it_rejects_among(tmp_path):
    """An open-ended duplicate is one reject among every row read, MCQ and open-ended."""
    import logging
    from stages.evaluate import settle_rejects
    from stages.common.schema import reject
    items = [EvalItem("s", f"i{k}", f"질문 {k}", ("가", "나"), 0, "", "stock") for k in range(18)]
    rejects = [reject("evaluate", "finance_open", "line 3", "duplicate", "the question repeats")]
    settings = _settings(max_reject_rate=0.04)
    log = logging.getLogger("test")
    settle_rejects("v1", items, rejects, settings, str(tmp_path / "r.parquet"), log, open_items=10)  # 1 of 29
    with pytest.raises(StageError, match="reject"):
        settle_rejects("v1", items, rejects, settings, str(tmp_path / "r.parquet"), log)  # 1 of 19
