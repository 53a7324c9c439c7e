"""Training objectives, one class each: how training draws noise levels, the per-sample loss, and the
model a sampler integrates. Nothing outside ``ddpm.diffusion`` asks for an objective's name; the training
loop, the sample grids, the evaluation and the config check ask the object
(:func:`ddpm.diffusion.from_config.objective_for` builds it once from a config).

    obj = objective_for(cfg)
    t = obj.draw(generator, B, device)                 # noise levels of a batch
    per_sample = obj.loss(net, x0, y, noise, t, drop)  # (B,) float32
    q = obj.bucket(t)                                  # loss by noise-level quartile, LongTensor (B,) in [0, 4)
    model = obj.denoiser(net)                          # (x, t, y) -> eps or velocity, for the samplers

Randomness (noise, t, label-drop mask) is passed in, never drawn here except through the caller's
generator: the training loop draws it as a pure function of (seed, step) so a resumed run repeats it.
Adding an objective is one class here (registered with ``@objective``) plus its tests.
"""
import math

import torch
import torch.nn.functional as F

from ddpm.diffusion.schedule import NoiseSchedule
from ddpm.errors import UserError

OBJECTIVES: dict = {}  # name -> class, in the order of registration (the config's list of choices)


def objective(name: str):
    """Class decorator: register an :class:`Objective` under ``name`` (``diffusion.objective`` in configs)."""
    def register(cls):
        cls.name = name
        OBJECTIVES[name] = cls
        return cls
    return register


