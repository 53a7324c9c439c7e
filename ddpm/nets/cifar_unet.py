"""The DDPM (Ho et al. 2020) CIFAR-10 UNet, with an optional class embedding for guidance.

Per level i (resolution image_size / 2**i, width base·ch_mult[i]): num_res_blocks residual blocks
(GroupNorm, SiLU, Conv 3×3, + time embedding, GroupNorm, SiLU, dropout, Conv 3×3), self-attention
after each block at resolutions in attn_resolutions, then a stride-2 conv (not on the last level).
Middle: Res, Attn, Res. Decoder mirrors it with num_res_blocks + 1 blocks per level, each taking a
skip concatenated on channels, and nearest-neighbour ×2 + Conv 3×3 upsampling. The time embedding is
sinusoidal(1000·t/T) → Linear → SiLU → Linear (width 4·base); the class embedding
nn.Embedding(num_classes + 1, 4·base) (null class = index num_classes) is added to it.

Like DDPM, the last conv of each residual block, the attention output and the final conv start at
zero, so a fresh net outputs zeros and starts as a sum of identities.
DDPM-CIFAR10 (base 128, ch_mult 1,2,2,2, 2 blocks, attention at 16, no classes): 35,746,307 params.
"""
import torch
import torch.nn.functional as F
from torch import nn

from ddpm.nets.layers import (
    SinusoidalTimeEmbedding,
    check_float,
    check_int,
    check_int_seq,
    fail,
    labels_or_null,
    time_fraction,
)
from ddpm.nets.registry import register


def _zero(module):
    nn.init.zeros_(module.weight)
    nn.init.zeros_(module.bias)
    return module


