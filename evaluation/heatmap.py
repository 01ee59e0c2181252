"""Heatmaps, one panel per model side by side, written atomically: attention matrices and KL
tables (attention.py), passkey accuracy (passkey.py)."""
from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from store.checkpoint import staged_file

TITLE_POINTS = 12  # the figure title's font size
# A character's width in font sizes, on the wide side (DejaVu Sans: ~0.55 for lowercase,
# ~0.7 for capitals): a wrapped title keeps a margin inside the figure.
CHAR_WIDTH = 0.68

def plot_panels(path: Path, panels: dict[str, torch.Tensor], title: str, **options) -> None:
    """One heatmap per name, side by side, written atomically; options: panels_figure's."""
    fig = panels_figure(panels, title, **options)
    try:
        with staged_file(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        pyplot().close(fig)


def panels_figure(panels: dict[str, torch.Tensor], title: str, ticks=None, xlabel: str = "",
                  ylabel: str = "", colorbar: bool = False, grid: Grid | None = None):
    """plot_panels' figure. ticks: {name: token labels} for both axes of a square matrix;
    grid: named rows and columns shared by every panel, each cell written in. Constrained
    layout makes room for the title's lines; the title is wrapped to the figure's width,
    which a figure title would otherwise run past on both sides (issue 31)."""
    n = len(panels)
    fig, axes = pyplot().subplots(1, n, figsize=(4.5 * n + 1, 4.5), squeeze=False,
                                  layout="constrained")
    for ax, (name, matrix) in zip(axes[0], panels.items()):
        image = ax.imshow(matrix.numpy(), cmap="viridis", aspect="auto", interpolation="nearest",
                          **(grid.value_range() if grid else {}))
        if grid:
            grid.draw(ax, matrix)
        else:
            label_ticks(ax, matrix, (ticks or {}).get(name))
        ax.set(title=Path(name).name or name, xlabel=xlabel, ylabel=ylabel)
        if colorbar:
            fig.colorbar(image, ax=ax)
    fig.suptitle(wrap_title(title, fig.get_figwidth()), fontsize=TITLE_POINTS)
    return fig


@dataclass
class Grid:
    """A table drawn as a heatmap: its row and column names, the value's range and how a
    cell's value is written in it."""
    rows: list[str]
    columns: list[str]
    low: float = 0.0
    high: float = 1.0
    cell_format: str = "{:.2f}"

    def value_range(self) -> dict:
        return {"vmin": self.low, "vmax": self.high}

    def draw(self, ax, matrix: torch.Tensor) -> None:
        ax.set_xticks(range(len(self.columns)), self.columns)
        ax.set_yticks(range(len(self.rows)), self.rows)
        middle = (self.low + self.high) / 2
        for (i, j), value in np.ndenumerate(matrix.numpy()):
            ax.text(j, i, self.cell_format.format(value), ha="center", va="center", fontsize=8,
                    color="black" if value > middle else "white")  # viridis: light at the top


def label_ticks(ax, matrix: torch.Tensor, labels: list[str] | None) -> None:
    """Token labels on both axes (up to 40 tokens), or whole layer / head numbers."""
    if labels is not None and len(labels) <= 40:
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
    elif labels is None:  # layers x heads: whole numbers
        ax.set_xticks(range(0, matrix.shape[1], max(1, matrix.shape[1] // 16)))
        ax.set_yticks(range(0, matrix.shape[0], max(1, matrix.shape[0] // 16)))


def wrap_title(title: str, inches: float) -> str:
    """title in lines that fit inches at TITLE_POINTS; a path too long for one line is
    broken inside."""
    chars = int(inches * 72 / (CHAR_WIDTH * TITLE_POINTS))
    return "\n".join(textwrap.fill(line, chars) for line in title.splitlines())


def pyplot():
    """matplotlib.pyplot drawing to files only (Agg): no display needed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt
