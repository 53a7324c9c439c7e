"""A persistent cache for ``torch.compile``, so a requeued or repeated job skips most of compilation.

Inductor keeps compiled kernels and graphs in ``TORCHINDUCTOR_CACHE_DIR``, by default
``/tmp/torchinductor_$USER``: on a cluster that is node-local and often wiped at the end of each job, so
every requeue (often on another node) and every run of a sweep compiles from scratch (tens of seconds
for the MNIST net, minutes for the CIFAR net). Unless the user chose a directory, we use one under the
home directory, which clusters share between nodes. Inductor writes its entries atomically, so the ranks
and jobs that share it are safe; deleting it only costs one recompilation.
"""
import os
from pathlib import Path

ENV = "TORCHINDUCTOR_CACHE_DIR"


def default_dir() -> Path:
    """$XDG_CACHE_HOME/ddpm-hpc/torchinductor, else ~/.cache/ddpm-hpc/torchinductor."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ddpm-hpc" / "torchinductor"


def use_persistent_cache() -> Path:
    """Point inductor at :func:`default_dir` unless TORCHINDUCTOR_CACHE_DIR is set; returns the directory used.

    Call before the first compilation: inductor reads the variable whenever it needs the directory.
    """
    os.environ.setdefault(ENV, str(default_dir()))
    return Path(os.environ[ENV])
