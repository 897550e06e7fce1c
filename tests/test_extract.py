"""extract@<collection>: layout (columns, headers, tables), every reject reason, the CLI's
clear errors, determinism, and the real statute PDFs in ../shared/real/pdfs.

PDFs are built with PyMuPDF inside tmp_path; Korean text uses PyMuPDF's built-in CJK font
reference ("korea", not embedded: small and fast to write).
"""
from __future__ import annotations

import json
import random
import re
import unicodedata
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

import stages.extract as extract
from stages.extract import ExtractParams, HeaderFooterParams
from stages.common.schema import validate
from stages.common.text import garbled_ratio
from stages.extract import (FileResult, Line, PageLayout, cell_texts, extract_pdf, lines_from_words,
                            list_input_files, mark_duplicate, order_lines, page_garbled_ratio,
                            furniture, page_text, remove_headers_footers, resolve_workers)
from tests.conftest import run_stage

import pymupdf  # after stages.extract, which imports it without the unused layout models

REAL_PDFS = Path(__file__).resolve().parents[1] / ".." / "shared" / "real" / "pdfs"
KO = "korea"
WIDTH, HEIGHT = 595, 842


# ============================================================================ builders
def params(**overrides) -> ExtractParams:
    return ExtractParams.model_validate({"input": "unused", "workers": 1, **overrides})


def put(page: pymupdf.Page, x: float, y: float, text: str, size: float = 10) -> None:
    page.insert_text((x, y), text, fontname=KO, fontsize=size)


def body(page: pymupdf.Page, text: str, top: float = 100, bottom: float = 700) -> None:
    left = page.insert_textbox(pymupdf.Rect(50, top, WIDTH - 50, bottom), text, fontname=KO,
                               fontsize=10, lineheight=1.5)
    assert left >= 0, "test text does not fit"


def paragraph(n: int) -> str:
    return (f"{n}번째 문단입니다. 이 문단은 추출 단계의 시험을 위해 작성한 문장으로 이루어져 있으며 "
            "금융 보고서의 본문처럼 한 줄을 가득 채울 만큼 충분히 깁니다. ") * 2


def make_pdf(path: Path, pages, title: str = "", **save) -> Path:
    """``pages``: one callable per page, drawing on a blank A4 page."""
    doc = pymupdf.open()
    for draw in pages:
        draw(doc.new_page(width=WIDTH, height=HEIGHT))
    doc.set_metadata({"title": title})
    path.parent.mkdir(parents=True, exist_ok=True)
    doc.save(path, **save)
    return path


def report_pages(count: int, start: int = 1):
    """Pages with a running header and footer (page number inside) and distinct bodies."""
    def draw(number: int):
        def page(p: pymupdf.Page) -> None:
            put(p, 50, 40, f"테스트 보고서 | 페이지 {number}", size=9)
            put(p, 50, HEIGHT - 25, f"확인용 문서 · {number} / {count}", size=8)
            body(p, paragraph(number))
        return page
    return [draw(n) for n in range(start, start + count)]


def two_column_page(p: pymupdf.Page) -> None:
    put(p, 50, 60, "두 단 배치 시험 문서의 제목입니다 (전체 폭 제목 줄)", size=11)
    for i in range(1, 9):  # shared baselines: MuPDF puts each pair into one block
        put(p, 50, 90 + i * 16, f"왼쪽단 {i}번째 줄은 왼쪽 단의 본문입니다")
        put(p, 320, 90 + i * 16, f"오른쪽단 {i}번째 줄은 오른쪽 단입니다")


def ruled_table(p: pymupdf.Page, rows, x: float = 50, y: float = 300, widths=(120, 110, 110),
                height: float = 22) -> None:
    for r in range(len(rows) + 1):
        p.draw_line((x, y + r * height), (x + sum(widths), y + r * height))
    edge = x
    for w in (0, *widths):
        edge += w
        p.draw_line((edge, y), (edge, y + len(rows) * height))
    for r, row in enumerate(rows):
        left = x
        for w, cell in zip(widths, row):
            put(p, left + 5, y + r * height + 15, cell, size=9.5)
            left += w


TABLE = [["구분", "2023년", "2024년"], ["매출액", "1,146억", "1,284억"],
         ["영업이익률", "5.1%", "12.5%"]]


