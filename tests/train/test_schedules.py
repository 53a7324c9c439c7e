"""The training loop's step functions against torch's schedulers and closed forms."""
import math
from pathlib import Path

import pytest
import torch

from ddpm.config import load_config
from ddpm.data.batcher import mix_seed
from ddpm.train.schedules import ema_decay_at, lr_at, total_steps

CFG = Path(__file__).resolve().parents[2] / "configs" / "mnist.yaml"


def torch_lrs(scheduler_cls, epochs, spe, **kw):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
    sched = scheduler_cls(opt, **kw)
    out = []
    for _ in range(epochs):
        out += [opt.param_groups[0]["lr"]] * spe
        opt.step()
        sched.step()
    return out


def test_exponential_matches_torch_exponentiallr_stepped_per_epoch():
    cfg = load_config(CFG, ["train.lr=1e-3", "train.warmup_steps=0", "train.epochs=20"])
    spe = 7
    ours = [lr_at(cfg, s, spe, 20 * spe) for s in range(20 * spe)]
    ref = torch_lrs(torch.optim.lr_scheduler.ExponentialLR, 20, spe, gamma=cfg.train.lr_gamma)
    assert ours == pytest.approx(ref, rel=1e-12)
    assert ours[-1] == pytest.approx(1e-3 * 0.1 ** (19 / 20))


def test_multistep_matches_torch():
    cfg = load_config(CFG, ["train.lr=1e-3", "train.warmup_steps=0", "train.lr_schedule=multistep",
                            "train.lr_milestones=[3, 5]", "train.lr_gamma=0.5"])
    ours = [lr_at(cfg, s, 4, 32) for s in range(32)]
    ref = torch_lrs(torch.optim.lr_scheduler.MultiStepLR, 8, 4, milestones=[3, 5], gamma=0.5)
    assert ours == pytest.approx(ref, rel=1e-12)


def test_warmup_then_cosine_and_constant():
    cfg = load_config(CFG, ["train.lr=1.0", "train.warmup_steps=10", "train.lr_schedule=cosine", "train.steps=110"])
    assert lr_at(cfg, 0, 50, 110) == pytest.approx(0.1)
    assert lr_at(cfg, 9, 50, 110) == pytest.approx(1.0)
    assert lr_at(cfg, 60, 50, 110) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(cfg, 110, 50, 110) == pytest.approx(0.0, abs=1e-12)
    const = load_config(CFG, ["train.lr=0.3", "train.warmup_steps=0", "train.lr_schedule=constant"])
    assert {lr_at(const, s, 5, 100) for s in range(100)} == {0.3}


def test_ema_warmup_and_run_length_and_seeds():
    assert ema_decay_at(0.999, 0) == pytest.approx(0.1)
    assert ema_decay_at(0.999, 10 ** 6) == 0.999
    cfg = load_config(CFG, ["train.epochs=2.5"])
    assert total_steps(cfg, 100) == 250
    assert total_steps(load_config(CFG, ["train.steps=7"]), 100) == 7
    seeds = {mix_seed(0, 1, s) for s in range(1000)} | {mix_seed(1, 1, s) for s in range(1000)}
    assert len(seeds) == 2000 and all(0 <= s < 2 ** 63 for s in seeds)
