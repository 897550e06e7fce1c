"""train@<version>: QLoRA SFT on a tiny Qwen2 (real bitsandbytes 4-bit + adamw_8bit on CPU,
real peft/trl), chained versions, lineage and model card, eos in the loss mask, DDP (gloo)."""
from __future__ import annotations

import csv
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from stages.base_model import build_tiny_model, build_tokenizer, save_base
from stages.common.io import write_json, write_records
from stages.common.params import ParamsError, load_raw
from stages.common.runlog import StageError
from stages.common.schema import SCHEMAS
from stages.train import load_params as load_train_params
from stages.train import (COMPLETE_MARKER, RUN_FILE, TrainParams, resolve_train, attach_adapter, build_trainer,
                          check_bitsandbytes, find_resume_checkpoint, load_base_model,
                          measure_examples, split_examples)
from tests.conftest import ROOT, run_stage

QUESTIONS = [("삼성전자의 시장은?", "코스피"), ("PER의 뜻은?", "주가수익비율"),
             ("채권 가격과 금리는?", "반대로 움직인다"), ("ETF는 무엇인가?", "상장지수펀드")]
DEFAULTS = {
    "quant": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
              "bnb_4bit_compute_dtype": "bfloat16", "bnb_4bit_quant_storage": "uint8"},
    "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
             "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
             "bias": "none", "task_type": "CAUSAL_LM"},
    "sft": {"per_device_train_batch_size": 2, "per_device_eval_batch_size": 2,
            "gradient_accumulation_steps": 1, "learning_rate": 2.0e-2, "lr_scheduler_type": "constant",
            "warmup_steps": 0, "num_train_epochs": 1, "max_steps": 8, "max_length": 256,
            "optim": "adamw_8bit", "bf16": True, "gradient_checkpointing": True,
            "gradient_checkpointing_kwargs": {"use_reentrant": False}, "logging_steps": 1,
            "save_steps": 4, "save_total_limit": 1, "seed": 0, "completion_only_loss": True},
    "resume": True, "processes": 1, "max_reject_rate": 0.5, "accelerate_config": "cpu_ddp.yaml",
}


def _example(i: int, question: str, answer: str, split: str = "train") -> dict:
    return {"id": f"ex{i}", "version": "v1", "source": "toy", "split": split,
            "prompt": [{"role": "user", "content": question}],
            "completion": [{"role": "assistant", "content": answer}]}


def _params_yaml(ws: Path, **train_overrides) -> None:
    train = {"v1": {"init_from": "base"}, "v3": {"init_from": "v1"}}
    for version, extra in train_overrides.items():
        train[version] = {**train.get(version, {}), **extra}
    versions = {v: {"train": spec} for v, spec in train.items()}
    (ws / "params.yaml").write_text(yaml.safe_dump({"train_defaults": DEFAULTS, "versions": versions}),
                                    encoding="utf-8")


def _args(version: str, init_from: str) -> list[str]:
    return [version, "--mixture", f"data/mixtures/{version}.parquet",
            "--manifest", f"data/mixtures/{version}.json", "--base", "models/base",
            "--init-from", init_from, "--out", f"models/{version}",
            "--checkpoints", f"checkpoints/{version}", "--live-dir", f"dvclive/train/{version}",
            "--rejects", f"data/rejects/train/{version}.parquet",
            "--metrics", f"metrics/train/{version}.json", "--log", f"logs/train/{version}.log"]


