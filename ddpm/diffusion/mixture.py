"""Guidance toward several classes at once: the conjunction of composable diffusion.

Liu et al. 2022, "Compositional Visual Generation with Composable Diffusion Models" (ECCV 2022,
arXiv:2206.01714), the conjunction operator ("AND"): a class-conditional model with a null class composes

    eps = eps_u + sum_i w_i (eps_{c_i} - eps_u)

(Bayes on scores: ``p(x | c_1 ... c_n) ∝ p(x) prod_i p(c_i | x)``, each ``p(c_i | x)`` the implicit classifier
of classifier-free guidance, raised to w_i). One class at weight gamma is classifier-free guidance in the
gamma convention; a negative weight is their negation ("NOT"). Same call shape as the other guidance
wrappers of :mod:`ddpm.diffusion.samplers`, so every sampler takes it.
"""
import math
from typing import Sequence

import torch

from ddpm.diffusion.samplers import Model
from ddpm.errors import UserError


def composed_guidance(model, classes: Sequence[int], weights: Sequence[float], num_classes: int) -> Model:
    """The conjunction of ``classes`` with ``weights`` around a class-conditional ``model(x, t, y)`` whose null
    class is ``num_classes``: ``(x, t, y) -> eps_u + sum_i w_i (eps_{c_i} - eps_u)``, every sample of the batch
    guided toward the same mix (``y`` is ignored).

    The K conditional and the unconditional predictions come from ONE batched forward of (1 + K) B samples
    (B, C, H, W each): K + 1 copies of x, labels c_1 .. c_K and the null class.
    """
    classes, weights = [int(c) for c in classes], [float(w) for w in weights]
    if not num_classes:
        raise UserError("a mixture of classes needs a class-conditional model (model.num_classes > 0)")
    if not classes or len(classes) != len(weights):
        raise UserError(f"a mixture needs one weight per class, got classes {classes} and weights {weights}")
    if any(not 0 <= c < num_classes for c in classes) or not all(math.isfinite(w) for w in weights):
        raise UserError(f"mixture classes must be in [0, {num_classes}) with finite weights, got {classes} {weights}")
    k = len(classes)

    def composed(x, t, y=None):
        b = x.shape[0]
        labels = torch.tensor(classes + [num_classes], device=x.device).repeat_interleave(b)
        out = model(x.repeat(k + 1, *([1] * (x.ndim - 1))), t.repeat(k + 1), labels).float()
        cond, uncond = out[:k * b].view(k, b, *x.shape[1:]), out[k * b:]
        w = torch.tensor(weights, device=x.device, dtype=out.dtype).view(k, *([1] * x.ndim))
        return uncond + (w * (cond - uncond)).sum(0)

    return composed
