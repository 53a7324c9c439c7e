"""Forward process and training objectives.

Every objective returns a per-sample loss of shape (B,) so the caller can average it, weight it or
log it by timestep bucket. Randomness (t, noise, label-drop mask) is passed in, never drawn here: the
training loop draws it as a pure function of (seed, step) so a resumed run repeats it exactly.

Objectives:
- ``eps``: the net predicts the added noise (Ho et al. 2020).
- ``x0``: the net predicts the clean image.
- ``v``: the net predicts ``v = sqrt(ab) eps - sqrt(1 - ab) x0`` (Salimans & Ho 2022).
- ``rectified_flow``: ``x_t = (1 - t) x0 + t eps`` with float t in [0, 1]; target ``eps - x0``.
- ``denoiser``: one-step denoiser at a fixed sigma: the net maps ``x0 + sigma eps`` to x0 (no t).
- ``classifier``: a noisy classifier ``p(y | x_t, t)`` for classifier guidance (cross-entropy).
"""
import torch
import torch.nn.functional as F

from ddpm.diffusion.schedule import NoiseSchedule

OBJECTIVES = ("eps", "x0", "v", "rectified_flow", "denoiser", "classifier")
PREDICTIONS = ("eps", "x0", "v")  # objectives whose net output can be turned into an eps prediction


def q_sample(sched: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Sample ``x_t ~ q(x_t | x_0)``. x0, noise: (B, C, H, W); t: LongTensor (B,) in [0, T)."""
    a = NoiseSchedule.gather(sched.sqrt_alpha_bars, t, x0.ndim)
    s = NoiseSchedule.gather(sched.sqrt_one_minus_alpha_bars, t, x0.ndim)
    return a * x0 + s * noise


def eps_from_prediction(sched: NoiseSchedule, prediction: str, x_t: torch.Tensor, t: torch.Tensor,
                        out: torch.Tensor) -> torch.Tensor:
    """Convert a net output of kind ``prediction`` (eps, x0 or v) at (x_t, t) into an eps prediction."""
    if prediction == "eps":
        return out
    a = NoiseSchedule.gather(sched.sqrt_alpha_bars, t, x_t.ndim)
    s = NoiseSchedule.gather(sched.sqrt_one_minus_alpha_bars, t, x_t.ndim)
    if prediction == "x0":
        return (x_t - a * out) / s
    if prediction == "v":
        return s * x_t + a * out
    raise ValueError(f"unknown prediction '{prediction}'; choose one of: {', '.join(PREDICTIONS)}")


def drop_labels(y: torch.Tensor, drop: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Replace labels where ``drop`` (bool (B,)) is set by the null class ``num_classes`` (CFG training)."""
    return torch.where(drop, torch.full_like(y, num_classes), y)


def _mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


def diffusion_loss(net, sched: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                   y: torch.Tensor | None = None, prediction: str = "eps") -> torch.Tensor:
    """Per-sample MSE (B,) of an eps-, x0- or v-predicting net on ``x_t = q_sample(x0, t, noise)``."""
    x_t = q_sample(sched, x0, t, noise)
    out = net(x_t, t, y)
    if prediction == "eps":
        target = noise
    elif prediction == "x0":
        target = x0
    elif prediction == "v":
        a = NoiseSchedule.gather(sched.sqrt_alpha_bars, t, x0.ndim)
        s = NoiseSchedule.gather(sched.sqrt_one_minus_alpha_bars, t, x0.ndim)
        target = a * noise - s * x0
    else:
        raise ValueError(f"unknown prediction '{prediction}'; choose one of: {', '.join(PREDICTIONS)}")
    return _mse(out, target)


def rectified_flow_loss(net, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                        y: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample MSE (B,) of the velocity ``eps - x0`` at ``x_t = (1 - t) x0 + t eps``; t: float (B,) in [0, 1]."""
    tt = t.reshape(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    x_t = (1 - tt) * x0 + tt * noise
    return _mse(net(x_t, t, y), noise - x0)


def denoiser_loss(net, x0: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
    """Per-sample MSE (B,) of a one-step denoiser mapping ``x0 + sigma * noise`` back to x0."""
    return _mse(net(x0 + sigma * noise), x0)


def classifier_loss(net, sched: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                    y: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy (B,) of a noisy classifier on ``x_t = q_sample(x0, t, noise)``."""
    logits = net(q_sample(sched, x0, t, noise), t)
    return F.cross_entropy(logits.float(), y, reduction="none")