@pytest.fixture(scope="module")
def tokenizer():
    texts = [q + " " + a for q, a in QUESTIONS] * 10 + ["You are a helpful assistant. system user"] * 10
    return build_tokenizer(texts, 400)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tokenizer) -> Path:
    """A workspace with a tiny base, toy mixtures for v1 (repeated set + dev) and v3, params."""
    ws = tmp_path_factory.mktemp("train_ws")
    model = build_tiny_model(tokenizer, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=128, initializer_range=0.3, seed=0)
    save_base(str(ws / "models" / "base"), tokenizer, model,
              {"model": "models/base", "revision": "local", "built": True,
               "tokenizer": "tiny-test (BPE trained on the corpus)"})
    rows = [_example(i, q, a) for i, (q, a) in enumerate(QUESTIONS * 2)]
    rows += [_example(100, "채권 가격과 금리는?", "반대로 움직인다", "dev"),
             _example(101, "질문 " * 400, "너무 긴 프롬프트")]  # prompt > max_length: rejected
    for version in ("v1", "v3"):
        mixture = [dict(r, version=version) for r in rows]
        write_records(mixture, SCHEMAS["example"], ws / "data" / "mixtures" / f"{version}.parquet")
        write_json({"version": version, "examples": len(mixture)},
                   ws / "data" / "mixtures" / f"{version}.json")
    (ws / "cpu_ddp.yaml").write_text((ROOT / "configs/accelerate/cpu_ddp.yaml").read_text())
    _params_yaml(ws)
    return ws


@pytest.fixture(scope="module")
def trained_v1(workspace: Path) -> Path:
    done = run_stage("train", _args("v1", "models/base"), workspace)
    assert done.returncode == 0, done.stderr[-3000:]
    return workspace


def _resolved(version: str, init_from: str) -> TrainParams:
    return resolve_train(DEFAULTS, {"init_from": Path(init_from).name}, version)


# ------------------------------------------------------------------------ the stage
def test_v1_leaves_adapter_tokenizer_lineage_card_and_metrics(trained_v1: Path):
    out = trained_v1 / "models" / "v1"
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json",
                 "training_config.json", "lineage.json", "README.md"):
        assert (out / name).is_file(), name
    lineage = json.loads((out / "lineage.json").read_text(encoding="utf-8"))
    assert lineage["version"] == "v1" and lineage["parent"] is None
    assert lineage["base_model"]["model"] == "models/base" and lineage["base_model"]["built"] is True
    assert len(lineage["mixture"]["manifest_sha256"]) == 64 and len(lineage["mixture"]["sha256"]) == 64
    assert lineage["params"]["lora"]["r"] == 8 and lineage["params"]["sft"]["optim"] == "adamw_8bit"
    assert lineage["steps"] == 8 and lineage["tokens_seen"] > 0 and lineage["train_seconds"] > 0
    assert lineage["examples"] == {"train": 8, "dev": 1, "rejected": 1}
    assert lineage["dataset_tokens"] > lineage["completion_tokens"] > 0
    # what each mix source taught, by the source name the mixture records (evaluate scores each
    # contest category in the format of its sources)
    assert lineage["formats_by_source"] == {"toy": "single_step"}
    card = (out / "README.md").read_text(encoding="utf-8")
    for fact in ("base_model: models/base", "the base model (new adapter)", lineage["adapter_sha256"],
                 "adamw_8bit", "4-bit nf4 + double quant", f"| tokens seen | {lineage['tokens_seen']} |",
                 "tiny-test (BPE trained on the corpus)"):
        assert fact in card, fact
    metrics = json.loads((trained_v1 / "metrics/train/v1.json").read_text(encoding="utf-8"))
    for field in ("final_loss", "train_seconds", "tokens_per_second", "peak_memory_mb",
                  "dataset_tokens", "tokenizer", "eval_loss"):
        assert metrics[field] is not None, field
    assert metrics["rejected"] == 1 and metrics["trainable_parameters"] > 0
    # the resumable checkpoints are gone once the adapter is in models/v1; the run is recorded
    run = json.loads((trained_v1 / "checkpoints/v1" / RUN_FILE).read_text(encoding="utf-8"))
    assert run["complete"] is True and not list((trained_v1 / "checkpoints/v1").glob("checkpoint-*"))
    assert not (trained_v1 / "dvclive" / "train" / "v1" / "dvc.yaml").exists()  # plots live in dvc.yaml


