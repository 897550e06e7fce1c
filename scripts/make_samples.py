#!/usr/bin/env python
"""Write the quickstart sample data under ``data/samples/`` (SAMPLE DATA, written for this repo).

Every record below is original content written for this repository: fictional companies,
fictional rules, hand-made questions. None of it is taken from KMMLU, the KRX contest data,
AI Hub, MetaMathQA or the reddit translation-preference set; the files only copy those
sources' *layouts* (column names, encodings, file structure) so that the collect stages
read the samples with exactly the production settings of ``params.yaml`` overlaid by
``data/samples/quickstart.params.yaml``.

Files written (paths relative to ``--out``, default ``data/samples``):

* ``hub/KMMLU/``                         README.md with ``configs:`` + data/<Subject>-<split>.csv
* ``hub/MetaMathQA-40K/``                README.md + MetaMathQA-40K.json
* ``hub/reddit_enko_translation_preference/``  README.md + data/train-00000-of-00001-….parquet
* ``raw/krx_sample.csv``                 UTF-8 *with BOM*, CRLF between records (see below)
* ``raw/qa_rules.json``, ``raw/table_qa.jsonl``, ``raw/top100_companies.json``
* ``raw/aihub_kozh.xlsx``                one sheet, columns ID, 분야, 한국어, 중국어
* ``raw/aihub_econ_calc.csv``            CP949
* ``raw/prices/{stock,index}_prices.csv`` generated price series (scripts/make_price_samples.py)

``data/samples/README.md``, ``data/samples/pdfs/`` and ``data/samples/quickstart.params.yaml``
are not written here.

Determinism: every file is written from the literals below with fixed formatting, so two
runs give identical bytes.  ``krx_sample.csv`` mimics a file saved by Excel on Windows: a
UTF-8 BOM, CRLF after every record, and LF (Excel's in-cell line break) inside the quoted
multi-line prompts.  For ``aihub_kozh.xlsx`` openpyxl's ``save_workbook`` always stamps
``modified`` with the current time and ``ZipFile.writestr`` stamps every member with the
current time, so the workbook is serialised with openpyxl's ``ExcelWriter`` into memory
with ``created``/``modified`` fixed, then re-packed with a fixed member timestamp
(1980-01-01) and fixed member attributes.  The bytes are then identical across runs with
the pinned openpyxl (3.1.5); a different openpyxl or zlib version may produce different
(but equivalent) bytes.

Usage::

    python scripts/make_samples.py            # (re)write the files
    python scripts/make_samples.py --check    # exit 1 if any file on disk differs
"""
from __future__ import annotations

import argparse
import csv
import datetime
import io
import json
import os
import sys
import tempfile
import zipfile
from typing import Any, Iterable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE_NOTE = "SAMPLE DATA written for this repository (fictional content); not real data."

# =============================================================================== KMMLU
# Layout of HAERAE-HUB/KMMLU: data/<Subject>-<split>.csv with these columns.
KMMLU_COLUMNS = ["question", "answer", "A", "B", "C", "D", "Category", "Human Accuracy"]


def _q(question: str, choices: list[str], answer: int, accuracy: float) -> dict:
    assert len(choices) == 4 and 1 <= answer <= 4
    return {"question": question, "choices": choices, "answer": answer, "acc": accuracy}


_ECON_BOND = _q(
    "채권 가격과 시장금리의 관계에 대한 설명으로 옳은 것은?",
    ["시장금리가 상승하면 이미 발행된 채권의 가격은 상승한다.",
     "다른 조건이 같다면 만기가 긴 채권일수록 금리 변화에 따른 가격 변동폭이 크다.",
     "다른 조건이 같다면 표면이자율이 높을수록 듀레이션은 길어진다.",
     "무이표채의 듀레이션은 만기보다 길다."],
    2, 0.0)

