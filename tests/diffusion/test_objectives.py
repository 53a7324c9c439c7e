"""ddpm.diffusion.objectives: the forward process, every objective's loss against its closed-form target,
its noise-level draws and buckets, and the denoiser it becomes for sampling; the objective is asked, never
named, outside ddpm/diffusion."""
import ast

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
    assert obj.samplers == ("euler", "heun") and obj.denoiser(net) is net


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

    assert list(D.OBJECTIVES) == ["eps", "x0", "v", "rectified_flow", "denoiser", "classifier"]
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
