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


@pytest.mark.parametrize("n, batch, world", [(100, 10, 1), (100, 10, 2), (103, 12, 4), (97, 32, 1), (64, 64, 2)])
def test_epoch_schedules_name_the_steps_where_the_batcher_starts_a_new_epoch(n, batch, world):
    """Epoch e ends after step e x steps_per_epoch for any batch and world size: the steps before it, over all
    ranks, used each image at most once, and the next step begins the next epoch's permutation."""
    from ddpm.data.batcher import StepBatcher
    from ddpm.train.schedules import EpochSchedule

    images, ids = torch.zeros(n, 1, 2, 2, dtype=torch.uint8), torch.arange(n)
    ranks = [StepBatcher(images, ids, batch, world, r, seed=3) for r in range(world)]
    spe = ranks[0].steps_per_epoch
    assert spe == n // batch  # global batches: the same for every world size
    sched = EpochSchedule(load_config(CFG, ["log.sample_every_epochs=[1, every 3]"]).log.sample_every_epochs, spe)
    ends = sched.steps(7 * spe + 1)
    assert ends == [spe, 3 * spe, 6 * spe] and [s for s in range(1, 7 * spe + 2) if sched.due(s)] == ends
    for end in ends:
        seen = torch.cat([b.batch(s)[1] for s in range(end - spe, end) for b in ranks])
        assert len(seen) == spe * batch and len(set(seen.tolist())) == len(seen)  # one pass, no repeats
        assert ranks[0].epoch_of(end) == end // spe  # exactly whole epochs
    assert not sched.due(0) and not sched.due(spe + 1)
    assert EpochSchedule([2, 9], spe).beyond(5 * spe) == [9] and not EpochSchedule([], spe)
