"""train@<version>: LoRA SFT of one model version -> models/<version>/ (QLoRA by default).

Contract:
- inputs: the mixture ``data/mixtures/<version>.parquet`` (trl conversational prompt-completion
  examples, ``split`` train/dev) and its manifest ``<version>.json``; the base model directory
  ``models/base/`` (tokenizer + ``base.json`` naming the weights); ``--init-from``: the base
  (root versions) or the parent version's ``models/<parent>/`` adapter (v3 <- v1, v5_2 <- v5_1,
  v5_3 <- v5_2), loaded with ``is_trainable=True``.
- params: ``versions.<version>.train`` merged onto ``train_defaults`` (:func:`resolve_train`);
  ``quant``/``lora``/``sft`` map one-to-one onto BitsAndBytesConfig / LoraConfig / SFTConfig.
- training: trl SFTTrainer, loss on the completion only (the eos ``<|im_end|>`` closing the
  answer is part of the completion, pad ``<|endoftext|>`` is not), the tokenizer and chat
  template of ``models/base`` (the ones evaluation uses), non-reentrant gradient checkpointing.
  More than one process: the stage relaunches itself under ``accelerate launch``.
- outputs: ``models/<version>/`` (adapter, tokenizer, training_config.json, lineage.json —
  with ``answer_format``: ``two_step`` when the mixture holds step-2 examples, so evaluate
  scores the version the way it answers —, README.md model card), ``metrics/train/<version>.json``, dvclive loss curves under
  ``--live-dir``, rejects. Resumable checkpoints go to ``--checkpoints``, scratch space that is
  not a DVC out (so the stage stays restorable from DVC's run-cache): an interrupted run resumes
  from its last complete checkpoint, dvclive curve included, when the fingerprint of its inputs
  and params is unchanged; otherwise it starts afresh.
- rejects: examples that fail the example schema, have a split other than train/dev, or whose
  prompt alone fills ``max_length`` (no answer token would be trained).
- fails (exit 2, one line): missing base/parent/mixture, 4-bit or adamw_8bit without a usable
  bitsandbytes, an adapter that does not match the LoRA params, no trainable parameters,
  a reject rate above ``max_reject_rate``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import resource
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import Field, model_validator

from stages.common.chat import answer_loss, chat_ids, tokenized_example
from stages.common.io import atomic_dir, dumps_json, read_records, write_json, write_records, write_text
from stages.common.params import (PARAMS_FILE, ParamsError, Strict, deep_merge, load_raw, lookup,
                                  origin_locator, validate_params)
from stages.common.prompts import ANSWER_MARKER
from stages.common.runlog import (StageError, Timer, check_reject_rate, run_and_exit, setup_logging, stage_main,
                                  stage_parser, write_metrics)
from stages.common.schema import SCHEMAS, reject, validate
from stages.common.text import file_sha256

PARAMS = ("versions.{key}.train", "train_defaults")
STAGE = "train"
RUN_FILE = "run.json"          # fingerprint of the run the checkpoints belong to
COMPLETE_MARKER = "COMPLETE"   # written after a checkpoint is fully saved
LIVE_COPY = "dvclive"          # in a checkpoint: the dvclive curve up to its step
ADAPTER_FILE = "adapter_model.safetensors"
LAUNCHED_ENV = "KRX_TRAIN_LAUNCHED"  # set for the processes `accelerate launch` starts
SPLITS = ("train", "dev")


# ------------------------------------------------------------------------ params
class QuantParams(Strict):
    """-> ``transformers.BitsAndBytesConfig(**quant)``; ``load_in_4bit: false`` trains in
    full precision (no bitsandbytes needed for the weights)."""
    load_in_4bit: bool
    bnb_4bit_quant_type: Literal["nf4", "fp4"]
    bnb_4bit_use_double_quant: bool
    bnb_4bit_compute_dtype: Literal["bfloat16", "float16", "float32"]
    bnb_4bit_quant_storage: Literal["uint8", "bfloat16"] = Field(
        description="bfloat16 for FSDP-QLoRA (shards must share the dtype)")


class LoraParams(Strict):
    """-> ``peft.LoraConfig(**lora)``."""
    r: int = Field(gt=0)
    lora_alpha: int = Field(gt=0)
    lora_dropout: float = Field(ge=0, lt=1)
    target_modules: list[str] = Field(min_length=1)
    bias: Literal["none", "all", "lora_only"] = "none"
    task_type: Literal["CAUSAL_LM"] = "CAUSAL_LM"


class SftParams(Strict):
    """-> ``trl.SFTConfig(**sft)`` (plus output_dir and reporting, set by the stage)."""
    per_device_train_batch_size: int = Field(gt=0)
    per_device_eval_batch_size: int = Field(gt=0)
    gradient_accumulation_steps: int = Field(gt=0)
    learning_rate: float = Field(gt=0)
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup",
                               "cosine_with_min_lr", "polynomial", "inverse_sqrt"]
    warmup_steps: float = Field(ge=0, description="a whole number: steps; a float in [0, 1): a ratio "
                                                  "of the total steps")
    num_train_epochs: float = Field(gt=0)
    max_steps: int = Field(-1, ge=-1, description="> 0 overrides num_train_epochs; -1: epochs decide")
    max_length: int = Field(gt=0)
    optim: str = Field(description="adamw_8bit needs bitsandbytes")
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    bf16: bool
    gradient_checkpointing: bool
    gradient_checkpointing_kwargs: dict[str, bool] = Field(
        default_factory=lambda: {"use_reentrant": False})
    logging_strategy: Literal["steps", "epoch"] = Field(
        "steps", description="epoch: one logged loss per epoch (its mean), for small mixtures")
    logging_steps: int = Field(gt=0)
    save_steps: int = Field(gt=0, description="checkpoint every N steps (resume points)")
    save_total_limit: int = Field(gt=0)
    eval_strategy: Literal["no", "steps", "epoch"] = "no"
    eval_steps: Optional[int] = Field(None, gt=0)
    seed: int = Field(ge=0)
    packing: bool = False
    padding_free: bool = False
    completion_only_loss: bool = Field(description="loss on the completion (answer) only")
    ddp_find_unused_parameters: Optional[bool] = False
    dataloader_num_workers: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _counts(self) -> "SftParams":
        if self.max_steps == 0:
            raise ValueError("max_steps 0 trains nothing: give > 0 steps, or -1 to train num_train_epochs")
        if self.warmup_steps >= 1 and not float(self.warmup_steps).is_integer():
            raise ValueError(f"warmup_steps {self.warmup_steps}: a ratio must be < 1, a step count whole")
        if self.eval_strategy == "steps" and self.eval_steps is None:
            raise ValueError("eval_strategy steps needs eval_steps")
        return self

    @model_validator(mode="after")
    def _non_reentrant(self) -> "SftParams":
        if self.gradient_checkpointing and self.gradient_checkpointing_kwargs.get("use_reentrant", True):
            raise ValueError("gradient_checkpointing_kwargs.use_reentrant must be false "
                             "(reentrant checkpointing drops LoRA gradients on frozen 4-bit inputs)")
        return self


class TrainParams(Strict):
    """One version's training settings: ``train_defaults`` with ``versions.<v>.train`` merged
    over it key by key (an override of one ``sft`` key keeps the others). ``quant``, ``lora``
    and ``sft`` map one-to-one onto BitsAndBytesConfig, LoraConfig and trl's SFTConfig."""
    init_from: str = Field(description="base (a root version) or the parent version whose "
                                       "adapter this version continues training")
    accelerate_config: str = Field(description="accelerate config used when processes > 1 "
                                               "(train_defaults only: dvc.yaml tracks that path)")
    quant: QuantParams
    lora: LoraParams
    sft: SftParams
    resume: bool = Field(True, description="resume from the last complete checkpoint of an "
                                           "interrupted run with the same inputs and params")
    processes: int = Field(1, ge=1, description="> 1: relaunched under `accelerate launch`")
    max_reject_rate: float = Field(0.1, ge=0, le=1)

    @property
    def parent(self) -> Optional[str]:
        """The parent version, None for a root version."""
        return None if self.init_from == BASE else self.init_from