KMMLU = {
    "Economics": {
        "train": [
            _ECON_BOND,
            _q("중앙은행이 기준금리를 인하할 때 일반적으로 나타나는 효과로 가장 거리가 먼 것은?",
               ["시중은행의 대출금리가 하락한다.",
                "주식 등 위험자산의 가격에 상승 압력이 생긴다.",
                "자국 통화의 가치에 상승 압력이 생긴다.",
                "기업의 설비투자가 늘어난다."],
               3, 0.0),
            _q("콜옵션 매수자에 대한 설명으로 옳은 것은?",
               ["최대 손실은 지급한 옵션 프리미엄으로 한정된다.",
                "기초자산 가격이 하락할수록 이익이 커진다.",
                "만기에 권리를 반드시 행사해야 할 의무가 있다.",
                "거래소에 증거금을 납부하고 옵션 매도자로부터 프리미엄을 받는다."],
               1, 0.0),
            _q("원/달러 환율이 1,300원에서 1,400원으로 상승하였을 때의 설명으로 옳은 것은?",
               ["달러 대비 원화의 가치가 상승하였다.",
                "미국산 수입품의 원화 표시 가격이 하락한다.",
                "미국을 여행하는 한국인의 원화 기준 여행 경비가 줄어든다.",
                "달러 표시 외채를 보유한 국내 기업의 원화 환산 상환 부담이 커진다."],
               4, 0.0),
            _q("포트폴리오 이론에서 여러 종목에 분산투자하여 줄일 수 있는 위험은?",
               ["체계적 위험", "시장위험", "비체계적 위험", "경기 변동에 따른 시장 전반의 위험"],
               3, 0.0),
            _q("CAPM에서 무위험이자율이 연 3%, 시장포트폴리오의 기대수익률이 연 8%, "
               "주식 X의 베타가 1.2일 때 주식 X의 기대수익률은?",
               ["6.0%", "8.0%", "8.6%", "9.0%"],
               4, 0.0),
            _q("VaR(Value at Risk)에 대한 설명으로 옳지 않은 것은?",
               ["정상적인 시장 상황에서 주어진 신뢰수준과 보유기간 동안 발생할 수 있는 최대 손실 추정치이다.",
                "다른 조건이 같다면 신뢰수준을 높일수록 VaR 값은 커진다.",
                "신뢰수준을 초과하는 극단적 손실이 얼마나 클지까지 알려 준다.",
                "다른 조건이 같다면 보유기간이 길수록 VaR 값은 커진다."],
               3, 0.0),
            _q("중앙은행이 공개시장에서 국채를 매입할 때 나타나는 효과로 옳은 것은?",
               ["시중 유동성이 늘어나 단기금리에 하락 압력이 생긴다.",
                "본원통화가 감소한다.",
                "국채 가격에 하락 압력이 생긴다.",
                "은행의 지급준비금이 감소한다."],
               1, 0.0),
            _q("주가수익비율(PER)을 계산하는 방법으로 옳은 것은?",
               ["주가를 주당순자산으로 나눈다.",
                "당기순이익을 자기자본으로 나눈다.",
                "주가를 주당순이익으로 나눈다.",
                "주당배당금을 주가로 나눈다."],
               3, 0.0),
            _q("선물거래와 선도거래를 비교한 설명으로 옳지 않은 것은?",
               ["선물거래는 거래소에서 표준화된 조건으로 거래된다.",
                "선물거래는 일일정산 제도에 따라 손익이 매일 정산된다.",
                "선도거래는 장외에서 당사자 간 합의로 계약 조건을 정한다.",
                "선도거래는 청산기관이 결제를 보증하므로 상대방의 신용위험이 거의 없다."],
               4, 0.0),
            _ECON_BOND,  # exact duplicate on purpose: exercises exact-duplicate removal
            # general (non-finance) economics: material for the relevance filter
            _q("어떤 재화의 수요의 가격탄력성이 1보다 클 때 가격을 인하하면 판매자의 총수입은 어떻게 되는가?",
               ["감소한다.", "증가한다.", "변하지 않는다.", "가격탄력성과 관계없이 알 수 없다."],
               2, 0.0),
            _q("공공재의 특성에 대한 설명으로 옳은 것은?",
               ["경합성과 배제성을 모두 가진다.",
                "시장에 맡기면 사회적 최적 수준보다 많이 공급된다.",
                "한 사람이 소비하면 다른 사람이 소비할 수 있는 양이 줄어든다.",
                "비경합성과 비배제성 때문에 무임승차 문제가 발생할 수 있다."],
               4, 0.0),
            _q("피셔 방정식에 따를 때 명목이자율이 연 5%이고 기대인플레이션율이 연 2%라면 "
               "실질이자율은 근사적으로 얼마인가?",
               ["2%", "3%", "5%", "7%"],
               2, 0.0),
        ],
        "dev": [
            _q("듀레이션이 5년인 채권의 만기수익률이 1%p 상승할 때 채권 가격의 근사적인 변동은? "
               "(수정듀레이션은 듀레이션과 같다고 가정한다)",
               ["약 5% 상승", "약 1% 하락", "변동 없음", "약 5% 하락"],
               4, 0.0),
            _q("샤프지수(Sharpe ratio)를 계산하는 식으로 옳은 것은?",
               ["(포트폴리오 수익률 - 무위험이자율) / 포트폴리오 수익률의 표준편차",
                "(포트폴리오 수익률 - 무위험이자율) / 포트폴리오의 베타",
                "(포트폴리오 수익률 - 시장수익률) / 추적오차",
                "포트폴리오 수익률 / 시장포트폴리오 수익률"],
               1, 0.0),
            _q("원/달러 현물환율이 1,350원, 한국의 1년 만기 금리가 연 4%, 미국의 1년 만기 금리가 "
               "연 2%일 때 이자율평가이론에 따른 1년 만기 선물환율에 가장 가까운 것은?",
               ["약 1,324원", "1,350원", "약 1,376원", "약 1,404원"],
               3, 0.0),
        ],
        "test": [
            _q("국채 수익률 곡선이 역전(장기금리가 단기금리보다 낮아짐)되었을 때 시장이 예상하는 것으로 "
               "흔히 해석되는 것은?",
               ["향후 경기 둔화와 정책금리 인하",
                "급격한 인플레이션 가속",
                "중앙은행의 연속적인 금리 인상",
                "기업 이익의 빠른 증가"],
               1, 0.0),
            _q("다른 조건이 같을 때 풋옵션의 가격(프리미엄)에 대한 설명으로 옳은 것은?",
               ["행사가격이 높을수록 풋옵션의 가격은 낮아진다.",
                "기초자산의 변동성이 커지면 풋옵션의 가격은 상승한다.",
                "기초자산의 가격이 오르면 풋옵션의 가격은 상승한다.",
                "풋옵션의 가격은 항상 행사가격보다 높다."],
               2, 0.0),
            _q("법정 지급준비율이 10%이고 현금누출과 초과지급준비금이 없다고 가정할 때 단순 통화승수는?",
               ["0.1", "1", "10", "100"],
               3, 0.0),
            _q("신용부도스왑(CDS)에 대한 설명으로 옳은 것은?",
               ["고정금리와 변동금리를 교환하여 금리 변동 위험을 헤지하는 계약이다.",
                "보장매도자가 보장매수자에게 정기적으로 프리미엄을 지급한다.",
                "준거기업의 신용위험이 커지면 CDS 프리미엄은 하락한다.",
                "보장매수자는 준거기업에 신용사건이 발생하면 보장매도자로부터 손실을 보전받는다."],
               4, 0.0),
            _q("상대적 구매력평가설에 따를 때 향후 1년간 한국의 물가상승률이 5%, 미국의 물가상승률이 2%로 "
               "예상된다면 원/달러 환율의 변화로 가장 적절한 것은?",
               ["약 3% 하락(원화 강세)", "약 3% 상승(원화 약세)", "약 7% 상승(원화 약세)", "변하지 않는다."],
               2, 0.0),
            _q("준강형 효율적 시장가설에 대한 설명으로 옳은 것은?",
               ["과거의 주가와 거래량 정보만 현재 주가에 반영되어 있다.",
                "기술적 분석을 이용하면 지속적으로 초과수익을 얻을 수 있다.",
                "공개된 모든 정보가 주가에 즉시 반영되므로 공시 정보를 분석해서는 지속적인 초과수익을 얻을 수 없다.",
                "미공개 내부정보를 이용하더라도 초과수익을 얻을 수 없다."],
               3, 0.0),
        ],
    },
    "Accounting": {
        # HAERAE-HUB/KMMLU at the pinned revision: Accounting-train.csv holds only its header
        # (collect@kmmlu_accounting allows it: hub.allow_empty); the domain reads dev + Taxation
        "train": [],
        "dev": [
            _q("기계장치의 취득원가가 1,000만원, 잔존가치가 100만원, 내용연수가 5년일 때 정액법에 따른 "
               "연간 감가상각비는?",
               ["160만원", "180만원", "200만원", "225만원"],
               2, 0.7142857142857143),
            _q("취득원가 1,200만원, 잔존가치 0원, 내용연수 3년인 비품을 연수합계법으로 상각할 때 "
               "첫해의 감가상각비는?",
               ["300만원", "400만원", "600만원", "800만원"],
               3, 0.5),
            _q("물가가 지속적으로 상승하고 재고 수량이 일정하거나 증가하는 상황에서 선입선출법을 적용할 때의 "
               "설명으로 옳은 것은?",
               ["기말재고자산이 최근의 매입원가로 평가되어 상대적으로 크게 계상된다.",
                "매출원가가 총평균법보다 크게 계상된다.",
                "당기순이익이 총평균법보다 작게 계상된다.",
                "기말재고자산이 과거의 매입원가로 평가되어 시가와의 차이가 커진다."],
               1, 0.0),
            _q("다음 중 재무상태표상 유동자산에 해당하지 않는 것은?",
               ["현금및현금성자산", "매출채권", "재고자산", "투자부동산"],
               4, 0.8333333333333334),
            _q("현금흐름표에서 영업활동 현금흐름으로 분류되지 않는 것은?",
               ["상품 판매에 따른 현금 유입", "종업원 급여의 지급",
                "유형자산 취득에 따른 현금 유출", "매입채무의 지급"],
               3, 0.6),
            _q("간접법으로 영업활동 현금흐름을 계산하려 한다. 당기순이익 500만원, 감가상각비 80만원, "
               "매출채권 증가 50만원, 매입채무 증가 30만원일 때 영업활동 현금흐름은?",
               ["460만원", "500만원", "560만원", "660만원"],
               3, 0.0),
            _q("K-IFRS 제1115호 '고객과의 계약에서 생기는 수익'의 수익인식 5단계를 순서대로 나열한 것은?",
               ["계약 식별 → 수행의무 식별 → 거래가격 산정 → 거래가격 배분 → 수행의무 이행 시 수익 인식",
                "수행의무 식별 → 계약 식별 → 거래가격 배분 → 거래가격 산정 → 수행의무 이행 시 수익 인식",
                "계약 식별 → 거래가격 산정 → 수행의무 식별 → 수행의무 이행 시 수익 인식 → 거래가격 배분",
                "거래가격 산정 → 계약 식별 → 수행의무 식별 → 거래가격 배분 → 수행의무 이행 시 수익 인식"],
               1, 0.0),
            _q("유동자산이 300억원, 유동부채가 200억원인 회사의 유동비율은?",
               ["66.7%", "100%", "150%", "200%"],
               3, 0.9),
            _q("재고자산의 취득원가가 500만원, 예상 판매가격이 520만원, 판매에 드는 추정 비용이 40만원일 때 "
               "인식할 재고자산 평가손실은?",
               ["0원", "20만원", "40만원", "60만원"],
               2, 0.0),
            _q("기말 매출채권 잔액이 2,000만원이고 대손 예상률이 3%이다. 결산 전 대손충당금 잔액이 20만원이라면 "
               "당기에 인식할 대손상각비는?",
               ["20만원", "60만원", "80만원", "40만원"],
               4, 0.0),
            _q("상품을 외상으로 매입한 거래가 재무상태표에 미치는 영향으로 옳은 것은?",
               ["자산 증가, 부채 증가", "자산 증가, 자본 증가", "자산 감소, 부채 감소", "자산 변동 없음, 부채 증가"],
               1, 0.0),
            _q("12월분 급여를 다음 해 1월 10일에 지급하는 회사가 12월 31일 결산 시 해야 할 회계처리로 옳은 것은?",
               ["회계처리하지 않고 지급일에 비용으로 인식한다.",
                "선급비용(자산)을 인식한다.",
                "급여(비용)와 미지급비용(부채)을 인식한다.",
                "선수수익(부채)을 인식한다."],
               3, 0.0),
        ],
        "test": [
            _q("7월 1일에 취득원가 2,400만원, 잔존가치 400만원, 내용연수 4년인 기계장치를 취득하여 정액법으로 "
               "상각한다. 12월 31일 결산 시 당해 연도 감가상각비는? (월할 상각)",
               ["250만원", "300만원", "500만원", "600만원"],
               1, 0.0),
            _q("K-IFRS상 충당부채의 인식 요건에 해당하지 않는 것은?",
               ["과거 사건의 결과로 현재의무가 존재한다.",
                "의무를 이행하기 위하여 경제적 효익이 있는 자원이 유출될 가능성이 높다.",
                "의무를 이행하는 데 필요한 금액이 법적으로 확정되어 있다.",
                "의무의 이행에 필요한 금액을 신뢰성 있게 추정할 수 있다."],
               3, 0.0),
            _q("부채총계가 600억원이고 자본총계가 400억원인 회사의 부채비율(부채/자본)은?",
               ["40%", "60%", "66.7%", "150%"],
               4, 0.0),
            _q("K-IFRS상 무형자산으로 인식할 수 없는 것은?",
               ["외부에서 구입한 소프트웨어",
                "내부적으로 창출한 영업권",
                "개발단계 지출 중 자산 인식 요건을 모두 충족한 금액",
                "사업결합으로 취득하여 별도로 식별되는 고객목록"],
               2, 0.0),
            _q("주식배당을 실시할 때의 효과로 옳은 것은?",
               ["자본총계가 감소한다.",
                "이익잉여금이 증가한다.",
                "자본금은 증가하지만 자본총계는 변하지 않는다.",
                "현금이 감소한다."],
               3, 0.0),
        ],
    },
    "Taxation": {
        "train": [
            _q("부가가치세법상 일반과세자에게 적용되는 표준 세율은?",
               ["5%", "7%", "10%", "12%"],
               3, 0.0),
            _q("부가가치세가 면제되는 재화 또는 용역에 해당하지 않는 것은?",
               ["미가공 식료품의 공급", "수돗물의 공급", "도서의 공급", "상가건물의 임대용역"],
               4, 0.0),
            _q("일반과세자의 과세기간 중 매출 공급가액이 5,000만원, 세금계산서를 받은 매입 공급가액이 "
               "3,000만원(전액 공제 가능)일 때 납부할 부가가치세는?",
               ["200만원", "300만원", "500만원", "800만원"],
               1, 0.0),
            _q("결산서상 당기순이익이 1억원이고 손금불산입 항목이 2,000만원, 익금불산입 항목이 500만원일 때 "
               "각 사업연도 소득금액은? (다른 세무조정은 없다)",
               ["8,500만원", "1억 1,500만원", "1억 2,000만원", "1억 2,500만원"],
               2, 0.0),
            _q("토지의 양도가액이 5억원, 취득가액이 3억원, 자본적 지출 등 필요경비가 2,000만원일 때 양도차익은?",
               ["1억 6,000만원", "2억원", "2억 2,000만원", "1억 8,000만원"],
               4, 0.0),
            _q("소득세법상 종합소득에 합산되지 않고 분류과세되는 소득은?",
               ["이자소득", "배당소득", "퇴직소득", "사업소득"],
               3, 0.0),
        ],
        "dev": [
            _q("부가가치세 일반과세자의 제1기 과세기간으로 옳은 것은?",
               ["1월 1일부터 6월 30일까지", "1월 1일부터 3월 31일까지",
                "4월 1일부터 9월 30일까지", "7월 1일부터 12월 31일까지"],
               1, 0.0),
            _q("거주자에게 지급하는 일반적인 이자소득(비영업대금의 이익 제외)에 대한 소득세 원천징수세율은? "
               "(지방소득세 제외)",
               ["9%", "14%", "22%", "25%"],
               2, 0.0),
        ],
        "test": [
            _q("부가가치세 영세율이 적용되는 거래로 옳은 것은?",
               ["국내 음식점의 음식 제공", "미가공 농산물의 국내 공급",
                "국내 상가건물의 임대", "내국물품을 외국으로 반출하는 수출"],
               4, 0.0),
            _q("부가가치세의 면세와 영세율에 대한 설명으로 옳은 것은?",
               ["면세사업자는 매입 시 부담한 부가가치세를 매입세액으로 공제받을 수 있다.",
                "영세율 적용 사업자는 매입 시 부담한 부가가치세를 공제 또는 환급받을 수 있다.",
                "영세율은 부분면세 제도이고 면세는 완전면세 제도이다.",
                "면세사업자는 부가가치세법상 납세의무자이다."],
               2, 0.0),
            _q("각 사업연도 소득이 3억원, 공제 가능한 이월결손금이 5,000만원, 비과세소득이 없고 소득공제가 "
               "1,000만원일 때 법인세 과세표준은?",
               ["3억원", "2억 9,000만원", "2억 5,000만원", "2억 4,000만원"],
               4, 0.0),
        ],
    },
}

