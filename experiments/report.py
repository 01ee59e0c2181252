"""The ablation's outputs from a list of result rows: results.csv, results.md and the two
figures in the style of Ainslie et al. 2023 (Fig. 4: conversion methods, Fig. 5: alpha).

Rows are plain dicts with the keys of COLUMNS (plus kv_layers, the per-layer K/V errors of
a conversion). `method` is "base" (the MHA model), one of CONVERSIONS (converted, then
uptrained for alpha x base steps), "continued" (the MHA base trained on for alpha x base
steps: the control), or "scratch" (trained with that many KV heads for the base's steps);
alpha is None for base and scratch rows. k_error/v_error: the layers' mean held-out K/V
reconstruction error of a conversion (alpha 0 rows).
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on a server
import matplotlib.pyplot as plt  # noqa: E402

from store.checkpoint import write_atomic  # noqa: E402

COLUMNS = ("variant", "n_kv_head", "method", "alpha", "steps", "val_loss",
           "kv_bytes_per_token", "decode_tok_s", "train_s", "k_error", "v_error")
# mean/first/random: the paper's; then mean pooling after choosing and/or aligning heads
CONVERSIONS = ("mean", "first", "random", "similar", "procrustes", "similar+procrustes", "linear",
               "similar+linear", "mean+distill", "similar+linear+distill")
METHOD_ORDER = CONVERSIONS
BEST = "similar+procrustes"


def variant_name(n_kv_head: int, n_head: int) -> str:
    if n_kv_head == n_head:
        return "MHA"
    return "MQA" if n_kv_head == 1 else f"GQA-{n_kv_head}"


def write_csv(rows: list[dict], path: Path) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in COLUMNS})
    write_atomic(path, buf.getvalue())


def read_csv(path: Path) -> list[dict]:
    kinds = {"n_kv_head": int, "steps": int, "kv_bytes_per_token": int, "alpha": float,
             "val_loss": float, "decode_tok_s": float, "train_s": float, "k_error": float,
             "v_error": float}
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
    if base and find(rows, method="continued"):
        lines.append(f"| MHA | {base['n_kv_head']} | continued (control) | "
                     + " | ".join(fmt(mha_at(rows, a)) for a in alphas) + " | — |")
    for name, g in variants_of(conversion_rows(rows) + [r for r in rows if r["method"] == "scratch"]):
        for method in METHOD_ORDER:
            cells = [find(rows, n_kv_head=g, method=method, alpha=a) for a in alphas]
            if any(cells):
                lines.append(f"| {name} | {g} | {method} | "
                             + " | ".join(fmt(c and c["val_loss"]) for c in cells) + " | — |")
        scratch = find(rows, n_kv_head=g, method="scratch")
        if scratch:
            lines.append(f"| {name} | {g} | scratch | {dashes} | {fmt(scratch['val_loss'])} |")
    lines += gap_table(rows) + kv_error_table(rows)
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


def mha_at(rows: list[dict], alpha: float) -> float | None:
    """The MHA reference after alpha x base steps more: the base at 0, the control after."""
    ref = find(rows, method="base") if alpha == 0 else find(rows, method="continued", alpha=alpha)
    return ref and ref["val_loss"]


def gap_closed(rows: list[dict], g: int, method: str, alpha: float) -> float | None:
    """The share of mean pooling's val-loss gap to MHA (trained for as many steps) that
    method closes: 1 = as good as MHA, 0 = as mean, < 0 = worse than mean."""
    mean, other = (find(rows, n_kv_head=g, method=m, alpha=alpha) for m in ("mean", method))
    ref = mha_at(rows, alpha)
    if not (mean and other and ref is not None) or mean["val_loss"] <= ref:
        return None
    return (mean["val_loss"] - other["val_loss"]) / (mean["val_loss"] - ref)


def gap_table(rows: list[dict]) -> list[str]:
    methods = [m for m in METHOD_ORDER[1:] if find(rows, method=m)]
    if not methods or not find(rows, method="mean"):
        return []
    alphas = alphas_of(rows)
    lines = ["", "Share of mean pooling's val-loss gap to MHA that each conversion closes "
             "(1 = MHA's loss, 0 = mean's, negative = worse than mean). MHA at α = 0 is the "
             "base; at α > 0 the base trained on for as many steps (the control, when run).",
             "", "| model | method | " + " | ".join(f"α = {a:g}" for a in alphas) + " |",
             "|" + "---|" * (2 + len(alphas))]
    for name, g in variants_of(conversion_rows(rows)):
        for m in methods:
            cells = [gap_closed(rows, g, m, a) for a in alphas]
            if any(c is not None for c in cells):
                lines.append(f"| {name} | {m} | " + " | ".join(
                    "—" if c is None else f"{100 * c:.0f}%" for c in cells) + " |")
    return lines


def kv_error_table(rows: list[dict]) -> list[str]:
    """Per conversion and layer, the held-out K/V reconstruction error (what grouping and
    alignment minimise) beside the converted model's val loss."""
    measured = [r for name, g in variants_of(conversion_rows(rows)) for m in METHOD_ORDER
                for r in [find(rows, n_kv_head=g, method=m, alpha=0.0)] if r and r.get("kv_layers")]
    if not measured:
        return []
    n_layers = len(measured[0]["kv_layers"])
    lines = ["", "K/V reconstruction error of each conversion on held-out val windows, per "
             "layer (|aligned source heads − their pooled head|² / |source heads|², over the "
             "source's own attention inputs), beside val loss at α = 0.", "",
             "| model | method | val loss α = 0 | "
             + " | ".join(f"L{i} K | L{i} V" for i in range(n_layers)) + " |",
             "|" + "---|" * (3 + 2 * n_layers)]
    for r in measured:
        errs = " | ".join(f"{e['k']:.3f} | {e['v']:.3f}" for e in r["kv_layers"])
        lines.append(f"| {r['variant']} | {r['method']} | {fmt(r['val_loss'])} | {errs} |")
    return lines