BASE = "base"


def resolve_train(defaults: Any, version: Any, key: str) -> TrainParams:
    """The one place ``train_defaults`` and a version's overrides are merged, then validated
    as a whole: a typo is an error naming ``versions.<key>.train`` or ``train_defaults``."""
    if isinstance(version, dict) and "accelerate_config" in version:
        raise ParamsError(f"versions.{key}.train.accelerate_config: set it in train_defaults "
                          "(dvc.yaml tracks that one file for every version)")
    if isinstance(defaults, dict) and "init_from" in defaults:
        raise ParamsError("train_defaults.init_from: set it per version (versions.<v>.train.init_from: "
                          "dvc.yaml tracks each version's parent)")
    where = PARAMS[0].format(key=key)
    raw = {"train_defaults": defaults, "versions": {key: {"train": version or {}}}}
    return validate_params(TrainParams, deep_merge(defaults, version or {}), where,
                           origin_locator(raw, where, PARAMS[1], None))


def load_params(key: str, path: str = PARAMS_FILE) -> TrainParams:
    raw = load_raw(path)
    return resolve_train(lookup(raw, PARAMS[1]), lookup(raw, PARAMS[0].format(key=key)), key)


# ------------------------------------------------------------------------ small helpers
def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def read_base_info(base_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(base_dir) / "base.json"
    if not path.is_file():
        raise StageError(f"train: base model directory {base_dir} has no base.json "
                         "(run the base_model stage first)")
    return json.loads(path.read_text(encoding="utf-8"))


# ------------------------------------------------------------------------ examples
def split_examples(records: list[dict[str, Any]], version: str
                   ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, str]]]:
    """Mixture records -> (train rows, dev rows, rejects). A row is ``{"id", "source", "prompt",
    "completion"}`` with chat messages, ready for trl's conversational prompt-completion path
    (``source``: which mix source taught it, for the per-source answer formats)."""
    train, dev, rejects = [], [], []
    example_fields = SCHEMAS["example"].names
    for record in records:
        item = str(record.get("id", ""))
        split = record.get("split", "train")
        problems = validate("example", {k: record.get(k) for k in example_fields})
        if problems:
            rejects.append(reject(STAGE, version, item, "invalid_example", "; ".join(problems), record))
            continue
        if split not in SPLITS:
            rejects.append(reject(STAGE, version, item, "bad_split", f"split {split!r} not in {SPLITS}"))
            continue
        row = {"id": record["id"], "source": record.get("source") or "",
               "prompt": [{"role": m["role"], "content": m["content"]} for m in record["prompt"]],
               "completion": [{"role": m["role"], "content": m["content"]} for m in record["completion"]]}
        (train if split == "train" else dev).append(row)
    return train, dev, rejects


