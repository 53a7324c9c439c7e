"""Compiled execution on CUDA: the torch.compile cache and worker count, full-float32 numerics, and fast
repeated net evaluation for sampling (bf16 autocast, torch.compile, CUDA graphs).

The cache: inductor keeps compiled kernels and graphs in ``TORCHINDUCTOR_CACHE_DIR``, by default
``/tmp/torchinductor_$USER``: on a cluster that is node-local and often wiped at the end of each job, so
every requeue (often on another node) and every run of a sweep compiles from scratch (tens of seconds
for the MNIST net, minutes for the CIFAR net). Unless the user chose a directory, :func:`use_persistent_cache`
points it under the home directory, which clusters share between nodes. Inductor writes its entries
atomically, so the ranks and jobs that share it are safe; deleting it only costs one recompilation. A home
directory can be read-only on compute nodes or over its quota: then the cache falls back to the job's
node-local ``$SLURM_TMPDIR`` / ``$TMPDIR``, and says so. Inductor compiles kernels in a pool of worker
processes sized by the CPUs it can see; on a node shared with other jobs that can be far more than the job
was given, so the pool is bounded by ``SLURM_CPUS_PER_TASK``.

Sampling:
The samplers in :mod:`ddpm.diffusion.samplers` call ``eps_model(x, t, y)`` once per step and take their per-step
scalars from the host as Python floats, so the eps model (the net, with the classifier-free-guidance
wrapper around it) is the only device work in the loop. At sampling batch sizes (100 MNIST images, 64
CIFAR images) a step is a few hundred small kernels, so launch overhead rather than arithmetic bounds
it: compiling fuses the elementwise work and CUDA graphs replay the whole step with one launch.
On the CPU everything here is a no-op, so CPU sampling is unchanged.
"""
import getpass
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
WORKERS_ENV = "TORCHINDUCTOR_COMPILE_THREADS"


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/ddpm-hpc/torchinductor, else ~/.cache/ddpm-hpc/torchinductor."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ddpm-hpc" / "torchinductor"


def _writable(directory: Path) -> bool:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".probe-"):
            return True
    except OSError:  # read-only file system, permissions, quota
        return False


def use_persistent_cache(log=None) -> Path:
    """Point inductor at TORCHINDUCTOR_CACHE_DIR if set, else :func:`default_cache_dir`; if that directory
    is not writable, at ``$SLURM_TMPDIR`` / ``$TMPDIR`` (/tmp) instead, with one line through ``log`` (default:
    stderr). Also bounds inductor's compile workers (:func:`bound_compile_workers`). Returns the directory.

    Call before the first compilation: inductor reads the variable whenever it needs the directory.
    """
    bound_compile_workers()
    wanted = Path(os.environ.get(CACHE_ENV) or default_cache_dir())
    if not _writable(wanted):
        local = os.environ.get("SLURM_TMPDIR") or os.environ.get("TMPDIR") or tempfile.gettempdir()
        fallback = Path(local) / f"ddpm-hpc-torchinductor-{getpass.getuser()}"
        (log or (lambda m: print(m, file=sys.stderr, flush=True)))(
            f"warning: the torch.compile cache {wanted} is not writable; using {fallback} for this job (node-local: "
            f"a requeue on another node compiles again); set {CACHE_ENV} to a writable shared directory")
        wanted = fallback
    os.environ[CACHE_ENV] = str(wanted)
    return wanted


def bound_compile_workers() -> int | None:
    """At most ``SLURM_CPUS_PER_TASK`` inductor compile workers (unless TORCHINDUCTOR_COMPILE_THREADS is set);
    returns the bound, or None outside SLURM."""
    cpus = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if not cpus.isdigit() or int(cpus) < 1:
        return None
    bound = min(int(cpus), len(os.sched_getaffinity(0)))
    os.environ.setdefault(WORKERS_ENV, str(bound))
    inductor = sys.modules.get("torch._inductor.config")  # read at import: set it too if already imported
    if inductor is not None and os.environ[WORKERS_ENV] == str(bound):
        inductor.compile_threads = bound
    return int(os.environ[WORKERS_ENV])


@contextmanager
def ieee_fp32():
    """Full-float32 convolutions and matrix products on CUDA for the duration (PyTorch runs cuDNN
    convolutions in TF32 on Ampere and later by default): for results that must match the CPU's or the
    papers' (the Inception features, the CUDA tests). Sets every related flag together and restores them
    all, in the API this torch has: since 2.9 ``fp32_precision`` of cuDNN (and its conv and rnn) and of
    cuBLAS matmul, all to "ieee" (setting only conv left conv and rnn different, and then reading the older
    ``torch.backends.cudnn.allow_tf32`` raises); before 2.9 ``allow_tf32`` of cuDNN and cuBLAS."""
    b = torch.backends
    if hasattr(getattr(b.cudnn, "conv", None), "fp32_precision"):
        owners = (b.cudnn, b.cudnn.conv, b.cudnn.rnn, b.cuda.matmul)
        flags = [(owner, "fp32_precision", "ieee") for owner in owners]
    else:
        flags = [(b.cudnn, "allow_tf32", False), (b.cuda.matmul, "allow_tf32", False)]
    old = [getattr(owner, name) for owner, name, _ in flags]
    try:
        for owner, name, value in flags:
            setattr(owner, name, value)
        yield
    finally:
        for (owner, name, _), value in zip(flags, old):
            setattr(owner, name, value)


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
