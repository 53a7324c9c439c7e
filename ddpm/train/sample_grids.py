"""The training job's sampling events (rank 0): every one writes, per guidance scale, an archive group in
``RUN_DIR/samples.h5``, a TensorBoard image and a labelled PNG ``RUN_DIR/samples/step_XXXXXXXXX_<name>.png``.

Training writes only these small grids; everything bigger is the evaluation job's.
"""
import math
from pathlib import Path

import torch

from ddpm.config import Config
from ddpm.data.datasets import DATASETS
from ddpm.data.images import make_grid, model_to_uint8
from ddpm.diffusion.from_config import generate, sampling_for
from ddpm.diffusion.objectives import Objective
from ddpm.errors import out_of_space
from ddpm.run import samples
from ddpm.run.evaluations import convention_symbol
from ddpm.run.grids import grid_figure
from ddpm.run.metrics_log import RunLogger


@torch.no_grad()
def sample_events(cfg: Config, objective: Objective, net, device, clean_batch=None) -> tuple[torch.Tensor, list]:
    """(labels (N,), [(name, images in model space (N, C, H, W), attrs)]) of one event.

    A generative run samples ``cfg.sample.per_class`` images per class (or as many unconditional ones)
    for every guidance scale, sample i with the same noise at every scale; a one-step denoiser run
    denoises the first images of ``clean_batch`` ((x, y) in model space) noised at its sigma. ``net``
    must be in eval mode.
    """
    s = cfg.sample
    n_cls = objective.num_classes
    labels = torch.arange(n_cls or DATASETS[cfg.data.dataset]["classes"]).repeat_interleave(s.per_class)
    if objective.kind == "denoiser":
        x0, y0 = clean_batch
        x0, labels = x0[: len(labels)], y0[: len(labels)].cpu()
        g = torch.Generator(device).manual_seed(s.seed)
        noisy = x0 + objective.sigma * torch.randn(x0.shape, generator=g, device=device)
        return labels, [(f"denoise_sigma{objective.sigma:g}", net(noisy),
                         dict(sampler="one_step_denoiser", sigma=objective.sigma))]
    events, model = [], objective.denoiser(net)
    for scale in s.guidance:
        spec = sampling_for(cfg, guidance=scale)
        x = generate(model, cfg, spec, labels if n_cls else None, seed=s.seed, indices=range(len(labels)),
                     device=device)
        name = f"{s.convention}_{scale:g}" if n_cls else "uncond"
        events.append((name, x, dict(sampler=spec.sampler, steps=spec.steps, eta=spec.eta if spec.eta else None,
                                     guidance_scale=float(scale) if n_cls else None,
                                     guidance_convention=s.convention if n_cls else None)))
    return labels, events


def write_event(cfg: Config, objective: Objective, net, *, step: int, run_dir: Path, device, logger: RunLogger, ema: bool,
                clean_batch=None, log=print) -> list[Path]:
    """Sample one event and write it (archive, TensorBoard, PNG). Returns the PNGs written.

    None of it is essential to the run: a damaged ``samples.h5`` is moved aside (``samples.h5.damaged-<time>``)
    and a fresh archive started; any other failure to write the archive or a PNG is a warning, never the
    end of the run. Only a full disk ends it (:func:`ddpm.run.atomic.writing` in the caller says so)."""
    labels, events = sample_events(cfg, objective, net, device, clean_batch)
    norm = tuple(cfg.data.normalize) if cfg.data.normalize else None
    base = dict(step=step, seed=cfg.sample.seed, ema=ema, config_hash=cfg.hash())
    archive = run_dir / "samples.h5"
    pngs = []
    for name, x, attrs in events:
        images = model_to_uint8(x, norm)
        group = f"train/step_{step:09d}/{name}"
        try:
            aside = samples.set_aside_if_damaged(archive)
            if aside is not None:
                log(f"warning: {archive} was damaged; moved it to {aside} and started a new archive")
            samples.write_samples(archive, group, images, labels.numpy(), {**base, **attrs})
        except Exception as e:
            if out_of_space(e):
                raise
            log(f"warning: could not archive {group} in {archive} ({' '.join(str(e).split())[:200]}); "
                "training goes on")
        grid = make_grid(images, nrow=cfg.sample.per_class)
        logger.log_image(step, f"samples/{name}", grid)
        path = run_dir / "samples" / f"step_{step:09d}_{name}.png"
        try:
            path.parent.mkdir(exist_ok=True)
            grid_png(cfg, path, grid, len(images), attrs, step=step, ema=ema)
        except OSError as e:
            if out_of_space(e):
                raise
            log(f"warning: could not write the sample grid {path} ({e}); training goes on")
            continue
        pngs.append(path)
    return pngs


def grid_png(cfg: Config, path: Path, grid, n: int, attrs: dict, *, step: int, ema: bool) -> None:
    """The event's grid (n images, ``per_class`` a row) with a title and, for class-conditional samples,
    the class names as row labels."""
    s = cfg.sample
    conditional = attrs.get("guidance_scale") is not None
    if conditional:
        symbol = convention_symbol(s.convention)
        what = f"{symbol}={attrs['guidance_scale']:g} (guidance convention {s.convention})"
    else:
        what = str(attrs.get("sampler")).replace("_", " ")
    steps = f", {attrs['steps']} steps" if attrs.get("steps") else ""
    cols = min(s.per_class, n)
    title = [f"{cfg.name} · step {step}: {what}",
             f"{attrs.get('sampler')}{steps} · {'EMA' if ema else 'raw'} weights · {cols} samples per row"]
    grid_figure(path, grid, title=title, rows=math.ceil(n / cols), cols=cols,
                row_labels=list(DATASETS[cfg.data.dataset]["class_names"]) if conditional else None,
                ylabel="requested class" if conditional else "")
