"""Samplers and guidance, all of one call shape (k-diffusion's):

    x0 = sample_X(model, x, steps, labels, *, noise=None, callback=None, ...)

- ``model(x, t, y)``: the objective's denoiser (:meth:`ddpm.diffusion.objectives.Objective.denoiser`), an
  eps prediction for DDPM/DDIM and a velocity for the flow samplers, possibly wrapped by a guidance
  function below; any callable of that shape works (the closed-form models of the tests).
- ``x`` (B, C, H, W): the starting noise. The caller draws it, so that sample i depends on its own noise
  only (:func:`ddpm.diffusion.from_config.start_noise`).
- ``steps``: what the sampler visits: timesteps in [0, T), descending (DDPM, DDIM), flow times from 1
  to 0 (Euler, Heun), or a :class:`Trajectory` (DPM-Solver++, for every objective).
- ``labels``: LongTensor (B,) or None.
- ``noise``: the per-step noise of a stochastic sampler, a :class:`StepNoise`: sample i's noise at step k
  is a function of (its seed, k), never of the batch it happens to share.
- ``callback(step, t, x, x0)``: called before every update with the step index, the timestep or time,
  the current x and the predicted clean image (figures, GIFs); it must not modify them.

Every sampler runs under ``torch.inference_mode()`` and returns the final x (B, C, H, W). Per-step scalars
come from the float64 schedule on the host as Python floats, so the loop issues no device-to-host syncs.
"""
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ddpm.diffusion.schedule import NoiseSchedule
from ddpm.errors import UserError

CONVENTIONS = ("gamma", "w")
Model = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


class StepNoise:
    """The per-step noise of a batch: row i at step k is ``N(0, I)`` of shape ``shape`` (one sample's
    (C, H, W)), a pure function of (``seeds[i]``, k): the same on any device and in any batch.

    Counter-based, so that a step costs a few vectorised integer operations instead of one generator per
    sample: a row's key is a 32-bit hash (Wellons' lowbias32) of its 63-bit seed and the step; every
    pair of values comes from two uniforms, hashes of that key and the pair's index, by the Box-Muller
    transform (float64, then float32). With 32-bit uniforms the normals reach 6.6 standard deviations.
    Consecutive steps are made together, up to BLOCK values: about 20 ms per million values on the CPU.
    """

    BLOCK = 1 << 20  # values made at once: several steps together (few kernel launches), bounded memory

    def __init__(self, seeds: Sequence[int], shape, device):
        self.shape, self.device = tuple(shape), torch.device(device)
        seeds = torch.tensor([int(s) & _U63 for s in seeds], dtype=torch.int64)
        self.lo, self.hi = (seeds & _U32).to(self.device), (seeds >> 32).to(self.device)
        n = math.prod(self.shape)
        self.pairs = (n + 1) // 2  # Box-Muller turns two uniforms into two normals
        self.elements = _hash32(torch.arange(2 * self.pairs, dtype=torch.int64, device=self.device))
        self.span = max(1, self.BLOCK // max(1, len(seeds) * n))  # steps per block
        self.block, self.first = None, None

    def __call__(self, k: int) -> torch.Tensor:
        if self.block is None or not self.first <= k < self.first + len(self.block):
            self.first = k - k % self.span
            self.block = self._draw(range(self.first, self.first + self.span))
        return self.block[k - self.first]

    def _draw(self, steps: range) -> torch.Tensor:
        """(len(steps), B, *shape) float32."""
        k = _hash32(torch.tensor([s & _U32 for s in steps], dtype=torch.int64, device=self.device))
        row = _hash32(self.lo[None, :] ^ _hash32(self.hi[None, :] ^ k[:, None]))       # (S, B)
        bits = _hash32(row[:, :, None] ^ self.elements)                             # (S, B, 2 pairs)
        u = (bits.double() + 0.5) / 2 ** 32
        r, theta = torch.sqrt(-2 * torch.log(u[..., :self.pairs])), 2 * math.pi * u[..., self.pairs:]
        z = torch.cat([r * torch.cos(theta), r * torch.sin(theta)], -1)[..., :math.prod(self.shape)]  # Box & Muller 1958
        return z.float().reshape(len(steps), -1, *self.shape)


_U32, _U63 = (1 << 32) - 1, (1 << 63) - 1


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 x in [0, 2**32), without int64 overflow (c split into 16-bit halves)."""
    return ((((x * (c >> 16)) & 0xFFFF) << 16) + x * (c & 0xFFFF)) & _U32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """Wellons' lowbias32 integer hash of int64 values in [0, 2**32) (non-negative: shifts are logical)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


# ----- guidance ----------------------------------------------------------------------------------
def to_gamma(scale: float, convention: str) -> float:
    """Guidance scale in the gamma convention. gamma: ``e_u + g (e_c - e_u)``; w: ``(1 + w) e_c - w e_u``."""
    if convention == "gamma":
        return float(scale)
    if convention == "w":
        return 1.0 + float(scale)
    raise UserError(f"unknown guidance convention '{convention}'; choose one of: {', '.join(CONVENTIONS)}")


def classifier_free_guidance(model, scale: float, convention: str = "gamma", num_classes: int | None = None) -> Model:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6: ``(1 + w) e(x, c) - w e(x)``; here in either
    convention, ``e_u + gamma (e_c - e_u)`` with gamma = 1 + w) around a class-conditional ``model``.

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


