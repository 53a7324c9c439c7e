"""The evaluation parts that run a sampler (see :mod:`ddpm.evaluate.parts` for the table): each takes
(evaluation, out_dir, log, done), writes its figures into out_dir and returns a JSON-ready section for
``metrics.json``. They sample with the evaluation's :class:`~ddpm.evaluate.sampling_choice.SamplingChoice`
and score with its :class:`~ddpm.evaluate.scorers.Scorers`.

Guidance sweep (grids, archive, accuracy / feature-FID / Inception), progression across checkpoints,
denoising GIFs, sampler steps vs quality, slerp interpolation. The parts that need no sampler (loss
curves, one-step denoiser and noisy-classifier runs) are in :mod:`ddpm.evaluate.measured`.
"""
import math
import time
from dataclasses import replace

import numpy as np
import torch

from ddpm.data.datasets import DATASETS
from ddpm.data.images import make_grid
from ddpm.diffusion.from_config import Sampling, network_evaluations
from ddpm.diffusion.samplers import slerp, to_gamma
from ddpm.evaluate import figures
from ddpm.evaluate.guides import sample_with
from ddpm.evaluate.sampling_choice import table_steps, takes_eta
from ddpm.run.checkpoints import CheckpointManager
from ddpm.run.evaluations import convention_symbol
from ddpm.run.grids import grid_figure
from ddpm.run.samples import read_samples, write_samples
from ddpm.run.shards import GROUP

CHUNK = 1000                  # images per sampler call (bounded memory)
PROGRESS_S = 60.0             # a guidance scale that samples longer than this reports its progress this often
MAX_PROGRESSION = 8           # checkpoints shown in the progression figure
MAX_GIF_FRAMES = 40
STATIC_COLUMNS = 8            # trajectory snapshots in the static denoising figures
INTERP_ROWS, INTERP_COLS = 5, 8


# ---- shared helpers ------------------------------------------------------------------------------

def class_names(ev) -> list[str]:
    """Row labels of class-conditional grids: CIFAR-10's "airplane", "automobile", ...; MNIST's digits."""
    return list(DATASETS[ev.run.cfg.data.dataset]["class_names"])


def sample(ev, net, spec: Sampling, labels, n, x_T=None, callback=None, guide=None):
    """Samples 0 .. n-1 of ``spec`` with the evaluation's seed (model space), made CHUNK at a time (bounded
    memory; sample i does not depend on the chunk it is made in). ``guide``: a
    :mod:`ddpm.evaluate.guides` record (classifier guidance, a mixture) instead of classifier-free guidance."""
    run = ev.run
    model = run.objective.denoiser(net)
    parts = []
    for lo in range(0, n, CHUNK):
        hi = min(n, lo + CHUNK)
        parts.append(sample_with(model, run, spec, None if labels is None else labels[lo:hi], guide, seed=ev.seed,
                                 indices=range(lo, hi), x=None if x_T is None else x_T[lo:hi],
                                 callback=callback).cpu())
    return torch.cat(parts)


def symbol(ev) -> str:
    return convention_symbol(ev.sampling.convention)


def _guide_line(ev, scale=None) -> str:
    ch = ev.sampling
    if not ch.conditional:
        guide = "unconditional model (no guidance)"
    elif ch.convention == "gamma":
        guide = "guidance convention γ (γ=1 conditional, γ=0 unconditional)"
    else:
        guide = "guidance convention w (w=0 conditional, w=−1 unconditional)"
    return guide + (f" · {symbol(ev)}={scale:g}" if scale is not None and ch.conditional else "")


def sampler_line(ev, spec: Sampling, scale=None, guide: str | None = None) -> str:
    """'sampler ddim 20 steps, x0 clipped · guidance convention γ (...) · γ=3' (``guide``: another guidance)."""
    return f"sampler {spec.describe()} · {guide or _guide_line(ev, scale)}"


HEADLINE = (("inception_fid", "FID"), ("inception_score", "IS"), ("kid", "KID"), ("precision", "precision"),
            ("recall", "recall"), ("accuracy", "accuracy"), ("feature_fid", "feature-FID"))


def fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


# ---- generative runs -----------------------------------------------------------------------------

