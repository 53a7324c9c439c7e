"""Noisy-image classifier p(y | x_t, t) for classifier guidance (Dhariwal & Nichol 2021, small).

The encoder half of the CIFAR UNet: Conv 3×3 → per level two time-conditioned GroupNorm residual
blocks (width base·ch_mult[i]) and a stride-2 conv between levels → GroupNorm, SiLU, global average
pool → Linear → logits. Guidance differentiates log_softmax(logits)[y] with respect to x_t.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from ddpm.nets.cifar_unet import TimeResBlock
from ddpm.nets.layers import (
    SinusoidalTimeEmbedding,
    check_int,
    check_int_seq,
    fail,
    time_fraction,
)
from ddpm.nets.registry import register

BLOCKS_PER_LEVEL = 2


@register("noisy_classifier")
class NoisyClassifier(nn.Module):
    """x: (B, C, H, W) noisy images, t: timesteps → logits (B, num_classes).

    Unlike the denoisers, ``num_classes`` is the number of outputs and ``y`` is not an input: it is
    accepted (so callers can pass the same arguments to every net) and ignored. ``t=None`` means
    clean images (t = 0).
    """

    time_conditional = True

    def __init__(self, in_channels=1, image_size=28, base=32, ch_mult=(1, 2, 2), T=1000, num_classes=10):
        super().__init__()
        a = self.arch
        self.in_channels = check_int(a, "in_channels", in_channels, example=1)
        self.image_size = check_int(a, "image_size", image_size, example=28)
        self.base = check_int(a, "base", base, example=32)
        ch_mult = self.ch_mult = check_int_seq(a, "ch_mult", ch_mult, example=[1, 2, 2])
        self.T = check_int(a, "T", T, example=1000)
        self.num_classes = check_int(a, "num_classes", num_classes, low=2, example=10)
        if image_size % 2 ** (len(ch_mult) - 1):
            fail(a, "ch_mult", list(ch_mult), f"{len(ch_mult)} levels halve image_size={image_size} "
                 f"{len(ch_mult) - 1} times, so image_size must be divisible by {2 ** (len(ch_mult) - 1)} "
                 "(28×28 MNIST: e.g. model.ch_mult=[1,2,2])")
        # Every width is a multiple of base, so a group count dividing base divides them all.
        groups = math.gcd(8, base)
        temb_dim = 4 * base

        self.time_embed = SinusoidalTimeEmbedding(base, temb_dim, act=nn.SiLU)
        self.conv_in = nn.Conv2d(in_channels, base, 3, padding=1)
        self.blocks = nn.ModuleList()
        self.downs = nn.ModuleList()
        ch = base
        for i, m in enumerate(ch_mult):
            level = nn.ModuleList()
            for _ in range(BLOCKS_PER_LEVEL):
                # No zero-init: nothing downstream needs the blocks to start as identities here.
                level.append(TimeResBlock(ch, base * m, temb_dim, 0.0, groups, zero_init=False))
                ch = base * m
            self.blocks.append(level)
            last = i == len(ch_mult) - 1
            self.downs.append(nn.Identity() if last else nn.Conv2d(ch, ch, 3, stride=2, padding=1))
        self.norm_out = nn.GroupNorm(groups, ch)
        self.head = nn.Linear(ch, num_classes)

    def forward(self, x, t=None, y=None):
        """x: (B, C, H, W); t: LongTensor (B,) in [0, T), float (B,) in [0, 1], or None (clean);
        y: ignored → logits (B, num_classes)."""
        B = x.shape[0]
        frac = torch.zeros(B, device=x.device) if t is None else time_fraction(t, self.T, B, self.arch)
        temb = F.silu(self.time_embed(frac))
        h = self.conv_in(x)
        for level, down in zip(self.blocks, self.downs):
            for blk in level:
                h = blk(h, temb)
            h = down(h)
        h = F.silu(self.norm_out(h)).mean(dim=(2, 3))
        return self.head(h)
