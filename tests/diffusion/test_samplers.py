"""Samplers proved on problems with known answers: Gaussian data, for which the exact eps, velocity and
noisy classifier are closed forms, so a correct sampler must reproduce the data distribution. And the one
call shape: the caller's starting noise, per-step noise that is a function of (seed, sample index, step),
trajectories through the callback."""
import math

import pytest
import torch

from ddpm.diffusion import samplers as S
from ddpm.diffusion.schedule import NoiseSchedule
from ddpm.errors import UserError

SCHED = NoiseSchedule.make("linear", T=1000)
MU = torch.tensor([-1.0, 0.5, 2.0])   # per-class means of 1-D Gaussian data
SD = 0.3


def gaussian_eps(mu, sd=SD):
    """Exact eps(x_t, t) = E[eps | x_t] for data x0 ~ N(mu_y, sd^2) (mu indexed by class, or a scalar)."""
    ab_all = SCHED.alpha_bars.float()

    def eps(x, t, y):
        ab = ab_all[t].view(-1, 1, 1, 1)
        m = (mu[y] if y is not None else mu).view(-1, 1, 1, 1)
        return (1 - ab).sqrt() * (x - ab.sqrt() * m) / (ab * sd ** 2 + 1 - ab)
    return eps


def mixture_terms(x, t):
    ab = SCHED.alpha_bars.float()[t].view(-1, 1)
    v = ab * SD ** 2 + 1 - ab
    d = x.flatten(1) - ab.sqrt() * MU.view(1, -1)            # (B, K) for 1-pixel images
    logits = -0.5 * d ** 2 / v - 0.5 * torch.log(2 * math.pi * v)  # uniform prior over K classes
    return ab, v, d, logits


def mixture_eps(x, t, y=None):
    ab, v, d, logits = mixture_terms(x, t)
    r = logits.softmax(-1)
    return ((1 - ab).sqrt() * (r * d).sum(-1, keepdim=True) / v).view_as(x)


def mixture_classifier(x, t):
    return mixture_terms(x, t)[3]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def noise_x(n, shape=(1, 1, 1), seed=0):
    """Starting noise (n, *shape) and the per-step noise of n samples with seed ``seed``."""
    return torch.randn((n, *shape), generator=gen(seed)), S.StepNoise(range(seed * 100_000, seed * 100_000 + n),
                                                                         shape, "cpu")


ALL_T = range(999, -1, -1)



@pytest.mark.parametrize("variance", ["beta", "beta_tilde"])
def test_ddpm_reproduces_gaussian_data(variance):
    x, noise = noise_x(20000)
    x = S.sample_ddpm(gaussian_eps(torch.tensor(0.5)), x, ALL_T, schedule=SCHED, noise=noise, variance=variance)
    assert x.mean().item() == pytest.approx(0.5, abs=0.01)
    assert x.std().item() == pytest.approx(SD, abs=0.01)


def test_ddpm_forms_agree_on_same_noise():
    eps = gaussian_eps(MU)
    y = torch.tensor([0, 1, 2, 1])
    x, noise = noise_x(4, (1, 2, 2), seed=7)
    a = S.sample_ddpm(eps, x, ALL_T, y, schedule=SCHED, noise=noise, form="eps")
    b = S.sample_ddpm(eps, x, ALL_T, y, schedule=SCHED, noise=noise, form="x0")
    assert torch.allclose(a, b, atol=1e-4)
    x8, noise8 = noise_x(4, (1, 2, 2), seed=8)
    other = S.sample_ddpm(eps, x8, ALL_T, y, schedule=SCHED, noise=noise8)
    assert (a - other).abs().max().item() > 0.1  # other noise, other samples (SD = 0.5): far above rounding