KMMLU_SUBJECT_CATEGORY = {"Economics": "Economics", "Accounting": "Accounting", "Taxation": "Taxation"}


def kmmlu_csv(subject: str, split: str) -> bytes:
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(KMMLU_COLUMNS)
    for item in KMMLU[subject][split]:
        writer.writerow([item["question"], item["answer"], *item["choices"],
                         KMMLU_SUBJECT_CATEGORY[subject], repr(float(item["acc"]))])
    return buf.getvalue().encode("utf-8")


def kmmlu_readme() -> str:
    lines = ["---", "language:", "- ko", "pretty_name: KMMLU (sample replica)", "configs:"]
    for subject in KMMLU:
        lines.append(f"- config_name: {subject}")
        lines.append("  data_files:")
        for split in ("train", "dev", "test"):
            lines.append(f"  - split: {split}")
            lines.append(f"    path: data/{subject}-{split}.csv")
    lines += [
        "---",
        "",
        "# KMMLU — sample replica",
        "",
        f"**{SAMPLE_NOTE}**",
        "",
        "A tiny local stand-in laid out like the Hugging Face dataset repository `HAERAE-HUB/KMMLU`",
        "(one config per subject, `data/<Subject>-<split>.csv`, columns",
        "`question,answer,A,B,C,D,Category,Human Accuracy`, `answer` is 1-4 for A-D).",
        "The questions are original items written for this repository, not KMMLU questions.",
        "`Economics` train contains one exact duplicate row on purpose (dedup test) and two",
        "general-economics (non-finance) questions (relevance-filter test).",
        "`Accounting` train is only its header, as `data/Accounting-train.csv` is reported to be at",
        "the pinned revision (an empty split); its sample questions are in `dev`.",
        "",
        "Generated by `scripts/make_samples.py`; edit the script, not these files.",
        "",
    ]
    return "\n".join(lines)


# =============================================================================== MetaMathQA
METAMATH = [
    {"type": "GSM_AnsAug",
     "query": "Mina deposits $1,200 into a savings account that pays 5% simple interest per year. "
              "How much interest, in dollars, will she have earned after 3 years?",
     "original_question": "Mina deposits $1,200 into a savings account that pays 5% simple interest per year. "
                          "How much interest, in dollars, will she have earned after 3 years?",
     "response": "Each year the account earns 1200 * 0.05 = $60 in interest.\n"
                 "Over 3 years she earns 60 * 3 = $180.\n#### 180\nThe answer is: 180"},
    {"type": "GSM_AnsAug",
     "query": "A jacket costs $80. During a sale its price is cut by 25%, and a member coupon then takes "
              "another $10 off the sale price. What is the final price of the jacket in dollars?",
     "original_question": "A jacket costs $80. During a sale its price is cut by 25%, and a member coupon then "
                          "takes another $10 off the sale price. What is the final price of the jacket in dollars?",
     "response": "The discount is 80 * 0.25 = $20, so the sale price is 80 - 20 = $60.\n"
                 "After the coupon the price is 60 - 10 = $50.\n#### 50\nThe answer is: 50"},
    {"type": "GSM_AnsAug",
     "query": "Jun buys 15 shares of a company at $40 per share and later sells all of them at $46 per share. "
              "He pays $9 in trading fees in total. What is his net profit in dollars?",
     "original_question": "Jun buys 15 shares of a company at $40 per share and later sells all of them at $46 per "
                          "share. He pays $9 in trading fees in total. What is his net profit in dollars?",
     "response": "He gains 46 - 40 = $6 on each share.\n"
                 "On 15 shares that is 15 * 6 = $90.\n"
                 "After fees his net profit is 90 - 9 = $81.\n#### 81\nThe answer is: 81"},
    {"type": "GSM_Rephrased",
     "query": "If a bakery sold 120 loaves of bread on Monday and 30% more loaves on Tuesday than on Monday, "
              "what is the total number of loaves it sold over the two days?",
     "original_question": "A bakery sells 120 loaves of bread on Monday and 30% more on Tuesday. "
                          "How many loaves does it sell over the two days?",
     "response": "On Tuesday the bakery sold 30% more than 120, which is 120 * 0.3 = 36 more loaves.\n"
                 "So on Tuesday it sold 120 + 36 = 156 loaves.\n"
                 "Over the two days it sold 120 + 156 = 276 loaves.\n#### 276\nThe answer is: 276"},
    {"type": "GSM_Rephrased",
     "query": "Sora has a monthly income of $3,000. She spends 40% of it on rent and 25% of it on food and saves "
              "whatever is left. What is the total amount she saves over one year?",
     "original_question": "Sora earns $3,000 a month. She spends 40% on rent and 25% on food. She saves the rest. "
                          "How much does she save in a year?",
     "response": "She spends 40% + 25% = 65% of her income, so she saves 100% - 65% = 35%.\n"
                 "Each month she saves 3000 * 0.35 = $1,050.\n"
                 "In a year she saves 1050 * 12 = $12,600.\n#### 12600\nThe answer is: 12600"},
    {"type": "GSM_SV",
     "query": "A farmer has x cows, and each cow produces 20 liters of milk per day. The farmer collects "
              "1680 liters of milk in a week. What is the value of unknown variable x?",
     "original_question": "A farmer has 12 cows, and each cow produces 20 liters of milk per day. "
                          "How many liters of milk does the farmer collect in a week?",
     "response": "Each cow produces 20 * 7 = 140 liters of milk in a week.\n"
                 "So x cows produce 140x liters in a week.\n"
                 "We are told this is 1680 liters: 140x = 1680.\n"
                 "Dividing both sides by 140 gives x = 12.\n#### 12\nThe answer is: 12"},
    {"type": "GSM_FOBAR",
     "query": "Tom reads x pages a day. How many pages does he read in 2 weeks?\n"
              "If we know the answer to the above question is 350, what is the value of unknown variable x?",
     "original_question": "Tom reads 25 pages a day. How many pages does he read in 2 weeks?",
     "response": "Two weeks have 2 * 7 = 14 days, so Tom reads 14x pages in 2 weeks.\n"
                 "We are given that this is 350 pages: 14x = 350.\n"
                 "Dividing both sides by 14 gives x = 25.\n#### 25\nThe answer is: 25"},
    {"type": "MATH_AnsAug",
     "query": "What is the sum of all positive divisors of 36?",
     "original_question": "What is the sum of all positive divisors of 36?",
     "response": "The positive divisors of 36 are 1, 2, 3, 4, 6, 9, 12, 18 and 36.\n"
                 "Their sum is 1 + 2 + 3 + 4 + 6 + 9 + 12 + 18 + 36 = 91.\nThe answer is: 91"},
    {"type": "MATH_AnsAug",
     "query": "Solve for $x$: $3x - 7 = 2x + 5$.",
     "original_question": "Solve for $x$: $3x - 7 = 2x + 5$.",
     "response": "Subtracting $2x$ from both sides gives $x - 7 = 5$.\n"
                 "Adding 7 to both sides gives $x = \\boxed{12}$.\nThe answer is: 12"},
    {"type": "MATH_Rephrased",
     "query": "What is the value of $\\dbinom{8}{3}$?",
     "original_question": "Compute $\\dbinom{8}{3}$.",
     "response": "$\\dbinom{8}{3} = \\frac{8!}{3!\\,5!} = \\frac{8 \\times 7 \\times 6}{3 \\times 2 \\times 1} "
                 "= \\frac{336}{6} = \\boxed{56}$.\nThe answer is: 56"},
]

