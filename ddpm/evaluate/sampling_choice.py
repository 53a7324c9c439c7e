"""How ``jobs.evaluate`` and ``jobs.sample`` sample a loaded run: a frozen :class:`SamplingChoice` from
:func:`choose_sampling`, the guidance scales with the main and the fast
:class:`~ddpm.diffusion.from_config.Sampling`.

Defaults come from the run's config (``sample.guidance``, ``convention``, ``sampler``, ``steps``,
``clip_x0``, ``eta``). On a CPU a config sampler of ddpm (all T steps) becomes ddim with the fast steps
unless a sampler is named. The fast sampling (progression across checkpoints, slerp interpolation) is
deterministic DDIM (a flow's own sampler for rectified flow). A new kind of guidance is a field of the
record, resolved in :func:`choose_sampling`.
"""
import math
from dataclasses import dataclass, replace
from typing import Sequence

from ddpm.diffusion.from_config import DEFAULT_STEPS, SAMPLERS, Sampling, sampling_for
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
    if sampler is None and name == "ddpm" and (run.device.type == "cpu" or steps not in (None, T)):
        # DDPM always runs all T steps: far too slow on a CPU for a default evaluation.
        why = "on CPU" if run.device.type == "cpu" else f"for --steps {steps}"
        note = f"ddim instead of the config's ddpm {why}; pass --sampler ddpm for all T={T} steps"
        name = "ddim"
    if name == "ddpm":
        if steps not in (None, T):
            raise UserError(f"the ddpm sampler always runs all T={T} steps; drop --steps or use --sampler ddim")
        return name, T, note
    if steps is not None:
        if name == "ddim" and steps > T:
            raise UserError(f"--steps {steps} exceeds diffusion.T={T} of this run; pass --steps {T} or fewer")
        return name, steps, note
    if cfg.sample.sampler == name and cfg.sample.steps:
        steps = cfg.sample.steps
    else:
        steps = fast_steps if note else DEFAULT_STEPS[name]
    return name, min(steps, T) if name == "ddim" else steps, note


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
    if eta and name != "ddim":
        raise UserError(f"--eta {eta:g} is DDIM's stochasticity, but the sampler here is {name}; pass --sampler ddim")
    eta = (cfg.sample.eta if eta is None else eta) if name == "ddim" else 0.0
    common = dict(guidance=sorted(scales)[len(scales) // 2], convention=convention,
                  clip_x0=cfg.sample.clip_x0 if clip_x0 is None else clip_x0)
    main = sampling_for(cfg, sampler=name, steps=steps, eta=eta, **common)
    fast = "ddim" if "ddim" in run.objective.samplers else name
    fast_steps = min(fast_steps, cfg.diffusion.T) if fast == "ddim" else fast_steps
    return SamplingChoice(run.conditional, scales, main, sampling_for(cfg, sampler=fast, steps=fast_steps, eta=0.0,
                                                                      **common), note)
