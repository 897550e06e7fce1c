"""evaluate@<key>: multiple-choice accuracy of one model on the held-out finance sets.

Contract:
- model: ``--model``, ``models/<key>`` in dvc.yaml — ``models/base`` (the ``--base`` dir) is the
  baseline: the weights ``models/base/base.json`` names, no adapter; ``models/<version>`` is
  that version's PEFT adapter applied over the same base weights. The tokenizer (and so the
  chat template) is the one saved in the evaluated directory: the one training used.
- sets (``params.evaluate``): ``collected`` parquet files of mcq records, of which only
  ``split`` (KMMLU: test, never in any mixture) is read, and ``local`` MCQ files under
  ``local_dir`` read exactly like a ``collect`` local mcq source (column mapping, answer
  format), 2-7 choices.
- categories: every set scores one KRX-Bench category (``contest_category``: accounting,
  financial_market, company, stock, agent); the stock, agent and company sets are the test
  splits of those stages' outputs.
- scoring: each contest category the way the model was trained to answer it: ``two_step`` when
  a mix source of that category (``source_categories``) taught it the two-step format
  (lineage.json's ``formats_by_source``, written by train, the parent's included), else
  ``single_step`` — a letter; the base model is single-step everywhere. Prompts are training's (``stages.common.prompts``) as the
  user turn, through ``tokenizer.apply_chat_template(..., add_generation_prompt=True)``.
  ``generate`` (default, production): a two-step model generates its solution after the
  step-1 prompt, then the answer after the step-2 prompt; a single-step model its answer after
  the step-1 prompt; letters parsed by :func:`parse_letter` (strict; unparsable = wrong).
  ``loglik`` (cheaper, the quickstart's): the letter among A..(n-th) with the highest
  next-token log-prob after the step-1 prompt — or, for a two-step model, after the step-2
  prompt holding its greedy solution. Metrics say which (``scored_as``).
- shuffled score: every item again with its options permuted (a permutation seeded by
  ``shuffle_seed`` and the item id, never the identity); the predicted letter is mapped back
  to the original option before it is compared with the key.
- outputs: ``--out`` one prediction row per item (parquet), ``--metrics``
  ``metrics/eval/<key>.json``: micro and macro accuracy (macro = mean over categories, a
  category being ``<set>/<category>`` or the set name), per set, per category, per number of
  choices (4 and 7 also at the top level), shuffled accuracy, items/s; and ``krx_bench``: per
  contest category items, accuracy, its 95% Wilson interval, the majority-class rate and the
  format scored, and the average over the categories that have items (``averaged_over``).
- dev loss (``--dev``: the version's mixture; the baseline is given its own dir and has none):
  the answer loss (``stages.common.chat.answer_loss``: the completion tokens as training labels
  them) of the first ``dev_loss_examples`` dev examples by id, with the version's adapter and
  with it disabled (the base): ``dev_loss: {model, base, delta, examples, tokens}``.
- rejects (``--rejects``): unreadable or invalid rows of the sets, prompts over
  ``max_prompt_tokens``; the stage fails (exit 2) above ``max_reject_rate``, on a missing
  model/adapter, or when no item is left.
"""
from __future__ import annotations

import json
import math
import os
import random
import re
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence

import pyarrow as pa
from pydantic import Field, model_validator

from stages.common.chat import answer_loss
from stages.sources.evalsets import (CONTEST_CATEGORIES, ContestCategory, EvalCollectedSet,
                                    EvalItem, EvalLocalSet, OpenEndedSet, OpenItem,
                                    load_open_ended, load_sets)
from stages.common.io import read_records, write_records
from stages.common.params import PARAMS_FILE, Strict, read_section
from stages.common.prompts import LETTERS, step1_prompt, step2_prompt
from stages.common.runlog import (StageError, Timer, check_reject_rate, progress, run_and_exit,
                                  setup_logging, stage_main, stage_parser, write_metrics)
from stages.common.schema import MAX_CHOICES, MIN_CHOICES, SCHEMAS, reject

PARAMS = ("evaluate",)
STAGE = "evaluate"


# ---------------------------------------------------------------------------- params
class EvalGeneration(Strict):
    """``scoring: generate``: greedy two-step generation (solution, then the letter)."""
    solution_max_new_tokens: int = Field(512, ge=1, description="step 1: the solution")
    letter_max_new_tokens: int = Field(8, ge=1, description="step 2: the answer letter")
    open_ended_max_new_tokens: int = Field(
        512, ge=1, description="an open-ended answer, greedy (the same bound for every version)")


