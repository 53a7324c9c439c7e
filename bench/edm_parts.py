"""EDM's objective with one of its three parts taken out, to measure each (bench/cifar_quality.py --ablations).

Karras et al. 2022 change three things at once against the DDPM paper's objective (Table 1), and
``diffusion.objective=edm`` (:class:`ddpm.diffusion.objectives.EDMPreconditioned`) trains all three. Each
objective here puts one back the way the DDPM paper has it, and keeps the other two:

- ``edm-vp-sigma`` (the noise-level distribution): sigma drawn as the DDPM paper draws noise levels, t
  uniform on {1..1000} of the linear schedule (beta 1e-4..0.02), sigma_t = sqrt((1 - abar_t) / abar_t),
  instead of ln sigma ~ N(-1.2, 1.2^2).
- ``edm-unweighted`` (the loss weighting): lambda(sigma) = 1 (scaled by 1 / sigma_data^2, so the largest
  weight is 1) instead of 1 / c_out^2: ``||D - x0||^2``, which gives the low noise levels little weight.
- ``edm-eps`` (the preconditioning): the net predicts the noise, D = x - sigma F(c_in x; c_noise) (c_skip 1,
  c_out -sigma: the DDPM paper's parameterisation) with the eps loss ||F - n||^2, instead of EDM's c_skip and
  c_out; c_in, c_noise and the sigma distribution stay EDM's.

These are measurements, not recipes: they live in bench/ and join ``diffusion.objective``'s choices only in a
process that calls :func:`register`. ``python -m bench.edm_parts MODULE ARGS...`` runs ``python -m MODULE
ARGS...`` (jobs.train, jobs.evaluate) with them registered, which is how the bench trains and scores them.
"""
import runpy
import sys

import torch

from ddpm.diffusion.objectives import OBJECTIVES, EDMPreconditioned, objective
from ddpm.diffusion.schedule import NoiseSchedule

PARTS = {  # objective name -> what it puts back
    "edm-vp-sigma": "the DDPM paper's noise levels (uniform t, linear T = 1000)",
    "edm-unweighted": "loss weight 1 instead of 1/c_out^2",
    "edm-eps": "the eps parameterisation instead of EDM's c_skip/c_out",
}


class EDMWithVPSigmas(EDMPreconditioned):
    """EDM with the DDPM paper's noise levels: t uniform on the linear T = 1000 schedule,
    sigma_t = sqrt((1 - abar) / abar)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        abar = NoiseSchedule.make("linear", 1000).alpha_bars.double()
        self.sigmas = ((1 - abar) / abar).sqrt()                     # increasing in t, 0.01 .. 157
        self.quartile_edges = self.sigmas[[250, 500, 750]]

    def draw(self, gen, n, device):
        t = torch.randint(0, len(self.sigmas), (n,), generator=gen, device=device)
        return self.sigmas.to(device)[t].float()

    def bucket(self, sigma):
        return torch.bucketize(sigma.double(), self.quartile_edges.to(sigma.device))


class EDMUnweighted(EDMPreconditioned):
    """EDM with lambda(sigma) = 1 / sigma_data^2:
    ||D - x0||^2 / sigma_data^2 = (c_out / sigma_data)^2 ||F - target||^2."""

    def loss(self, net, x0, y, noise, t, drop):
        _, c_out, _ = self.coefficients(t, x0.ndim)
        return super().loss(net, x0, y, noise, t, drop) * (c_out.flatten() / self.SIGMA_DATA) ** 2


class EDMEpsParameterised(EDMPreconditioned):
    """EDM's sigma distribution, c_in and c_noise with the eps parameterisation: D = x - sigma F, loss ||F - n||^2."""

    def loss(self, net, x0, y, noise, t, drop):
        _, _, c_in = self.coefficients(t, x0.ndim)
        x = x0.float() + t.float().reshape(c_in.shape) * noise.float()
        out = net(c_in * x, self.net_time(t), self.labels(y, drop)).float()
        return (out - noise.float()).pow(2).flatten(1).mean(1)

    def denoiser(self, net):
        def eps(x, sigma, y):
            _, _, c_in = self.coefficients(sigma, x.ndim)
            return net(c_in * x, self.net_time(sigma), y).float()
        return eps


def register() -> None:
    """Add the three objectives to ``diffusion.objective``'s choices in this process (idempotent)."""
    for name, cls in zip(PARTS, (EDMWithVPSigmas, EDMUnweighted, EDMEpsParameterised)):
        if name not in OBJECTIVES:
            objective(name)(cls)


if __name__ == "__main__":
    register()
    if len(sys.argv) < 2:
        raise SystemExit("usage: python -m bench.edm_parts MODULE [ARGS...]   (e.g. jobs.train --config ...)")
    module, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
