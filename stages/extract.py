"""extract@<collection>: a directory of PDFs → one document record per page + one JSON per PDF.

    python -m stages.extract <collection> --out data/collected/<c>.parquet \\
        --json-dir data/collected/<c>_json --rejects data/rejects/extract/<c>.parquet \\
        --metrics metrics/extract/<c>.json --log logs/extract/<c>.log [--params params.yaml]

Reads ``extract.<collection>`` (:class:`ExtractParams`, below) and every
regular, non-hidden file under its ``input`` directory (recursively, sorted by relative
path). Outputs, all written atomically:

``--out``       ``document`` records (``SCHEMAS["document"]``), one per emitted page, in
                (path, page) order. ``doc_id`` is the first 16 hex digits of the file's
                sha256 (content-based: renaming a file keeps its ids), ``id`` is
                ``content_id(doc_id, page)``, ``page`` is 1-based, ``text`` is the NFC page
                body in reading order, ``tables`` the page's tables as rows of cell strings,
                ``meta`` JSON ``{file_sha256, page_count, garbled_ratio,
                header_footer_lines_removed, flags}``.
``--json-dir``  ``<doc_id>.json`` per emitted PDF (what model v3 trains on): ``{doc_id,
                source, path, title, page_count, pages: [{page, text, tables}], meta}``.
``--rejects``   ``reject`` records, always written (possibly empty). Item is the relative
                path for a file, ``path#page`` for a page.
``--metrics``   counts, reject reasons, seconds, pages/s (see :class:`Totals`).

Reject reasons. File level (the whole PDF yields nothing; these count towards
``max_reject_rate``): ``empty_file`` (0 bytes), ``not_a_pdf`` (no ``.pdf`` suffix, or no
``%PDF-`` header in the first KiB), ``encrypted`` (needs a user password), ``corrupt``
(MuPDF cannot open it, it has no pages, or a page cannot be loaded), ``truncated`` (see
below), ``image_only`` (fewer than ``min_text_chars`` characters in all pages, and images:
no text layer, scanned?), ``no_text`` (as few characters and no image at all: blank), ``duplicate_file`` (same sha256 as an earlier emitted file; the detail names it),
``no_usable_pages`` (every page was rejected individually), ``extraction_error`` (an
unexpected exception; the detail holds it — the stage never crashes on one file).
Page level (the page is not emitted, the rest of the PDF is): ``empty_page`` (only running
headers/footers, or only images), ``no_text`` (a blank page: neither text nor images),
``garbled_text`` (``garbled_ratio`` above ``max_garbled_ratio``).

Decisions, and why:

* **Text comes from ``page.get_text("words")``**, grouped into MuPDF's lines
  (:func:`lines_from_words`), and the layout is worked out on lines, not blocks: when two
  columns share baselines MuPDF puts each left line and its right neighbour into one block
  spanning the page, so block-level ordering would interleave the columns. MuPDF does
  split *lines* at a gap of about one em. Words are also what table cells are read from,
  and unlike ``"blocks"`` they do not leak memory in PyMuPDF 2.0 (pymupdf/PyMuPDF#5067:
  every block tuple keeps an extra reference, ~15 KB per page). Cost: ~30 % more than
  plain ``get_text()``.
* **Reading order** (:func:`order_lines`): lines wholly in the left or the right half are
  column candidates; a line crossing the middle (a title, a full-width line) separates
  bands, and so does an empty horizontal strip taller than two line heights. A band
  whose left and right lines overlap vertically, and whose two sides both
  look like column text (long lines: the median fills ≥ :data:`MIN_COLUMN_FILL` of half
  the page), is two-column: its whole left column is read before its right one, so two
  columns never interleave. Otherwise (a right-aligned date above a short line, labels
  and figures set apart on the same baselines) plain top-to-bottom, left-to-right order.
* **Running headers/footers** (:func:`remove_headers_footers`): a line in the top/bottom
  ``zone`` is removed when the same text with digits masked (page numbers) appears at the
  same height (±1 % of the page) on at least ``min_share`` of the document's pages, for
  documents with at least ``min_pages`` pages. The height condition keeps a document title
  on page 1 that happens to repeat the running header's text lower down.
* **Tables** (``tables: true``): ``page.find_tables(use_layout=False)``, i.e. PyMuPDF's
  ruling-line detector. PyMuPDF 2.0 with pymupdf-layout installed otherwise runs an ONNX
  layout model per page first: ~3.4× slower (0.4 s/page single process, ~1 s/page in a
  2-process pool where its thread pools oversubscribe the cores) and a neural model's
  output is a weaker determinism guarantee across machines than a geometric rule.
  Borderless tables are therefore read as body text. The line detector builds edges only
  from the page's vector drawings, so pages whose drawings cannot form a cell (none, or
  rules in one direction only: :func:`may_hold_table`) skip it: same result, ~100× faster
  there. Cell text is read from MuPDF's words (:func:`cell_texts`), not
  ``Table.extract()``, which splits "1,284" into "1284\\n,". Text lines whose centre lies
  inside a table's bbox are left out of the body text (the table is kept once, in
  ``tables``); a page whose only content is tables gets the tables as ``cell | cell`` lines
  for its ``text`` (flag ``table_only``) so that it is still a valid record. With
  ``tables: false`` ``find_tables`` is never called.
* **Truncated and repaired files**: an intact cross-reference table proves every object is
  reachable, so a file that merely lacks its final ``%%EOF`` marker but opens without
  repair and whose pages all load is emitted with flag ``missing_eof``. A file without
  ``%%EOF`` that MuPDF had to repair (or cannot open, or that has no pages, or a page of
  which fails to load) is rejected ``truncated``: objects are missing and the pages that
  survive are a silently partial document. A file *with* ``%%EOF`` that needed repair (a
  broken xref, e.g. a bad edit) is emitted with flag ``repaired`` when its pages load, else
  rejected ``corrupt``.
* **Duplicates**: the first file in sorted path order is kept; a later file with the same
  sha256 is rejected ``duplicate_file`` only if the earlier one was emitted (two identical
  corrupt files both get their own, more useful, reason).
* **Parallelism**: a process pool (``workers``; 0 = the CPUs this process may use), fed
  through ``imap(chunksize=1)`` in sorted order with at most ``2 × workers`` files in
  flight, so results never pile up in the parent: peak memory is bounded by the largest
  PDFs, not by their number. Page records are streamed into a ``ParquetWriter`` in fixed
  batches of :data:`WRITE_BATCH` rows (fixed row groups → deterministic bytes). With one
  worker everything runs in-process (no pool), for debugging.
"""
from __future__ import annotations