METAMATH_README = f"""---
language:
- en
pretty_name: MetaMathQA-40K (sample replica)
---

# MetaMathQA-40K — sample replica

**{SAMPLE_NOTE}**

A tiny local stand-in laid out like the Hugging Face dataset repository `meta-math/MetaMathQA-40K`:
one JSON file, `MetaMathQA-40K.json`, holding a list of records with keys `query`, `response`,
`type` and `original_question` (loaded as split `train`). The ten word problems and worked
solutions were written for this repository; every response ends with `The answer is: <ans>`
and the GSM-style ones also contain `#### <ans>`.

Generated by `scripts/make_samples.py`; edit the script, not these files.
"""

# =============================================================================== reddit en-ko
ENKO = [
    {"original": "I finally paid off my student loans after six years and honestly I don't know what to do "
                 "with the extra money each month.",
     "chosen": "6년 만에 드디어 학자금 대출을 다 갚았는데, 솔직히 매달 남는 돈을 어떻게 써야 할지 모르겠어요.",
     "rejected": "나는 마침내 6년 후에 내 학생 대출을 지불했고 정직하게 나는 매달 여분의 돈으로 무엇을 할지 모른다."},
    {"original": "Is it dumb to keep my emergency fund in a high-yield savings account instead of investing it?",
     "chosen": "비상금을 투자하지 않고 고금리 저축 계좌에 넣어 두는 게 바보 같은 걸까요?",
     "rejected": "내 비상 자금을 투자하는 대신 높은 수확 저축 계좌에 보관하는 것은 멍청한가요?"},
    {"original": "My company matches 401(k) contributions up to 5%, so I'm putting in at least that much.",
     "chosen": "회사가 401(k) 납입액을 5%까지 매칭해 주니까, 저는 최소한 그만큼은 넣고 있어요.",
     "rejected": "내 회사는 401(k) 기여를 5%까지 일치시키므로 나는 적어도 그만큼 넣고 있다."},
    {"original": "Index funds are boring, but boring is exactly what you want for your retirement money.",
     "chosen": "인덱스 펀드는 지루하지만, 은퇴 자금에는 바로 그 지루함이 필요합니다.",
     "rejected": "인덱스 펀드는 지루하지만 지루한 것은 정확히 당신이 당신의 은퇴 돈을 위해 원하는 것입니다."},
    {"original": "Don't try to time the market. Time in the market beats timing the market.",
     "chosen": "시장 타이밍을 맞추려 하지 마세요. 시장에 오래 머무는 것이 타이밍을 노리는 것보다 낫습니다.",
     "rejected": "시장을 시간하려고 하지 마세요. 시장에서의 시간은 시장을 타이밍하는 것을 이깁니다."},
    {"original": "The dividend got cut in half last quarter and the stock tanked 20% overnight.",
     "chosen": "지난 분기에 배당금이 반토막 나더니 주가가 하룻밤 새 20%나 폭락했어요.",
     "rejected": "배당금이 지난 분기에 반으로 잘렸고 주식은 밤새 20% 탱크했다."},
    {"original": "Should I pay down my 7% car loan first or put the extra cash into my brokerage account?",
     "chosen": "금리 7%짜리 자동차 대출부터 갚는 게 나을까요, 아니면 여윳돈을 증권 계좌에 넣는 게 나을까요?",
     "rejected": "나는 나의 7% 자동차 대출을 먼저 지불해야 하나요 아니면 여분의 현금을 내 중개 계정에 넣어야 하나요?"},
    {"original": "My credit score dropped 40 points just because I closed an old credit card.",
     "chosen": "오래된 신용카드 하나 해지했을 뿐인데 신용점수가 40점이나 떨어졌어요.",
     "rejected": "내 신용 점수는 내가 오래된 신용 카드를 닫았기 때문에 단지 40점 떨어졌다."},
    {"original": "With rates this high, CDs are actually paying more than my bond fund right now.",
     "chosen": "금리가 이렇게 높다 보니 요즘은 오히려 양도성예금증서(CD) 이자가 제 채권형 펀드 수익보다 높아요.",
     "rejected": "이 높은 요금으로, CD들은 실제로 지금 내 채권 기금보다 더 많이 지불하고 있다."},
    {"original": "I sold everything in March 2020 and bought back in way too late. Lesson learned the hard way.",
     "chosen": "2020년 3월에 전부 팔았다가 한참 늦게 다시 샀어요. 비싼 수업료를 내고 배운 셈이죠.",
     "rejected": "나는 2020년 3월에 모든 것을 팔았고 너무 늦게 다시 샀다. 어려운 방법으로 배운 교훈."},
]

ENKO_README = f"""---
language:
- en
- ko
pretty_name: reddit en-ko translation preference (sample replica)
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*
---

# reddit_enko_translation_preference — sample replica

**{SAMPLE_NOTE}**

A tiny local stand-in laid out like the Hugging Face dataset repository
`kuotient/reddit_enko_translation_preference`: split `train` with columns `original` (an English,
reddit-style sentence about personal finance or investing), `chosen` (a natural Korean translation)
and `rejected` (a worse, literal or mistranslated Korean version). All sentences were written for
this repository; none is a real reddit post.

Generated by `scripts/make_samples.py`; edit the script, not these files.
"""

# =============================================================================== KRX contest-style
MCQ_HEAD = "다음 문제를 읽고 정답으로 가장 알맞은 것을 고르시요."


def _mcq(question: str, choices: list[str], answer: int) -> dict:
    letters = "ABCDEFG"
    body = "\n".join(f"{letters[i]}. {c}" for i, c in enumerate(choices))
    prompt = f"{MCQ_HEAD}\n### 질문: {question}\n### 선택지:\n{body}"
    return {"prompt": prompt, "response": f"{letters[answer - 1]}. {choices[answer - 1]}"}


