"""N samples of a trained run for external metrics (FID on 50,000): sharded, resumable, any number of ranks.

A :class:`SampleSet` is one resolved request: the loaded run, one :class:`Sampling`, the seed and N, its
settings, its file ``RUN_DIR/samples/NAME.h5`` and its shard store. ``jobs.sample`` makes one from what
the user typed (:class:`SamplesArgs`, :func:`plan_samples`); ``jobs.evaluate --fid-samples`` one per
guidance scale (:func:`sample_set_for`), so either job reuses the other's files.

Sample i is a pure function of (seed, i) (:mod:`ddpm.diffusion.from_config`: its starting noise and a
stochastic sampler's per-step noise) and its label is ``i mod K`` (class-balanced). Shard k holds samples
[k·B, (k+1)·B) and is one sampler call; the result is bit-identical for any number of ranks (on the CPU)
and for any shard size. Rank r generates the uncommitted shards r, r+W, r+2W, ...; every commit is
atomic (:mod:`ddpm.run.shards`), so a killed or requeued job redoes only unfinished shards. Rank 0 then
assembles ``RUN_DIR/samples/NAME.h5`` and writes ``--npz`` / ``--png-dir`` (:func:`make_samples`).

Instead of classifier-free guidance a set may be guided by a noisy classifier (``--classifier-guidance``) or
toward a mixture of classes (``--mix``): a :mod:`ddpm.evaluate.guides` record, whose settings go with the samples.

The job passes in the process group's rank, size and barrier and the preemption flag (:class:`RankGroup`),
so this module stays below the training layer.
"""
import json
import os
import re
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from ddpm.diffusion.compiled import compile_for_sampling
from ddpm.diffusion.from_config import Sampling, objective_for
from ddpm.errors import REQUEUE_EXIT_CODE, UserError
from ddpm.evaluate.guides import ClassifierGuide, Mixture, load_classifier_guide, parse_mix, parse_scales, sample_with
from ddpm.evaluate.loaded_run import LoadedRun, load_run
from ddpm.evaluate.sampling_choice import choose_sampling
from ddpm.run.rundir import read_run_config
from ddpm.run.samples import export_npz, read_samples
from ddpm.run.shards import GROUP, ShardStore, differences, finished_settings

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class SamplesArgs:
    """``jobs.sample`` as typed (None: the run's default)."""
    run_dir: str
    num: int
    guidance: float | None = None
    convention: str | None = None
    sampler: str | None = None
    steps: int | None = None
    eta: float | None = None
    checkpoint: str = "latest"
    ema: bool | None = None
    seed: int | None = None
    batch: int = 250
    out: str | None = None
    png_dir: str | None = None
    npz: str | None = None
    device: str | None = None
    clip_x0: bool | None = None
    classifier_guidance: str | None = None  # a noisy-classifier run dir: classifier guidance instead of CFG
    cg_scale: float | None = None           # its scale (default 1)
    mix: str | None = None                  # "3:0.5,8:0.5": every sample guided toward this mix of classes


@dataclass(frozen=True, eq=False)
class SampleSet:
    """N samples of a loaded run with one sampling and seed, and where they go."""
    run: LoadedRun
    sampling: Sampling          # at the set's guidance scale (the neutral one for an unconditional net)
    seed: int
    settings: dict              # everything that determines the samples (stored with them)
    out: Path                   # RUN_DIR/samples/NAME.h5
    store: ShardStore
    finished: bool              # out already holds exactly this request
    png_dir: Path | None = None
    npz: Path | None = None
    guide: ClassifierGuide | Mixture | None = None  # instead of classifier-free guidance

    @property
    def num(self) -> int:
        return self.store.n


@dataclass(frozen=True)
class RankGroup:
    """This process's place among the ranks that share the shards, and how they wait and stop."""
    rank: int = 0
    size: int = 1
    barrier: Callable[[], None] = lambda: None
    stop_requested: Callable[[], bool] = lambda: False


def _writable_dir(path: Path, flag: str) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{flag} {path} is not a writable directory ({e.strerror or e}); pass another one") from None
    return path


