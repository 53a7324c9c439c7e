"""A trained net plus a config → samples: objective conversion, guidance, sampler choice.

Used by the training job (sample grids) and by the evaluation job, so both sample the same way. ``cfg``
is a :class:`ddpm.config.Config` (read only through its attributes: this layer sits below the config).
"""
import torch

from ddpm.data.datasets import DATASETS
from ddpm.diffusion.objectives import eps_from_prediction
from ddpm.diffusion.samplers import (
    classifier_free_guidance,
    sample_ddim,
    sample_ddpm,
    sample_flow,
)
from ddpm.diffusion.schedule import NoiseSchedule
from ddpm.errors import UserError

DEFAULT_STEPS = {"ddim": 50, "euler": 100, "heun": 50}


def effective_steps(cfg, sampler: str | None = None, steps: int | None = None) -> int:
    """The number of sampler steps actually run (config value 0 means the sampler's default; ddpm runs T)."""
    sampler = sampler or cfg.sample.sampler
    steps = steps or cfg.sample.steps
    return steps or (cfg.diffusion.T if sampler == "ddpm" else DEFAULT_STEPS[sampler])


def schedule_for(cfg) -> NoiseSchedule:
    d = cfg.diffusion
    return NoiseSchedule.make(d.schedule, d.T, d.beta_start, d.beta_end)


def eps_model_for(net, sched: NoiseSchedule, objective: str, device):
    """A callable ``(x, t, y) -> eps`` (or velocity for rectified flow) for a net trained on ``objective``."""
    if objective in ("eps", "rectified_flow"):
        return net
    if objective in ("x0", "v"):
        s = sched.to(device, torch.float32)
        return lambda x, t, y: eps_from_prediction(s, objective, x, t, net(x, t, y).float())
    raise UserError(f"models trained with diffusion.objective={objective} do not generate samples")


def generate(net, cfg, labels, *, n: int | None = None, seed: int, guidance: float = 1.0, convention: str = "gamma",
             sampler: str | None = None, steps: int | None = None, device="cpu", x_T=None, capture=None,
             model=None, clip_x0: bool | None = None):
    """Sample images (B, C, H, W) in about [-1, 1] for ``labels`` (LongTensor (B,), or None with ``n``).

    ``guidance`` is ignored for unconditional nets only when it is the neutral value (gamma 1 / w 0);
    otherwise an unconditional net raises a UserError. ``model``: the net's ``(x, t, y) -> eps`` callable
    to use instead of :func:`eps_model_for` (e.g. compiled once with
    :func:`ddpm.diffusion.compiled.compile_for_sampling`); guidance is applied around it, so one compiled
    model serves every scale. ``clip_x0`` (default: ``sample.clip_x0``) clips the predicted clean image to
    [-1, 1] at every DDPM / DDIM step, as the DDPM paper's sampler does: it keeps an undertrained net's
    samples from saturating (flows ignore it). Returns x, or (x, trajectory) with ``capture``.
    """
    sampler = sampler or cfg.sample.sampler
    steps = effective_steps(cfg, sampler, steps)
    sched = schedule_for(cfg)
    model = eps_model_for(net, sched, cfg.diffusion.objective, device) if model is None else model
    if labels is not None and getattr(net, "num_classes", 0):
        model = classifier_free_guidance(model, guidance, convention, num_classes=net.num_classes)
    else:
        if guidance != (1.0 if convention == "gamma" else 0.0):
            classifier_free_guidance(net, guidance, convention)  # raises the UserError for unconditional nets
        labels = None
    n = labels.shape[0] if labels is not None else (x_T.shape[0] if x_T is not None else n)
    facts = DATASETS[cfg.data.dataset]
    shape = (n, facts["channels"], facts["size"], facts["size"])
    gen = torch.Generator(device=device).manual_seed(seed)
    kw = dict(generator=gen, x_T=x_T, capture=capture, device=device)
    if labels is not None:
        labels = labels.to(device)
    clip = cfg.sample.clip_x0 if clip_x0 is None else clip_x0
    if sampler == "ddpm":
        if steps != sched.T:
            raise UserError(f"the ddpm sampler always runs all T={sched.T} steps; use sampler ddim for {steps} steps")
        # Clipping needs the x0 form of the DDPM step (the same step when nothing is clipped).
        return sample_ddpm(model, sched, shape, labels, form="x0" if clip else "eps", clip_x0=clip, **kw)
    if sampler == "ddim":
        return sample_ddim(model, sched, shape, labels, steps=steps, clip_x0=clip, **kw)
    if sampler in ("euler", "heun"):
        if cfg.diffusion.objective != "rectified_flow":
            raise UserError(f"sampler {sampler} integrates rectified-flow models; this one was trained with "
                            f"objective {cfg.diffusion.objective}, use ddpm or ddim")
        return sample_flow(model, shape, labels, steps=steps, method=sampler, **kw)
    raise UserError(f"unknown sampler '{sampler}'; choose one of: ddpm, ddim, euler, heun")