KRX = [
    _mcq("유가증권시장에서 주식의 하루 가격제한폭은 기준가격 대비 얼마인가?",
         ["±15%", "±30%", "±20%", "제한 없음"], 2),
    {"prompt": "공매도의 개념을 설명하고, 공매도가 주식시장에 미치는 긍정적 영향과 부정적 영향을 각각 서술하시오.",
     "response": "공매도는 보유하지 않은 주식을 빌려서 먼저 매도한 뒤, 나중에 주식을 사서 갚는 거래입니다. "
                 "주가 하락이 예상될 때 이익을 얻을 수 있습니다.\n"
                 "긍정적 영향으로는 고평가된 종목의 가격이 적정 수준으로 조정되도록 돕는 가격발견 기능, "
                 "시장 유동성 공급, 보유 주식의 하락 위험을 줄이는 헤지 수단 제공이 있습니다.\n"
                 "부정적 영향으로는 하락장에서 매도 압력이 커져 주가 하락 폭이 확대될 수 있고, "
                 "무차입 공매도나 허위 정보 유포와 결합하면 불공정거래로 이어질 수 있다는 점이 있습니다."},
    _mcq("증권시장의 매매체결 원칙 가운데 가장 먼저 적용되는 것은?",
         ["시간우선 원칙", "수량우선 원칙", "가격우선 원칙", "위탁자우선 원칙"], 3),
    _mcq("유가증권시장의 정규매매시간으로 옳은 것은?",
         ["08:00~15:00", "09:00~15:00", "09:30~16:00", "09:00~15:30"], 4),
    {"prompt": "상장기업이 주주배정 방식으로 유상증자를 실시할 때 기존 주주에게 미치는 영향을 설명해 주세요.",
     "response": "유상증자는 회사가 새 주식을 발행하고 그 대금을 받아 자본을 늘리는 것입니다. "
                 "주주배정 방식에서는 기존 주주에게 보유 비율에 따라 신주인수권이 주어지므로, "
                 "청약에 참여하면 지분율을 유지할 수 있지만 추가 자금을 내야 합니다. "
                 "청약하지 않으면 지분율이 낮아지고, 신주가 보통 시가보다 할인된 가격에 발행되므로 "
                 "권리락으로 주가가 조정되면서 주당 가치가 희석될 수 있습니다. "
                 "조달한 자금이 수익성 있는 투자에 쓰이면 장기적으로 기업가치가 높아질 수 있고, "
                 "부채 상환이나 운영자금 목적이라면 시장은 재무 부담의 신호로 받아들이기도 합니다."},
    _mcq("국내 주식시장에서 주식을 매매한 뒤 대금과 주식의 결제가 이루어지는 시점은?",
         ["매매체결일 당일(T)", "T+1일", "T+2일", "T+3일"], 3),
    _mcq("주가가 20,000원이고 주당순이익(EPS)이 2,500원인 기업의 주가수익비율(PER)은?",
         ["8배", "0.125배", "12.5배", "25배"], 1),
    {"prompt": "가상의 기업 해솔전자(가상)의 당기순이익이 300억원, 발행주식수가 2,000만주, 현재 주가가 "
               "45,000원일 때 주당순이익(EPS)과 주가수익비율(PER)을 구하시오.",
     "response": "EPS = 당기순이익 ÷ 발행주식수 = 300억원 ÷ 2,000만주 = 1,500원입니다.\n"
                 "PER = 주가 ÷ EPS = 45,000원 ÷ 1,500원 = 30배입니다."},
    _mcq("코스피 지수의 서킷브레이커(매매거래 일시중단) 제도에 대한 설명으로 옳은 것은?",
         ["개별 종목의 주가가 10% 이상 변동하면 해당 종목에만 발동된다.",
          "지수가 전일 종가 대비 8% 이상 하락하여 1분간 지속되면 1단계가 발동된다.",
          "지수가 급등할 때에도 같은 기준으로 발동된다.",
          "1단계가 발동되면 당일 장 종료 시까지 매매가 재개되지 않는다."], 2),
    {"prompt": "ETF와 일반 공모펀드의 차이점을 거래 방식과 비용 측면에서 설명하시오.",
     "response": "거래 방식: ETF는 거래소에 상장되어 장중에 주식처럼 실시간 시장가격으로 사고팔 수 있습니다. "
                 "일반 공모펀드는 판매사를 통해 가입·환매하며, 하루 한 번 산출되는 기준가격으로 거래되고 "
                 "환매 대금을 받기까지 며칠이 걸립니다.\n"
                 "비용: ETF는 대체로 지수를 추종하는 패시브 운용이 많아 총보수가 낮고 판매보수가 거의 없습니다. "
                 "다만 매매할 때 증권사 위탁수수료와 호가 스프레드 비용이 듭니다. 일반 공모펀드는 운용·판매보수가 "
                 "상대적으로 높고, 일정 기간 안에 환매하면 환매수수료가 붙을 수 있습니다."},
    _mcq("다음 중 파생상품에 해당하지 않는 것은?",
         ["주가지수선물", "통화옵션", "금리스왑", "신용부도스왑", "전환사채"], 5),
    {"prompt": "코스피(유가증권시장)와 코스닥 시장의 차이를 상장 기업의 특성 측면에서 설명하시오.",
     "response": "유가증권시장(코스피)은 자기자본, 매출, 이익 규모 등 상장 요건이 상대적으로 엄격해 "
                 "업력이 길고 규모가 큰 대기업과 중견기업이 주로 상장되어 있습니다. "
                 "코스닥 시장은 기술력과 성장성을 중시하는 시장으로, 기술특례상장 등 완화된 요건을 통해 "
                 "IT·바이오 등 성장 초기의 중소·벤처기업이 많이 상장되어 있습니다. "
                 "이 때문에 코스닥 종목은 일반적으로 코스피 종목보다 변동성이 크고 성장 기대가 주가에 크게 반영됩니다."},
]


def excel_csv(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> bytes:
    """Excel-on-Windows style CSV, as the contest file: UTF-8 BOM, CRLF record terminators,
    LF inside quoted cells (also used by bench/rehearsal_data.py)."""
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, lineterminator="\r\n", quoting=csv.QUOTE_MINIMAL)
    writer.writerow(list(header))
    for row in rows:
        writer.writerow(list(row))
    return "\ufeff".encode("utf-8") + buf.getvalue().encode("utf-8")


def krx_csv() -> bytes:
    return excel_csv(["prompt", "response"], ([row["prompt"], row["response"]] for row in KRX))


# =============================================================================== qa_rules.json
_RULE_A = "「가상금융투자(주) 내부통제기준 시행규칙」(샘플용 가상 규정)"
_RULE_B = "「가상전자금융업자 전산장애 대응 시행규칙」(샘플용 가상 규정)"

