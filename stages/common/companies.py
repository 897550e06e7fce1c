"""Company names: which company a document is about, and whether a record names one.

One place for the rule, because two stages must agree on it: ``company`` assigns each
document to a company (and held-out companies to the test split), and ``mix`` keeps the
held-out companies out of every source of every version (any record naming one). A name is
matched on its *core*: NFC, legal-form and sample markers removed ("(주)", "㈜", "주식회사",
"(가상)"), whitespace removed, so "한빛반도체(가상)", "한빛반도체 주식회사" and "한빛 반도체"
are one company. A core shorter than ``MIN_CORE_CHARS`` would match by accident and is an
error.
"""
from __future__ import annotations

import re
import unicodedata
from collections import Counter
from typing import Iterable, Optional

from stages.common.text import unspaced

MIN_CORE_CHARS = 2
_MARKERS = re.compile(r"\((?:주|가상|유|합)\)|㈜|주식회사|\(sample\)", re.IGNORECASE)


def core_name(name: str) -> str:
    """The part of a company name that identifies it (module docstring)."""
    return unspaced(_MARKERS.sub("", unicodedata.normalize("NFC", str(name))))


def squeezed(text: str) -> str:
    """Text as names are searched in it: NFC, no whitespace."""
    return unspaced(unicodedata.normalize("NFC", str(text)))


class CompanyMatcher:
    """Mentions of known companies in text, by core name (longest names first, so that a name
    containing another, e.g. 한빛반도체 and 한빛, counts once, for the longer)."""

    def __init__(self, names: Iterable[str]) -> None:
        self.names: dict[str, str] = {}     # core -> the name as first given
        for name in names:
            core = core_name(name)
            if len(core) < MIN_CORE_CHARS:
                raise ValueError(f"company name {name!r} is too short to match reliably "
                                 f"(core {core!r})")
            self.names.setdefault(core, name)
        cores = sorted(self.names, key=lambda c: (-len(c), c))
        self._pattern = re.compile("|".join(re.escape(c) for c in cores)) if cores else None

    def __bool__(self) -> bool:
        return bool(self.names)

    def mentions(self, text: str) -> Counter:
        """name -> number of (non-overlapping) mentions in ``text``."""
        if self._pattern is None:
            return Counter()
        return Counter(self.names[m.group(0)] for m in self._pattern.finditer(squeezed(text)))

    def names_in(self, text: str) -> set[str]:
        return set(self.mentions(text))

    def main_company(self, title: str, text: str) -> Optional[str]:
        """The company a document is about: named in its title (the most mentioned of those
        when several are), else the most mentioned in its text; ties -> the name first in
        sorted order (deterministic); None when it names no known company."""
        for counts in (self.mentions(title), self.mentions(text)):
            if counts:
                top = max(counts.values())
                return sorted(n for n, c in counts.items() if c == top)[0]
        return None