def only_reject(result: FileResult) -> dict:
    assert result.pages == []
    assert len(result.rejects) == 1, result.rejects
    return result.rejects[0]


# ============================================================================ pure layout
def line(x0, y0, x1, text, height=10.0) -> Line:
    return Line(x0, y0, x1, y0 + height, text)


def test_lines_from_words_groups_words_by_mupdf_line():
    words = [(50, 100, 80, 110, "매출액은", 0, 0, 0), (85, 99, 120, 111, "늘었다", 0, 0, 1),
             (320, 100, 360, 110, "오른쪽", 0, 1, 0), (50, 120, 90, 130, "둘째", 1, 0, 0)]
    assert lines_from_words(words) == (Line(50, 99, 120, 111, "매출액은 늘었다"),
                                       Line(320, 100, 360, 110, "오른쪽"),
                                       Line(50, 120, 90, 130, "둘째"))


def test_order_lines_reads_the_left_column_before_the_right_one():
    lines = [line(50, 40, 545, "제목이 전체 폭에 걸쳐 있습니다")]
    for i in range(4):  # same baselines on both sides, given in interleaved order
        lines += [line(50, 100 + 16 * i, 285, f"L{i}"), line(320, 100 + 16 * i, 545, f"R{i}")]
    lines.append(line(50, 400, 545, "맺음말도 전체 폭입니다"))
    ordered, two_column = order_lines(lines, WIDTH)
    assert [l.text for l in ordered] == ["제목이 전체 폭에 걸쳐 있습니다", "L0", "L1", "L2", "L3",
                                         "R0", "R1", "R2", "R3", "맺음말도 전체 폭입니다"]
    assert two_column


def test_order_lines_keeps_labels_and_figures_as_rows():
    lines = []
    for i, (label, figure) in enumerate([("매출액", "1,284억"), ("영업이익", "96억")]):
        lines += [line(50, 100 + 16 * i, 90, label), line(480, 100 + 16 * i, 545, figure)]
    ordered, two_column = order_lines(lines, WIDTH)
    assert [l.text for l in ordered] == ["매출액 1,284억", "영업이익 96억"]
    assert not two_column


def test_order_lines_right_aligned_line_above_short_lines_reads_top_down():
    lines = [line(400, 80, 545, "2024. 3. 1."), line(50, 100, 200, "제1조(목적)"),
             line(50, 116, 200, "제2조(정의)")]
    ordered, two_column = order_lines(lines, WIDTH)
    assert [l.text for l in ordered] == ["2024. 3. 1.", "제1조(목적)", "제2조(정의)"]
    assert not two_column


def test_order_lines_a_wide_empty_strip_ends_a_column_band():
    lines = []
    for i in range(3):
        lines += [line(50, 100 + 16 * i, 285, f"L{i}"), line(320, 100 + 16 * i, 545, f"R{i}")]
    lines += [line(50, 300, 90, "매출액"), line(480, 300, 545, "1,284억")]
    ordered, two_column = order_lines(lines, WIDTH)
    assert [l.text for l in ordered] == ["L0", "L1", "L2", "R0", "R1", "R2", "매출액 1,284억"]
    assert two_column


def layout(*lines: Line) -> PageLayout:
    return PageLayout(WIDTH, HEIGHT, tuple(lines))


def test_remove_headers_footers_drops_only_repeated_lines_at_the_same_height():
    pages = [layout(line(50, 30, 200, "법제처 1 국가법령정보센터"), line(50, 31 + 50, 200, "법제처 1 국가법령정보센터"),
                    line(50, 60, 545, "1쪽 본문 첫 줄, 머리 영역 안에 있음"), line(50, 400, 545, "본문"),
                    line(250, 815, 300, "- 1 -"))]
    for n, word in zip(range(2, 6), ["둘째", "셋째", "넷째", "다섯째"]):
        pages.append(layout(line(50, 30.5, 200, f"법제처 {n} 국가법령정보센터"),
                            line(50, 60, 545, f"{word} 쪽 본문 첫 줄"), line(50, 400, 545, "본문"),
                            line(250, 815, 300, f"- {n} -")))
    cleaned, removed = remove_headers_footers(pages, HeaderFooterParams())
    assert removed == [2, 2, 2, 2, 2]
    first = [l.text for l in cleaned[0].lines]
    # page 1's second copy sits lower: not a running header, kept; so are unique zone lines
    assert first == ["법제처 1 국가법령정보센터", "1쪽 본문 첫 줄, 머리 영역 안에 있음", "본문"]
    assert [l.text for l in cleaned[3].lines] == ["넷째 쪽 본문 첫 줄", "본문"]
    assert "본문" in [l.text for l in cleaned[1].lines]  # repeated, but not in a zone


