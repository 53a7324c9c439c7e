"""Noise schedules: one object holding every precomputed per-timestep quantity.

Timesteps are indices ``t`` in ``[0, T)``; ``betas[t]`` is the variance added at step ``t`` so that
``x_t = sqrt(alpha_bars[t]) x_0 + sqrt(1 - alpha_bars[t]) eps`` and ``alpha_bars[-1]`` (t = T-1) is the
most noised. Everything is computed in float64 and cast on demand with :meth:`NoiseSchedule.to`.
"""
import math

import torch

from ddpm.errors import UserError

KINDS = ("linear", "cosine", "quadratic")

# Buffers exposed as attributes, each a (T,) tensor.
_BUFFERS = (
    "betas", "alphas", "alpha_bars", "alpha_bars_prev", "sqrt_alpha_bars", "sqrt_one_minus_alpha_bars",
    "sqrt_recip_alphas", "posterior_variance", "posterior_log_variance", "posterior_mean_coef_x0",
    "posterior_mean_coef_xt",
)


def make_betas(kind: str, T: int, beta_start: float = 1e-4, beta_end: float = 0.02,
               cosine_s: float = 0.008) -> torch.Tensor:
    """Return betas (T,) float64 for a named schedule.

    linear: ``linspace(beta_start, beta_end, T)`` (Ho et al. 2020: 1e-4..0.02, T=1000).
    quadratic: ``linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2``.
    cosine: Nichol & Dhariwal 2021, ``alpha_bar(u) = cos((u + s)/(1 + s) * pi/2)^2`` with u = t/T,
    ``beta_t = 1 - alpha_bar((t+1)/T) / alpha_bar(t/T)`` clipped at 0.999.
    """
    if kind not in KINDS:
        raise UserError(f"unknown diffusion.schedule '{kind}'; choose one of: {', '.join(KINDS)}")
    if not isinstance(T, int) or T < 2:
        raise UserError(f"diffusion.T must be an integer >= 2, got {T!r}")
    if kind == "cosine":
        if not cosine_s > 0:
            raise UserError(f"cosine schedule offset s must be > 0, got {cosine_s}")
        u = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((u + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
        return (1 - f[1:] / f[:-1]).clamp(max=0.999)
    for name, b in (("beta_start", beta_start), ("beta_end", beta_end)):
        if not 0 < b < 1:
            raise UserError(f"diffusion.{name} must be in (0, 1), got {b}")
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    return torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), T, dtype=torch.float64) ** 2


class NoiseSchedule:
    """All per-timestep quantities of a discrete diffusion, as (T,) tensors.

    Attributes (float64 unless moved with :meth:`to`): betas, alphas, alpha_bars, alpha_bars_prev
    (with alpha_bar_{-1} = 1), sqrt_alpha_bars, sqrt_one_minus_alpha_bars, sqrt_recip_alphas,
    posterior_variance (beta tilde), posterior_log_variance (clipped at t = 0, where beta tilde is 0),
    posterior_mean_coef_x0 / posterior_mean_coef_xt with
    ``mean(x_{t-1} | x_t, x_0) = coef_x0[t] * x_0 + coef_xt[t] * x_t``.
    """

    def __init__(self, betas: torch.Tensor):
        betas = torch.as_tensor(betas, dtype=torch.float64).flatten()
        if betas.numel() < 2:
            raise UserError(f"a noise schedule needs T >= 2 steps, got {betas.numel()}")
        if not bool(((betas > 0) & (betas < 1)).all()):
            bad = betas[(betas <= 0) | (betas >= 1)][0].item()
            raise UserError(f"every beta must lie in (0, 1), found {bad}; check diffusion.beta_start/beta_end")
        alphas = 1 - betas
        alpha_bars = torch.cumprod(alphas, 0)
        if not bool((alpha_bars[1:] < alpha_bars[:-1]).all()):
            raise UserError("alpha_bar must decrease strictly over t; the betas underflow (lower T or raise betas)")
        prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bars[:-1]])
        self.T = betas.numel()
        self.betas = betas
        self.alphas = alphas
        self.alpha_bars = alpha_bars
        self.alpha_bars_prev = prev
        self.sqrt_alpha_bars = alpha_bars.sqrt()
        self.sqrt_one_minus_alpha_bars = (1 - alpha_bars).sqrt()
        self.sqrt_recip_alphas = alphas.rsqrt()
        self.posterior_variance = betas * (1 - prev) / (1 - alpha_bars)
        # beta tilde is 0 at t = 0; improved-diffusion clips the log there to the next value.
        self.posterior_log_variance = torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]).log()
        self.posterior_mean_coef_x0 = betas * prev.sqrt() / (1 - alpha_bars)
        self.posterior_mean_coef_xt = (1 - prev) * alphas.sqrt() / (1 - alpha_bars)
        self._cache = {}

    @classmethod
    def make(cls, kind: str = "linear", T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
             cosine_s: float = 0.008) -> "NoiseSchedule":
        """Build a named schedule (see :func:`make_betas`)."""
        return cls(make_betas(kind, T, beta_start, beta_end, cosine_s))

    def to(self, device=None, dtype=torch.float32) -> "NoiseSchedule":
        """A view of this schedule with every buffer on ``device`` in ``dtype`` (cached per pair)."""
        key = (str(torch.device(device or "cpu")), dtype)
        if key not in self._cache:
            moved = object.__new__(NoiseSchedule)
            moved.T = self.T
            for name in _BUFFERS:
                setattr(moved, name, getattr(self, name).to(device=device, dtype=dtype))
            moved._cache = self._cache
            self._cache[key] = moved
        return self._cache[key]

    @staticmethod
    def gather(values: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """``values[t]`` reshaped to (B, 1, ..., 1) with ``ndim`` dims, for broadcasting against x."""
        return values[t].reshape(-1, *([1] * (ndim - 1)))
