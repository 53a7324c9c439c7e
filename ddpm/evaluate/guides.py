"""Guidance other than the run's classifier-free guidance, for ``jobs.evaluate`` and ``jobs.sample``: classifier
guidance by a noisy-classifier run (:class:`ClassifierGuide`, ``--classifier-guidance RUN --cg-scale S``) and
class mixtures (:class:`Mixture`, ``--mix 3:0.5,8:0.5``).

Both are frozen records resolved (and checked) before anything is written; :func:`sample_with` samples with
either through :func:`ddpm.diffusion.from_config.generate`, so sample i is still a pure function of (seed, i).

- Classifier guidance (Dhariwal & Nichol 2021, Algorithm 2 / eq. 14) guides the run's *unconditional*
  prediction (the null class of a class-conditional run): ``eps_u - s sqrt(1 - ab_t) grad log p(y | x_t, t)``.
  Scale 0 is unguided sampling, and a conditional run's classifier-free guidance starts from the same eps_u,
  so the two are compared on one model. The noisy classifier must share the run's data set, normalisation
  and noise schedule (it was trained on that run's x_t) and the run must sample on the schedule's timesteps.
- A mixture is the conjunction of composable diffusion (:func:`ddpm.diffusion.mixture.composed_guidance`):
  ``eps_u + sum_i w_i (eps_{c_i} - eps_u)``, weights in the gamma sense (one class at weight gamma is
  classifier-free guidance at gamma = 1 + w).
"""
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ddpm.data.datasets import DATASETS
from ddpm.diffusion.from_config import generate, objective_for, schedule_for
from ddpm.diffusion.mixture import composed_guidance
from ddpm.diffusion.samplers import classifier_guidance
from ddpm.errors import UserError
from ddpm.evaluate.loaded_run import LoadedRun, load_run
from ddpm.run.checkpoints import CheckpointManager
from ddpm.run.rundir import read_run_config

TRAIN_CLASSIFIER = "python -m jobs.train --config configs/recipes/noisy_classifier_mnist.yaml"
SCHEDULE_KEYS = ("schedule", "T", "beta_start", "beta_end")


def _unconditional(run: LoadedRun, model):
    """The run's unconditional prediction (x, t, y) -> eps_u: the null class of a class-conditional net."""
    if not run.conditional:
        return lambda x, t, y: model(x, t, None)
    null = run.num_classes
    return lambda x, t, y: model(x, t, torch.full((x.shape[0],), null, device=x.device, dtype=torch.long))


@dataclass(frozen=True, eq=False)
class ClassifierGuide:
    """A noisy-classifier run (its checkpoint loaded on the guided run's device) guiding at ``scale``."""
    classifier: LoadedRun
    scale: float = 1.0
    needs_labels = True             # the class each sample is guided toward

    def at(self, scale: float) -> "ClassifierGuide":
        return replace(self, scale=float(scale))

    @property
    def label(self) -> str:
        return f"s={self.scale:g}"

    @property
    def name(self) -> str:
        """Part of file and archive-group names: cg_3."""
        return f"cg_{self.scale:g}"

    def settings(self) -> dict:
        """What determines the guidance (stored with the samples)."""
        c = self.classifier
        return {"classifier_guidance": str(c.run_dir), "cg_scale": self.scale, "cg_step": c.step, "cg_ema": c.ema,
                "cg_config_hash": c.cfg.hash()}

    def wrap(self, run: LoadedRun, model, labels):
        """(x, t, y) -> eps of ``run``'s ``model`` guided toward ``labels`` (B,) (y is ignored)."""
        base = _unconditional(run, model)
        if self.scale == 0:
            return base
        guided = classifier_guidance(base, self.classifier.net, schedule_for(run.cfg), self.scale)
        return lambda x, t, y: guided(x, t, labels)


@dataclass(frozen=True)
class Mixture:
    """Classes and their weights in the composable form ``eps_u + sum_i w_i (eps_{c_i} - eps_u)``."""
    classes: tuple[int, ...]
    weights: tuple[float, ...]
    needs_labels = False            # every sample is guided toward the same mix

    def text(self) -> str:
        """'3:0.5,8:0.5' (what --mix takes)."""
        return ",".join(f"{c}:{w:g}" for c, w in zip(self.classes, self.weights))

    @property
    def name(self) -> str:
        """Part of file names: mix3w0.5_8w0.5."""
        return "mix" + "_".join(f"{c}w{w:g}" for c, w in zip(self.classes, self.weights))

    def settings(self) -> dict:
        return {"mix": self.text()}

    def wrap(self, run: LoadedRun, model, labels):
        return composed_guidance(model, self.classes, self.weights, run.num_classes)


def sample_with(model, run: LoadedRun, spec, labels, guide=None, *, seed: int, indices, x=None, callback=None):
    """:func:`ddpm.diffusion.from_config.generate` of ``run``'s ``model`` (its denoiser, compiled or not) with
    ``spec``; with a ``guide`` (ClassifierGuide or Mixture) instead of classifier-free guidance: its model,
    at the neutral scale and without labels (the guide holds what the samples are guided toward)."""
    if guide is None:
        return generate(model, run.cfg, spec, labels, seed=seed, indices=indices, device=run.device, x=x,
                        callback=callback)
    neutral = replace(spec, guidance=1.0 if spec.convention == "gamma" else 0.0)
    guided = guide.wrap(run, model, None if labels is None else labels.to(run.device))
    return generate(guided, run.cfg, neutral, None, seed=seed, indices=indices, device=run.device, x=x,
                    callback=callback)


