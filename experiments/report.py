"""The ablation's outputs from a list of result rows: results.csv, results.md and the two
figures in the style of Ainslie et al. 2023 (Fig. 4: conversion methods, Fig. 5: alpha).

Rows are plain dicts with the keys of COLUMNS. `method` is "base" (the MHA model),
"mean" | "first" | "random" (converted, then uptrained for alpha x base steps), or
"scratch" (trained with that many KV heads for the base's steps); alpha is None for
base and scratch rows.
"""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on a server
import matplotlib.pyplot as plt  # noqa: E402

COLUMNS = ("variant", "n_kv_head", "method", "alpha", "steps", "val_loss",
           "kv_bytes_per_token", "decode_tok_s", "train_s")
METHOD_ORDER = ("mean", "first", "random")


def write_atomic(path: Path, data: str | bytes) -> None:
    """Readers see the old file or the new one, never a half-written one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def variant_name(n_kv_head: int, n_head: int) -> str:
    if n_kv_head == n_head:
        return "MHA"
    return "MQA" if n_kv_head == 1 else f"GQA-{n_kv_head}"


def write_csv(rows: list[dict], path: Path) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row[k] is None else row[k] for k in COLUMNS})
    write_atomic(path, buf.getvalue())


def read_csv(path: Path) -> list[dict]:
    kinds = {"n_kv_head": int, "steps": int, "kv_bytes_per_token": int, "alpha": float,
             "val_loss": float, "decode_tok_s": float, "train_s": float}
    with open(path, newline="") as f:
        return [{k: (kinds[k](v) if v != "" else None) if k in kinds else v
                 for k, v in row.items()} for row in csv.DictReader(f)]


def conversion_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["method"] in METHOD_ORDER]


def alphas_of(rows: list[dict]) -> list[float]:
    return sorted({r["alpha"] for r in conversion_rows(rows)})


def variants_of(rows: list[dict]) -> list[tuple[str, int]]:
    """(name, n_kv_head), most KV heads first."""
    return sorted({(r["variant"], r["n_kv_head"]) for r in rows}, key=lambda v: -v[1])


def find(rows: list[dict], **match) -> dict | None:
    return next((r for r in rows if all(r[k] == v for k, v in match.items())), None)


def fmt(x: float | None, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def markdown_table(rows: list[dict], title: str = "", notes: list[str] = ()) -> str:
    """Two tables: val loss per variant x method x alpha, then cost and speed per variant."""
    base = find(rows, method="base")
    alphas = alphas_of(rows)
    lines = [f"# {title}" if title else "", *notes, ""] if title or notes else []
    lines += ["Validation loss (lower is better). α = uptraining steps as a fraction of the "
              f"MHA base's {base['steps'] if base else '?'} steps; α = 0 is the converted "
              "checkpoint before any training.", ""]
    steps = base["steps"] if base else None
    header = ["model", "KV heads", "method", *[f"α = {a:g}" for a in alphas],
              f"trained from init ({steps} steps)"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    dashes = " | ".join("—" for _ in alphas)
    if base:
        lines.append(f"| MHA | {base['n_kv_head']} | base | {dashes} | {fmt(base['val_loss'])} |")
    for name, g in variants_of(conversion_rows(rows) + [r for r in rows if r["method"] == "scratch"]):
        for method in METHOD_ORDER:
            cells = [find(rows, n_kv_head=g, method=method, alpha=a) for a in alphas]
            if any(cells):
                lines.append(f"| {name} | {g} | {method} | "
                             + " | ".join(fmt(c and c["val_loss"]) for c in cells) + " | — |")
        scratch = find(rows, n_kv_head=g, method="scratch")
        if scratch:
            lines.append(f"| {name} | {g} | scratch | {dashes} | {fmt(scratch['val_loss'])} |")
    lines += ["", "Cost per variant: KV-cache bytes per token (every layer, K and V) and "
              "decode speed at batch 8 with a long context.", "",
              "| model | KV heads | KV bytes/token | vs MHA | decode tok/s | vs MHA |",
              "|---|---|---|---|---|---|"]
    measured = {}
    for r in rows:  # speed depends on the shape only: one measurement per variant
        if r["decode_tok_s"] is not None:
            measured.setdefault(r["n_kv_head"], r)
    ref = measured.get(base["n_kv_head"]) if base else None
    for name, g in variants_of(rows):
        r = measured.get(g) or find(rows, n_kv_head=g)
        rel_kv = f"{r['kv_bytes_per_token'] / ref['kv_bytes_per_token']:.3g}×" if ref else "—"
        rel_tok = (f"{r['decode_tok_s'] / ref['decode_tok_s']:.2f}×"
                   if ref and r["decode_tok_s"] else "—")
        lines.append(f"| {name} | {g} | {r['kv_bytes_per_token']:,} | {rel_kv} | "
                     f"{fmt(r['decode_tok_s'], 0)} | {rel_tok} |")
    return "\n".join(lines) + "\n"


def save_figure(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    write_atomic(path, buf.getvalue())


def plot_conversion_methods(rows: list[dict], path: Path) -> None:
    """Fig. 4: val loss of mean / first / random conversion, one panel per alpha, one bar
    group per variant; the MHA base as a dashed line."""
    conv, base = conversion_rows(rows), find(rows, method="base")
    alphas, variants = alphas_of(rows), variants_of(conv)
    fig, axes = plt.subplots(1, len(alphas), figsize=(4 * len(alphas), 3.4), sharey=True,
                             squeeze=False)
    width = 0.8 / len(METHOD_ORDER)
    for ax, alpha in zip(axes[0], alphas):
        for i, method in enumerate(METHOD_ORDER):
            cells = [find(conv, n_kv_head=g, method=method, alpha=alpha) for _, g in variants]
            xs = [j + (i - 1) * width for j, c in enumerate(cells) if c]
            ax.bar(xs, [c["val_loss"] for c in cells if c], width, label=method.capitalize())
        if base:
            ax.axhline(base["val_loss"], color="k", ls="--", lw=1, label="MHA base")
        ax.set_xticks(range(len(variants)), [name for name, _ in variants])
        ax.set_title(f"α = {alpha:g}" + (" (no uptraining)" if alpha == 0 else ""))
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("val loss (lower is better)")
    low = min(r["val_loss"] for r in rows)
    axes[0][0].set_ylim(bottom=max(0.0, low - 0.5))
    axes[0][-1].legend(fontsize=8)
    fig.suptitle("K/V head conversion methods (cf. Ainslie et al. 2023, Fig. 4)", y=1.03)
    save_figure(fig, path)


def plot_alpha(rows: list[dict], path: Path, method: str = "mean") -> None:
    """Fig. 5: val loss against the uptraining fraction alpha, one line per variant
    (method), dotted lines for the same variants trained from scratch."""
    conv, base = conversion_rows(rows), find(rows, method="base")
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for k, (name, g) in enumerate(variants_of(conv)):
        points = sorted((r["alpha"], r["val_loss"]) for r in conv
                        if r["n_kv_head"] == g and r["method"] == method)
        line, = ax.plot(*zip(*points), marker="o", label=f"{name} ({method}, uptrained)")
        scratch = find(rows, n_kv_head=g, method="scratch")
        if scratch:
            ax.axhline(scratch["val_loss"], color=line.get_color(), ls=":", lw=1.2,
                       label=f"{name} from scratch ({scratch['steps']} steps)")
    if base:
        ax.axhline(base["val_loss"], color="k", ls="--", lw=1,
                   label=f"MHA base ({base['steps']} steps)")
    ax.set_xlabel("uptraining proportion α")
    ax.set_ylabel("val loss (lower is better)")
    ax.set_title("Uptraining proportion (cf. Ainslie et al. 2023, Fig. 5)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, path)


def write_report(rows: list[dict], out: Path, title: str = "", notes: list[str] = ()) -> dict:
    """All four outputs into out; returns their paths by kind."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "results.csv", "md": out / "results.md",
             "fig4": out / "fig4_conversion_methods.png", "fig5": out / "fig5_alpha.png"}
    write_csv(rows, paths["csv"])
    write_atomic(paths["md"], markdown_table(rows, title, notes))
    plot_conversion_methods(rows, paths["fig4"])
    plot_alpha(rows, paths["fig5"])
    return paths
