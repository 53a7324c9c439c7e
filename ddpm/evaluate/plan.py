"""The evaluation job's first half: validate a request into a :class:`Plan` that writes nothing.

:func:`make_plan` checks everything (run dir, checkpoint, guidance list, sampler, steps, classifier and
Inception weights, output paths) and loads the model, but writes nothing into the run dir: a bad request
fails with a :class:`UserError` before any output exists. :func:`ddpm.evaluate.parts.run` then does the
work. Evaluation never imports the training loop.
"""
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ddpm.config import Config
from ddpm.data.datasets import DATASETS
from ddpm.data.images import model_to_uint8
from ddpm.diffusion.from_config import SAMPLERS, objective_for
from ddpm.errors import UserError
from ddpm.evaluate.parts import parse_only
from ddpm.nets.loading import load_weights
from ddpm.nets.registry import build_net
from ddpm.run.checkpoints import CheckpointManager
from ddpm.run.rundir import read_run_config


@dataclass
class Request:
    """What the user asked for, as given on the command line (None = take the default)."""
    run_dir: str
    checkpoint: str = "latest"
    ema: bool | None = None
    guidance: str | None = None
    convention: str | None = None
    sampler: str | None = None
    steps: int | None = None
    per_class: int | None = None
    seed: int | None = None
    device: str | None = None
    only: str | None = None
    inception_weights: str | None = None
    export_npz: str | None = None
    classifier: str | None = None
    metric_samples: int = 100
    table_samples: int = 20
    fast_steps: int = 20
    reference_images: int | None = None
    clip_x0: bool | None = None
    fid_samples: int | None = None


