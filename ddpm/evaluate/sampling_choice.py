"""How ``jobs.evaluate`` and ``jobs.sample`` sample a loaded run: a frozen :class:`SamplingChoice` from
:func:`choose_sampling`, the guidance scales with the main and the fast
:class:`~ddpm.diffusion.from_config.Sampling`.

Defaults come from the run's config (``sample.guidance``, ``convention``, ``sampler``, ``steps``,
``clip_x0``, ``eta``). On a CPU a config sampler that runs all T steps (ddpm) becomes the fast sampler with the
fast steps unless a sampler is named. The fast sampling (progression across checkpoints, slerp interpolation)
is the objective's first sampler with a step choice, deterministic (DDIM at eta 0, Euler for a flow,
DPM-Solver++ for EDM). A new kind of guidance is a field of the record, resolved in :func:`choose_sampling`.

What a sampler is comes from :mod:`ddpm.diffusion.from_config` (its steps, its network evaluations), never from
its name here, so a new sampler there needs no change in the evaluation: :func:`runs_every_step`,
:func:`fast_sampler`, :func:`table_steps`, :func:`takes_eta`.
"""
import math
from dataclasses import dataclass, replace
from typing import Sequence

from ddpm.diffusion.from_config import DEFAULT_STEPS, SAMPLERS, Sampling, network_evaluations, sampling_for
from ddpm.diffusion.samplers import CONVENTIONS, to_gamma
from ddpm.errors import UserError


@dataclass(frozen=True)
class SamplingChoice:
    """The guidance scales and the two samplings of an evaluation (one scale for jobs.sample)."""
    conditional: bool               # False: the scales are the one neutral scale
    scales: tuple[float, ...]       # in main.convention, duplicates dropped, order kept
    main: Sampling                  # sweep, GIFs, steps table, sample requests; at display_scale
    fast: Sampling                  # progression and interpolation: deterministic, at display_scale
    note: str = ""                  # why the sampler is not the config's (printed and in the report)

    @property
    def convention(self) -> str:
        return self.main.convention

    @property
    def display_scale(self) -> float:
        """The guidance scale of the single-scale figures: the (upper) median of the scales."""
        return self.main.guidance

    def at(self, scale: float) -> Sampling:
        """The main sampling at another guidance scale."""
        return replace(self.main, guidance=scale)


def parse_guidance(text: str) -> list[float]:
    """'0,1,3' → [0.0, 1.0, 3.0] (duplicates dropped, order kept); UserError if not finite numbers."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) for v in values):
        raise UserError(f"--guidance {text!r} is not a comma-separated list of numbers; write e.g. --guidance 0,1,3,5")
    return list(dict.fromkeys(values))


def _scales(cfg, conditional: bool, guidance: Sequence[float] | None, convention: str) -> tuple[float, ...]:
    if guidance is not None:
        scales = list(dict.fromkeys(float(g) for g in guidance))
    else:  # the config's list, re-expressed in the requested convention
        gammas = [to_gamma(s, cfg.sample.convention) for s in cfg.sample.guidance]
        scales = list(dict.fromkeys(g if convention == "gamma" else g - 1.0 for g in gammas))
    neutral = [1.0 if convention == "gamma" else 0.0]
    if not conditional:
        if guidance is not None and scales != neutral:
            raise UserError(f"this run's model is unconditional (no model.num_classes), so there is no guidance grid "
                            f"for --guidance {','.join(f'{g:g}' for g in guidance)}; drop --guidance")
        scales = neutral
    return tuple(scales)


TABLE_EVALUATIONS = (10, 20, 50, 100)  # network evaluations per row of the steps table (equal cost per column)


def runs_every_step(sampler: str) -> bool:
    """Whether ``sampler`` has no step choice and runs all T steps of the schedule (ddpm): from_config gives it
    no default step count."""
    return sampler not in DEFAULT_STEPS


def takes_eta(sampler: str) -> bool:
    """Whether ``sampler`` has DDIM's stochasticity eta (its description names a nonzero eta)."""
    return Sampling(sampler, 1, eta=1.0).describe() != Sampling(sampler, 1).describe()


def fast_sampler(objective) -> str:
    """The objective's first sampler with a step choice (deterministic at eta 0): ddim, euler, dpmpp_2m."""
    return next(s for s in objective.samplers if not runs_every_step(s))


