"""ddpm.diffusion.objectives: the forward process, every objective's loss against its closed-form target,
its noise-level draws and buckets, and the denoiser it becomes for sampling; the objective is asked, never
named, outside ddpm/diffusion."""
import ast
import math

import pytest
import torch

from ddpm.diffusion import objectives as D
from ddpm.diffusion.schedule import NoiseSchedule
from ddpm.errors import UserError

from conftest import ROOT

SCHED = NoiseSchedule.make("linear", T=100, beta_start=1e-4, beta_end=0.05)
S32 = SCHED.to("cpu", torch.float32)


def make(name, **kw):
    return D.OBJECTIVES[name](schedule=SCHED, **kw)


def batch(seed, n=6):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 1, 3, 3, generator=g), torch.randn(n, 1, 3, 3, generator=g),
            torch.randint(0, 100, (n,), generator=g), torch.randint(0, 10, (n,), generator=g))


def test_q_sample_statistics():
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((20000, 1, 1, 1), 0.7)
    t = torch.full((20000,), 40, dtype=torch.long)
    xt = D.q_sample(SCHED, x0, t, torch.randn(x0.shape, generator=g))
    ab = SCHED.alpha_bars[40].item()
    assert xt.mean().item() == pytest.approx(0.7 * ab ** 0.5, abs=0.02)
    assert xt.var().item() == pytest.approx(1 - ab, rel=0.03)


class Zero(torch.nn.Module):
    def forward(self, x, t=None, y=None):
        return torch.zeros_like(x)


@pytest.mark.parametrize("name", ["eps", "x0", "v"])
def test_prediction_losses_and_their_targets(name):
    x0, noise, t, y = batch(2)
    a = NoiseSchedule.gather(S32.sqrt_alpha_bars, t, 4)
    s = NoiseSchedule.gather(S32.sqrt_one_minus_alpha_bars, t, 4)
    target = {"eps": noise, "x0": x0, "v": a * noise - s * x0}[name]
    obj = make(name)
    loss = obj.loss(Zero(), x0, y, noise, t, torch.zeros(6, dtype=torch.bool))
    assert loss.shape == (6,) and loss.dtype == torch.float32
    assert torch.allclose(loss, target.pow(2).flatten(1).mean(1))
    # The denoiser turns the perfect prediction of its target back into the exact noise.
    xt = D.q_sample(SCHED, x0, t, noise)
    assert torch.allclose(obj.denoiser(lambda x, tt, yy: target)(xt, t, None), noise, atol=1e-4)
    oracle = lambda x, tt, yy: target  # noqa: E731
    assert obj.loss(oracle, x0, y, noise, t, torch.zeros(6, dtype=torch.bool)).abs().max() == 0


def test_class_conditional_objectives_drop_labels_to_the_null_class():
    x0, noise, t, y = batch(3)
    seen = []
    net = lambda x, tt, yy: seen.append(yy) or torch.zeros_like(x)  # noqa: E731
    drop = torch.tensor([True, False, True, False, False, False])
    make("eps", num_classes=10).loss(net, x0, y, noise, t, drop)
    assert seen[-1].tolist() == [10 if d else v for d, v in zip(drop.tolist(), y.tolist())]
    make("eps").loss(net, x0, y, noise, t, drop)
    assert seen[-1] is None  # an unconditional net gets no labels
    assert D.drop_labels(torch.tensor([0, 3, 9, 4]), torch.tensor([True, False, True, False]), 10).tolist() == \
        [10, 3, 10, 4]