QA_RULES = {"_note": SAMPLE_NOTE, "items": [
    {"field": "financial_market",
     "question": "채권의 듀레이션(duration)이란 무엇이며, 금리 위험 관리에서 어떤 의미가 있나요?",
     "answer": "듀레이션은 채권에서 발생하는 현금흐름의 현재가치를 가중치로 삼아 계산한 가중평균 회수기간입니다. "
               "듀레이션이 길수록 금리 변화에 대한 채권 가격의 민감도가 크므로, 금리 상승이 예상되면 "
               "포트폴리오의 듀레이션을 줄이고 금리 하락이 예상되면 늘리는 방식으로 금리 위험을 관리합니다.",
     "reference": "듀레이션은 채권 현금흐름의 현재가치 가중평균 만기이다. 수정듀레이션에 금리 변동폭을 곱하면 "
                  "채권 가격 변동률을 근사할 수 있다. 다른 조건이 같다면 만기가 길수록, 표면이자율이 낮을수록 "
                  "듀레이션은 길어진다."},
    {"field": "financial_market",
     "question": "유상증자와 무상증자는 어떻게 다른가요?",
     "answer": "유상증자는 새 주식을 발행하면서 주주나 투자자에게 대금을 받아 실제로 회사에 자금이 들어오는 "
               "증자입니다. 무상증자는 대금을 받지 않고 자본잉여금이나 이익잉여금을 자본금으로 옮겨 신주를 "
               "나누어 주는 것으로, 주식 수는 늘지만 회사의 자본총계와 주주의 지분 가치에는 변화가 없습니다.",
     "reference": "유상증자는 신주 발행 대가로 자금을 납입받아 자본금과 자본총계가 함께 증가한다. 무상증자는 "
                  "잉여금의 자본전입으로 자본금만 증가하고 자본총계는 변하지 않는다."},
    {"field": "financial_market",
     "question": "ETF의 괴리율은 무엇이며 어떻게 계산하나요?",
     "answer": "괴리율은 ETF가 거래소에서 거래되는 시장가격이 ETF의 실제 가치인 순자산가치(NAV)와 얼마나 "
               "차이 나는지를 나타내는 지표입니다. (시장가격 - NAV) ÷ NAV × 100으로 계산하며, 값이 양수이면 "
               "NAV보다 비싸게, 음수이면 싸게 거래되고 있다는 뜻입니다.",
     "reference": "괴리율(%) = (ETF 시장가격 - 주당 순자산가치) / 주당 순자산가치 × 100. 유동성공급자(LP)는 "
                  "호가를 제출하여 괴리율이 과도하게 벌어지지 않도록 한다."},
    {"field": "financial_market",
     "question": "수출기업이 환위험을 줄이기 위해 선물환 매도 계약을 체결하는 이유는 무엇인가요?",
     "answer": "수출기업은 앞으로 받을 외화 대금을 원화로 바꿔야 하므로 그 사이 환율이 하락(원화 강세)하면 "
               "원화 수입이 줄어듭니다. 선물환 매도 계약으로 미래에 외화를 팔 환율을 지금 확정해 두면 환율이 "
               "하락해도 원화 수입이 보전되므로 환위험을 줄일 수 있습니다. 대신 환율이 상승해도 추가 이익은 "
               "얻을 수 없습니다.",
     "reference": "선물환 매도는 미래의 특정 시점에 외화를 약정 환율로 매도하기로 하는 계약으로, 외화 자산이나 "
                  "외화 수취 예정액을 가진 경제주체의 환율 하락 위험을 헤지한다."},
    {"field": "financial_market",
     "question": "기준금리 인상이 주식시장에 미치는 일반적인 영향을 설명해 주세요.",
     "answer": "기준금리가 오르면 기업의 이자 비용이 늘고 소비와 투자가 위축되어 기업 이익 전망이 낮아집니다. "
               "또 미래 현금흐름을 할인하는 할인율이 높아져 주식의 이론 가치가 떨어지며, 예금·채권 등 안전자산의 "
               "상대적 매력이 커져 주식시장에서 자금이 빠져나갈 수 있습니다. 특히 먼 미래의 이익 비중이 큰 "
               "성장주가 더 큰 영향을 받는 경향이 있습니다.",
     "reference": "금리 상승은 기업의 자금조달 비용 상승, 할인율 상승에 따른 주식 가치 하락, 위험자산 대비 "
                  "안전자산 선호 증가를 통해 주가에 하방 압력으로 작용한다."},
    {"field": "accounting",
     "question": "감가상각 방법 중 정액법과 정률법은 어떻게 다른가요?",
     "answer": "정액법은 (취득원가 - 잔존가치)를 내용연수에 걸쳐 매년 같은 금액으로 상각합니다. 정률법은 "
               "매 기초의 미상각잔액에 일정한 상각률을 곱해 상각하므로 초기에 감가상각비가 크고 시간이 지날수록 "
               "줄어듭니다. 자산의 경제적 효익이 초기에 많이 소비된다면 정률법이 더 적합할 수 있습니다.",
     "reference": "감가상각방법은 자산의 미래경제적효익이 소비되는 형태를 반영하여 정한다. 정액법은 내용연수 "
                  "동안 일정액의 감가상각비를, 체감잔액법(정률법 등)은 내용연수 동안 감소하는 감가상각비를 "
                  "인식한다."},
    {"field": "accounting",
     "question": "K-IFRS 제1115호에 따른 수익인식 5단계를 설명해 주세요.",
     "answer": "① 고객과의 계약을 식별하고, ② 계약에 포함된 수행의무를 식별한 뒤, ③ 거래가격을 산정하고, "
               "④ 거래가격을 각 수행의무에 배분하며, ⑤ 수행의무를 이행할 때(또는 이행하는 기간에 걸쳐) "
               "수익을 인식합니다.",
     "reference": "수익은 고객에게 약속한 재화나 용역을 이전하는 대가로 받을 것으로 예상하는 금액으로 인식하며, "
                  "계약 식별 - 수행의무 식별 - 거래가격 산정 - 거래가격 배분 - 수행의무 이행 시 수익 인식의 "
                  "단계를 거친다."},
    {"field": "accounting",
     "question": "재고자산에 저가법을 적용한다는 것은 무슨 뜻인가요?",
     "answer": "재고자산을 취득원가와 순실현가능가치 중 낮은 금액으로 평가한다는 뜻입니다. 순실현가능가치는 "
               "예상 판매가격에서 완성과 판매에 드는 추정 비용을 뺀 금액이며, 이것이 원가보다 낮으면 그 차액을 "
               "재고자산 평가손실로 인식하고 재고자산을 감액합니다.",
     "reference": "재고자산은 취득원가와 순실현가능가치 중 작은 금액으로 측정한다. 순실현가능가치는 통상적인 "
                  "영업과정의 예상 판매가격에서 예상되는 추가 완성원가와 판매비용을 차감한 금액이다."},
    {"field": "accounting",
     "question": "현금흐름표에서 현금흐름은 어떤 활동으로 구분되나요?",
     "answer": "영업활동, 투자활동, 재무활동의 세 가지로 구분합니다. 영업활동은 제품 판매나 원재료 구입처럼 "
               "주된 수익창출 활동, 투자활동은 유형자산이나 금융자산의 취득과 처분, 재무활동은 차입금의 차입과 "
               "상환, 주식 발행, 배당금 지급처럼 자본과 차입 규모를 바꾸는 활동입니다.",
     "reference": "현금흐름표는 회계기간 동안의 현금흐름을 영업활동, 투자활동, 재무활동으로 분류하여 보고한다."},
    {"field": "accounting",
     "question": "충당부채와 우발부채의 차이는 무엇인가요?",
     "answer": "충당부채는 과거 사건으로 인한 현재의무가 있고 자원이 유출될 가능성이 높으며 금액을 신뢰성 있게 "
               "추정할 수 있어 재무상태표에 부채로 인식합니다. 우발부채는 의무의 존재가 불확실하거나 자원 유출 "
               "가능성이 높지 않거나 금액을 신뢰성 있게 추정할 수 없어 부채로 인식하지 않고, 유출 가능성이 아주 "
               "낮지 않다면 주석으로 공시합니다.",
     "reference": "충당부채는 인식 요건을 모두 충족하면 부채로 인식한다. 우발부채는 부채로 인식하지 아니하며, "
                  "자원의 유출 가능성이 아주 낮지 않다면 주석으로 공시한다."},
    {"field": "rules",
     "question": "임직원이 본인 명의 계좌로 금융투자상품을 매매한 경우, 언제까지 누구에게 신고해야 하나요?",
     "answer": "매매일이 속하는 분기의 종료일부터 10영업일 이내에 준법감시인에게 매매명세를 신고해야 합니다. "
               "준법감시인은 신고 내용을 매 분기 점검하고 그 결과를 대표이사에게 보고합니다.",
     "reference": f"{_RULE_A} 제7조(임직원 매매명세의 신고) ① 임직원은 본인 명의의 계좌로 금융투자상품을 "
                  "매매한 경우 매매일이 속하는 분기의 종료일부터 10영업일 이내에 준법감시인에게 매매명세를 "
                  "신고하여야 한다. ② 준법감시인은 제1항에 따른 신고 내용을 매 분기 점검하고 그 결과를 "
                  "대표이사에게 보고하여야 한다."},
    {"field": "rules",
     "question": "고객과의 거래가 끝난 뒤 거래기록은 얼마 동안 보관해야 하며, 보관기간이 지나면 어떻게 처리하나요?",
     "answer": "거래가 종료된 날부터 5년간 보관해야 합니다. 보관기간이 지난 거래기록은 복구할 수 없는 방법으로 "
               "파기하고, 파기 일자·대상·방법을 파기대장에 기록해야 합니다.",
     "reference": f"{_RULE_A} 제12조(거래기록의 보관 및 파기) ① 회사는 고객과의 거래가 종료된 날부터 5년간 "
                  "거래기록을 보관하여야 한다. ② 제1항의 기간이 지난 거래기록은 복구할 수 없는 방법으로 파기하고, "
                  "파기 일자·대상·방법을 파기대장에 기록하여야 한다."},
    {"field": "rules",
     "question": "일반투자자에게 투자권유를 하기 전에 회사가 파악하고 확인받아야 하는 것은 무엇인가요?",
     "answer": "면담이나 설문조사 등을 통해 일반투자자의 투자목적, 재산상황, 투자경험을 파악해야 하고, 그 결과를 "
               "투자자로부터 서명, 기명날인, 녹취 또는 전자우편 등의 방법으로 확인받아야 합니다. 파악한 정보에 "
               "비추어 적합하지 않은 투자권유는 할 수 없습니다.",
     "reference": f"{_RULE_A} 제15조(투자자 정보의 확인) ① 회사는 일반투자자에게 투자권유를 하기 전에 면담·"
                  "설문조사 등을 통하여 투자목적·재산상황·투자경험을 파악하고, 그 결과를 서명, 기명날인, 녹취, "
                  "전자우편 그 밖에 이에 준하는 방법으로 일반투자자로부터 확인받아야 한다. ② 회사는 제1항에 따라 "
                  "파악한 정보에 비추어 적합하지 아니하다고 인정되는 투자권유를 하여서는 아니 된다."},
    {"field": "rules",
     "question": "전자금융거래 관련 전산장애가 30분 이상 계속되면 어떤 절차로 보고해야 하나요?",
     "answer": "장애가 발생한 시점부터 1시간 이내에 감독기관에 1차 보고를 해야 하고, 장애를 복구한 뒤 7일 이내에 "
               "장애 원인과 재발방지 대책을 담은 최종 보고서를 제출해야 합니다.",
     "reference": f"{_RULE_B} 제9조(전산장애의 보고) ① 회사는 전자금융거래와 관련된 전산장애가 30분 이상 지속된 "
                  "경우 장애 발생 시점부터 1시간 이내에 감독기관에 1차 보고를 하여야 한다. ② 회사는 장애를 복구한 "
                  "날부터 7일 이내에 장애 원인과 재발방지 대책을 포함한 최종 보고서를 감독기관에 제출하여야 한다."},
]}

# =============================================================================== table_qa.jsonl
TABLE_QA = [
    {"table": [["항목(단위: 억원)", "2022년", "2023년", "2024년"],
               ["매출액", "1,200", "1,350", "1,500"],
               ["영업이익", "84", "108", "180"],
               ["당기순이익", "60", "81", "135"]],
     "question": "한빛반도체(가상)의 요약 손익계산서이다. 2024년 영업이익률(영업이익 ÷ 매출액)은 몇 %인가?",
     "answer": "2024년 영업이익률은 180 ÷ 1,500 × 100 = 12.0%입니다.",
     "category": "손익계산서"},
    {"table": [["항목(단위: 억원)", "2022년", "2023년", "2024년"],
               ["매출액", "520", "610", "700"],
               ["당기순이익", "40", "46", "58"]],
     "question": "푸른바이오(가상)의 실적표이다. 2022년 대비 2024년 당기순이익 증가율은 몇 %인가?",
     "answer": "(58 - 40) ÷ 40 × 100 = 45.0%로, 당기순이익은 2022년보다 45.0% 증가했습니다.",
     "category": "손익계산서"},
    {"table": [["종목", "주가(원)", "EPS(원)", "BPS(원)"],
               ["가람식품(가상)", "36,000", "3,000", "24,000"],
               ["다온전자(가상)", "84,000", "4,200", "60,000"],
               ["새솔건설(가상)", "12,500", "2,500", "25,000"]],
     "question": "세 종목 가운데 PER(주가 ÷ EPS)이 가장 낮은 종목과 그 PER은?",
     "answer": "새솔건설(가상)이며 PER은 12,500 ÷ 2,500 = 5.0배입니다. "
               "(가람식품(가상) 12.0배, 다온전자(가상) 20.0배)",
     "category": "주가지표"},
    {"table": [["상품", "연 이율", "이자 계산 방식", "만기"],
               ["A정기예금", "3.0%", "단리", "2년"],
               ["B정기예금", "2.9%", "연 복리", "2년"]],
     "question": "1,000만원을 예치한다면 만기 세전 이자가 더 많은 상품은 무엇이며, 차이는 얼마인가?",
     "answer": "A정기예금입니다. A는 10,000,000원 × 3.0% × 2년 = 600,000원, B는 10,000,000원 × (1.029² - 1) = "
               "588,410원이므로 A의 이자가 11,590원 더 많습니다.",
     "category": "금리"},
    {"table": [["통화", "매매기준율(원)"],
               ["USD", "1,380.00"],
               ["JPY(100엔)", "920.00"],
               ["EUR", "1,500.00"]],
     "question": "500달러를 매매기준율로 원화로 바꾼 뒤, 그 원화를 다시 매매기준율로 엔화로 바꾸면 몇 엔인가?",
     "answer": "500달러 × 1,380원 = 690,000원이고, 690,000원 ÷ 920원 × 100엔 = 75,000엔입니다.",
     "category": "환율"},
    {"table": [["연도", "주당배당금(원)", "연말 주가(원)", "주당순이익(원)"],
               ["2023", "1,200", "40,000", "4,000"],
               ["2024", "1,500", "50,000", "6,000"]],
     "question": "2024년의 배당수익률과 배당성향은 각각 몇 %인가?",
     "answer": "배당수익률은 1,500 ÷ 50,000 × 100 = 3.0%, 배당성향은 1,500 ÷ 6,000 × 100 = 25.0%입니다.",
     "category": "배당"},
]