import argparse
import bisect
import json
import logging
import math
import multiprocessing
import os
import re
import sys
import threading
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

# `import pymupdf` also imports pymupdf.layout when it is installed (requirements.lock has
# it, for pymupdf4llm): ONNX models costing ~1.1 s and ~50 MB in every process, for a
# layout analyser this stage never uses (see find_page_tables). Hide it for this import
# only; a later `import pymupdf.layout` elsewhere still works.
if "pymupdf" not in sys.modules and "pymupdf.layout" not in sys.modules:
    sys.modules["pymupdf.layout"] = None  # type: ignore[assignment]
    try:
        import pymupdf
    finally:
        del sys.modules["pymupdf.layout"]
else:
    import pymupdf
if hasattr(pymupdf, "no_recommend_layout"):
    pymupdf.no_recommend_layout()  # find_tables would advertise the analyser we hid

from stages.common.io import atomic_dir, atomic_path, dumps_json, open_parquet_writer, write_records
from stages.common.params import PARAMS_FILE, Strict, read_section
from stages.common.runlog import (StageError, Timer, check_reject_rate, progress, setup_logging,
                                  stage_main, stage_parser, write_metrics)
from stages.common.schema import SCHEMAS, reject, validate
from stages.common.text import content_id, file_sha256, garbled_ratio, normalize_text

PARAMS = ("extract.{key}",)
STAGE = "extract"


# ---------------------------------------------------------------------------- params
class HeaderFooterParams(Strict):
    zone: float = Field(0.12, gt=0, lt=0.5, description="top/bottom fraction of the page searched")
    min_pages: int = Field(3, ge=2, description="only documents with at least this many pages")
    min_share: float = Field(0.5, gt=0, le=1.0,
                             description="a line repeated (digits masked) on this share of pages is dropped")
    max_chars: int = Field(120, ge=1, description="longer lines are never page furniture")


class ExtractParams(Strict):
    input: str = Field(description="directory of PDFs (searched recursively)")
    workers: int = Field(0, ge=0, le=512, description="processes; 0 = one per core")
    tables: bool = Field(True, description="find_tables() per page (slow: switch off for speed)")
    max_garbled_ratio: float = Field(0.3, ge=0, le=1)
    min_text_chars: int = Field(20, ge=0, description="a document below this many characters in "
                                                     "all pages is image-only (no text layer)")
    max_reject_rate: float = Field(0.5, ge=0, le=1)
    header_footer: HeaderFooterParams = Field(default_factory=HeaderFooterParams)


def load_params(key: str, path: str = PARAMS_FILE) -> "ExtractParams":
    return read_section(PARAMS, ExtractParams, key, path=path)


# Acrobat's tolerances: the header may follow up to 1 KiB of junk, %%EOF may be followed
# by up to 1 KiB of padding. Wider windows would accept more garbage as PDF.
PDF_HEADER_WINDOW = 1024
PDF_EOF_WINDOW = 1024
# Explicit rather than PyMuPDF's default for "words" (which could change between
# versions): keep ligatures/whitespace as written (normalize_text cleans up), ignore text
# outside the page, and emit unknown glyphs as their CID so broken encodings show up in
# garbled_ratio instead of vanishing.
TEXT_FLAGS = (pymupdf.TEXT_PRESERVE_LIGATURES | pymupdf.TEXT_PRESERVE_WHITESPACE
              | pymupdf.TEXT_MEDIABOX_CLIP | pymupdf.TEXT_CID_FOR_UNKNOWN_UNICODE)
COLUMN_TOLERANCE = 0.01          # share of page width a column line may cross the middle by
MIN_COLUMN_FILL = 0.4            # median line width / half page width of column text
BAND_GAP_LINES = 2.0             # an empty strip this many line heights tall ends a band
SAME_LINE_TOLERANCE = 2.0        # points: lines whose tops differ by less share a row
HEADER_POSITION_TOLERANCE = 0.01  # share of page height a repeated header may move by
WRITE_BATCH = 1000               # page records per Parquet row group
RULE_THICKNESS = 3.0             # points: PyMuPDF's snap tolerance; thinner paths are rules
_DIGITS = re.compile(r"\d+")
_TOP_LEFT = itemgetter(1, 0)      # Line -> (y0, x0)
_LEFT = itemgetter(0)             # Line -> x0
_WORD_ORDER = itemgetter(5, 6, 7)  # Word -> (block, line, word number)


# ----------------------------------------------------------------------------- layout types
Box = tuple[float, float, float, float]                       # x0, y0, x1, y1
Word = tuple[float, float, float, float, str, int, int, int]  # get_text("words") tuples


class Line(NamedTuple):
    """One MuPDF text line: its bbox (page coordinates, origin top-left) and its words
    joined by single spaces."""
    x0: float
    y0: float
    x1: float
    y1: float
    text: str


class PageLayout(NamedTuple):
    width: float
    height: float
    lines: tuple[Line, ...]