def measure_examples(tokenizer: Any, rows: list[dict[str, Any]], max_length: int, version: str
                     ) -> tuple[list[dict[str, Any]], list[dict[str, str]], Counter]:
    """Token accounting with the training chat template, the way trl tokenizes
    (prompt + generation prompt, then prompt + completion). Returns (kept rows, rejects,
    counts: ``tokens`` (after truncation to max_length), ``completion_tokens``, ``truncated``)."""
    kept, rejects, counts = [], [], Counter()
    for row in rows:
        prompt_len = len(chat_ids(tokenizer, row["prompt"], True))
        total = len(chat_ids(tokenizer, row["prompt"] + row["completion"], False))
        if prompt_len >= max_length:
            rejects.append(reject(STAGE, version, row["id"], "prompt_too_long",
                                  f"prompt is {prompt_len} tokens >= max_length {max_length}"))
            continue
        kept.append(row)
        counts["tokens"] += min(total, max_length)
        counts["completion_tokens"] += min(total, max_length) - prompt_len
        counts["truncated"] += total > max_length
    return kept, rejects, counts


# ------------------------------------------------------------------------ checkpoints / resume
def run_fingerprint(params: TrainParams, inputs: dict[str, str]) -> str:
    """What a checkpoint must share with this run to be resumed: the params and input hashes."""
    payload = {"params": params.model_dump(), "inputs": inputs, "world_size": world_size()}
    return hashlib.sha256(dumps_json(payload).encode("utf-8")).hexdigest()


def find_resume_checkpoint(checkpoint_dir: str | os.PathLike, fingerprint: str) -> Path | None:
    """The last complete ``checkpoint-N`` of an interrupted run with the same fingerprint.

    A checkpoint counts only with its COMPLETE marker (written after the save returned), so a
    run killed mid-save resumes from the one before."""
    root = Path(checkpoint_dir)
    run_file = root / RUN_FILE
    if not run_file.is_file():
        return None
    run = json.loads(run_file.read_text(encoding="utf-8"))
    if run.get("fingerprint") != fingerprint or run.get("complete"):
        return None
    complete = [p for p in root.glob("checkpoint-*") if (p / COMPLETE_MARKER).is_file()
                and p.name.split("-", 1)[1].isdigit()]
    return max(complete, key=lambda p: int(p.name.split("-", 1)[1]), default=None)


def reset_checkpoint_dir(checkpoint_dir: str | os.PathLike, fingerprint: str) -> None:
    root = Path(checkpoint_dir)
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    write_json({"fingerprint": fingerprint, "complete": False}, root / RUN_FILE)


def finish_checkpoint_dir(checkpoint_dir: str | os.PathLike, fingerprint: str) -> None:
    """The adapter is in models/<version>/ now: drop the checkpoints, keep the run record (a
    finished run is never resumed)."""
    root = Path(checkpoint_dir)
    for path in root.glob("checkpoint-*"):
        shutil.rmtree(path)
    write_json({"fingerprint": fingerprint, "complete": True}, root / RUN_FILE)


# ------------------------------------------------------------------------ model
def check_bitsandbytes(params: TrainParams, cuda: bool, key: str) -> None:
    """Clear errors instead of a deep traceback when 4-bit or adamw_8bit cannot run here."""
    needs = [name for name, used in (("quant.load_in_4bit", params.quant.load_in_4bit),
                                     (f"sft.optim={params.sft.optim}", "8bit" in params.sft.optim))
             if used]
    if not needs:
        return
    try:
        import bitsandbytes
    except Exception as exc:  # noqa: BLE001 - import errors of native libs vary
        raise StageError(f"train@{key}: {', '.join(needs)} needs bitsandbytes, which cannot be "
                         f"imported ({exc}); install bitsandbytes>=0.50 or set "
                         "quant.load_in_4bit: false / sft.optim: adamw_torch") from None
    from packaging.version import Version
    if not cuda and Version(bitsandbytes.__version__) < Version("0.50"):
        raise StageError(f"train@{key}: {', '.join(needs)} on CPU needs bitsandbytes>=0.50 "
                         f"(installed {bitsandbytes.__version__})")


def load_base_model(base_dir: str, info: dict[str, Any], params: TrainParams, key: str) -> Any:
    """The base weights (4-bit NF4 when ``quant.load_in_4bit``), from base.json's model."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cuda = torch.cuda.is_available()
    check_bitsandbytes(params, cuda, key)
    weights = base_dir if info.get("built") else info["model"]
    revision = None if info.get("built") else (info.get("resolved_revision") or info.get("revision"))
    if os.path.isabs(weights) or weights.startswith(("./", "../", "models/")):
        if not os.path.isdir(weights):
            raise StageError(f"train@{key}: base weights {weights} (from {base_dir}/base.json) do not exist")
        revision = None
    kwargs: dict[str, Any] = {"dtype": torch.bfloat16 if params.sft.bf16 else torch.float32}
    if params.quant.load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(**params.quant.model_dump())
    if cuda:
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    try:
        model = AutoModelForCausalLM.from_pretrained(weights, revision=revision, **kwargs)
    except OSError as exc:
        raise StageError(f"train@{key}: cannot load base weights {weights!r} (revision {revision}): "
                         f"{str(exc).splitlines()[0]}") from None
    if not cuda and params.quant.load_in_4bit:
        keep_4bit_training_layout(model)
    return model


def keep_4bit_training_layout(model: Any) -> None:
    """On a CPU with AVX512-BF16, bitsandbytes repacks a ``Linear4bit``'s weights in place
    the first time it runs in eval mode on an input without grad (an inference layout), and
    the next training step fails on them (``a view of a leaf Variable…``): any evaluation
    inside a run would — ``eval_strategy``, the start-loss measurement. With that inference
    path off, evaluation runs the kernels training runs."""
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False


def attach_adapter(model: Any, params: TrainParams, init_from: str, key: str) -> Any:
    """A PeftModel to train: a fresh LoRA (root version) or the parent's adapter, trainable."""
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

    # casts norms to fp32 for 4-bit stability, makes inputs require grad for checkpointing
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=params.sft.gradient_checkpointing,
        gradient_checkpointing_kwargs=dict(params.sft.gradient_checkpointing_kwargs))
    if params.parent is None:
        peft_model = get_peft_model(model, LoraConfig(**params.lora.model_dump()))
    else:
        config_path = Path(init_from) / "adapter_config.json"
        if not config_path.is_file():
            raise StageError(f"versions.{key}.train.init_from: {init_from} has no adapter "
                             f"(train@{params.parent} must run first)")
        parent = json.loads(config_path.read_text(encoding="utf-8"))
        mismatched = [f for f in ("r", "lora_alpha") if parent.get(f) != getattr(params.lora, f)]
        if sorted(parent.get("target_modules") or []) != sorted(params.lora.target_modules):
            mismatched.append("target_modules")
        if mismatched:
            raise StageError(f"versions.{key}.train.lora: {mismatched} differ from the parent adapter in "
                             f"{init_from} (a continued version keeps its parent's LoRA shape)")
        peft_model = PeftModel.from_pretrained(model, init_from, is_trainable=True)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    if trainable <= 0:
        raise StageError(f"train@{key}: the adapter from {init_from} has no trainable parameters")
    return peft_model