class TimeResBlock(nn.Module):
    """(B, cin, H, W), temb (B, temb_dim) already SiLU'd → (B, cout, H, W)."""

    def __init__(self, cin, cout, temb_dim, dropout, num_groups, zero_init=True):
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb_proj = nn.Linear(temb_dim, cout)
        self.norm2 = nn.GroupNorm(num_groups, cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if zero_init:
            _zero(self.conv2)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(temb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """(B, C, H, W) → (B, C, H, W): single-head self-attention over the H·W positions, residual."""

    def __init__(self, channels, num_groups):
        super().__init__()
        self.norm = nn.GroupNorm(num_groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x):
        B, C, H, W = x.shape
        # (B, 3, C, HW) → three (B, 1, HW, C): one head, tokens are positions.
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).transpose(2, 3).unsqueeze(2).unbind(1)
        h = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(h.squeeze(1).transpose(1, 2).reshape(B, C, H, W))


class Level(nn.Module):
    """One resolution of the encoder or decoder: blocks, optional attention after each, a resampler."""

    def __init__(self, blocks, attend, resample, num_groups):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attns = nn.ModuleList(
            SelfAttention(b.conv1.out_channels, num_groups) if attend else nn.Identity() for b in blocks
        )
        self.resample = resample


class Upsample(nn.Module):
    """(B, C, H, W) → (B, C, 2H, 2W): nearest-neighbour ×2, Conv 3×3."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


@register("cifar_unet")
class CifarUNet(nn.Module):
    """DDPM-style UNet with attention. x: (B, C, H, W) → (B, C, H, W)."""

    time_conditional = True

    def __init__(self, in_channels=3, image_size=32, base=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
                 attn_resolutions=(16,), dropout=0.1, T=1000, num_classes=10, num_groups=32):
        super().__init__()
        a = self.arch
        self.in_channels = check_int(a, "in_channels", in_channels, example=3)
        self.image_size = check_int(a, "image_size", image_size, example=32)
        self.base = check_int(a, "base", base, example=128)
        ch_mult = check_int_seq(a, "ch_mult", ch_mult, example=[1, 2, 2, 2])
        num_res_blocks = check_int(a, "num_res_blocks", num_res_blocks, example=2)
        attn_resolutions = check_int_seq(a, "attn_resolutions", attn_resolutions, allow_empty=True, example=[16])
        dropout = check_float(a, "dropout", dropout, 0.0, 1.0, example=0.1)
        self.T = check_int(a, "T", T, example=1000)
        self.num_classes = check_int(a, "num_classes", num_classes, low=0, example=10)
        num_groups = check_int(a, "num_groups", num_groups, example=32)
        if image_size % 2 ** (len(ch_mult) - 1):
            fail(a, "ch_mult", list(ch_mult), f"{len(ch_mult)} levels halve image_size={image_size} "
                 f"{len(ch_mult) - 1} times, so image_size must be divisible by {2 ** (len(ch_mult) - 1)} "
                 "(28×28 MNIST: e.g. model.ch_mult=[1,2,2])")
        resolutions = [image_size // 2**i for i in range(len(ch_mult))]
        for r in attn_resolutions:
            if r not in resolutions:
                fail(a, "attn_resolutions", list(attn_resolutions),
                     f"{r} is not one of this net's resolutions {resolutions} "
                     f"(e.g. model.attn_resolutions=[{resolutions[min(1, len(resolutions) - 1)]}])")
        widths = [base * m for m in ch_mult]
        if any(w % num_groups for w in [base] + widths):
            fail(a, "num_groups", num_groups,
                 f"must divide base={base} and every level width {widths} (e.g. base=128, num_groups=32)")
        self.ch_mult, self.num_res_blocks, self.attn_resolutions = ch_mult, num_res_blocks, attn_resolutions

        temb_dim = 4 * base
        self.time_embed = SinusoidalTimeEmbedding(base, temb_dim, act=nn.SiLU)
        if self.num_classes:
            self.class_embed = nn.Embedding(self.num_classes + 1, temb_dim)

        def block(cin, cout):
            return TimeResBlock(cin, cout, temb_dim, dropout, num_groups)

        self.conv_in = nn.Conv2d(in_channels, base, 3, padding=1)
        skip_ch = [base]
        ch = base
        self.down = nn.ModuleList()
        for i, w in enumerate(widths):
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(block(ch, w))
                ch = w
                skip_ch.append(ch)
            last = i == len(widths) - 1
            down = nn.Identity() if last else nn.Conv2d(ch, ch, 3, stride=2, padding=1)
            if not last:
                skip_ch.append(ch)
            self.down.append(Level(blocks, resolutions[i] in attn_resolutions, down, num_groups))

        self.mid1 = block(ch, ch)
        self.mid_attn = SelfAttention(ch, num_groups)
        self.mid2 = block(ch, ch)

        self.up = nn.ModuleList()
        for i in reversed(range(len(widths))):
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(block(ch + skip_ch.pop(), widths[i]))
                ch = widths[i]
            up = Upsample(ch) if i > 0 else nn.Identity()
            self.up.append(Level(blocks, resolutions[i] in attn_resolutions, up, num_groups))

        self.norm_out = nn.GroupNorm(num_groups, ch)
        self.conv_out = _zero(nn.Conv2d(ch, in_channels, 3, padding=1))

    def forward(self, x, t=None, y=None):
        """x: (B, C, H, W); t: LongTensor (B,) in [0, T) or float (B,) in [0, 1];
        y: LongTensor (B,) in [0, num_classes] (num_classes = null) or None → (B, C, H, W)."""
        B = x.shape[0]
        temb = self.time_embed(time_fraction(t, self.T, B, self.arch))
        y = labels_or_null(y, self.num_classes, B, x.device, self.arch)
        if y is not None:
            temb = temb + self.class_embed(y)
        temb = F.silu(temb)

        hs = [self.conv_in(x)]
        for level in self.down:
            for blk, attn in zip(level.blocks, level.attns):
                hs.append(attn(blk(hs[-1], temb)))
            if not isinstance(level.resample, nn.Identity):
                hs.append(level.resample(hs[-1]))
        h = self.mid2(self.mid_attn(self.mid1(hs[-1], temb)), temb)
        for level in self.up:
            for blk, attn in zip(level.blocks, level.attns):
                h = attn(blk(torch.cat([h, hs.pop()], dim=1), temb))
            h = level.resample(h)
        return self.conv_out(F.silu(self.norm_out(h)))