def classifier_guidance(model: Model, classifier, sched: NoiseSchedule, scale: float) -> Model:
    """Classifier guidance (Dhariwal & Nichol 2021, Algorithm 2 and eq. 14):
    ``eps - scale * sqrt(1 - ab_t) * grad_x log p(y | x_t, t)``.

    ``classifier(x, t) -> logits (B, K)`` is a noisy classifier. With scale 1, an unconditional
    ``model`` and the exact classifier this is the exact conditional eps (Bayes' rule on scores).
    """
    def guided(x, t, y):
        if y is None:
            raise UserError("classifier guidance needs class labels to guide towards")
        eps = model(x, t, y)
        with torch.inference_mode(False), torch.enable_grad():
            xg = x.detach().clone().requires_grad_(True)
            logp = F.log_softmax(classifier(xg, t.clone()).float(), dim=-1)
            grad, = torch.autograd.grad(logp.gather(1, y.clone()[:, None]).sum(), xg)
        s = sched.to(x.device, x.dtype)
        return eps - scale * NoiseSchedule.gather(s.sqrt_one_minus_alpha_bars, t, x.ndim) * grad

    return guided


# ----- DDPM / DDIM -------------------------------------------------------------------------------
def _at(t: int, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)


def _x0_from_eps(x, eps, ab: float, clip: bool) -> torch.Tensor:
    """``x0_hat = (x_t - sqrt(1 - ab) eps) / sqrt(ab)`` (Ho et al. 2020, eq. 15), clipped to [-1, 1] if asked."""
    x0 = (x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
    return x0.clamp(-1, 1) if clip else x0


@torch.inference_mode()
def sample_ddpm(model: Model, x: torch.Tensor, steps: Sequence[int], labels=None, *, schedule: NoiseSchedule,
                noise: StepNoise, form: str = "eps", variance: str = "beta", clip_x0: bool = False,
                callback=None) -> torch.Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, Algorithm 2) over ``steps`` (all of T-1 .. 0).

    form ``eps``: Algorithm 2's line 4, ``x_{t-1} = (x_t - beta_t / sqrt(1 - ab_t) eps) / sqrt(alpha_t) + sigma_t z``.
    form ``x0``: ``x0_hat`` (eq. 15, optionally clipped to [-1, 1] as the paper's code does), then the
    posterior mean ``coef_x0 x0_hat + coef_xt x_t`` of eq. 7 plus ``sigma_t z``. Without clipping both forms
    are the same update and agree to rounding. ``variance``: sigma_t^2 = beta_t ("beta") or beta tilde
    ("beta_tilde", eq. 7); both are the paper's choices (section 3.2). No noise is added at t = 0.
    """
    if form not in ("eps", "x0"):
        raise UserError(f"unknown DDPM form '{form}'; choose eps or x0")
    if variance not in ("beta", "beta_tilde"):
        raise UserError(f"unknown DDPM variance '{variance}'; choose beta or beta_tilde")
    if clip_x0 and form == "eps":
        raise UserError("x0 clipping needs the x0 form of DDPM (form='x0')")
    s = schedule
    var = s.betas if variance == "beta" else s.posterior_variance
    x = x.float().clone()
    for k, t in enumerate(steps):
        eps = model(x, _at(t, x), labels).float()
        ab = s.alpha_bars[t].item()
        x0 = _x0_from_eps(x, eps, ab, clip_x0) if form == "x0" or callback is not None else None
        if callback is not None:
            callback(k, t, x, x0)
        if form == "eps":
            x = (x - s.betas[t].item() / math.sqrt(1 - ab) * eps) / math.sqrt(s.alphas[t].item())
        else:
            x = s.posterior_mean_coef_x0[t].item() * x0 + s.posterior_mean_coef_xt[t].item() * x
        if t > 0:
            x = x + math.sqrt(var[t].item()) * noise(k)
    return x


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
def sample_ddim(model: Model, x: torch.Tensor, steps: Sequence[int], labels=None, *, schedule: NoiseSchedule,
                noise: StepNoise | None = None, eta: float = 0.0, clip_x0: bool = False,
                callback=None) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12, with sigma_t of eq. 16 scaled by ``eta``) over ``steps`` (e.g.
    :func:`ddim_timesteps`). eta = 0 is deterministic (needs no ``noise``); eta = 1 over all T steps
    equals DDPM with sigma^2 = beta tilde. With ``clip_x0`` the eps is recomputed from the clipped x0_hat."""
    if not 0.0 <= eta <= 1.0:
        raise UserError(f"DDIM eta must be in [0, 1], got {eta}")
    if eta > 0 and noise is None:
        raise UserError("DDIM with eta > 0 draws noise: pass noise=StepNoise(...)")
    s = schedule
    steps = list(steps)
    x = x.float().clone()
    for k, t in enumerate(steps):
        t_prev = steps[k + 1] if k + 1 < len(steps) else -1
        eps = model(x, _at(t, x), labels).float()
        ab = s.alpha_bars[t].item()
        ab_prev = s.alpha_bars[t_prev].item() if t_prev >= 0 else 1.0
        x0 = _x0_from_eps(x, eps, ab, clip_x0)
        if clip_x0:
            eps = (x - math.sqrt(ab) * x0) / math.sqrt(1 - ab)
        if callback is not None:
            callback(k, t, x, x0)
        sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
        x = math.sqrt(ab_prev) * x0 + math.sqrt(max(1 - ab_prev - sigma ** 2, 0.0)) * eps
        if t_prev >= 0 and sigma > 0:
            x = x + sigma * noise(k)
    return x


# ----- rectified flow ----------------------------------------------------------------------------
def flow_times(steps: int) -> list[float]:
    """``steps + 1`` evenly spaced times from 1 (noise) to 0 (data), computed in float64."""
    if steps < 1:
        raise UserError(f"flow sampler steps must be >= 1, got {steps}")
    return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()


def _velocity(model, x, t: float, labels) -> torch.Tensor:
    return model(x, torch.full((x.shape[0],), t, device=x.device), labels).float()


@torch.inference_mode()
def sample_euler(model: Model, x: torch.Tensor, steps: Sequence[float], labels=None, *, noise=None,
                 callback=None) -> torch.Tensor:
    """Euler's method on the rectified-flow ODE ``dx/dt = v(x, t)`` (Liu et al. 2023, "Flow straight and
    fast", eq. 1, integrated from t = 1 (noise) to t = 0 (data)): ``x <- x + (t_next - t) v(x, t)``. The
    velocity predicts ``eps - x0``, so ``x0_hat = x - t v``. ``steps``: :func:`flow_times`. Deterministic."""
    x = x.float().clone()
    for k, (t, t_next) in enumerate(zip(steps[:-1], steps[1:])):
        v = _velocity(model, x, t, labels)
        if callback is not None:
            callback(k, t, x, x - t * v)
        x = x + (t_next - t) * v
    return x


@torch.inference_mode()
def sample_heun(model: Model, x: torch.Tensor, steps: Sequence[float], labels=None, *, noise=None,
                callback=None) -> torch.Tensor:
    """Heun's second-order method on the rectified-flow ODE (the deterministic sampler of Karras et al.
    2022, Algorithm 1, on the flow's time): an Euler step, then the average of the velocities at both
    ends; two evaluations per step. ``steps``: :func:`flow_times`. Deterministic."""
    x = x.float().clone()
    for k, (t, t_next) in enumerate(zip(steps[:-1], steps[1:])):
        v = _velocity(model, x, t, labels)
        if callback is not None:
            callback(k, t, x, x - t * v)
        x_euler = x + (t_next - t) * v
        x = x + (t_next - t) * 0.5 * (v + _velocity(model, x_euler, t_next, labels))
    return x


# ----- DPM-Solver++(2M): any objective, as x = alpha x0 + sigma eps --------------------------------
@dataclass(frozen=True)
class Trajectory:
    """The points an ODE solver visits from noise towards data, ``x = alpha x0 + sigma eps`` at each; after
    the last it lands on the clean image. ``times``: the model's time input there (timesteps in [0, T),
    flow times in (0, 1], or EDM's sigmas); ``output``: what the model returns, ``eps`` (x0 = (x - sigma
    out) / alpha) or ``velocity`` (rectified flow's v = eps - x0, alpha = 1 - sigma: x0 = x - sigma v)."""
    times: tuple
    alphas: tuple
    sigmas: tuple
    output: str = "eps"

    def __post_init__(self):
        if not len(self.times) == len(self.alphas) == len(self.sigmas) >= 1 or self.output not in ("eps", "velocity"):
            raise UserError("a trajectory needs one alpha and one sigma per time, and an output eps or velocity")

    @classmethod
    def discrete(cls, schedule: NoiseSchedule, timesteps: Sequence[int]) -> "Trajectory":
        """Timesteps of a discrete schedule (eps, x0 and v objectives: their denoiser returns eps)."""
        ab = [schedule.alpha_bars[t].item() for t in timesteps]
        return cls(tuple(map(int, timesteps)), tuple(math.sqrt(a) for a in ab), tuple(math.sqrt(1 - a) for a in ab))

    @classmethod
    def flow(cls, times: Sequence[float]) -> "Trajectory":
        """Rectified-flow times in (0, 1] (``x_t = (1 - t) x0 + t eps``; the model returns the velocity)."""
        return cls(tuple(float(t) for t in times), tuple(1.0 - t for t in times), tuple(float(t) for t in times),
                   "velocity")

    @classmethod
    def noise_levels(cls, sigmas: Sequence[float]) -> "Trajectory":
        """Noise levels of ``x = x0 + sigma eps`` (Karras et al. 2022; the model's time input is sigma)."""
        return cls(tuple(float(s) for s in sigmas), (1.0,) * len(sigmas), tuple(float(s) for s in sigmas))


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> list[float]:
    """n noise levels from sigma_max down to sigma_min, evenly spaced in ``sigma^(1/rho)`` (Karras et al.
    2022, eq. 5; rho = 7 puts more steps at low noise, where the images' detail is decided)."""
    if n < 1:
        raise UserError(f"sampler steps must be >= 1, got {n}")
    if n == 1:
        return [float(sigma_max)]
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return [(a + i / (n - 1) * (b - a)) ** rho for i in range(n)]


def karras_timesteps(schedule: NoiseSchedule, n: int, rho: float = 7.0) -> list[int]:
    """n distinct timesteps of a discrete schedule, descending from T - 1 to 0, nearest (in log sigma) to
    :func:`karras_sigmas` between the schedule's own extremes, with ``sigma = sqrt((1 - ab) / ab)`` the
    noise level of ``x / sqrt(ab)`` (Karras et al. 2022, section 3; k-diffusion quantises the same way).
    Where rounding would repeat a timestep the next free one is taken, so every n in [1, T] gives n steps."""
    T = schedule.T
    if not 1 <= n <= T:
        raise UserError(f"sampler steps must be in [1, T={T}], got {n}")
    log_sigma = ((1 - schedule.alpha_bars) / schedule.alpha_bars).log() / 2      # increasing in t
    wanted = torch.tensor(karras_sigmas(n, log_sigma[0].exp().item(), log_sigma[-1].exp().item(), rho),
                          dtype=torch.float64).log()
    nearest = (log_sigma[None, :] - wanted[:, None]).abs().argmin(1).tolist()
    out = []
    for k, t in enumerate(nearest):   # strictly descending, leaving room for the n - 1 - k steps below
        t = T - 1 if k == 0 else min(t, out[-1] - 1)
        out.append(max(t, n - 1 - k))
    return out


def _log_snr(a: float, s: float) -> float:
    """lambda = log(alpha / sigma) (Lu et al. 2022, section 2), -inf at pure noise and +inf at data."""
    return -math.inf if a <= 0 else math.inf if s <= 0 else math.log(a / s)


@torch.inference_mode()
def sample_dpmpp_2m(model: Model, x: torch.Tensor, steps: Trajectory, labels=None, *, noise=None, clip_x0: bool = False,
                    callback=None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2): the multistep second-order solver of
    the probability-flow ODE in the data prediction x0, one network evaluation per point of ``steps``.

    With ``lambda = log(alpha / sigma)``, ``h_i = lambda_{i+1} - lambda_i``: ``x_{i+1} = (sigma_{i+1} / sigma_i) x_i
    - alpha_{i+1} (exp(-h_i) - 1) D_i``, D_i = x0_hat_i at the first step and ``(1 + 1 / (2 r_i)) x0_hat_i - 1 /
    (2 r_i) x0_hat_{i-1}``, ``r_i = h_{i-1} / h_i``, after it; from the last point it lands on its x0_hat, as
    DDIM's last step. First order everywhere this is DDIM (Song et al. 2021, eq. 12). ``clip_x0`` clips every
    x0_hat to [-1, 1] (the thresholding data prediction allows, Lu et al. 2022, section 3.3). Deterministic."""
    x = x.float().clone()
    prev = h_prev = None
    for k, t in enumerate(steps.times):
        at = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long if isinstance(t, int) else torch.float32)
        out, a, s = model(x, at, labels).float(), steps.alphas[k], steps.sigmas[k]
        x0 = x - s * out if steps.output == "velocity" else (x - s * out) / a
        x0 = x0.clamp(-1, 1) if clip_x0 else x0
        if callback is not None:
            callback(k, t, x, x0)
        if k == len(steps.times) - 1:
            return x0
        a_next, s_next = steps.alphas[k + 1], steps.sigmas[k + 1]
        h = _log_snr(a_next, s_next) - _log_snr(a, s)
        d = x0
        if prev is not None and math.isfinite(h_prev) and math.isfinite(h):
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * prev
        # alpha_{i+1} (1 - exp(-h)) written without exp(-h): exact also where alpha_i = 0 (flow time 1).
        x = (s_next / s) * x + (a_next - s_next * a / s) * d
        prev, h_prev = x0, h


# ----- interpolation -----------------------------------------------------------------------------
def slerp(z0: torch.Tensor, z1: torch.Tensor, alpha: float) -> torch.Tensor:
    """Spherical interpolation between two noise tensors of the same shape (Shoemake 1985); alpha in [0, 1]."""
    a, b = z0.flatten().double(), z1.flatten().double()
    cos = torch.dot(a, b) / (a.norm() * b.norm())
    theta = torch.arccos(cos.clamp(-1.0, 1.0)).item()
    if theta < 1e-6:
        return ((1 - alpha) * z0 + alpha * z1).to(z0.dtype)
    w0 = math.sin((1 - alpha) * theta) / math.sin(theta)
    w1 = math.sin(alpha * theta) / math.sin(theta)
    return (w0 * z0.double() + w1 * z1.double()).to(z0.dtype)
