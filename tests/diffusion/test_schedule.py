import math

import pytest
import torch

from ddpm.diffusion.schedule import NoiseSchedule, make_betas
from ddpm.errors import UserError


def test_linear_matches_closed_form_and_published_values():
    s = NoiseSchedule.make("linear", T=1000, beta_start=1e-4, beta_end=0.02)
    assert s.betas.dtype == torch.float64 and s.T == 1000
    t = torch.arange(1000, dtype=torch.float64)
    assert torch.allclose(s.betas, 1e-4 + t * (0.02 - 1e-4) / 999, rtol=0, atol=1e-15)
    # Ho et al. 2020's schedule: alpha_bar at the last step is ~4.04e-5 (x_T is almost pure noise).
    assert s.alpha_bars[-1].item() == pytest.approx(4.0358e-5, rel=1e-3)
    # alpha_bar_t = prod_{s<=t} (1 - beta_s), checked in closed form via logs.
    assert torch.allclose(s.alpha_bars.log(), torch.cumsum(torch.log1p(-s.betas), 0), atol=1e-12)
    assert torch.allclose(s.sqrt_alpha_bars ** 2 + s.sqrt_one_minus_alpha_bars ** 2, torch.ones(1000, dtype=torch.float64))
    assert torch.allclose(s.sqrt_recip_alphas, 1 / torch.sqrt(1 - s.betas))


def test_cosine_matches_nichol_dhariwal():
    T, sv = 1000, 0.008
    s = NoiseSchedule.make("cosine", T=T)
    f = lambda u: math.cos((u + sv) / (1 + sv) * math.pi / 2) ** 2
    for t in (0, 10, 500, 900):  # away from the clipped tail, alpha_bar_t = f((t+1)/T) / f(0)
        assert s.alpha_bars[t].item() == pytest.approx(f((t + 1) / T) / f(0), rel=1e-9)
    assert s.betas.max().item() == pytest.approx(0.999)  # clipped at the end
    assert s.betas[0].item() == pytest.approx(1 - f(1 / T) / f(0))


def test_quadratic():
    s = NoiseSchedule.make("quadratic", T=10, beta_start=1e-4, beta_end=0.02)
    expected = torch.linspace(0.01, math.sqrt(0.02), 10, dtype=torch.float64) ** 2
    assert torch.allclose(s.betas, expected)


def test_posterior_against_direct_gaussian_conditioning():
    """q(x_{t-1} | x_t, x_0) from the joint Gaussian of (x_{t-1}, x_t) given x_0 (scalar case)."""
    s = NoiseSchedule.make("linear", T=50, beta_start=1e-3, beta_end=0.2)
    for t in (1, 7, 30, 49):
        ab_prev, beta = s.alpha_bars[t - 1].item(), s.betas[t].item()
        # x_{t-1} = sqrt(ab_prev) x0 + sqrt(1-ab_prev) e1 ; x_t = sqrt(1-beta) x_{t-1} + sqrt(beta) e2
        var_prev = 1 - ab_prev
        var_t = (1 - beta) * var_prev + beta
        cov = math.sqrt(1 - beta) * var_prev
        cond_var = var_prev - cov ** 2 / var_t
        # mean = sqrt(ab_prev) x0 + cov/var_t (x_t - sqrt(ab_t) x0)
        coef_xt = cov / var_t
        coef_x0 = math.sqrt(ab_prev) - coef_xt * math.sqrt(s.alpha_bars[t].item())
        assert s.posterior_variance[t].item() == pytest.approx(cond_var, rel=1e-10)
        assert s.posterior_mean_coef_xt[t].item() == pytest.approx(coef_xt, rel=1e-10)
        assert s.posterior_mean_coef_x0[t].item() == pytest.approx(coef_x0, rel=1e-10)
    assert s.posterior_variance[0].item() == 0.0
    assert s.posterior_mean_coef_x0[0].item() == pytest.approx(1.0)
    assert torch.isfinite(s.posterior_log_variance).all()


def test_to_device_dtype_is_cached_and_cast():
    s = NoiseSchedule.make("linear", T=100)
    f = s.to("cpu", torch.float32)
    assert f.betas.dtype == torch.float32 and f.T == 100
    assert s.to("cpu", torch.float32) is f
    assert torch.allclose(f.alpha_bars.double(), s.alpha_bars, rtol=1e-6)
    idx = NoiseSchedule.gather(f.alpha_bars, torch.tensor([0, 99]), 4)
    assert idx.shape == (2, 1, 1, 1)


@pytest.mark.parametrize("kwargs, match", [
    (dict(kind="linear", T=1), "T must be"),
    (dict(kind="linear", T=10, beta_start=0.0), "beta_start"),
    (dict(kind="linear", T=10, beta_end=1.0), "beta_end"),
    (dict(kind="sigmoid", T=10), "choose one of: linear, cosine, quadratic"),
])
def test_invalid_parameters(kwargs, match):
    with pytest.raises(UserError, match=match):
        make_betas(**kwargs)


def test_invalid_betas_and_non_decreasing_alpha_bar():
    with pytest.raises(UserError, match=r"\(0, 1\)"):
        NoiseSchedule(torch.tensor([0.1, 1.5]))
    with pytest.raises(UserError, match="T >= 2"):
        NoiseSchedule(torch.tensor([0.1]))
    # Betas so tiny that alpha_bar does not decrease in float64.
    with pytest.raises(UserError, match="decrease"):
        NoiseSchedule(torch.full((4,), 1e-300, dtype=torch.float64))
