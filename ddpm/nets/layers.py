"""Pieces shared by the nets: timestep normalisation, sinusoidal features, null-class labels, checks.

Conventions every net follows (see ``ddpm/nets/__init__.py``):
- ``t``: LongTensor (B,) of timestep indices in [0, T) → normalised to t / T; a floating-point ``t`` is
  already continuous time in [0, 1] (rectified flow) and is used as-is. A 0-d or (1,) ``t`` broadcasts.
- ``y``: LongTensor (B,) in [0, num_classes]; ``num_classes`` is the learned null class and ``y=None``
  means all-null. Labels are never range-checked here (that would need a host sync); out-of-range
  labels fail inside the embedding lookup (IndexError on CPU, a device assert on CUDA).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from ddpm.errors import UserError

# Sinusoidal features see time in DDPM's units (0..1000) whatever T is, so long and float time, and
# nets trained with different T, all put the same frequencies on the same fraction of the trajectory.
TIME_SCALE = 1000.0


def time_fraction(t, T, batch, arch):
    """t: LongTensor (B,) in [0, T), or float (B,) in [0, 1] → float32 (B,) in [0, 1].

    ``batch`` is B; a 0-d or single-element ``t`` is broadcast to it. ``arch`` names the net in errors.
    """
    if t is None:
        raise ValueError(f"{arch} is time-conditional: pass t (LongTensor (B,) in [0, T) or float in [0, 1])")
    t = t.reshape(-1).expand(batch)
    if t.is_floating_point():
        return t.float()
    return t.float() / T


def sinusoidal_embedding(s, dim, max_period=10000.0):
    """s: float (B,) positions → (B, dim) float32 features [sin | cos] at geometric frequencies."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=s.device, dtype=torch.float32) / half)
    args = s.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class SinusoidalTimeEmbedding(nn.Module):
    """Time fraction (B,) in [0, 1] → (B, out_dim): sinusoidal features of 1000·t, then an MLP."""

    def __init__(self, feat_dim, out_dim, act=nn.GELU):
        super().__init__()
        self.feat_dim = feat_dim
        self.mlp = nn.Sequential(nn.Linear(feat_dim, out_dim), act(), nn.Linear(out_dim, out_dim))

    def forward(self, frac):
        return self.mlp(sinusoidal_embedding(frac * TIME_SCALE, self.feat_dim))


class SineMLPTimeEmbedding(nn.Module):
    """Time fraction (B,) in [0, 1] → (B, out_dim): Linear(1→d), sine activation, Linear(d→d).

    The first layer's frequencies start uniform in ±30 rad per unit time (SIREN's ω0): with PyTorch's
    default ±1 init every feature would be nearly linear in t and the net could not tell nearby steps apart.
    """

    def __init__(self, out_dim, omega0=30.0):
        super().__init__()
        self.inp = nn.Linear(1, out_dim)
        self.out = nn.Linear(out_dim, out_dim)
        with torch.no_grad():
            self.inp.weight.uniform_(-omega0, omega0)
            self.inp.bias.uniform_(-math.pi, math.pi)

    def forward(self, frac):
        return self.out(torch.sin(self.inp(frac[:, None])))


def labels_or_null(y, num_classes, batch, device, arch):
    """y: LongTensor (B,) in [0, num_classes] or None → LongTensor (B,); None means the null class.

    Returns None for an unconditional net (num_classes == 0), which must not be given labels.
    """
    if num_classes == 0:
        if y is not None:
            raise ValueError(f"{arch} is unconditional (num_classes=0): pass y=None; it cannot be class-guided")
        return None
    if y is None:
        return torch.full((batch,), num_classes, dtype=torch.long, device=device)
    return y


def one_hot(y, size):
    """y: LongTensor (B,) in [0, size) → (B, size) float32 one-hot.

    An embedding lookup into the identity instead of ``F.one_hot``, whose CPU range check syncs and
    whose out-of-range labels would otherwise slip through as all-zero rows.
    """
    return F.embedding(y, torch.eye(size, device=y.device))


def groups_for(channels, max_groups=32, min_group_size=4):
    """Largest GroupNorm group count dividing ``channels`` with at least ``min_group_size`` channels each."""
    for g in range(min(max_groups, channels // min_group_size), 1, -1):
        if channels % g == 0:
            return g
    return 1


# --- constructor argument checks: each raises UserError naming the model.<key> and a fix ---------------


def _bad(arch, key, value, need):
    raise UserError(f"model.{key}={value!r} is invalid for model.arch '{arch}': {need}")


def check_int(arch, key, value, low=1, example=None):
    """Return ``value`` if it is an int >= low (bools rejected), else raise UserError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        hint = f" (e.g. model.{key}={example})" if example is not None else ""
        _bad(arch, key, value, f"must be an int >= {low}{hint}")
    return value


def check_float(arch, key, value, low, high, example):
    """Return float(value) if it is a number in [low, high), else raise UserError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value < high:
        _bad(arch, key, value, f"must be a number in [{low}, {high}) (e.g. model.{key}={example})")
    return float(value)


def check_choice(arch, key, value, choices):
    """Return ``value`` if it is one of ``choices``, else raise UserError listing them."""
    if value not in choices:
        _bad(arch, key, value, f"choose one of: {', '.join(map(str, choices))}")
    return value


def check_int_seq(arch, key, value, low=1, allow_empty=False, example=None):
    """A list or tuple of ints >= low (YAML gives lists) → tuple; anything else raises UserError."""
    ok = isinstance(value, (list, tuple)) and (allow_empty or len(value) > 0)
    ok = ok and all(isinstance(v, int) and not isinstance(v, bool) and v >= low for v in value)
    if not ok:
        hint = f" (e.g. model.{key}={example})" if example is not None else ""
        _bad(arch, key, value, f"must be a list of ints >= {low}{hint}")
    return tuple(value)


def fail(arch, key, value, need):
    """Raise UserError for a value that passed the type checks but does not fit the architecture."""
    _bad(arch, key, value, need)