def table_steps(cfg, sampler: str) -> tuple[int, ...]:
    """Step counts of ``sampler`` in the steps-vs-quality table: all T for a sampler that runs every step, else
    the counts that cost TABLE_EVALUATIONS network evaluations, fitted to the run (:func:`fit_steps`), the
    counts it cannot take left out."""
    if runs_every_step(sampler):
        return (cfg.diffusion.T,)
    fitted = set()
    for evals in TABLE_EVALUATIONS:
        try:
            fitted.add(fit_steps(cfg, sampler, max(1, evals // network_evaluations(sampler, 1))))
        except UserError:
            continue
    return tuple(sorted(fitted))


def fit_steps(cfg, sampler: str, steps: int) -> int:
    """``steps`` if ``sampler`` takes them for this run, else T: the samplers that visit the schedule's
    timesteps (ddim, dpmpp_2m on a discrete schedule) take at most T. UserError if neither fits."""
    try:
        sampling_for(cfg, sampler=sampler, steps=steps)
        return steps
    except UserError:
        if steps <= cfg.diffusion.T:
            raise
    sampling_for(cfg, sampler=sampler, steps=cfg.diffusion.T)
    return cfg.diffusion.T


def _sampler_and_steps(run, sampler: str | None, steps: int | None, fast_steps: int) -> tuple[str, int, str]:
    """(sampler, steps, note): the named or the config's sampler and its steps, checked against the run."""
    cfg, T, fits = run.cfg, run.cfg.diffusion.T, run.objective.samplers
    if sampler is not None:
        if sampler not in SAMPLERS:
            raise UserError(f"unknown sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)}")
        if sampler not in fits:
            raise UserError(f"--sampler {sampler} does not fit diffusion.objective={cfg.diffusion.objective}; "
                            f"use {' or '.join(fits)}")
    if steps is not None and steps < 1:
        raise UserError(f"--steps must be >= 1, got {steps}")
    name, note = sampler or cfg.sample.sampler, ""
    if sampler is None and runs_every_step(name) and (run.device.type == "cpu" or steps not in (None, T)):
        # A sampler of all T steps (DDPM) is far too slow on a CPU for a default evaluation.
        why = "on CPU" if run.device.type == "cpu" else f"for --steps {steps}"
        fast = fast_sampler(run.objective)
        note = f"{fast} instead of the config's {name} {why}; pass --sampler {name} for all T={T} steps"
        name = fast
    if runs_every_step(name):
        if steps not in (None, T):
            raise UserError(f"the {name} sampler always runs all T={T} steps; drop --steps or use --sampler "
                            f"{fast_sampler(run.objective)}")
        return name, T, note
    if steps is not None:
        try:
            sampling_for(cfg, sampler=name, steps=steps)
        except UserError:
            if steps > T:
                raise UserError(f"--steps {steps} exceeds diffusion.T={T} of this run; pass --steps {T} or fewer") \
                    from None
            raise
        return name, steps, note
    if cfg.sample.sampler == name and cfg.sample.steps:
        steps = cfg.sample.steps
    else:
        steps = fast_steps if note else DEFAULT_STEPS[name]
    return name, fit_steps(cfg, name, steps), note


def choose_sampling(run, *, guidance: Sequence[float] | None = None, convention: str | None = None,
                    sampler: str | None = None, steps: int | None = None, clip_x0: bool | None = None,
                    eta: float | None = None, fast_steps: int = 20) -> SamplingChoice:
    """The sampling of ``run`` (a :class:`~ddpm.evaluate.loaded_run.LoadedRun` of a generative run) with
    the given choices (None: the config's); UserError for a choice that does not fit the run."""
    cfg = run.cfg
    convention = convention or cfg.sample.convention
    if convention not in CONVENTIONS:
        raise UserError(f"unknown --convention {convention!r}; choose gamma or w")
    scales = _scales(cfg, run.conditional, guidance, convention)
    name, steps, note = _sampler_and_steps(run, sampler, steps, fast_steps)
    if eta is not None and not 0 <= eta <= 1:
        raise UserError(f"--eta must be in [0, 1] (0: deterministic DDIM, 1: as stochastic as DDPM), got {eta:g}")
    if eta and not takes_eta(name):
        with_eta = [s for s in run.objective.samplers if takes_eta(s)]
        raise UserError(f"--eta {eta:g} is DDIM's stochasticity, but the sampler here is {name}; "
                        + (f"pass --sampler {with_eta[0]}" if with_eta else "drop --eta"))
    eta = (cfg.sample.eta if eta is None else eta) if takes_eta(name) else 0.0
    common = dict(guidance=sorted(scales)[len(scales) // 2], convention=convention,
                  clip_x0=cfg.sample.clip_x0 if clip_x0 is None else clip_x0)
    main = sampling_for(cfg, sampler=name, steps=steps, eta=eta, **common)
    fast = fast_sampler(run.objective)
    fast_steps = fit_steps(cfg, fast, fast_steps)
    return SamplingChoice(run.conditional, scales, main, sampling_for(cfg, sampler=fast, steps=fast_steps, eta=0.0,
                                                                      **common), note)
