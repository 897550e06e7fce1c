"""The shape of stages/: functions a reader can hold (the longest is printed by
scripts/longest_functions.py) and a common layer that reaches into no stage."""
from __future__ import annotations

from scripts.longest_functions import function_lengths


def test_no_function_in_stages_is_longer_than_60_lines():
    rows = function_lengths()
    print("longest functions in stages/:", rows[:3])
    assert rows and rows[0][0] <= 60, rows[:5]