def test_per_step_noise_depends_on_the_sample_not_on_its_batch():
    """Sample i's noise at step k is a function of (its seed, k): the same samples made in one batch of 6
    or in batches of 2 and 4 (in another order) are identical; other seeds give other samples."""
    eps = gaussian_eps(MU)
    seeds = [11, 12, 13, 14, 15, 16]
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    x = torch.randn(6, 1, 2, 2, generator=gen(3))
    whole = S.sample_ddpm(eps, x, ALL_T, y, schedule=SCHED, noise=S.StepNoise(seeds, (1, 2, 2), "cpu"))
    last = S.sample_ddpm(eps, x[2:], ALL_T, y[2:], schedule=SCHED, noise=S.StepNoise(seeds[2:], (1, 2, 2), "cpu"))
    first = S.sample_ddpm(eps, x[:2], ALL_T, y[:2], schedule=SCHED, noise=S.StepNoise(seeds[:2], (1, 2, 2), "cpu"))
    assert torch.equal(whole, torch.cat([first, last]))
    moved = S.sample_ddpm(eps, x, ALL_T, y, schedule=SCHED, noise=S.StepNoise([s + 1 for s in seeds], (1, 2, 2), "cpu"))
    assert (moved - whole).abs().max().item() > 0.1
    steps = S.StepNoise([5, 6], (1, 2, 2), "cpu")
    assert torch.equal(steps(3), steps(3)) and not torch.equal(steps(3), steps(4))


def test_class_conditional_sampling_routes_labels():
    y = torch.arange(3).repeat_interleave(4000)
    x, noise = noise_x(12000, seed=1)
    x = S.sample_ddpm(gaussian_eps(MU), x, ALL_T, y, schedule=SCHED, noise=noise, form="x0")
    for k in range(3):
        assert x[y == k].mean().item() == pytest.approx(MU[k].item(), abs=0.02)
        assert x[y == k].std().item() == pytest.approx(SD, abs=0.015)


def test_x0_clipping_bounds_prediction():
    seen = {}
    x, noise = noise_x(500)
    x = S.sample_ddpm(gaussian_eps(torch.tensor(2.0)), x, ALL_T, schedule=SCHED, noise=noise, form="x0", clip_x0=True,
                      callback=lambda k, t, xt, x0: seen.update({t: x0.clone()}) if t in (999, 0) else None)
    assert seen[0].abs().max() <= 1.0 and seen[999].abs().max() <= 1.0
    assert x.max().item() <= 1.0 + 1e-5
    with pytest.raises(UserError, match="x0 form"):
        x, noise = noise_x(2)
        S.sample_ddpm(gaussian_eps(MU), x, ALL_T, schedule=SCHED, noise=noise, form="eps", clip_x0=True)


def test_ddim_eta0_is_deterministic_and_follows_the_exact_flow():
    mu = torch.tensor(0.5)
    x_T = torch.randn(2000, 1, 1, 1, generator=gen(3))
    ab = SCHED.alpha_bars[-1].item()
    exact = mu + SD * (x_T - math.sqrt(ab) * mu) / math.sqrt(ab * SD ** 2 + 1 - ab)  # probability-flow map
    errs = []
    for steps in (50, 1000):
        a = S.sample_ddim(gaussian_eps(mu), x_T, S.ddim_timesteps(1000, steps), schedule=SCHED)
        b = S.sample_ddim(gaussian_eps(mu), x_T, S.ddim_timesteps(1000, steps), schedule=SCHED,
                          noise=S.StepNoise(range(2000), (1, 1, 1), "cpu"))
        assert torch.equal(a, b)  # eta = 0 draws nothing
        errs.append((a - exact).abs().max().item())
    assert errs[1] < 0.01 and errs[1] < errs[0]
    with pytest.raises(UserError, match="eta > 0 draws noise"):
        S.sample_ddim(gaussian_eps(mu), x_T, [999, 0], schedule=SCHED, eta=0.5)


def test_ddim_eta1_all_steps_equals_ddpm_with_beta_tilde():
    eps = gaussian_eps(MU)
    y = torch.tensor([2, 0, 1])
    x, noise = noise_x(3, (1, 4, 4), seed=5)
    a = S.sample_ddim(eps, x, S.ddim_timesteps(1000, 1000), y, schedule=SCHED, noise=noise, eta=1.0)
    b = S.sample_ddpm(eps, x, ALL_T, y, schedule=SCHED, noise=noise, variance="beta_tilde")
    assert torch.allclose(a, b, atol=1e-4)


