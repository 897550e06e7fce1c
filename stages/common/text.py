"""Text normalisation and content hashing shared by every stage.

Why one module: ids must be computed the same way everywhere (collect, extract, mixtures),
otherwise dedup and decontamination across stages silently stop matching.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import unicodedata
from typing import Any

_WS_RUN = re.compile(r"[ \t\u00a0\u3000]+")
_MANY_NEWLINES = re.compile(r"\n{3,}")
# Control characters other than tab/newline; they come from bad encodings and PDF streams.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def normalize_text(value: Any) -> str:
    """NFC-normalise, unify newlines, drop control chars and BOMs, collapse spaces, strip.

    ``None`` and NaN become ``""``. Korean text from PDFs and Windows tools often arrives in
    NFD (decomposed jamo) or with CRLF; without NFC the same question hashes differently.
    """
    if value is None:
        return ""
    if isinstance(value, float) and value != value:  # NaN from pandas
        return ""
    text = str(value)
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\ufeff", "")
    text = unicodedata.normalize("NFC", text)
    text = _CONTROL.sub("", text)
    lines = [_WS_RUN.sub(" ", line).strip() for line in text.split("\n")]
    text = "\n".join(lines).strip()
    return _MANY_NEWLINES.sub("\n\n", text)


def unspaced(text: str) -> str:
    """``text`` without any whitespace (``str.split`` splits on all Unicode whitespace): the
    form texts are compared in where Korean spacing or PDF line breaks must not matter."""
    return "".join(text.split())


def content_id(*parts: Any, length: int = 16) -> str:
    """Stable id: sha256 over the JSON of the (already normalised) parts, hex, truncated.

    JSON (not str()) so that ``("a", "b")`` and ``("a\\x1fb",)`` cannot collide and lists
    hash by content.
    """
    payload = json.dumps(parts, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:length]


def file_sha256(path: str, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk_size), b""):
            digest.update(block)
    return digest.hexdigest()


def path_sha256(path: str) -> str:
    """sha256 of a file; of a directory: over its files' relative paths and sha256s, in a
    fixed order (the identity of a directory input in manifests and lineage)."""
    if not os.path.isdir(path):
        return file_sha256(path)
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            digest.update(f"{os.path.relpath(full, path)}\0{file_sha256(full)}\n".encode())
    return digest.hexdigest()


def _is_expected_char(ch: str) -> bool:
    code = ord(ch)
    if ch.isspace() or ch.isascii() and (ch.isprintable()):
        return True
    if 0xAC00 <= code <= 0xD7A3:  # Hangul syllables
        return True
    if 0x1100 <= code <= 0x11FF or 0x3130 <= code <= 0x318F:  # jamo
        return True
    if 0x4E00 <= code <= 0x9FFF:  # CJK ideographs (hanja in statutes)
        return True
    category = unicodedata.category(ch)
    # Punctuation, symbols, digits, letters of Latin scripts (e.g. ①②, ·, ㈜, ‘’, é).
    if category[0] in ("P", "S", "N"):
        return True
    if category[0] == "L" and code < 0x0250:
        return True
    if 0x3000 <= code <= 0x303F or 0xFF00 <= code <= 0xFFEF or 0x3200 <= code <= 0x33FF:
        return True
    return False


def garbled_ratio(text: str) -> float:
    """Share of characters that are unlikely in Korean/English financial text.

    Broken font encodings in PDFs produce private-use glyphs, replacement characters,
    stray Latin-extended or Cyrillic letters; the ratio is what the extract stage
    thresholds on. Whitespace-only text returns 0.0.
    """
    chars = [c for c in text if not c.isspace()]
    if not chars:
        return 0.0
    bad = sum(1 for c in chars if c == "\ufffd" or not _is_expected_char(c))
    return bad / len(chars)


def hangul_ratio(text: str) -> float:
    """Share of non-space characters that are Hangul syllables or jamo."""
    chars = [c for c in text if not c.isspace()]
    if not chars:
        return 0.0
    hangul = sum(1 for c in chars if 0xAC00 <= ord(c) <= 0xD7A3 or 0x3130 <= ord(c) <= 0x318F)
    return hangul / len(chars)