# =============================================================================== top100_companies.json
COMPANIES = {"_note": SAMPLE_NOTE + " All companies are fictional.", "companies": [
    {"name": "한빛반도체(가상)", "market": "KOSPI", "sector": "반도체",
     "summary": "차량용 전력반도체와 반도체 패키징 기판을 만드는 가상의 기업이다. 전기차 보급 확대에 힘입어 "
                "2024년 매출이 전년 대비 11% 늘었고, 고부가 제품 비중이 커지면서 영업이익률이 12%로 개선되었다.",
     "revenue_krw_bn": 150.0, "operating_income_krw_bn": 18.0,
     "major_products": ["차량용 전력반도체", "반도체 패키징 기판", "DRAM 테스트 소켓"]},
    {"name": "푸른바이오(가상)", "market": "KOSDAQ", "sector": "제약·바이오",
     "summary": "바이오의약품 위탁생산(CMO)과 체외진단 키트를 주력으로 하는 가상의 바이오 기업이다. "
                "해외 고객사와 장기 공급 계약을 맺어 매출 기반을 넓히고 있으며, 연구개발비 비중이 높은 편이다.",
     "revenue_krw_bn": 70.0, "operating_income_krw_bn": 8.4,
     "major_products": ["바이오의약품 위탁생산(CMO)", "체외진단 키트", "건강기능식품 원료"]},
    {"name": "다온전자(가상)", "market": "KOSPI", "sector": "전기·전자",
     "summary": "스마트 가전과 산업용 디스플레이를 생산하는 가상의 전자 기업이다. 국내외 가전 수요 둔화로 "
                "매출 성장은 정체되었지만, IoT 센서 모듈 등 부품 사업을 키워 수익 구조를 다변화하고 있다.",
     "revenue_krw_bn": 2350.0, "operating_income_krw_bn": 141.0,
     "major_products": ["스마트 가전", "산업용 디스플레이", "IoT 센서 모듈"]},
    {"name": "가람식품(가상)", "market": "KOSPI", "sector": "음식료품",
     "summary": "즉석밥과 냉동식품을 만드는 가상의 식품 기업이다. 1인 가구 증가로 간편식 수요가 꾸준히 늘고 있으며, "
                "원재료 가격 변동을 판매가격 조정과 원가 절감으로 흡수해 안정적인 이익을 내고 있다.",
     "revenue_krw_bn": 1180.5, "operating_income_krw_bn": 70.8,
     "major_products": ["즉석밥", "냉동만두", "발효 소스"]},
    {"name": "새솔건설(가상)", "market": "KOSPI", "sector": "건설",
     "summary": "공동주택과 물류센터를 주로 시공하는 가상의 종합건설사이다. 주택 경기 둔화로 분양 사업의 수익성이 "
                "낮아지자 해상풍력 기초구조물 등 신재생에너지 관련 플랜트 수주를 늘리고 있다.",
     "revenue_krw_bn": 3420.0, "operating_income_krw_bn": 119.7,
     "major_products": ["공동주택", "물류센터", "해상풍력 기초구조물"]},
    {"name": "누리핀테크(가상)", "market": "KOSDAQ", "sector": "IT서비스",
     "summary": "간편결제 플랫폼과 중소기업용 전자세금계산서 솔루션을 운영하는 가상의 핀테크 기업이다. "
                "거래액 증가에 따라 결제 수수료 수익이 늘고 있으며, 기업 간 정산 API 사업으로 영역을 넓히고 있다.",
     "revenue_krw_bn": 42.3, "operating_income_krw_bn": 5.1,
     "major_products": ["간편결제 플랫폼", "전자세금계산서 솔루션", "B2B 정산 API"]},
]}

# =============================================================================== AI Hub ko-zh (xlsx)
KOZH_COLUMNS = ["ID", "분야", "한국어", "중국어"]
KOZH = [
    ("금융", "한국은행은 물가 안정을 위해 기준금리를 연 3.50%로 동결했다.",
     "韩国银行为稳定物价，将基准利率维持在年3.50%不变。"),
    ("증권", "외국인 투자자의 순매수에 힘입어 코스피 지수가 2% 넘게 상승했다.",
     "受外国投资者净买入推动，KOSPI指数上涨逾2%。"),
    ("경제", "수출 증가세가 둔화되면서 올해 경상수지 흑자 폭이 줄어들 것으로 예상된다.",
     "随着出口增势放缓，预计今年经常账户顺差规模将有所缩小。"),
    ("금융", "은행은 대출을 심사할 때 차주의 소득과 기존 부채를 함께 고려한다.",
     "银行在审批贷款时，会综合考虑借款人的收入和现有债务。"),
    ("보험", "보험료 납입이 두 달 이상 연체되면 계약이 해지될 수 있습니다.",
     "如果保险费逾期两个月以上未缴纳，合同可能会被解除。"),
    ("회계", "회사는 당기 영업이익이 전년 대비 15% 증가했다고 공시했다.",
     "公司公告称，本期营业利润同比增长15%。"),
    ("외환", "원화 가치가 하락하면 수입 원자재의 가격 부담이 커진다.",
     "韩元贬值会加重进口原材料的价格负担。"),
    ("증권", "이 펀드는 국내 우량 회사채에 주로 투자하여 안정적인 이자 수익을 추구한다.",
     "该基金主要投资于韩国国内优质公司债券，追求稳定的利息收益。"),
    ("경제", "정부는 중소기업의 자금난을 덜기 위해 정책금융 지원을 확대하기로 했다.",
     "政府决定扩大政策性金融支持，以缓解中小企业的资金困难。"),
    ("금융", "전자금융 사기를 예방하려면 출처가 불분명한 링크를 누르지 말아야 한다.",
     "为防范电子金融诈骗，不应点击来源不明的链接。"),
]

_FIXED_DT = datetime.datetime(2024, 1, 1, 0, 0, 0)
_ZIP_DT = (1980, 1, 1, 0, 0, 0)


def xlsx_bytes(columns: Sequence[str], rows: Iterable[Sequence[Any]], title: str,
               creator: str = "make_samples.py") -> bytes:
    """A one-sheet workbook with fixed document dates and zip member stamps: the same bytes on
    every run with the pinned openpyxl (also used by bench/rehearsal_data.py)."""
    from openpyxl import Workbook
    from openpyxl.writer.excel import ExcelWriter

    wb = Workbook()
    ws = wb.active
    ws.title = "Sheet1"
    ws.append(list(columns))
    for row in rows:
        ws.append(list(row))
    props = wb.properties
    props.creator = creator
    props.lastModifiedBy = creator
    props.title = title
    props.created = _FIXED_DT
    props.modified = _FIXED_DT
    raw = io.BytesIO()
    with zipfile.ZipFile(raw, "w", zipfile.ZIP_DEFLATED) as archive:
        ExcelWriter(wb, archive).save()  # unlike save_workbook, leaves `modified` alone
    # Re-pack with fixed member timestamps/attributes (writestr stamps the current time).
    out = io.BytesIO()
    with zipfile.ZipFile(raw) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            member = zipfile.ZipInfo(info.filename, date_time=_ZIP_DT)
            member.compress_type = zipfile.ZIP_DEFLATED
            member.create_system = 3
            member.external_attr = 0o600 << 16
            dst.writestr(member, src.read(info.filename))
    return out.getvalue()


def kozh_xlsx() -> bytes:
    rows = ([f"KOZH-SAMPLE-{i:04d}", field, ko, zh] for i, (field, ko, zh) in enumerate(KOZH, start=1))
    return xlsx_bytes(KOZH_COLUMNS, rows, "AI Hub ko-zh style SAMPLE (fictional, written for this repository)")