def test_loss_falls_on_the_repeated_toy_set(trained_v1: Path):
    with open(trained_v1 / "dvclive/train/v1/plots/metrics/loss.tsv", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    steps = [int(r["step"]) for r in rows]
    losses = [float(r["loss"]) for r in rows]
    assert steps == list(range(1, 9))  # x = global step, one point per logging step
    assert losses[-1] < losses[0] * 0.5  # e.g. 10.0 -> 1.0 in 8 steps


def test_the_4bit_base_loaded_for_cpu_training_has_bitsandbytes_inference_repack_off(workspace, monkeypatch):
    """Whatever this CPU has: with AVX512-BF16 reported, every Linear4bit would repack its
    weights the first time it ran in eval mode without grad; the model train loads has that
    off on every 4-bit layer (the test below shows why, on a CPU that has it)."""
    import bitsandbytes.nn.modules as bnb_modules

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    info = json.loads((workspace / "models/base/base.json").read_text(encoding="utf-8"))
    model = load_base_model(str(workspace / "models/base"), info, _resolved("v1", "models/base"), "v1")
    layers = [m for m in model.modules() if isinstance(m, bnb_modules.Linear4bit)]
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)


def test_evaluating_during_4bit_cpu_training_does_not_break_training(workspace: Path, tmp_path: Path):
    """``eval_strategy: steps`` on a 4-bit model on the CPU: bitsandbytes' inference repack (on
    CPUs with AVX512-BF16) used to turn the weights into a layout the next training step failed
    on, halfway through the run. The run finishes, logs its dev loss at each evaluation, and
    the training curve is the one of the same run without evaluation."""
    curves = {}
    for name, extra in (("plain", {}), ("evaluated", {"eval_strategy": "steps", "eval_steps": 2})):
        ws = tmp_path / name
        shutil.copytree(workspace, ws, ignore=shutil.ignore_patterns("dvclive", "checkpoints",
                                                                     "metrics", "logs"))
        for trained in (ws / "models").glob("v*"):  # what other tests trained there
            shutil.rmtree(trained)
        _params_yaml(ws, v1={"sft": {"max_steps": 6, **extra}})
        done = run_stage("train", _args("v1", "models/base"), ws)
        assert done.returncode == 0, done.stderr[-3000:]
        live = ws / "dvclive/train/v1/plots/metrics"
        curves[name] = (live / "loss.tsv").read_text(encoding="utf-8")
    evals = (tmp_path / "evaluated/dvclive/train/v1/plots/metrics/eval/loss.tsv").read_text(encoding="utf-8")
    # at steps 2, 4, 6, then the stage's own dev evaluation after the last step
    assert [line.split("\t")[0] for line in evals.splitlines()[1:]] == ["2", "4", "6", "6"]
    assert curves["evaluated"] == curves["plain"]
    # each logging step is a line of the stage's log, not a printed dict
    log = (tmp_path / "evaluated/logs/train/v1.log").read_text(encoding="utf-8")
    steps = re.findall(r"step (\d)/6 \(epoch [\d.]+\): loss ([\d.]+), lr \S+, grad norm \S+, "
                       r"([\d,]+) tokens seen", log)
    assert [s[0] for s in steps] == ["1", "2", "3", "4", "5", "6"]
    assert [s[1] for s in steps] == [f"{float(line.split(chr(9))[1]):.4f}"
                                     for line in curves["evaluated"].splitlines()[1:]]
    assert re.findall(r"step (\d)/6 \(epoch [\d.]+\): dev loss", log) == ["2", "4", "6", "6"]
    assert "{'loss'" not in done.stdout + done.stderr