def test_body_lines_that_repeat_at_the_top_of_every_page_are_kept(tmp_path):
    """Pages that start alike (the same three body lines, at the same height, inside the top
    zone) lose only their running header: the repeated lines are set at the body's spacing,
    so they are text, not furniture (issue: 3 body lines were lost per page)."""
    opening = ["가나전자 분기 보고서 요약", "본 보고서는 회사의 영업 현황을 정리한 것입니다", "주요 지표는 다음과 같습니다"]

    def draw(number: int):
        def page(p: pymupdf.Page) -> None:
            put(p, 50, 30, f"가나전자 | {number}쪽", size=9)
            for row, text in enumerate(opening):
                put(p, 50, 70 + 15 * row, text)
            for row in range(6):
                put(p, 50, 115 + 15 * row, f"{number}쪽 고유 본문 {row}번째 줄입니다")
        return page
    pdf = make_pdf(tmp_path / "alike.pdf", [draw(n) for n in range(1, 5)])
    result = extract_pdf(str(pdf), "alike.pdf", params(), "c")
    assert result.header_footer_lines_removed == 4  # the header, once per page
    for record in result.pages:
        lines = record["text"].split("\n")
        assert lines[:3] == opening and "가나전자 |" not in record["text"]


def test_furniture_needs_a_gap_from_the_body():
    header = line(50, 30, 200, "머리글 1")
    touching = [line(50, 60 + 14 * i, 545, f"반복 본문 {i}") for i in range(3)]
    page = layout(header, *touching, line(50, 102, 545, "고유 본문"), line(50, 116, 545, "고유 둘째"))
    # all four repeat; only the header is set apart from the body (gap 20 > line height 10)
    assert furniture(page, {0, 1, 2, 3}, 0.12, 120) == {0}
    assert furniture(page, {0, 1, 2, 3}, 0.12, 3) == set()  # longer than max_chars: kept
    alone = layout(line(50, 30, 200, "표지"), line(50, 80, 200, "표지 부제"))
    assert furniture(alone, {0, 1}, 0.12, 120) == set()  # nothing else on the page: kept


@pytest.mark.parametrize("pages_with_header,count,expect_removed", [
    (2, 2, False),   # fewer than min_pages (3)
    (1, 4, False),   # on 1 of 4 pages: below min_share 0.5
    (2, 4, True),    # on 2 of 4 pages: exactly min_share
])
def test_remove_headers_footers_thresholds(pages_with_header, count, expect_removed):
    pages = [layout(line(50, 30, 200, f"머리글 {n}") if n < pages_with_header else line(50, 400, 300, "x"),
                    line(50, 400, 545, f"본문 {n}")) for n in range(count)]
    _, removed = remove_headers_footers(pages, HeaderFooterParams())
    assert (sum(removed) == pages_with_header) is expect_removed
    assert sum(removed) in (0, pages_with_header)


def test_page_text_is_nfc_with_spaces_collapsed():
    nfd = unicodedata.normalize("NFD", "가나전자 매출액")
    assert nfd != "가나전자 매출액"
    text = page_text([line(50, 100, 300, nfd + "   \u3000 증가"), line(50, 120, 300, "둘째 줄")])
    assert text == "가나전자 매출액 증가\n둘째 줄"
    assert unicodedata.is_normalized("NFC", text)


def test_page_garbled_ratio_is_exactly_garbled_ratio():
    rng = random.Random(7)
    alphabet = "가나다 라\n\t\u3000\u2003\u00a0abcXYZ123.,!ЖжéÆ\ufffd\ue000①·㈜‘’漢字\u1100\u3131"
    samples = ["", "   ", "정상적인 한국어 문장입니다.", "Жизнь " * 5, "\ue000\ue001가"]
    samples += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80))) for _ in range(3000)]
    for text in samples:
        assert page_garbled_ratio(text) == pytest.approx(garbled_ratio(text), abs=1e-12), repr(text)