def step_progress(log, name: str, total: int):
    """A sampler callback for ``total`` sampler steps in all (over every chunk) that logs '  NAME: step k/total
    · E s · about R s left' at most once per PROGRESS_S seconds: a CPU evaluation can spend half an hour on one
    guidance scale, a GPU one is done before it speaks."""
    start = last = time.perf_counter()
    every = PROGRESS_S
    done = 0

    def callback(k, t, x, x0):
        nonlocal last, done
        done += 1
        now = time.perf_counter()
        if now - last >= every and done < total:
            last = now
            log(f"  {name}: step {done}/{total} · {now - start:.0f} s · about "
                f"{(now - start) * (total - done) / done:.0f} s left")
    return callback


def guidance_part(ev, out, log, done=None) -> dict:
    """Samples per guidance scale → archive groups, per-scale grids, the guidance grid, scores."""
    run, ch = ev.run, ev.sampling
    n_cls, cond = run.num_classes, ch.conditional
    k = max(ev.per_class, math.ceil(ev.metric_samples / n_cls))
    labels = torch.arange(n_cls).repeat_interleave(k) if cond else None
    n, h5 = n_cls * k, run.run_dir / "samples.h5"
    rows, figs, groups, firsts = [], [], [], []
    draw = "grids" in ev.parts
    for scale in ch.scales:
        spec = ch.at(scale)
        name = f"{ch.convention}_{scale:g}" if cond else "uncond"
        t0 = time.perf_counter()
        progress = step_progress(log, name, spec.steps * math.ceil(n / CHUNK))
        u8 = run.to_u8(sample(ev, run.net, spec, labels, n, callback=progress))
        wall = time.perf_counter() - t0
        group = f"{ev.group_prefix}/{name}"
        stored = labels.numpy() if labels is not None else np.full(n, -1)
        write_samples(h5, group, u8, stored, dict(
            step=run.step, sampler=spec.sampler, steps=spec.steps, eta=spec.eta if spec.eta else None, seed=ev.seed,
            ema=run.ema, config_hash=run.cfg.hash(), guidance_scale=scale if cond else None,
            guidance_convention=ch.convention if cond else None,
            gamma=to_gamma(scale, ch.convention) if cond else None,
            checkpoint=str(run.checkpoint_path), per_class=k, labels="requested class" if cond
            else "none (-1): unconditional model"))
        groups.append(group)
        row = {"scale": scale, "gamma": to_gamma(scale, ch.convention) if cond else None, "n": n,
               "group": group, "wall_s": round(wall, 3), **ev.scorers.score(u8, labels)}
        rows.append(row)
        log(f"  {name}: {n} samples in {wall:.1f} s · accuracy {fmt(row['accuracy'])} · "
            f"feature-FID {fmt(row['feature_fid'])}")
        firsts.append(u8[::k])
        if draw and cond:  # rows: classes, columns: K samples each
            shown = u8.reshape(n_cls, k, *u8.shape[1:])[:, :ev.per_class].reshape(-1, *u8.shape[1:])
            figs.append(grid_figure(
                out / f"samples_{name}.png", make_grid(shown, ev.per_class), rows=n_cls, cols=ev.per_class,
                title=[f"Samples at {symbol(ev)}={scale:g}: {ev.per_class} per class", run.checkpoint_line,
                       sampler_line(ev, spec)],
                row_labels=class_names(ev), ylabel="requested class", xlabel="samples (different noise)"))
        elif draw:  # unconditional: K rows of n_cls samples
            figs.append(grid_figure(
                out / f"samples_{name}.png", make_grid(u8[:n_cls * ev.per_class], n_cls), rows=ev.per_class,
                cols=n_cls, title=[f"Unconditional samples ({n_cls * ev.per_class})", run.checkpoint_line,
                                   sampler_line(ev, spec)]))
    if draw and cond:
        cells = np.stack(firsts, 1).reshape(-1, *firsts[0].shape[1:])  # row = class, column = scale
        sym = symbol(ev)
        figs.insert(0, grid_figure(
            out / "guidance_grid.png", make_grid(cells, len(ch.scales)), rows=n_cls, cols=len(ch.scales),
            title=["Classifier-free guidance sweep (one noise per row, shared by all scales)", run.checkpoint_line,
                   sampler_line(ev, ch.main)],
            row_labels=class_names(ev), col_labels=[f"{sym}={s:g}" for s in ch.scales],
            xlabel=f"guidance scale {sym}", ylabel="requested class"))
    return {"sampler": ch.main.sampler, "steps": ch.main.steps, "per_class": k, "rows": rows, "figures": figs,
            "archive_groups": groups}