def test_chained_version_starts_from_the_parent_adapter(trained_v1: Path):
    params = _resolved("v3", "models/v1")
    assert params.parent == "v1"
    parent_dir = trained_v1 / "models" / "v1"
    info = json.loads((trained_v1 / "models/base/base.json").read_text(encoding="utf-8"))
    model = load_base_model(str(trained_v1 / "models/base"), info, params, "v3")
    peft_model = attach_adapter(model, params, str(parent_dir), "v3")
    from peft import get_peft_model_state_dict
    before_first_step = get_peft_model_state_dict(peft_model)
    saved = load_file(parent_dir / "adapter_model.safetensors")
    assert set(before_first_step) == set(saved)
    assert all(torch.equal(before_first_step[k].float(), saved[k].float()) for k in saved)
    assert any(p.requires_grad for p in peft_model.parameters())
    assert any(saved[k].abs().sum() > 0 for k in saved if "lora_B" in k)  # v1 actually trained B

    done = run_stage("train", _args("v3", "models/v1"), trained_v1)
    assert done.returncode == 0, done.stderr[-3000:]
    lineage = json.loads((trained_v1 / "models/v3/lineage.json").read_text(encoding="utf-8"))
    v1 = json.loads((parent_dir / "lineage.json").read_text(encoding="utf-8"))
    assert lineage["parent"] == {"version": "v1", "path": "models/v1",
                                 "adapter_sha256": v1["adapter_sha256"]}
    assert lineage["adapter_sha256"] != v1["adapter_sha256"]  # it trained further
    # it starts where v1 ended: on the examples v1 measured its end loss on (saved beside its
    # adapter), v3's starting weights give that loss; the base on v3's own examples differs
    sample = json.loads((parent_dir / "loss_sample.json").read_text(encoding="utf-8"))
    assert len(sample) == v1["examples"]["train"] and v1["end_loss"] is not None
    assert lineage["parent_end_loss"] == v1["end_loss"]
    assert lineage["start_loss_on_parent"] == pytest.approx(v1["end_loss"], rel=0.02)
    assert lineage["start_loss"] != lineage["start_loss_base"]
    assert v1["start_loss_base"] is None and v1["start_loss"] > v1["end_loss"]  # v1 learnt
    assert "`v1` (adapter sha256" in (trained_v1 / "models/v3/README.md").read_text(encoding="utf-8")


# ------------------------------------------------------------------------ loss mask
def test_eos_is_inside_the_loss_mask_and_pad_is_not(tokenizer):
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    model = build_tiny_model(tokenizer, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             num_key_value_heads=1, intermediate_size=64)
    params = _resolved("v1", "models/base").model_copy(update={
        "quant": _resolved("v1", "models/base").quant.model_copy(update={"load_in_4bit": False})})
    peft_model = attach_adapter(model, params, "models/base", "v1")
    rows = [{"id": "a", **{k: v for k, v in _example(0, "짧은 질문", "긴 답변 입니다 정말로").items()
                          if k in ("prompt", "completion")}},
            {"id": "b", **{k: v for k, v in _example(1, "훨씬 더 긴 질문 입니다 " * 3, "답").items()
                          if k in ("prompt", "completion")}}]
    import tempfile
    with tempfile.TemporaryDirectory() as out:
        trainer = build_trainer(peft_model, tokenizer, rows, [], params, out)
        batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    for ids, labels, mask in zip(batch["input_ids"].tolist(), batch["labels"].tolist(),
                                 batch["attention_mask"].tolist()):
        trained = [i for i, label in zip(ids, labels) if label != -100]
        text = tokenizer.decode(trained)
        assert eos in trained and text.count("<|im_end|>") == 1  # the answer's eos, not the prompt's
        assert "<|im_start|>assistant" not in text and "user" not in text  # prompt masked
        padded = [label for label, m in zip(labels, mask) if m == 0]
        assert all(label == -100 for label in padded)
        assert all(i == pad for i, m in zip(ids, mask) if m == 0)
    assert (batch["attention_mask"] == 0).any()  # the two rows did need padding


