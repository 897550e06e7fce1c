"""The one place for prompt text: the training-data MCQ format and the LLM templates.

The MCQ training format is the original pipeline's (MISSION.md, seeds/kmmlu_finance_dataset_pipeline.md):

step 1  prompt   ``다음 문제를 읽고 정답으로 가장 알맞은 것을 고르시요.\\n### 질문: …\\n### 선택지:\\nA. …\\n…G. …\\n### 정답:``
        response the systematic solution
step 2  prompt   step-1 prompt + ``"\\n"`` + solution
        response the final letter

Every stage that writes or reads this format (solve, mix, evaluate) calls these functions,
so training and evaluation can never drift apart. LLM prompt templates (Korean) are files in
``stages/prompts/``, loaded with :func:`load_template` — they are dvc deps of the stages
that use them.
"""
from __future__ import annotations

import random
import string
from pathlib import Path
from typing import Any, Sequence

LETTERS = "ABCDEFG"
MCQ_INSTRUCTION = "다음 문제를 읽고 정답으로 가장 알맞은 것을 고르시요."
ANSWER_MARKER = "### 정답:"
TEMPLATE_DIR = Path(__file__).resolve().parents[1] / "prompts"


def letter(index: int) -> str:
    """0-based choice index -> letter (A…G)."""
    if not 0 <= index < len(LETTERS):
        raise ValueError(f"choice index {index} is outside A–G")
    return LETTERS[index]


def letter_index(value: str) -> int:
    """Letter (A…G, any case, surrounding space/period allowed) -> 0-based index."""
    text = value.strip().rstrip(".").strip().upper()
    if len(text) != 1 or text not in LETTERS:
        raise ValueError(f"{value!r} is not a choice letter A–G")
    return LETTERS.index(text)


def mcq_question_block(question: str, choices: Sequence[str]) -> str:
    """Instruction, question and lettered choices — without the answer marker."""
    if not 2 <= len(choices) <= len(LETTERS):
        raise ValueError(f"need 2–{len(LETTERS)} choices, got {len(choices)}")
    lines = [MCQ_INSTRUCTION, f"### 질문: {question.strip()}", "### 선택지:"]
    lines += [f"{LETTERS[i]}. {choice.strip()}" for i, choice in enumerate(choices)]
    return "\n".join(lines)


def step1_prompt(question: str, choices: Sequence[str]) -> str:
    """Step-1 prompt: the question block + ``"\\n### 정답:"``; the response is the solution."""
    return mcq_question_block(question, choices) + "\n" + ANSWER_MARKER


def step2_prompt(question: str, choices: Sequence[str], solution: str) -> str:
    """Step-2 prompt: step-1 prompt + ``"\\n"`` + solution; the response is the letter."""
    return step1_prompt(question, choices) + "\n" + solution.strip()


def place_answer(choices: Sequence[str], answer: int, target: int,
                 shuffle_seed: int | None = None) -> list[str]:
    """``choices`` with ``choices[answer]`` moved to position ``target``: the other choices keep
    their order, or are shuffled by a RNG seeded with ``shuffle_seed`` (deterministic)."""
    rest = [c for i, c in enumerate(choices) if i != answer]
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(rest)
    return rest[:target] + [choices[answer]] + rest[target:]


def load_template(name: str) -> str:
    """A prompt template file from ``stages/prompts/`` (UTF-8), e.g. ``"judge_system.txt"``."""
    path = TEMPLATE_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"prompt template {path} does not exist")
    return path.read_text(encoding="utf-8")


def render_template(name: str, **values: Any) -> str:
    """Template ``name`` with its ``$placeholders`` filled (``string.Template``: literal JSON
    braces need no escaping, ``$$`` is a dollar sign). A placeholder without a value is a
    ``KeyError`` naming it, never a silently empty prompt. Surrounding whitespace is stripped."""
    return string.Template(load_template(name)).substitute(
        {key: str(value) for key, value in values.items()}).strip()


def lettered(choices: Sequence[str]) -> str:
    """``A. …\nB. …`` lines for ``choices`` (the format used inside LLM prompts)."""
    return "\n".join(f"{letter(i)}. {choice.strip()}" for i, choice in enumerate(choices))