class EvaluateSettings(Strict):
    """``evaluate``, shared by every ``evaluate@<key>``: what is evaluated and how. The model is
    the stage's key: ``models/base`` (the baseline, no adapter) or ``models/<version>``."""
    scoring: Literal["loglik", "generate"] = Field(
        "generate", description="each version is scored the way it was trained to answer "
        "(lineage.json answer_format). generate: a two-step version generates its solution after "
        "the step-1 prompt, then the letter after the step-2 prompt; a single-step one generates "
        "its answer after the step-1 prompt; letters parsed strictly. loglik (cheaper): the "
        "letters' next-token log-probs after the step-1 prompt, or for a two-step version after "
        "the step-2 prompt holding its generated solution")
    batch_size: int = Field(8, ge=1, le=4096)
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on cuda, float32 on cpu")
    max_prompt_tokens: int = Field(2048, ge=16, description="longer prompts are rejected, never cut")
    shuffled: bool = Field(True, description="also score every item with its options permuted")
    shuffle_seed: int = Field(0, ge=0, description="with the item id, seeds each item's permutation")
    max_items_per_set: Optional[int] = Field(None, ge=1, description="first N items by id per set")
    max_reject_rate: float = Field(0.2, ge=0, le=1)
    dev_loss_examples: int = Field(
        256, ge=0, description="examples of the version's mixture dev split (first N by id) "
        "whose answer loss is measured with the version and with the base (adapter off); 0: none")
    generation: EvalGeneration = Field(default_factory=EvalGeneration)
    collected: dict[str, EvalCollectedSet] = Field(default_factory=dict)
    source_categories: dict[str, ContestCategory] = Field(
        default_factory=dict, description="mix source -> the contest category it teaches: a "
        "version answers a category two-step only when one of its sources taught it two-step")
    local_dir: str = Field(description="directory holding every local set (one dvc dep)")
    local: dict[str, EvalLocalSet] = Field(default_factory=dict)
    open_ended: dict[str, OpenEndedSet] = Field(
        default_factory=dict, description="free-form questions with references (local files "
        "under local_dir): each version's answers -> judge@<key>")

    @model_validator(mode="after")
    def _sets(self) -> "EvaluateSettings":
        names = [*self.collected, *self.local, *self.open_ended]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"eval set names used twice: {twice}")
        if not self.collected and not self.local:
            raise ValueError("no eval sets: name at least one in collected or local")
        root = os.path.abspath(self.local_dir)
        for where, name, spec in [*(("local", n, s) for n, s in self.local.items()),
                                  *(("open_ended", n, s) for n, s in self.open_ended.items())]:
            if os.path.commonpath([root, os.path.abspath(spec.input)]) != root:
                raise ValueError(f"{where}.{name}.input {spec.input!r} is not under local_dir "
                                 f"{self.local_dir!r} (dvc.yaml depends on local_dir only)")
        return self

BASE_JSON = "base.json"
ADAPTER_CONFIG = "adapter_config.json"

PREDICTION_SCHEMA = pa.schema([
    ("id", pa.string()), ("set", pa.string()), ("category", pa.string()),
    ("contest_category", pa.string()), ("answer_format", pa.string()), ("n_choices", pa.int32()), ("answer", pa.int32()), ("predicted", pa.int32()),
    ("correct", pa.bool_()), ("permutation", pa.list_(pa.int32())),
    ("shuffled_predicted", pa.int32()), ("shuffled_correct", pa.bool_()), ("detail", pa.string()),
])


OPEN_ANSWER_SCHEMA = pa.schema([
    ("id", pa.string()), ("set", pa.string()), ("category", pa.string()),
    ("question", pa.string()), ("reference", pa.string()), ("answer", pa.string()),
    ("answer_chars", pa.int32()), ("answer_tokens", pa.int32()), ("truncated", pa.bool_()),
])


def load_params(key: str | None = None, path: str = PARAMS_FILE) -> EvaluateSettings:
    return read_section(PARAMS, EvaluateSettings, key, path=path)


# ------------------------------------------------------------------------ letters
_LABEL = re.compile(r"^\s*(?:#+\s*)?(?:정답|답|answer)\s*(?:[:：]|은|는|is)?\s*", re.IGNORECASE)
_ONE_LETTER = re.compile(r"^\(?([A-G])\)?[.)]?$")


def parse_letter(text: str, n_choices: int) -> int | None:
    """The answer letter of a generated step-2 response, strictly; ``None`` when unparsable.

    Rule: take the first non-empty line; drop one leading label (``정답:``, ``### 정답:``,
    ``정답은``, ``답:``, ``Answer:``); what is left must be exactly one upper-case letter
    A..(n-th), optionally in parentheses and/or followed by ``.`` or ``)``. So ``"C"``,
    ``"C."``, ``"(C)"``, ``"정답: C"`` are C; ``"AB"``, ``"A, B"``, ``"C. 설명"``, ``"c"`` and a
    letter beyond the item's choices are unparsable (counted wrong).
    """
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return None
    rest = _LABEL.sub("", lines[0], count=1).strip()
    match = _ONE_LETTER.match(rest)
    if not match:
        return None
    index = LETTERS.index(match.group(1))
    return index if index < n_choices else None


def permutation(item_id: str, n_choices: int, seed: int) -> list[int]:
    """A deterministic permutation of ``range(n_choices)`` for one item (never the identity):
    ``shuffled[i] = choices[perm[i]]``. Seeded by the string ``"<seed>:<id>"`` (sha512 inside
    ``random.Random``), so it does not depend on PYTHONHASHSEED or on the other items."""
    rng = random.Random(f"{seed}:{item_id}")
    perm = list(range(n_choices))
    rng.shuffle(perm)
    if perm == sorted(perm):  # identity: not a test of option order, rotate by one
        perm = perm[1:] + perm[:1]
    return perm


