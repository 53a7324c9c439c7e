"""Labelled sample grids as PNG: the training job's ``RUN_DIR/samples/*.png`` and the evaluation's grids.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot, no global backend switch), so they work
on compute nodes without a display and inside a notebook alike.

Image grids are drawn pixel-exact: the grid from :func:`ddpm.data.images.make_grid`, upscaled by an
integer factor with nearest-neighbour, is placed unresampled into a matplotlib figure (``figimage``) with
a title, row and column labels around it. :func:`grid_figure` returns where the grid sits in the PNG, so
tests (and anyone cropping figures) can check the geometry exactly.
"""
import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg, RendererAgg
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties

from ddpm.run.atomic import atomic_path

DPI = 100
TITLE_PT, LABEL_PT, TICK_PT = 11, 10, 9
GAP = 6  # px between text blocks


def _text_px(s: str, size: float, weight: str = "normal") -> tuple[float, float]:
    """(width, height) in pixels of one line of text at ``size`` points, as the Agg renderer draws it."""
    global _RENDERER
    if _RENDERER is None:
        _RENDERER = RendererAgg(1, 1, DPI)
    w, h, _ = _RENDERER.get_text_width_height_descent(s, FontProperties(size=size, weight=weight), ismath=False)
    return w, h


_RENDERER = None


def to_rgb(grid_u8: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 1 | 3) → (H, W, 3)."""
    return np.repeat(grid_u8, 3, axis=2) if grid_u8.shape[2] == 1 else grid_u8


def save_figure(fig, path) -> None:
    """Write a matplotlib figure as PNG, atomically: a killed job never leaves half a figure."""
    with atomic_path(path) as tmp:
        fig.canvas.print_png(str(tmp))


def grid_figure(path, grid_u8: np.ndarray, *, title: list[str], rows: int, cols: int, scale: int = 2,
                row_labels=None, col_labels=None, xlabel: str = "", ylabel: str = "") -> dict:
    """Save ``grid_u8`` (uint8 (H, W, C) from make_grid with ``rows`` x ``cols`` cells) as a labelled PNG.

    ``title``: lines, the first bold. Row labels are drawn left of each row, column labels above each
    column, ``xlabel`` above the column labels, ``ylabel`` rotated at the far left.
    Returns {"file", "grid_box": [x, y, w, h] (px, from the top-left), "scale", "rows", "cols", "row_labels",
    "col_labels"} (the labels as drawn; [] for none).
    """
    big = to_rgb(grid_u8).repeat(scale, 0).repeat(scale, 1)
    gh, gw = big.shape[:2]
    line_h = _text_px("Ag", TITLE_PT)[1] + GAP
    lab_h = _text_px("Ag", LABEL_PT)[1] + GAP
    row_w = max([_text_px(str(s), TICK_PT)[0] for s in row_labels or []], default=0)
    label_w = (lab_h if ylabel else 0) + (row_w + GAP if row_labels else 0)  # left of the grid
    top = GAP * 2 + line_h * len(title) + (lab_h if xlabel else 0) + (lab_h if col_labels else 0)
    title_w = max(_text_px(s, TITLE_PT, "bold" if i == 0 else "normal")[0] for i, s in enumerate(title))
    # The block (y label, row labels, grid) is centred; as much margin right of the grid as left of it
    # keeps the grid itself in the middle when the title is the widest thing.
    width = int(math.ceil(max(2 * (label_w + 2 * GAP) + gw, title_w + 4 * GAP)))
    height = int(math.ceil(top + gh + 2 * GAP))
    left = int(round((width - gw) / 2))
    top = int(round(top))
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, facecolor="white")
    FigureCanvasAgg(fig)  # attaches itself as fig.canvas
    fig.figimage(big, xo=left, yo=height - top - gh, origin="upper", resize=False)

    def text(x, y, s, **kw):  # x, y in px from the top-left corner
        fig.text(x / width, 1 - y / height, s, **kw)

    y = GAP
    for i, line in enumerate(title):
        text(width / 2, y, line, ha="center", va="top", fontsize=TITLE_PT, fontweight="bold" if i == 0 else None)
        y += line_h
    cell_w, cell_h = (gw - 2 * scale) / cols, (gh - 2 * scale) / rows  # make_grid: one padding per cell + 1
    if xlabel:
        text(left + gw / 2, y, xlabel, ha="center", va="top", fontsize=LABEL_PT)
        y += lab_h
    for j, s in enumerate(col_labels or []):
        text(left + scale + (j + 0.5) * cell_w, top - GAP / 2, str(s), ha="center", va="bottom", fontsize=TICK_PT)
    for i, s in enumerate(row_labels or []):
        text(left - GAP, top + scale + (i + 0.5) * cell_h, str(s), ha="right", va="center", fontsize=TICK_PT)
    if ylabel:
        text(left - label_w - GAP, top + gh / 2, ylabel, ha="left", va="center", rotation=90, fontsize=LABEL_PT)
    save_figure(fig, path)
    return {"file": Path(path).name, "grid_box": [left, top, gw, gh], "scale": scale, "rows": rows,
            "cols": cols, "row_labels": [str(s) for s in row_labels or []],
            "col_labels": [str(s) for s in col_labels or []]}
