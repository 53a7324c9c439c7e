"""The evaluation parts that run a sampler (see :mod:`ddpm.evaluate.parts` for the table): each takes
(plan, out_dir, log), writes its figures into out_dir and returns a JSON-ready section for ``metrics.json``.

Guidance sweep (grids, archive, accuracy / feature-FID / Inception), progression across checkpoints,
denoising GIFs, sampler steps vs quality, slerp interpolation. The parts that need no sampler (loss
curves, one-step denoiser and noisy-classifier runs) are in :mod:`ddpm.evaluate.measured`.
"""
import math
import time

import numpy as np
import torch

from ddpm.data.datasets import DATASETS
from ddpm.data.images import make_grid
from ddpm.diffusion.from_config import Sampling, generate, network_evaluations, objective_for
from ddpm.diffusion.samplers import ddim_timesteps, slerp, to_gamma
from ddpm.evaluate import feature_cnn, fidelity, figures, metrics
from ddpm.run.checkpoints import CheckpointManager
from ddpm.run.evaluations import convention_symbol
from ddpm.run.grids import grid_figure
from ddpm.run.samples import read_samples, write_samples
from ddpm.run.shards import GROUP

CHUNK = 1000                  # images per sampler call (bounded memory)
MAX_PROGRESSION = 8           # checkpoints shown in the progression figure
MAX_GIF_FRAMES = 40
STATIC_COLUMNS = 8            # trajectory snapshots in the static denoising figures
INTERP_ROWS, INTERP_COLS = 5, 8
TABLE_STEPS = {"ddim": (10, 20, 50, 100), "euler": (10, 20, 50, 100), "heun": (5, 10, 25, 50)}  # ddpm: T


# ---- shared helpers ------------------------------------------------------------------------------

def _class_names(plan) -> list[str]:
    """Row labels of class-conditional grids: CIFAR-10's "airplane", "automobile", ...; MNIST's digits."""
    return list(DATASETS[plan.cfg.data.dataset]["class_names"])


def _nchw(u8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(u8)).permute(0, 3, 1, 2)


def _sample(plan, net, labels, n, scale, sampler, steps, seed, x_T=None, callback=None):
    """Samples 0 .. n-1 of the request with ``seed`` (model space), made CHUNK at a time (bounded memory;
    sample i does not depend on the chunk it is made in)."""
    spec = Sampling(sampler, steps, guidance=scale, convention=plan.convention, clip_x0=plan.clip_x0)
    model = objective_for(plan.cfg).denoiser(net)
    parts = []
    for lo in range(0, n, CHUNK):
        hi = min(n, lo + CHUNK)
        parts.append(generate(model, plan.cfg, spec, None if labels is None else labels[lo:hi], seed=seed,
                              indices=range(lo, hi), device=plan.device,
                              x=None if x_T is None else x_T[lo:hi], callback=callback).cpu())
    return torch.cat(parts)


def _symbol(plan) -> str:
    return convention_symbol(plan.convention)


def _sampler_line(plan, sampler, steps, scale=None) -> str:
    if not plan.conditional:
        guide = "unconditional model (no guidance)"
    elif plan.convention == "gamma":
        guide = "guidance convention γ (γ=1 conditional, γ=0 unconditional)"
    else:
        guide = "guidance convention w (w=0 conditional, w=−1 unconditional)"
    if scale is not None and plan.conditional:
        guide += f" · {_symbol(plan)}={scale:g}"
    clip = ", x0 clipped" if plan.clip_x0 and sampler in ("ddpm", "ddim") else ""
    return f"sampler {sampler}, {steps} steps{clip} · {guide}"


HEADLINE = (("inception_fid", "FID"), ("inception_score", "IS"), ("kid", "KID"), ("precision", "precision"),
            ("recall", "recall"), ("accuracy", "accuracy"), ("feature_fid", "feature-FID"))


def _scores(plan, u8: np.ndarray, labels) -> dict:
    """Label accuracy and feature-FID (classifier); Inception FID, IS, KID, precision and recall (if
    Inception weights were given)."""
    out = {"accuracy": None, "feature_fid": None, **dict.fromkeys(fidelity.METRIC_KEYS)}
    images = _nchw(u8)
    if plan.classifier is not None:
        logits, feats = feature_cnn.classify(plan.classifier[0], images, plan.device)
        if labels is not None:
            out["accuracy"] = metrics.accuracy(logits, labels)
        out["feature_fid"] = metrics.frechet_distance(*metrics.feature_stats(feats.numpy()), *plan.reference)
    if plan.inception is not None:
        out.update(plan.inception.score(images))
    return out


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