def test_ddim_eta_between_samples_the_same_distribution_with_other_noise():
    """eta scales DDIM's per-step noise (Song et al., eq. 16): with exact eps and enough steps every eta
    reproduces the data distribution, and eta > 0 moves each sample away from the deterministic path."""
    x, noise = noise_x(8000, seed=2)
    outs = {}
    for eta in (0.0, 0.5, 1.0):
        outs[eta] = S.sample_ddim(gaussian_eps(torch.tensor(0.5)), x, S.ddim_timesteps(1000, 500), schedule=SCHED,
                                  noise=noise, eta=eta)
        assert outs[eta].mean().item() == pytest.approx(0.5, abs=0.01)
        assert outs[eta].std().item() == pytest.approx(SD, abs=0.01)
    assert (outs[0.5] - outs[0.0]).abs().mean().item() > 0.05 < (outs[1.0] - outs[0.5]).abs().mean().item()


def test_ddim_timesteps():
    assert S.ddim_timesteps(1000, 1000) == list(range(999, -1, -1))
    seq = S.ddim_timesteps(1000, 50)
    assert len(seq) == 50 and seq[0] == 999 and seq[-1] == 0 and seq == sorted(seq, reverse=True)
    assert S.ddim_timesteps(300, 1) == [299]
    with pytest.raises(UserError, match=r"\[1, T=300\]"):
        S.ddim_timesteps(300, 301)


@pytest.mark.parametrize("method, steps, tol", [("euler", 500, 0.01), ("heun", 20, 0.01)])
def test_flow_sampler_exact_map(method, steps, tol):
    """Rectified flow on N(mu, sd^2): exact velocity; the ODE map from t=1 to 0 is x0 = mu + sd * x1."""
    mu = 0.5

    def velocity(x, t, y):
        t = t.view(-1, 1, 1, 1)
        var = (1 - t) ** 2 * SD ** 2 + t ** 2
        return -mu + (t - (1 - t) * SD ** 2) / var * (x - (1 - t) * mu)

    sample = {"euler": S.sample_euler, "heun": S.sample_heun}[method]
    x1 = torch.randn(2000, 1, 1, 1, generator=gen(4))
    x0 = sample(velocity, x1, S.flow_times(steps))
    assert (x0 - (mu + SD * x1)).abs().max().item() < tol
    coarse = sample(velocity, x1, S.flow_times(5))
    assert (coarse - (mu + SD * x1)).abs().max().item() > (x0 - (mu + SD * x1)).abs().max().item()
    with pytest.raises(UserError, match="steps must be >= 1"):
        S.flow_times(0)


class TinyCond(torch.nn.Module):
    num_classes = 3

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)
        self.emb = torch.nn.Embedding(4, 1)

    def forward(self, x, t, y=None):
        return self.conv(x) * self.emb(y).view(-1, 1, 1, 1) + t.float().view(-1, 1, 1, 1) / 1000


def test_cfg_conventions_linearity_and_batched_forward():
    net = TinyCond().eval()
    g = gen(9)
    x, t, y = torch.randn(5, 1, 6, 6, generator=g), torch.randint(0, 1000, (5,), generator=g), torch.tensor([0, 1, 2, 0, 1])
    with torch.no_grad():
        cond, uncond = net(x, t, y), net(x, t, torch.full_like(y, 3))
        f = lambda s, c="gamma": S.classifier_free_guidance(net, s, c)(x, t, y)  # noqa: E731
        assert torch.equal(f(1.0), cond) and torch.equal(f(0.0, "w"), cond)
        # The batched forward equals two separate forwards.
        assert torch.allclose(f(5.0), uncond + 5.0 * (cond - uncond), atol=1e-6)
        assert torch.allclose(f(0.0), uncond, atol=1e-6)
        # Linear in the scale, and w = gamma - 1.
        assert torch.allclose(f(7.0) - f(3.0), 4.0 * (cond - uncond), atol=1e-5)
        assert torch.allclose(f(2.0, "w"), f(3.0), atol=1e-6)
        assert torch.allclose(f(2.0, "w"), 3.0 * cond - 2.0 * uncond, atol=1e-5)
        assert torch.equal(S.classifier_free_guidance(net, 3.0)(x, t, None), uncond)


def test_cfg_one_batched_forward_call():
    calls = []

    class Counting(TinyCond):
        def forward(self, x, t, y=None):
            calls.append(x.shape[0])
            return super().forward(x, t, y)

    net = Counting().eval()
    S.sample_ddim(S.classifier_free_guidance(net, 3.0), torch.randn(4, 1, 6, 6), S.ddim_timesteps(1000, 5),
                  torch.tensor([0, 1, 2, 0]), schedule=SCHED)
    assert calls == [8] * 5