def test_cell_texts_reads_the_words_inside_each_cell():
    cells = [[(0, 0, 100, 20), (100, 0, 200, 20)], [(0, 20, 100, 50), None]]
    words = [(5, 5, 40, 15, "매출액", 0, 0, 0), (105, 5, 150, 15, "1,284억", 1, 0, 0),
             (5, 24, 40, 34, "영업", 2, 0, 0), (42, 24, 70, 34, "이익", 2, 0, 1),
             (5, 36, 40, 46, "(연결)", 2, 1, 0), (300, 5, 340, 15, "표 밖", 3, 0, 0)]
    assert cell_texts(cells, words) == [["매출액", "1,284억"], ["영업 이익\n(연결)", ""]]


def test_list_input_files_is_recursive_sorted_and_skips_hidden(tmp_path):
    for rel in ["b.pdf", "a/z.PDF", "a/notes.txt", ".hidden.pdf", ".git/x.pdf", "a/.DS_Store"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    assert list_input_files(tmp_path) == ["a/notes.txt", "a/z.PDF", "b.pdf"]


def test_resolve_workers():
    assert resolve_workers(4, 2) == 2          # never more processes than files
    assert resolve_workers(3, 10) == 3
    assert 1 <= resolve_workers(0, 1000) <= 1000  # 0 = one per available CPU


# ============================================================================ real PDFs built here
def test_two_column_page_never_interleaves(tmp_path):
    pdf = make_pdf(tmp_path / "cols.pdf", [two_column_page])
    result = extract_pdf(str(pdf), "cols.pdf", params(), "c")
    assert result.file_reject is None
    text = result.pages[0]["text"]
    left = [m.start() for m in re.finditer("왼쪽단", text)]
    right = [m.start() for m in re.finditer("오른쪽단", text)]
    assert len(left) == len(right) == 8
    assert max(left) < min(right)
    assert text.startswith("두 단 배치 시험 문서의 제목입니다")
    assert "two_column" in json.loads(result.pages[0]["meta"])["flags"]


def test_repeated_header_and_footer_are_removed(tmp_path):
    pdf = make_pdf(tmp_path / "r.pdf", report_pages(5), title="시험 보고서")
    result = extract_pdf(str(pdf), "r.pdf", params(), "c")
    assert [r["page"] for r in result.pages] == [1, 2, 3, 4, 5]
    for record in result.pages:
        assert "테스트 보고서" not in record["text"] and "확인용 문서" not in record["text"]
        assert f"{record['page']}번째 문단입니다" in record["text"]
        assert json.loads(record["meta"])["header_footer_lines_removed"] == 2
        assert record["title"] == "시험 보고서"
    assert result.header_footer_lines_removed == 10


def test_headers_kept_below_min_pages(tmp_path):
    pdf = make_pdf(tmp_path / "r.pdf", report_pages(2))
    result = extract_pdf(str(pdf), "r.pdf", params(), "c")
    assert all("테스트 보고서" in r["text"] for r in result.pages)
    assert result.pages[0]["title"] == "r"  # no metadata title: the file stem


def table_page(p: pymupdf.Page) -> None:
    put(p, 50, 100, "주요 재무 실적 표는 아래와 같으며 표 아래에 설명 문단이 이어집니다")
    ruled_table(p, TABLE)
    put(p, 50, 420, "표 아래의 설명 문단입니다")


def test_tables_on_extracts_rows_and_keeps_table_text_out_of_the_body(tmp_path):
    pdf = make_pdf(tmp_path / "t.pdf", [table_page])
    record = extract_pdf(str(pdf), "t.pdf", params(tables=True), "c").pages[0]
    assert record["tables"] == [TABLE]  # "1,284억" and "12.5%" intact
    assert "주요 재무 실적" in record["text"] and "설명 문단" in record["text"]
    assert "1,284억" not in record["text"] and "영업이익률" not in record["text"]


def test_a_page_with_only_a_table_gets_the_table_as_text(tmp_path):
    pdf = make_pdf(tmp_path / "t.pdf", [lambda p: ruled_table(p, TABLE)])
    record = extract_pdf(str(pdf), "t.pdf", params(tables=True, min_text_chars=0), "c").pages[0]
    assert record["text"].splitlines()[1] == "매출액 | 1,146억 | 1,284억"
    assert "table_only" in json.loads(record["meta"])["flags"]


def test_find_tables_runs_only_when_tables_is_on(tmp_path, monkeypatch):
    calls = []
    original = pymupdf.Page.find_tables

    def spy(self, *args, **kwargs):
        calls.append(kwargs)
        return original(self, *args, **kwargs)
    monkeypatch.setattr(pymupdf.Page, "find_tables", spy)
    pdf = make_pdf(tmp_path / "t.pdf", [table_page])
    off = extract_pdf(str(pdf), "t.pdf", params(tables=False), "c")
    assert calls == [] and off.pages[0]["tables"] == []
    assert "1,284억" in off.pages[0]["text"]  # table text stays in the body when tables are off
    on = extract_pdf(str(pdf), "t.pdf", params(tables=True), "c")
    assert calls == [{"use_layout": False}] and on.tables == 1


@pytest.mark.parametrize("rects,expected", [
    ([], False),
    ([(30, 44.5, 565, 44.5), (30, 797, 565, 797)], False),   # header/footer rules
    ([(100, 50, 100, 700), (300, 50, 300.5, 700)], False),   # vertical rules only
    ([(30, 44.5, 565, 44.5), (100, 50, 100, 700)], True),    # both directions
    ([(50, 300, 390, 366)], True),                           # a box or a grid in one path
])
def test_may_hold_table(rects, expected):
    assert extract.may_hold_table([{"rect": r} for r in rects]) is expected


def test_pages_with_rules_in_one_direction_skip_find_tables_with_the_same_result(tmp_path, monkeypatch):
    def ruled_text(p: pymupdf.Page) -> None:
        for y in (90, 200, 310):
            p.draw_line((50, y), (545, y))
        put(p, 50, 150, "가로줄만 있는 쪽 구분   매출액   1,284억")
    pdf = make_pdf(tmp_path / "rules.pdf", [ruled_text])
    with pymupdf.open(pdf) as doc:  # what find_tables would have said
        assert doc[0].find_tables(use_layout=False).tables == []
    calls = []
    monkeypatch.setattr(pymupdf.Page, "find_tables", lambda self, **kw: calls.append(kw))
    record = extract_pdf(str(pdf), "rules.pdf", params(tables=True), "c").pages[0]
    assert calls == [] and record["tables"] == [] and "1,284억" in record["text"]


def test_garbled_page_is_rejected_and_the_rest_emitted(tmp_path):
    pdf = make_pdf(tmp_path / "g.pdf", [
        lambda p: body(p, paragraph(1)),
        lambda p: body(p, "Съешь же ещё этих мягких французских булок да выпей чаю " * 4)])
    result = extract_pdf(str(pdf), "g.pdf", params(), "c")
    assert result.file_reject is None
    assert [r["page"] for r in result.pages] == [1]
    (page_reject,) = result.rejects
    assert page_reject["item"] == "g.pdf#2" and page_reject["reason"] == "garbled_text"
    assert page_reject["detail"] == "garbled_ratio 1.0000 > max_garbled_ratio 0.3"  # all Cyrillic
    assert result.pages_rejected == 1


def test_empty_page_is_rejected(tmp_path):
    pdf = make_pdf(tmp_path / "e.pdf", [lambda p: body(p, paragraph(1)), lambda p: None,
                                        lambda p: body(p, paragraph(3))])
    result = extract_pdf(str(pdf), "e.pdf", params(), "c")
    assert [r["page"] for r in result.pages] == [1, 3]
    assert [(r["item"], r["reason"], r["detail"]) for r in result.rejects] == [
        ("e.pdf#2", "no_text", "neither text nor images: a blank page")]


def test_a_blank_document_is_no_text_and_an_image_page_is_not_blank(tmp_path):
    blank = make_pdf(tmp_path / "blank.pdf", [lambda p: None])
    record = only_reject(extract_pdf(str(blank), "blank.pdf", params(), "c"))
    assert record["reason"] == "no_text" and "no images" in record["detail"]

    def picture(p: pymupdf.Page) -> None:
        pixmap = pymupdf.Pixmap(pymupdf.csRGB, pymupdf.IRect(0, 0, 8, 8), False)
        pixmap.clear_with(120)
        p.insert_image(pymupdf.Rect(50, 50, 300, 300), pixmap=pixmap)
    mixed = make_pdf(tmp_path / "m.pdf", [lambda p: body(p, paragraph(1)), picture])
    result = extract_pdf(str(mixed), "m.pdf", params(), "c")
    assert [(r["item"], r["reason"], r["detail"]) for r in result.rejects] == [
        ("m.pdf#2", "empty_page", "no text layer, 1 image(s) (scanned page?)")]


def test_a_pdf_whose_pages_are_all_rejected_is_a_file_reject(tmp_path):
    pdf = make_pdf(tmp_path / "g.pdf", [lambda p: body(p, "Съешь же ещё этих мягких булок " * 4)])
    result = extract_pdf(str(pdf), "g.pdf", params(), "c")
    assert result.file_reject == "no_usable_pages" and result.pages == []
    assert [r["reason"] for r in result.rejects] == ["garbled_text", "no_usable_pages"]


# ------------------------------------------------------------------------- file-level rejects
def good_pdf(path: Path) -> Path:
    return make_pdf(path, [lambda p: body(p, paragraph(1))])


def write_empty(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def write_text_as_pdf(path: Path) -> Path:
    path.write_text("이것은 PDF가 아닙니다\n", encoding="utf-8")
    return path


def write_encrypted(path: Path) -> Path:
    return make_pdf(path, [lambda p: body(p, paragraph(1))], encryption=pymupdf.PDF_ENCRYPT_AES_256,
                    user_pw="user", owner_pw="owner")


def write_corrupt(path: Path) -> Path:
    path.write_bytes(b"%PDF-1.7\n" + bytes(range(256)) * 8 + b"\n%%EOF\n")
    return path


def write_truncated(path: Path) -> Path:
    data = make_pdf(path, report_pages(4)).read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def write_image_only(path: Path) -> Path:
    def scan(p: pymupdf.Page) -> None:
        pixmap = pymupdf.Pixmap(pymupdf.csRGB, pymupdf.IRect(0, 0, 16, 16), False)
        pixmap.clear_with(180)
        p.insert_image(pymupdf.Rect(50, 50, 545, 780), pixmap=pixmap)
        p.draw_rect(pymupdf.Rect(60, 60, 200, 200), color=(0, 0, 0), fill=(0.5, 0.5, 0.5))
    return make_pdf(path, [scan, scan])


@pytest.mark.parametrize("name,writer,reason,detail", [
    ("empty.pdf", write_empty, "empty_file", "0 bytes"),
    ("text.pdf", write_text_as_pdf, "not_a_pdf", "no %PDF- header"),
    ("stray.txt", good_pdf, "not_a_pdf", "not a .pdf file"),
    ("locked.pdf", write_encrypted, "encrypted", "password"),
    ("corrupt.pdf", write_corrupt, "corrupt", "MuPDF cannot open it"),
    ("cut.pdf", write_truncated, "truncated", "no %%EOF"),
    ("scan.pdf", write_image_only, "image_only", "0 text characters in 2 pages"),
])
def test_file_level_rejects(tmp_path, name, writer, reason, detail):
    path = writer(tmp_path / name)
    result = extract_pdf(str(path), name, params(), "docs")
    record = only_reject(result)
    assert result.file_reject == reason
    assert (record["stage"], record["source"], record["item"], record["reason"]) == \
        ("extract", "docs", name, reason)
    assert detail in record["detail"]
    assert validate("reject", record) == []


def test_missing_eof_with_an_intact_xref_is_emitted_with_a_flag(tmp_path):
    path = good_pdf(tmp_path / "noeof.pdf")
    data = path.read_bytes()
    path.write_bytes(data[: data.rindex(b"%%EOF")])
    result = extract_pdf(str(path), "noeof.pdf", params(), "c")
    assert result.file_reject is None
    assert json.loads(result.pages[0]["meta"])["flags"] == ["missing_eof"]


def test_a_broken_xref_is_repaired_and_flagged(tmp_path):
    path = good_pdf(tmp_path / "xref.pdf")
    data = path.read_bytes()
    start = data.rindex(b"startxref")
    path.write_bytes(data[:start] + b"startxref\n999999\n%%EOF\n")
    result = extract_pdf(str(path), "xref.pdf", params(), "c")
    assert result.file_reject is None
    assert json.loads(result.pages[0]["meta"])["flags"] == ["repaired"]


def test_duplicate_files_are_rejected_naming_the_first(tmp_path):
    first = good_pdf(tmp_path / "a.pdf")
    (tmp_path / "b.pdf").write_bytes(first.read_bytes())
    seen: dict[str, str] = {}
    a = mark_duplicate(extract_pdf(str(first), "a.pdf", params(), "c"), seen, "c")
    b = mark_duplicate(extract_pdf(str(tmp_path / "b.pdf"), "b.pdf", params(), "c"), seen, "c")
    assert a.file_reject is None and a.pages
    record = only_reject(b)
    assert (record["reason"], record["detail"]) == ("duplicate_file", "same sha256 as a.pdf")


def test_an_unexpected_error_becomes_an_extraction_error_reject(tmp_path, monkeypatch):
    def boom(words):
        raise ValueError("boom in layout")
    monkeypatch.setattr(extract, "lines_from_words", boom)
    result = extract_pdf(str(good_pdf(tmp_path / "a.pdf")), "a.pdf", params(), "c")
    record = only_reject(result)
    assert record["reason"] == "extraction_error"
    assert record["detail"] == "ValueError: boom in layout"


def test_records_are_valid_and_ids_are_content_based(tmp_path):
    pdf = make_pdf(tmp_path / "r.pdf", report_pages(3))
    moved = tmp_path / "elsewhere" / "renamed.pdf"
    moved.parent.mkdir()
    moved.write_bytes(pdf.read_bytes())
    one = extract_pdf(str(pdf), "r.pdf", params(), "c")
    two = extract_pdf(str(moved), "elsewhere/renamed.pdf", params(), "c")
    for record in one.pages:
        assert validate("document", record) == []
        assert unicodedata.is_normalized("NFC", record["text"])
    assert [r["id"] for r in one.pages] == [r["id"] for r in two.pages]
    assert len({r["id"] for r in one.pages}) == 3
    assert one.doc_id == one.sha256[:16] and two.pages[0]["path"] == "elsewhere/renamed.pdf"


# ============================================================================ the CLI
def write_params(tmp_path: Path, **spec) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"extract": {"docs": spec}}, allow_unicode=True), encoding="utf-8")
    return path


