"""The held-out loss: the training objective on the first ``log.test_images`` images of the test split, each
with its own fixed noise, noise level and label drop.

Test image i draws them from a generator seeded by ``mix_seed(seed, HELDOUT_STREAM, i)``, in the order the
training loop draws its own (noise, level, drop), so the number is the training loss's estimator on unseen
images and compares across epochs, resumes, batch sizes and any number of ranks: rank r measures a
contiguous share of the images with rank 0's BatchNorm statistics, and the sums are reduced over the ranks
(:func:`ddpm.train.dist.reduce_mean`).
"""
import math

import torch

from ddpm.config import Config
from ddpm.data.batcher import HELDOUT_STREAM, mix_seed, to_model_space
from ddpm.data.datasets import load_dataset
from ddpm.diffusion.objectives import Objective
from ddpm.train.dist import broadcast_buffers, reduce_mean


class HeldOut:
    """The test split of a run on ``device``: ``measure(net)`` (collective) and ``clean(n)`` (the first n images).

    ``images``/``labels``: the test split, if not the config's (uint8 (N, C, H, W), int64 (N,))."""

    def __init__(self, cfg: Config, objective: Objective, rank: int, world_size: int, device, images=None,
                 labels=None):
        if images is None:
            images, labels = load_dataset(cfg.data.dataset, cfg.data.root, False, cfg.data.download)
        self.cfg, self.objective, self.device = cfg, objective, device
        self.normalize = tuple(cfg.data.normalize) if cfg.data.normalize else None
        self.images, self.labels = images, labels.long()
        self.count = min(cfg.log.test_images, len(images))
        share = math.ceil(self.count / world_size)
        self.first, self.last = min(rank * share, self.count), min((rank + 1) * share, self.count)
        self.batch = max(1, cfg.train.batch_size // world_size)

    def clean(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first n test images in model space (n, C, H, W) on the device, and their labels."""
        return to_model_space(self.images[:n], self.normalize).to(self.device), self.labels[:n].to(self.device)

    def draws(self, first: int, last: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(noise (n, C, H, W), levels (n,), label drop (n,)) of test images first..last-1, on the device."""
        shape, p = tuple(self.images.shape[1:]), self.cfg.diffusion.p_uncond
        noise, levels, drops = [], [], []
        g = torch.Generator()
        for i in range(first, last):
            g.manual_seed(mix_seed(self.cfg.train.seed, HELDOUT_STREAM, i))
            noise.append(torch.randn(shape, generator=g))
            levels.append(self.objective.draw(g, 1, "cpu"))
            drops.append(torch.rand(1, generator=g) < p)
        return (torch.stack(noise).to(self.device), torch.cat(levels).to(self.device),
                torch.cat(drops).to(self.device))

    @torch.no_grad()
    def measure(self, net, autocast, channels_last: bool = False) -> dict:
        """{"test_loss", "test_loss/q0".."q3"}: the mean loss of ``net`` (put in eval mode meanwhile) over the
        test images, reduced over the ranks; every rank must call it."""
        was_training = net.training
        net.eval()
        broadcast_buffers(net)  # BatchNorm statistics: rank 0's on every rank, as its checkpoint
        sums = torch.zeros(10, dtype=torch.float64, device=self.device)  # sum, count, 4 quartile sums, 4 counts
        for lo in range(self.first, self.last, self.batch):
            hi = min(lo + self.batch, self.last)
            x = to_model_space(self.images[lo:hi], self.normalize).to(self.device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            noise, t, drop = self.draws(lo, hi)
            with autocast:
                per_sample = self.objective.loss(net, x, self.labels[lo:hi].to(self.device), noise, t, drop)
            per_sample = per_sample.double()
            sums[0] += per_sample.sum()
            sums[1] += len(per_sample)
            if self.objective.quartiles:
                bucket = self.objective.bucket(t)
                sums[2:6].index_add_(0, bucket, per_sample)
                sums[6:10].index_add_(0, bucket, torch.ones_like(per_sample))
        net.train(was_training)
        total = reduce_mean(sums, self.device).tolist()
        out = {"test_loss": total[0] / max(total[1], 1)}
        out.update({f"test_loss/q{i}": total[2 + i] / total[6 + i] for i in range(4)
                    if self.objective.quartiles and total[6 + i] > 0})
        return out