def write_kv_errors(rows: list[dict], path: Path) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["variant", "n_kv_head", "method", "layer", "k_error", "v_error"])
    for r in conversion_rows(rows):
        for e in r.get("kv_layers") or []:
            writer.writerow([r["variant"], r["n_kv_head"], r["method"], e["layer"], e["k"], e["v"]])
    write_atomic(path, buf.getvalue())


def save_figure(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    write_atomic(path, buf.getvalue())


def plot_conversion_methods(rows: list[dict], path: Path) -> None:
    """Fig. 4: val loss of each conversion method, one panel per alpha, one bar group per
    variant; MHA (the base, or at alpha > 0 the base trained on as long) as a dashed line."""
    conv = conversion_rows(rows)
    alphas, variants = alphas_of(rows), variants_of(conv)
    methods = [m for m in METHOD_ORDER if find(conv, method=m)]
    fig, axes = plt.subplots(1, len(alphas), figsize=(1.2 + 1.1 * len(methods) * len(alphas), 3.6),
                             sharey=True, squeeze=False)
    width = 0.8 / len(methods)
    for ax, alpha in zip(axes[0], alphas):
        for i, method in enumerate(methods):
            cells = [find(conv, n_kv_head=g, method=method, alpha=alpha) for _, g in variants]
            xs = [j + (i - (len(methods) - 1) / 2) * width for j, c in enumerate(cells) if c]
            ax.bar(xs, [c["val_loss"] for c in cells if c], width, label=method)
        ref = mha_at(rows, alpha)
        if ref is not None:
            ax.axhline(ref, color="k", ls="--", lw=1,
                       label="MHA base" if alpha == 0 else "MHA trained on (control)")
        ax.set_xticks(range(len(variants)), [name for name, _ in variants])
        ax.set_title(f"α = {alpha:g}" + (" (no uptraining)" if alpha == 0 else ""))
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("val loss (lower is better)")
    low = min(r["val_loss"] for r in rows)
    axes[0][0].set_ylim(bottom=max(0.0, low - 0.5))
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("K/V head conversion methods (cf. Ainslie et al. 2023, Fig. 4)", y=1.03)
    save_figure(fig, path)


def plot_alpha(rows: list[dict], path: Path, method: str = "mean") -> None:
    """Fig. 5: val loss against the uptraining fraction alpha, one line per variant
    (method; dashed: similar+procrustes, when run), dotted lines for the same variants
    trained from scratch; MHA and the MHA control in black."""
    conv, base = conversion_rows(rows), find(rows, method="base")
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    for name, g in variants_of(conv):
        color = None
        for m, style in ((method, "-o"), (BEST, "--s")):
            points = sorted((r["alpha"], r["val_loss"]) for r in conv
                            if r["n_kv_head"] == g and r["method"] == m)
            if points:
                line, = ax.plot(*zip(*points), style, color=color, label=f"{name} ({m}, uptrained)")
                color = line.get_color()
        scratch = find(rows, n_kv_head=g, method="scratch")
        if scratch:
            ax.axhline(scratch["val_loss"], color=color, ls=":", lw=1.2,
                       label=f"{name} from scratch ({scratch['steps']} steps)")
    if base:
        ax.axhline(base["val_loss"], color="k", ls="--", lw=1,
                   label=f"MHA base ({base['steps']} steps)")
    control = sorted((r["alpha"], r["val_loss"]) for r in rows if r["method"] == "continued")
    if base and control:
        ax.plot(*zip((0.0, base["val_loss"]), *control), color="k", marker="^", lw=1,
                label="MHA trained on α more (control)")
    ax.set_xlabel("uptraining proportion α")
    ax.set_ylabel("val loss (lower is better)")
    ax.set_title("Uptraining proportion (cf. Ainslie et al. 2023, Fig. 5)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    save_figure(fig, path)


def write_report(rows: list[dict], out: Path, title: str = "", notes: list[str] = ()) -> dict:
    """All five outputs into out; returns their paths by kind."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "results.csv", "kv_csv": out / "kv_errors.csv", "md": out / "results.md",
             "fig4": out / "fig4_conversion_methods.png", "fig5": out / "fig5_alpha.png"}
    write_csv(rows, paths["csv"])
    write_kv_errors(rows, paths["kv_csv"])
    write_atomic(paths["md"], markdown_table(rows, title, notes))
    plot_conversion_methods(rows, paths["fig4"])
    plot_alpha(rows, paths["fig5"])
    return paths