# ----------------------------------------------------------------------------- pure layout work
def lines_from_words(words: Iterable[Word]) -> tuple[Line, ...]:
    """Group ``get_text("words")`` tuples into MuPDF's lines, in MuPDF's order.

    MuPDF starts a new line at a horizontal gap of about one em, so the lines of two
    columns stay apart even when MuPDF puts them in the same block (it does, when they
    share baselines) — which is why the stage works on lines, not blocks. (A plain loop:
    ~5× faster than groupby + min/max, and it runs for every word of every page.)
    """
    lines = []
    key = None
    texts: list[str] = []
    lx0 = ly0 = lx1 = ly1 = 0.0
    for x0, y0, x1, y1, text, block_no, line_no, _ in words:
        if (block_no, line_no) != key:
            if key is not None:
                lines.append(Line(lx0, ly0, lx1, ly1, " ".join(texts)))
            key, texts = (block_no, line_no), [text]
            lx0, ly0, lx1, ly1 = x0, y0, x1, y1
            continue
        texts.append(text)
        if x0 < lx0:
            lx0 = x0
        if y0 < ly0:
            ly0 = y0
        if x1 > lx1:
            lx1 = x1
        if y1 > ly1:
            ly1 = y1
    if key is not None:
        lines.append(Line(lx0, ly0, lx1, ly1, " ".join(texts)))
    return tuple(lines)


def page_words(page: pymupdf.Page) -> list[Word]:
    """The page's words (see the module docstring for why words, not blocks)."""
    return page.get_text("words", flags=TEXT_FLAGS)


def header_key(text: str) -> str:
    """The text a repeated header is recognised by: whitespace collapsed, digit runs → ``#``."""
    return _DIGITS.sub("#", " ".join(text.split()))