def test_guidance_errors():
    class Uncond(torch.nn.Module):
        num_classes = 0

    with pytest.raises(UserError, match="unconditional"):
        S.classifier_free_guidance(Uncond(), 3.0)
    with pytest.raises(UserError, match="convention"):
        S.classifier_free_guidance(TinyCond(), 3.0, "lambda")


def test_classifier_guidance_scale_one_is_exact_conditional():
    """Bayes on scores: grad log p(x|y) = grad log p(x) + grad log p(y|x)."""
    g = gen(11)
    x = torch.randn(64, 1, 1, 1, generator=g) * 2
    t = torch.randint(0, 1000, (64,), generator=g)
    y = torch.randint(0, 3, (64,), generator=g)
    guided = S.classifier_guidance(mixture_eps, mixture_classifier, SCHED, scale=1.0)
    with torch.inference_mode():
        got = guided(x, t, y)
    assert torch.allclose(got, gaussian_eps(MU)(x, t, y), atol=1e-4)
    # Sampling with it draws the class's own Gaussian.
    y = torch.full((4000,), 2)
    xs = S.sample_ddim(S.classifier_guidance(mixture_eps, mixture_classifier, SCHED, 1.0),
                       torch.randn(4000, 1, 1, 1, generator=gen(12)), S.ddim_timesteps(1000, 100), y, schedule=SCHED)
    assert xs.mean().item() == pytest.approx(2.0, abs=0.03)


def test_callback_sees_every_step_and_changes_nothing():
    eps = gaussian_eps(MU)
    y = torch.tensor([0, 2])
    x, noise = noise_x(2, (1, 3, 3))
    seen = []
    out = S.sample_ddpm(eps, x, ALL_T, y, schedule=SCHED, noise=noise,
                        callback=lambda k, t, xt, x0: seen.append((k, t, xt.clone(), x0.clone())))
    assert [(k, t) for k, t, _, _ in seen] == list(enumerate(ALL_T))
    assert all(a.shape == (2, 1, 3, 3) and b.shape == (2, 1, 3, 3) for _, _, a, b in seen)
    assert torch.allclose(seen[-1][3], out, atol=1e-5)  # the last step returns x0_hat exactly
    plain = S.sample_ddpm(eps, x, ALL_T, y, schedule=SCHED, noise=noise)
    assert torch.equal(plain, out)                       # watching does not change the samples
    steps = []
    S.sample_ddim(eps, x, S.ddim_timesteps(1000, 10), y, schedule=SCHED, callback=lambda k, t, *_: steps.append(t))
    assert steps == S.ddim_timesteps(1000, 10)
    times = []
    S.sample_heun(lambda x, t, y: torch.zeros_like(x), x, S.flow_times(4), callback=lambda k, t, *_: times.append(t))
    assert times == [1.0, 0.75, 0.5, 0.25]


def test_slerp():
    z0, z1 = torch.randn(1, 4, 4, generator=gen(1)), torch.randn(1, 4, 4, generator=gen(2))
    assert torch.allclose(S.slerp(z0, z1, 0.0), z0, atol=1e-6)
    assert torch.allclose(S.slerp(z0, z1, 1.0), z1, atol=1e-6)
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    mid = S.slerp(a, b, 0.5)
    assert mid.norm().item() == pytest.approx(1.0) and torch.allclose(mid, torch.tensor([0.5 ** 0.5] * 2))


def test_samplers_run_under_inference_mode():
    seen = []
    S.sample_ddim(lambda x, t, y: seen.append(torch.is_inference_mode_enabled()) or torch.zeros_like(x),
                  torch.zeros(1, 1, 1, 1), S.ddim_timesteps(1000, 3), schedule=SCHED)
    assert seen == [True] * 3


