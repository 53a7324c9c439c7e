"""Evaluation figures: denoising GIFs and matplotlib plots (loss curves, steps vs quality, line plots).

Drawn on matplotlib's Agg canvas directly, like the labelled grids of :mod:`ddpm.run.grids` (which the
evaluation's image grids use), so they work on compute nodes without a display.
"""
import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties, findfont
from matplotlib.ticker import FixedLocator, MaxNLocator, NullLocator, ScalarFormatter

from ddpm.run.atomic import atomic_path
from ddpm.run.grids import DPI, TITLE_PT, save_figure, to_rgb


def _font(size: int):
    from PIL import ImageFont
    return ImageFont.truetype(findfont(FontProperties(family="DejaVu Sans")), size)


def trajectory_gif(path, xt_u8: list[np.ndarray], x0_u8: list[np.ndarray], captions: list[str], header: str,
                   subheader: str = "", scale: int = 4, frame_ms: int = 120, hold_ms: int = 1500) -> dict:
    """An animated GIF: each frame shows x_t (left) and the predicted x̂0 (right), upscaled ``scale``x,
    under "``header`` · caption" (e.g. "class 3 · t = 49") and a smaller ``subheader`` line.
    xt_u8 / x0_u8: uint8 (H, W, C) per frame. The last frame is held for ``hold_ms``.
    Returns {"file", "frames", "size": [w, h]}."""
    from PIL import Image, ImageDraw

    h, w = xt_u8[0].shape[:2]
    sw, sh, gap = w * scale, h * scale, 8
    font, small = _font(14), _font(11)
    widest = max([font.getlength(f"{header} · {c}") for c in captions] + [small.getlength(subheader)])
    width = int(max(2 * sw + 3 * gap, widest + 2 * gap))
    x_img = (width - 2 * sw - gap) // 2
    band = 62 if subheader else 46
    frames = []
    for xt, x0, caption in zip(xt_u8, x0_u8, captions):
        canvas = Image.new("RGB", (width, sh + band + gap), "white")
        draw = ImageDraw.Draw(canvas)
        draw.text((width / 2, 4), f"{header} · {caption}", fill="black", font=font, anchor="mt")
        if subheader:
            draw.text((width / 2, 24), subheader, fill=(80, 80, 80), font=small, anchor="mt")
        for k, (img, label) in enumerate(((xt, "x_t (noisy)"), (x0, "x̂0 (predicted)"))):
            x = x_img + k * (sw + gap)
            canvas.paste(Image.fromarray(to_rgb(img)).resize((sw, sh), Image.NEAREST), (x, band))
            draw.text((x + sw / 2, band - 3), label, fill="black", font=small, anchor="mb")
        frames.append(canvas.convert("P", palette=Image.ADAPTIVE))
    durations = [frame_ms] * (len(frames) - 1) + [hold_ms]
    with atomic_path(path) as tmp:
        frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=durations, loop=0)
    return {"file": Path(path).name, "frames": len(frames), "size": list(frames[0].size)}


