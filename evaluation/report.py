"""What an evaluation reports: one Row per model with its standard errors, the share of
the conversion gap each closed and whether it differs from the reference beyond noise,
the printed table, and the JSON file."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from evaluation.stats import beyond_noise, interval95, ratio_se
from model.config import ModelConfig
from model.kv_cache import kv_bytes_per_token
from model.summary import param_counts
from store.checkpoint import write_atomic


@dataclass
class Row:
    name: str
    path: str
    kind: str  # gqalab | hf | int8
    attention: str
    n_kv_head: int
    params: int
    kv_bytes_per_token: int
    tokenizer: str
    nll: float  # nats per scored token
    ppl: float
    bits_per_byte: float
    tokens: int
    windows: int
    bytes: int
    nll_se: Optional[float] = None  # standard errors over windows (evaluation/stats.py)
    ppl_ci95: Optional[list[float]] = None  # exp of NLL's 95% interval: [low, high]
    bits_per_byte_se: Optional[float] = None
    delta_nll: Optional[float] = None  # minus the reference's (same tokenizer only)
    delta_bits_per_byte: Optional[float] = None
    delta_nll_se: Optional[float] = None  # paired over the same windows (same tokenizer only)
    delta_bits_per_byte_se: Optional[float] = None
    beyond_noise: Optional[bool] = None  # |delta| > 1.96 paired SE (see paired_deltas())
    gap_closed: Optional[float] = None  # see gap_closed()
    tasks: Optional[dict] = None  # evaluation/tasks.py: {task: {acc, acc_stderr, ...}}
    task_average: Optional[dict] = None  # {acc, acc_norm}: the mean over the tasks


def make_row(source, config: ModelConfig, tokenizer, windows: np.ndarray,
             dtype: torch.dtype) -> Row:
    """source (name, path, kind) scored: windows holds every window's (NLL, tokens, bytes),
    (K, 3), as evaluation/ranks.gather_windows returns them."""
    nll_sum, tokens, n_bytes = windows.sum(0)
    nll, nll_se = nll_sum / tokens, ratio_se(windows[:, 0], windows[:, 1])
    bpb_se = ratio_se(windows[:, 0], windows[:, 2])
    ci = interval95(nll, nll_se)
    return Row(name=source.name, path=str(source.path), kind=source.kind,
               attention=config.attention_type, n_kv_head=config.n_kv_head,
               params=param_counts(config)["total"],
               kv_bytes_per_token=kv_bytes_per_token(config, dtype),
               tokenizer=f"{tokenizer.file_name} {tokenizer.sha256()[:12]}", nll=float(nll),
               ppl=math.exp(nll), bits_per_byte=float(nll_sum / math.log(2) / n_bytes),
               tokens=int(tokens), windows=len(windows), bytes=int(n_bytes), nll_se=nll_se,
               ppl_ci95=ci and [math.exp(ci[0]), math.exp(ci[1])],
               bits_per_byte_se=bpb_se and bpb_se / math.log(2))


def gap_closed(rows: list[Row], reference: int) -> None:
    """Fill delta_* and, for three rows or more, gap_closed on bits per byte (defined across
    tokenizers; with one tokenizer and the same windows it is the NLL's share too):
    gap = worst row's bits/byte - the reference's, and a row closes
    (worst - row) / gap of it: the worst row 0, one as good as the reference 1 (above 1:
    better than the reference). The worst row, not the first, so the order of ckpts does
    not matter; None when no row is worse than the reference."""
    ref = rows[reference]
    for row in rows:
        row.delta_bits_per_byte = row.bits_per_byte - ref.bits_per_byte
        row.delta_nll = row.nll - ref.nll if row.tokenizer == ref.tokenizer else None
    worst = max(r.bits_per_byte for r in rows)
    if len(rows) >= 3 and worst > ref.bits_per_byte:
        for row in rows:
            row.gap_closed = (worst - row.bits_per_byte) / (worst - ref.bits_per_byte)


def paired_deltas(rows: list[Row], windows: list[np.ndarray], reference: int) -> None:
    """Fill delta_*_se and beyond_noise for each row scored on the reference's very windows
    (the same tokenizer gives the same tokens, so the same windows of the same targets):
    the standard error of the per-window NLL differences (evaluation/stats.py). Rows of
    another tokenizer read other windows: no paired test, their fields stay None."""
    ref = windows[reference]
    for row, own in zip(rows, windows):
        if row.delta_nll is None or own.shape != ref.shape or \
                not np.array_equal(own[:, 1:], ref[:, 1:]):
            continue
        diff = own[:, 0] - ref[:, 0]
        row.delta_nll_se = ratio_se(diff, own[:, 1])
        se_bytes = ratio_se(diff, own[:, 2])
        row.delta_bits_per_byte_se = se_bytes and se_bytes / math.log(2)
        row.beyond_noise = beyond_noise(row.delta_nll, row.delta_nll_se)


def format_table(rows: list[Row]) -> str:
    """The rows, then what the ± and the noise column mean."""
    head = ["model", "kind", "attn", "params", "KV B/tok", "tokens", "windows", "NLL ±SE",
            "PPL [95%]", "bits/byte ±SE"]
    with_ref = any(r.delta_bits_per_byte is not None for r in rows)
    if with_ref:
        head += ["ΔNLL ±SE", "Δbits/byte ±SE", "beyond noise", "gap closed"]
    tasks = list(rows[0].tasks or {}) if rows else []
    if tasks:
        head += [f"{t} {m}" for t in tasks for m in ("acc", "acc_norm")] + ["avg acc",
                                                                           "avg acc_norm"]
    table = [head] + [table_cells(r, with_ref) + task_cells(r, tasks) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                       enumerate(zip(row, widths))) for row in table]
    return "\n".join(lines + table_notes(rows, with_ref))


def table_notes(rows: list[Row], with_ref: bool) -> list[str]:
    notes = ["± one standard error over windows (ratio estimator); PPL's 95% interval"]
    if with_ref:
        notes.append("Δ ±SE paired over the same windows; beyond noise: |Δ| > 1.96 SE")
        unpaired = [r.name for r in rows if r.delta_nll is None]
        if unpaired:
            notes.append(f"no paired test for {', '.join(unpaired)}: another tokenizer than "
                         f"the reference's, so other windows (compare bits/byte ±SE)")
    return notes


def table_cells(r: Row, with_ref: bool) -> list[str]:
    fmt = lambda v, f: "—" if v is None else format(v, f)
    pm = lambda v, se, f: fmt(v, f) + ("" if se is None or v is None else f"±{se:.4f}")
    ppl = f"{r.ppl:.3f}" + ("" if r.ppl_ci95 is None else
                            " [{:.3f}, {:.3f}]".format(*r.ppl_ci95))
    cells = [r.name, r.kind, r.attention, f"{r.params:,}", f"{r.kv_bytes_per_token:,}",
             f"{r.tokens:,}", str(r.windows), pm(r.nll, r.nll_se, ".4f"), ppl,
             pm(r.bits_per_byte, r.bits_per_byte_se, ".4f")]
    if with_ref:
        noise = "—" if r.beyond_noise is None else ("yes" if r.beyond_noise else "no")
        cells += [pm(r.delta_nll, r.delta_nll_se, "+.4f"),
                  pm(r.delta_bits_per_byte, r.delta_bits_per_byte_se, "+.4f"), noise,
                  fmt(r.gap_closed, ".1%")]
    return cells


def task_cells(r: Row, tasks: list[str]) -> list[str]:
    """acc and acc_norm of each task ± its standard error, in percent; then the averages."""
    pct = lambda v, se=None: "—" if v is None else f"{100 * v:.1f}" + (
        f"±{100 * se:.1f}" if se is not None else "")
    cells = [pct(r.tasks[t][m], r.tasks[t][f"{m}_stderr"]) for t in tasks
             for m in ("acc", "acc_norm")]
    return cells + [pct(r.task_average[m]) for m in ("acc", "acc_norm")] if tasks else []


def write_report(path: Path, result: dict[str, Any]) -> None:
    """The result as indented JSON, written in one step."""
    write_atomic(path, json.dumps(result, indent=2) + "\n")
