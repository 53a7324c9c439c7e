"""The evaluation job's first half: what the user typed (:class:`EvaluationArgs`) → a frozen
:class:`Evaluation` that writes nothing.

:func:`plan_evaluation` checks everything (run dir, checkpoint, guidance list, sampler, steps, classifier
and Inception weights, output paths, the ``--fid-samples`` files) and loads the model, but writes nothing
into the run dir: a bad request fails with a :class:`UserError` before any output exists. The evaluation
is composed of the resolvers' records: the run (:mod:`~ddpm.evaluate.loaded_run`), the sampling choice
(:mod:`~ddpm.evaluate.sampling_choice`), the scorers (:mod:`~ddpm.evaluate.scorers`) and the sample sets
of ``--fid-samples`` (:mod:`~ddpm.evaluate.sample_sets`). :func:`ddpm.evaluate.parts.run_parts` then does
the work. Evaluation never imports the training loop.
"""
from dataclasses import dataclass
from pathlib import Path

from ddpm.diffusion.from_config import objective_for
from ddpm.diffusion.samplers import to_gamma
from ddpm.errors import UserError
from ddpm.evaluate.guides import (
    ClassifierGuide,
    Mixture,
    default_mixture,
    load_classifier_guide,
    parse_mix,
    parse_scales,
)
from ddpm.evaluate.loaded_run import LoadedRun, load_run
from ddpm.evaluate.parts import PARTS, parse_only
from ddpm.evaluate.sample_sets import SampleSet, sample_set_for
from ddpm.evaluate.sampling_choice import SamplingChoice, choose_sampling, parse_guidance
from ddpm.evaluate.scorers import Scorers, choose_scorers
from ddpm.run.rundir import read_run_config


@dataclass(frozen=True)
class EvaluationArgs:
    """``jobs.evaluate`` as typed (None: the run's default)."""
    run_dir: str
    checkpoint: str = "latest"
    ema: bool | None = None
    guidance: str | None = None
    convention: str | None = None
    sampler: str | None = None
    steps: int | None = None
    eta: float | None = None
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
    classifier_guidance: str | None = None  # a noisy-classifier run dir: the cg part
    cg_scales: str | None = None            # its scales, e.g. "1,3,10" (default DEFAULT_CG_SCALES)
    mix: str | None = None                  # "3:0.5,8:0.5": the mixture part's mix (default: default_mixture)


DEFAULT_CG_SCALES = "1,3,10"


@dataclass(frozen=True, eq=False)
class Evaluation:
    """A validated evaluation: every default resolved, the model loaded, nothing written yet."""
    run: LoadedRun
    parts: tuple[str, ...]                  # --only names, in the order of PARTS
    seed: int
    scorers: Scorers
    sampling: SamplingChoice | None = None  # None: the run makes no samples (denoiser, noisy classifier)
    fid_sets: tuple[SampleSet, ...] = ()    # --fid-samples: one set per guidance scale
    per_class: int = 4                      # samples per class in the per-scale grids
    metric_samples: int = 100               # per scale for the scores; test images for the measured parts
    table_samples: int = 20                 # per row of the steps table
    export_npz: Path | None = None
    notes: tuple[str, ...] = ()             # warnings for the user (printed and in the report)
    guide: ClassifierGuide | None = None    # --classifier-guidance: the noisy classifier (the cg part)
    cg_scales: tuple[float, ...] = ()       # its scales
    mixture: Mixture | None = None          # the mixture part's mix (conditional runs)

    @property
    def out_dir(self) -> Path:
        return self.run.run_dir / "eval" / f"step_{self.run.step:09d}"

    @property
    def group_prefix(self) -> str:
        return f"eval/step_{self.run.step:09d}"

    @property
    def display_scale(self) -> float | None:
        """The guidance scale of the single-scale figures (None without samples)."""
        return self.sampling.display_scale if self.sampling else None


