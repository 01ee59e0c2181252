"""evaluation/report.py: the share of the gap each row closed."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evaluation.report import Row, gap_closed  # noqa: E402


def test_gap_closed_is_relative_to_the_worst_row():
    rows = [Row("ref", "", "", "", 4, 0, 0, "t", 1.0, 0, 2.0, 1, 1, 1),
            Row("conv", "", "", "", 1, 0, 0, "t", 1.5, 0, 3.0, 1, 1, 1),
            Row("up", "", "", "", 1, 0, 0, "t", 1.2, 0, 2.25, 1, 1, 1)]
    gap_closed(rows, reference=0)
    assert [r.gap_closed for r in rows] == [1.0, 0.0, 0.75]
    assert [r.delta_bits_per_byte for r in rows] == [0.0, 1.0, 0.25]

