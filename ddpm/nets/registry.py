"""The net registry: ``model.arch`` names → net classes, their accepted keyword arguments, construction.

Each net module registers its classes with ``@register(name)``; ``ddpm/nets/__init__.py`` imports every
net module, so importing anything from ``ddpm.nets`` fills the registry.
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