def fid_part(ev, out, log, done=None) -> dict:
    """Scores the --fid-samples N samples per scale that jobs.sample's machinery made (the job makes the
    sets on every rank first; here they are read back from RUN_DIR/samples/NAME.h5)."""
    ch, rows = ev.sampling, []
    for scale, samples in zip(ch.scales, ev.fid_sets):
        t0 = time.perf_counter()
        u8, stored, _ = read_samples(samples.out, GROUP)
        labels = torch.from_numpy(stored) if ch.conditional else None
        row = {"scale": scale, "gamma": to_gamma(scale, ch.convention) if ch.conditional else None,
               "n": len(u8), "file": str(samples.out), **ev.scorers.score(u8, labels)}
        row["score_s"] = round(time.perf_counter() - t0, 3)
        rows.append(row)
        what = f"{symbol(ev)}={scale:g}" if ch.conditional else "unconditional"
        log(f"  {what}: {len(u8)} samples scored in {row['score_s']:.1f} s · " + " · ".join(
            f"{label} {fmt(row[key])}" for key, label in HEADLINE if row[key] is not None))
    return {"n": ev.fid_sets[0].num, "sampler": ch.main.sampler, "steps": ch.main.steps, "rows": rows, "figures": []}


def progression_part(ev, out, log, done=None) -> dict:
    run, spec = ev.run, ev.sampling.fast
    manager = CheckpointManager(run.run_dir / "checkpoints")
    steps = [s for s in manager.steps() if s <= run.step] or [run.step]
    if len(steps) > MAX_PROGRESSION:
        steps = [steps[round(i * (len(steps) - 1) / (MAX_PROGRESSION - 1))] for i in range(MAX_PROGRESSION)]
    n_cls, cond = run.num_classes, ev.sampling.conditional
    labels = torch.arange(n_cls) if cond else None
    rows = []
    for s in steps:
        if s == run.step:
            net = run.net
        else:
            _, state = manager.load(s)
            net = run.load_net(state, run.ema and state.get("ema") is not None, f"step {s}")
        rows.append(run.to_u8(sample(ev, net, spec, labels, n_cls)))
    fig = grid_figure(
        out / "progression.png", make_grid(np.concatenate(rows), n_cls), rows=len(steps), cols=n_cls,
        title=["Progression across retained checkpoints (same noise)", run.checkpoint_line,
               sampler_line(ev, spec, spec.guidance)],
        row_labels=[f"step {s}" for s in steps], col_labels=class_names(ev) if cond else None,
        xlabel="requested class" if cond else "sample", ylabel="checkpoint")
    return {"checkpoint_steps": steps, "scale": spec.guidance, "sampler": spec.sampler, "steps": spec.steps,
            "figures": [fig]}


def _spread(items: list, n: int) -> list:
    return items if len(items) <= n else [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)]


def gifs_part(ev, out, log, done=None) -> dict:
    run, spec, cond = ev.run, ev.sampling.main, ev.sampling.conditional
    n_cls, scale = run.num_classes, spec.guidance
    labels = torch.arange(n_cls) if cond else None
    # Every step calls back once (ddpm: T; the others: their steps); the frames are taken from what was seen.
    wanted, xt, x0, times = set(_spread(list(range(spec.steps)), MAX_GIF_FRAMES)), {}, {}, {}

    def capture(k, t, x, x0_hat):
        if k in wanted:
            xt[k], x0[k], times[k] = run.to_u8(x), run.to_u8(x0_hat), t

    x = sample(ev, run.net, spec, labels, n_cls, callback=capture)
    keys = sorted(xt)
    caption = (lambda k: f"t={times[k]:.3g}") if isinstance(times[keys[0]], float) else (lambda k: f"t={times[k]}")
    final = run.to_u8(x)
    figs = []
    for c in range(n_cls):
        head = f"class {class_names(ev)[c]}" if cond else f"sample {c}"
        figs.append(figures.trajectory_gif(
            out / f"denoising_{'class' if cond else 'sample'}{c}.gif",
            [xt[k][c] for k in keys] + [final[c]], [x0[k][c] for k in keys] + [final[c]],
            [caption(k) for k in keys] + ["final sample"], head,
            f"step {run.step} · {spec.describe()}" + (f" · {symbol(ev)}={scale:g}" if cond else "")))
    cols = _spread(keys, STATIC_COLUMNS)
    for what, frames in (("xt", xt), ("x0", x0)):
        cells = np.stack([frames[k] for k in cols], 1).reshape(-1, *final.shape[1:])
        figs.append(grid_figure(
            out / f"denoising_{what}.png", make_grid(cells, len(cols)), rows=n_cls, cols=len(cols),
            title=["Reverse process: " + ("noisy x_t" if what == "xt" else "predicted clean image x̂0 at each t"),
                   run.checkpoint_line, sampler_line(ev, spec, scale)],
            row_labels=class_names(ev) if cond else None,
            col_labels=[caption(k) for k in cols], xlabel="sampling progress (left: pure noise)",
            ylabel="requested class" if cond else ""))
    return {"scale": scale, "sampler": spec.sampler, "steps": spec.steps, "frames": len(keys) + 1, "figures": figs}