# ---- resolving what the user typed ---------------------------------------------------------------

def parse_scales(text: str, flag: str = "--cg-scale") -> tuple[float, ...]:
    """'0,1,3' → (0.0, 1.0, 3.0), duplicates dropped; UserError unless finite numbers >= 0."""
    try:
        values = [float(p) for p in str(text).split(",")]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) for v in values):
        raise UserError(f"{flag} {text!r} is not a comma-separated list of numbers; write e.g. {flag} 1,3,10")
    if min(values) < 0:
        raise UserError(f"{flag} {text!r}: classifier-guidance scales must be >= 0 (0: unguided), got {min(values):g}")
    return tuple(dict.fromkeys(values))


def _timesteps(objective) -> bool:
    """Whether the objective noises with the schedule's integer timesteps (the noisy classifier's input)."""
    return objective.draw(torch.Generator().manual_seed(0), 1, "cpu").dtype == torch.long


def load_classifier_guide(run: LoadedRun, path: str, scale: float = 1.0) -> ClassifierGuide:
    """The noisy classifier of the run dir ``path`` (its ``checkpoints/best`` if it has one, else the latest),
    checked against ``run``; UserError (naming --classifier-guidance) for anything that does not fit."""
    flag, cfg = f"--classifier-guidance {path}", run.cfg
    try:
        gcfg = read_run_config(Path(path))
    except UserError as e:
        raise UserError(f"{flag}: {e}") from None
    objective = objective_for(gcfg)
    if objective.kind != "classifier":
        raise UserError(f"{flag} is a diffusion.objective={gcfg.diffusion.objective} run, not a noisy classifier "
                        f"(diffusion.objective=classifier); train one with: {TRAIN_CLASSIFIER}")
    if not _timesteps(run.objective):
        raise UserError(f"{flag}: classifier guidance needs a run noised at the schedule's timesteps 0..T-1, as the "
                        f"noisy classifier was; diffusion.objective={cfg.diffusion.objective} uses continuous noise "
                        "levels")
    theirs = (gcfg.data.dataset, list(gcfg.data.normalize or []))
    if theirs != (cfg.data.dataset, list(cfg.data.normalize or [])):
        raise UserError(f"{flag} was trained on {theirs[0]} (data.normalize {gcfg.data.normalize}), this run on "
                        f"{cfg.data.dataset} (data.normalize {cfg.data.normalize}); pass a classifier of the same data")
    differ = [k for k in SCHEDULE_KEYS if getattr(gcfg.diffusion, k) != getattr(cfg.diffusion, k)]
    if differ:
        raise UserError(f"{flag} has another noise schedule than this run (" + ", ".join(
            f"diffusion.{k} {getattr(gcfg.diffusion, k)} vs {getattr(cfg.diffusion, k)}" for k in differ)
            + f"); train the classifier with this run's schedule, e.g. {TRAIN_CLASSIFIER} "
            + " ".join(f"diffusion.{k}={getattr(cfg.diffusion, k)}" for k in differ))
    manager = CheckpointManager(Path(path) / "checkpoints")
    if not manager.steps():
        raise UserError(f"{flag} has no checkpoint yet; train it first ({TRAIN_CLASSIFIER})")
    which = "best" if manager.best_step() is not None else "latest"
    classifier = load_run(Path(path), gcfg, checkpoint=which, device=str(run.device.type), writable=False)
    return ClassifierGuide(classifier, float(scale))


def parse_mix(text: str, dataset: str) -> Mixture:
    """'3:0.5,8:0.5' (or class names: 'cat:1,dog:1') → Mixture; UserError for anything else."""
    names = [n.lower() for n in DATASETS[dataset]["class_names"]]
    example = f"--mix {names[3] if len(names) > 3 else 0}:0.5,{names[-2]}:0.5"
    classes, weights = [], []
    for item in str(text).split(","):
        cls, sep, weight = item.strip().rpartition(":")
        try:
            w = float(weight)
        except ValueError:
            w = math.nan
        if not sep or not cls or not math.isfinite(w):
            raise UserError(f"--mix {text!r} is not CLASS:WEIGHT,CLASS:WEIGHT,...; write e.g. {example}")
        key = cls.strip().lower()
        c = int(key) if key.isdigit() else names.index(key) if key in names else -1
        if not 0 <= c < len(names):
            raise UserError(f"--mix: {dataset} has no class {cls.strip()!r}; classes are 0..{len(names) - 1} "
                            f"({', '.join(names)})")
        classes.append(c)
        weights.append(w)
    if len(set(classes)) != len(classes):
        raise UserError(f"--mix {text!r} names a class twice; give each class one weight")
    if len(classes) < 2:
        raise UserError(f"--mix {text!r} names one class: a mixture needs two or more (one class at weight γ is "
                        "--guidance γ in the gamma convention)")
    return Mixture(tuple(classes), tuple(weights))


def default_mixture(run: LoadedRun, gamma: float) -> Mixture:
    """Classes 3 and 8 (0 and 1 with fewer classes) at gamma / 2 each: the midpoint between the two classes'
    classifier-free guidance at gamma."""
    a, b = (3, 8) if run.num_classes > 8 else (0, 1)
    return Mixture((a, b), (gamma / 2, gamma / 2))
