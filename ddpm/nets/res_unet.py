"""Residual UNet for 28×28 MNIST and 32×32 CIFAR: the CS180 layout with residual GroupNorm blocks.

Layout (width C; s = image_size, b = s/4 is the bottom resolution: 7 on MNIST, 8 on CIFAR):

    x ─ Res(in→C) ─────────────────────────────────────────────────────┐ s
        Down: Res(C→C), Res(C→C), MaxPool ─────────────────────────┐   │ s/2
        Down: Res(C→2C), Res(2C→2C), MaxPool, Res(2C→2C) ──────┐   │   │ b
        AvgPool b + GELU → vector → ConvTranspose b×b → b×b    │   │   │
        [fuse 2C] ‖ cat ───────────────────────────────────────┘   │   │
        Up: ConvTranspose 2× (4C→C), Res, Res → [fuse C] ‖ cat ────┘   │ s/2
        Up: ConvTranspose 2× (2C→C), Res, Res → [fuse C] ‖ cat ────────┘ s
        Res(2C→C) → Conv 3×3 (C→in)

Fuse at each decoder stage: ``h = h * (1 + class_k(y)) + time_k(t)`` (multiplicative class, additive
time); class_k / time_k are per-stage linear maps of a shared class embedding (nn.Embedding with the
null class at index num_classes) and of a shared time embedding (sinusoidal → MLP, or sine MLP).
The class scale is ``1 + ...`` rather than a raw product so a fresh net starts near the identity.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from ddpm.nets.layers import (
    SineMLPTimeEmbedding,
    SinusoidalTimeEmbedding,
    check_choice,
    check_int,
    fail,
    groups_for,
    labels_or_null,
    time_fraction,
)
from ddpm.nets.registry import register


class ResBlock(nn.Module):
    """(B, cin, H, W) → (B, cout, H, W): two (Conv 3×3, GroupNorm, GELU); (skip(x) + h) / √2."""

    def __init__(self, cin, cout):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(groups_for(cout), cout), nn.GELU(),
            nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(groups_for(cout), cout), nn.GELU(),
        )
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        # Dividing by √2 keeps the variance of the sum of two unit-variance branches at one.
        return (self.skip(x) + self.body(x)) / math.sqrt(2.0)


class Down(nn.Sequential):
    """(B, cin, H, W) → (B, cout, H/2, W/2)."""

    def __init__(self, cin, cout):
        super().__init__(ResBlock(cin, cout), ResBlock(cout, cout), nn.MaxPool2d(2))


class Up(nn.Sequential):
    """(B, cin, H, W) → (B, cout, 2H, 2W): ConvTranspose 4×4 stride 2, then two residual blocks."""

    def __init__(self, cin, cout):
        super().__init__(
            nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1), nn.GroupNorm(groups_for(cout), cout), nn.GELU(),
            ResBlock(cout, cout), ResBlock(cout, cout),
        )


@register("res_unet")
class ResUNet(nn.Module):
    """Residual UNet, time- and (optionally) class-conditional. x: (B, C, H, W) → (B, C, H, W).

    712,289 parameters at channels=32 on MNIST with 10 classes; the count scales as channels².
    """

    time_conditional = True

    def __init__(self, in_channels=1, image_size=28, channels=32, T=1000, num_classes=10,
                 time_embedding="sinusoidal"):
        super().__init__()
        a = self.arch
        self.in_channels = check_int(a, "in_channels", in_channels, example=1)
        self.image_size = check_choice(a, "image_size", image_size, (28, 32))
        C = self.channels = check_int(a, "channels", channels, example=32)
        if C % 2:
            fail(a, "channels", C, "must be even (the sinusoidal time features use sin/cos pairs), e.g. 32")
        self.T = check_int(a, "T", T, example=1000)
        self.num_classes = check_int(a, "num_classes", num_classes, low=0, example=10)
        self.time_embedding = check_choice(a, "time_embedding", time_embedding, ("sinusoidal", "sine_mlp"))
        low = image_size // 4  # bottom resolution
        emb = 4 * C

        self.first = ResBlock(in_channels, C)
        self.down1 = Down(C, C)
        self.down2 = Down(C, 2 * C)
        self.bottom = ResBlock(2 * C, 2 * C)
        self.to_vec = nn.Sequential(nn.AvgPool2d(low), nn.GELU())
        self.from_vec = nn.Sequential(
            nn.ConvTranspose2d(2 * C, 2 * C, low, stride=low), nn.GroupNorm(groups_for(2 * C), 2 * C), nn.GELU()
        )
        self.up1 = Up(4 * C, C)
        self.up2 = Up(2 * C, C)
        self.last = ResBlock(2 * C, C)
        self.out = nn.Conv2d(C, in_channels, 3, padding=1)

        stage_channels = (2 * C, C, C)  # bottom, after up1, after up2
        if time_embedding == "sinusoidal":
            self.time_embed = SinusoidalTimeEmbedding(C, emb)
        else:
            self.time_embed = SineMLPTimeEmbedding(emb)
        self.time_proj = nn.ModuleList(nn.Linear(emb, ch) for ch in stage_channels)
        if self.num_classes:
            self.class_embed = nn.Embedding(self.num_classes + 1, emb)
            self.class_proj = nn.ModuleList(nn.Linear(emb, ch) for ch in stage_channels)

    def forward(self, x, t=None, y=None):
        """x: (B, C, H, W); t: LongTensor (B,) in [0, T) or float (B,) in [0, 1];
        y: LongTensor (B,) in [0, num_classes] (num_classes = null) or None → (B, C, H, W)."""
        B = x.shape[0]
        temb = F.gelu(self.time_embed(time_fraction(t, self.T, B, self.arch)))
        y = labels_or_null(y, self.num_classes, B, x.device, self.arch)
        cemb = None if y is None else F.gelu(self.class_embed(y))

        def fuse(h, k):
            if cemb is not None:
                h = h * (1 + self.class_proj[k](cemb)[:, :, None, None])
            return h + self.time_proj[k](temb)[:, :, None, None]

        x0 = self.first(x)
        x1 = self.down1(x0)
        x2 = self.bottom(self.down2(x1))
        h = fuse(self.from_vec(self.to_vec(x2)), 0)
        h = fuse(self.up1(torch.cat([h, x2], dim=1)), 1)
        h = fuse(self.up2(torch.cat([h, x1], dim=1)), 2)
        return self.out(self.last(torch.cat([h, x0], dim=1)))