# =============================================================================== AI Hub econ calc (cp949)
ECON_CALC_COLUMNS = ["ID", "유형", "문제", "풀이", "정답"]
ECON_CALC = [
    ("이자계산",
     "원금 2,000,000원을 연 4% 단리로 3년간 예치하면 만기에 받는 원리금은 얼마인가?",
     "이자 = 2,000,000 * 0.04 * 3 = 240,000원. 원리금 = 2,000,000 + 240,000 = 2,240,000원.",
     "2,240,000원"),
    ("이자계산",
     "원금 10,000,000원을 연 5% 연복리로 2년간 예치하면 만기 원리금은 얼마인가?",
     "원리금 = 10,000,000 * (1 + 0.05)^2 = 10,000,000 * 1.1025 = 11,025,000원.",
     "11,025,000원"),
    ("현재가치",
     "3년 후에 받을 1,331,000원의 현재가치는 얼마인가? (할인율 연 10%, 연복리)",
     "현재가치 = 1,331,000 / (1 + 0.10)^3 = 1,331,000 / 1.331 = 1,000,000원.",
     "1,000,000원"),
    ("순현재가치",
     "초기 투자액이 9,000,000원이고 1년 후 6,600,000원, 2년 후 4,840,000원의 현금유입이 예상되는 사업의 "
     "순현재가치(NPV)는 얼마이며 투자 여부는? (할인율 연 10%)",
     "유입의 현재가치 = 6,600,000 / 1.1 + 4,840,000 / 1.21 = 6,000,000 + 4,000,000 = 10,000,000원. "
     "NPV = 10,000,000 - 9,000,000 = 1,000,000원으로 0보다 크므로 투자한다.",
     "1,000,000원(투자 채택)"),
    ("채권수익률",
     "액면 10,000원, 표면이율 연 3%(만기 일시 지급), 잔존만기 1년인 채권을 9,800원에 샀다. "
     "만기수익률은 약 몇 %인가? (소수점 셋째 자리에서 반올림)",
     "만기 수령액 = 10,000 + 10,000 * 0.03 = 10,300원. 만기수익률 = 10,300 / 9,800 - 1 = 0.05102... "
     "따라서 약 5.10%.",
     "약 5.10%"),
    ("주가지표",
     "주가 30,000원, 당기순이익 60억원, 발행주식수 500만주, 자기자본 750억원인 회사의 PER과 PBR은?",
     "EPS = 60억 / 500만주 = 1,200원, PER = 30,000 / 1,200 = 25배. "
     "BPS = 750억 / 500만주 = 15,000원, PBR = 30,000 / 15,000 = 2배.",
     "PER 25배, PBR 2배"),
    ("환율환산",
     "원/달러 매매기준율이 1,350원일 때 2,500달러를 원화로 환산하면 얼마인가?",
     "2,500 * 1,350 = 3,375,000원.",
     "3,375,000원"),
    ("환율환산",
     "원/달러 환율이 1,350원이고 엔/달러 환율이 150엔일 때 100엔당 원화 환율(교차환율)은 얼마인가?",
     "1엔 = 1,350 / 150 = 9원이므로 100엔 = 9 * 100 = 900원.",
     "100엔당 900원"),
]


def econ_calc_csv() -> bytes:
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, lineterminator="\r\n")
    writer.writerow(ECON_CALC_COLUMNS)
    for index, row in enumerate(ECON_CALC, start=1):
        writer.writerow([f"ECON-SAMPLE-{index:04d}", *row])
    return buf.getvalue().encode("cp949")  # strict: raises if a character is not in CP949


# =============================================================================== checks
def _self_check() -> None:
    """Arithmetic behind the numeric answers above (fails loudly if someone edits a number)."""
    # KMMLU numeric items
    assert 3 + 1.2 * (8 - 3) == 9.0
    assert (1000 - 100) / 5 == 180 and 1200 * 3 / 6 == 600
    assert 500 + 80 - 50 + 30 == 560 and 300 / 200 == 1.5
    assert 500 - (520 - 40) == 20 and 2000 * 0.03 - 20 == 40
    assert 120 / 1000 == 0.12 and 1000 - (200 + 700 - 150) == 250
    assert (2400 - 400) / 4 * 6 / 12 == 250 and 600 / 400 == 1.5
    assert round(1350 * 1.04 / 1.02) == 1376 and 1 / 0.10 == 10
    assert 5000 * 0.1 - 3000 * 0.1 == 200 and 10000 + 2000 - 500 == 11500
    assert 50000 - 30000 - 2000 == 18000 and 30000 - 5000 - 1000 == 24000
    # tables
    assert 180 / 1500 == 0.12 and (58 - 40) / 40 == 0.45
    assert 36000 / 3000 == 12 and 84000 / 4200 == 20 and 12500 / 2500 == 5
    assert round(10_000_000 * 0.03 * 2) == 600_000 and round(10_000_000 * (1.029 ** 2 - 1)) == 588_410
    assert 500 * 1380 == 690_000 and 690_000 / 920 * 100 == 75_000
    assert 1500 / 50000 == 0.03 and 1500 / 6000 == 0.25
    # econ calc
    assert 2_000_000 * (1 + 0.04 * 3) == 2_240_000 and round(10_000_000 * 1.05 ** 2) == 11_025_000
    assert round(1_331_000 / 1.1 ** 3) == 1_000_000
    assert round(6_600_000 / 1.1 + 4_840_000 / 1.21 - 9_000_000) == 1_000_000
    assert round((10_300 / 9_800 - 1) * 100, 2) == 5.10
    assert 30000 / (6e9 / 5e6) == 25 and 30000 / (75e9 / 5e6) == 2
    assert 2500 * 1350 == 3_375_000 and 1350 / 150 * 100 == 900
    # shapes
    sizes = {s: {k: len(v) for k, v in splits.items()} for s, splits in KMMLU.items()}
    assert sizes == {"Economics": {"train": 14, "dev": 3, "test": 6},
                     "Accounting": {"train": 0, "dev": 12, "test": 5},
                     "Taxation": {"train": 6, "dev": 2, "test": 3}}, sizes
    econ_train = [(r["question"], tuple(r["choices"])) for r in KMMLU["Economics"]["train"]]
    assert len(econ_train) - len(set(econ_train)) == 1
    assert len(METAMATH) == 10 and all(r["response"].rsplit("\n", 1)[-1].startswith("The answer is: ")
                                       for r in METAMATH)
    assert all(("#### " in r["response"]) == r["type"].startswith("GSM") for r in METAMATH)
    assert len(ENKO) == 10 and len(KRX) == 12 and len(TABLE_QA) == 6 and len(KOZH) == 10
    assert len(COMPANIES["companies"]) == 6 and len(ECON_CALC) == 8
    fields = [i["field"] for i in QA_RULES["items"]]
    assert fields.count("financial_market") == 5 and fields.count("accounting") == 5 and fields.count("rules") == 4


# =============================================================================== build
def _json(obj) -> bytes:
    return (json.dumps(obj, ensure_ascii=False, indent=2) + "\n").encode("utf-8")


ENKO_PARQUET = "train-00000-of-00001-96ce59b7522aea8d.parquet"


def _parquet(rows: list[dict]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), sink, compression="snappy")
    return sink.getvalue().to_pybytes()


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def build() -> dict[str, bytes]:
    _self_check()
    files: dict[str, bytes] = {}
    files["hub/KMMLU/README.md"] = kmmlu_readme().encode("utf-8")
    for subject in KMMLU:
        for split in ("train", "dev", "test"):
            files[f"hub/KMMLU/data/{subject}-{split}.csv"] = kmmlu_csv(subject, split)
    files["hub/MetaMathQA-40K/README.md"] = METAMATH_README.encode("utf-8")
    files["hub/MetaMathQA-40K/MetaMathQA-40K.json"] = _json(
        [{k: r[k] for k in ("query", "response", "type", "original_question")} for r in METAMATH])
    files["hub/reddit_enko_translation_preference/README.md"] = ENKO_README.encode("utf-8")
    # the file name the repository has at the pinned revision (c95b18f)
    files[f"hub/reddit_enko_translation_preference/data/{ENKO_PARQUET}"] = _parquet(ENKO)
    files["raw/krx_sample.csv"] = krx_csv()
    files["raw/qa_rules.json"] = _json(QA_RULES)
    files["raw/table_qa.jsonl"] = _jsonl(TABLE_QA)
    files["raw/top100_companies.json"] = _json(COMPANIES)
    files["raw/aihub_kozh.xlsx"] = kozh_xlsx()
    files["raw/aihub_econ_calc.csv"] = econ_calc_csv()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from make_price_samples import sample_files as price_files
    files.update({f"raw/prices/{name}": data for name, data in price_files().items()})
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "data" / "samples"), help="output root")
    parser.add_argument("--check", action="store_true",
                        help="do not write; exit 1 if any file on disk differs from what would be written")
    args = parser.parse_args(argv)
    out = Path(args.out)
    files = build()
    if args.check:
        stale = [rel for rel, data in files.items()
                 if not (out / rel).is_file() or (out / rel).read_bytes() != data]
        for rel in stale:
            print(f"differs: {out / rel}", file=sys.stderr)
        return 1 if stale else 0
    for rel, data in files.items():
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        with open(fd, "wb") as handle:
            handle.write(data)
            os.fchmod(handle.fileno(), 0o644)  # mkstemp creates 0600
        Path(tmp).replace(target)
        print(f"wrote {target} ({len(data)} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
