"""A trained run's checkpoint, loaded once for ``jobs.evaluate`` and ``jobs.sample``: a frozen
:class:`LoadedRun` from :func:`load_run`, which checks the run dir, the device, the checkpoint and its EMA
weights, and writes nothing.
"""
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ddpm.config import Config
from ddpm.data.datasets import DATASETS
from ddpm.data.images import model_to_uint8
from ddpm.diffusion.from_config import objective_for
from ddpm.diffusion.objectives import Objective
from ddpm.errors import UserError
from ddpm.nets.loading import load_weights
from ddpm.nets.registry import build_net
from ddpm.run.checkpoints import CheckpointManager


@dataclass(frozen=True, eq=False)
class LoadedRun:
    """The run dir, its config and objective, and one checkpoint's net (eval mode, on ``device``)."""
    run_dir: Path
    cfg: Config
    objective: Objective            # .kind: generative | denoiser | classifier; .samplers; .denoiser(net)
    step: int
    checkpoint_path: Path
    net: torch.nn.Module
    ema: bool                       # the EMA weights (else the raw ones)
    device: torch.device
    best_step: int | None = None    # the step checkpoints/best names (lowest held-out loss), if the run keeps one

    @property
    def conditional(self) -> bool:
        """A class-conditional net: guidance scales and class-balanced labels apply."""
        return bool(getattr(self.net, "num_classes", 0))

    @property
    def num_classes(self) -> int:
        """Classes of the run's data set (figure rows, label balance)."""
        return DATASETS[self.cfg.data.dataset]["classes"]

    @property
    def checkpoint_line(self) -> str:
        """The figure subtitle that says which weights made it."""
        best = " (checkpoints/best)" if self.step == self.best_step else ""
        weights = "EMA" if self.ema else "raw (non-EMA)"
        return f"run {self.cfg.name} · checkpoint step {self.step}{best} · {weights} weights"

    @property
    def image_range(self) -> tuple[float, float]:
        """Black and white in the model's space (where noise levels such as σ are measured): (-1, 1) by
        default, ((0 - mean) / std, (1 - mean) / std) with ``data.normalize`` (e.g. (0, 1) for [0, 1])."""
        if not self.cfg.data.normalize:
            return -1.0, 1.0
        mean, std = self.cfg.data.normalize
        return (0 - mean) / std, (1 - mean) / std

    @property
    def scale_note(self) -> str:
        """'images in [0, 1]': the scale a noise level of the figures is measured on."""
        lo, hi = self.image_range
        return f"images in [{lo:.3g}, {hi:.3g}]"

    def to_u8(self, x: torch.Tensor) -> np.ndarray:
        """Model-space samples (N, C, H, W) → uint8 (N, H, W, C), as the training job archives them."""
        norm = tuple(self.cfg.data.normalize) if self.cfg.data.normalize else None
        return model_to_uint8(x.float().cpu(), norm)

    def load_net(self, state: dict, use_ema: bool, where) -> torch.nn.Module:
        """The run's net with another checkpoint's (EMA) weights, in eval mode on the run's device."""
        return _load_net(self.cfg, state, use_ema, self.device, where)


def _load_net(cfg: Config, state: dict, use_ema: bool, device, where) -> torch.nn.Module:
    """The run's net with the checkpoint's (EMA) weights, in eval mode on ``device``."""
    net = build_net(cfg.model["arch"], **cfg.net_kwargs())
    load_weights(net, state.get("ema") if use_ema else state.get("model"), f"checkpoint {where}",
                 "pass a checkpoint of this run with --checkpoint")
    return net.to(device).eval()


def _pick_device(name: str | None) -> torch.device:
    """--device: cpu | cuda | None (cuda if available)."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise UserError(f"unknown --device {name!r}; choose cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but no CUDA GPU is visible here; pass --device cpu")
    return torch.device(name)


def load_run(run_dir: Path, cfg: Config, *, checkpoint: str = "latest", ema: bool | None = None,
             device: str | None = None, writable: bool = True) -> LoadedRun:
    """Load ``checkpoint`` (latest, best, a step, or a path) of the run at ``run_dir`` whose config is ``cfg``.
    ``ema`` None: the config's ``sample.ema`` where the checkpoint has EMA weights. UserError if the run dir
    is not writable (the jobs write into it; ``writable=False`` for a run that is only read, a guiding
    classifier), the device is missing or the checkpoint is."""
    if writable and not os.access(run_dir, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to run dir {run_dir}; evaluate a writable copy of it")
    dev = _pick_device(device)
    manager = CheckpointManager(run_dir / "checkpoints")
    if checkpoint == "latest" and not manager.steps():
        raise UserError(f"no checkpoint in {run_dir / 'checkpoints'} yet; train first, or pass --checkpoint PATH")
    step, state = manager.load(checkpoint)
    named = checkpoint in ("latest", "best") or str(checkpoint).isdigit()
    path = run_dir / "checkpoints" / f"step_{step:09d}" if named else Path(checkpoint)
    has_ema = state.get("ema") is not None
    if ema and not has_ema:
        raise UserError(f"checkpoint step {step} has no EMA weights (trained with train.ema_decay=0); pass --no-ema")
    use_ema = (cfg.sample.ema and has_ema) if ema is None else ema
    return LoadedRun(run_dir, cfg, objective_for(cfg), step, path, _load_net(cfg, state, use_ema, dev, path),
                     use_ema, dev, manager.best_step())