def test_on_qwen2s_vocabulary_every_answer_token_and_its_eos_are_labelled_and_nothing_else():
    """The completion-only labels of a training example, through build_trainer (trl's own
    tokenization and collator), on the real Qwen2 tokenizer: exactly the answer's tokens, its
    <|im_end|> and the template's closing newline."""
    from stages.base_model import build_qwen2_tokenizer

    qwen2, _ = build_qwen2_tokenizer()
    model = build_tiny_model(qwen2, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             num_key_value_heads=1, intermediate_size=64)
    params = _resolved("v1", "models/base").model_copy(update={
        "quant": _resolved("v1", "models/base").quant.model_copy(update={"load_in_4bit": False})})
    peft_model = attach_adapter(model, params, "models/base", "v1")
    answers = ["문제 분석: 영업이익률 = 영업이익 / 매출액 = 12.5%. 따라서 정답은 C", "B"]
    rows = [{"prompt": [{"role": "user", "content": f"질문 {i}?\n### 정답:"}],
             "completion": [{"role": "assistant", "content": a}]} for i, a in enumerate(answers)]
    import tempfile
    with tempfile.TemporaryDirectory() as out:
        trainer = build_trainer(peft_model, qwen2, rows, [], params, out)
        batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    for answer, ids, labels in zip(answers, batch["input_ids"].tolist(), batch["labels"].tolist()):
        trained = [label for label in labels if label != -100]
        assert trained == qwen2(answer, add_special_tokens=False).input_ids + [151645, 198]
        assert all(i == label for i, label in zip(ids, labels) if label != -100)


# ------------------------------------------------------------------------ pure parts
def test_split_and_measure_reject_bad_examples(tokenizer):
    records = [_example(0, "q", "a"), _example(1, "q2", "a2", "dev"),
               dict(_example(2, "q3", "a3"), completion=[]),
               _example(3, "긴 " * 300, "a")]
    train, dev, rejects = split_examples(records, "v1")
    assert [r["id"] for r in train] == ["ex0", "ex3"] and [r["id"] for r in dev] == ["ex1"]
    assert {r["source"] for r in train + dev} == {"toy"}
    assert [r["reason"] for r in rejects] == ["invalid_example"]
    kept, too_long, counts = measure_examples(tokenizer, train, 128, "v1")
    assert [r["id"] for r in kept] == ["ex0"] and too_long[0]["reason"] == "prompt_too_long"
    prompt = tokenizer.apply_chat_template(train[0]["prompt"], add_generation_prompt=True,
                                           return_dict=True)["input_ids"]
    assert counts["tokens"] > counts["completion_tokens"] > 0
    assert counts["tokens"] - counts["completion_tokens"] == len(prompt)


def test_resume_only_from_a_complete_checkpoint_of_the_same_run(tmp_path: Path):
    root = tmp_path / "ckpt"
    assert find_resume_checkpoint(root, "fp") is None
    root.mkdir()
    write_json({"fingerprint": "fp", "complete": False}, root / RUN_FILE)
    for step, complete in ((2, True), (4, True), (6, False)):  # 6 was killed mid-save
        (root / f"checkpoint-{step}").mkdir()
        if complete:
            (root / f"checkpoint-{step}" / COMPLETE_MARKER).write_text("")
    assert find_resume_checkpoint(root, "fp") == root / "checkpoint-4"
    assert find_resume_checkpoint(root, "other inputs or params") is None
    write_json({"fingerprint": "fp", "complete": True}, root / RUN_FILE)
    assert find_resume_checkpoint(root, "fp") is None  # a finished run is not resumed