# ---- generative runs -----------------------------------------------------------------------------

def guidance_part(plan, out, log) -> dict:
    """Samples per guidance scale → archive groups, per-scale grids, the guidance grid, scores."""
    n_cls = plan.num_classes
    k = max(plan.per_class, math.ceil(plan.metric_samples / n_cls))
    labels = torch.arange(n_cls).repeat_interleave(k) if plan.conditional else None
    n, h5 = n_cls * k, plan.run_dir / "samples.h5"
    rows, figs, groups, firsts = [], [], [], []
    draw = "grids" in plan.parts
    for scale in plan.scales:
        t0 = time.perf_counter()
        u8 = plan.to_u8(_sample(plan, plan.net, labels, n, scale, plan.sampler, plan.steps, plan.seed))
        wall = time.perf_counter() - t0
        name = f"{plan.convention}_{scale:g}" if plan.conditional else "uncond"
        group = f"{plan.group_prefix}/{name}"
        stored = labels.numpy() if labels is not None else np.full(n, -1)
        write_samples(h5, group, u8, stored, dict(
            step=plan.step, sampler=plan.sampler, steps=plan.steps, seed=plan.seed, ema=plan.ema,
            config_hash=plan.cfg.hash(), guidance_scale=scale if plan.conditional else None,
            guidance_convention=plan.convention if plan.conditional else None,
            gamma=to_gamma(scale, plan.convention) if plan.conditional else None,
            checkpoint=str(plan.checkpoint_path), per_class=k, labels="requested class" if plan.conditional
            else "none (-1): unconditional model"))
        groups.append(group)
        row = {"scale": scale, "gamma": to_gamma(scale, plan.convention) if plan.conditional else None, "n": n,
               "group": group, "wall_s": round(wall, 3), **_scores(plan, u8, labels)}
        rows.append(row)
        log(f"  {name}: {n} samples in {wall:.1f} s · accuracy {_fmt(row['accuracy'])} · "
            f"feature-FID {_fmt(row['feature_fid'])}")
        firsts.append(u8[::k])
        if draw and plan.conditional:  # rows: classes, columns: K samples each
            shown = u8.reshape(n_cls, k, *u8.shape[1:])[:, :plan.per_class].reshape(-1, *u8.shape[1:])
            figs.append(grid_figure(
                out / f"samples_{name}.png", make_grid(shown, plan.per_class), rows=n_cls, cols=plan.per_class,
                title=[f"Samples at {_symbol(plan)}={scale:g}: {plan.per_class} per class", plan.checkpoint_line,
                       _sampler_line(plan, plan.sampler, plan.steps)],
                row_labels=_class_names(plan), ylabel="requested class", xlabel="samples (different noise)"))
        elif draw:  # unconditional: K rows of n_cls samples
            figs.append(grid_figure(
                out / f"samples_{name}.png", make_grid(u8[:n_cls * plan.per_class], n_cls), rows=plan.per_class,
                cols=n_cls, title=[f"Unconditional samples ({n_cls * plan.per_class})", plan.checkpoint_line,
                                   _sampler_line(plan, plan.sampler, plan.steps)]))
    if draw and plan.conditional:
        cells = np.stack(firsts, 1).reshape(-1, *firsts[0].shape[1:])  # row = class, column = scale
        sym = _symbol(plan)
        figs.insert(0, grid_figure(
            out / "guidance_grid.png", make_grid(cells, len(plan.scales)), rows=n_cls, cols=len(plan.scales),
            title=["Classifier-free guidance sweep (one noise per row, shared by all scales)", plan.checkpoint_line,
                   _sampler_line(plan, plan.sampler, plan.steps)],
            row_labels=_class_names(plan), col_labels=[f"{sym}={s:g}" for s in plan.scales],
            xlabel=f"guidance scale {sym}", ylabel="requested class"))
    return {"sampler": plan.sampler, "steps": plan.steps, "per_class": k, "rows": rows, "figures": figs,
            "archive_groups": groups}