class CheckpointMarker:
    """Marks a checkpoint complete once the Trainer has finished saving it (for resume), after
    copying the dvclive curve so far into it: ``--live-dir`` is a plain DVC out, removed by DVC
    before a run, so a resumed run restores the curve from its checkpoint (``restore_live``)."""

    def __new__(cls, live_dir: str | None = None):  # a TrainerCallback built lazily: late import
        from transformers import TrainerCallback

        class _Marker(TrainerCallback):
            def on_save(self, args, state, control, **kwargs):
                if state.is_world_process_zero:
                    folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                    if folder.is_dir():
                        if live_dir and Path(live_dir).is_dir():
                            shutil.copytree(live_dir, folder / LIVE_COPY, dirs_exist_ok=True)
                        (folder / COMPLETE_MARKER).write_text("", encoding="utf-8")
        return _Marker()


class StepLog:
    """Each logging step as one line of the stage's log (and so of ``logs/train/<v>.log``),
    in place of the Trainer's printed dicts: step, epoch, loss, lr, grad norm, tokens seen;
    an evaluation's dev loss. Main process only."""

    def __new__(cls, log: logging.Logger):  # a TrainerCallback built lazily: late import
        from transformers import TrainerCallback

        class _StepLog(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                logs = logs or {}
                if not state.is_world_process_zero:
                    return
                where = f"step {state.global_step}/{state.max_steps} (epoch {state.epoch or 0:.2f})"
                if "loss" in logs:
                    log.info("%s: loss %.4f, lr %.3g, grad norm %.3g, %s tokens seen", where,
                             logs["loss"], logs.get("learning_rate", float("nan")),
                             logs.get("grad_norm", float("nan")),
                             f"{state.num_input_tokens_seen:,}")
                elif "eval_loss" in logs:
                    log.info("%s: dev loss %.4f", where, logs["eval_loss"])
        return _StepLog()


def restore_live(checkpoint: Path, live_dir: str) -> None:
    """The dvclive curve as it was at ``checkpoint`` (its copy), so the resumed run continues it."""
    copy = checkpoint / LIVE_COPY
    if Path(live_dir).exists():
        shutil.rmtree(live_dir)
    if copy.is_dir():
        shutil.copytree(copy, live_dir)


def live_callback(live_dir: str, resume: bool) -> Any:
    """dvclive logging with the global step as x (a resumed run continues its curve); dvclive
    writes no dvc.yaml of its own and makes no experiment: plots are declared in dvc.yaml."""
    from dvclive import Live
    from transformers.integrations import DVCLiveCallback

    class _StepLive(DVCLiveCallback):
        def on_log(self, args, state, control, model=None, logs=None, **kwargs):
            if self.live is not None:
                self.live.step = state.global_step
            logs = {k: v for k, v in (logs or {}).items() if isinstance(v, (int, float))}
            super().on_log(args, state, control, model=model, logs=logs, **kwargs)

    if not resume and Path(live_dir).exists():
        shutil.rmtree(live_dir)
    live = Live(dir=live_dir, dvcyaml=None, save_dvc_exp=False, report=None, resume=resume,
                monitor_system=False)
    return _StepLive(live=live)


def build_trainer(model: Any, tokenizer: Any, train_rows: list[dict[str, Any]],
                  dev_rows: list[dict[str, Any]], params: TrainParams, output_dir: str,
                  callbacks: list[Any] | None = None) -> Any:
    """trl SFTTrainer over the rows; ``params.sft`` maps one-to-one onto SFTConfig."""
    import torch
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    on_cpu = not torch.cuda.is_available()
    if on_cpu:
        fit_fused_lm_head_to_cpu()
    sft = params.sft.model_dump()
    if not dev_rows:
        sft["eval_strategy"] = "no"
    config = SFTConfig(output_dir=output_dir, report_to="none", save_strategy="steps",
                       use_cpu=on_cpu,
                       include_num_input_tokens_seen="non_padding", disable_tqdm=True,
                       **sft)
    # trl's own tokenizing map would fingerprint (pickle) the whole 151k-token tokenizer:
    # ~19 s per version in the quickstart; the columns it would compute are handed over instead
    columns = lambda rows: [tokenized_example(tokenizer, r) for r in rows]  # noqa: E731
    trainer = SFTTrainer(
        model=model, args=config, processing_class=tokenizer,
        train_dataset=Dataset.from_list(columns(train_rows)),
        eval_dataset=Dataset.from_list(columns(dev_rows)) if dev_rows else None,
        callbacks=callbacks or [])
    trainer.remove_callback(PrinterCallback)  # the stage logs each step instead (StepLog)
    fp32_adapter_masters(trainer.model)
    return trainer


# vocabulary columns per tile of trl's fused lm_head on CPU; trl's 32,768 is sized for GPU
# kernels, and on CPU the torch fallback's ~12 elementwise passes over a [tokens x 32,768] fp32
# tile run out of cache: 2,048 is 1.8-3.6x faster from 140 to 1,400 tokens (bench/cpu_lm_head.py)
CPU_LOGPROB_CHUNK = 2048


def fit_fused_lm_head_to_cpu() -> bool:
    """Two choices trl's fused lm_head (``trl.trainer.utils``, read there at call time) makes
    for GPUs, made for CPU instead; the tile math is unchanged, so the loss and its gradient
    are the same (tests/test_train.py):

    - which positions to score: trl scores only the labelled ones on Triton devices (CUDA,
      XPU) and every position elsewhere, so that tile shapes stay fixed for compiled backends
      (Neuron). On CPU nothing is compiled, and each prompt position costs a 151,646-wide
      projection that the completion-only loss then multiplies by zero: compact on CPU too;
    - how wide a vocabulary tile is: ``CPU_LOGPROB_CHUNK`` columns instead of 32,768 (the
      lm_head forward and backward of 140 labelled tokens: 0.25 s -> 0.14 s; of 670: 2.4 s ->
      0.68 s).

    Called only when training on CPU. Idempotent; False when trl has no such hooks."""
    import trl.trainer.utils as trl_utils

    original = getattr(trl_utils, "_use_triton", None)
    if original is None or not hasattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE"):
        return False
    if getattr(original, "compact_on_cpu", False):
        return False

    def compact(device: Any) -> bool:
        return device.type == "cpu" or original(device)

    compact.compact_on_cpu = True  # type: ignore[attr-defined]
    trl_utils._use_triton = compact
    trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = CPU_LOGPROB_CHUNK
    return True


def fp32_adapter_masters(model: Any) -> int:
    """trl casts the LoRA weights of a 4-bit model to bf16, where a late small update rounds
    away (0.012 + 1e-5 == 0.012 in bf16: 8 mantissa bits). Keep the trainable weights — the
    optimizer's master copy — in fp32; the 4-bit base still computes in its compute dtype and
    peft casts the LoRA input to the adapter's dtype. Runs before the optimizer exists (the
    Trainer builds it in ``train()``). Returns the number of tensors upcast."""
    import torch

    upcast = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
            upcast += 1
    return upcast


def peak_memory_mb() -> tuple[float, str]:
    import torch
    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1), "cuda_max_allocated"
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1), "process_max_rss"


