"""The CS180 (Berkeley, project 5) UNet for 28×28 MNIST: one-step denoiser, time- and class-conditional.

Layout (hidden width D; sizes for 28×28, any image_size divisible by 4 works the same way):

    x ─ ConvBlock(C→D) ─────────────────────────────────────────────┐ 28
        DownBlock(D→D) ──────────────────────────────────────┐      │ 14
        DownBlock(D→2D) ─────────────────────────────┐       │      │ 7
        Flatten (AvgPool 7, GELU) → Unflatten(2D)    │ 1 → 7 │      │
        [modulate 1] ‖ cat ──────────────────────────┘       │      │
        UpBlock(4D→D) → [modulate 2] ‖ cat ──────────────────┘      │ 14
        UpBlock(2D→D) ‖ cat ────────────────────────────────────────┘ 28
        ConvBlock(2D→D) → Conv2d(D→C, 3×3)

Modulation: time nets add FCBlock(t/T); the class net computes ``c * h + t`` with FCBlocks of the
(num_classes+1)-way one-hot label (last slot = null class). BatchNorm as in the course; the residual
and CIFAR nets use GroupNorm instead.
"""
import torch
from torch import nn

from ddpm.nets.layers import check_int, fail, labels_or_null, one_hot, time_fraction
from ddpm.nets.registry import register


class Conv(nn.Sequential):
    """(B, cin, H, W) → (B, cout, H, W): Conv 3×3, BatchNorm, GELU."""

    def __init__(self, cin, cout):
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.GELU())


class DownConv(nn.Sequential):
    """(B, cin, H, W) → (B, cout, H/2, W/2): Conv 3×3 stride 2, BatchNorm, GELU."""

    def __init__(self, cin, cout):
        super().__init__(nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.BatchNorm2d(cout), nn.GELU())


class UpConv(nn.Sequential):
    """(B, cin, H, W) → (B, cout, 2H, 2W): ConvTranspose 4×4 stride 2, BatchNorm, GELU."""

    def __init__(self, cin, cout):
        super().__init__(nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1), nn.BatchNorm2d(cout), nn.GELU())


class Flatten(nn.Sequential):
    """(B, C, s, s) → (B, C, 1, 1): average pool over the whole map, GELU."""

    def __init__(self, size):
        super().__init__(nn.AvgPool2d(size), nn.GELU())


class Unflatten(nn.Sequential):
    """(B, C, 1, 1) → (B, C, s, s): ConvTranspose s×s stride s, BatchNorm, GELU."""

    def __init__(self, channels, size):
        super().__init__(nn.ConvTranspose2d(channels, channels, size, stride=size), nn.BatchNorm2d(channels), nn.GELU())


class ConvBlock(nn.Sequential):
    def __init__(self, cin, cout):
        super().__init__(Conv(cin, cout), Conv(cout, cout))


class DownBlock(nn.Sequential):
    def __init__(self, cin, cout):
        super().__init__(DownConv(cin, cout), ConvBlock(cout, cout))


class UpBlock(nn.Sequential):
    def __init__(self, cin, cout):
        super().__init__(UpConv(cin, cout), ConvBlock(cout, cout))


class FCBlock(nn.Sequential):
    """(B, cin) → (B, cout, 1, 1): Linear, GELU, Linear; shaped to broadcast over a feature map."""

    def __init__(self, cin, cout):
        super().__init__(nn.Linear(cin, cout), nn.GELU(), nn.Linear(cout, cout), nn.Unflatten(1, (cout, 1, 1)))


class _CS180UNet(nn.Module):
    """The shared backbone; subclasses decide how the two decoder stages are modulated."""

    num_classes = 0
    time_conditional = False

    def __init__(self, in_channels, image_size, hidden):
        super().__init__()
        self.in_channels = check_int(self.arch, "in_channels", in_channels, example=1)
        self.image_size = check_int(self.arch, "image_size", image_size, low=4, example=28)
        if image_size % 4:
            fail(self.arch, "image_size", image_size, "must be divisible by 4 (two stride-2 downsamplings), e.g. 28")
        D = check_int(self.arch, "hidden", hidden, example=64)
        self.hidden = D
        bottom = image_size // 4
        self.first = ConvBlock(in_channels, D)
        self.down1 = DownBlock(D, D)
        self.down2 = DownBlock(D, 2 * D)
        self.flatten = Flatten(bottom)
        self.unflatten = Unflatten(2 * D, bottom)
        self.up1 = UpBlock(4 * D, D)
        self.up2 = UpBlock(2 * D, D)
        self.last = ConvBlock(2 * D, D)
        self.out = nn.Conv2d(D, in_channels, 3, padding=1)

    def unet(self, x, scale1=None, shift1=None, scale2=None, shift2=None):
        """x: (B, C, H, W) → (B, C, H, W); optional (B, 2D, 1, 1) / (B, D, 1, 1) stage modulations."""
        x0 = self.first(x)
        x1 = self.down1(x0)
        x2 = self.down2(x1)
        h = self.unflatten(self.flatten(x2))
        if scale1 is not None:
            h = scale1 * h
        if shift1 is not None:
            h = h + shift1
        h = self.up1(torch.cat([h, x2], dim=1))
        if scale2 is not None:
            h = scale2 * h
        if shift2 is not None:
            h = h + shift2
        h = self.up2(torch.cat([h, x1], dim=1))
        return self.out(self.last(torch.cat([h, x0], dim=1)))


