"""How far a score could move by chance: the standard error of a ratio of sums over units
(windows of a corpus, items of a task), and the paired test of two models on the same units.

A corpus score is a ratio, R = sum(NLL_i) / sum(tokens_i) over windows i (bits per byte
likewise, over bytes), so its standard error is the ratio estimator's (the delta method),
taking the windows as independent samples of text:

    SE(R) = sqrt( sum_i (num_i - R den_i)^2 / (n (n - 1)) ) / mean(den)

With den_i all equal (non-overlapping windows of one length) this is the standard error
of the mean of the per-window means; with den_i all 1 it is that of a plain mean (an
accuracy: sqrt(p (1 - p) / (n - 1))). Windows of one document are not quite independent,
so read it as the noise of this sample of text, not of the text's source. Two models
scored on the same windows are compared through the same formula over the per-window
differences num_i(model) - num_i(reference), which cancels what the windows share (how
hard each stretch of text is): far tighter than the two errors side by side.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

Z95 = 1.959963984540054  # a normal's two-sided 95% quantile


def ratio_se(num, den) -> Optional[float]:
    """SE of sum(num) / sum(den) over the units (above); None for fewer than 2 units."""
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    if len(num) < 2:
        return None
    ratio = num.sum() / den.sum()
    n = len(num)
    return float(math.sqrt(((num - ratio * den) ** 2).sum() / (n * (n - 1))) / den.mean())


def interval95(value: float, se: Optional[float]) -> Optional[tuple[float, float]]:
    """value +- 1.96 SE, or None without an SE."""
    return None if se is None else (value - Z95 * se, value + Z95 * se)


def beyond_noise(delta: float, se: Optional[float]) -> Optional[bool]:
    """Whether a paired difference lies outside its 95% interval around 0 (|z| > 1.96);
    None without an SE."""
    return None if se is None else abs(delta) > Z95 * se
