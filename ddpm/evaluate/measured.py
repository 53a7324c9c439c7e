"""The evaluation parts that measure without a sampler (see :mod:`ddpm.evaluate.parts` for the table; each
takes (evaluation, out_dir, log)): loss curves from metrics.jsonl (every run), the one-step denoiser's noise-level sweep and out-of-
distribution test on test images, and the noisy classifier's accuracy vs timestep.
"""
import math

import numpy as np
import torch

from ddpm.data.batcher import to_model_space
from ddpm.data.datasets import load_dataset
from ddpm.data.images import make_grid
from ddpm.diffusion.from_config import schedule_for
from ddpm.diffusion.objectives import q_sample
from ddpm.evaluate import figures
from ddpm.run.grids import grid_figure
from ddpm.run.metrics_log import read_metrics

DENOISER_SIGMAS = (0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0)
DENOISER_ROWS = 4


def _ema(values: list[float], span: int) -> list[float]:
    """Bias-corrected exponential moving average (pandas ``ewm(span, adjust=True)``); NaNs are skipped."""
    alpha, acc, weight, out = 2 / (span + 1), 0.0, 0.0, []
    for v in values:
        if not math.isnan(v):
            acc, weight = (1 - alpha) * acc + alpha * v, (1 - alpha) * weight + alpha
        out.append(acc / weight if weight else math.nan)
    return out


def _value(row: dict, key: str) -> float:
    return row.get(key) if row.get(key) is not None else math.nan