def cli(tmp_path: Path, out: str = "out"):
    args = ["docs", "--out", f"{out}/docs.parquet", "--json-dir", f"{out}/docs_json",
            "--rejects", f"{out}/rejects.parquet", "--metrics", f"{out}/metrics.json",
            "--log", f"{out}/extract.log", "--params", "params.yaml"]
    return run_stage("extract", args, tmp_path)


def fill_collection(root: Path) -> None:
    make_pdf(root / "a" / "report.pdf", report_pages(3), title="보고서 가")
    make_pdf(root / "b" / "columns.PDF", [two_column_page, table_page])
    (root / "b" / "copy_of_report.pdf").write_bytes((root / "a" / "report.pdf").read_bytes())
    (root / "notes.txt").write_text("메모", encoding="utf-8")
    write_truncated(root / "z_cut.pdf")
    good_pdf(root / ".hidden.pdf")  # ignored


def test_cli_end_to_end_deterministic_and_the_pool_matches_in_process(tmp_path):
    fill_collection(tmp_path / "pdfs")
    write_params(tmp_path, input="pdfs", workers=2, tables=True, max_reject_rate=0.8)
    first = cli(tmp_path, "out1")
    assert first.returncode == 0, first.stderr
    write_params(tmp_path, input="pdfs", workers=1, tables=True, max_reject_rate=0.8)
    second = cli(tmp_path, "out2")
    assert second.returncode == 0, second.stderr

    for name in ["docs.parquet", "rejects.parquet"]:
        assert (tmp_path / "out1" / name).read_bytes() == (tmp_path / "out2" / name).read_bytes()
    json1 = sorted((tmp_path / "out1" / "docs_json").iterdir())
    json2 = sorted((tmp_path / "out2" / "docs_json").iterdir())
    assert [p.name for p in json1] == [p.name for p in json2] and len(json1) == 2
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(json1, json2))

    records = pq.read_table(tmp_path / "out1" / "docs.parquet").to_pylist()
    assert [(r["path"], r["page"]) for r in records] == [
        ("a/report.pdf", 1), ("a/report.pdf", 2), ("a/report.pdf", 3),
        ("b/columns.PDF", 1), ("b/columns.PDF", 2)]
    assert all(validate("document", r) == [] and r["source"] == "docs" for r in records)
    assert records[4]["tables"] == [TABLE]
    rejects = pq.read_table(tmp_path / "out1" / "rejects.parquet").to_pylist()
    assert [(r["item"], r["reason"]) for r in rejects] == [
        ("b/copy_of_report.pdf", "duplicate_file"), ("notes.txt", "not_a_pdf"),
        ("z_cut.pdf", "truncated")]
    assert rejects[0]["detail"] == "same sha256 as a/report.pdf"

    metrics = json.loads((tmp_path / "out1" / "metrics.json").read_text(encoding="utf-8"))
    assert {k: metrics[k] for k in ["files", "documents", "pages", "files_rejected", "tables",
                                    "header_footer_lines_removed", "workers"]} == {
        "files": 5, "documents": 2, "pages": 5, "files_rejected": 3, "tables": 1,
        "header_footer_lines_removed": 6, "workers": 2}
    assert metrics["rejects_by_reason"] == {"duplicate_file": 1, "not_a_pdf": 1, "truncated": 1}

    doc = json.loads((tmp_path / "out1" / "docs_json" / f"{records[0]['doc_id']}.json")
                     .read_text(encoding="utf-8"))
    assert (doc["path"], doc["title"], doc["page_count"], doc["source"]) == \
        ("a/report.pdf", "보고서 가", 3, "docs")
    assert [p["text"] for p in doc["pages"]] == [r["text"] for r in records[:3]]
    log = (tmp_path / "out1" / "extract.log").read_text(encoding="utf-8")
    assert "rejected z_cut.pdf: truncated" in log and "5 files → 2 documents" in log


