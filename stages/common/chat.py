"""Training examples as token ids, the way trl's SFTTrainer tokenizes them: one place for
train (which hands these columns to trl) and evaluate (the dev-split loss)."""
from __future__ import annotations

import math
from typing import Any


def chat_ids(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
    """``apply_chat_template`` ids of ``messages`` (plus the assistant header when asked)."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        add_generation_prompt=generation_prompt)
    return list(out["input_ids"])


def _diverge(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def tokenized_example(tokenizer: Any, row: dict[str, Any]) -> dict[str, list[int]]:
    """A conversational prompt-completion row as trl tokenizes it: the prompt with the
    generation prompt, then prompt + completion; the completion starts where the two diverge
    (``completion_mask`` 1 from there: the answer, ``<|im_end|>`` and the newline after it).

    A completion with ``tool`` turns (assistant, tool, assistant …: the agent conversations)
    has the loss on its assistant turns only: each tool turn, and the header of the assistant
    turn after it (the harness writes it, as it writes the tool output), are masked — the
    model learns to call and to answer from real output, never to produce the output."""
    prompt = chat_ids(tokenizer, row["prompt"], True)
    full = chat_ids(tokenizer, row["prompt"] + row["completion"], False)
    prefix = _diverge(prompt, full)
    mask = [0] * prefix + [1] * (len(full) - prefix)
    completion = row["completion"]
    for j, message in enumerate(completion):
        if message["role"] != "tool":
            continue
        before = _diverge(chat_ids(tokenizer, row["prompt"] + completion[:j], False), full)
        after_ids = chat_ids(tokenizer, row["prompt"] + completion[:j + 1],
                             j + 1 < len(completion) and completion[j + 1]["role"] == "assistant")
        after = _diverge(after_ids, full)
        for i in range(before, after):
            mask[i] = 0
    return {"input_ids": full, "completion_mask": mask}


def answer_loss(model: Any, tokenizer: Any, rows: list[dict[str, Any]]) -> tuple[float, int]:
    """Training's loss on ``rows``: the mean negative log-likelihood of the completion tokens
    (answer, ``<|im_end|>``, newline), pooled over all of them; logits only where a completion
    token is predicted. Returns (loss, tokens). (A 4-bit model trained afterwards on the CPU
    must keep its training layout: ``stages.train.keep_4bit_training_layout``.)"""
    import torch

    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    with torch.no_grad():
        for row in rows:
            example = tokenized_example(tokenizer, row)
            ids = example["input_ids"]
            targets = [i for i in range(1, len(ids)) if example["completion_mask"][i]]
            if not targets:
                continue
            keep = torch.tensor([t - 1 for t in targets], device=device)
            inputs = torch.tensor([ids], device=device)
            logits = model(input_ids=inputs, use_cache=False, logits_to_keep=keep).logits[0]
            logp = torch.log_softmax(logits.float(), dim=-1)
            picked = logp[torch.arange(len(targets)), torch.tensor([ids[t] for t in targets])]
            total -= picked.sum().item()
            tokens += len(targets)
    return (total / tokens if tokens else math.nan), tokens
