"""Compiled execution: a persistent torch.compile cache, and fast repeated net evaluation for sampling on
CUDA (bf16 autocast, torch.compile, CUDA graphs).

The cache: inductor keeps compiled kernels and graphs in ``TORCHINDUCTOR_CACHE_DIR``, by default
``/tmp/torchinductor_$USER``: on a cluster that is node-local and often wiped at the end of each job, so
every requeue (often on another node) and every run of a sweep compiles from scratch (tens of seconds
for the MNIST net, minutes for the CIFAR net). Unless the user chose a directory, :func:`use_persistent_cache`
points it under the home directory, which clusters share between nodes. Inductor writes its entries
atomically, so the ranks and jobs that share it are safe; deleting it only costs one recompilation.

Sampling:
The samplers in :mod:`ddpm.diffusion.samplers` call ``eps_model(x, t, y)`` once per step and take their per-step
scalars from the host as Python floats, so the eps model (the net, with the classifier-free-guidance
wrapper around it) is the only device work in the loop. At sampling batch sizes (100 MNIST images, 64
CIFAR images) a step is a few hundred small kernels, so launch overhead rather than arithmetic bounds
it: compiling fuses the elementwise work and CUDA graphs replay the whole step with one launch.
On the CPU everything here is a no-op, so CPU sampling is unchanged.
"""
import os
from pathlib import Path

import torch

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/ddpm-hpc/torchinductor, else ~/.cache/ddpm-hpc/torchinductor."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ddpm-hpc" / "torchinductor"


def use_persistent_cache() -> Path:
    """Point inductor at :func:`default_cache_dir` unless TORCHINDUCTOR_CACHE_DIR is set; returns the directory.

    Call before the first compilation: inductor reads the variable whenever it needs the directory.
    """
    os.environ.setdefault(CACHE_ENV, str(default_cache_dir()))
    return Path(os.environ[CACHE_ENV])


def compile_for_sampling(eps_model, device, *, bf16: bool = True, compile: bool = True, cuda_graphs: bool = True):
    """Wrap ``eps_model(x, t, y)`` (a net or a guidance wrapper) for fast repeated calls on CUDA.

    Returns a callable with the same signature: x (B, C, H, W) float32, t LongTensor (B,), y LongTensor
    (B,) or None → float32 (B, C, H, W). On a non-CUDA device, or with bf16 and compile both off, it
    returns ``eps_model`` itself.

    - bf16: run under bfloat16 autocast (the output is cast back to float32 for the sampler's update).
    - compile: ``torch.compile`` with static shapes; the first call for each batch shape compiles
      (tens of seconds for the CIFAR UNet), later ones reuse it.
    - cuda_graphs (only with compile): ``mode="reduce-overhead"`` records the compiled call in a CUDA graph
      and replays it. The output is cloned out of the graph's static buffer, so callers may keep it
      across calls.

    Call it once per model and reuse the result: every wrapper compiles the same function, which dynamo
    specialises on the wrapped model (and a guidance wrapper's scale); past its recompile limit (8) it
    silently runs eagerly. A caller looping over guidance scales or checkpoints must keep the scale
    outside the compiled region or reset dynamo between variants.
    """
    if torch.device(device).type != "cuda" or not (bf16 or compile):
        return eps_model

    def run(x, t, y):
        with torch.autocast("cuda", torch.bfloat16, enabled=bf16):
            return eps_model(x, t, y).float()

    if not compile:
        return run
    use_persistent_cache()
    compiled = torch.compile(run, mode="reduce-overhead" if cuda_graphs else None, dynamic=False)
    if not cuda_graphs:
        return compiled

    def replay(x, t, y):
        # Every call starts a new graph "generation": the previous output buffer may be reused.
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(x, t, y).clone()

    return replay