def shuffle_item(item: EvalItem, seed: int) -> tuple[EvalItem, list[int]]:
    """The item with permuted options (answer index moved with its option) + the permutation."""
    perm = permutation(item.id, len(item.choices), seed)
    choices = tuple(item.choices[p] for p in perm)
    return replace(item, choices=choices, answer=perm.index(item.answer)), perm


def unshuffle(predicted: int | None, perm: Sequence[int]) -> int | None:
    """A prediction over the shuffled options -> the index of that option in the original."""
    return None if predicted is None else perm[predicted]


# ------------------------------------------------------------------------ prompts
def chat_text(tokenizer: Any, user_content: str) -> str:
    """The user turn through the tokenizer's chat template, ready for the assistant's answer
    (the same template and default system prompt as training)."""
    return tokenizer.apply_chat_template([{"role": "user", "content": user_content}],
                                         tokenize=False, add_generation_prompt=True)


def letter_token_ids(tokenizer: Any) -> list[int]:
    """Token ids of "A".."G" as the first token of an answer; each must be one token."""
    ids = []
    for letter in LETTERS:
        encoded = tokenizer.encode(letter, add_special_tokens=False)
        if len(encoded) != 1:
            raise StageError(f"evaluate: the tokenizer splits letter {letter!r} into {encoded}; "
                             "log-likelihood scoring needs one token per letter (use scoring: generate)")
        ids.append(encoded[0])
    return ids


# ------------------------------------------------------------------------ model passes
def _batches(order: list[int], size: int) -> list[list[int]]:
    return [order[i:i + size] for i in range(0, len(order), size)]


def _length_order(lengths: list[int]) -> list[int]:
    """Longest first (similar lengths share a batch: less padding); ties by position."""
    return sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))


def _left_padded(rows: list[list[int]], pad_id: int, device: Any) -> tuple[Any, Any, Any]:
    import torch

    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    # left padding: positions count real tokens only, so a row's logits do not depend on how
    # much padding its batch needed (the model would otherwise start each row at position pad)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids.to(device), mask.to(device), position_ids.to(device)


def letter_logprobs(model: Any, tokenizer: Any, texts: list[str], batch_size: int,
                    desc: str = "loglik") -> list[list[float]]:
    """For each prompt text: next-token log-probs (over the whole vocabulary) of "A".."G"."""
    import torch

    letter_ids = letter_token_ids(tokenizer)
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    device = next(model.parameters()).device
    out: list[list[float]] = [[] for _ in texts]
    order = _length_order([len(e) for e in encoded])
    with torch.inference_mode():
        for batch in progress(_batches(order, batch_size), desc=desc):
            ids, mask, positions = _left_padded([encoded[i] for i in batch],
                                                tokenizer.pad_token_id, device)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                           use_cache=False, logits_to_keep=1).logits[:, -1, :]
            logp = torch.log_softmax(logits.float(), dim=-1)[:, letter_ids].cpu().tolist()
            for row, index in enumerate(batch):
                out[index] = logp[row]
    return out


def generate_texts(model: Any, tokenizer: Any, texts: list[str], max_new_tokens: int,
                   batch_size: int, desc: str = "generate") -> list[str]:
    """Greedy continuations of each prompt text (special tokens dropped), batched, left-padded."""
    import torch

    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    device = next(model.parameters()).device
    out = [""] * len(texts)
    order = _length_order([len(e) for e in encoded])
    with torch.inference_mode():
        for batch in progress(_batches(order, batch_size), desc=desc):
            ids, mask, _ = _left_padded([encoded[i] for i in batch], tokenizer.pad_token_id, device)
            generated = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                       max_new_tokens=max_new_tokens,
                                       pad_token_id=tokenizer.pad_token_id)
            new_tokens = generated[:, ids.shape[1]:]
            for row, index in enumerate(batch):
                out[index] = tokenizer.decode(new_tokens[row], skip_special_tokens=True)
    return out


# ------------------------------------------------------------------------ scoring
@dataclass
class Scored:
    """Predictions for a list of items (``None`` = no parsable answer) + per-item detail."""
    predicted: list[int | None]
    detail: list[dict[str, Any]] = field(default_factory=list)


def score_loglik(model: Any, tokenizer: Any, items: list[EvalItem], batch_size: int) -> Scored:
    texts = [chat_text(tokenizer, step1_prompt(i.question, i.choices)) for i in items]
    return _from_logprobs(items, letter_logprobs(model, tokenizer, texts, batch_size))


def _from_logprobs(items: list[EvalItem], logps: list[list[float]]) -> Scored:
    predicted, detail = [], []
    for item, row in zip(items, logps):
        valid = row[:len(item.choices)]
        predicted.append(max(range(len(valid)), key=lambda k: (valid[k], -k)))
        detail.append({"letter_logprobs": [round(v, 4) for v in valid],
                       "letter_mass": round(sum(math.exp(v) for v in valid), 6)})
    return Scored(predicted, detail)