def test_cli_missing_input_directory_names_the_param_and_writes_nothing(tmp_path):
    write_params(tmp_path, input="no/such/dir")
    result = cli(tmp_path)
    assert result.returncode == 2
    assert "extract.docs.input" in result.stderr and "no/such/dir" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_cli_empty_input_directory_fails_clearly(tmp_path):
    (tmp_path / "pdfs").mkdir()
    (tmp_path / "pdfs" / ".DS_Store").write_bytes(b"x")
    write_params(tmp_path, input="pdfs")
    result = cli(tmp_path)
    assert result.returncode == 2 and "no files" in result.stderr
    assert not (tmp_path / "out").exists()


def test_cli_reject_rate_over_threshold_fails_but_keeps_the_rejects(tmp_path):
    root = tmp_path / "pdfs"
    good_pdf(root / "good.pdf")
    write_empty(root / "empty.pdf")
    write_corrupt(root / "corrupt.pdf")
    write_params(tmp_path, input="pdfs", max_reject_rate=0.5)
    result = cli(tmp_path)
    assert result.returncode == 2
    assert "2 of 3" in result.stderr and "max_reject_rate 50.0%" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "docs.parquet").exists()
    assert not (tmp_path / "out" / "docs_json").exists()
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temp left
    rejects = pq.read_table(tmp_path / "out" / "rejects.parquet").to_pylist()
    assert sorted(r["reason"] for r in rejects) == ["corrupt", "empty_file"]


