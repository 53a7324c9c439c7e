"""A config → its objective, its sampling choice, and samples: used by the training job (sample grids),
the evaluation and ``jobs.sample``, so all three sample the same way.

Sample i of a request with seed s is a pure function of (s, i) and the :class:`Sampling` choice: its
starting noise comes from ``mix_seed(s, SAMPLE_STREAM, i)`` and a stochastic sampler's noise at step k
from ``mix_seed(mix_seed(s, STEP_STREAM, i), k)``, whatever batch, chunk, shard or rank it is made in.
``cfg`` is a :class:`ddpm.config.Config`, read only through its attributes (this layer sits below it).
"""
from dataclasses import dataclass
from typing import Sequence

import torch

from ddpm.data.batcher import SAMPLE_STREAM, STEP_STREAM, mix_seed
from ddpm.data.datasets import DATASETS
from ddpm.diffusion.objectives import OBJECTIVES, EDMPreconditioned, Objective, RectifiedFlow
from ddpm.diffusion.samplers import (
    StepNoise,
    Trajectory,
    classifier_free_guidance,
    ddim_timesteps,
    flow_times,
    karras_sigmas,
    karras_timesteps,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_euler,
    sample_heun,
)
from ddpm.diffusion.schedule import NoiseSchedule
from ddpm.errors import UserError

SAMPLERS = ("ddpm", "ddim", "euler", "heun", "dpmpp_2m")
DEFAULT_STEPS = {"ddim": 50, "euler": 100, "heun": 50, "dpmpp_2m": 25}
EVALUATIONS_PER_STEP = {"heun": 2}  # network evaluations per step where not 1 (a CFG pair in one batch counts once)
CLIPPING = ("ddpm", "ddim", "dpmpp_2m")  # the samplers that clip x0_hat with clip_x0


def network_evaluations(sampler: str, steps: int) -> int:
    """Network evaluations of a sampler run (the cost that steps-vs-quality tables compare)."""
    return steps * EVALUATIONS_PER_STEP.get(sampler, 1)


def schedule_for(cfg) -> NoiseSchedule:
    d = cfg.diffusion
    return NoiseSchedule.make(d.schedule, d.T, d.beta_start, d.beta_end)


def objective_for(cfg) -> Objective:
    """The run's objective (see :mod:`ddpm.diffusion.objectives`), built from ``cfg.diffusion`` and the net's classes."""
    d = cfg.diffusion
    return OBJECTIVES[d.objective](schedule=schedule_for(cfg), sigma=d.sigma,
                                   num_classes=cfg.model.get("num_classes", 0))


@dataclass(frozen=True)
class Sampling:
    """How to sample: with a seed and sample indices it determines every sample.

    sampler: ddpm | ddim | euler | heun | dpmpp_2m; steps: what it runs (ddpm: T; dpmpp_2m: its network
    evaluations); guidance: the scale in ``convention`` (gamma | w; ignored by unconditional nets); clip_x0:
    clip the predicted clean image to [-1, 1] at every DDPM/DDIM/DPM-Solver++ step (the DDPM paper's
    sampler); eta: DDIM's stochasticity (0: deterministic).
    """
    sampler: str
    steps: int
    guidance: float = 1.0
    convention: str = "gamma"
    clip_x0: bool = False
    eta: float = 0.0

    def describe(self) -> str:
        """e.g. "ddim 50 steps, x0 clipped" (the guidance is named where it is shown)."""
        clip = ", x0 clipped" if self.clip_x0 and self.sampler in CLIPPING else ""
        eta = f", eta {self.eta:g}" if self.sampler == "ddim" and self.eta else ""
        return f"{self.sampler} {self.steps} steps{clip}{eta}"


def sampling_for(cfg, *, sampler: str | None = None, steps: int | None = None, guidance: float | None = None,
                 convention: str | None = None, clip_x0: bool | None = None, eta: float | None = None) -> Sampling:
    """The config's sampling choice (``cfg.sample``) with the given fields replaced; UserError if the
    sampler does not fit the objective or the steps do not fit the sampler. steps None or 0: the
    sampler's default (ddpm: all T)."""
    s, T = cfg.sample, cfg.diffusion.T
    sampler = sampler or s.sampler
    fits = OBJECTIVES[cfg.diffusion.objective].samplers
    if sampler not in SAMPLERS:
        raise UserError(f"unknown sampler '{sampler}'; choose one of: {', '.join(SAMPLERS)}")
    if sampler not in fits:
        raise UserError(f"sampler {sampler} does not fit diffusion.objective={cfg.diffusion.objective}; "
                        + (f"use {' or '.join(fits)}" if fits else "this run does not generate samples"))
    steps = steps or (s.steps if sampler == s.sampler else 0) or (T if sampler == "ddpm" else DEFAULT_STEPS[sampler])
    if sampler == "ddpm" and steps != T:
        raise UserError(f"the ddpm sampler always runs all T={T} steps; use sampler ddim for {steps} steps")
    if sampler == "ddim" and not 1 <= steps <= T:
        raise UserError(f"DDIM steps must be in [1, T={T}], got {steps}")
    if sampler == "dpmpp_2m":
        trajectory_for(cfg, steps)  # the UserError for steps that do not fit
    convention = convention or s.convention
    neutral = 1.0 if convention == "gamma" else 0.0
    return Sampling(sampler, int(steps), float(neutral if guidance is None else guidance), convention,
                    s.clip_x0 if clip_x0 is None else clip_x0, s.eta if eta is None else eta)


