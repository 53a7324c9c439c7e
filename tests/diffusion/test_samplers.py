"""Samplers proved on problems with known answers: Gaussian data, for which the exact eps, velocity and
noisy classifier are closed forms, so a correct sampler must reproduce the data distribution."""
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


@pytest.mark.parametrize("variance", ["beta", "beta_tilde"])
def test_ddpm_reproduces_gaussian_data(variance):
    x = S.sample_ddpm(gaussian_eps(torch.tensor(0.5)), SCHED, (20000, 1, 1, 1), generator=gen(), variance=variance)
    assert x.mean().item() == pytest.approx(0.5, abs=0.01)
    assert x.std().item() == pytest.approx(SD, abs=0.01)


def test_ddpm_forms_agree_on_same_noise():
    eps = gaussian_eps(MU)
    y = torch.tensor([0, 1, 2, 1])
    a = S.sample_ddpm(eps, SCHED, (4, 1, 2, 2), y, generator=gen(7), form="eps")
    b = S.sample_ddpm(eps, SCHED, (4, 1, 2, 2), y, generator=gen(7), form="x0")
    assert torch.allclose(a, b, atol=1e-4)
    other = S.sample_ddpm(eps, SCHED, (4, 1, 2, 2), y, generator=gen(8))
    assert (a - other).abs().max().item() > 0.1  # other noise, other samples (SD = 0.5): far above rounding


def test_class_conditional_sampling_routes_labels():
    y = torch.arange(3).repeat_interleave(4000)
    x = S.sample_ddpm(gaussian_eps(MU), SCHED, (12000, 1, 1, 1), y, generator=gen(1), form="x0")
    for k in range(3):
        assert x[y == k].mean().item() == pytest.approx(MU[k].item(), abs=0.02)
        assert x[y == k].std().item() == pytest.approx(SD, abs=0.015)


def test_x0_clipping_bounds_prediction():
    x, traj = S.sample_ddpm(gaussian_eps(torch.tensor(2.0)), SCHED, (500, 1, 1, 1), generator=gen(),
                            form="x0", clip_x0=True, capture={999, 0})
    assert traj[0][1].abs().max() <= 1.0 and traj[999][1].abs().max() <= 1.0
    assert x.max().item() <= 1.0 + 1e-5
    with pytest.raises(UserError, match="x0 form"):
        S.sample_ddpm(gaussian_eps(MU), SCHED, (2, 1, 1, 1), generator=gen(), form="eps", clip_x0=True)


def test_ddim_eta0_is_deterministic_and_follows_the_exact_flow():
    mu = torch.tensor(0.5)
    x_T = torch.randn(2000, 1, 1, 1, generator=gen(3))
    ab = SCHED.alpha_bars[-1].item()
    exact = mu + SD * (x_T - math.sqrt(ab) * mu) / math.sqrt(ab * SD ** 2 + 1 - ab)  # probability-flow map
    errs = []
    for steps in (50, 1000):
        a = S.sample_ddim(gaussian_eps(mu), SCHED, x_T.shape, steps=steps, generator=gen(1), x_T=x_T)
        b = S.sample_ddim(gaussian_eps(mu), SCHED, x_T.shape, steps=steps, generator=gen(2), x_T=x_T)
        assert torch.equal(a, b)  # eta = 0 draws nothing
        errs.append((a - exact).abs().max().item())
    assert errs[1] < 0.01 and errs[1] < errs[0]


def test_ddim_eta1_all_steps_equals_ddpm_with_beta_tilde():
    eps = gaussian_eps(MU)
    y = torch.tensor([2, 0, 1])
    a = S.sample_ddim(eps, SCHED, (3, 1, 4, 4), y, steps=1000, eta=1.0, generator=gen(5))
    b = S.sample_ddpm(eps, SCHED, (3, 1, 4, 4), y, generator=gen(5), variance="beta_tilde")
    assert torch.allclose(a, b, atol=1e-4)


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

    x1 = torch.randn(2000, 1, 1, 1, generator=gen(4))
    x0 = S.sample_flow(velocity, x1.shape, steps=steps, generator=gen(), method=method, x_T=x1)
    assert (x0 - (mu + SD * x1)).abs().max().item() < tol
    coarse = S.sample_flow(velocity, x1.shape, steps=5, generator=gen(), method=method, x_T=x1)
    assert (coarse - (mu + SD * x1)).abs().max().item() > (x0 - (mu + SD * x1)).abs().max().item()


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
    S.sample_ddim(S.classifier_free_guidance(net, 3.0), SCHED, (4, 1, 6, 6), torch.tensor([0, 1, 2, 0]),
                  steps=5, generator=gen())
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
    # A larger scale pushes samples further towards their class: sampled means move outwards.
    y = torch.full((4000,), 2)
    xs = S.sample_ddim(S.classifier_guidance(mixture_eps, mixture_classifier, SCHED, 1.0), SCHED,
                       (4000, 1, 1, 1), y, steps=100, generator=gen(12))
    assert xs.mean().item() == pytest.approx(2.0, abs=0.03)