def score_generate(model: Any, tokenizer: Any, items: list[EvalItem], batch_size: int,
                   solution_tokens: int, letter_tokens: int) -> Scored:
    step1 = [chat_text(tokenizer, step1_prompt(i.question, i.choices)) for i in items]
    solutions = generate_texts(model, tokenizer, step1, solution_tokens, batch_size, "step 1")
    step2 = [chat_text(tokenizer, step2_prompt(i.question, i.choices, s))
             for i, s in zip(items, solutions)]
    answers = generate_texts(model, tokenizer, step2, letter_tokens, batch_size, "step 2")
    predicted = [parse_letter(a, len(i.choices)) for i, a in zip(items, answers)]
    detail = [{"solution": s, "answer_text": a} for s, a in zip(solutions, answers)]
    return Scored(predicted, detail)


Scorer = Callable[[list[EvalItem]], Scored]


def evaluate_items(items: list[EvalItem], scorer: Scorer, shuffled: bool, seed: int,
                   answer_format: str = "single_step") -> list[dict[str, Any]]:
    """Score items (and their shuffled copies) -> one prediction row per item."""
    plain = scorer(items)
    perms: list[list[int]] = []
    shuffled_pred: list[int | None] = [None] * len(items)
    shuffled_detail: list[dict[str, Any]] = [{} for _ in items]
    if shuffled:
        copies = [shuffle_item(item, seed) for item in items]
        perms = [perm for _, perm in copies]
        result = scorer([copy for copy, _ in copies])
        shuffled_pred = [unshuffle(p, perm) for p, perm in zip(result.predicted, perms)]
        shuffled_detail = result.detail or shuffled_detail
    rows = []
    for index, item in enumerate(items):
        predicted = plain.predicted[index]
        detail = dict(plain.detail[index]) if plain.detail else {}
        if shuffled:
            detail["shuffled"] = shuffled_detail[index]
        rows.append({
            "id": item.id, "set": item.set, "category": item.category,
            "contest_category": item.contest_category, "answer_format": answer_format,
            "n_choices": len(item.choices), "answer": item.answer,
            "predicted": -1 if predicted is None else predicted,
            "correct": predicted == item.answer,
            "permutation": perms[index] if shuffled else [],
            "shuffled_predicted": -1 if not shuffled or shuffled_pred[index] is None
            else shuffled_pred[index],
            "shuffled_correct": bool(shuffled and shuffled_pred[index] == item.answer),
            "detail": json.dumps(detail, ensure_ascii=False, sort_keys=True),
        })
    return rows


def _acc(rows: list[dict[str, Any]], column: str) -> float:
    return round(sum(r[column] for r in rows) / len(rows), 6) if rows else 0.0


def _group(rows: list[dict[str, Any]], shuffled: bool) -> dict[str, Any]:
    out = {"items": len(rows), "accuracy": _acc(rows, "correct")}
    if shuffled:
        out["shuffled_accuracy"] = _acc(rows, "shuffled_correct")
    return out


def summarize(rows: list[dict[str, Any]], shuffled: bool) -> dict[str, Any]:
    """Prediction rows -> the accuracy part of the metrics (deterministic, sorted keys).

    micro = over all items; macro = unweighted mean over categories (``<set>/<category>``,
    or the set name when the item has no category); the same for the shuffled score."""
    by_set, by_category, by_choices = defaultdict(list), defaultdict(list), defaultdict(list)
    for row in rows:
        by_set[row["set"]].append(row)
        key = f"{row['set']}/{row['category']}" if row["category"] else row["set"]
        by_category[key].append(row)
        by_choices[str(row["n_choices"])].append(row)
    categories = {k: _group(v, shuffled) for k, v in sorted(by_category.items())}
    accuracy = {"micro": _acc(rows, "correct"),
                "macro": round(sum(c["accuracy"] for c in categories.values()) / len(categories), 6)
                if categories else 0.0}
    if shuffled:
        accuracy["shuffled_micro"] = _acc(rows, "shuffled_correct")
        accuracy["shuffled_macro"] = round(
            sum(c["shuffled_accuracy"] for c in categories.values()) / len(categories), 6) \
            if categories else 0.0
    for n in ("4", "7"):
        if by_choices.get(n):
            accuracy[f"choices_{n}"] = _acc(by_choices[n], "correct")
    return {"items": len(rows), "accuracy": accuracy,
            "unparsed": sum(1 for r in rows if r["predicted"] < 0),
            "by_set": {k: _group(v, shuffled) for k, v in sorted(by_set.items())},
            "by_category": categories,
            "by_choices": {k: _group(v, shuffled) for k, v in sorted(by_choices.items(), key=lambda kv: int(kv[0]))}}


# ------------------------------------------------------------------------ model loading
def _is_local(model: str) -> bool:
    return model.startswith(("/", "./", "../", "models/", "data/")) or os.path.isdir(model)


