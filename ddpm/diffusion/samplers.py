"""Samplers: DDPM ancestral (two algebraic forms), DDIM, Euler/Heun for rectified flow; guidance wrappers.

Every sampler takes any callable ``eps_model(x, t, y)`` (a net, a guidance wrapper, or an analytic
model in tests), a shape (B, C, H, W), labels ``y`` (LongTensor (B,)) or None, and a
``torch.Generator`` that decides every random draw, and runs under ``torch.inference_mode()``.
Per-step scalars come from the float64 schedule on the host as Python floats, so the loop issues no
device-to-host syncs. With ``capture`` (a collection of timesteps) a sampler also returns a dict
``{t: (x_t, x0_hat)}`` of CPU tensors for figures and GIFs.
"""
import math
from typing import Callable, Collection

import torch
import torch.nn.functional as F

from ddpm.diffusion.schedule import NoiseSchedule
from ddpm.errors import UserError

CONVENTIONS = ("gamma", "w")
EpsModel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def to_gamma(scale: float, convention: str) -> float:
    """Guidance scale in the gamma convention. gamma: ``e_u + g (e_c - e_u)``; w: ``(1 + w) e_c - w e_u``."""
    if convention == "gamma":
        return float(scale)
    if convention == "w":
        return 1.0 + float(scale)
    raise UserError(f"unknown guidance convention '{convention}'; choose one of: {', '.join(CONVENTIONS)}")


def classifier_free_guidance(model, scale: float, convention: str = "gamma",
                             num_classes: int | None = None) -> EpsModel:
    """Wrap a class-conditional net into a guided ``eps_model(x, t, y)``.

    The conditional and unconditional (null class = ``num_classes``) predictions come from ONE batched
    forward of 2B samples. At gamma = 1 (w = 0) this is the plain conditional prediction and the
    unconditional half is skipped. ``y=None`` gives the unconditional prediction.
    """
    gamma = to_gamma(scale, convention)
    n = getattr(model, "num_classes", None) if num_classes is None else num_classes
    if not n:
        raise UserError("classifier-free guidance needs a class-conditional model, but this model is "
                        "unconditional (num_classes=0); drop the guidance option or train with model.num_classes=10")

    def guided(x, t, y):
        if y is None:
            return model(x, t, torch.full((x.shape[0],), n, device=x.device, dtype=torch.long))
        if gamma == 1.0:
            return model(x, t, y)
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, n)]))
        cond, uncond = out.chunk(2)
        return uncond + gamma * (cond - uncond)

    return guided


def classifier_guidance(eps_model: EpsModel, classifier, sched: NoiseSchedule, scale: float) -> EpsModel:
    """Classifier guidance: ``eps - scale * sqrt(1 - ab_t) * grad_x log p(y | x_t, t)``.

    ``classifier(x, t) -> logits (B, K)`` is a noisy classifier. With scale 1, an unconditional
    ``eps_model`` and the exact classifier this is the exact conditional eps (Bayes' rule on scores).
    """
    def guided(x, t, y):
        if y is None:
            raise UserError("classifier guidance needs class labels to guide towards")
        eps = eps_model(x, t, y)
        with torch.inference_mode(False), torch.enable_grad():
            xg = x.detach().clone().requires_grad_(True)
            logp = F.log_softmax(classifier(xg, t.clone()).float(), dim=-1)
            grad, = torch.autograd.grad(logp.gather(1, y.clone()[:, None]).sum(), xg)
        s = sched.to(x.device, x.dtype)
        return eps - scale * NoiseSchedule.gather(s.sqrt_one_minus_alpha_bars, t, x.ndim) * grad

    return guided


def _start(shape, generator, x_T, device):
    if x_T is not None:
        return x_T.to(device=device, dtype=torch.float32).clone()
    return torch.randn(shape, generator=generator, device=device)


def _device(y, generator, device):
    if device is not None:
        return torch.device(device)
    return y.device if y is not None else generator.device