def test_sample_clip_x0_from_the_config_reaches_ddim_and_ddpm():
    """generate() takes sample.clip_x0 (or the Sampling's): a net whose x0 predictions run far outside
    [-1, 1] gives saturating samples without it and samples in [-1, 1] with it, for both samplers."""
    from dataclasses import replace

    from ddpm.config import Config
    from ddpm.diffusion.from_config import generate, sampling_for

    cfg = Config()
    cfg = replace(cfg, diffusion=replace(cfg.diffusion, T=20), model={"arch": "cs180_time_unet"})
    on = replace(cfg, sample=replace(cfg.sample, clip_x0=True))
    assert cfg.sample.clip_x0 is False

    def bad_net(x, t, y):  # predicts noise that points away from the data: x0_hat grows without bound
        return -3.0 * x

    for sampler, steps in (("ddim", 5), ("ddpm", 20)):
        loose = generate(bad_net, cfg, sampling_for(cfg, sampler=sampler, steps=steps), seed=0, indices=range(4))
        assert loose.abs().max() > 5, sampler
        clipped = generate(bad_net, cfg, sampling_for(cfg, sampler=sampler, steps=steps, clip_x0=True), seed=0,
                           indices=range(4))
        assert torch.equal(generate(bad_net, on, sampling_for(on, sampler=sampler, steps=steps), seed=0,
                                    indices=range(4)), clipped)
        assert clipped.abs().max() <= 1.0 + 1e-6 or sampler == "ddpm", sampler
        assert clipped.abs().max() < 2.0, sampler  # ddpm adds the last step's small noise after the clip


def test_generate_makes_sample_i_the_same_in_any_chunk():
    """from_config.generate: sample i of a request depends on (seed, i) only, for a stochastic sampler too."""
    from dataclasses import replace

    from ddpm.config import Config
    from ddpm.diffusion.from_config import generate, sampling_for

    cfg = Config()
    cfg = replace(cfg, diffusion=replace(cfg.diffusion, T=30), model={"arch": "cs180_time_unet"})
    spec = sampling_for(cfg, sampler="ddpm")
    net = lambda x, t, y: 0.1 * x  # noqa: E731
    whole = generate(net, cfg, spec, seed=4, indices=range(6))
    parts = torch.cat([generate(net, cfg, spec, seed=4, indices=range(3, 6)),
                       generate(net, cfg, spec, seed=4, indices=range(3))])
    assert torch.equal(whole, torch.cat([parts[3:], parts[:3]]))
    assert (generate(net, cfg, spec, seed=5, indices=range(6)) - whole).abs().max() > 0.1


# ----- DPM-Solver++(2M) --------------------------------------------------------------------------
def ve_gaussian_eps(mu, sd=SD):
    """Exact eps of ``x = x0 + sigma eps`` (t = sigma) for x0 ~ N(mu, sd^2): D = mu + sd^2 / (sd^2 + sigma^2) (x - mu)."""
    def eps(x, sigma, y):
        s = sigma.view(-1, 1, 1, 1)
        return (x - (mu + sd ** 2 / (sd ** 2 + s ** 2) * (x - mu))) / s
    return eps


def test_dpmpp_2m_is_second_order_on_gaussian_data():
    """On x = x0 + sigma eps with the exact denoiser of N(mu, sd^2), the ODE maps x at sigma_max to
    mu + sd (x - mu) / sqrt(sd^2 + sigma_max^2); doubling the steps divides DPM-Solver++(2M)'s error by
    about 4 (second order), where a first-order solver would halve it."""
    mu, sigma_max = 0.5, 80.0
    x = mu + sigma_max * torch.randn(2000, 1, 1, 1, generator=gen(3))
    exact = mu + SD * (x - mu) / math.sqrt(SD ** 2 + sigma_max ** 2)
    err = {n: (S.sample_dpmpp_2m(ve_gaussian_eps(mu), x, S.Trajectory.noise_levels(S.karras_sigmas(n, 0.002, sigma_max)))
               - exact).abs().max().item() for n in (20, 40, 80)}
    assert err[20] / err[40] > 3 and err[40] / err[80] > 3, err
    assert err[80] < 0.005, err


