#!/usr/bin/env python
"""Write the quickstart's sample PDFs under ``data/samples/pdfs/`` (SAMPLE DATA, written for this repo).

Every PDF is generated here with PyMuPDF from the Korean literals below: fictional
companies ("가나전자(주)", "다라마바이오(주)"), fictional figures, a fictional enforcement rule.
Each page says "샘플 (저장소용으로 작성)" (a sample written for this repository). They
exercise what ``stages/extract.py`` must handle, one collection per ``extract:`` entry in
``data/samples/quickstart.params.yaml``:

* ``krx_reports/``        two 3-page company reports with a running header
                          ("KRX 기업분석 샘플 | 페이지 N") and footer, a ruled table
                          (매출액/영업이익/당기순이익 by year) and a two-column page whose
                          columns hold distinct text, plus ``broken_sample.pdf``: a report
                          cut in half (no ``%%EOF``, no readable pages) that the stage
                          rejects as ``truncated`` (1 of 3 files: under max_reject_rate 0.5).
* ``financial_reports/``  a 2-page financial-statement sample with two ruled tables.
* ``rules/``              a 3-page 시행규칙-style sample, "샘플 시행규칙 N 법령정보" atop
                          every page, articles 제1조(목적)….

Korean text uses PyMuPDF's built-in CJK font (Droid Sans Fallback, Apache-2.0), embedded
and subset so every viewer renders it and each file stays around 10–20 KB.

Determinism: fixed metadata with empty creation/modification dates, no random file ``/ID``
(``no_new_id``), fixed object numbering (``garbage=4``): two runs give identical bytes with
the pinned PyMuPDF (2.0 / MuPDF 1.28.5, which writes its version into each file); another
PyMuPDF version may write different but equivalent bytes.

Usage::

    python scripts/make_sample_pdfs.py            # (re)write the files
    python scripts/make_sample_pdfs.py --check    # exit 1 if any file on disk differs
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import pymupdf

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "data" / "samples" / "pdfs"

SAMPLE_MARK = "샘플 (저장소용으로 작성)"
PAGE_WIDTH, PAGE_HEIGHT = 595, 842  # A4 in points
MARGIN = 50
FONT = "kr"  # resource name of the embedded CJK font on every page
BODY_SIZE = 10.5


# ============================================================================ drawing helpers
def new_page(doc: pymupdf.Document) -> pymupdf.Page:
    page = doc.new_page(width=PAGE_WIDTH, height=PAGE_HEIGHT)
    page.insert_font(fontname=FONT, fontbuffer=_cjk_font_buffer())
    return page


_FONT_BUFFER: list[bytes] = []


def _cjk_font_buffer() -> bytes:
    if not _FONT_BUFFER:
        _FONT_BUFFER.append(pymupdf.Font("cjk").buffer)
    return _FONT_BUFFER[0]


def text_line(page: pymupdf.Page, x: float, y: float, text: str, size: float = BODY_SIZE) -> None:
    """One line of text with its baseline at ``y``."""
    page.insert_text((x, y), text, fontname=FONT, fontsize=size)


def paragraph(page: pymupdf.Page, rect: Sequence[float], text: str, size: float = BODY_SIZE) -> None:
    """Text wrapped into ``rect`` (x0, y0, x1, y1); fails loudly if it does not fit."""
    left = page.insert_textbox(pymupdf.Rect(*rect), text, fontname=FONT, fontsize=size,
                               lineheight=1.5)
    if left < 0:
        raise ValueError(f"text does not fit in {rect}: {text[:30]}…")


def header_footer(page: pymupdf.Page, header: str, footer: str) -> None:
    text_line(page, MARGIN, 40, header, size=9)
    page.draw_line((MARGIN, 48), (PAGE_WIDTH - MARGIN, 48), width=0.5)
    text_line(page, MARGIN, PAGE_HEIGHT - 30, footer, size=8)


def ruled_table(page: pymupdf.Page, x: float, y: float, widths: Sequence[float],
                rows: Sequence[Sequence[str]], row_height: float = 22) -> float:
    """A table with a full grid of lines (what PyMuPDF's line-based find_tables detects);
    returns the y below it."""
    total = sum(widths)
    for r in range(len(rows) + 1):
        page.draw_line((x, y + r * row_height), (x + total, y + r * row_height), width=0.7)
    edge = x
    for w in [0, *widths]:
        edge += w
        page.draw_line((edge, y), (edge, y + len(rows) * row_height), width=0.7)
    for r, row in enumerate(rows):
        left = x
        for w, cell in zip(widths, row):
            text_line(page, left + 5, y + r * row_height + 15, cell, size=9.5)
            left += w
    return y + len(rows) * row_height


def to_bytes(doc: pymupdf.Document, title: str) -> bytes:
    doc.subset_fonts()
    doc.set_metadata({"title": title, "author": "", "subject": SAMPLE_MARK, "keywords": "",
                      "creator": "scripts/make_sample_pdfs.py", "producer": "",
                      "creationDate": "", "modDate": "", "trapped": ""})
    return doc.tobytes(garbage=4, deflate=True, no_new_id=True)


# ============================================================================ KRX reports
KRX_HEADER = "KRX 기업분석 샘플 | 페이지 {n}"
KRX_FOOTER = f"{SAMPLE_MARK} · 가상의 기업과 수치이며 투자 권유가 아닙니다"

COMPANIES = [
    {
        "file": "ganada_electronics_2024.pdf",
        "name": "가나전자(주)",
        "summary": (
            "가나전자(주)는 전력반도체와 차량용 전장 부품을 만드는 가상의 코스닥 상장사이다. "
            "2024년 매출액은 전년 대비 12% 늘어난 1,284억 원, 영업이익은 96억 원으로 "
            "영업이익률이 7.5%까지 회복되었다. 전기차용 인버터 모듈의 공급 물량이 늘었고, "
            "원재료인 실리콘 웨이퍼 가격이 안정되면서 수익성이 개선되었다."),
        "outlook": (
            "2025년에는 신규 공장 가동으로 생산 능력이 30% 늘어날 예정이다. 다만 감가상각비가 "
            "함께 늘어나므로 상반기 이익률은 일시적으로 낮아질 수 있다. 부채비율은 85% 수준으로 "
            "업종 평균보다 낮다."),
        "table": [["구분", "2022년", "2023년", "2024년"],
                  ["매출액", "1,032억", "1,146억", "1,284억"],
                  ["영업이익", "71억", "58억", "96억"],
                  ["당기순이익", "52억", "41억", "74억"]],
        "left": (
            "[투자 포인트] 첫째, 전기차 인버터 모듈 매출 비중이 41%로 커졌다. 둘째, 국내 완성차 "
            "두 곳과 맺은 장기 공급 계약으로 2027년까지 물량이 확보되어 있다. 셋째, 배당성향을 "
            "25%로 유지하겠다는 주주환원 정책을 공시하였다."),
        "right": (
            "[리스크 요인] 환율이 10% 하락하면 영업이익이 약 8억 원 줄어드는 것으로 추정된다. "
            "또한 상위 두 고객사 매출 의존도가 62%에 이르러 고객사 생산 차질이 실적에 바로 "
            "반영된다. 신규 공장의 수율 안정화 시점도 불확실하다."),
    },
    {
        "file": "darama_bio_2024.pdf",
        "name": "다라마바이오(주)",
        "summary": (
            "다라마바이오(주)는 동물용 진단키트와 사료첨가제를 판매하는 가상의 유가증권시장 "
            "상장사이다. 2024년 매출액은 642억 원으로 3% 늘었으나, 연구개발비가 크게 늘어 "
            "영업이익은 38억 원에 그쳤다. 현금성 자산은 210억 원으로 재무 안정성은 양호하다."),
        "outlook": (
            "반려동물 진단키트의 해외 인허가가 2025년 하반기로 예정되어 있다. 인허가가 지연되면 "
            "연구개발비 부담이 이어질 수 있다. 회사는 연구개발비를 매출액의 15% 이내로 "
            "관리하겠다고 밝혔다."),
        "table": [["구분", "2022년", "2023년", "2024년"],
                  ["매출액", "598억", "623억", "642억"],
                  ["영업이익", "55억", "49억", "38억"],
                  ["당기순이익", "43억", "37억", "29억"]],
        "left": (
            "[사업 구성] 진단키트 매출이 전체의 58%, 사료첨가제가 35%, 기타 위탁생산이 7%를 "
            "차지한다. 진단키트는 동물병원 1,900곳에 직접 공급하고 있어 유통 마진이 높다."),
        "right": (
            "[점검 사항] 매출채권 회전일수가 74일에서 88일로 늘어 운전자본 관리가 필요하다. "
            "주요 원료의 수입 비중이 높아 물류비 변동에도 유의해야 한다."),
    },
]


def krx_report(company: dict) -> bytes:
    """A 3-page report: summary, a ruled financial table, a two-column page."""
    doc = pymupdf.open()
    name = company["name"]
    right_edge = PAGE_WIDTH - MARGIN

    page = new_page(doc)
    header_footer(page, KRX_HEADER.format(n=1), KRX_FOOTER)
    text_line(page, MARGIN, 90, f"{name} 기업분석 보고서", size=16)
    text_line(page, MARGIN, 112, f"{SAMPLE_MARK} — 실제 기업이 아닙니다", size=9)
    paragraph(page, (MARGIN, 130, right_edge, 330), "[요약] " + company["summary"])
    paragraph(page, (MARGIN, 340, right_edge, 520), "[전망] " + company["outlook"])

    page = new_page(doc)
    header_footer(page, KRX_HEADER.format(n=2), KRX_FOOTER)
    text_line(page, MARGIN, 90, "주요 재무 실적 (단위: 원)", size=12)
    bottom = ruled_table(page, MARGIN, 110, [120, 110, 110, 110], company["table"])
    paragraph(page, (MARGIN, bottom + 20, right_edge, bottom + 120),
              "위 표의 수치는 저장소 예제를 위해 만든 가상의 값이다. 영업이익률은 영업이익을 "
              "매출액으로 나누어 구한다.")

    page = new_page(doc)
    header_footer(page, KRX_HEADER.format(n=3), KRX_FOOTER)
    text_line(page, MARGIN, 90, "투자 의견 정리", size=12)
    middle = PAGE_WIDTH / 2
    paragraph(page, (MARGIN, 110, middle - 15, 500), company["left"])
    paragraph(page, (middle + 15, 110, right_edge, 500), company["right"])
    return to_bytes(doc, f"{name} 기업분석 보고서 (샘플)")


def broken_report(company: dict) -> bytes:
    """A report cut in half, as an interrupted download leaves it."""
    whole = krx_report(company)
    return whole[: len(whole) // 2]


# ============================================================================ financial reports
def financial_statements() -> bytes:
    doc = pymupdf.open()
    right_edge = PAGE_WIDTH - MARGIN
    footer = f"{SAMPLE_MARK} · 가상의 회사 '마바사상사(주)'의 예시 재무제표"

    page = new_page(doc)
    header_footer(page, "재무제표 샘플 | 제15기 (2024년)", footer)
    text_line(page, MARGIN, 90, "재무상태표 (2024년 12월 31일 현재, 단위: 백만 원)", size=12)
    bottom = ruled_table(page, MARGIN, 110, [170, 120, 120], [
        ["과목", "제15기", "제14기"],
        ["유동자산", "48,210", "44,905"],
        ["비유동자산", "73,560", "70,112"],
        ["자산총계", "121,770", "115,017"],
        ["부채총계", "52,340", "51,208"],
        ["자본총계", "69,430", "63,809"],
    ])
    paragraph(page, (MARGIN, bottom + 20, right_edge, bottom + 160),
              "유동비율은 유동자산을 유동부채로 나눈 값으로, 단기 지급 능력을 보여 준다. "
              "제15기 부채비율은 부채총계를 자본총계로 나눈 75.4%이다.")

    page = new_page(doc)
    header_footer(page, "재무제표 샘플 | 제15기 (2024년)", footer)
    text_line(page, MARGIN, 90, "손익계산서 (2024년 1월 1일 ~ 12월 31일, 단위: 백만 원)", size=12)
    bottom = ruled_table(page, MARGIN, 110, [170, 120, 120], [
        ["과목", "제15기", "제14기"],
        ["매출액", "95,400", "90,120"],
        ["매출원가", "71,550", "68,490"],
        ["영업이익", "9,870", "8,412"],
        ["당기순이익", "7,020", "6,115"],
    ])
    paragraph(page, (MARGIN, bottom + 20, right_edge, bottom + 200),
              "[주석] 수익은 재화의 통제가 고객에게 이전되는 시점에 인식한다. 재고자산은 "
              "총평균법으로 평가하며, 순실현가능가치가 원가보다 낮으면 평가손실을 인식한다.")
    return to_bytes(doc, "마바사상사(주) 재무제표 (샘플)")


# ============================================================================ rules
RULE_ARTICLES = [
    ("제1조(목적)", "이 규칙은 「샘플 금융거래 보고에 관한 법률」 및 같은 법 시행령에서 위임된 "
                  "사항과 그 시행에 필요한 사항을 규정함을 목적으로 한다."),
    ("제2조(정의)", "이 규칙에서 사용하는 용어의 뜻은 다음과 같다. 1. \"보고기관\"이란 "
                  "금융거래를 보고하여야 하는 금융회사등을 말한다. 2. \"고액거래\"란 하루 동안 "
                  "같은 고객이 1천만 원 이상을 현금으로 거래한 경우를 말한다."),
    ("제3조(보고 기한)", "① 보고기관은 고액거래가 있은 날부터 30일 이내에 보고서를 제출하여야 "
                      "한다. ② 제1항의 보고서는 전자문서로 제출하는 것을 원칙으로 한다."),
    ("제4조(보고서의 기재사항)", "보고서에는 거래 일시, 거래 금액, 거래 수단, 고객의 성명과 "
                            "실명번호를 적어야 한다. 다만, 실명번호를 확인할 수 없는 경우에는 "
                            "그 사유를 적는다."),
    ("제5조(자료의 보존)", "보고기관은 보고한 날부터 5년 동안 보고서와 관련 자료를 보존하여야 "
                        "한다."),
    ("제6조(교육)", "보고기관은 소속 직원에게 매년 1회 이상 보고 업무에 관한 교육을 실시하여야 "
                  "한다."),
    ("제7조(재검토기한)", "금융위원회는 이 규칙에 대하여 2026년 1월 1일을 기준으로 3년마다 그 "
                       "타당성을 검토하여 개선 등의 조치를 하여야 한다."),
    ("부칙", "이 규칙은 공포한 날부터 시행한다. (이 문서는 저장소 예제를 위해 작성한 가상의 "
           "규칙이며 실제 법령이 아니다.)"),
]


def enforcement_rule() -> bytes:
    doc = pymupdf.open()
    right_edge = PAGE_WIDTH - MARGIN
    per_page = [RULE_ARTICLES[0:3], RULE_ARTICLES[3:6], RULE_ARTICLES[6:]]
    for number, articles in enumerate(per_page, start=1):
        page = new_page(doc)
        # Like the national law centre's print-outs: the page number inside the running line.
        text_line(page, MARGIN, 40, f"샘플 시행규칙 {number} 법령정보", size=9)
        text_line(page, MARGIN, PAGE_HEIGHT - 30, SAMPLE_MARK, size=8)
        y = 80
        if number == 1:
            text_line(page, MARGIN, y, "샘플 금융거래 보고에 관한 법률 시행규칙", size=15)
            text_line(page, MARGIN, y + 20, f"[시행 2025. 1. 1.] {SAMPLE_MARK}", size=9)
            y += 40
        for title, body in articles:
            paragraph(page, (MARGIN, y, right_edge, y + 140), f"{title} {body}")
            y += 150
    return to_bytes(doc, "샘플 시행규칙")


# ============================================================================ files
def sample_files() -> dict[str, bytes]:
    """Relative path → bytes of every sample PDF."""
    files = {f"krx_reports/{c['file']}": krx_report(c) for c in COMPANIES}
    files["krx_reports/broken_sample.pdf"] = broken_report(COMPANIES[0])
    files["financial_reports/sample_financial_statements_2024.pdf"] = financial_statements()
    files["rules/sample_enforcement_rule.pdf"] = enforcement_rule()
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="default: %(default)s")
    parser.add_argument("--check", action="store_true",
                        help="compare with the files on disk instead of writing; exit 1 on a difference")
    args = parser.parse_args(argv)
    differ = []
    for rel, data in sample_files().items():
        path = args.out / rel
        if args.check:
            if not path.is_file() or path.read_bytes() != data:
                differ.append(rel)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        print(f"wrote {path} ({len(data):,} bytes)")
    if differ:
        print("differ from the generator: " + ", ".join(differ), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