def resolve_device(device: str) -> str:
    import torch
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise StageError("evaluate.device: cuda requested but no CUDA device is available")
    return device


def resolve_dtype(dtype: str, device: str) -> Any:
    import torch
    if dtype == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return getattr(torch, dtype)


def check_model_dirs(base_dir: str, model_dir: str) -> tuple[dict[str, Any], bool]:
    """(base.json, is the baseline) — StageError for a missing base.json or adapter, before
    anything heavy is loaded."""
    base_json = Path(base_dir) / BASE_JSON
    if not base_json.is_file():
        raise StageError(f"evaluate: {base_json} does not exist (run base_model first)")
    base = json.loads(base_json.read_text(encoding="utf-8"))
    is_base = os.path.normpath(model_dir) == os.path.normpath(base_dir)
    if not is_base and not (Path(model_dir) / ADAPTER_CONFIG).is_file():
        raise StageError(f"evaluate@: --model {model_dir} has no {ADAPTER_CONFIG} (not a trained "
                         "adapter; run train first)")
    return base, is_base


def load_model(base_dir: str, model_dir: str, device: str, dtype: str) -> tuple[Any, Any, dict[str, Any]]:
    """(model in eval mode on ``device``, tokenizer, info). ``model_dir == base_dir``: the base
    weights named by ``base.json``; else the PEFT adapter in ``model_dir`` over them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, is_base = check_model_dirs(base_dir, model_dir)
    base_json = Path(base_dir) / BASE_JSON
    device = resolve_device(device)
    weights = base["model"]
    try:
        model = AutoModelForCausalLM.from_pretrained(
            weights, revision=None if _is_local(weights) else base.get("revision"),
            dtype=resolve_dtype(dtype, device))
    except (OSError, ValueError) as exc:
        raise StageError(f"evaluate: cannot load base weights {weights!r} from {base_json}: "
                         f"{str(exc).splitlines()[0]}") from None
    if not is_base:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, model_dir)
    model.to(device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        raise StageError(f"evaluate: the tokenizer in {model_dir} has no pad token")
    info = {"model": model_dir, "adapter": not is_base, "base_weights": weights,
            "base_revision": base.get("revision"), "device": device,
            "dtype": str(resolve_dtype(dtype, device)).replace("torch.", "")}
    return model, tokenizer, info


def score_solution_loglik(model: Any, tokenizer: Any, items: list[EvalItem], batch_size: int,
                          solution_tokens: int) -> Scored:
    """A two-step version, cheaply: its greedy solution after the step-1 prompt, then the
    letters' log-probs after the step-2 prompt that holds that solution (what it was trained
    to answer with a letter)."""
    step1 = [chat_text(tokenizer, step1_prompt(i.question, i.choices)) for i in items]
    solutions = generate_texts(model, tokenizer, step1, solution_tokens, batch_size, "step 1")
    step2 = [chat_text(tokenizer, step2_prompt(i.question, i.choices, s))
             for i, s in zip(items, solutions)]
    scored = _from_logprobs(items, letter_logprobs(model, tokenizer, step2, batch_size, "step 2"))
    for detail, solution in zip(scored.detail, solutions):
        detail["solution"] = solution
    return scored


def first_letter(text: str, n_choices: int) -> int | None:
    """A single-step answer starts with its letter ("C. 설명 …"): the strict parse of the first
    line, else of its first word."""
    line = text.strip().split("\n", 1)[0] if text.strip() else ""
    parsed = parse_letter(line, n_choices)
    if parsed is None and line.split():
        parsed = parse_letter(line.split()[0], n_choices)
    return parsed


def score_single_generate(model: Any, tokenizer: Any, items: list[EvalItem], batch_size: int,
                          letter_tokens: int) -> Scored:
    """A single-step version: its greedy answer after the step-1 prompt, letter parsed strictly."""
    step1 = [chat_text(tokenizer, step1_prompt(i.question, i.choices)) for i in items]
    answers = generate_texts(model, tokenizer, step1, letter_tokens, batch_size, "answer")
    predicted = [first_letter(a, len(i.choices)) for i, a in zip(items, answers)]
    return Scored(predicted, [{"answer_text": a} for a in answers])


SCORING_MODES = {("loglik", "single_step"): "loglik: letter after the step-1 prompt",
                 ("loglik", "two_step"): "loglik: letter after the step-2 prompt with the generated solution",
                 ("generate", "single_step"): "generate: the answer's letter after the step-1 prompt",
                 ("generate", "two_step"): "generate: solution, then the letter after the step-2 prompt"}


def make_scorer(model: Any, tokenizer: Any, settings: EvaluateSettings,
                answer_format: str = "single_step") -> Scorer:
    """How a model is scored: ``settings.scoring`` × the way the version answers."""
    gen, size = settings.generation, settings.batch_size
    if settings.scoring == "loglik" and answer_format == "two_step":
        return lambda items: score_solution_loglik(model, tokenizer, items, size,
                                                   gen.solution_max_new_tokens)
    if settings.scoring == "loglik":
        return lambda items: score_loglik(model, tokenizer, items, size)
    if answer_format == "two_step":
        return lambda items: score_generate(model, tokenizer, items, size,
                                            gen.solution_max_new_tokens, gen.letter_max_new_tokens)
    return lambda items: score_single_generate(model, tokenizer, items, size, gen.letter_max_new_tokens)


def trained_answer_format(model_dir: str) -> str:
    """``two_step`` when train recorded that the version learned the two-step format (its
    mixture holds step-2 examples), else ``single_step`` (the base model included)."""
    return _lineage(model_dir).get("answer_format", "single_step")


def _lineage(model_dir: str) -> dict[str, Any]:
    path = Path(model_dir) / "lineage.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def category_formats(model_dir: str, source_categories: dict[str, str]) -> dict[str, str]:
    """The answer format of each contest category for this version: ``two_step`` when a mix
    source of that category (``source_categories``) taught it two-step (lineage.json's
    ``formats_by_source``, the parent's included), else ``single_step`` — a letter, also for
    the categories it never saw. A lineage from before per-source formats: its one format for
    every category; no lineage (the base model): single-step."""
    lineage = _lineage(model_dir)
    by_source = lineage.get("formats_by_source")
    if by_source is None:
        whole = lineage.get("answer_format", "single_step")
        return {category: whole for category in CONTEST_CATEGORIES}
    taught = {source_categories[s] for s, fmt in by_source.items()
              if fmt == "two_step" and s in source_categories}
    return {c: "two_step" if c in taught else "single_step" for c in CONTEST_CATEGORIES}


def unmapped_two_step(model_dir: str, source_categories: dict[str, str]) -> list[str]:
    """Sources that taught this version two-step but name no contest category: their
    category would be scored with a letter (``evaluate.source_categories`` lacks them)."""
    by_source = _lineage(model_dir).get("formats_by_source") or {}
    return sorted(s for s, fmt in by_source.items() if fmt == "two_step" and s not in source_categories)


def score_by_category(items: list[EvalItem], formats: dict[str, str],
                      scorer_for: Callable[[str], Scorer], shuffled: bool, seed: int
                      ) -> list[dict[str, Any]]:
    """Each contest category's items scored in the format the version learned for it (one
    scorer per format: items of every category answered the same way share the passes)."""
    rows: list[dict[str, Any]] = []
    for fmt in sorted(set(formats.values())):
        group = [i for i in items if formats.get(i.contest_category, "single_step") == fmt]
        if group:
            rows += evaluate_items(group, scorer_for(fmt), shuffled, seed, fmt)
    order = {(item.set, item.id): index for index, item in enumerate(items)}
    return sorted(rows, key=lambda r: order[(r["set"], r["id"])])


Z95 = 1.959964


def wilson(correct: int, n: int) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion (sound at 0 and n, unlike the normal one)."""
    if not n:
        return 0.0, 1.0
    p = correct / n
    centre = (p + Z95 ** 2 / (2 * n)) / (1 + Z95 ** 2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95 ** 2 / (4 * n * n)) / (1 + Z95 ** 2 / n)
    return round(max(0.0, centre - half), 6), round(min(1.0, centre + half), 6)


