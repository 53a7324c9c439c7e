"""What varies with the step count: run length, learning rate, EMA decay. Pure functions of the step, so a
resumed run continues every schedule exactly (nothing to save in a checkpoint)."""
import math

from ddpm.config import Config


def total_steps(cfg: Config, steps_per_epoch: int) -> int:
    """The run's length in optimizer steps: train.steps, or train.epochs rounded up to whole steps."""
    t = cfg.train
    return t.steps if t.steps is not None else max(1, math.ceil(t.epochs * steps_per_epoch))


def lr_at(cfg: Config, step: int, steps_per_epoch: int, total: int) -> float:
    """Learning rate for the update that follows ``step`` completed steps."""
    t = cfg.train
    warm = min(1.0, (step + 1) / t.warmup_steps) if t.warmup_steps else 1.0
    epoch = step // steps_per_epoch
    if t.lr_schedule == "exponential":  # torch's ExponentialLR stepped once per epoch
        factor = t.lr_gamma ** epoch
    elif t.lr_schedule == "multistep":  # MultiStepLR with milestones in epochs
        factor = t.lr_gamma ** sum(epoch >= m for m in t.lr_milestones)
    elif t.lr_schedule == "cosine":
        done = min(1.0, max(0, step - t.warmup_steps) / max(1, total - t.warmup_steps))
        factor = 0.5 * (1 + math.cos(math.pi * done))
    else:
        factor = 1.0
    return t.lr * warm * factor


def ema_decay_at(decay: float, step: int) -> float:
    """EMA decay with the usual warm-up: early weights are forgotten quickly."""
    return min(decay, (1 + step) / (10 + step))