def loss_series(rows: list[dict]) -> dict:
    """The data the loss figure plots, from ``read_metrics`` rows (one per logged step, sorted).

    Keys: step, loss, loss_smooth (bias-corrected EMA over smooth_span rows), buckets {"q0".."q3": values, NaN
    where not logged} and buckets_smooth, lr; per epoch (1 = the first): epoch, epoch_loss (the training job's
    ``epoch_loss`` where it logged one, else the mean of the logged rows weighted by the steps each covers),
    epoch_step (its last logged step), epoch_complete (whether the rows reach its end); the held-out loss:
    test_epoch, test_step, test_loss (the ``test_loss`` rows, logged at epoch ends).
    """
    steps = [r["step"] for r in rows]
    loss = [_value(r, "loss") for r in rows]
    span = max(3, min(100, len(rows) // 20))
    sums, counts, last, logged, prev = {}, {}, {}, {}, 0
    for r, v in zip(rows, loss):
        if r.get("epoch") is not None:
            e = max(1, math.ceil(r["epoch"] - 1e-9))  # the epoch of the row's last step, 1 = the first
            last[e] = (r["step"], r["epoch"] >= e - 1e-9)
            if r.get("epoch_loss") is not None:
                logged[e] = r["epoch_loss"]
            if not math.isnan(v):
                sums[e] = sums.get(e, 0.0) + v * (r["step"] - prev)
                counts[e] = counts.get(e, 0) + (r["step"] - prev)
        prev = r["step"]
    epochs = sorted(set(sums) | set(logged))
    tests = [r for r in rows if r.get("test_loss") is not None]
    keys = [f"q{i}" for i in range(4) if any(f"loss/q{i}" in r for r in rows)]
    buckets = {q: [_value(r, f"loss/{q}") for r in rows] for q in keys}
    return {"step": steps, "loss": loss, "loss_smooth": _ema(loss, span), "smooth_span": span,
            "epoch": epochs, "epoch_loss": [logged[e] if e in logged else sums[e] / counts[e] for e in epochs],
            "epoch_step": [last[e][0] for e in epochs], "epoch_complete": [last[e][1] for e in epochs],
            "test_epoch": [max(1, round(r["epoch"])) if r.get("epoch") is not None else None for r in tests],
            "test_step": [r["step"] for r in tests], "test_loss": [r["test_loss"] for r in tests],
            "buckets": buckets, "buckets_smooth": {q: _ema(v, span) for q, v in buckets.items()},
            "lr": [_value(r, "lr") for r in rows]}


def curves_part(ev, out, log, done=None) -> dict:
    run = ev.run
    series = loss_series(read_metrics(run.run_dir / "metrics.jsonl"))
    fig = figures.loss_figure(out / "loss_curves.png", series, [f"Training curves · {run.checkpoint_line}",
                              "from metrics.jsonl (each logged step once, resumed runs included)"], run.step)
    final = [v for v in series["loss"] if not math.isnan(v)]
    smooth = [v for v in series["loss_smooth"] if not math.isnan(v)]
    test = dict(zip(series["test_epoch"], series["test_loss"]))
    epochs = [{"epoch": e, "step": s, "complete": c, "train_loss": v, "test_loss": test.get(e)} for e, s, c, v
              in zip(series["epoch"], series["epoch_step"], series["epoch_complete"], series["epoch_loss"])]
    best = None
    if run.best_step is not None:
        at = dict(zip(series["test_step"], series["test_loss"]))
        best = {"step": run.best_step, "test_loss": at.get(run.best_step), "evaluated": run.best_step == run.step}
    return {"logged_steps": len(series["step"]), "first_step": series["step"][0] if series["step"] else None,
            "last_step": series["step"][-1] if series["step"] else None, "final_loss": final[-1] if final else None,
            "final_loss_smoothed": smooth[-1] if smooth else None, "epoch_loss": series["epoch_loss"],
            "epochs": epochs, "final_test_loss": series["test_loss"][-1] if series["test_loss"] else None,
            "best": best, "figures": [fig]}


def _test_batch(ev):
    cfg = ev.run.cfg
    images, labels = load_dataset(cfg.data.dataset, cfg.data.root, train=False)
    n = min(ev.metric_samples, len(images))
    return to_model_space(images[:n], tuple(cfg.data.normalize) if cfg.data.normalize else None), labels[:n]


@torch.no_grad()
def denoiser_part(ev, out, log, done=None) -> dict:
    run = ev.run
    x0, _ = _test_batch(ev)
    train_sigma = run.cfg.diffusion.sigma
    sigmas = sorted(set(DENOISER_SIGMAS) | {train_sigma})
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(ev.seed))
    mse_out, mse_in, shown = [], [], []
    for sigma in sigmas:
        noisy = x0 + sigma * noise
        den = torch.cat([run.net(noisy[i:i + 256].to(run.device)).float().cpu() for i in range(0, len(x0), 256)])
        mse_out.append(float((den - x0).pow(2).mean()))
        mse_in.append(float((noisy - x0).pow(2).mean()))
        shown.append((run.to_u8(noisy[:DENOISER_ROWS]), run.to_u8(den[:DENOISER_ROWS])))
    # rows: digit 1 noisy, digit 1 denoised, digit 2 noisy, ...; columns: sigma
    cells = np.stack([np.stack([shown[j][k][i] for j in range(len(sigmas))])
                      for i in range(DENOISER_ROWS) for k in (0, 1)]).reshape(-1, *shown[0][0].shape[1:])
    # σ is measured in the model's space, where the images are in run.image_range ([0, 1] with the course's
    # data.normalize [0, 1], [-1, 1] by default): the labels say which, so σ = 0.5 means what the course means.
    scale = run.scale_note
    title = (f"run {run.cfg.name} · checkpoint step {run.step} · one-step denoiser trained at σ={train_sigma:g} "
             f"({scale})")
    figs = [grid_figure(
        out / "denoiser_sigmas.png", make_grid(cells, len(sigmas)), rows=2 * DENOISER_ROWS, cols=len(sigmas),
        title=["Noising z = x + σ·ε (odd rows) and the denoiser's output (even rows)", title],
        row_labels=[f"#{i + 1} {w}" for i in range(DENOISER_ROWS) for w in ("noisy", "denoised")],
        col_labels=[f"σ={s:g}" for s in sigmas], xlabel=f"noise level σ ({scale})", ylabel="test digits")]
    figs.append(figures.line_figure(
        out / "denoiser_ood.png", sigmas, {"denoiser output": mse_out, "noisy input (no denoising)": mse_in},
        title=["Out-of-distribution test: denoiser applied at other noise levels", title,
               f"MSE to the clean image over {len(x0)} test images"],
        xlabel=f"noise level σ at test time ({scale})", ylabel=f"MSE per pixel ({scale})",
        marker_x=train_sigma, marker_label=f"training σ={train_sigma:g}"))
    return {"train_sigma": train_sigma, "sigmas": sigmas, "image_range": list(run.image_range),
            "mse_denoised": mse_out, "mse_noisy": mse_in, "n": len(x0), "figures": figs}


@torch.no_grad()
def classifier_part(ev, out, log, done=None) -> dict:
    run = ev.run
    x0, labels = _test_batch(ev)
    T = run.cfg.diffusion.T
    sched = schedule_for(run.cfg).to("cpu", torch.float32)
    ts = sorted({round(i * (T - 1) / 10) for i in range(11)})
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(ev.seed))
    acc = []
    for t in ts:
        tt = torch.full((len(x0),), t, dtype=torch.long)
        x_t = q_sample(sched, x0, tt, noise)
        logits = torch.cat([run.net(x_t[i:i + 256].to(run.device), tt[i:i + 256].to(run.device)).cpu()
                            for i in range(0, len(x0), 256)])
        acc.append(float((logits.argmax(1) == labels).float().mean()))
    chance = 1 / run.num_classes
    fig = figures.line_figure(
        out / "classifier_accuracy.png", ts, {"noisy classifier": acc},
        title=["Noisy classifier: accuracy vs diffusion timestep", run.checkpoint_line,
               f"{len(x0)} test images noised with q(x_t | x_0)"],
        xlabel=f"timestep t (0 = clean, {T - 1} = pure noise)", ylabel="test accuracy", hline=chance, ylim=(0, 1.02),
        hline_label=f"chance ({chance:.0%})")
    return {"t": ts, "accuracy": acc, "n": len(x0), "chance": chance, "figures": [fig]}