# ============================================================================ real statutes
REAL_PAGE_COUNTS = {
    "financial_services_commission_act.pdf": 12,
    "financial_transaction_reports_act.pdf": 14,
    "virtual_asset_user_protection_act.pdf": 7,
    "it_outsourcing_regulation.pdf": 4,
    "electronic_financial_transactions_act.pdf": 21,
}


def test_real_statutes_lose_their_running_header_and_keep_their_text():
    if not REAL_PDFS.is_dir():
        pytest.skip(f"real PDFs absent: {REAL_PDFS}")
    for name, pages in REAL_PAGE_COUNTS.items():
        # tables on: the pages' only drawings are two horizontal rules, so no find_tables
        result = extract_pdf(str(REAL_PDFS / name), name, params(tables=True), "statutes")
        assert result.file_reject is None, result.rejects
        assert result.page_count == pages and len(result.pages) == pages, name
        for record in result.pages:
            text = record["text"]
            assert not re.search(r"법제처\s*\d+\s*국가법령정보센터", text), (name, record["page"])
            assert "국가법령정보센터" not in text
            assert unicodedata.is_normalized("NFC", text)
            assert json.loads(record["meta"])["header_footer_lines_removed"] >= 1
            assert record["tables"] == []
        assert re.search(r"제1조\s*\(목적\)", result.pages[0]["text"]), name