# ------------------------------------------------------------------------ what a version leaves
CARD_TEMPLATE = Path(__file__).parent / "templates" / "model_card.md"


def model_card(lineage: dict[str, Any]) -> str:
    """README.md for people: the same facts as lineage.json, in stages/templates/model_card.md."""
    base, p, parent = lineage["base_model"], lineage["params"], lineage["parent"]
    quant, lora, sft = p["quant"], p["lora"], p["sft"]
    quantization = "none"
    if quant["load_in_4bit"]:
        quantization = (f"4-bit {quant['bnb_4bit_quant_type']}"
                        + (" + double quant" if quant["bnb_4bit_use_double_quant"] else "")
                        + f", compute {quant['bnb_4bit_compute_dtype']}")
    continues = (f"`{parent['version']}` (adapter sha256 `{parent['adapter_sha256'][:16]}…`)"
                 if parent else "the base model (new adapter)")
    eval_loss = lineage["eval_loss"]
    return CARD_TEMPLATE.read_text(encoding="utf-8").format(
        version=lineage["version"], base_model=base["model"], revision=base["revision"],
        resolved_revision=base.get("resolved_revision") or base["revision"],
        continues_from=continues, mixture_path=lineage["mixture"]["path"],
        mixture_sha=lineage["mixture"]["sha256"][:16], manifest_path=lineage["mixture"]["manifest"],
        manifest_sha=lineage["mixture"]["manifest_sha256"][:16],
        adapter_sha256=lineage["adapter_sha256"], quantization=quantization,
        lora_r=lora["r"], lora_alpha=lora["lora_alpha"], lora_dropout=lora["lora_dropout"],
        lora_targets=", ".join(lora["target_modules"]), optim=sft["optim"],
        learning_rate=sft["learning_rate"], scheduler=sft["lr_scheduler_type"],
        warmup=sft["warmup_steps"], batch=sft["per_device_train_batch_size"],
        accumulation=sft["gradient_accumulation_steps"], processes=lineage["processes"],
        max_length=sft["max_length"], epochs=sft["num_train_epochs"], max_steps=sft["max_steps"],
        seed=sft["seed"], final_loss=lineage["final_loss"],
        eval_loss=eval_loss if eval_loss is None else round(eval_loss, 4),
        steps=lineage["steps"], train_seconds=lineage["train_seconds"],
        tokens_seen=lineage["tokens_seen"], dataset_tokens=lineage["dataset_tokens"],
        completion_tokens=lineage["completion_tokens"], train_examples=lineage["examples"]["train"],
        dev_examples=lineage["examples"]["dev"], tokenizer=lineage["tokenizer"])