def test_params_resolve_defaults_and_chains():
    params = _resolved("v3", "models/v1")
    assert params.parent == "v1" and params.sft.learning_rate == 2.0e-2
    override = resolve_train(DEFAULTS, {"init_from": "base", "sft": {"learning_rate": 1e-4},
                                        "lora": {"r": 4}}, "v4")
    assert override.sft.learning_rate == 1e-4 and override.lora.r == 4 and override.parent is None
    assert override.sft.max_steps == DEFAULTS["sft"]["max_steps"]  # merged key by key
    with pytest.raises(ParamsError, match="versions.v4.train.sft.learning_rat: unknown key"):
        resolve_train(DEFAULTS, {"init_from": "base", "sft": {"learning_rat": 1e-4}}, "v4")
    with pytest.raises(ParamsError, match="use_reentrant"):
        resolve_train(DEFAULTS, {"init_from": "base", "sft": {"gradient_checkpointing_kwargs": {"use_reentrant": True}}}, "v4")
    # production params: the nine versions, the four chains
    raw = load_raw(ROOT / "params.yaml")
    chains = {v: load_train_params(v, ROOT / "params.yaml").parent for v in raw["versions"]}
    assert chains == {"v1": None, "v2": None, "v3": "v1", "v4": None, "v5_1": None,
                      "v5_2": "v5_1", "v5_3": "v5_2", "v6": None, "v7": "v6"}
    defaults = load_train_params("v1", ROOT / "params.yaml")
    assert (defaults.sft.per_device_train_batch_size, defaults.sft.max_length,
            defaults.sft.learning_rate, defaults.sft.optim) == (2, 2048, 1e-4, "adamw_8bit")
    assert defaults.quant.load_in_4bit and defaults.quant.bnb_4bit_quant_type == "nf4"


# ------------------------------------------------------------------------ clear errors
def test_clear_errors_for_missing_base_parent_and_bitsandbytes(workspace: Path, monkeypatch):
    empty = workspace.parent / "empty_ws"
    empty.mkdir(exist_ok=True)
    (empty / "params.yaml").write_text((workspace / "params.yaml").read_text())
    done = run_stage("train", _args("v1", "models/base"), empty)
    assert done.returncode == 2 and "does not exist (run mix@v1 first" in done.stderr
    assert "Traceback" not in done.stderr

    params = _resolved("v3", "models/v1")
    with pytest.raises(StageError, match="has no adapter"):
        attach_adapter(torch.nn.Linear(2, 2), params, str(empty / "models/v1"), "v3")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    with pytest.raises(StageError, match="quant.load_in_4bit, sft.optim=adamw_8bit needs bitsandbytes"):
        check_bitsandbytes(params, cuda=False, key="v3")


def test_chained_version_with_other_lora_shape_is_refused(trained_v1: Path):
    params = resolve_train(DEFAULTS, {"init_from": "v1", "lora": {"r": 4}}, "v3")
    info = json.loads((trained_v1 / "models/base/base.json").read_text(encoding="utf-8"))
    model = load_base_model(str(trained_v1 / "models/base"), info, params, "v3")
    with pytest.raises(StageError, match=r"\['r'\] differ from the parent adapter"):
        attach_adapter(model, params, str(trained_v1 / "models/v1"), "v3")


# ------------------------------------------------------------------------ DDP
@pytest.mark.slow
def test_ddp_two_cpu_processes(workspace: Path):
    ws = workspace.parent / "ddp_ws"
    if ws.exists():
        import shutil
        shutil.rmtree(ws)
    import shutil
    shutil.copytree(workspace, ws, ignore=shutil.ignore_patterns("models", "checkpoints", "dvclive",
                                                                 "metrics", "logs"))
    shutil.copytree(workspace / "models" / "base", ws / "models" / "base")
    _params_yaml(ws, v1={"processes": 2, "sft": {"max_steps": 4, "save_steps": 2}})
    done = run_stage("train", _args("v1", "models/base"), ws)
    assert done.returncode == 0, done.stderr[-4000:]
    metrics = json.loads((ws / "metrics/train/v1.json").read_text(encoding="utf-8"))
    lineage = json.loads((ws / "models/v1/lineage.json").read_text(encoding="utf-8"))
    assert metrics["processes"] == 2 and lineage["processes"] == 2
    assert lineage["steps"] == 4 and (ws / "models/v1/adapter_model.safetensors").is_file()