def majority_rate(rows: list[dict[str, Any]]) -> float:
    """Accuracy of always giving the set's most frequent key (for stock: always the more
    frequent direction on the set's own up/down split)."""
    counts = Counter(r["answer"] for r in rows)
    return round(max(counts.values()) / len(rows), 6) if rows else 0.0


def krx_bench(rows: list[dict[str, Any]], formats: dict[str, str]) -> dict[str, Any]:
    """The leaderboard's view: per contest category the items, accuracy with its 95% interval,
    the majority-class rate and the answer format scored; ``average`` over the categories that
    have items (``averaged_over`` says how many of the five). A category without items has only
    ``items: 0``: missing, never 0%."""
    categories: dict[str, Any] = {}
    for category in CONTEST_CATEGORIES:
        group = [r for r in rows if r["contest_category"] == category]
        if not group:
            categories[category] = {"items": 0}
            continue
        correct = sum(bool(r["correct"]) for r in group)
        low, high = wilson(correct, len(group))
        categories[category] = {
            "items": len(group), "correct": correct, "accuracy": round(correct / len(group), 6),
            "ci95_low": low, "ci95_high": high, "majority_rate": majority_rate(group),
            "two_step": formats.get(category) == "two_step"}
    scored = [c["accuracy"] for c in categories.values() if c["items"]]
    return {"categories": categories,
            "average": round(sum(scored) / len(scored), 6) if scored else None,
            "averaged_over": len(scored)}


def drop_long_prompts(items: list[EvalItem], tokenizer: Any, max_tokens: int
                      ) -> tuple[list[EvalItem], list[dict[str, str]]]:
    """Items whose step-1 prompt exceeds ``max_tokens`` are rejected, never truncated (a cut
    prompt would lose the options the answer refers to)."""
    kept, rejects = [], []
    for item in items:
        n = len(tokenizer(chat_text(tokenizer, step1_prompt(item.question, item.choices)),
                          add_special_tokens=False)["input_ids"])
        if n > max_tokens:
            rejects.append(reject(STAGE, item.set, item.id, "prompt_too_long",
                                  f"{n} tokens > max_prompt_tokens {max_tokens}"))
        else:
            kept.append(item)
    return kept, rejects