def fid_part(plan, out, log) -> dict:
    """Scores the --fid-samples N samples per scale that jobs.sample's machinery made (the job runs the
    requests on every rank first; here they are read back from RUN_DIR/samples/NAME.h5)."""
    rows = []
    for scale, sp in zip(plan.scales, plan.fid_requests):
        t0 = time.perf_counter()
        u8, stored, _ = read_samples(sp.out, GROUP)
        labels = torch.from_numpy(stored) if plan.conditional else None
        row = {"scale": scale, "gamma": to_gamma(scale, plan.convention) if plan.conditional else None,
               "n": len(u8), "file": str(sp.out), **_scores(plan, u8, labels)}
        row["score_s"] = round(time.perf_counter() - t0, 3)
        rows.append(row)
        what = f"{_symbol(plan)}={scale:g}" if plan.conditional else "unconditional"
        log(f"  {what}: {len(u8)} samples scored in {row['score_s']:.1f} s · " + " · ".join(
            f"{label} {_fmt(row[key])}" for key, label in HEADLINE if row[key] is not None))
    return {"n": plan.fid_samples, "sampler": plan.sampler, "steps": plan.steps, "rows": rows, "figures": []}


def progression_part(plan, out, log) -> dict:
    manager = CheckpointManager(plan.run_dir / "checkpoints")
    steps = [s for s in manager.steps() if s <= plan.step] or [plan.step]
    if len(steps) > MAX_PROGRESSION:
        steps = [steps[round(i * (len(steps) - 1) / (MAX_PROGRESSION - 1))] for i in range(MAX_PROGRESSION)]
    n_cls = plan.num_classes
    labels = torch.arange(n_cls) if plan.conditional else None
    scale, rows = plan.display_scale, []
    for s in steps:
        if s == plan.step:
            net = plan.net
        else:
            _, state = manager.load(s)
            net = plan.load_net(state, plan.ema and state.get("ema") is not None, f"step {s}")
        rows.append(plan.to_u8(_sample(plan, net, labels, n_cls, scale, plan.fast_sampler, plan.fast_steps, plan.seed)))
    fig = grid_figure(
        out / "progression.png", make_grid(np.concatenate(rows), n_cls), rows=len(steps), cols=n_cls,
        title=["Progression across retained checkpoints (same noise)", plan.checkpoint_line,
               _sampler_line(plan, plan.fast_sampler, plan.fast_steps, scale)],
        row_labels=[f"step {s}" for s in steps], col_labels=_class_names(plan) if plan.conditional else None,
        xlabel="requested class" if plan.conditional else "sample", ylabel="checkpoint")
    return {"checkpoint_steps": steps, "scale": scale, "sampler": plan.fast_sampler, "steps": plan.fast_steps,
            "figures": [fig]}


def _step_count(plan) -> int:
    """How many steps the plan's sampler takes (each one a callback)."""
    return len(ddim_timesteps(plan.cfg.diffusion.T, plan.steps)) if plan.sampler == "ddim" else plan.steps


def _spread(items: list, n: int) -> list:
    return items if len(items) <= n else [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)]


def gifs_part(plan, out, log) -> dict:
    n_cls, scale = plan.num_classes, plan.display_scale
    labels = torch.arange(n_cls) if plan.conditional else None
    keys = _spread(list(range(_step_count(plan))), MAX_GIF_FRAMES)  # sampler step indices
    wanted, xt, x0, times = set(keys), {}, {}, {}

    def capture(k, t, x, x0_hat):
        if k in wanted:
            xt[k], x0[k], times[k] = plan.to_u8(x), plan.to_u8(x0_hat), t

    x = _sample(plan, plan.net, labels, n_cls, scale, plan.sampler, plan.steps, plan.seed, callback=capture)
    caption = (lambda k: f"t={times[k]:.2f}") if isinstance(times[0], float) else (lambda k: f"t={times[k]}")
    final = plan.to_u8(x)
    figs = []
    for c in range(n_cls):
        head = f"class {_class_names(plan)[c]}" if plan.conditional else f"sample {c}"
        figs.append(figures.trajectory_gif(
            out / f"denoising_{'class' if plan.conditional else 'sample'}{c}.gif",
            [xt[k][c] for k in keys] + [final[c]], [x0[k][c] for k in keys] + [final[c]],
            [caption(k) for k in keys] + ["final sample"], head,
            f"step {plan.step} · {plan.sampler}, {plan.steps} steps"
            + (f" · {_symbol(plan)}={scale:g}" if plan.conditional else "")))
    cols = _spread(keys, STATIC_COLUMNS)
    for what, frames in (("xt", xt), ("x0", x0)):
        cells = np.stack([frames[k] for k in cols], 1).reshape(-1, *final.shape[1:])
        figs.append(grid_figure(
            out / f"denoising_{what}.png", make_grid(cells, len(cols)), rows=n_cls, cols=len(cols),
            title=["Reverse process: " + ("noisy x_t" if what == "xt" else "predicted clean image x̂0 at each t"),
                   plan.checkpoint_line, _sampler_line(plan, plan.sampler, plan.steps, scale)],
            row_labels=_class_names(plan) if plan.conditional else None,
            col_labels=[caption(k) for k in cols], xlabel="sampling progress (left: pure noise)",
            ylabel="requested class" if plan.conditional else ""))
    return {"scale": scale, "sampler": plan.sampler, "steps": plan.steps, "frames": len(keys) + 1, "figures": figs}