def image_shape(cfg) -> tuple:
    """One sample's (C, H, W)."""
    facts = DATASETS[cfg.data.dataset]
    return facts["channels"], facts["size"], facts["size"]


def start_noise(seed: int, indices: Sequence[int], shape) -> torch.Tensor:
    """The starting noise (N, C, H, W) of samples ``indices`` of a request with ``seed`` (on the CPU)."""
    g = torch.Generator()
    return torch.stack([torch.randn(shape, generator=g.manual_seed(mix_seed(seed, SAMPLE_STREAM, i))) for i in indices])


def generate(model, cfg, spec: Sampling, labels=None, *, seed: int, indices: Sequence[int] | None = None,
             device="cpu", x: torch.Tensor | None = None, callback=None) -> torch.Tensor:
    """Samples (B, C, H, W) on ``device``, in about [-1, 1], of ``model`` (the objective's denoiser, e.g.
    ``objective_for(cfg).denoiser(net)``, compiled or not) for ``labels`` (LongTensor (B,), or None).

    Sample b is sample ``indices[b]`` of the request with ``seed`` (default indices: 0 .. B-1, with B from
    ``labels`` or ``x``). ``x`` replaces the starting noise (interpolation). Classifier-free guidance at
    ``spec.guidance`` wraps the model when the net is class-conditional and labels are given; an
    unconditional net refuses a guidance scale other than the neutral one. ``callback``: see
    :mod:`ddpm.diffusion.samplers`.
    """
    num_classes = cfg.model.get("num_classes", 0)
    neutral = 1.0 if spec.convention == "gamma" else 0.0
    if not num_classes and spec.guidance != neutral:
        classifier_free_guidance(model, spec.guidance, spec.convention, num_classes=0)  # the UserError
    if indices is None:
        indices = range(len(labels) if labels is not None else len(x))
    shape = image_shape(cfg)
    x = (start_noise(seed, indices, shape) if x is None else x).to(device)
    if labels is not None and num_classes:
        model = classifier_free_guidance(model, spec.guidance, spec.convention, num_classes=num_classes)
        labels = labels.to(device)
    else:
        labels = None
    noise = StepNoise([mix_seed(seed, STEP_STREAM, i) for i in indices], shape, device)
    T = cfg.diffusion.T
    if spec.sampler == "ddpm":
        # Clipping needs the x0 form of the DDPM step (the same step when nothing is clipped).
        return sample_ddpm(model, x, range(T - 1, -1, -1), labels, schedule=schedule_for(cfg), noise=noise,
                           form="x0" if spec.clip_x0 else "eps", clip_x0=spec.clip_x0, callback=callback)
    if spec.sampler == "ddim":
        return sample_ddim(model, x, ddim_timesteps(T, spec.steps), labels, schedule=schedule_for(cfg), noise=noise,
                           eta=spec.eta, clip_x0=spec.clip_x0, callback=callback)
    if spec.sampler == "dpmpp_2m":
        steps = trajectory_for(cfg, spec.steps)
        if issubclass(OBJECTIVES[cfg.diffusion.objective], EDMPreconditioned):
            x = steps.sigmas[0] * x  # x = x0 + sigma eps starts at sigma_max eps (the others at about eps)
        return sample_dpmpp_2m(model, x, steps, labels, clip_x0=spec.clip_x0, callback=callback)
    flow = sample_euler if spec.sampler == "euler" else sample_heun
    return flow(model, x, flow_times(spec.steps), labels, callback=callback)


def trajectory_for(cfg, steps: int) -> Trajectory:
    """The points DPM-Solver++ visits with ``steps`` network evaluations: for the discrete objectives
    :func:`karras_timesteps` of the run's schedule (1 <= steps <= T), for rectified flow evenly spaced
    times from 1 (the last point at 1 / steps), for EDM :func:`karras_sigmas` over its sigma range."""
    obj = OBJECTIVES[cfg.diffusion.objective]
    if issubclass(obj, RectifiedFlow):
        return Trajectory.flow(flow_times(steps)[:-1])
    if issubclass(obj, EDMPreconditioned):
        return Trajectory.noise_levels(karras_sigmas(steps, obj.SIGMA_MIN, obj.SIGMA_MAX))
    sched = schedule_for(cfg)
    return Trajectory.discrete(sched, karras_timesteps(sched, steps))