def furniture(page: PageLayout, repeated: set[int], zone: float, max_chars: int) -> set[int]:
    """The ``repeated`` lines of the page that are page furniture, not body text.

    Walking from the body towards the page edge, a repeated line closer to the body text
    below (above, for a footer) than one line height is part of that text, and so is every
    repeated line chained to it the same way; from the first clear gap outwards, the short
    repeated lines inside ``zone`` are furniture. A page whose repeated lines touch nothing
    else keeps them: removing them would blank it."""
    lines = page.lines
    height = sorted(l.y1 - l.y0 for l in lines)[len(lines) // 2] if lines else 0.0
    kept_zone = (zone * page.height, (1 - zone) * page.height)
    found: set[int] = set()
    for top in (True, False):
        side = [i for i in repeated if (lines[i].y1 <= kept_zone[0] if top else lines[i].y0 >= kept_zone[1])]
        body = [l for i, l in enumerate(lines) if i not in repeated
                and (l.y0 > max((lines[j].y0 for j in side), default=-1.0) if top
                     else l.y1 < min((lines[j].y1 for j in side), default=float("inf")))]
        if not side or not body:
            continue
        anchor = min(l.y0 for l in body) if top else max(l.y1 for l in body)
        for index in sorted(side, key=lambda i: lines[i].y0, reverse=top):
            line = lines[index]
            distance = anchor - line.y1 if top else line.y0 - anchor
            if distance < height:  # set at the body's spacing: part of the text
                anchor = line.y0 if top else line.y1
                continue
            found |= {i for i in side if (lines[i].y0 <= line.y0 if top else lines[i].y0 >= line.y0)
                      and len(lines[i].text) <= max_chars}
            break
    return found


def remove_headers_footers(pages: Sequence[PageLayout], params: HeaderFooterParams
                           ) -> tuple[list[PageLayout], list[int]]:
    """Drop running headers/footers from a document's pages.

    A line is a candidate when it lies wholly inside the top or bottom ``params.zone`` of its
    page and its :func:`header_key` occurs, at the same relative height (±
    :data:`HEADER_POSITION_TOLERANCE`), inside the zone of at least ``params.min_share`` of the
    pages; a candidate is removed only when it is page furniture (:func:`furniture`: set apart
    from the body text, short), never a body line that happens to repeat. Documents with fewer
    than ``params.min_pages`` pages are returned unchanged. Returns the new pages and the
    number of lines removed from each.
    """
    count = len(pages)
    if count < params.min_pages:
        return list(pages), [0] * count
    needed = max(1, math.ceil(params.min_share * count - 1e-9))
    # key -> [(relative height of the line's middle, page index, line index)]
    candidates: dict[str, list[tuple[float, int, int]]] = defaultdict(list)
    for p_index, page in enumerate(pages):
        if page.height <= 0:
            continue
        top, bottom = params.zone * page.height, (1 - params.zone) * page.height
        for l_index, line in enumerate(page.lines):
            if line.y1 <= top or line.y0 >= bottom:
                key = header_key(line.text)
                if key:
                    middle = (line.y0 + line.y1) / 2 / page.height
                    candidates[key].append((middle, p_index, l_index))

    drop: dict[int, set[int]] = defaultdict(set)  # page index -> line indices
    for occurrences in candidates.values():
        if len({o[1] for o in occurrences}) < needed:
            continue
        occurrences.sort()
        heights = [o[0] for o in occurrences]
        for middle, p_index, l_index in occurrences:
            lo = bisect.bisect_left(heights, middle - HEADER_POSITION_TOLERANCE)
            hi = bisect.bisect_right(heights, middle + HEADER_POSITION_TOLERANCE)
            if len({occurrences[i][1] for i in range(lo, hi)}) >= needed:
                drop[p_index].add(l_index)

    result, removed = list(pages), [0] * count
    for p_index, repeated in drop.items():  # only the pages that lose lines are rebuilt
        page = pages[p_index]
        dropped = furniture(page, repeated, params.zone, params.max_chars)
        if not dropped:
            continue
        result[p_index] = page._replace(
            lines=tuple(line for i, line in enumerate(page.lines) if i not in dropped))
        removed[p_index] = len(dropped)
    return result, removed


def _merge_row(row: list[Line]) -> Line:
    """Lines sharing a row (a label and its figure, set apart) as one line, left to right."""
    if len(row) == 1:
        return row[0]
    row = sorted(row, key=_LEFT)
    return Line(row[0].x0, min(l.y0 for l in row), max(l.x1 for l in row),
                max(l.y1 for l in row), " ".join(l.text for l in row))


def _reading_order(lines: Iterable[Line]) -> list[Line]:
    """Top to bottom; lines whose tops are within SAME_LINE_TOLERANCE form one row, read
    left to right and merged into one line."""
    ordered: list[Line] = []
    row: list[Line] = []
    for line in sorted(lines, key=_TOP_LEFT):
        if row and line.y0 - row[0].y0 > SAME_LINE_TOLERANCE:
            ordered.append(_merge_row(row))
            row = []
        row.append(line)
    if row:
        ordered.append(_merge_row(row))
    return ordered


def _is_column(lines: Sequence[Line], half_width: float) -> bool:
    """Column text fills its column: most lines are long. Labels and figures set apart on
    the same baselines (``매출액 …… 1,284억``) are short; they are rows, not columns."""
    widths = sorted(line.x1 - line.x0 for line in lines)
    return widths[len(widths) // 2] >= MIN_COLUMN_FILL * half_width


def order_lines(lines: Sequence[Line], page_width: float) -> tuple[list[Line], bool]:
    """Lines in reading order, and whether a two-column band was found.

    Lines wholly in the left half (right edge ≤ middle + tolerance) or wholly in the right
    half are column candidates. A band of them ends at a line crossing the middle (a title,
    a full-width line) or at an empty horizontal strip taller than :data:`BAND_GAP_LINES`
    median line heights. A band is two-column when it has lines on both sides that overlap
    vertically and both sides look like column text (:func:`_is_column`); its left column
    is then read entirely before its right column, so the two never interleave. Anything
    else reads top to bottom, left to right.
    """
    if not lines:
        return [], False
    middle = page_width / 2
    left_edge, right_edge = middle + COLUMN_TOLERANCE * page_width, middle - COLUMN_TOLERANCE * page_width
    heights = sorted(line.y1 - line.y0 for line in lines)
    band_gap = BAND_GAP_LINES * heights[len(heights) // 2]
    ordered: list[Line] = []
    left: list[Line] = []
    right: list[Line] = []
    band_bottom = 0.0
    two_column = False

    def flush() -> None:
        nonlocal two_column
        if not left and not right:
            return  # the common case: consecutive full-width lines
        if (left and right
                and (min(max(l.y1 for l in left), max(l.y1 for l in right))
                     > max(min(l.y0 for l in left), min(l.y0 for l in right)))
                and _is_column(left, middle) and _is_column(right, middle)):
            ordered.extend(_reading_order(left))
            ordered.extend(_reading_order(right))
            two_column = True
        else:
            ordered.extend(_reading_order(left + right))
        left.clear()
        right.clear()

    for line in sorted(lines, key=_TOP_LEFT):
        side = left if line.x1 <= left_edge else right if line.x0 >= right_edge else None
        if side is None:
            flush()
            ordered.append(line)
            continue
        if (left or right) and line.y0 - band_bottom > band_gap:
            flush()  # a wide empty strip across the page: what follows is a new band
        band_bottom = max(band_bottom, line.y1) if (left or right) else line.y1
        side.append(line)
    flush()
    return ordered, two_column


def page_text(lines: Iterable[Line]) -> str:
    """The page body: one line per line, through :func:`normalize_text` (NFC, whitespace
    runs collapsed, at most one blank line)."""
    return normalize_text("\n".join(line.text for line in lines))


def tables_as_text(tables: Sequence[Sequence[Sequence[str]]]) -> str:
    """Tables as ``cell | cell`` lines, a blank line between tables (table-only pages)."""
    return normalize_text("\n\n".join(
        "\n".join(" | ".join(cell.replace("\n", " ") for cell in row) for row in table)
        for table in tables))


def _centre_inside(box: Box, bbox: Sequence[float]) -> bool:
    cx, cy = (bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2
    return box[0] <= cx <= box[2] and box[1] <= cy <= box[3]


def exclude_table_lines(lines: Iterable[Line], boxes: Sequence[Box]) -> list[Line]:
    """Lines whose centre is outside every table bbox (table text lives in ``tables``)."""
    if not boxes:
        return list(lines)
    return [line for line in lines if not any(_centre_inside(box, line) for box in boxes)]


# garbled_ratio skips str.isspace() characters and always accepts ASCII printables, Hangul
# syllables and CJK ideographs. (A "\\s" regex would do, but is ~4× slower than counting.)
_WHITESPACE = tuple(chr(c) for c in range(0x3100) if chr(c).isspace())
_COMMON_CHARS = re.compile("[" + "".join(_WHITESPACE)
                           + r"\x21-\x7e\uac00-\ud7a3\u4e00-\u9fff]+")


def page_garbled_ratio(text: str) -> float:
    """Exactly ``garbled_ratio(text)``, ~4× faster on ordinary Korean text.

    Characters ``garbled_ratio`` always accepts are stripped with one regex first, leaving
    it a handful of characters to classify one by one instead of the whole page (which
    was ~10 % of the stage's time).
    """
    visible = len(text) - sum(text.count(c) for c in _WHITESPACE)
    if not visible:
        return 0.0
    rest = _COMMON_CHARS.sub("", text)
    if not rest:
        return 0.0
    bad = round(garbled_ratio(rest) * len(rest))  # rest has no whitespace: len == its count
    return bad / visible


def cell_texts(cells: Sequence[Sequence[Box | None]], words: Sequence[Word]) -> list[list[str]]:
    """The text of each cell of a table grid: the words whose centre lies in the cell, in
    MuPDF's (block, line, word) order, one line per text line; ``None`` (a cell covered by
    a merged neighbour) → ``""``. NFC-normalised."""
    rows = []
    for row in cells:
        boxes = [box for box in row if box is not None]
        if not boxes:
            rows.append([""] * len(row))
            continue
        top, bottom = min(b[1] for b in boxes), max(b[3] for b in boxes)
        in_row = [w for w in words if top <= (w[1] + w[3]) / 2 <= bottom]
        texts = []
        for box in row:
            if box is None:
                texts.append("")
                continue
            lines: dict[tuple[int, int], list[str]] = {}
            for w in sorted((w for w in in_row if _centre_inside(box, w)), key=_WORD_ORDER):
                lines.setdefault((w[5], w[6]), []).append(w[4])
            texts.append(normalize_text("\n".join(" ".join(line) for line in lines.values())))
        rows.append(texts)
    return rows


def may_hold_table(paths: Iterable[dict[str, Any]]) -> bool:
    """Whether vector graphics (``page.get_cdrawings()``) could give the ruling-line detector
    a cell. It builds edges from drawings only, and a cell needs rules in both directions:
    a page whose drawings are all horizontal rules (header/footer separators, underlines)
    or all vertical ones cannot hold a table, and skipping find_tables there changes no
    result (statute print-outs: every page has two such rules). Any path that is not a
    thin straight rule (a box, a grid drawn as one path, a curve, a shaded area) counts as
    both directions."""
    horizontal = vertical = False
    for path in paths:
        x0, y0, x1, y1 = path["rect"]
        if y1 - y0 <= RULE_THICKNESS < x1 - x0:
            horizontal = True
        elif x1 - x0 <= RULE_THICKNESS < y1 - y0:
            vertical = True
        else:
            return True
        if horizontal and vertical:
            return True
    return False


def find_page_tables(page: pymupdf.Page, words: Sequence[Word]) -> list[tuple[Box, list[list[str]]]]:
    """``(bbox, rows of cell strings)`` for each ruled table on the page, top to bottom as
    PyMuPDF finds them; tables whose cells are all empty are dropped.

    Pages that fail :func:`may_hold_table` return ``[]`` without calling find_tables. The
    grid comes from ``find_tables(use_layout=False)`` (see the module docstring), the
    cell text from :func:`cell_texts` over the page's ``words`` rather than
    ``Table.extract()``: in PyMuPDF 2.0 extract() puts punctuation with small glyph boxes on
    a line of its own ("1,284" → "1284\\n,", "12.5%" → "125%\\n."), corrupting figures.
    """
    if not may_hold_table(page.get_cdrawings()):
        return []
    found = []
    for table in page.find_tables(use_layout=False).tables:
        rows = cell_texts([row.cells for row in table.rows], words)
        if any(cell for row in rows for cell in row):
            found.append((tuple(table.bbox), rows))
    return found


# ----------------------------------------------------------------------------- one file
@dataclass
class FileResult:
    """What one input file produced. ``file_reject`` is the file-level reason, or ``None``
    when ``pages`` (validated document records, in page order) are emitted."""
    rel_path: str
    sha256: str = ""
    title: str = ""
    page_count: int = 0
    pages: list[dict[str, Any]] = field(default_factory=list)
    rejects: list[dict[str, str]] = field(default_factory=list)
    file_reject: str | None = None
    flags: list[str] = field(default_factory=list)
    pages_rejected: int = 0
    tables: int = 0
    header_footer_lines_removed: int = 0
    chars: int = 0
    warnings: list[str] = field(default_factory=list)  # MuPDF's, for the log
    document_json: str = ""

    @property
    def doc_id(self) -> str:
        return self.sha256[:16]


class _Rejected(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _sniff(path: str) -> tuple[int, bytes, bytes]:
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        head = handle.read(PDF_HEADER_WINDOW)
        handle.seek(max(0, size - PDF_EOF_WINDOW))
        tail = handle.read(PDF_EOF_WINDOW)
    return size, head, tail


def _mupdf_warnings() -> list[str]:
    return [w for w in pymupdf.TOOLS.mupdf_warnings(reset=True).splitlines() if w.strip()]


def extract_pdf(path: str, rel_path: str, params: ExtractParams, collection: str) -> FileResult:
    """Extract one file. Never raises for a bad file: every failure is a reject in the result.

    ``path`` is where to read it, ``rel_path`` (POSIX, relative to the input directory) is
    what records and rejects name it by.
    """
    result = FileResult(rel_path=rel_path)
    _mupdf_warnings()  # start this file with an empty warning buffer
    try:
        _extract_into(result, path, params, collection)
    except _Rejected as exc:
        _reject_file(result, collection, exc.reason, exc.detail)
    except Exception as exc:  # noqa: BLE001 — one bad file must not stop the stage
        _reject_file(result, collection, "extraction_error", f"{type(exc).__name__}: {exc}")
    result.warnings = _mupdf_warnings()
    return result


def _reject_file(result: FileResult, collection: str, reason: str, detail: str) -> None:
    result.file_reject = reason
    result.pages = []
    result.rejects = [reject(STAGE, collection, result.rel_path, reason, detail)]
    result.pages_rejected = 0


_Tables = list[tuple[Box, list[list[str]]]]  # one page's find_page_tables()


def _extract_into(result: FileResult, path: str, params: ExtractParams, collection: str) -> None:
    """Fill ``result`` from the file at ``path``; raise :class:`_Rejected` for a file-level reject."""
    has_eof = _check_pdf_file(result, path)
    layouts, page_tables, images = _read_pages(result, path, params, has_eof)

    had_text = [bool(layout.lines) for layout in layouts]
    layouts, removed = remove_headers_footers(layouts, params.header_footer)
    texts, page_flags = _page_texts(layouts, page_tables, result.flags)
    total_chars = sum(len(t) for t in texts)
    if total_chars < params.min_text_chars and any(images):
        raise _Rejected("image_only", f"{total_chars} text characters in {result.page_count} pages "
                                      f"< min_text_chars {params.min_text_chars}, {sum(images)} "
                                      "image(s): no text layer (scanned?)")
    if total_chars < params.min_text_chars:
        raise _Rejected("no_text", f"{total_chars} text characters and no images in "
                                   f"{result.page_count} pages (< min_text_chars "
                                   f"{params.min_text_chars}): a blank document")

    reasons = _emit_pages(result, zip(texts, page_tables, page_flags, removed, had_text, images),
                          params, collection)
    result.pages_rejected = sum(reasons.values())
    if not result.pages:
        summary = ", ".join(f"{reason} ×{n}" for reason, n in sorted(reasons.items()))
        page_rejects = result.rejects
        _reject_file(result, collection, "no_usable_pages",
                     f"all {result.page_count} pages rejected: {summary}")
        result.rejects = page_rejects + result.rejects  # keep the per-page reasons too
        result.pages_rejected = sum(reasons.values())


def _check_pdf_file(result: FileResult, path: str) -> bool:
    """Hash the file and reject what is not a PDF at all; return whether it ends in ``%%EOF``."""
    size, head, tail = _sniff(path)
    result.sha256 = file_sha256(path)
    if size == 0:
        raise _Rejected("empty_file", "0 bytes")
    if not result.rel_path.lower().endswith(".pdf"):
        raise _Rejected("not_a_pdf", f"not a .pdf file ({size} bytes, starts with {head[:16]!r})")
    if b"%PDF-" not in head:
        raise _Rejected("not_a_pdf", f"no %PDF- header in the first {PDF_HEADER_WINDOW} bytes "
                                     f"(starts with {head[:16]!r})")
    return b"%%EOF" in tail


def _read_pages(result: FileResult, path: str, params: ExtractParams, has_eof: bool
                ) -> tuple[list[PageLayout], list[_Tables], list[int]]:
    """Open the PDF, fill in its page count, flags and title, and read every page's lines,
    tables and number of images."""
    broken = "corrupt" if has_eof else "truncated"
    no_eof = "" if has_eof else f"; no %%EOF in the last {PDF_EOF_WINDOW} bytes"
    try:
        doc = pymupdf.open(path, filetype="pdf")
    except (RuntimeError, ValueError) as exc:  # FileDataError, EmptyFileError
        raise _Rejected(broken, f"MuPDF cannot open it: {exc}{no_eof}") from None
    with doc:
        if doc.needs_pass:
            raise _Rejected("encrypted", "needs a password to open")
        repaired = bool(doc.is_repaired)
        if doc.page_count == 0:
            raise _Rejected(broken, f"no pages (repaired={repaired}){no_eof}")
        if repaired and not has_eof:
            raise _Rejected("truncated", f"MuPDF had to repair the cross-reference table{no_eof}")
        result.page_count = doc.page_count
        result.flags = (["repaired"] if repaired else []) + ([] if has_eof else ["missing_eof"])
        result.title = _document_title(doc, result.rel_path, params)

        layouts: list[PageLayout] = []
        page_tables: list[_Tables] = []
        images: list[int] = []
        for index in range(doc.page_count):
            try:
                page = doc.load_page(index)
                words = page_words(page)
                rect = page.rect
                layouts.append(PageLayout(rect.width, rect.height, lines_from_words(words)))
                page_tables.append(find_page_tables(page, words) if params.tables else [])
                images.append(len(page.get_images(full=False)))
            except RuntimeError as exc:  # MuPDF errors: broken page tree or content stream
                raise _Rejected(broken, f"page {index + 1} cannot be read: {exc}{no_eof}") from None
    return layouts, page_tables, images


def _document_title(doc: pymupdf.Document, rel_path: str, params: ExtractParams) -> str:
    """The PDF's metadata title, or the file name's stem when it is missing or garbled."""
    title = normalize_text((doc.metadata or {}).get("title"))
    if not title or garbled_ratio(title) > params.max_garbled_ratio:
        title = normalize_text(Path(rel_path).stem)  # mis-encoded titles are common
    return title


def _page_texts(layouts: Sequence[PageLayout], page_tables: Sequence[_Tables],
                flags: list[str]) -> tuple[list[str], list[list[str]]]:
    """Each page's body text in reading order (tables left out) and its sorted flags."""
    texts, page_flags = [], []
    for layout, tables in zip(layouts, page_tables):
        body = exclude_table_lines(layout.lines, [box for box, _ in tables])
        ordered, two_column = order_lines(body, layout.width)
        text = page_text(ordered)
        these_flags = list(flags) + (["two_column"] if two_column else [])
        if not text and tables:
            text = tables_as_text([rows for _, rows in tables])
            these_flags.append("table_only")
        texts.append(text)
        page_flags.append(sorted(these_flags))
    return texts, page_flags


def _emit_pages(result: FileResult,
                pages: Iterable[tuple[str, _Tables, list[str], int, bool, int]],
                params: ExtractParams, collection: str) -> Counter[str]:
    """Add a record, or a page-level reject, to ``result`` per page; count the rejects by reason.

    ``pages`` holds ``(text, tables, flags, header_footer_lines_removed, had_text, images)``
    per page.
    """
    reasons: Counter[str] = Counter()
    for number, (text, tables, these_flags, removed_lines, any_text, n_images) in \
            enumerate(pages, start=1):
        item = f"{result.rel_path}#{number}"
        if not text:
            reason, detail = ("empty_page", "only running header/footer lines") if any_text else \
                ("empty_page", f"no text layer, {n_images} image(s) (scanned page?)") if n_images else \
                ("no_text", "neither text nor images: a blank page")
            reasons[reason] += 1
            result.rejects.append(reject(STAGE, collection, item, reason, detail))
            continue
        ratio = page_garbled_ratio(text)
        if ratio > params.max_garbled_ratio:
            reasons["garbled_text"] += 1
            result.rejects.append(reject(STAGE, collection, item, "garbled_text",
                                         f"garbled_ratio {ratio:.4f} > max_garbled_ratio "
                                         f"{params.max_garbled_ratio}", raw=text[:200]))
            continue
        record = _page_record(result, collection, number, text, tables, these_flags, ratio,
                              removed_lines)
        result.pages.append(record)
        result.tables += len(record["tables"])
        result.header_footer_lines_removed += removed_lines
        result.chars += len(text)
    return reasons


def _page_record(result: FileResult, collection: str, number: int, text: str,
                 tables: _Tables, flags: list[str], ratio: float,
                 removed_lines: int) -> dict[str, Any]:
    """The validated ``document`` record of page ``number`` (1-based)."""
    doc_id = result.doc_id
    meta = {"file_sha256": result.sha256, "page_count": result.page_count,
            "garbled_ratio": round(ratio, 4), "header_footer_lines_removed": removed_lines,
            "flags": flags}
    record = {"id": content_id(doc_id, number), "source": collection, "doc_id": doc_id,
              "path": result.rel_path, "page": number, "title": result.title, "text": text,
              "tables": [rows for _, rows in tables],
              "meta": json.dumps(meta, ensure_ascii=False, sort_keys=True, separators=(",", ":"))}
    problems = validate("document", record)
    if problems:
        raise ValueError(f"page {number} makes an invalid record: {'; '.join(problems)}")
    return record


def document_json(result: FileResult, collection: str) -> str:
    """The per-PDF JSON (canonical: :func:`dumps_json`) for an emitted document."""
    return dumps_json({
        "doc_id": result.doc_id, "source": collection, "path": result.rel_path,
        "title": result.title, "page_count": result.page_count,
        "pages": [{"page": r["page"], "text": r["text"], "tables": r["tables"]} for r in result.pages],
        "meta": {"file_sha256": result.sha256, "flags": result.flags,
                 "pages_rejected": result.pages_rejected, "tables": result.tables,
                 "header_footer_lines_removed": result.header_footer_lines_removed},
    })


def mark_duplicate(result: FileResult, seen: dict[str, str], collection: str) -> FileResult:
    """Reject ``result`` as ``duplicate_file`` when an earlier emitted file had its sha256;
    otherwise remember it. Call in sorted path order: the first file wins."""
    if result.file_reject is not None:
        return result
    earlier = seen.get(result.sha256)
    if earlier is None:
        seen[result.sha256] = result.rel_path
        return result
    _reject_file(result, collection, "duplicate_file", f"same sha256 as {earlier}")
    result.document_json = ""
    result.tables = result.header_footer_lines_removed = result.chars = 0
    return result


# ----------------------------------------------------------------------------- many files
def list_input_files(root: Path) -> list[str]:
    """Every regular, non-hidden file under ``root`` (hidden directories are skipped), as
    sorted POSIX paths relative to ``root``. Non-PDFs are listed on purpose: they become
    ``not_a_pdf`` rejects rather than being silently ignored."""
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        for name in files:
            full = os.path.join(directory, name)
            if not name.startswith(".") and os.path.isfile(full):
                found.append(Path(os.path.relpath(full, root)).as_posix())
    return sorted(found)


def available_cpus() -> int:
    """CPUs this process may run on (affinity/cgroup-aware where Python can tell)."""
    if hasattr(os, "process_cpu_count"):
        return os.process_cpu_count() or 1
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def resolve_workers(requested: int, n_files: int) -> int:
    """``requested`` processes (0 = one per available CPU), never more than files."""
    return max(1, min(requested or available_cpus(), n_files))


_WORKER: dict[str, Any] = {}


def _init_worker(params: ExtractParams, collection: str) -> None:
    """Per-process setup (pool initializer, or the parent itself when workers == 1)."""
    _WORKER["params"], _WORKER["collection"] = params, collection
    # MuPDF would print repair warnings for every broken file on stderr; they are collected
    # per file instead (FileResult.warnings) and logged by the parent.
    pymupdf.TOOLS.mupdf_display_errors(False)
    pymupdf.TOOLS.mupdf_display_warnings(False)


def _process_file(task: tuple[str, str]) -> FileResult:
    path, rel_path = task
    params, collection = _WORKER["params"], _WORKER["collection"]
    result = extract_pdf(path, rel_path, params, collection)
    if result.file_reject is None:
        result.document_json = document_json(result, collection)
    return result


def run_files(tasks: Sequence[tuple[str, str]], params: ExtractParams, collection: str,
              workers: int) -> Iterator[FileResult]:
    """Yield a :class:`FileResult` per ``(path, rel_path)`` task, in task order.

    ``workers == 1`` runs in this process. Otherwise a pool reads the tasks through a
    semaphore the consumer releases per result, so at most ``2 × workers`` results exist
    at any time however slowly the caller writes them.
    """
    initargs = (params, collection)
    if workers <= 1:
        _init_worker(*initargs)
        for task in tasks:
            yield _process_file(task)
        return

    window = threading.BoundedSemaphore(2 * workers)
    stop = threading.Event()

    def feed() -> Iterator[tuple[str, str]]:
        # Runs in the pool's task-handler thread; must not block forever once we stop.
        for task in tasks:
            while not window.acquire(timeout=0.1):
                if stop.is_set():
                    return
            if stop.is_set():
                return
            yield task

    pool = multiprocessing.get_context().Pool(workers, initializer=_init_worker, initargs=initargs)
    try:
        for result in pool.imap(_process_file, feed(), chunksize=1):
            yield result
            window.release()
        pool.close()
    finally:
        stop.set()
        pool.terminate()
        pool.join()


@dataclass
class Totals:
    """The metrics of one run (see ``as_metrics``)."""
    files: int = 0
    documents: int = 0
    pages: int = 0
    pages_read: int = 0
    pages_rejected: int = 0
    files_rejected: int = 0
    tables: int = 0
    header_footer_lines_removed: int = 0
    chars: int = 0
    rejects_by_reason: Counter = field(default_factory=Counter)

    def add(self, result: FileResult) -> None:
        self.files += 1
        self.pages_read += result.page_count
        self.pages_rejected += result.pages_rejected
        self.rejects_by_reason.update(r["reason"] for r in result.rejects)
        if result.file_reject is not None:
            self.files_rejected += 1
            return
        self.documents += 1
        self.pages += len(result.pages)
        self.tables += result.tables
        self.header_footer_lines_removed += result.header_footer_lines_removed
        self.chars += result.chars

    def as_metrics(self, seconds: float, workers: int) -> dict[str, Any]:
        return {"files": self.files, "documents": self.documents, "pages": self.pages,
                "pages_read": self.pages_read, "pages_rejected": self.pages_rejected,
                "files_rejected": self.files_rejected,
                "rejects_by_reason": dict(sorted(self.rejects_by_reason.items())),
                "tables": self.tables,
                "header_footer_lines_removed": self.header_footer_lines_removed,
                "chars": self.chars, "seconds": seconds,
                "pages_per_second": round(self.pages_read / seconds, 2) if seconds else 0.0,
                "workers": workers}


def records_table(records: Sequence[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Records as an Arrow table, column by column (2× faster than ``from_pylist``)."""
    return pa.Table.from_pydict({name: [r[name] for r in records] for name in schema.names},
                                schema=schema)


# ----------------------------------------------------------------------------- the stage
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = stage_parser(__doc__, "collection", key_help="key under extract: in params.yaml", out_help="page records (Parquet)")
    parser.add_argument("--json-dir", required=True, help="one <doc_id>.json per PDF")
    return parser.parse_args(argv)


@stage_main
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    collection = args.collection
    params = load_params(collection, args.params)
    root, files = _input_files(params, collection)

    logger = setup_logging(args.log, f"extract@{collection}")
    workers = resolve_workers(params.workers, len(files))
    logger.info("%d files under %s, %d worker(s), tables %s", len(files), root, workers,
                "on" if params.tables else "off")
    timer, totals = Timer(), Totals()
    tasks = [(str(root / rel), rel) for rel in files]
    with atomic_path(args.out) as tmp_out, atomic_dir(args.json_dir) as tmp_json:
        results = progress(run_files(tasks, params, collection, workers),
                           desc=f"extract@{collection}", total=len(tasks))
        rejects = _write_documents(results, tmp_out, tmp_json, totals, collection, logger)
        # The rejects are written before the rate check so a failed run still shows why.
        write_records(rejects, SCHEMAS["reject"], args.rejects)
        seconds = timer.seconds
        _log_totals(logger, totals, seconds)
        try:
            check_reject_rate(totals.files_rejected, totals.files, params.max_reject_rate,
                              f"extract@{collection} (PDF files; rejects in {args.rejects})")
        except StageError as exc:
            logger.error("%s", exc)
            raise
    write_metrics(args.metrics, totals.as_metrics(seconds, workers))


def _input_files(params: ExtractParams, collection: str) -> tuple[Path, list[str]]:
    """The input directory and its files (see :func:`list_input_files`); a StageError if none."""
    root = Path(params.input)
    if not root.is_dir():
        what = "is not a directory" if root.exists() else "does not exist"
        raise StageError(f"extract.{collection}.input: the PDF directory {str(root)!r} {what} "
                         f"(relative to {os.getcwd()})")
    files = list_input_files(root)
    if not files:
        raise StageError(f"extract.{collection}.input: no files in {str(root)!r} "
                         "(hidden files are ignored)")
    return root, files


def _write_documents(results: Iterable[FileResult], out: Path, json_dir: Path, totals: Totals,
                     collection: str, logger: logging.Logger) -> list[dict[str, str]]:
    """Stream emitted pages into ``out`` and per-PDF JSON into ``json_dir``; return all rejects."""
    seen: dict[str, str] = {}
    rejects: list[dict[str, str]] = []
    schema = SCHEMAS["document"]
    writer = open_parquet_writer(out, schema)
    batch: list[dict[str, Any]] = []
    try:
        for result in results:
            result = mark_duplicate(result, seen, collection)
            totals.add(result)
            rejects.extend(result.rejects)
            _log_result(logger, result)
            if result.file_reject is not None:
                continue
            with open(json_dir / f"{result.doc_id}.json", "w", encoding="utf-8",
                      newline="\n") as handle:
                handle.write(result.document_json)
            batch.extend(result.pages)
            _write_batches(writer, batch, schema)
        _write_batches(writer, batch, schema, final=True)
    finally:
        writer.close()
    return rejects


def _write_batches(writer: pq.ParquetWriter, batch: list[dict[str, Any]], schema: pa.Schema, *,
                   final: bool = False) -> None:
    """Write and drop full :data:`WRITE_BATCH`-row groups from ``batch`` (all of it when ``final``)."""
    # Fixed-size row groups, whatever the document sizes: deterministic bytes.
    while len(batch) >= (1 if final else WRITE_BATCH):
        writer.write_table(records_table(batch[:WRITE_BATCH], schema))
        del batch[:WRITE_BATCH]


def _log_result(logger: logging.Logger, result: FileResult) -> None:
    """Log a file's rejects, and MuPDF's warnings for a file that was flagged."""
    for record in result.rejects:
        logger.warning("rejected %s: %s (%s)", record["item"], record["reason"], record["detail"])
    if result.warnings and result.flags:
        logger.info("%s: flags %s; MuPDF: %s", result.rel_path, result.flags,
                    " / ".join(result.warnings[:3]))


def _log_totals(logger: logging.Logger, totals: Totals, seconds: float) -> None:
    """Log the run's one-line summary."""
    logger.info("%d files → %d documents, %d pages (%d pages and %d files rejected: %s); "
                "%.1f s, %.1f pages/s", totals.files, totals.documents, totals.pages,
                totals.pages_rejected, totals.files_rejected,
                dict(sorted(totals.rejects_by_reason.items())), seconds,
                totals.pages_read / seconds if seconds else 0.0)


if __name__ == "__main__":
    main()
