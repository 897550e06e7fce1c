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


def tokenized_example(tokenizer: Any, row: dict[str, Any]) -> dict[str, list[int]]:
    """A conversational prompt-completion row as trl tokenizes it: the prompt with the
    generation prompt, then prompt + completion; the completion starts where the two diverge
    (``completion_mask`` 1 from there: the answer, ``<|im_end|>`` and the newline after it)."""
    prompt = chat_ids(tokenizer, row["prompt"], True)
    full = chat_ids(tokenizer, row["prompt"] + row["completion"], False)
    prefix = next((i for i, (a, b) in enumerate(zip(prompt, full)) if a != b),
                  min(len(prompt), len(full)))
    return {"input_ids": full, "completion_mask": [0] * prefix + [1] * (len(full) - prefix)}


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
