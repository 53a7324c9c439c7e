"""ddpm.train.heldout: the held-out loss's fixed draws and its independence of ranks and batch sizes."""
from pathlib import Path

import pytest
import torch

from ddpm.config import load_config
from ddpm.diffusion.from_config import objective_for
from ddpm.nets.registry import build_net
from ddpm.train.heldout import HeldOut

CFG = Path(__file__).resolve().parents[2] / "configs" / "mnist.yaml"


def setup(*overrides):
    cfg = load_config(CFG, ["model.hidden=8", "diffusion.T=50", "train.device=cpu", "log.test_images=37",
                            *overrides], device="cpu")
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (45, 1, 28, 28), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (45,), generator=g)
    torch.manual_seed(0)
    net = build_net(cfg.model["arch"], **cfg.net_kwargs()).eval()
    return cfg, objective_for(cfg), images, labels, net


def test_draws_are_per_image_so_ranks_and_batches_see_the_same():
    cfg, obj, images, labels, _ = setup()
    whole = HeldOut(cfg, obj, 0, 1, "cpu", images, labels)
    assert whole.count == 37 and (whole.first, whole.last) == (0, 37)
    parts = [HeldOut(cfg, obj, r, 3, "cpu", images, labels) for r in range(3)]
    assert [(p.first, p.last) for p in parts] == [(0, 13), (13, 26), (26, 37)]
    ref = whole.draws(0, 37)
    got = [torch.cat(x) for x in zip(*(p.draws(p.first, p.last) for p in parts))]
    for a, b in zip(ref, got):
        assert torch.equal(a, b)
    assert torch.equal(whole.draws(5, 9)[0], ref[0][5:9])  # image i's draws do not depend on its neighbours
    assert len(set(ref[1].tolist())) > 10  # the noise levels spread out over [0, T)
    many = HeldOut(load_config(CFG, ["model.hidden=8", "diffusion.T=50", "log.test_images=400"], device="cpu"), obj,
                   0, 1, "cpu", images.repeat(9, 1, 1, 1), labels.repeat(9))
    assert 20 <= int(many.draws(0, 400)[2].sum()) <= 60  # labels dropped at p_uncond = 0.1, as in training


def test_the_loss_is_the_same_for_any_batch_size_and_repeats_exactly():
    cfg, obj, images, labels, net = setup()
    small = HeldOut(cfg, obj, 0, 1, "cpu", images, labels)
    big = HeldOut(load_config(CFG, ["model.hidden=8", "diffusion.T=50", "train.device=cpu", "log.test_images=37",
                                    "train.batch_size=512"], device="cpu"), obj, 0, 1, "cpu", images, labels)
    assert (small.batch, big.batch) == (64, 512)
    off = torch.autocast("cpu", enabled=False)
    a, b = small.measure(net, off), big.measure(net, off)
    assert a == small.measure(net, off)  # the same draws every epoch: bit-identical
    assert set(a) == {"test_loss", "test_loss/q0", "test_loss/q1", "test_loss/q2", "test_loss/q3"}
    assert b["test_loss"] == pytest.approx(a["test_loss"], rel=1e-5)
    net.train()
    small.measure(net, off)
    assert net.training  # the net's mode is restored


def test_a_different_seed_draws_differently_and_clean_gives_model_space_images():
    cfg, obj, images, labels, net = setup()
    other = HeldOut(load_config(CFG, ["model.hidden=8", "diffusion.T=50", "train.device=cpu", "train.seed=1"],
                                device="cpu"), obj, 0, 1, "cpu", images, labels)
    assert not torch.equal(HeldOut(cfg, obj, 0, 1, "cpu", images, labels).draws(0, 3)[0], other.draws(0, 3)[0])
    x, y = other.clean(4)
    assert x.shape == (4, 1, 28, 28) and x.min() >= -1 and x.max() <= 1 and torch.equal(y, labels[:4])
    unit = HeldOut(load_config(CFG, ["model.hidden=8", "data.normalize=[0.0, 1.0]"], device="cpu"), obj, 0, 1, "cpu",
                   images, labels)
    assert torch.allclose(unit.clean(4)[0], images[:4].float() / 255, atol=1e-6, rtol=0)  # the denoiser recipe's [0, 1]