def test_rectified_flow():
    g = torch.Generator().manual_seed(4)
    x0, noise = torch.randn(5, 1, 2, 2, generator=g), torch.randn(5, 1, 2, 2, generator=g)
    obj = make("rectified_flow")
    t = obj.draw(g, 5, "cpu")
    assert t.dtype.is_floating_point and 0 <= t.min() and t.max() < 1
    seen = {}

    def net(x, tt, y):
        seen["x"], seen["t"] = x, tt
        return torch.zeros_like(x)

    loss = obj.loss(net, x0, torch.zeros(5, dtype=torch.long), noise, t, torch.zeros(5, dtype=torch.bool))
    tt = t.view(-1, 1, 1, 1)
    assert torch.allclose(seen["x"], (1 - tt) * x0 + tt * noise) and seen["t"] is t
    assert torch.allclose(loss, (noise - x0).pow(2).flatten(1).mean(1))
    assert obj.bucket(torch.tensor([0.0, 0.24, 0.25, 0.99, 1.0])).tolist() == [0, 0, 1, 3, 3]
    assert obj.samplers == ("euler", "heun", "dpmpp_2m") and obj.denoiser(net) is net


def test_discrete_draws_and_quartiles():
    obj = make("eps")
    t = obj.draw(torch.Generator().manual_seed(0), 4000, "cpu")
    assert t.dtype == torch.long and t.min() == 0 and t.max() == 99
    assert obj.bucket(torch.tensor([0, 24, 25, 49, 50, 75, 99])).tolist() == [0, 0, 1, 1, 2, 3, 3]


def test_denoiser_and_classifier():
    x0, noise, t, y = batch(5, n=5)
    seen = {}

    def den(x):
        seen["x"] = x
        return x

    obj = D.OBJECTIVES["denoiser"](sigma=0.5)
    loss = obj.loss(den, x0, y, noise, t, None)
    assert torch.allclose(seen["x"], x0 + 0.5 * noise)
    assert torch.allclose(loss, (0.5 * noise).pow(2).flatten(1).mean(1))
    assert (obj.kind, obj.quartiles, obj.samplers) == ("denoiser", False, ())
    logits = torch.zeros(5, 10)
    ce = make("classifier").loss(lambda x, tt: logits, x0, y, noise, t, None)
    assert torch.allclose(ce, torch.full((5,), torch.log(torch.tensor(10.0)).item()))
    for name in ("denoiser", "classifier"):
        with pytest.raises(UserError, match=f"diffusion.objective={name} do not generate samples"):
            make(name).denoiser(den)


def test_the_registry_is_the_configs_list_of_objectives():
    from ddpm.config import load_config

    assert list(D.OBJECTIVES) == ["eps", "x0", "v", "rectified_flow", "edm", "denoiser", "classifier"]
    with pytest.raises(UserError, match="diffusion.objective must be one of eps, x0, v, rectified_flow"):
        load_config(ROOT / "configs" / "mnist.yaml", ["diffusion.objective=score"], device="cpu")


def test_no_module_outside_diffusion_asks_for_the_objectives_name():
    """An objective is asked (kind, samplers, quartiles, loss, denoiser), never compared by name: a new
    objective is one class in ddpm/diffusion/objectives.py."""
    names = set(D.OBJECTIVES)
    wrong = []
    for path in sorted((ROOT / "ddpm").rglob("*.py")) + sorted((ROOT / "jobs").glob("*.py")):
        if path.parent.name == "diffusion":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                parts = [node.left, *node.comparators]
                asks = any(isinstance(p, ast.Attribute) and p.attr == "objective" for p in parts)
                literals = {e.value for p in parts for e in ([p] + list(getattr(p, "elts", [])))
                            if isinstance(e, ast.Constant)}
                if asks and literals & names:
                    wrong.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not wrong, "objective names compared outside ddpm/diffusion: " + ", ".join(wrong)


# ----- EDM (Karras et al. 2022) ------------------------------------------------------------------
class IdealEDMNet(torch.nn.Module):
    """The preconditioned net F whose D is the exact denoiser of x0 ~ N(mu, sd^2) per pixel:
    D = mu + sd^2 / (sd^2 + sigma^2) (x - mu); it reads sigma back from the net time and x from c_in x."""

    def __init__(self, obj, mu, sd):
        super().__init__()
        self.obj, self.mu, self.sd = obj, mu, sd

    def forward(self, x_in, u, y=None):
        lo, hi = math.log(self.obj.SIGMA_MIN), math.log(self.obj.SIGMA_MAX)
        sigma = (lo + u * (hi - lo)).exp()
        c_skip, c_out, c_in = self.obj.coefficients(sigma, x_in.ndim)
        x = x_in / c_in
        d = self.mu + self.sd ** 2 / (self.sd ** 2 + sigma.view(c_in.shape) ** 2) * (x - self.mu)
        return (d - c_skip * x) / c_out