def _at_least(name: str, value, low: int = 1) -> None:
    if value is not None and value < low:
        raise UserError(f"{name} must be >= {low}, got {value}")


def _parts(args: EvaluationArgs, kind: str, objective: str) -> tuple[str, ...]:
    """The parts to run: --only (or all of the run's kind), with fid exactly when --fid-samples is given, cg
    exactly when --classifier-guidance is, and mixture whenever --mix is."""
    _at_least("--fid-samples", args.fid_samples)
    if args.fid_samples is not None and kind != "generative":
        raise UserError(f"--fid-samples scores generated samples; a {objective} run has none; drop it")
    parts = set(parse_only(args.only, kind, objective))
    on_request = {  # part: (its option given, what --only PART without it says)
        "fid": (args.fid_samples is not None, "--only fid scores --fid-samples N samples per scale; pass "
                                              "--fid-samples, e.g. 50000"),
        "cg": (args.classifier_guidance is not None, "--only cg compares classifier guidance with classifier-free "
               "guidance; pass --classifier-guidance RUN_DIR (a noisy-classifier run)")}
    for part, (given, missing) in on_request.items():
        if given:
            parts.add(part)
        elif part in parts and args.only is not None:
            raise UserError(missing)
        else:
            parts.discard(part)
    if args.cg_scales is not None and args.classifier_guidance is None:
        raise UserError("--cg-scale sets the scales of classifier guidance; pass --classifier-guidance RUN_DIR too")
    if args.mix is not None:
        parts.add("mixture")
    return tuple(p for p in PARTS if p in parts)


def _check_args(args: EvaluationArgs, kind: str, objective: str, parts: tuple) -> Path | None:
    """The checks that need no checkpoint; returns the --export-npz path."""
    for name, value in (("--per-class", args.per_class), ("--metric-samples", args.metric_samples),
                        ("--table-samples", args.table_samples), ("--fast-steps", args.fast_steps)):
        _at_least(name, value)
    _at_least("--reference-images", args.reference_images, 2)
    if kind != "generative":
        for flag, value in (("--guidance", args.guidance), ("--convention", args.convention),
                            ("--sampler", args.sampler), ("--steps", args.steps), ("--eta", args.eta),
                            ("--classifier-guidance", args.classifier_guidance), ("--cg-scale", args.cg_scales),
                            ("--mix", args.mix)):
            if value is not None:
                raise UserError(f"{flag} does not apply to a run with diffusion.objective={objective} "
                                f"(it does not generate samples); drop {flag}")
    if args.inception_weights is not None and not Path(args.inception_weights).is_file():
        from ddpm.evaluate.fidelity import GET_WEIGHTS
        raise UserError(f"Inception weights {args.inception_weights} not found; {GET_WEIGHTS}")
    export = Path(args.export_npz) if args.export_npz else None
    if export is not None:
        if kind != "generative" or not {"grids", "metrics"} & set(parts):
            raise UserError("--export-npz writes the evaluation's samples, but this evaluation makes none; "
                            "include grids or metrics in --only (generative runs only)")
        if export.exists():
            raise UserError(f"--export-npz {export} already exists; pass a new file name")
        if not export.parent.is_dir():
            raise UserError(f"--export-npz {export}: directory {export.parent} does not exist; create it first")
    return export


def _without_missing_curves(args: EvaluationArgs, run_dir: Path, parts: tuple) -> tuple[tuple, tuple]:
    """(parts, notes): a run without metrics.jsonl has no loss curves (an error only if --only asks for them)."""
    if "curves" not in parts or (run_dir / "metrics.jsonl").is_file():
        return parts, ()
    if args.only is not None:
        raise UserError(f"no metrics.jsonl in {run_dir}, so no loss curves; leave curves out of --only")
    return tuple(p for p in parts if p != "curves"), (f"no metrics.jsonl in {run_dir}: loss curves skipped",)


