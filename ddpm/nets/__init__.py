"""Denoising nets and the noisy classifier, chosen by name (``model.arch``) from a registry.

Every net: ``forward(x, t=None, y=None)`` with
- ``x``: (B, C, H, W) float;
- ``t``: LongTensor (B,) of timestep indices in [0, T) (normalised to t / T inside), or a float tensor
  (B,) of continuous time in [0, 1] used as-is (rectified flow);
- ``y``: LongTensor (B,) class labels in [0, num_classes]; ``num_classes`` is the learned null class
  (classifier-free guidance) and ``y=None`` is the same as passing it everywhere.
Returns (B, C, H, W) (the classifier returns logits (B, num_classes)). Attributes: ``num_classes``
(0 = unconditional; such a net raises ValueError when given y), ``time_conditional``, ``in_channels``,
``image_size``, ``arch`` (the registry name). Time-conditional denoisers need t (ValueError without).
``noisy_classifier`` is the exception: ``num_classes`` counts its logits, y is ignored, t=None = clean.

Sizes at the defaults (trainable parameters; tests/test_nets.py pins them):
- cs180_denoiser    hidden=128, MNIST                       7,891,073
- cs180_time_unet   hidden=64,  MNIST                       1,996,417
- cs180_class_unet  hidden=64,  MNIST, 10 classes           2,019,393  (course figure ≈2.1 M)
- res_unet          channels=32, MNIST, 10 classes            712,289  (64: 2,837,697; 128: 11,327,873)
- cifar_unet        DDPM-CIFAR10 config, num_classes=0     35,746,307  (DDPM paper: 35.7 M)
- cifar_unet        defaults (num_classes=10)              35,751,939
- noisy_classifier  base=32, MNIST                            426,602
"""
import inspect

from ddpm.errors import UserError

NETS: dict[str, type] = {}


def register(name):
    """Class decorator: add a net to NETS under ``name`` and record the name as ``cls.arch``."""

    def deco(cls):
        if name in NETS:
            raise RuntimeError(f"net {name!r} registered twice")
        cls.arch = name
        NETS[name] = cls
        return cls

    return deco


# Imported after NETS/register exist: each module registers its nets on import.
from ddpm.nets import cifar_unet, classifier, cs180, res_unet  # noqa: E402,F401


def _lookup(name):
    if name not in NETS:
        raise UserError(f"unknown model.arch {name!r}; choose one of: {', '.join(sorted(NETS))}")
    return NETS[name]


def net_kwargs(name):
    """The keyword arguments ``build_net(name, ...)`` accepts, mapped to their defaults."""
    params = inspect.signature(_lookup(name).__init__).parameters
    return {k: p.default for k, p in params.items() if k != "self"}


def build_net(name, **kwargs):
    """Construct the net registered as ``name``; bad names, keys or values raise UserError."""
    cls = _lookup(name)
    accepted = net_kwargs(name)
    for key in kwargs:
        if key not in accepted:
            raise UserError(
                f"unknown model.{key} for model.arch '{name}'; accepted: {', '.join(sorted(accepted))}"
            )
    return cls(**kwargs)
