"""What the LLM client (``llm.py``) and its Batch API path (``llm_batch.py``) both need: the
error that stops a stage for good and the redaction of secrets from text bound for logs and
rejects. Its own module so that neither of the two imports the other back."""
from __future__ import annotations

import os
import re

from stages.common.runlog import StageError

API_KEY_ENV = "OPENAI_API_KEY"
_KEY_LIKE = re.compile(r"sk-[A-Za-z0-9_\-*]{6,}")


class FatalLLMError(StageError):
    """A failure every further call would repeat (credentials, quota, unknown model)."""


def redact(text: str) -> str:
    """Remove the api key (and anything key-shaped) from text bound for logs or rejects."""
    secret = os.environ.get(API_KEY_ENV, "")
    if len(secret) >= 4:
        text = text.replace(secret, "***")
    return _KEY_LIKE.sub("sk-***", text)