def write_version(out_dir: str, peft_model: Any, tokenizer: Any, lineage_wo_adapter: dict[str, Any],
                  training_config: dict[str, Any], sample: list[dict[str, Any]]) -> dict[str, Any]:
    """models/<version>/ written whole (atomic dir). Returns the final lineage."""
    with atomic_dir(out_dir) as tmp:
        write_json(sample, Path(tmp) / LOSS_SAMPLE)
        peft_model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        lineage = dict(lineage_wo_adapter, adapter_sha256=file_sha256(Path(tmp) / ADAPTER_FILE))
        write_json(training_config, Path(tmp) / "training_config.json")
        write_json(lineage, Path(tmp) / "lineage.json")
        write_text(model_card(lineage), Path(tmp) / "README.md")
    return lineage


# ------------------------------------------------------------------------ the run
def relaunch(argv: list[str], params: TrainParams, key: str) -> None:
    """Run this stage again under ``accelerate launch`` with ``params.processes`` processes."""
    if not Path(params.accelerate_config).is_file():
        raise StageError(f"train_defaults.accelerate_config: {params.accelerate_config} does not exist")
    with socket.socket() as probe:  # a free port: parallel runs must not share a rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           params.accelerate_config, "--num_processes", str(params.processes),
           "--main_process_port", str(port), "-m", "stages.train", *argv]
    done = subprocess.run(cmd, env=dict(os.environ, **{LAUNCHED_ENV: "1"}))
    if done.returncode != 0:
        raise StageError(f"train@{key}: accelerate launch with {params.processes} processes "
                         f"exited {done.returncode}")


@dataclass
class _Run:
    """One training run's inputs, as the phases of :func:`train_version` fill them in."""
    key: str
    params: TrainParams
    args: argparse.Namespace
    log: Any
    main_process: bool = field(default_factory=is_main_process)
    base_info: dict[str, Any] = field(default_factory=dict)
    tokenizer: Any = None
    train_rows: list[dict[str, Any]] = field(default_factory=list)
    dev_rows: list[dict[str, Any]] = field(default_factory=list)
    rejects: list[dict[str, str]] = field(default_factory=list)
    train_counts: dict[str, int] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)
    parent_sha: Optional[str] = None
    fingerprint: str = ""
    resume_from: Optional[Path] = None


def train_version(key: str, params: TrainParams, args: argparse.Namespace, log: Any) -> dict[str, Any]:
    """The whole run for one version; returns the metrics. Rank 0 writes every output.
    Phases as in alignment-handbook's sft.py: data, run state, model, training, save + card."""
    timer = Timer()
    run = _Run(key, params, args, log)
    load_data(run)                     # the tokenizer and the mixture, measured and checked
    decide_resume(run)                 # input hashes, fingerprint, resume or a fresh start
    peft_model = load_peft_model(run)  # the 4-bit base with a new or the parent's adapter
    trainer, outcome = train(run, peft_model)
    if not run.main_process:
        return {}
    lineage = save_version(run, trainer, outcome)
    return train_metrics(run, lineage, outcome, sum(
        p.numel() for p in peft_model.parameters() if p.requires_grad), timer.seconds)


# ---- data
def load_data(run: _Run) -> None:
    from transformers import AutoTokenizer

    key, args, max_length = run.key, run.args, run.params.sft.max_length
    for path, what in ((args.mixture, "mixture"), (args.manifest, "mixture manifest")):
        if not Path(path).is_file():
            raise StageError(f"train@{key}: {what} {path} does not exist (run mix@{key} first; "
                             "a version new in params.yaml needs `python -m stages.dvc_vars`)")
    check_mixture_length(args.manifest, max_length, key)
    run.base_info = read_base_info(args.base)
    run.tokenizer = tokenizer = AutoTokenizer.from_pretrained(args.base)
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise StageError(f"train@{key}: tokenizer in {args.base} has pad == eos; "
                         "the eos token would be masked out of the loss")
    train_rows, dev_rows, rejects = split_examples(read_records(args.mixture), key)
    run.train_rows, too_long, run.train_counts = measure_examples(tokenizer, train_rows, max_length, key)
    run.dev_rows, dev_too_long, _ = measure_examples(tokenizer, dev_rows, max_length, key)
    run.rejects = rejects + too_long + dev_too_long
    total = len(run.train_rows) + len(run.dev_rows) + len(run.rejects)
    if run.main_process:
        write_records(run.rejects, SCHEMAS["reject"], args.rejects)
    check_reject_rate(len(run.rejects), total, run.params.max_reject_rate, f"train@{key}")
    if not run.train_rows:
        raise StageError(f"train@{key}: no training examples in {args.mixture}")


def answer_format(rows: list[dict[str, Any]], parent: dict[str, Any] | None = None) -> dict[str, Any]:
    """How this version learns to answer, for evaluate to score it that way: ``two_step`` when
    its training examples include step-2 prompts (a step-1 prompt whose ``### 정답:`` is
    followed by a solution, answered with the letter), else ``single_step``; and per mix
    source (``formats_by_source``: evaluate scores each contest category in the format the
    sources of that category taught). A continued version keeps what its parent (``parent``:
    the parent's lineage) learned: a source two-step there stays two-step."""
    step2 = 0
    by_source: dict[str, str] = dict((parent or {}).get("formats_by_source") or {})
    for row in rows:
        user = next((m["content"] for m in row["prompt"] if m.get("role") == "user"), "")
        two_step = ANSWER_MARKER in user and bool(user.rsplit(ANSWER_MARKER, 1)[1].strip())
        step2 += two_step
        source = row.get("source") or ""
        if two_step or by_source.get(source) != "two_step":
            by_source[source] = "two_step" if two_step else "single_step"
    return {"answer_format": "two_step" if step2 else "single_step", "step2_examples": step2,
            "formats_by_source": dict(sorted(by_source.items()))}