def plan_samples(args: SamplesArgs) -> SampleSet:
    """Validate ``args``, load the net; raises UserError and writes nothing (but an empty --png-dir)."""
    if args.num < 1:
        raise UserError(f"--num must be >= 1, got {args.num}")
    if args.batch < 1:
        raise UserError(f"--batch must be >= 1, got {args.batch}")
    if args.out is not None and not NAME.fullmatch(args.out):
        raise UserError(f"--out {args.out!r} must be a plain name (letters, digits, . _ -); it becomes "
                        "RUN_DIR/samples/NAME.h5")
    npz = Path(args.npz) if args.npz else None
    if npz is not None and not npz.parent.is_dir():
        raise UserError(f"--npz {npz}: directory {npz.parent} does not exist; create it first")
    run_dir = Path(args.run_dir)
    cfg = read_run_config(run_dir)
    if objective_for(cfg).kind != "generative":
        raise UserError(f"{args.run_dir} is a {cfg.diffusion.objective} run: it does not generate samples")
    _check_guides(args)
    run = load_run(run_dir, cfg, checkpoint=args.checkpoint, ema=args.ema, device=args.device)
    choice = choose_sampling(run, guidance=None if args.guidance is None else [args.guidance],
                             convention=args.convention, sampler=args.sampler, steps=args.steps,
                             clip_x0=args.clip_x0, eta=args.eta)
    guide = None
    if args.classifier_guidance is not None:
        guide = load_classifier_guide(run, args.classifier_guidance, 1.0 if args.cg_scale is None else args.cg_scale)
    elif args.mix is not None:
        if not run.conditional:
            raise UserError("this run's model is unconditional (no model.num_classes): --mix needs a "
                            "class-conditional run")
        guide = parse_mix(args.mix, cfg.data.dataset)
    samples = sample_set_for(run, choice.main, cfg.sample.seed if args.seed is None else args.seed, args.num,
                             args.batch, args.out, guide)
    if npz is not None and npz.exists():
        raise UserError(f"--npz {npz} already exists; pass a new file name")
    png_dir = _writable_dir(Path(args.png_dir), "--png-dir") if args.png_dir else None
    return replace(samples, npz=npz, png_dir=png_dir)


def _check_guides(args: SamplesArgs) -> None:
    """The guidance options that need no checkpoint: one kind of guidance at a time, scales that are numbers."""
    given = [f for f, v in (("--guidance", args.guidance), ("--classifier-guidance", args.classifier_guidance),
                            ("--mix", args.mix)) if v is not None]
    if len(given) > 1:
        raise UserError(f"{' and '.join(given)} are different kinds of guidance; pass one of them")
    if args.cg_scale is not None:
        if args.classifier_guidance is None:
            raise UserError("--cg-scale sets the scale of classifier guidance; pass --classifier-guidance RUN_DIR too")
        parse_scales(repr(args.cg_scale))


def sample_set_for(run: LoadedRun, sampling: Sampling, seed: int, num: int, batch: int = 250,
                   out: str | None = None, guide: ClassifierGuide | Mixture | None = None) -> SampleSet:
    """``num`` samples of ``run`` with ``sampling`` and ``seed`` (and ``guide`` instead of classifier-free
    guidance), named ``out`` (default: from the settings); UserError if RUN_DIR/samples already holds a
    request of that name with other settings."""
    cfg, s = run.cfg, sampling
    cond = run.conditional and guide is None  # classifier-free guidance at s.guidance
    labelled = run.conditional if guide is None else guide.needs_labels  # class-balanced labels: i mod classes
    settings = dict(run=cfg.name, config_hash=cfg.hash(), dataset=cfg.data.dataset, step=run.step, ema=run.ema,
                    conditional=cond, guidance=s.guidance if cond else None, convention=s.convention if cond else None,
                    sampler=s.sampler, steps=s.steps, clip_x0=s.clip_x0, seed=seed, num=num,
                    labels="i mod classes" if labelled else "none")
    if s.eta:  # only then: the files of deterministic requests keep the settings they were made with
        settings["eta"] = s.eta
    if guide is not None:  # likewise: only requests with another guidance carry its settings
        settings.update(guide.settings())
    tag = f"_{s.convention}_{s.guidance:g}" if cond else f"_{guide.name}" if guide is not None else ""
    name = out or (f"step_{run.step:09d}{tag}_{s.sampler}{s.steps}{f'_eta{s.eta:g}' if s.eta else ''}"
                   f"{'' if run.ema else '_raw'}{'_clip' if s.clip_x0 else ''}_n{num}_seed{seed}")
    path = run.run_dir / "samples" / f"{name}.h5"
    old = finished_settings(path)
    if old is not None and differences(old, settings):
        raise UserError(f"{path} holds samples made with other settings (differs in "
                        f"{', '.join(differences(old, settings))}); move it away, or pass jobs.sample another --out NAME")
    store = ShardStore(run.run_dir / "samples" / f"{name}.shards", num, batch)
    store.check(settings, "pass the same settings to finish it, or jobs.sample another --out NAME")
    return SampleSet(run, s, seed, settings, path, store, old is not None, guide=guide)