def test_dpmpp_2m_beats_ddim_at_equal_network_evaluations():
    """The discrete schedule with the exact eps of N(0.5, sd^2): DPM-Solver++(2M) over karras_timesteps
    against DDIM over its evenly spaced timesteps, each with n network evaluations: the exact
    probability-flow map of test_ddim_eta0_is_deterministic_and_follows_the_exact_flow."""
    mu = torch.tensor(0.5)
    x_T = torch.randn(2000, 1, 1, 1, generator=gen(3))
    ab = SCHED.alpha_bars[-1].item()
    exact = mu + SD * (x_T - math.sqrt(ab) * mu) / math.sqrt(ab * SD ** 2 + 1 - ab)
    for n, tol in ((10, 0.1), (40, 0.02)):
        ours = S.sample_dpmpp_2m(gaussian_eps(mu), x_T, S.Trajectory.discrete(SCHED, S.karras_timesteps(SCHED, n)))
        ddim = S.sample_ddim(gaussian_eps(mu), x_T, S.ddim_timesteps(1000, n), schedule=SCHED)
        e_ours, e_ddim = (ours - exact).abs().max().item(), (ddim - exact).abs().max().item()
        assert e_ours < tol and e_ours < e_ddim / 3, (n, e_ours, e_ddim)


def test_dpmpp_2m_first_step_is_ddims():
    """First order, DPM-Solver++ is DDIM (Lu et al. 2022): with two points (a first-order step, then the
    landing on x0_hat) both samplers give the same samples, to float rounding."""
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    x = torch.randn(6, 1, 2, 2, generator=gen(5))
    a = S.sample_dpmpp_2m(gaussian_eps(MU), x, S.Trajectory.discrete(SCHED, [999, 400]), y)
    b = S.sample_ddim(gaussian_eps(MU), x, [999, 400], y, schedule=SCHED)
    assert torch.allclose(a, b, atol=1e-5)
    one = S.sample_dpmpp_2m(gaussian_eps(MU), x, S.Trajectory.discrete(SCHED, [999]), y)
    assert torch.allclose(one, S.sample_ddim(gaussian_eps(MU), x, [999], y, schedule=SCHED), atol=1e-5)


def test_dpmpp_2m_reproduces_class_conditional_gaussians_through_guidance():
    """Class-conditional N(mu_y, sd^2) with 25 evaluations: each class's mean, and its spread closer to sd
    than DDIM's with 50 (measured: 0.313 against 0.277 for sd = 0.3); through classifier_free_guidance
    at gamma = 3, one batched forward per step."""
    y = torch.arange(3).repeat_interleave(4000)
    x = torch.randn(12000, 1, 1, 1, generator=gen(1))
    steps = S.Trajectory.discrete(SCHED, S.karras_timesteps(SCHED, 25))
    out = S.sample_dpmpp_2m(gaussian_eps(MU), x, steps, y)
    ddim = S.sample_ddim(gaussian_eps(MU), x, S.ddim_timesteps(1000, 50), y, schedule=SCHED)
    for k in range(3):
        assert out[y == k].mean().item() == pytest.approx(MU[k].item(), abs=0.02)
        assert out[y == k].std().item() == pytest.approx(SD, abs=0.02)
        assert abs(out[y == k].std().item() - SD) < abs(ddim[y == k].std().item() - SD)
    calls = []

    class Counting(TinyCond):
        def forward(self, x, t, y=None):
            calls.append(x.shape[0])
            return super().forward(x, t, y)

    S.sample_dpmpp_2m(S.classifier_free_guidance(Counting().eval(), 3.0), torch.randn(4, 1, 6, 6), steps,
                      torch.tensor([0, 1, 2, 0]))
    assert calls == [8] * 25


def test_dpmpp_2m_on_rectified_flow():
    """The velocity of rectified flow on N(mu, sd^2) (test_flow_sampler_exact_map's): x0 = mu + sd x1,
    within 0.02 at 20 evaluations, 5x closer than Euler's 20."""
    mu = 0.5

    def velocity(x, t, y):
        t = t.view(-1, 1, 1, 1)
        var = (1 - t) ** 2 * SD ** 2 + t ** 2
        return -mu + (t - (1 - t) * SD ** 2) / var * (x - (1 - t) * mu)

    x1 = torch.randn(2000, 1, 1, 1, generator=gen(4))
    ours = S.sample_dpmpp_2m(velocity, x1, S.Trajectory.flow(S.flow_times(20)[:-1]))
    euler = S.sample_euler(velocity, x1, S.flow_times(20))
    e_ours, e_euler = ((v - (mu + SD * x1)).abs().max().item() for v in (ours, euler))
    assert e_ours < 0.02 and e_ours < e_euler / 5, (e_ours, e_euler)