@torch.inference_mode()
def sample_ddpm(eps_model: EpsModel, sched: NoiseSchedule, shape, y=None, *, generator: torch.Generator,
                form: str = "eps", variance: str = "beta", clip_x0: bool = False, x_T=None,
                capture: Collection[int] | None = None, device=None):
    """DDPM ancestral sampling over all T steps; returns x_0 (B, C, H, W) (and the trajectory if captured).

    form ``eps``: ``x_{t-1} = (x_t - beta_t / sqrt(1 - ab_t) eps) / sqrt(alpha_t) + sigma_t z``.
    form ``x0``: ``x0_hat = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t)`` (optionally clipped to [-1, 1]),
    then the posterior mean ``coef_x0 x0_hat + coef_xt x_t`` plus ``sigma_t z``. Both forms are the same
    update and, given the same generator, agree to rounding. ``variance``: sigma_t^2 = beta_t ("beta")
    or beta tilde ("beta_tilde"). No noise is added at t = 0.
    """
    if form not in ("eps", "x0"):
        raise UserError(f"unknown DDPM form '{form}'; choose eps or x0")
    if variance not in ("beta", "beta_tilde"):
        raise UserError(f"unknown DDPM variance '{variance}'; choose beta or beta_tilde")
    if clip_x0 and form == "eps":
        raise UserError("x0 clipping needs the x0 form of DDPM (form='x0')")
    device = _device(y, generator, device)
    x = _start(shape, generator, x_T, device)
    var = sched.betas if variance == "beta" else sched.posterior_variance
    traj = {}
    for t in range(sched.T - 1, -1, -1):
        tt = torch.full((shape[0],), t, device=device, dtype=torch.long)
        eps = eps_model(x, tt, y).float()
        ab = sched.alpha_bars[t].item()
        x0_hat = None
        if form == "x0" or (capture is not None and t in capture):
            x0_hat = (x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
            if clip_x0:
                x0_hat = x0_hat.clamp(-1, 1)
        if capture is not None and t in capture:
            traj[t] = (x.cpu(), x0_hat.cpu())
        if form == "eps":
            beta = sched.betas[t].item()
            x = (x - beta / math.sqrt(1 - ab) * eps) / math.sqrt(sched.alphas[t].item())
        else:
            x = sched.posterior_mean_coef_x0[t].item() * x0_hat + sched.posterior_mean_coef_xt[t].item() * x
        if t > 0:
            x = x + math.sqrt(var[t].item()) * torch.randn(shape, generator=generator, device=device)
    return x if capture is None else (x, traj)


def ddim_timesteps(T: int, steps: int) -> list[int]:
    """The S timesteps DDIM visits, descending: ``round(i (T - 1) / (S - 1))`` for i = S-1 .. 0.

    Evenly spaced and always including T - 1 (pure noise) and 0, so every S in [1, T] is valid and
    S = T visits every step. S = 1 is the single jump from T - 1 straight to x0.
    """
    if not 1 <= steps <= T:
        raise UserError(f"DDIM steps must be in [1, T={T}], got {steps}")
    if steps == 1:
        return [T - 1]
    return sorted({round(i * (T - 1) / (steps - 1)) for i in range(steps)}, reverse=True)


@torch.inference_mode()
def sample_ddim(eps_model: EpsModel, sched: NoiseSchedule, shape, y=None, *, steps: int,
                generator: torch.Generator, eta: float = 0.0, clip_x0: bool = False, x_T=None,
                capture: Collection[int] | None = None, device=None):
    """DDIM (Song et al. 2021) over :func:`ddim_timesteps`; eta = 0 is deterministic, eta = 1 with
    S = T equals DDPM with sigma^2 = beta tilde. Returns x_0 (and the trajectory if captured)."""
    if not 0.0 <= eta <= 1.0:
        raise UserError(f"DDIM eta must be in [0, 1], got {eta}")
    device = _device(y, generator, device)
    x = _start(shape, generator, x_T, device)
    seq = ddim_timesteps(sched.T, steps)
    traj = {}
    for i, t in enumerate(seq):
        t_prev = seq[i + 1] if i + 1 < len(seq) else -1
        tt = torch.full((shape[0],), t, device=device, dtype=torch.long)
        eps = eps_model(x, tt, y).float()
        ab = sched.alpha_bars[t].item()
        ab_prev = sched.alpha_bars[t_prev].item() if t_prev >= 0 else 1.0
        x0_hat = (x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
        if clip_x0:
            x0_hat = x0_hat.clamp(-1, 1)
            eps = (x - math.sqrt(ab) * x0_hat) / math.sqrt(1 - ab)
        if capture is not None and t in capture:
            traj[t] = (x.cpu(), x0_hat.cpu())
        sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
        x = math.sqrt(ab_prev) * x0_hat + math.sqrt(max(1 - ab_prev - sigma ** 2, 0.0)) * eps
        if t_prev >= 0 and sigma > 0:
            x = x + sigma * torch.randn(shape, generator=generator, device=device)
    return x if capture is None else (x, traj)


@torch.inference_mode()
def sample_flow(velocity_model: EpsModel, shape, y=None, *, steps: int, generator: torch.Generator,
                method: str = "euler", x_T=None, capture: Collection[int] | None = None, device=None):
    """Integrate the rectified-flow ODE ``dx/dt = v(x, t)`` from t = 1 (noise) to t = 0 (data).

    ``velocity_model(x, t, y)`` receives float t (B,) in [0, 1] and predicts ``eps - x0``. ``method``
    euler (one evaluation per step) or heun (two, second order). ``capture`` holds step indices
    i in [0, steps) (x before step i, x0_hat = x - t v).
    """
    if method not in ("euler", "heun"):
        raise UserError(f"unknown flow sampler '{method}'; choose euler or heun")
    if steps < 1:
        raise UserError(f"flow sampler steps must be >= 1, got {steps}")
    device = _device(y, generator, device)
    x = _start(shape, generator, x_T, device)
    ts = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()
    traj = {}
    for i in range(steps):
        t, t_next = ts[i], ts[i + 1]
        v = velocity_model(x, torch.full((shape[0],), t, device=device), y).float()
        if capture is not None and i in capture:
            traj[i] = (x.cpu(), (x - t * v).cpu())
        x_next = x + (t_next - t) * v
        if method == "heun":
            v_next = velocity_model(x_next, torch.full((shape[0],), t_next, device=device), y).float()
            x_next = x + (t_next - t) * 0.5 * (v + v_next)
        x = x_next
    return x if capture is None else (x, traj)


def slerp(z0: torch.Tensor, z1: torch.Tensor, alpha: float) -> torch.Tensor:
    """Spherical interpolation between two noise tensors of the same shape; alpha in [0, 1]."""
    a, b = z0.flatten().double(), z1.flatten().double()
    cos = torch.dot(a, b) / (a.norm() * b.norm())
    theta = torch.arccos(cos.clamp(-1.0, 1.0)).item()
    if theta < 1e-6:
        return ((1 - alpha) * z0 + alpha * z1).to(z0.dtype)
    w0 = math.sin((1 - alpha) * theta) / math.sin(theta)
    w1 = math.sin(alpha * theta) / math.sin(theta)
    return (w0 * z0.double() + w1 * z1.double()).to(z0.dtype)


def interpolate(eps_model: EpsModel, sched: NoiseSchedule, z0: torch.Tensor, z1: torch.Tensor, n: int,
                y=None, *, steps: int = 50) -> torch.Tensor:
    """Decode ``n`` slerps between noises z0, z1 (each (C, H, W)) deterministically with DDIM (eta = 0).

    y: None or LongTensor (n,). Returns (n, C, H, W).
    """
    x_T = torch.stack([slerp(z0, z1, a) for a in torch.linspace(0, 1, n).tolist()])
    gen = torch.Generator(device=z0.device).manual_seed(0)  # unused at eta = 0
    return sample_ddim(eps_model, sched, x_T.shape, y, steps=steps, generator=gen, eta=0.0, x_T=x_T,
                       device=z0.device)
