"""What an evaluation reports: one Row per model, the share of the conversion gap each
closed, the printed table, and the JSON file."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

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
    delta_nll: Optional[float] = None  # minus the reference's (same tokenizer only)
    delta_bits_per_byte: Optional[float] = None
    gap_closed: Optional[float] = None  # see gap_closed()
    tasks: Optional[dict] = None  # evaluation/tasks.py: {task: {acc, acc_stderr, ...}}
    task_average: Optional[dict] = None  # {acc, acc_norm}: the mean over the tasks


def make_row(source, config: ModelConfig, tokenizer, totals: list[float],
             dtype: torch.dtype) -> Row:
    """source (name, path, kind) scored: totals are window_scores' summed
    (NLL, tokens, bytes, windows) over every process."""
    nll = totals[0] / totals[1]
    return Row(name=source.name, path=str(source.path), kind=source.kind,
               attention=config.attention_type, n_kv_head=config.n_kv_head,
               params=param_counts(config)["total"],
               kv_bytes_per_token=kv_bytes_per_token(config, dtype),
               tokenizer=f"{tokenizer.file_name} {tokenizer.sha256()[:12]}", nll=nll,
               ppl=math.exp(nll), bits_per_byte=totals[0] / math.log(2) / totals[2],
               tokens=int(totals[1]), windows=int(totals[3]), bytes=int(totals[2]))


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


def format_table(rows: list[Row]) -> str:
    head = ["model", "kind", "attn", "params", "KV B/tok", "tokens", "windows", "NLL", "PPL",
            "bits/byte"]
    with_ref = any(r.delta_bits_per_byte is not None for r in rows)
    if with_ref:
        head += ["ΔNLL", "Δbits/byte", "gap closed"]
    tasks = list(rows[0].tasks or {}) if rows else []
    if tasks:
        head += [f"{t} {m}" for t in tasks for m in ("acc", "acc_norm")] + ["avg acc",
                                                                           "avg acc_norm"]
    table = [head] + [table_cells(r, with_ref) + task_cells(r, tasks) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                               enumerate(zip(row, widths))) for row in table)


def table_cells(r: Row, with_ref: bool) -> list[str]:
    fmt = lambda v, f: "—" if v is None else format(v, f)
    cells = [r.name, r.kind, r.attention, f"{r.params:,}", f"{r.kv_bytes_per_token:,}",
             f"{r.tokens:,}", str(r.windows), f"{r.nll:.4f}", f"{r.ppl:.3f}",
             f"{r.bits_per_byte:.4f}"]
    if with_ref:
        cells += [fmt(r.delta_nll, "+.4f"), fmt(r.delta_bits_per_byte, "+.4f"),
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