def steps_part(plan, out, log) -> dict:
    T, n, scale = plan.cfg.diffusion.T, plan.table_samples, plan.display_scale
    runs = [(s, k) for s in objective_for(plan.cfg).samplers
            for k in ((T,) if s == "ddpm" else sorted({min(k, T) if s == "ddim" else k for k in TABLE_STEPS[s]}))]
    labels = torch.arange(n) % plan.num_classes if plan.conditional else None
    rows = []
    for sampler, steps in runs:
        t0 = time.perf_counter()
        u8 = plan.to_u8(_sample(plan, plan.net, labels, n, scale, sampler, steps, plan.seed))
        wall = time.perf_counter() - t0
        evals = network_evaluations(sampler, steps)
        rows.append({"sampler": sampler, "steps": steps, "evaluations": evals, "n": n, "wall_s": round(wall, 3),
                     **{k: v for k, v in _scores(plan, u8, labels).items() if k in ("accuracy", "feature_fid")}})
        log(f"  {sampler} {steps} steps: {wall:.1f} s · accuracy {_fmt(rows[-1]['accuracy'])}")
    fig = figures.steps_figure(out / "steps_vs_quality.png", rows, [
        f"Sampler steps vs quality · {plan.checkpoint_line}",
        f"{n} samples per setting, same noise · " + _sampler_line(plan, "various", "N", scale).split(" · ", 1)[1]])
    return {"scale": scale, "n": n, "rows": rows, "figures": [fig]}


def interpolation_part(plan, out, log) -> dict:
    facts = DATASETS[plan.cfg.data.dataset]
    c, size, n_cls = facts["channels"], facts["size"], facts["classes"]
    g = torch.Generator().manual_seed(plan.seed)
    z0, z1 = (torch.randn((INTERP_ROWS, c, size, size), generator=g) for _ in range(2))
    alphas = torch.linspace(0, 1, INTERP_COLS).tolist()
    x_T = torch.stack([slerp(z0[r], z1[r], a) for r in range(INTERP_ROWS) for a in alphas])
    row_classes = [(2 * r) % n_cls for r in range(INTERP_ROWS)]
    labels = torch.tensor(row_classes).repeat_interleave(INTERP_COLS) if plan.conditional else None
    scale = plan.display_scale
    x = _sample(plan, plan.net, labels, len(x_T), scale, plan.fast_sampler, plan.fast_steps, plan.seed,
                x_T=x_T.to(plan.device))
    fig = grid_figure(
        out / "interpolation.png", make_grid(plan.to_u8(x), INTERP_COLS), rows=INTERP_ROWS, cols=INTERP_COLS,
        title=["Spherical interpolation between two noises (deterministic decoding)", plan.checkpoint_line,
               _sampler_line(plan, plan.fast_sampler, plan.fast_steps, scale)],
        row_labels=[f"class {_class_names(plan)[k]}" for k in row_classes] if plan.conditional else None,
        col_labels=[f"α={a:.2f}" for a in alphas], xlabel="slerp weight α (0: first noise, 1: second)",
        ylabel="one noise pair per row")
    return {"rows": INTERP_ROWS, "alphas": alphas, "row_classes": row_classes if plan.conditional else None,
            "scale": scale, "sampler": plan.fast_sampler, "steps": plan.fast_steps, "figures": [fig]}
