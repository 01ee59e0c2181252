"""evaluation/report.py and stats.py: the share of the gap each row closed, the standard
errors and the paired test against hand computations on fixed per-window scores."""
from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evaluation.report import Row, format_table, gap_closed, make_row, paired_deltas  # noqa: E402
from evaluation.stats import ratio_se  # noqa: E402
from model.config import ModelConfig  # noqa: E402


def test_gap_closed_is_relative_to_the_worst_row():
    rows = [Row("ref", "", "", "", 4, 0, 0, "t", 1.0, 0, 2.0, 1, 1, 1),
            Row("conv", "", "", "", 1, 0, 0, "t", 1.5, 0, 3.0, 1, 1, 1),
            Row("up", "", "", "", 1, 0, 0, "t", 1.2, 0, 2.25, 1, 1, 1)]
    gap_closed(rows, reference=0)
    assert [r.gap_closed for r in rows] == [1.0, 0.0, 0.75]
    assert [r.delta_bits_per_byte for r in rows] == [0.0, 1.0, 0.25]



def test_standard_error_of_equal_windows_is_that_of_their_means():
    # four windows of 4 tokens: per-token means 2.5, 3, 2.25, 3.75 around 2.875; squared
    # deviations sum to 1.3125, so SE = sqrt(1.3125 / 3) / sqrt(4)
    assert ratio_se([10, 12, 9, 15], [4, 4, 4, 4]) == pytest.approx(math.sqrt(1.3125 / 3) / 2)
    assert ratio_se([1, 0, 1, 1], [1, 1, 1, 1]) == pytest.approx(0.25)  # sqrt(.75 * .25 / 3)
    assert ratio_se([3.0], [4]) is None


def test_standard_error_of_unequal_windows_is_the_delta_method():
    num, den = [10.0, 3.0, 9.0, 20.0, 7.5], [4.0, 1.0, 5.0, 8.0, 2.0]
    r, n = sum(num) / sum(den), len(num)
    # Var(mean num / mean den) ~ (s_num^2 - 2 r s_num,den + r^2 s_den^2) / (n mean_den^2)
    var = (statistics.variance(num) - 2 * r * statistics.covariance(num, den)
           + r * r * statistics.variance(den)) / (n * statistics.mean(den) ** 2)
    assert ratio_se(num, den) == pytest.approx(math.sqrt(var))


def scored(name: str, windows, tokenizer: str = "t") -> Row:
    source = SimpleNamespace(name=name, path=name, kind="gqalab")
    config = ModelConfig(vocab_size=16, n_layer=1, n_head=2, n_kv_head=2, d_model=8,
                         max_seq_len=8)
    tok = SimpleNamespace(file_name=tokenizer, sha256=lambda: "0" * 64)
    return make_row(source, config, tok, np.array(windows, float), torch.float32)


def test_rows_carry_errors_and_the_paired_test_on_the_same_windows():
    windows = [[[10, 4, 8], [12, 4, 8], [9, 4, 8]],  # (NLL, tokens, bytes) per window
               [[11, 4, 8], [12.5, 4, 8], [9.9, 4, 8]], [[30, 9, 8], [31, 9, 8], [29, 9, 8]]]
    rows = [scored("ref", windows[0]), scored("conv", windows[1]),
            scored("other", windows[2], tokenizer="u")]
    means = [2.5, 3.0, 2.25]
    assert rows[0].nll_se == pytest.approx(statistics.stdev(means) / math.sqrt(3))
    assert rows[0].bits_per_byte_se == pytest.approx(
        statistics.stdev([m / 2 / math.log(2) for m in means]) / math.sqrt(3))
    low, high = rows[0].ppl_ci95
    assert (math.log(low) + math.log(high)) / 2 == pytest.approx(rows[0].nll)
    assert math.log(high) - rows[0].nll == pytest.approx(1.959964 * rows[0].nll_se)
    gap_closed(rows, reference=0)
    paired_deltas(rows, [np.array(w, float) for w in windows], reference=0)
    diffs = [0.25, 0.125, 0.225]  # conv - ref per window, per token
    conv = rows[1]
    assert conv.delta_nll == pytest.approx(0.2)
    assert conv.delta_nll_se == pytest.approx(statistics.stdev(diffs) / math.sqrt(3))
    assert conv.beyond_noise is True  # 0.2 against 1.96 * 0.038
    assert (rows[0].delta_nll_se, rows[0].beyond_noise) == (0, False)
    assert (rows[2].delta_nll_se, rows[2].beyond_noise) == (None, None)  # other tokenizer
    table = format_table(rows)
    assert "+0.2000±0.0382" in table and "no paired test for other" in table