def test_edm_draws_log_normal_noise_levels_in_equal_quartiles():
    obj = make("edm")
    sigma = obj.draw(torch.Generator().manual_seed(0), 40000, "cpu")
    assert sigma.dtype.is_floating_point and sigma.min() > 0
    assert sigma.log().mean().item() == pytest.approx(obj.P_MEAN, abs=0.02)
    assert sigma.log().std().item() == pytest.approx(obj.P_STD, abs=0.02)
    counts = torch.bincount(obj.bucket(sigma), minlength=4) / len(sigma)
    assert torch.allclose(counts, torch.full((4,), 0.25), atol=0.01)
    assert obj.net_time(torch.tensor([obj.SIGMA_MIN, obj.SIGMA_MAX])).tolist() == pytest.approx([0.0, 1.0], abs=1e-6)
    assert (obj.kind, obj.quartiles, obj.samplers, obj.arch) == ("generative", True, ("dpmpp_2m",), None)


def test_edm_loss_is_one_for_the_ideal_denoiser_of_sigma_data_data():
    """With lambda = 1 / c_out^2 (eq. 8) the exact denoiser's expected loss is
    sd^2 sigma^2 / (sd^2 + sigma^2) / c_out^2 = 1 at every sigma when the data's std is sigma_data: the
    weighting equalises the noise levels. A net that is off by 0.1 in x0 pays for it."""
    obj = make("edm", num_classes=10)
    mu, n = 0.3, 20000
    g = torch.Generator().manual_seed(1)
    x0 = mu + obj.SIGMA_DATA * torch.randn(n, 1, 2, 2, generator=g)
    noise = torch.randn(n, 1, 2, 2, generator=g)
    y, drop = torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.bool)
    ideal = IdealEDMNet(obj, mu, obj.SIGMA_DATA)
    for sigma in (0.01, 0.5, 20.0):
        t = torch.full((n,), sigma)
        assert obj.loss(ideal, x0, y, noise, t, drop).mean().item() == pytest.approx(1.0, abs=0.03), sigma
        c_out = obj.coefficients(t, 4)[1]
        off = lambda x, u, yy: ideal(x, u, yy) + 0.1 / c_out  # noqa: E731  (D off by 0.1)
        assert obj.loss(off, x0, y, noise, t, drop).mean().item() == pytest.approx(1.0 + 0.01 / c_out[0].item() ** 2, rel=0.05)


def test_edm_denoiser_samples_the_data_through_the_config():
    """The denoiser is the eps of x = x0 + sigma eps: sampling the ideal net with DPM-Solver++ through
    from_config.generate (configs name it diffusion.objective=edm) reproduces N(mu, sd^2)."""
    from dataclasses import replace

    from ddpm.config import Config
    from ddpm.diffusion.from_config import generate, objective_for, sampling_for

    cfg = Config()
    cfg = replace(cfg, diffusion=replace(cfg.diffusion, objective="edm"), model={"arch": "cs180_time_unet"},
                  sample=replace(cfg.sample, sampler="dpmpp_2m"))
    obj = objective_for(cfg)
    mu, sd = 0.3, 0.2
    x = generate(obj.denoiser(IdealEDMNet(obj, mu, sd)), cfg, sampling_for(cfg, steps=25), seed=0, indices=range(100))
    assert x.shape == (100, 1, 28, 28)
    assert x.mean().item() == pytest.approx(mu, abs=0.01) and x.std().item() == pytest.approx(sd, abs=0.01)