# ------------------------------------------------------------------------ dev loss
def dev_losses(model: Any, tokenizer: Any, mixture: str, limit: int) -> dict[str, Any]:
    """The answer loss on the version's dev split (its first ``limit`` examples by id) with
    the version's adapter and with the base (adapter off): did training help on held-out
    examples of its own data?"""
    if not Path(mixture).is_file():
        raise StageError(f"evaluate: --dev {mixture} is not a mixture file")
    rows = sorted((r for r in read_records(mixture) if r.get("split") == "dev"),
                  key=lambda r: r["id"])[:limit]
    if not rows:
        return {"examples": 0, "mixture": mixture}
    loss, tokens = answer_loss(model, tokenizer, rows)
    with model.disable_adapter():
        base_loss, _ = answer_loss(model, tokenizer, rows)
    return {"mixture": mixture, "examples": len(rows), "tokens": tokens, "model": round(loss, 4),
            "base": round(base_loss, 4), "delta": round(loss - base_loss, 4)}


def open_prompt(tokenizer: Any, item: OpenItem) -> str:
    """The plain question as the user turn: the same prompt for every version."""
    return chat_text(tokenizer, item.question)


def load_open_items(settings: EvaluateSettings, tokenizer: Any
                    ) -> tuple[list[OpenItem], list[dict[str, str]]]:
    """The open-ended items to answer and the rejects (unreadable or empty rows, repeated
    questions, prompts over ``max_prompt_tokens``)."""
    items, rejects = [], []
    for name, spec in sorted(settings.open_ended.items()):
        got, bad = load_open_ended(name, spec)
        items += got
        rejects += bad
    kept = []
    for item in items:
        n = len(tokenizer(open_prompt(tokenizer, item), add_special_tokens=False)["input_ids"])
        if n > settings.max_prompt_tokens:
            rejects.append(reject(STAGE, item.set, item.id, "prompt_too_long",
                                  f"{n} tokens > max_prompt_tokens {settings.max_prompt_tokens}"))
        else:
            kept.append(item)
    return kept, rejects


def answer_open_ended(model: Any, tokenizer: Any, kept: list[OpenItem], settings: EvaluateSettings,
                      path: str, log: Any) -> dict[str, Any]:
    """Each open-ended question answered greedily (bounded length) -> ``path`` (written also
    when there is no set: the file is a DVC out); the metrics of the answers."""
    limit = settings.generation.open_ended_max_new_tokens
    answers = generate_texts(model, tokenizer, [open_prompt(tokenizer, i) for i in kept], limit,
                             settings.batch_size, "open-ended") if kept else []
    rows = []
    for item, answer in zip(kept, answers):
        tokens = len(tokenizer(answer, add_special_tokens=False)["input_ids"])
        rows.append({"id": item.id, "set": item.set, "category": item.category,
                     "question": item.question, "reference": item.reference, "answer": answer.strip(),
                     "answer_chars": len(answer.strip()), "answer_tokens": tokens,
                     "truncated": tokens >= limit})
    write_records(rows, OPEN_ANSWER_SCHEMA, path)
    if rows:
        log.info("open-ended: %d answers (mean %.0f chars, %d cut at %d tokens) -> %s", len(rows),
                 sum(r["answer_chars"] for r in rows) / len(rows), sum(r["truncated"] for r in rows),
                 limit, path)
    return {"items": len(rows), "truncated": sum(r["truncated"] for r in rows),
            "mean_answer_chars": round(sum(r["answer_chars"] for r in rows) / len(rows), 1)
            if rows else None, "max_new_tokens": limit}


def settle_rejects(key: str, items: list[EvalItem], rejects: list[dict[str, str]],
                   settings: EvaluateSettings, path: str, log: Any, open_items: int = 0) -> None:
    """Log and write the rejects; fail above ``max_reject_rate`` (of every row read: MCQ and
    open-ended items kept, and the rejects of both), with no item left, or on an item outside
    the sets' contract (checked before the model runs)."""
    for r in rejects:
        log.info("reject %s/%s: %s %s", r["source"], r["item"], r["reason"], r["detail"])
    write_records(rejects, SCHEMAS["reject"], path)
    check_reject_rate(len(rejects), len(items) + open_items + len(rejects),
                      settings.max_reject_rate, f"evaluate@{key}")
    if not items:
        raise StageError(f"evaluate@{key}: no items to evaluate")
    for item in items:
        if not MIN_CHOICES <= len(item.choices) <= MAX_CHOICES:
            raise StageError(f"evaluate@{key}: item {item.id} has {len(item.choices)} choices")