def embed_time(block: nn.Module, frac: torch.Tensor) -> torch.Tensor:
    """block(frac) in float32 even under autocast. frac: (B, 1) = t / T. bf16 keeps 8 significant bits,
    so t / T would round to the same value for neighbouring t in the upper half of [0, 1) once T > 256
    (T = 300 here): the net could not tell those timesteps apart."""
    kind = frac.device.type
    if kind not in ("cpu", "cuda") or not torch.is_autocast_enabled(kind):
        return block(frac)
    with torch.autocast(kind, enabled=False):
        return block(frac.float())


@register("cs180_denoiser")
class CS180Denoiser(_CS180UNet):
    """Unconditional one-step denoiser: ignores t. x: (B, C, H, W) → (B, C, H, W)."""

    def __init__(self, in_channels=1, image_size=28, hidden=128):
        super().__init__(in_channels, image_size, hidden)

    def forward(self, x, t=None, y=None):
        labels_or_null(y, 0, x.shape[0], x.device, self.arch)
        return self.unet(x)


@register("cs180_time_unet")
class CS180TimeUNet(_CS180UNet):
    """Time-conditional UNet: FCBlock(t/T) added after the unflatten and the first up block."""

    time_conditional = True

    def __init__(self, in_channels=1, image_size=28, hidden=64, T=300):
        super().__init__(in_channels, image_size, hidden)
        self.T = check_int(self.arch, "T", T, example=300)
        self.t_embed1 = FCBlock(1, 2 * hidden)
        self.t_embed2 = FCBlock(1, hidden)

    def forward(self, x, t=None, y=None):
        """x: (B, C, H, W); t: LongTensor (B,) in [0, T) or float (B,) in [0, 1] → (B, C, H, W)."""
        labels_or_null(y, 0, x.shape[0], x.device, self.arch)
        frac = time_fraction(t, self.T, x.shape[0], self.arch)[:, None]
        return self.unet(x, shift1=embed_time(self.t_embed1, frac), shift2=embed_time(self.t_embed2, frac))


@register("cs180_class_unet")
class CS180ClassUNet(_CS180UNet):
    """Time- and class-conditional UNet: ``h = c * h + t`` at both decoder stages (≈2.1 M at D=64)."""

    time_conditional = True

    def __init__(self, in_channels=1, image_size=28, hidden=64, T=300, num_classes=10):
        super().__init__(in_channels, image_size, hidden)
        self.T = check_int(self.arch, "T", T, example=300)
        if num_classes == 0:
            fail(self.arch, "num_classes", 0, "must be >= 1 (for an unconditional net use model.arch=cs180_time_unet)")
        self.num_classes = check_int(self.arch, "num_classes", num_classes, example=10)
        self.t_embed1 = FCBlock(1, 2 * hidden)
        self.t_embed2 = FCBlock(1, hidden)
        self.c_embed1 = FCBlock(num_classes + 1, 2 * hidden)
        self.c_embed2 = FCBlock(num_classes + 1, hidden)

    def forward(self, x, t=None, y=None):
        """x: (B, C, H, W); t as in CS180TimeUNet; y: LongTensor (B,) in [0, num_classes] or None."""
        B = x.shape[0]
        frac = time_fraction(t, self.T, B, self.arch)[:, None]
        c = one_hot(labels_or_null(y, self.num_classes, B, x.device, self.arch), self.num_classes + 1)
        return self.unet(
            x,
            scale1=self.c_embed1(c), shift1=embed_time(self.t_embed1, frac),
            scale2=self.c_embed2(c), shift2=embed_time(self.t_embed2, frac),
        )