def _axes(n: int, title: list[str], width: float = 6.0, cols: int = 2):
    cols = min(n, cols)
    fig = Figure(figsize=(width * cols, 3.8 * math.ceil(n / cols)), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(math.ceil(n / cols), cols, squeeze=False)
    fig.suptitle("\n".join(title), fontsize=TITLE_PT)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def _finish(fig, path, files: dict) -> dict:
    fig.tight_layout()
    save_figure(fig, path)
    return {"file": Path(path).name, **files}


def loss_figure(path, series: dict, title: list[str], checkpoint_step: int) -> dict:
    """Four panels from :func:`ddpm.evaluate.measured.loss_series`: per-step loss (raw + smoothed, log y, the
    held-out loss at its steps), per-epoch mean training loss and held-out loss, loss by timestep quartile,
    learning rate; a dotted line marks the checkpoint."""
    fig, (a, b, c, d) = _axes(4, title)
    steps, test = series["step"], bool(series["test_loss"])
    a.plot(steps, series["loss"], color="0.75", lw=0.8, label="per logged step")
    a.plot(steps, series["loss_smooth"], color="C0", lw=1.6, label=f"smoothed (EMA, span {series['smooth_span']} rows)")
    if test:
        a.plot(series["test_step"], series["test_loss"], "s", color="C3", ms=4, label="held-out (test split)")
    a.set(yscale="log", xlabel="optimizer step", ylabel="loss", title="Loss per step")
    b.plot(series["epoch"], series["epoch_loss"], "o-", color="C1", label="training (mean over the epoch)")
    if test:
        b.plot(series["test_epoch"], series["test_loss"], "s--", color="C3", label="held-out (test split, epoch end)")
    b.set(yscale="log", xlabel="epoch (1 = first)", ylabel="loss",
          title="Loss per epoch" + ("" if test else " (no held-out loss logged)"))
    b.xaxis.set_major_locator(MaxNLocator(integer=True))
    b.legend(fontsize=8)
    for q, values in series["buckets_smooth"].items():
        c.plot(steps, values, lw=1.2, label=f"{q} (smoothed)")
    c.set(yscale="log", xlabel="optimizer step", ylabel="training loss", title="Loss by timestep quartile "
          "(q0: t < T/4 … q3: t ≥ 3T/4)" if series["buckets"] else "Loss by timestep quartile (not logged)")
    d.plot(steps, series["lr"], color="C2")
    d.set(xlabel="optimizer step", ylabel="learning rate", title="Learning rate")
    d.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    for ax in (a, c, d):
        ax.axvline(checkpoint_step, color="k", ls=":", lw=1, label=f"checkpoint (step {checkpoint_step})")
        ax.grid(alpha=0.3)
    b.grid(alpha=0.3)
    a.legend(fontsize=8)
    if series["buckets"]:
        c.legend(fontsize=8, ncol=2)
    return _finish(fig, path, {})


def guidance_comparison_figure(path, curves: dict, title: list[str]) -> dict:
    """Two panels over label accuracy: feature-FID and milliseconds per image, one curve per guidance method
    ({label: rows with "scale_label", "accuracy", "feature_fid", "ms_per_image"}), each point named by its scale."""
    fig, axes = _axes(2, title, width=6.0)
    panels = (("feature_fid", "feature-FID (lower is better)", "Quality at matched accuracy"),
              ("ms_per_image", "milliseconds per image", "Cost at matched accuracy"))
    for ax, (key, ylabel, name) in zip(axes, panels):
        for i, (label, rows) in enumerate(curves.items()):
            sub = [r for r in rows if r["accuracy"] is not None and r[key] is not None]
            if sub:
                ax.plot([r["accuracy"] for r in sub], [r[key] for r in sub], "o-" if i == 0 else "s--", color=f"C{i}",
                        label=label)
                for r in sub:
                    ax.annotate(r["scale_label"], (r["accuracy"], r[key]), textcoords="offset points",
                                xytext=(4, 4), fontsize=7, color=f"C{i}")
        ax.set(xlabel="label accuracy (evaluation classifier)", ylabel=ylabel, title=name)
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not measured\n(no evaluation classifier)", ha="center", va="center",
                    transform=ax.transAxes)
        ax.grid(alpha=0.3)
    return _finish(fig, path, {})


def _step_ticks(ax, values) -> None:
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(sorted(set(values))))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_locator(NullLocator())


def steps_figure(path, rows: list[dict], title: list[str]) -> dict:
    """Three panels over sampling steps: wall time, label accuracy, feature-FID (n/a without classifier)."""
    fig, axes = _axes(3, title, width=4.6, cols=3)
    panels = (("wall_s", "wall time (s)", "Cost"), ("accuracy", "label accuracy (higher is better)", "Label accuracy"),
              ("feature_fid", "feature-FID (lower is better)", "Feature-FID"))
    for ax, (key, ylabel, name) in zip(axes, panels):
        for i, sampler in enumerate(dict.fromkeys(r["sampler"] for r in rows)):
            sub = [r for r in rows if r["sampler"] == sampler and r[key] is not None]
            if sub:
                ax.plot([r["steps"] for r in sub], [r[key] for r in sub], "o-", color=f"C{i}", label=sampler)
        _step_ticks(ax, [r["steps"] for r in rows])
        ax.set(xlabel="sampling steps", ylabel=ylabel, title=name)
        if key == "accuracy":
            ax.set_ylim(-0.02, 1.02)
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not measured\n(no classifier)", ha="center", va="center", transform=ax.transAxes)
        ax.grid(alpha=0.3)
    return _finish(fig, path, {})


def line_figure(path, x, curves: dict, *, title: list[str], xlabel: str, ylabel: str, marker_x=None,
                marker_label: str = "", hline=None, hline_label: str = "", logy: bool = False, ylim=None) -> dict:
    """One panel of named curves {label: y values} over ``x``, with an optional vertical marker and
    horizontal reference line (e.g. the training sigma, chance accuracy)."""
    fig, (ax,) = _axes(1, title, width=7.0)
    for i, (label, y) in enumerate(curves.items()):
        ax.plot(x, y, "o-" if i == 0 else "s--", label=label)
    if marker_x is not None:
        ax.axvline(marker_x, color="k", ls=":", lw=1, label=marker_label)
    if hline is not None:
        ax.axhline(hline, color="0.5", ls="--", lw=1, label=hline_label)
    ax.set(xlabel=xlabel, ylabel=ylabel, yscale="log" if logy else "linear")
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _finish(fig, path, {})
