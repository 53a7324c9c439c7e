import pytest
import torch

from ddpm.diffusion import objectives as D
from ddpm.diffusion.schedule import NoiseSchedule

SCHED = NoiseSchedule.make("linear", T=100, beta_start=1e-4, beta_end=0.05).to("cpu", torch.float32)


def test_q_sample_statistics():
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((20000, 1, 1, 1), 0.7)
    t = torch.full((20000,), 40, dtype=torch.long)
    xt = D.q_sample(SCHED, x0, t, torch.randn(x0.shape, generator=g))
    ab = SCHED.alpha_bars[40].item()
    assert xt.mean().item() == pytest.approx(0.7 * ab ** 0.5, abs=0.02)
    assert xt.var().item() == pytest.approx(1 - ab, rel=0.03)


def test_eps_from_prediction_inverts_every_parameterisation():
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(8, 1, 4, 4, generator=g), torch.randn(8, 1, 4, 4, generator=g)
    t = torch.randint(0, 100, (8,), generator=g)
    xt = D.q_sample(SCHED, x0, t, noise)
    a = NoiseSchedule.gather(SCHED.sqrt_alpha_bars, t, 4)
    s = NoiseSchedule.gather(SCHED.sqrt_one_minus_alpha_bars, t, 4)
    for kind, out in (("eps", noise), ("x0", x0), ("v", a * noise - s * x0)):
        assert torch.allclose(D.eps_from_prediction(SCHED, kind, xt, t, out), noise, atol=1e-4), kind
    with pytest.raises(ValueError):
        D.eps_from_prediction(SCHED, "score", xt, t, noise)


class Zero(torch.nn.Module):
    def forward(self, x, t=None, y=None):
        return torch.zeros_like(x)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_diffusion_loss_targets(prediction):
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(6, 1, 3, 3, generator=g), torch.randn(6, 1, 3, 3, generator=g)
    t = torch.randint(0, 100, (6,), generator=g)
    a = NoiseSchedule.gather(SCHED.sqrt_alpha_bars, t, 4)
    s = NoiseSchedule.gather(SCHED.sqrt_one_minus_alpha_bars, t, 4)
    target = {"eps": noise, "x0": x0, "v": a * noise - s * x0}[prediction]
    loss = D.diffusion_loss(Zero(), SCHED, x0, t, noise, None, prediction)
    assert loss.shape == (6,)
    assert torch.allclose(loss, target.pow(2).flatten(1).mean(1))


def test_perfect_predictor_has_zero_loss():
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(4, 1, 2, 2, generator=g), torch.randn(4, 1, 2, 2, generator=g)
    t = torch.randint(0, 100, (4,), generator=g)
    oracle = lambda x, tt, y: noise  # noqa: E731
    assert D.diffusion_loss(oracle, SCHED, x0, t, noise).abs().max() == 0


def test_rectified_flow_loss():
    g = torch.Generator().manual_seed(4)
    x0, noise = torch.randn(5, 1, 2, 2, generator=g), torch.randn(5, 1, 2, 2, generator=g)
    t = torch.rand(5, generator=g)
    seen = {}

    def net(x, tt, y):
        seen["x"], seen["t"] = x, tt
        return torch.zeros_like(x)

    loss = D.rectified_flow_loss(net, x0, t, noise)
    tt = t.view(-1, 1, 1, 1)
    assert torch.allclose(seen["x"], (1 - tt) * x0 + tt * noise)
    assert seen["t"].dtype.is_floating_point
    assert torch.allclose(loss, (noise - x0).pow(2).flatten(1).mean(1))


def test_denoiser_and_classifier_losses():
    g = torch.Generator().manual_seed(5)
    x0, noise = torch.randn(5, 1, 2, 2, generator=g), torch.randn(5, 1, 2, 2, generator=g)
    seen = {}

    def den(x):
        seen["x"] = x
        return x

    loss = D.denoiser_loss(den, x0, noise, sigma=0.5)
    assert torch.allclose(seen["x"], x0 + 0.5 * noise)
    assert torch.allclose(loss, (0.5 * noise).pow(2).flatten(1).mean(1))
    logits = torch.zeros(5, 10)
    ce = D.classifier_loss(lambda x, t: logits, SCHED, x0, torch.zeros(5, dtype=torch.long), noise,
                           torch.arange(5))
    assert torch.allclose(ce, torch.full((5,), torch.log(torch.tensor(10.0)).item()))


def test_drop_labels_uses_explicit_null_class():
    y = torch.tensor([0, 3, 9, 4])
    out = D.drop_labels(y, torch.tensor([True, False, True, False]), num_classes=10)
    assert out.tolist() == [10, 3, 10, 4]