def plan_evaluation(args: EvaluationArgs) -> Evaluation:
    """Validate ``args`` and resolve every default; raises UserError and writes nothing in the run dir."""
    run_dir = Path(args.run_dir)
    cfg = read_run_config(run_dir)
    objective, kind = cfg.diffusion.objective, objective_for(cfg).kind  # the name only for messages
    parts = _parts(args, kind, objective)
    export = _check_args(args, kind, objective, parts)
    run = load_run(run_dir, cfg, checkpoint=args.checkpoint, ema=args.ema, device=args.device)
    parts, notes = _without_missing_curves(args, run_dir, parts)
    seed = cfg.sample.seed if args.seed is None else args.seed
    sizes = dict(per_class=args.per_class or cfg.sample.per_class, metric_samples=args.metric_samples,
                 table_samples=args.table_samples)

    if kind != "generative":
        if args.inception_weights is not None:
            raise UserError(f"--inception-weights scores generated samples; a {objective} run has none; drop it")
        from ddpm.data.datasets import load_dataset
        load_dataset(cfg.data.dataset, cfg.data.root, train=False)  # denoiser/classifier parts need the test set
        return Evaluation(run, parts, seed, Scorers(run.device), notes=notes, **sizes)

    sampling = choose_sampling(run, guidance=None if args.guidance is None else parse_guidance(args.guidance),
                               convention=args.convention, sampler=args.sampler, steps=args.steps,
                               clip_x0=args.clip_x0, eta=args.eta, fast_steps=args.fast_steps)
    guides = _guides(args, run, parts, to_gamma(sampling.display_scale, sampling.convention))
    parts = tuple(p for p in parts if p != "mixture" or guides["mixture"] is not None)
    scorers = choose_scorers(cfg, run.device, classifier=args.classifier,
                             use_classifier=bool({"metrics", "steps", "fid", "cg", "mixture"} & set(parts)),
                             inception_weights=args.inception_weights, reference_images=args.reference_images)
    if scorers.inception is not None and (note := scorers.inception.comparable_note()):
        notes += (note,)
    fid_sets = ()
    if "fid" in parts:
        if not scorers.any:
            raise UserError(f"--fid-samples {args.fid_samples} would make samples that nothing scores: pass "
                            "--inception-weights PATH (FID, IS, KID, precision/recall), or --classifier PATH or "
                            f"train one (python -m jobs.train_classifier --dataset {cfg.data.dataset})")
        # jobs.sample's default names: either job reuses the other's files
        fid_sets = tuple(sample_set_for(run, sampling.at(scale), seed, args.fid_samples) for scale in sampling.scales)
    return Evaluation(run, parts, seed, scorers, sampling, fid_sets, export_npz=export, notes=notes, **guides, **sizes)


def _guides(args: EvaluationArgs, run: LoadedRun, parts: tuple, gamma: float) -> dict:
    """{"guide", "cg_scales", "mixture"} of the Evaluation: the noisy classifier (checked against the run) and
    its scales for the cg part; the mix of the mixture part (None where it does not run: an unconditional
    run, unless the user asked for it, which is an error then)."""
    out = {"guide": None, "cg_scales": (), "mixture": None}
    if args.classifier_guidance is not None:
        out["cg_scales"] = parse_scales(args.cg_scales if args.cg_scales is not None else DEFAULT_CG_SCALES)
        out["guide"] = load_classifier_guide(run, args.classifier_guidance)
    if "mixture" in parts:
        if not run.conditional:
            asked = args.only is not None and "mixture" in [p.strip() for p in args.only.split(",")]
            if args.mix is not None or asked:
                raise UserError("this run's model is unconditional (no model.num_classes): a mixture of classes needs "
                                "a class-conditional run; drop --mix / mixture")
            return out
        out["mixture"] = parse_mix(args.mix, run.cfg.data.dataset) if args.mix else default_mixture(run, gamma)
    return out
