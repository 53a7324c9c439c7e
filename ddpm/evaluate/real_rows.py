"""The evaluation part that shows real training images next to the samples (see :mod:`ddpm.evaluate.parts`;
it takes (evaluation, out_dir, log, done)): per guidance scale, the guidance sweep's first ``per_class``
samples of every class as rows, with as many rows of random real training images of the same classes below
them (the Bonn exercise's figure 2: "first 4 rows are generated samples, the last 4 rows real images randomly
sampled from the training data set"), and a preview of the training data set, some images per class.
"""
import numpy as np
import torch

from ddpm.data.datasets import load_dataset
from ddpm.data.images import make_grid
from ddpm.evaluate.sampled import class_names, sampler_line, symbol
from ddpm.run.grids import grid_figure
from ddpm.run.samples import read_samples

PREVIEW_PER_CLASS = 10


def _pick(labels: torch.Tensor, classes: int, per_class: int, gen: torch.Generator) -> torch.Tensor:
    """Indices of ``per_class`` random images of each class, ordered row by row: image j of class c at
    position j * classes + c (a class per column, as the samples)."""
    chosen = []
    for c in range(classes):
        of_c = (labels == c).nonzero().flatten()
        chosen.append(of_c[torch.randperm(len(of_c), generator=gen)[:per_class]])
    return torch.stack(chosen, 1).flatten()


def real_part(ev, out, log, done) -> dict:
    run, ch, p = ev.run, ev.sampling, ev.per_class
    n_cls, cfg = run.num_classes, run.cfg
    sweep = done["guidance"]
    k = sweep["per_class"]
    images, labels = load_dataset(cfg.data.dataset, cfg.data.root, train=True)
    gen = torch.Generator().manual_seed(ev.seed)
    to_hwc = lambda idx: images[idx].permute(0, 2, 3, 1).numpy()  # noqa: E731 (uint8 (N, C, H, W) → (N, H, W, C))
    if ch.conditional:
        real_idx = _pick(labels, n_cls, p, gen)
    else:  # an unconditional model: random training images, any class
        real_idx = torch.randperm(len(images), generator=gen)[:p * n_cls]
    real = to_hwc(real_idx)
    sym, figs = symbol(ev), []
    names = class_names(ev) if ch.conditional else None
    for row in sweep["rows"]:
        u8 = read_samples(run.run_dir / "samples.h5", row["group"])[0]
        if ch.conditional:  # (class, sample) → rows of samples, one class per column
            made = u8.reshape(n_cls, k, *u8.shape[1:])[:, :p].transpose(1, 0, 2, 3, 4).reshape(-1, *u8.shape[1:])
        else:
            made = u8[:p * n_cls]
        name = row["group"].rsplit("/", 1)[1]
        what = f"{sym}={row['scale']:g}" if ch.conditional else "unconditional"
        figs.append(grid_figure(
            out / f"samples_vs_real_{name}.png", make_grid(np.concatenate([made, real]), n_cls), rows=2 * p,
            cols=n_cls, title=[f"Generated samples (rows 1–{p}) and random training images (rows {p + 1}–{2 * p}) · "
                               f"{what}", run.checkpoint_line, sampler_line(ev, ch.at(row["scale"]))],
            row_labels=[f"sample {j + 1}" for j in range(p)] + [f"real {j + 1}" for j in range(p)],
            col_labels=names, xlabel="class" if names else ""))
    preview_idx = _pick(labels, n_cls, PREVIEW_PER_CLASS, gen)
    preview = to_hwc(preview_idx).reshape(PREVIEW_PER_CLASS, n_cls, *real.shape[1:]).transpose(1, 0, 2, 3, 4)
    figs.append(grid_figure(
        out / "dataset_preview.png", make_grid(preview.reshape(-1, *real.shape[1:]), PREVIEW_PER_CLASS), rows=n_cls,
        cols=PREVIEW_PER_CLASS, title=[f"Training data: {cfg.data.dataset}, {len(images)} images "
                                       f"({PREVIEW_PER_CLASS} random per class)", f"data root {cfg.data.root}"],
        row_labels=class_names(ev), ylabel="class", xlabel="random training images"))
    return {"per_class": p, "real_indices": real_idx.tolist(), "preview_indices": preview_idx.tolist(),
            "train_images": len(images), "figures": figs}
