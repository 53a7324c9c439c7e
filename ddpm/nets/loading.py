"""Checkpoint state dicts and nets: wrapper prefixes stripped, and the one "does this fit the net?" check.

Training saves the unwrapped module's state dict; :func:`clean_state_dict` also accepts state dicts of
DDP- or torch.compile-wrapped modules. :func:`load_weights` is used by the training job (resume) and the
evaluation job (load a checkpoint), so both refuse a checkpoint of another architecture the same way.
"""
import re
from collections import OrderedDict

from torch import nn

from ddpm.errors import UserError


def load_weights(net: nn.Module, state_dict, what: str, fix: str) -> nn.Module:
    """``net.load_state_dict(state_dict)``, or a one-line UserError: "<what> does not fit model.arch=...
    (<first line of torch's reason>); <fix>". Returns ``net``."""
    try:
        net.load_state_dict(state_dict)
    except (RuntimeError, KeyError, TypeError, AttributeError) as e:
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise UserError(f"{what} does not fit this run's model.arch={getattr(net, 'arch', type(net).__name__)} ({first}); "
                        f"{fix}") from None
    return net


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DDP / DataParallel (``.module``) and torch.compile (``._orig_mod``) wrappers,
    nested in any order. A module whose only child is called ``module`` and that has no parameters
    or buffers of its own also counts as a DDP-like wrapper."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
            continue
        orig = getattr(model, "_orig_mod", None)
        if isinstance(orig, nn.Module):
            model = orig
            continue
        children = list(model.named_children())
        own = list(model.named_parameters(recurse=False)) + list(model.named_buffers(recurse=False))
        if len(children) == 1 and children[0][0] == "module" and not own:
            model = children[0][1]
            continue
        return model


_WRAPPER_PREFIX = re.compile(r"^(?:module\.|_orig_mod\.)+")


def _strip_prefix(key: str) -> str:
    return _WRAPPER_PREFIX.sub("", key)


def clean_state_dict(sd: dict) -> dict:
    """A copy of ``sd`` with leading ``module.`` / ``_orig_mod.`` prefixes (any order, repeated)
    stripped from every key, so it loads into the unwrapped model."""
    out = OrderedDict() if isinstance(sd, OrderedDict) else {}
    origin = {}
    for key, value in sd.items():
        new = _strip_prefix(key)
        if new in out:
            raise ValueError(f"state dict keys {origin[new]!r} and {key!r} both become {new!r}")
        out[new], origin[new] = value, key
    meta = getattr(sd, "_metadata", None)
    if meta is not None and isinstance(out, OrderedDict):
        # Per-submodule version info that load_state_dict reads; its keys carry the same prefixes
        # ("module", "module.conv"), the wrapper's own entry collapses onto the root "".
        out._metadata = type(meta)((_strip_prefix(k + ".")[:-1] if k else k, v) for k, v in meta.items())
    return out