def test_trajectory_capture():
    eps = gaussian_eps(MU)
    y = torch.tensor([0, 2])
    x, traj = S.sample_ddpm(eps, SCHED, (2, 1, 3, 3), y, generator=gen(), capture={999, 500, 0})
    assert sorted(traj) == [0, 500, 999]
    assert all(a.shape == (2, 1, 3, 3) and b.shape == (2, 1, 3, 3) for a, b in traj.values())
    assert torch.allclose(traj[0][1], x, atol=1e-5)  # the last step returns x0_hat exactly
    plain = S.sample_ddpm(eps, SCHED, (2, 1, 3, 3), y, generator=gen())
    assert torch.allclose(plain, x)                   # capturing does not change the samples
    _, traj = S.sample_ddim(eps, SCHED, (2, 1, 3, 3), y, steps=10, generator=gen(), capture={999})
    assert list(traj) == [999]


def test_slerp_and_interpolation():
    z0, z1 = torch.randn(1, 4, 4, generator=gen(1)), torch.randn(1, 4, 4, generator=gen(2))
    assert torch.allclose(S.slerp(z0, z1, 0.0), z0, atol=1e-6)
    assert torch.allclose(S.slerp(z0, z1, 1.0), z1, atol=1e-6)
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    mid = S.slerp(a, b, 0.5)
    assert mid.norm().item() == pytest.approx(1.0) and torch.allclose(mid, torch.tensor([0.5 ** 0.5] * 2))
    eps = gaussian_eps(MU)
    y = torch.tensor([1, 1, 1])
    out = S.interpolate(eps, SCHED, z0, z1, 3, y, steps=20)
    ends = S.sample_ddim(eps, SCHED, (2, 1, 4, 4), y[:2], steps=20, generator=gen(), x_T=torch.stack([z0, z1]))
    assert out.shape == (3, 1, 4, 4)
    assert torch.allclose(out[0], ends[0], atol=1e-5) and torch.allclose(out[2], ends[1], atol=1e-5)


def test_samplers_run_under_inference_mode():
    seen = []
    S.sample_ddim(lambda x, t, y: seen.append(torch.is_inference_mode_enabled()) or torch.zeros_like(x),
                  SCHED, (1, 1, 1, 1), steps=3, generator=gen())
    assert seen == [True] * 3


def test_sample_clip_x0_from_the_config_reaches_ddim_and_ddpm():
    """generate() takes sample.clip_x0 (or its argument): a net whose x0 predictions run far outside [-1, 1]
    gives saturating samples without it and samples in [-1, 1] with it, for both samplers."""
    from dataclasses import replace

    from ddpm.config import Config
    from ddpm.diffusion.from_config import generate

    cfg = Config()
    cfg = replace(cfg, diffusion=replace(cfg.diffusion, T=20))
    on = replace(cfg, sample=replace(cfg.sample, clip_x0=True))
    assert cfg.sample.clip_x0 is False

    def bad_net(x, t, y):  # predicts noise that points away from the data: x0_hat grows without bound
        return -3.0 * x

    bad_net.num_classes = 0
    for sampler, steps in (("ddim", 5), ("ddpm", 20)):
        kw = dict(n=4, seed=0, sampler=sampler, steps=steps)
        loose = generate(bad_net, cfg, None, **kw)
        assert loose.abs().max() > 5, sampler
        clipped = generate(bad_net, cfg, None, clip_x0=True, **kw)
        assert torch.equal(generate(bad_net, on, None, **kw), clipped)
        assert clipped.abs().max() <= 1.0 + 1e-6 or sampler == "ddpm", sampler
        assert clipped.abs().max() < 2.0, sampler  # ddpm adds the last step's small noise after the clip