def parent_lineage(init_from: str) -> dict[str, Any] | None:
    """The parent version's lineage.json (what it learned), when it has one."""
    path = Path(init_from) / "lineage.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def check_mixture_length(manifest: str, max_length: int, key: str) -> None:
    """The mixture was fitted to the length training uses: trl truncates after labelling, so
    an example longer than training's max_length would silently lose its ``<|im_end|>``."""
    built = json.loads(Path(manifest).read_text(encoding="utf-8")).get("recipe", {}).get("max_length")
    if built is not None and built != max_length:
        raise StageError(f"train@{key}: mixture {manifest} was built with max_length {built} but "
                         f"training uses sft.max_length {max_length} (train_defaults / "
                         f"versions.{key}.train); set mix_defaults/versions.{key}.mix max_length "
                         "to the same value (`make check` reports it too)")


# ---- run state: resume only a run with the same inputs and params
def decide_resume(run: _Run) -> None:
    from accelerate import PartialState

    args, params = run.args, run.params
    if params.parent is not None:
        adapter = Path(args.init_from) / ADAPTER_FILE
        if not adapter.is_file():
            raise StageError(f"versions.{run.key}.train.init_from: {args.init_from} has no "
                             f"{ADAPTER_FILE} (train@{params.parent} must run first)")
        run.parent_sha = file_sha256(adapter)
    run.inputs = {"mixture": file_sha256(args.mixture), "manifest": file_sha256(args.manifest),
                  "base": file_sha256(Path(args.base) / "base.json"),
                  "parent_adapter": run.parent_sha or ""}
    run.fingerprint = run_fingerprint(params, run.inputs)
    run.resume_from = find_resume_checkpoint(args.checkpoints, run.fingerprint) if params.resume else None
    state = PartialState()  # joins the process group under accelerate; a no-op otherwise
    state.wait_for_everyone()  # every rank decided on resume_from before rank 0 cleans
    if run.main_process and run.resume_from is None:
        reset_checkpoint_dir(args.checkpoints, run.fingerprint)
    state.wait_for_everyone()
    if run.resume_from is not None:
        run.log.info("resuming from %s", run.resume_from)


# ---- model
def load_peft_model(run: _Run) -> Any:
    from transformers import set_seed

    set_seed(run.params.sft.seed)
    model = load_base_model(run.args.base, run.base_info, run.params, run.key)
    return attach_adapter(model, run.params, run.args.init_from, run.key)


# ---- training loop
START_SAMPLE = 32              # training examples (first by id) the start and end losses use
LOSS_SAMPLE = "loss_sample.json"  # in models/<version>: those examples, for a continued version


def loss_sample(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"id": r["id"], "prompt": r["prompt"], "completion": r["completion"]}
            for r in sorted(rows, key=lambda r: r["id"])[:START_SAMPLE]]


def start_losses(run: _Run, model: Any) -> dict[str, Any]:
    """Answer losses of the weights training starts from (not measured when resuming: those
    are a checkpoint's): ``start_loss`` on the version's first ``START_SAMPLE`` examples; for a
    continued version also ``start_loss_base`` (the same with the adapter off) and
    ``start_loss_on_parent`` — on the examples the parent measured its ``end_loss`` on
    (``models/<parent>/loss_sample.json``), so that one reads the version starts where its
    parent ended (``parent_end_loss``)."""
    out = dict.fromkeys(("start_loss", "start_loss_base", "start_loss_on_parent", "parent_end_loss"))
    if run.resume_from is not None:
        return out

    def measure(rows: list[dict[str, Any]]) -> float:
        return round(answer_loss(model, run.tokenizer, rows)[0], 4)

    own = loss_sample(run.train_rows)
    model.eval()
    out["start_loss"] = measure(own)
    if run.params.parent is not None:
        with model.disable_adapter():
            out["start_loss_base"] = measure(own)
        sample = Path(run.args.init_from) / LOSS_SAMPLE
        if sample.is_file():  # a parent trained before loss samples existed has none
            out["start_loss_on_parent"] = measure(json.loads(sample.read_text(encoding="utf-8")))
            lineage = json.loads((Path(run.args.init_from) / "lineage.json").read_text(encoding="utf-8"))
            out["parent_end_loss"] = lineage.get("end_loss")
    model.train()
    return out


LOSS_KEYS = ("start_loss", "start_loss_base", "start_loss_on_parent", "parent_end_loss", "end_loss")


def end_loss(run: _Run, model: Any) -> float:
    """The answer loss of the trained weights on the version's loss sample."""
    model.eval()
    loss, _ = answer_loss(model, run.tokenizer, loss_sample(run.train_rows))
    return round(loss, 4)


def train(run: _Run, peft_model: Any) -> tuple[Any, dict[str, Any]]:
    import torch
    from accelerate import PartialState

    callbacks = [CheckpointMarker(run.args.live_dir if run.main_process else None), StepLog(run.log)]
    if run.main_process:
        if run.resume_from is not None:
            restore_live(run.resume_from, run.args.live_dir)
        callbacks.append(live_callback(run.args.live_dir, resume=run.resume_from is not None))
    trainer = build_trainer(peft_model, run.tokenizer, run.train_rows, run.dev_rows, run.params,
                            run.args.checkpoints, callbacks)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = start_losses(run, trainer.model)
    timer = Timer()
    result = trainer.train(resume_from_checkpoint=str(run.resume_from) if run.resume_from else None)
    eval_loss = trainer.evaluate()["eval_loss"] if run.dev_rows else None
    start["end_loss"] = end_loss(run, trainer.model)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    peak, peak_kind = peak_memory_mb()
    PartialState().wait_for_everyone()
    return trainer, {
        "final_loss": float(losses[-1]) if losses else float(result.training_loss),
        "mean_train_loss": float(result.training_loss),
        "eval_loss": None if eval_loss is None else float(eval_loss),
        "runtime": float(result.metrics.get("train_runtime", timer.seconds)),
        "tokens_seen": int(trainer.state.num_input_tokens_seen),
        "steps": int(trainer.state.global_step), "peak": peak, "peak_kind": peak_kind, **start}