def _write_extras(samples: SampleSet, log) -> None:
    if samples.npz is not None:
        export_npz(samples.out, samples.npz, [GROUP])
        log(f"npz: {samples.npz} (arr_0 images uint8 NHWC, arr_1 labels)")
    if samples.png_dir is not None:
        from PIL import Image

        images, labels, _ = read_samples(samples.out, GROUP)
        for i, img in enumerate(images):
            Image.fromarray(img[..., 0] if img.shape[2] == 1 else img).save(samples.png_dir / f"{i:06d}.png")
        log(f"png: {len(images)} files {samples.png_dir}/000000.png ... (labels in {samples.out})")


def sampling_model(run: LoadedRun):
    """The run's net for sampling, compiled once on CUDA (bf16, CUDA graphs) without the guidance scale
    inside (classifier_free_guidance wraps it outside): pass it to every set of the same net."""
    return compile_for_sampling(run.objective.denoiser(run.net), run.device)


def make_samples(samples: SampleSet, ranks: RankGroup = RankGroup(), log=print, model=None) -> int:
    """Generate this rank's missing shards, then (rank 0) assemble and export. Returns 0 when the set is
    complete, ``REQUEUE_EXIT_CODE`` when a stop was requested between shards (rerun to finish).
    Rank 0 speaks for all: the other ranks only ``log`` that they stopped. ``model``: :func:`sampling_model`
    of the run, made once for several sets of the same net (default: made here)."""
    run, store, s, rank = samples.run, samples.store, samples.settings, ranks.rank
    what = (f"{s['num']} samples of {run.run_dir} at step {s['step']} ({'EMA' if s['ema'] else 'raw'}), "
            f"{s['sampler']} {s['steps']} steps" + (f", eta {s['eta']:g}" if s.get("eta") else "")
            + (f", {s['convention']}={s['guidance']:g}" if s["conditional"] else "")
            + (f", classifier guidance s={s['cg_scale']:g} by {s['classifier_guidance']}" if "cg_scale" in s else "")
            + (f", mix {s['mix']}" if "mix" in s else ""))
    if samples.finished:
        if rank == 0:
            log(f"already complete: {samples.out} holds {what}; nothing to generate")
            _write_extras(samples, log)
        return 0
    if rank == 0:
        store.begin(s)
    ranks.barrier()
    mine = range(rank, store.count, ranks.size)
    todo = [k for k in mine if not store.done(k)]
    if rank == 0:
        log(f"sampling {what}: {store.count} shards of {store.size}, {ranks.size} rank(s); this rank: "
            f"{len(mine) - len(todo)} of its {len(mine)} shards already committed")
    model = model if model is not None else sampling_model(run)
    t0, made = time.perf_counter(), 0
    # A bar in a terminal; one line per shard in batch logs (rank 0 speaks for all).
    bar = tqdm(total=sum(len(store.indices(k)) for k in todo), unit="sample", disable=rank != 0 or not sys.stdout.isatty())
    for j, k in enumerate(todo):
        if ranks.stop_requested():
            log(f"rank {rank}: stop requested; {j} of {len(todo)} shards done, the rerun continues "
                f"(exit {REQUEUE_EXIT_CODE})")
            return REQUEUE_EXIT_CODE
        idx = store.indices(k)
        labels = torch.arange(idx.start, idx.stop) % run.num_classes if s["labels"] != "none" else None
        x = sample_with(model, run, samples.sampling, labels, samples.guide, seed=samples.seed, indices=idx)
        store.commit(k, run.to_u8(x), (labels if labels is not None else torch.full((len(idx),), -1)).numpy())
        made += len(idx)
        bar.update(len(idx))
        if rank == 0 and bar.disable:
            rate = made / (time.perf_counter() - t0)
            log(f"shard {k + 1}/{store.count} committed · rank 0: {j + 1}/{len(todo)} · {rate:.1f} samples/s")
    bar.close()
    if rank == 0 and made:
        log(f"rank 0 generated {made} samples in {time.perf_counter() - t0:.1f} s "
            f"({made / (time.perf_counter() - t0):.1f} samples/s per rank)")
    ranks.barrier()
    if rank == 0:
        missing = [k for k in range(store.count) if not store.done(k)]
        if missing:  # another rank stopped early
            log(f"{len(missing)} shards still missing (another rank stopped); rerun to finish")
            return REQUEUE_EXIT_CODE
        n = store.assemble(samples.out, {**{k: v for k, v in s.items() if v is not None},
                                         "settings": json.dumps(s, sort_keys=True)})
        log(f"done: {n} samples in {samples.out} (group '{GROUP}')")
        _write_extras(samples, log)
    ranks.barrier()
    return 0
