"""N samples of a trained run for external metrics (FID on 50,000): sharded, resumable, any number of ranks.

Sample i is a pure function of (seed, i) (:mod:`ddpm.diffusion.from_config`: its starting noise and a
stochastic sampler's per-step noise) and its label is ``i mod K`` (class-balanced). Shard k holds samples
[k·B, (k+1)·B) and is one sampler call; the result is bit-identical for any number of ranks (on the CPU)
and for any shard size. Rank r generates the uncommitted shards r, r+W, r+2W, ...; every commit is
atomic (:mod:`ddpm.run.shards`), so a killed or requeued job redoes only unfinished shards. Rank 0 then
assembles ``RUN_DIR/samples/NAME.h5`` and writes ``--npz`` / ``--png-dir``.

The job (``jobs.sample``) passes in the process group's rank, size and barrier and the preemption flag,
so this module stays below the training layer.
"""
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ddpm.data.datasets import DATASETS
from ddpm.diffusion.compiled import compile_for_sampling
from ddpm.diffusion.from_config import Sampling, generate, objective_for
from ddpm.errors import REQUEUE_EXIT_CODE, UserError
from ddpm.evaluate.plan import Request, make_plan
from ddpm.run.samples import export_npz, read_samples
from ddpm.run.shards import GROUP, ShardStore, differences, finished_settings

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass
class SampleRequest:
    """What the user asked for (None = the run's default)."""
    run_dir: str
    num: int
    guidance: float | None = None
    convention: str | None = None
    sampler: str | None = None
    steps: int | None = None
    checkpoint: str = "latest"
    ema: bool | None = None
    seed: int | None = None
    batch: int = 250
    out: str | None = None
    png_dir: str | None = None
    npz: str | None = None
    device: str | None = None
    clip_x0: bool | None = None


@dataclass
class SamplePlan:
    plan: object          # ddpm.evaluate.plan.Plan: the run, its config, the loaded net, sampler, guidance
    settings: dict        # everything that determines the samples (stored with them)
    out: Path             # RUN_DIR/samples/NAME.h5
    store: ShardStore
    finished: bool        # out already holds exactly this request
    png_dir: Path | None
    npz: Path | None


def _writable_dir(path: Path, flag: str) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{flag} {path} is not a writable directory ({e.strerror or e}); pass another one") from None
    return path


def plan_request(req: SampleRequest) -> SamplePlan:
    """Validate ``req``, load the net; raises UserError and writes nothing (but an empty --png-dir)."""
    if req.num < 1:
        raise UserError(f"--num must be >= 1, got {req.num}")
    if req.batch < 1:
        raise UserError(f"--batch must be >= 1, got {req.batch}")
    if req.out is not None and not NAME.fullmatch(req.out):
        raise UserError(f"--out {req.out!r} must be a plain name (letters, digits, . _ -); it becomes "
                        "RUN_DIR/samples/NAME.h5")
    npz = Path(req.npz) if req.npz else None
    if npz is not None and not npz.parent.is_dir():
        raise UserError(f"--npz {npz}: directory {npz.parent} does not exist; create it first")
    plan = make_plan(Request(run_dir=req.run_dir, checkpoint=req.checkpoint, ema=req.ema,
                             guidance=None if req.guidance is None else repr(float(req.guidance)),
                             convention=req.convention, sampler=req.sampler, steps=req.steps, seed=req.seed,
                             device=req.device, only="grids", clip_x0=req.clip_x0))
    if plan.kind != "generative":
        raise UserError(f"{req.run_dir} is a {plan.cfg.diffusion.objective} run: it does not generate samples")
    if req.guidance is None:
        scale = plan.display_scale
    elif len(plan.scales) != 1:
        raise UserError(f"--guidance takes one scale, got {req.guidance}")
    else:
        scale = plan.scales[0]
    sp = sample_plan(plan, scale, req.num, req.batch, req.out)
    if npz is not None and npz.exists():
        raise UserError(f"--npz {npz} already exists; pass a new file name")
    sp.npz = npz
    sp.png_dir = _writable_dir(Path(req.png_dir), "--png-dir") if req.png_dir else None
    return sp


def fid_requests(plan, num: int) -> list[SamplePlan]:
    """jobs.evaluate --fid-samples: one request of ``num`` samples per guidance scale of ``plan``, with the
    plan's sampler, seed and weights and jobs.sample's default names (either job reuses the other's files)."""
    return [sample_plan(plan, scale, num) for scale in plan.scales]


def sample_plan(plan, scale: float, num: int, batch: int = 250, out: str | None = None) -> SamplePlan:
    """The request for ``num`` samples of an evaluation plan's net at ``scale``; UserError if
    RUN_DIR/samples already holds a request of that name with other settings."""
    cfg = plan.cfg
    settings = dict(run=cfg.name, config_hash=cfg.hash(), dataset=cfg.data.dataset, step=plan.step,
                    ema=plan.ema, conditional=plan.conditional, guidance=scale if plan.conditional else None,
                    convention=plan.convention if plan.conditional else None, sampler=plan.sampler,
                    steps=plan.steps, clip_x0=plan.clip_x0, seed=plan.seed, num=num,
                    labels="i mod classes" if plan.conditional else "none")
    guide = f"_{plan.convention}_{scale:g}" if plan.conditional else ""
    name = out or (f"step_{plan.step:09d}{guide}_{plan.sampler}{plan.steps}"
                   f"{'' if plan.ema else '_raw'}{'_clip' if plan.clip_x0 else ''}_n{num}_seed{plan.seed}")
    path = plan.run_dir / "samples" / f"{name}.h5"
    old = finished_settings(path)
    if old is not None and differences(old, settings):
        raise UserError(f"{path} holds samples made with other settings (differs in "
                        f"{', '.join(differences(old, settings))}); move it away, or pass jobs.sample another --out NAME")
    store = ShardStore(plan.run_dir / "samples" / f"{name}.shards", num, batch)
    store.check(settings, "pass the same settings to finish it, or jobs.sample another --out NAME")
    return SamplePlan(plan, settings, path, store, old is not None, None, None)