# ---- save model and create model card
def save_version(run: _Run, trainer: Any, outcome: dict[str, Any]) -> dict[str, Any]:
    key, args, params, base_info = run.key, run.args, run.params, run.base_info
    lineage = {
        "version": key,
        "base_model": {"model": base_info["model"], "revision": base_info.get("revision"),
                       "resolved_revision": base_info.get("resolved_revision"),
                       "built": bool(base_info.get("built")), "path": args.base,
                       "base_json_sha256": run.inputs["base"]},
        "parent": ({"version": params.parent, "path": args.init_from, "adapter_sha256": run.parent_sha}
                   if params.parent else None),
        "mixture": {"path": args.mixture, "sha256": run.inputs["mixture"], "manifest": args.manifest,
                    "manifest_sha256": run.inputs["manifest"]},
        "params": params.model_dump(), "processes": world_size(),
        "train_seconds": round(outcome["runtime"], 3), "tokens_seen": outcome["tokens_seen"],
        "dataset_tokens": run.train_counts["tokens"],
        "completion_tokens": run.train_counts["completion_tokens"],
        "tokenizer": base_info.get("tokenizer", base_info["model"]),
        "final_loss": outcome["final_loss"], "mean_train_loss": outcome["mean_train_loss"],
        "eval_loss": outcome["eval_loss"], "steps": outcome["steps"],
        **{k: outcome[k] for k in LOSS_KEYS},
        "examples": {"train": len(run.train_rows), "dev": len(run.dev_rows), "rejected": len(run.rejects)},
        "resumed_from": run.resume_from.name if run.resume_from else None,
        **answer_format(run.train_rows, parent_lineage(args.init_from) if params.parent else None),
    }
    training_config = {"version": key, "init_from": args.init_from, "resolved_params": params.model_dump(),
                       "sft_config": {k: v for k, v in trainer.args.to_dict().items()
                                      if isinstance(v, (str, int, float, bool, list, dict, type(None)))}}
    lineage = write_version(args.out, trainer.model, run.tokenizer, lineage, training_config,
                            loss_sample(run.train_rows))
    finish_checkpoint_dir(args.checkpoints, run.fingerprint)
    run.log.info("%d steps, final loss %.4f, %d tokens seen in %.1fs -> %s", lineage["steps"],
                 outcome["final_loss"], outcome["tokens_seen"], outcome["runtime"], args.out)
    return lineage


def train_metrics(run: _Run, lineage: dict[str, Any], outcome: dict[str, Any], trainable: int,
                  seconds: float) -> dict[str, Any]:
    runtime, tokens_seen = outcome["runtime"], outcome["tokens_seen"]
    return {
        "final_loss": outcome["final_loss"], "mean_train_loss": lineage["mean_train_loss"],
        "eval_loss": lineage["eval_loss"], "steps": lineage["steps"],
        **{k: lineage[k] for k in LOSS_KEYS},
        "train_seconds": lineage["train_seconds"],
        "tokens_seen": tokens_seen,
        "tokens_per_second": round(tokens_seen / runtime, 1) if runtime > 0 else None,
        "peak_memory_mb": outcome["peak"], "peak_memory_kind": outcome["peak_kind"],
        "dataset_tokens": run.train_counts["tokens"],
        "completion_tokens": run.train_counts["completion_tokens"],
        "truncated_examples": run.train_counts["truncated"],
        "tokenizer": lineage["tokenizer"], "trainable_parameters": trainable,
        "examples_train": len(run.train_rows), "examples_dev": len(run.dev_rows),
        "rejected": len(run.rejects), "processes": world_size(),
        "resumed_from": lineage["resumed_from"], "adapter_sha256": lineage["adapter_sha256"],
        "answer_format": lineage["answer_format"], "step2_examples": lineage["step2_examples"],
        "seconds": seconds,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = stage_parser(__doc__, "version")
    parser.add_argument("--mixture", required=True)
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--base", required=True, help="models/base")
    parser.add_argument("--init-from", required=True, help="models/base or models/<parent>")
    parser.add_argument("--checkpoints", required=True)
    parser.add_argument("--live-dir", required=True)
    return parser.parse_args(argv)


@stage_main
def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    key = args.version
    params = load_params(key, args.params)
    if Path(args.init_from).name != params.init_from:
        raise StageError(f"train@{key}: --init-from {args.init_from} is not "
                         f"versions.{key}.train.init_from ({params.init_from})")
    if params.processes > 1 and world_size() == 1:
        if os.environ.get(LAUNCHED_ENV):  # never relaunch from a launched child
            raise StageError(f"train_defaults.accelerate_config: {params.accelerate_config} started "
                             "single processes (no WORLD_SIZE); use a config whose launcher starts "
                             f"{params.processes} processes (e.g. MULTI_GPU, with use_cpu on CPU)")
        relaunch(argv, params, key)
        return
    log = setup_logging(args.log if is_main_process() else None, f"train@{key}")
    started = time.time()
    metrics = train_version(key, params, args, log)
    if is_main_process():
        metrics["wall_seconds"] = round(time.time() - started, 3)
        write_metrics(args.metrics, metrics)


if __name__ == "__main__":
    run_and_exit(main)