@dataclass
class Plan:
    """A validated request with every default resolved and the model loaded."""
    run_dir: Path
    cfg: Config
    kind: str                          # generative | denoiser | classifier
    step: int
    checkpoint_path: Path
    net: torch.nn.Module
    ema: bool
    parts: tuple
    device: torch.device
    seed: int
    conditional: bool = False
    scales: list = field(default_factory=list)
    convention: str = "gamma"
    sampler: str | None = None
    steps: int | None = None
    sampler_note: str = ""
    fast_sampler: str | None = None
    fast_steps: int | None = None
    per_class: int = 4
    metric_samples: int = 100
    table_samples: int = 20
    classifier: object = None          # (net, meta, path) or None
    classifier_note: str = ""
    reference: object = None           # feature (mu, sigma) of the test set
    inception: object = None           # ddpm.evaluate.fidelity.InceptionMetrics or None
    fid_samples: int | None = None     # samples per scale of the fid part (jobs.sample's machinery)
    fid_requests: list = field(default_factory=list)  # its SamplePlans, one per scale (set by the job)
    export_npz: Path | None = None
    notes: list = field(default_factory=list)  # warnings for the user (printed and in the report)
    clip_x0: bool = False              # clip x0 to [-1, 1] at every ddpm/ddim step

    @property
    def out_dir(self) -> Path:
        return self.run_dir / "eval" / f"step_{self.step:09d}"

    @property
    def group_prefix(self) -> str:
        return f"eval/step_{self.step:09d}"

    @property
    def display_scale(self) -> float:
        """The guidance scale of the single-scale figures: the (upper) median of the list."""
        return sorted(self.scales)[len(self.scales) // 2] if self.scales else 1.0

    @property
    def num_classes(self) -> int:
        """Classes of the run's data set (figure rows, label balance)."""
        return DATASETS[self.cfg.data.dataset]["classes"]

    @property
    def checkpoint_line(self) -> str:
        """The figure subtitle that says which weights made it."""
        return f"run {self.cfg.name} · checkpoint step {self.step} · {'EMA' if self.ema else 'raw (non-EMA)'} weights"

    def to_u8(self, x: torch.Tensor) -> np.ndarray:
        """Model-space samples (N, C, H, W) → uint8 (N, H, W, C), as the training job archives them."""
        norm = tuple(self.cfg.data.normalize) if self.cfg.data.normalize else None
        return model_to_uint8(x.float().cpu(), norm)

    def load_net(self, state: dict, use_ema: bool, where) -> torch.nn.Module:
        """The run's net with another checkpoint's (EMA) weights, in eval mode on the plan's device."""
        return load_net(self.cfg, state, use_ema, self.device, where)


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


def _positive(name: str, value, low: int = 1) -> None:
    if value is not None and value < low:
        raise UserError(f"{name} must be >= {low}, got {value}")


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise UserError(f"unknown --device {name!r}; choose cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but no CUDA GPU is visible here; pass --device cpu")
    return torch.device(name)


def load_net(cfg: Config, state: dict, use_ema: bool, device, where) -> torch.nn.Module:
    """The run's net with the checkpoint's (EMA) weights, in eval mode on ``device``."""
    net = build_net(cfg.model["arch"], **cfg.net_kwargs())
    load_weights(net, state.get("ema") if use_ema else state.get("model"), f"checkpoint {where}",
                 "pass a checkpoint of this run with --checkpoint")
    return net.to(device).eval()


def _resolve_sampler(req: Request, plan: Plan) -> None:
    cfg, T = plan.cfg, plan.cfg.diffusion.T
    fits = objective_for(cfg).samplers
    if req.sampler is not None:
        if req.sampler not in SAMPLERS:
            raise UserError(f"unknown sampler {req.sampler!r}; choose one of: {', '.join(SAMPLERS)}")
        if req.sampler not in fits:
            raise UserError(f"--sampler {req.sampler} does not fit diffusion.objective={cfg.diffusion.objective}; "
                            f"use {' or '.join(fits)}")
    _positive("--steps", req.steps)
    sampler = req.sampler or cfg.sample.sampler
    if req.sampler is None and sampler == "ddpm" and (plan.device.type == "cpu" or req.steps not in (None, T)):
        # DDPM always runs all T steps: far too slow on a CPU for a default evaluation.
        why = "on CPU" if plan.device.type == "cpu" else f"for --steps {req.steps}"
        plan.sampler_note = f"ddim instead of the config's ddpm {why}; pass --sampler ddpm for all T={T} steps"
        sampler = "ddim"
    if sampler == "ddpm":
        if req.steps not in (None, T):
            raise UserError(f"the ddpm sampler always runs all T={T} steps; drop --steps or use --sampler ddim")
        steps = T
    elif req.steps is not None:
        if sampler == "ddim" and req.steps > T:
            raise UserError(f"--steps {req.steps} exceeds diffusion.T={T} of this run; pass --steps {T} or fewer")
        steps = req.steps
    elif cfg.sample.sampler == sampler and cfg.sample.steps:
        steps = min(cfg.sample.steps, T) if sampler == "ddim" else cfg.sample.steps
    else:
        from ddpm.diffusion.from_config import DEFAULT_STEPS
        steps = req.fast_steps if plan.sampler_note else DEFAULT_STEPS[sampler]
        steps = min(steps, T) if sampler == "ddim" else steps
    plan.sampler, plan.steps = sampler, steps
    plan.fast_sampler = "ddim" if "ddim" in fits else sampler  # progression, interpolation
    plan.fast_steps = min(req.fast_steps, T) if plan.fast_sampler == "ddim" else req.fast_steps


def _resolve_guidance(req: Request, plan: Plan) -> None:
    from ddpm.diffusion.samplers import CONVENTIONS, to_gamma

    cfg = plan.cfg
    convention = req.convention or cfg.sample.convention
    if convention not in CONVENTIONS:
        raise UserError(f"unknown --convention {convention!r}; choose gamma or w")
    if req.guidance is not None:
        scales = parse_guidance(req.guidance)
    else:  # the config's list, re-expressed in the requested convention
        scales = [to_gamma(s, cfg.sample.convention) for s in cfg.sample.guidance]
        scales = list(dict.fromkeys(g if convention == "gamma" else g - 1.0 for g in scales))
    neutral = [1.0 if convention == "gamma" else 0.0]
    if not plan.conditional:
        if req.guidance is not None and scales != neutral:
            raise UserError(f"this run's model is unconditional (no model.num_classes), so there is no guidance "
                            f"grid for --guidance {req.guidance}; drop --guidance")
        scales = neutral
    plan.scales, plan.convention = scales, convention


def _resolve_classifier(req: Request, plan: Plan) -> None:
    from ddpm.evaluate import feature_cnn

    cfg = plan.cfg
    path = Path(req.classifier) if req.classifier else feature_cnn.default_classifier_path(cfg.data.dataset, cfg.data.root)
    if req.classifier is None and not path.is_file():
        plan.classifier_note = (f"no classifier at {path}, so no label accuracy or feature-FID; train it once with: "
                                f"python -m jobs.train_classifier --dataset {cfg.data.dataset} --root {cfg.data.root} "
                                "(a read-only data root: add --out PATH, then pass --classifier PATH here)")
        return
    net, meta = feature_cnn.load_classifier(path, cfg.data.dataset, plan.device)
    plan.classifier = (net, meta, path)
    plan.reference = feature_cnn.reference_stats(path, net, cfg.data.dataset, cfg.data.root, plan.device)


def make_plan(req: Request) -> Plan:
    """Validate ``req`` and resolve every default; raises UserError and writes nothing in the run dir."""
    run_dir = Path(req.run_dir)
    cfg = read_run_config(run_dir)
    objective = cfg.diffusion.objective
    kind = objective_for(cfg).kind
    _positive("--fid-samples", req.fid_samples)
    if req.fid_samples is not None and kind != "generative":
        raise UserError(f"--fid-samples scores generated samples; a {objective} run has none; drop it")
    parts = parse_only(req.only, kind, objective)
    if req.fid_samples is None:  # the fid part runs only when asked for with a sample count
        if "fid" in parts and req.only is not None:
            raise UserError("--only fid scores --fid-samples N samples per scale; pass --fid-samples, e.g. 50000")
        parts = tuple(p for p in parts if p != "fid")
    elif "fid" not in parts:
        parts += ("fid",)
    for name, value in (("--per-class", req.per_class), ("--metric-samples", req.metric_samples),
                        ("--table-samples", req.table_samples), ("--fast-steps", req.fast_steps)):
        _positive(name, value)
    _positive("--reference-images", req.reference_images, 2)
    if kind != "generative":
        for flag, value in (("--guidance", req.guidance), ("--convention", req.convention),
                            ("--sampler", req.sampler), ("--steps", req.steps)):
            if value is not None:
                raise UserError(f"{flag} does not apply to a run with diffusion.objective={objective} "
                                f"(it does not generate samples); drop {flag}")
    if req.inception_weights is not None and not Path(req.inception_weights).is_file():
        from ddpm.evaluate.fidelity import GET_WEIGHTS
        raise UserError(f"Inception weights {req.inception_weights} not found; {GET_WEIGHTS}")
    export = Path(req.export_npz) if req.export_npz else None
    if export is not None:
        if kind != "generative" or not {"grids", "metrics"} & set(parts):
            raise UserError("--export-npz writes the evaluation's samples, but this evaluation makes none; "
                            "include grids or metrics in --only (generative runs only)")
        if export.exists():
            raise UserError(f"--export-npz {export} already exists; pass a new file name")
        if not export.parent.is_dir():
            raise UserError(f"--export-npz {export}: directory {export.parent} does not exist; create it first")
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to run dir {run_dir}; evaluate a writable copy of it")
    device = _device(req.device)

    manager = CheckpointManager(run_dir / "checkpoints")
    if req.checkpoint == "latest" and not manager.steps():
        raise UserError(f"no checkpoint in {run_dir / 'checkpoints'} yet; train first, or pass --checkpoint PATH")
    step, state = manager.load(req.checkpoint)
    ckpt_path = Path(req.checkpoint) if req.checkpoint not in ("latest",) and not str(req.checkpoint).isdigit() \
        else run_dir / "checkpoints" / f"step_{step:09d}"
    has_ema = state.get("ema") is not None
    if req.ema and not has_ema:
        raise UserError(f"checkpoint step {step} has no EMA weights (trained with train.ema_decay=0); pass --no-ema")
    use_ema = (cfg.sample.ema and has_ema) if req.ema is None else req.ema
    net = load_net(cfg, state, use_ema, device, ckpt_path)
    notes = []
    if "curves" in parts and not (run_dir / "metrics.jsonl").is_file():
        if req.only is not None:
            raise UserError(f"no metrics.jsonl in {run_dir}, so no loss curves; leave curves out of --only")
        parts = tuple(p for p in parts if p != "curves")
        notes.append(f"no metrics.jsonl in {run_dir}: loss curves skipped")

    plan = Plan(run_dir=run_dir, cfg=cfg, kind=kind, step=step, checkpoint_path=ckpt_path, net=net, ema=use_ema,
                parts=parts, device=device, seed=cfg.sample.seed if req.seed is None else req.seed,
                per_class=req.per_class or cfg.sample.per_class, metric_samples=req.metric_samples,
                table_samples=req.table_samples, export_npz=export, notes=notes, fid_samples=req.fid_samples,
                clip_x0=cfg.sample.clip_x0 if req.clip_x0 is None else req.clip_x0)
    if kind == "generative":
        plan.conditional = bool(getattr(net, "num_classes", 0))
        _resolve_guidance(req, plan)
        _resolve_sampler(req, plan)
        if {"metrics", "steps", "fid"} & set(parts):
            _resolve_classifier(req, plan)
        if req.inception_weights is not None:
            from ddpm.data.datasets import load_dataset
            from ddpm.evaluate.fidelity import InceptionMetrics
            train, _ = load_dataset(cfg.data.dataset, cfg.data.root, train=True)  # the Inception reference
            plan.inception = InceptionMetrics(req.inception_weights, device, cfg.data.dataset, cfg.data.root,
                                              req.reference_images, split_size=len(train))
            if note := plan.inception.comparable_note():
                plan.notes.append(note)
        if "fid" in parts and plan.classifier is None and plan.inception is None:
            raise UserError(f"--fid-samples {req.fid_samples} would make samples that nothing scores: pass "
                            "--inception-weights PATH (FID, IS, KID, precision/recall), or --classifier PATH or "
                            f"train one (python -m jobs.train_classifier --dataset {cfg.data.dataset})")
    elif req.inception_weights is not None:
        raise UserError(f"--inception-weights scores generated samples; a {objective} run has none; drop it")
    else:
        from ddpm.data.datasets import load_dataset
        load_dataset(cfg.data.dataset, cfg.data.root, train=False)  # denoiser/classifier parts need the test set
    return plan