def steps_part(ev, out, log, done=None) -> dict:
    """The run's samplers at several step counts (ddpm: T), from the same noise, at the display scale."""
    run, main = ev.run, ev.sampling.main
    n, scale = ev.table_samples, main.guidance
    runs = [(s, k) for s in run.objective.samplers for k in table_steps(run.cfg, s)]
    labels = torch.arange(n) % run.num_classes if ev.sampling.conditional else None
    rows = []
    for sampler, steps in runs:
        spec = replace(main, sampler=sampler, steps=steps, eta=main.eta if takes_eta(sampler) else 0.0)
        t0 = time.perf_counter()
        u8 = run.to_u8(sample(ev, run.net, spec, labels, n))
        wall = time.perf_counter() - t0
        evals = network_evaluations(sampler, steps)
        rows.append({"sampler": sampler, "steps": steps, "evaluations": evals, "n": n, "wall_s": round(wall, 3),
                     **{k: v for k, v in ev.scorers.score(u8, labels).items() if k in ("accuracy", "feature_fid")}})
        log(f"  {sampler} {steps} steps: {wall:.1f} s · accuracy {fmt(rows[-1]['accuracy'])}")
    fig = figures.steps_figure(out / "steps_vs_quality.png", rows, [
        f"Sampler steps vs quality · {run.checkpoint_line}",
        f"{n} samples per setting, same noise · " + _guide_line(ev, scale)])
    return {"scale": scale, "n": n, "rows": rows, "figures": [fig]}


def interpolation_part(ev, out, log, done=None) -> dict:
    run, spec, cond = ev.run, ev.sampling.fast, ev.sampling.conditional
    facts = DATASETS[run.cfg.data.dataset]
    c, size, n_cls = facts["channels"], facts["size"], facts["classes"]
    g = torch.Generator().manual_seed(ev.seed)
    z0, z1 = (torch.randn((INTERP_ROWS, c, size, size), generator=g) for _ in range(2))
    alphas = torch.linspace(0, 1, INTERP_COLS).tolist()
    x_T = torch.stack([slerp(z0[r], z1[r], a) for r in range(INTERP_ROWS) for a in alphas])
    row_classes = [(2 * r) % n_cls for r in range(INTERP_ROWS)]
    labels = torch.tensor(row_classes).repeat_interleave(INTERP_COLS) if cond else None
    x = sample(ev, run.net, spec, labels, len(x_T), x_T=x_T.to(run.device))
    fig = grid_figure(
        out / "interpolation.png", make_grid(run.to_u8(x), INTERP_COLS), rows=INTERP_ROWS, cols=INTERP_COLS,
        title=["Spherical interpolation between two noises (deterministic decoding)", run.checkpoint_line,
               sampler_line(ev, spec, spec.guidance)],
        row_labels=[f"class {class_names(ev)[k]}" for k in row_classes] if cond else None,
        col_labels=[f"α={a:.2f}" for a in alphas], xlabel="slerp weight α (0: first noise, 1: second)",
        ylabel="one noise pair per row")
    return {"rows": INTERP_ROWS, "alphas": alphas, "row_classes": row_classes if cond else None,
            "scale": spec.guidance, "sampler": spec.sampler, "steps": spec.steps, "figures": [fig]}
