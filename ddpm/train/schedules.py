"""What varies with the step count: run length, learning rate, EMA decay, the epochs that sample, test and
save. Pure functions of the step, so a resumed run continues every schedule exactly (nothing to save in a
checkpoint)."""
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


class EpochSchedule:
    """The epoch ends an epoch schedule (``log.sample_every_epochs``, ...; see ddpm.config.epoch_schedule)
    names, as optimizer steps. Epoch e ends after step ``e * steps_per_epoch``: the batcher's epochs count
    global batches, so that step is the same for any world size (and any batch size has its own)."""

    def __init__(self, schedule: list, steps_per_epoch: int):
        self.epochs = {e for e in schedule if isinstance(e, int)}
        self.periods = [int(e.split()[1]) for e in schedule if isinstance(e, str)]
        self.steps_per_epoch = steps_per_epoch

    def __bool__(self) -> bool:
        return bool(self.epochs or self.periods)

    def due(self, step: int) -> bool:
        """Whether optimizer step ``step`` (steps done) ends an epoch of the schedule."""
        epoch, rest = divmod(step, self.steps_per_epoch)
        return step > 0 and rest == 0 and (epoch in self.epochs or any(epoch % p == 0 for p in self.periods))

    def steps(self, total: int) -> list[int]:
        """The steps in [1, total] the schedule names, ascending."""
        last = total // self.steps_per_epoch
        return [e * self.steps_per_epoch for e in range(1, last + 1) if self.due(e * self.steps_per_epoch)]

    def beyond(self, total: int) -> list[int]:
        """The listed epochs a run of ``total`` steps never ends (periods excepted)."""
        return sorted(e for e in self.epochs if e * self.steps_per_epoch > total)