def _write_extras(sp: SamplePlan, log) -> None:
    if sp.npz is not None:
        export_npz(sp.out, sp.npz, [GROUP])
        log(f"npz: {sp.npz} (arr_0 images uint8 NHWC, arr_1 labels)")
    if sp.png_dir is not None:
        from PIL import Image

        images, labels, _ = read_samples(sp.out, GROUP)
        for i, img in enumerate(images):
            Image.fromarray(img[..., 0] if img.shape[2] == 1 else img).save(sp.png_dir / f"{i:06d}.png")
        log(f"png: {len(images)} files {sp.png_dir}/000000.png ... (labels in {sp.out})")


def fast_model(plan):
    """The plan's net for sampling, compiled once on CUDA (bf16, CUDA graphs) without the guidance scale
    inside (classifier_free_guidance wraps it outside): pass it to every request of the same net."""
    return compile_for_sampling(objective_for(plan.cfg).denoiser(plan.net), plan.device)


def run_request(sp: SamplePlan, rank: int = 0, world_size: int = 1, barrier=lambda: None,
                stop_requested=lambda: False, log=print, model=None) -> int:
    """Generate this rank's missing shards, then (rank 0) assemble and export. Returns 0 when the request
    is complete, ``REQUEUE_EXIT_CODE`` when a stop was requested between shards (rerun to finish).
    Rank 0 speaks for all: the other ranks only ``log`` that they stopped. ``model``: :func:`fast_model` of
    the plan, made once for several requests of the same net (default: made here)."""
    plan, store, s = sp.plan, sp.store, sp.settings
    what = (f"{s['num']} samples of {plan.run_dir} at step {s['step']} ({'EMA' if s['ema'] else 'raw'}), "
            f"{s['sampler']} {s['steps']} steps" + (f", {s['convention']}={s['guidance']:g}" if s["conditional"] else ""))
    if sp.finished:
        if rank == 0:
            log(f"already complete: {sp.out} holds {what}; nothing to generate")
            _write_extras(sp, log)
        return 0
    if rank == 0:
        store.begin(s)
    barrier()
    mine = range(rank, store.count, world_size)
    todo = [k for k in mine if not store.done(k)]
    if rank == 0:
        log(f"sampling {what}: {store.count} shards of {store.size}, {world_size} rank(s); this rank: "
            f"{len(mine) - len(todo)} of its {len(mine)} shards already committed")
    fast = model if model is not None else fast_model(plan)
    spec = Sampling(plan.sampler, plan.steps, s["guidance"] if plan.conditional else 1.0, plan.convention, plan.clip_x0)
    num_classes = DATASETS[plan.cfg.data.dataset]["classes"]
    t0, made = time.perf_counter(), 0
    # A bar in a terminal; one line per shard in batch logs (rank 0 speaks for all).
    bar = tqdm(total=sum(len(store.indices(k)) for k in todo), unit="sample", disable=rank != 0 or not sys.stdout.isatty())
    for j, k in enumerate(todo):
        if stop_requested():
            log(f"rank {rank}: stop requested; {j} of {len(todo)} shards done, the rerun continues "
                f"(exit {REQUEUE_EXIT_CODE})")
            return REQUEUE_EXIT_CODE
        idx = store.indices(k)
        labels = torch.arange(idx.start, idx.stop) % num_classes if plan.conditional else None
        x = generate(fast, plan.cfg, spec, labels, seed=plan.seed, indices=idx, device=plan.device)
        store.commit(k, plan.to_u8(x), (labels if labels is not None else torch.full((len(idx),), -1)).numpy())
        made += len(idx)
        bar.update(len(idx))
        if rank == 0 and bar.disable:
            rate = made / (time.perf_counter() - t0)
            log(f"shard {k + 1}/{store.count} committed · rank 0: {j + 1}/{len(todo)} · {rate:.1f} samples/s")
    bar.close()
    if rank == 0 and made:
        log(f"rank 0 generated {made} samples in {time.perf_counter() - t0:.1f} s "
            f"({made / (time.perf_counter() - t0):.1f} samples/s per rank)")
    barrier()
    if rank == 0:
        missing = [k for k in range(store.count) if not store.done(k)]
        if missing:  # another rank stopped early
            log(f"{len(missing)} shards still missing (another rank stopped); rerun to finish")
            return REQUEUE_EXIT_CODE
        n = store.assemble(sp.out, {**{k: v for k, v in s.items() if v is not None},
                                    "settings": json.dumps(s, sort_keys=True)})
        log(f"done: {n} samples in {sp.out} (group '{GROUP}')")
        _write_extras(sp, log)
    barrier()
    return 0