# ------------------------------------------------------------------------ GPU bench, CPU path
@pytest.mark.slow
def test_gpu_bench_runs_on_cpu_with_the_tiny_shape(tmp_path: Path):
    import subprocess
    done = subprocess.run([sys.executable, str(ROOT / "bench/train_gpu.py"), "--tiny", "--steps", "2",
                           "--warmup", "1", "--seq-len", "64", "--cache-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    baseline = rows[0]
    assert baseline["variant"] == "baseline" and baseline["tokens_per_s"] > 0
    assert baseline["tokens"] > 0 and baseline["parameters"] > 0
    assert {r["variant"] for r in rows} == {"baseline", "packing", "liger"}  # ran or said why not
    assert "| baseline |" in done.stdout


def test_a_resumed_run_continues_the_dvclive_curve_of_its_checkpoint(tmp_path: Path):
    """--live-dir is a plain DVC out (removed before a run, restorable from the run-cache), so
    each checkpoint carries the curve up to its step and a resume puts it back."""
    from types import SimpleNamespace

    from stages.train import CheckpointMarker, LIVE_COPY, restore_live

    live = tmp_path / "dvclive" / "train" / "v1"
    (live / "plots" / "metrics").mkdir(parents=True)
    curve = "step\tloss\n1\t9.0\n2\t8.0\n"
    (live / "plots" / "metrics" / "loss.tsv").write_text(curve, encoding="utf-8")
    checkpoints = tmp_path / "checkpoints" / "v1"
    (checkpoints / "checkpoint-2").mkdir(parents=True)
    marker = CheckpointMarker(str(live))
    marker.on_save(SimpleNamespace(output_dir=str(checkpoints)),
                   SimpleNamespace(is_world_process_zero=True, global_step=2), None)
    saved = checkpoints / "checkpoint-2"
    assert (saved / COMPLETE_MARKER).is_file()
    assert (saved / LIVE_COPY / "plots/metrics/loss.tsv").read_text(encoding="utf-8") == curve
    # the run goes on past the checkpoint, is killed; DVC removes the out before the re-run
    (live / "plots" / "metrics" / "loss.tsv").write_text(curve + "3\t7.0\n", encoding="utf-8")
    shutil.rmtree(live)
    restore_live(saved, str(live))
    assert (live / "plots/metrics/loss.tsv").read_text(encoding="utf-8") == curve
    assert find_resume_checkpoint(checkpoints, "fp") is None  # no run record: not resumable


def test_adapter_master_weights_stay_fp32_so_a_1e_5_update_is_not_rounded_away(trained_v1: Path, tmp_path: Path):
    """trl casts a 4-bit model's LoRA weights to bf16, where 0.012 + 1e-5 == 0.012; build_trainer
    upcasts them back before the optimizer exists. v3 continues v1's trained adapter (lora_B is
    no longer zero): one adamw_8bit step at lr 1e-5 (Adam's first step moves each weight with a
    gradient by about lr) changes lora_B."""
    from transformers import AutoTokenizer

    params = _resolved("v3", "models/v1")
    params = params.model_copy(update={"sft": params.sft.model_copy(update={
        "learning_rate": 1e-5, "max_steps": 1, "save_steps": 100, "bf16": True})})
    base = trained_v1 / "models/base"
    info = json.loads((base / "base.json").read_text(encoding="utf-8"))
    model = load_base_model(str(base), info, params, "v3")
    peft_model = attach_adapter(model, params, str(trained_v1 / "models/v1"), "v3")
    rows = [{"prompt": _example(i, q, a)["prompt"], "completion": _example(i, q, a)["completion"]}
            for i, (q, a) in enumerate(QUESTIONS)]
    trainer = build_trainer(peft_model, AutoTokenizer.from_pretrained(base), rows, [], params,
                            str(tmp_path / "out"))
    lora = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert lora and all(p.dtype == torch.float32 for p in lora.values())
    name = max((n for n in lora if "lora_B" in n), key=lambda n: lora[n].abs().mean().item())
    before = lora[name].detach().clone()
    lost = ((before.bfloat16() + 1e-5) == before.bfloat16()).float().mean().item()
    assert lost > 0.9  # in bf16 nearly every weight of this matrix would not move
    trainer.train()
    after = dict(trainer.model.named_parameters())[name].detach()
    changed = (after - before).abs()
    assert changed.max().item() > 5e-6 and (changed > 0).float().mean().item() > 0.5


def _raw_rows() -> list[dict]:
    return [{"prompt": _example(i, q, a)["prompt"], "completion": _example(i, q, a)["completion"]}
            for i, (q, a) in enumerate(QUESTIONS)]


def test_the_columns_handed_to_trl_are_trls_own_tokenization(tokenizer, tmp_path: Path):
    """build_trainer hands trl pre-tokenized columns (trl's own map would pickle the whole
    tokenizer to fingerprint it); they give exactly the input ids and labels trl makes from the
    raw prompt/completion rows."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model = build_tiny_model(tokenizer, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             num_key_value_heads=1, intermediate_size=64)
    params = _resolved("v1", "models/base")
    params = params.model_copy(update={"quant": params.quant.model_copy(update={"load_in_4bit": False})})
    ours = build_trainer(attach_adapter(model, params, "models/base", "v1"), tokenizer, _raw_rows(),
                         [], params, str(tmp_path / "ours"))
    config = SFTConfig(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True,
                       max_length=params.sft.max_length, completion_only_loss=True)
    theirs = SFTTrainer(model=build_tiny_model(tokenizer, hidden_size=32, num_hidden_layers=1,
                                               num_attention_heads=2, num_key_value_heads=1,
                                               intermediate_size=64),
                        args=config, processing_class=tokenizer,
                        train_dataset=Dataset.from_list(_raw_rows()))
    for column in ("input_ids", "labels"):
        assert ours.train_dataset[column] == theirs.train_dataset[column], column
    assert any(label != -100 for row in ours.train_dataset["labels"] for label in row)


def test_on_cpu_trl_scores_only_the_labelled_positions_and_the_loss_is_unchanged(tokenizer, monkeypatch):
    """fit_fused_lm_head_to_cpu makes trl's fused lm_head skip the prompt positions on CPU (as
    it does on CUDA) and project the vocabulary in CPU_LOGPROB_CHUNK-wide tiles; the loss and
    its gradient are those of trl's own choices (every position, 32,768-wide tiles)."""
    import trl.trainer.utils as trl_utils
    from trl.kernels.chunked_logprob import _use_triton as original

    import stages.train
    from stages.train import fit_fused_lm_head_to_cpu

    model = build_tiny_model(tokenizer, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             num_key_value_heads=1, intermediate_size=64)
    params = _resolved("v1", "models/base")
    params = params.model_copy(update={"quant": params.quant.model_copy(update={"load_in_4bit": False})})
    import tempfile
    with tempfile.TemporaryDirectory() as out:
        trainer = build_trainer(attach_adapter(model, params, "models/base", "v1"), tokenizer,
                                _raw_rows(), [], params, out)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(QUESTIONS))])

    def loss_and_grad() -> tuple[float, torch.Tensor]:
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, dict(batch))
        loss.backward()
        grad = next(p.grad for n, p in trainer.model.named_parameters() if "lora_A" in n)
        return loss.item(), grad.clone()

    monkeypatch.setattr(trl_utils, "_use_triton", original)      # trl's choices: every position,
    monkeypatch.setattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", 32768)  # GPU-sized tiles
    every_loss, every_grad = loss_and_grad()
    # this tokenizer has 400 tokens: tiles of 96 (the last one partial) stand for 2,048 of 151,646
    monkeypatch.setattr(stages.train, "CPU_LOGPROB_CHUNK", 96)
    assert fit_fused_lm_head_to_cpu() is True
    assert fit_fused_lm_head_to_cpu() is False                    # idempotent
    assert trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE == 96
    compact_loss, compact_grad = loss_and_grad()
    assert compact_loss == pytest.approx(every_loss, rel=1e-5)
    assert torch.allclose(compact_grad, every_grad, rtol=1e-4, atol=1e-7)