def q_sample(sched: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``x_t ~ q(x_t | x_0)`` (Ho et al. 2020, eq. 4). x0, noise: (B, C, H, W); t: LongTensor (B,) in [0, T)."""
    s = sched.to(x0.device, torch.float32)
    return NoiseSchedule.gather(s.sqrt_alpha_bars, t, x0.ndim) * x0 + \
        NoiseSchedule.gather(s.sqrt_one_minus_alpha_bars, t, x0.ndim) * noise


def drop_labels(y: torch.Tensor, drop: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Replace labels where ``drop`` (bool (B,)) is set by the null class ``num_classes`` (CFG training)."""
    return torch.where(drop, torch.full_like(y, num_classes), y)


def _mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


class Objective:
    """What every objective answers. ``schedule``: the run's NoiseSchedule (float64); ``sigma``: the
    one-step denoiser's noise level; ``num_classes``: the net's classes (0: unconditional)."""
    name = ""
    kind = "generative"              # generative | denoiser | classifier: what an evaluation can do with a run
    samplers = ("ddpm", "ddim", "dpmpp_2m")  # the samplers that integrate its denoiser
    arch: str | None = None          # the one net architecture it trains, if any
    quartiles = True                 # loss/q0..q3 by noise level (False: a single noise level)

    def __init__(self, *, schedule: NoiseSchedule | None = None, sigma: float = 0.5, num_classes: int = 0):
        self.schedule, self.sigma, self.num_classes = schedule, sigma, num_classes

    def draw(self, gen: torch.Generator, n: int, device) -> torch.Tensor:
        """Noise levels of n training samples: timesteps, LongTensor (n,) in [0, T) (flows: floats)."""
        return torch.randint(0, self.schedule.T, (n,), generator=gen, device=device)

    def bucket(self, t: torch.Tensor) -> torch.Tensor:
        """The noise-level quartile of each sample, LongTensor (B,) in [0, 4)."""
        return (t * 4 // self.schedule.T).clamp(max=3)

    def labels(self, y: torch.Tensor, drop: torch.Tensor):
        """The net's class input: y with the dropped labels set to the null class; None if unconditional."""
        return drop_labels(y, drop, self.num_classes) if self.num_classes else None

    def loss(self, net, x0, y, noise, t, drop) -> torch.Tensor:
        """Per-sample loss (B,) float32 of ``net`` on clean images x0 (B, C, H, W) with labels y (B,)."""
        raise NotImplementedError

    def denoiser(self, net):
        """``(x, t, y) -> eps`` (flows: velocity) of a trained net, the model the samplers integrate."""
        raise UserError(f"models trained with diffusion.objective={self.name} do not generate samples")


class _Prediction(Objective):
    """Diffusion on the discrete schedule with an MSE on one of three equivalent targets."""

    def target(self, x0, noise, t) -> torch.Tensor:
        raise NotImplementedError

    def to_eps(self, x_t, t, out) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, net, x0, y, noise, t, drop):
        return _mse(net(q_sample(self.schedule, x0, t, noise), t, self.labels(y, drop)), self.target(x0, noise, t))

    def denoiser(self, net):
        return lambda x, t, y: self.to_eps(x, t, net(x, t, y).float())

    def _coefs(self, t, like):
        s = self.schedule.to(like.device, torch.float32)
        return (NoiseSchedule.gather(s.sqrt_alpha_bars, t, like.ndim),
                NoiseSchedule.gather(s.sqrt_one_minus_alpha_bars, t, like.ndim))


@objective("eps")
class EpsPrediction(_Prediction):
    """The net predicts the added noise (Ho et al. 2020, eq. 14: the simplified loss)."""

    def target(self, x0, noise, t):
        return noise

    def to_eps(self, x_t, t, out):
        return out

    def denoiser(self, net):
        return net


@objective("x0")
class X0Prediction(_Prediction):
    """The net predicts the clean image; eps = (x_t - sqrt(ab) x0) / sqrt(1 - ab)."""

    def target(self, x0, noise, t):
        return x0

    def to_eps(self, x_t, t, out):
        a, s = self._coefs(t, x_t)
        return (x_t - a * out) / s


@objective("v")
class VPrediction(_Prediction):
    """The net predicts ``v = sqrt(ab) eps - sqrt(1 - ab) x0`` (Salimans & Ho 2022, section 4);
    eps = sqrt(1 - ab) x_t + sqrt(ab) v."""

    def target(self, x0, noise, t):
        a, s = self._coefs(t, x0)
        return a * noise - s * x0

    def to_eps(self, x_t, t, out):
        a, s = self._coefs(t, x_t)
        return s * x_t + a * out


@objective("rectified_flow")
class RectifiedFlow(Objective):
    """``x_t = (1 - t) x0 + t eps`` with float t in [0, 1], target velocity ``eps - x0`` (Liu et al. 2023,
    eq. 1); the net's output is the velocity the flow samplers integrate."""
    samplers = ("euler", "heun", "dpmpp_2m")

    def draw(self, gen, n, device):
        return torch.rand(n, generator=gen, device=device)

    def bucket(self, t):
        return (t * 4).long().clamp(max=3)

    def loss(self, net, x0, y, noise, t, drop):
        tt = t.reshape(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
        return _mse(net((1 - tt) * x0 + tt * noise, t, self.labels(y, drop)), noise - x0)

    def denoiser(self, net):
        return net


@objective("edm")
class EDMPreconditioned(Objective):
    """Karras et al. 2022 ("EDM", Table 1, right column): ``x = x0 + sigma n`` with
    ``ln sigma ~ N(P_MEAN, P_STD^2)``; the net F is preconditioned, ``D(x; sigma) = c_skip x + c_out F(c_in x;
    c_noise)`` (eq. 7) with ``c_skip = sd^2 / (sigma^2 + sd^2)``, ``c_out = sigma sd / sqrt(sigma^2 + sd^2)``,
    ``c_in = 1 / sqrt(sigma^2 + sd^2)`` (sd: SIGMA_DATA), and trained with ``lambda(sigma) ||D - x0||^2``,
    ``lambda = 1 / c_out^2`` (eq. 8), i.e. ``||F - (x0 - c_skip x) / c_out||^2``: a unit-variance target at
    every noise level. EDM's c_noise is ``ln(sigma) / 4``; our nets take a time in [0, 1], so ln sigma is
    mapped affinely, [SIGMA_MIN, SIGMA_MAX] onto [0, 1] (:meth:`net_time`).

    Noise levels are floats (B,) sigma; the denoiser is ``(x, sigma, y) -> eps = (x - D) / sigma``, an eps
    model of ``x = x0 + sigma eps`` (alpha 1), which DPM-Solver++ integrates over :func:`ddpm.diffusion.
    samplers.karras_sigmas` from SIGMA_MAX.
    """
    samplers = ("dpmpp_2m",)
    SIGMA_DATA, P_MEAN, P_STD = 0.5, -1.2, 1.2   # Table 1: CIFAR-10's sigma_data; the training distribution
    SIGMA_MIN, SIGMA_MAX = 0.002, 80.0           # Table 1: the sampler's range

    def draw(self, gen, n, device):
        return (self.P_MEAN + self.P_STD * torch.randn(n, generator=gen, device=device)).exp()

    def bucket(self, sigma):
        """Quartiles of the training distribution of sigma (each holds a quarter of the draws)."""
        z = (sigma.double().log() - self.P_MEAN) / self.P_STD
        return (torch.special.ndtr(z) * 4).long().clamp(0, 3)

    def net_time(self, sigma: torch.Tensor) -> torch.Tensor:
        """c_noise: ln sigma mapped onto the nets' time in [0, 1] (SIGMA_MIN -> 0, SIGMA_MAX -> 1), float32 (B,)."""
        lo, hi = math.log(self.SIGMA_MIN), math.log(self.SIGMA_MAX)
        return ((sigma.float().log() - lo) / (hi - lo)).reshape(-1)

    def coefficients(self, sigma: torch.Tensor, ndim: int):
        """(c_skip, c_out, c_in), each float32 (B, 1, ..., 1)."""
        s = sigma.float().reshape(-1, *([1] * (ndim - 1)))
        sd2 = self.SIGMA_DATA ** 2
        norm = (s ** 2 + sd2).rsqrt()
        return sd2 * norm ** 2, s * self.SIGMA_DATA * norm, norm

    def loss(self, net, x0, y, noise, t, drop):
        c_skip, c_out, c_in = self.coefficients(t, x0.ndim)
        x = x0.float() + t.float().reshape(c_in.shape) * noise.float()
        out = net(c_in * x, self.net_time(t), self.labels(y, drop))
        return _mse(out, (x0.float() - c_skip * x) / c_out)

    def denoiser(self, net):
        def eps(x, sigma, y):
            c_skip, c_out, c_in = self.coefficients(sigma, x.ndim)
            d = c_skip * x + c_out * net(c_in * x, self.net_time(sigma), y).float()
            return (x - d) / sigma.float().reshape(c_in.shape)
        return eps


@objective("denoiser")
class OneStepDenoiser(Objective):
    """A one-step denoiser at a fixed noise level (CS180 part 1): the net maps ``x0 + sigma eps`` to x0."""
    kind, samplers, arch, quartiles = "denoiser", (), "cs180_denoiser", False

    def loss(self, net, x0, y, noise, t, drop):
        return _mse(net(x0 + self.sigma * noise), x0)


@objective("classifier")
class NoisyClassifier(Objective):
    """A noisy classifier ``p(y | x_t, t)`` for classifier guidance (Dhariwal & Nichol 2021, section 4):
    cross-entropy on q_sample(x0, t) with the true labels (no label dropout)."""
    kind, samplers, arch = "classifier", (), "noisy_classifier"

    def loss(self, net, x0, y, noise, t, drop):
        logits = net(q_sample(self.schedule, x0, t, noise), t)
        return F.cross_entropy(logits.float(), y, reduction="none")