def test_karras_timesteps_are_distinct_and_span_the_schedule():
    for T, sched in ((1000, SCHED), (300, NoiseSchedule.make("linear", T=300))):
        for n in (1, 2, 10, 25, 50, T // 2, T):
            seq = S.karras_timesteps(sched, n)
            assert len(seq) == n == len(set(seq)) and seq == sorted(seq, reverse=True), (T, n)
            assert seq[0] == T - 1 and (seq[-1] == 0 or n == 1)
        assert S.karras_timesteps(sched, T) == list(range(T - 1, -1, -1))
        with pytest.raises(UserError, match=rf"\[1, T={T}\]"):
            S.karras_timesteps(sched, T + 1)
    sigmas = S.karras_sigmas(10, 0.002, 80.0)
    assert sigmas[0] == pytest.approx(80.0) and sigmas[-1] == pytest.approx(0.002)
    assert all(a > b for a, b in zip(sigmas, sigmas[1:]))
    with pytest.raises(UserError, match="steps must be >= 1"):
        S.karras_sigmas(0, 0.002, 80.0)
    with pytest.raises(UserError, match="one alpha and one sigma per time"):
        S.Trajectory((1, 2), (1.0,), (0.5,))


def test_dpmpp_2m_callback_sees_every_point_and_clip_bounds_x0():
    eps = gaussian_eps(MU)
    y = torch.tensor([0, 2])
    x = torch.randn(2, 1, 3, 3, generator=gen(6))
    steps = S.Trajectory.discrete(SCHED, S.karras_timesteps(SCHED, 8))
    seen = []
    out = S.sample_dpmpp_2m(eps, x, steps, y, callback=lambda k, t, xt, x0: seen.append((k, t, x0.clone())))
    assert [(k, t) for k, t, _ in seen] == list(enumerate(steps.times))
    assert torch.equal(seen[-1][2], out)  # the landing returns the last x0_hat
    assert torch.equal(S.sample_dpmpp_2m(eps, x, steps, y), out)
    far = S.sample_dpmpp_2m(gaussian_eps(torch.tensor(2.0)), x, steps, clip_x0=True,
                            callback=lambda k, t, xt, x0: seen.append(x0.abs().max().item()))
    assert far.abs().max().item() <= 1.0 and max(seen[8:]) <= 1.0


def test_dpmpp_2m_from_the_config_for_every_generative_objective():
    """sample.sampler=dpmpp_2m through from_config: the discrete objectives (x0 clipping from the
    Sampling), rectified flow and EDM each run with their own trajectory, `steps` network evaluations;
    the sampler is refused where it does not fit and where the steps exceed the schedule."""
    from dataclasses import replace

    from ddpm.config import Config
    from ddpm.diffusion.from_config import generate, network_evaluations, sampling_for, trajectory_for

    base = Config()
    base = replace(base, diffusion=replace(base.diffusion, T=40), model={"arch": "cs180_time_unet"})
    calls = []

    def net(x, t, y):
        calls.append(t.dtype)
        return -3.0 * x

    for objective, dtype in (("eps", torch.long), ("x0", torch.long), ("v", torch.long),
                             ("rectified_flow", torch.float32), ("edm", torch.float32)):
        cfg = replace(base, diffusion=replace(base.diffusion, objective=objective))
        spec = sampling_for(cfg, sampler="dpmpp_2m")
        assert (spec.steps, network_evaluations("dpmpp_2m", spec.steps)) == (25, 25)
        calls.clear()
        out = generate(net, cfg, replace(spec, steps=6), seed=0, indices=range(3))
        assert out.shape == (3, 1, 28, 28) and torch.isfinite(out).all() and calls == [dtype] * 6, objective
        assert len(trajectory_for(cfg, 6).times) == 6
    clipped = generate(net, base, sampling_for(base, sampler="dpmpp_2m", steps=6, clip_x0=True), seed=0,
                       indices=range(3))
    assert clipped.abs().max() <= 1.0 < generate(net, base, sampling_for(base, sampler="dpmpp_2m", steps=6),
                                                 seed=0, indices=range(3)).abs().max()
    with pytest.raises(UserError, match=r"\[1, T=40\]"):
        sampling_for(base, sampler="dpmpp_2m", steps=41)
    edm = replace(base, diffusion=replace(base.diffusion, objective="edm"))
    with pytest.raises(UserError, match="does not fit diffusion.objective=edm"):
        sampling_for(edm, sampler="ddim")
