"""The training job's sampling events (rank 0): every one writes, per guidance scale, an archive group in
``RUN_DIR/samples.h5``, a TensorBoard image and a labelled PNG ``RUN_DIR/samples/step_XXXXXXXXX_<name>.png``;
an event at a ``log.gif_every_epochs`` epoch also a GIF of the grid's denoising, ``..._<name>.gif``.

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
from ddpm.run.gifs import write_gif
from ddpm.run.grids import grid_figure
from ddpm.run.metrics_log import RunLogger


GIF_FRAMES = 24  # frames of a training GIF (evenly spaced sampler steps) before the held final one


@torch.no_grad()
def sample_events(cfg: Config, objective: Objective, net, device, clean_batch=None,
                  trajectory: bool = False) -> tuple[torch.Tensor, list]:
    """(labels (N,), [(name, images in model space (N, C, H, W), attrs, frames)]) of one event.

    A generative run samples ``cfg.sample.per_class`` images per class (or as many unconditional ones)
    for every guidance scale, sample i with the same noise at every scale; with ``trajectory``, frames are
    [(step index, t, x_t)] at up to GIF_FRAMES evenly spaced sampler steps (else None). A one-step
    denoiser run denoises the first images of ``clean_batch`` ((x, y) in model space; the test split's)
    noised at its sigma. ``net`` must be in eval mode.
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
                         dict(sampler="one_step_denoiser", sigma=objective.sigma), None)]
    events, model = [], objective.denoiser(net)
    for scale in s.guidance:
        spec = sampling_for(cfg, guidance=scale)
        frames, callback = _recorder(spec.steps) if trajectory else (None, None)
        x = generate(model, cfg, spec, labels if n_cls else None, seed=s.seed, indices=range(len(labels)),
                     device=device, callback=callback)
        name = f"{s.convention}_{scale:g}" if n_cls else "uncond"
        events.append((name, x, dict(sampler=spec.sampler, steps=spec.steps, eta=spec.eta if spec.eta else None,
                                     guidance_scale=float(scale) if n_cls else None,
                                     guidance_convention=s.convention if n_cls else None), frames))
    return labels, events


def _recorder(steps: int):
    """(frames, callback): the sampler callback keeps (step index, t, x_t) at up to GIF_FRAMES evenly spaced
    steps of a run of ``steps`` steps, the first included."""
    n = min(GIF_FRAMES, steps)
    keep, frames = {round(i * (steps - 1) / max(n - 1, 1)) for i in range(n)}, []

    def callback(k, t, x, x0):
        if k in keep:
            frames.append((k, t, x.clone()))
    return frames, callback


def write_event(cfg: Config, objective: Objective, net, *, step: int, run_dir: Path, device, logger: RunLogger, ema: bool,
                clean_batch=None, epoch: int | None = None, gif: bool = False, log=print) -> list[Path]:
    """Sample one event and write it (archive, TensorBoard, PNG; with ``gif``, a GIF per scale). Returns the
    PNGs written. ``epoch``: the epoch the event's step ends, if it ends one (titles, archive attrs).

    None of it is essential to the run: a damaged ``samples.h5`` is moved aside (``samples.h5.damaged-<time>``)
    and a fresh archive started; any other failure to write the archive or a PNG is a warning, never the
    end of the run. Only a full disk ends it (:func:`ddpm.run.atomic.writing` in the caller says so)."""
    labels, events = sample_events(cfg, objective, net, device, clean_batch, trajectory=gif)
    norm = tuple(cfg.data.normalize) if cfg.data.normalize else None
    base = dict(step=step, seed=cfg.sample.seed, ema=ema, config_hash=cfg.hash(), **({"epoch": epoch} if epoch else {}))
    archive = run_dir / "samples.h5"
    pngs = []
    for name, x, attrs, frames in events:
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
            grid_png(cfg, path, grid, len(images), attrs, step=step, ema=ema, epoch=epoch)
            if frames:
                gif_of(cfg, path.with_suffix(".gif"), frames, grid, attrs, step=step, epoch=epoch)
        except OSError as e:
            if out_of_space(e):
                raise
            log(f"warning: could not write the sample grid {path} or its GIF ({e}); training goes on")
            continue
        pngs.append(path)
    return pngs


def gif_of(cfg: Config, path: Path, frames: list, final_grid, attrs: dict, *, step: int, epoch: int | None) -> dict:
    """The denoising GIF of one event's grid: x_t at the captured sampler steps, then the final samples."""
    norm = tuple(cfg.data.normalize) if cfg.data.normalize else None
    grids = [make_grid(model_to_uint8(x, norm), nrow=cfg.sample.per_class) for _, _, x in frames] + [final_grid]
    head = f"{'epoch ' + str(epoch) if epoch else 'step ' + str(step)} · {_scale_label(cfg, attrs)}"
    captions = [f"{head} · t={t:g}" if isinstance(t, float) else f"{head} · t={int(t)}" for _, t, _ in frames]
    return write_gif(path, grids, captions=captions + [f"{head} · done"])


def _scale_label(cfg: Config, attrs: dict) -> str:
    if attrs.get("guidance_scale") is None:
        return str(attrs.get("sampler")).replace("_", " ")
    return f"{convention_symbol(cfg.sample.convention)}={attrs['guidance_scale']:g}"


def grid_png(cfg: Config, path: Path, grid, n: int, attrs: dict, *, step: int, ema: bool,
             epoch: int | None = None) -> None:
    """The event's grid (n images, ``per_class`` a row) with a title and, for class-conditional samples,
    the class names as row labels."""
    s = cfg.sample
    conditional = attrs.get("guidance_scale") is not None
    what = _scale_label(cfg, attrs) + (f" (guidance convention {s.convention})" if conditional else "")
    if attrs.get("sigma") is not None:  # the denoiser's noise level, on the scale of the images it sees
        what += f" σ={attrs['sigma']:g} on images in [{_data_range(cfg)}]"
    steps = f", {attrs['steps']} steps" if attrs.get("steps") else ""
    cols = min(s.per_class, n)
    when = f"epoch {epoch} (step {step})" if epoch else f"step {step}"
    title = [f"{cfg.name} · {when}: {what}",
             f"{attrs.get('sampler')}{steps} · {'EMA' if ema else 'raw'} weights · {cols} samples per row"]
    grid_figure(path, grid, title=title, rows=math.ceil(n / cols), cols=cols,
                row_labels=list(DATASETS[cfg.data.dataset]["class_names"]) if conditional else None,
                ylabel="requested class" if conditional else "")


def _data_range(cfg: Config) -> str:
    """The interval the model's images span, e.g. "-1, 1" or "0, 1" (data.normalize = [0, 1])."""
    if not cfg.data.normalize:
        return "-1, 1"
    mean, std = cfg.data.normalize
    return f"{-mean / std + 0.0:.3g}, {(1 - mean) / std:.3g}"
