"""The evaluation parts that measure without a sampler (see :mod:`ddpm.evaluate.parts` for the table; each
takes (evaluation, out_dir, log)): loss curves from metrics.jsonl (every run), the one-step denoiser's noise-level sweep and out-of-
distribution test on test images, and the noisy classifier's accuracy vs timestep.
"""
import math

import numpy as np
import torch

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


def loss_series(rows: list[dict]) -> dict:
    """The data the loss figure plots, from ``read_metrics`` rows (one per logged step, sorted).

    Keys: step, loss, loss_smooth (bias-corrected EMA over smooth_span rows), epoch / epoch_loss (mean per
    epoch, weighted by the steps each row covers), buckets {"q0".."q3": values, NaN where not logged} and
    buckets_smooth, lr.
    """
    steps = [r["step"] for r in rows]
    loss = [r.get("loss") if r.get("loss") is not None else math.nan for r in rows]
    span = max(3, min(100, len(rows) // 20))
    sums, counts, prev = {}, {}, 0
    for r, v in zip(rows, loss):
        if r.get("epoch") is not None and not math.isnan(v):
            e = max(0, math.ceil(r["epoch"] - 1e-9) - 1)  # the epoch of the row's last step
            sums[e] = sums.get(e, 0.0) + v * (r["step"] - prev)
            counts[e] = counts.get(e, 0) + (r["step"] - prev)
        prev = r["step"]
    keys = [f"q{i}" for i in range(4) if any(f"loss/q{i}" in r for r in rows)]
    buckets = {q: [r.get(f"loss/{q}") if r.get(f"loss/{q}") is not None else math.nan for r in rows] for q in keys}
    return {"step": steps, "loss": loss, "loss_smooth": _ema(loss, span), "smooth_span": span,
            "epoch": sorted(sums), "epoch_loss": [sums[e] / counts[e] for e in sorted(sums)], "buckets": buckets,
            "buckets_smooth": {q: _ema(v, span) for q, v in buckets.items()},
            "lr": [r.get("lr") if r.get("lr") is not None else math.nan for r in rows]}


def curves_part(ev, out, log) -> dict:
    run = ev.run
    series = loss_series(read_metrics(run.run_dir / "metrics.jsonl"))
    fig = figures.loss_figure(out / "loss_curves.png", series, [f"Training curves · {run.checkpoint_line}",
                              "from metrics.jsonl (each logged step once, resumed runs included)"], run.step)
    final = [v for v in series["loss"] if not math.isnan(v)]
    smooth = [v for v in series["loss_smooth"] if not math.isnan(v)]
    return {"logged_steps": len(series["step"]), "first_step": series["step"][0] if series["step"] else None,
            "last_step": series["step"][-1] if series["step"] else None, "final_loss": final[-1] if final else None,
            "final_loss_smoothed": smooth[-1] if smooth else None, "epoch_loss": series["epoch_loss"],
            "figures": [fig]}


def _to_model(cfg, images_u8: torch.Tensor) -> torch.Tensor:
    """Data set uint8 (N, C, H, W) → float in the model's normalisation (as StepBatcher feeds training)."""
    x = images_u8.float()
    if cfg.data.normalize is None:
        return x / 127.5 - 1
    mean, std = cfg.data.normalize
    return (x / 255 - mean) / std


def _test_batch(ev):
    cfg = ev.run.cfg
    images, labels = load_dataset(cfg.data.dataset, cfg.data.root, train=False)
    n = min(ev.metric_samples, len(images))
    return _to_model(cfg, images[:n]), labels[:n]


@torch.no_grad()
def denoiser_part(ev, out, log) -> dict:
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
    title = f"run {run.cfg.name} · checkpoint step {run.step} · one-step denoiser trained at σ={train_sigma:g}"
    figs = [grid_figure(
        out / "denoiser_sigmas.png", make_grid(cells, len(sigmas)), rows=2 * DENOISER_ROWS, cols=len(sigmas),
        title=["Noising x + σ·ε (odd rows) and the denoiser's output (even rows)", title],
        row_labels=[f"#{i + 1} {w}" for i in range(DENOISER_ROWS) for w in ("noisy", "denoised")],
        col_labels=[f"σ={s:g}" for s in sigmas], xlabel="noise level σ", ylabel="test digits")]
    figs.append(figures.line_figure(
        out / "denoiser_ood.png", sigmas, {"denoiser output": mse_out, "noisy input (no denoising)": mse_in},
        title=["Out-of-distribution test: denoiser applied at other noise levels", title,
               f"MSE to the clean image over {len(x0)} test images"],
        xlabel="noise level σ at test time", ylabel="MSE per pixel (training normalisation)",
        marker_x=train_sigma, marker_label=f"training σ={train_sigma:g}"))
    return {"train_sigma": train_sigma, "sigmas": sigmas, "mse_denoised": mse_out, "mse_noisy": mse_in,
            "n": len(x0), "figures": figs}


@torch.no_grad()
def classifier_part(ev, out, log) -> dict:
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