def eval_metrics(rows: list[dict[str, Any]], settings: EvaluateSettings, answers: str,
                 formats: dict[str, str]) -> dict[str, Any]:
    """The accuracy part of the metrics: how the version was scored, overall and per contest
    category, and the leaderboard block."""
    modes = {c: SCORING_MODES[(settings.scoring, f)] for c, f in formats.items()}
    two = sorted(c for c, f in formats.items() if f == "two_step")
    scored_as = (next(iter(modes.values())) if len(set(modes.values())) == 1 else
                 f"{settings.scoring}, per category: two-step for {', '.join(two)}; letter for the rest")
    return {"scoring": settings.scoring, "answer_format": answers, "scored_as": scored_as,
            **summarize(rows, settings.shuffled),
            "krx_bench": krx_bench(rows, formats), "scored_as_by_category": modes}


def parse_args(argv: list[str] | None) -> Any:
    parser = stage_parser(__doc__, "key")
    parser.add_argument("--base", required=True, help="the base model dir (base.json, tokenizer)")
    parser.add_argument("--model", required=True, help="the base model dir (baseline) or a "
                                                         "version's adapter dir")
    parser.add_argument("--dev", help="the version's mixture: the answer loss of its dev split "
                                      "with the version and with the base (ignored for the "
                                      "baseline, which dvc.yaml gives its own dir)")
    parser.add_argument("--open-answers", help="the answers to the open-ended sets (parquet), "
                                               "for judge@<key>")
    return parser.parse_args(argv)


@stage_main
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    key = args.key
    timer = Timer()
    settings = load_params(key, args.params)
    model_dir: str = args.model
    log = setup_logging(args.log, f"evaluate@{key}")

    check_model_dirs(args.base, model_dir)
    items, rejects = load_sets(settings)
    model, tokenizer, info = load_model(args.base, model_dir, settings.device, settings.dtype)
    items, too_long = drop_long_prompts(items, tokenizer, settings.max_prompt_tokens)
    open_items, open_rejects = load_open_items(settings, tokenizer)
    if open_items and not args.open_answers:
        raise StageError(f"evaluate@{key}: evaluate.open_ended names sets; pass --open-answers")
    rejects += too_long + open_rejects
    settle_rejects(key, items, rejects, settings, args.rejects, log, len(open_items))

    answers = trained_answer_format(model_dir)
    formats = category_formats(model_dir, settings.source_categories)
    log.info("evaluating %s (%s, adapter=%s, %s) on %d items, scoring=%s, batch %d, %s",
             model_dir, info["base_weights"], info["adapter"], answers, len(items),
             settings.scoring, settings.batch_size, info["device"])
    log.info("answer format per contest category: %s",
             ", ".join(f"{c} {f}" for c, f in formats.items()))
    unmapped = unmapped_two_step(model_dir, settings.source_categories)
    if unmapped:
        log.warning("sources %s taught %s two-step but evaluate.source_categories names no "
                    "category for them: their items are scored with a letter", unmapped, key)
    scoring_timer = Timer()
    rows = score_by_category(items, formats,
                             lambda fmt: make_scorer(model, tokenizer, settings, fmt),
                             settings.shuffled, settings.shuffle_seed)
    scoring_seconds = scoring_timer.seconds
    dev = None
    if info["adapter"] and args.dev and settings.dev_loss_examples:
        dev = dev_losses(model, tokenizer, args.dev, settings.dev_loss_examples)
        log.info("dev loss %s (base %s) on %d examples of %s", dev.get("model"), dev.get("base"),
                 dev["examples"], args.dev)
    write_records(rows, PREDICTION_SCHEMA, args.out)
    open_ended = (answer_open_ended(model, tokenizer, open_items, settings, args.open_answers, log)
                  if args.open_answers else None)
    metrics = {**info, "key": key, **eval_metrics(rows, settings, answers, formats),
               "open_ended": open_ended,
               "dev_loss": dev, "rejected": len(rejects),
               "rejects_by_reason": dict(sorted(Counter(r["reason"] for r in rejects).items())),
               "seconds": timer.seconds, "scoring_seconds": scoring_seconds,
               "items_per_second": round(len(items) * (2 if settings.shuffled else 1) / scoring_seconds, 3)
               if scoring_seconds else None}
    write_metrics(args.metrics, metrics)
    log.info("accuracy micro %.3f macro %.3f (shuffled %s) on %d items -> %s (%.1fs)",
             metrics["accuracy"]["micro"], metrics["accuracy"]["macro"],
             metrics["accuracy"].get("shuffled_micro"), len(items), args.metrics, timer.seconds)
    bench = metrics["krx_bench"]
    log.info("KRX-Bench: %s; average %s over %d of %d categories", ", ".join(
        f"{c} {v['accuracy']:.3f} ({v['items']})" if v["items"] else f"{c} missing"
        for c, v in bench["categories"].items()), bench["average"], bench["averaged_over"],
        len(bench["categories"]))


if __name__ == "__main__":
    # this process never loads 4-bit weights: keep peft from importing bitsandbytes (and, through
    # bitsandbytes' torch.compile decorators, dynamo) only to offer them: ~1.5 s a process. Only
    # here, not in load_model: a process that goes on to train needs bitsandbytes importable
    sys.modules.setdefault("bitsandbytes", None)
    run_and_exit(main)
