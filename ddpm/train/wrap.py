"""The net as training calls it: memory format, DDP, and torch.compile, which can never take a run down.

Compilation happens in the first forward of a process (the backward is compiled there too, so that its
errors show before any gradient all-reduce). Ranks exchange their errors before anyone starts a backward:
a rank waiting in an all-reduce for a failed peer would hang until the collective timeout. If compiling
failed on any rank, at wrapping or in that forward, every rank drops the compiled model and its forward,
restores the BatchNorm statistics that forward updated, trains eagerly with a fresh DDP wrapper (the old one
waits for a backward), and rank 0 says so in one warning line.

``DDPM_COMPILE_BACKEND`` (for tests) names the dynamo backend and makes ``train.compile`` and
``train.precision=bf16`` apply on the CPU as on CUDA, so that the CUDA wrapping runs in a CPU test.
"""
import gc
import os
from contextlib import contextmanager

import torch
from torch.nn.parallel import DistributedDataParallel

from ddpm.diffusion.compiled import use_persistent_cache
from ddpm.train.dist import DistInfo, gather_from_all, print0

COMPILE_BACKEND_ENV = "DDPM_COMPILE_BACKEND"


def compile_backend() -> str | None:
    """The tests' dynamo backend (compile and bf16 on the CPU too), or None."""
    return os.environ.get(COMPILE_BACKEND_ENV)


def ddp(net, info: DistInfo) -> DistributedDataParallel:
    # Every parameter gets a gradient every step: a static graph lets DDP skip the unused-parameter
    # search, and bucket views avoid a gradient copy. BatchNorm running statistics (CS180 nets) are
    # not broadcast before every forward: training uses batch statistics, and only rank 0's
    # running statistics are saved and sampled with, so the broadcast would be a wasted collective.
    return DistributedDataParallel(net, device_ids=[info.device.index] if info.device.type == "cuda" else None,
                                   gradient_as_bucket_view=True, static_graph=True, broadcast_buffers=False)


def wrap(net, ema, info: DistInfo, *, channels_last: bool, compile: bool) -> list:
    """[eager, compiled, error]: ``net`` as training calls it (DDP around it with several ranks), its
    torch.compile wrapper (None where compilation does not apply or failed), and the one-line error of a
    failed wrapping. A list, so that :func:`settle` can take the only references to the wrappers."""
    if channels_last:
        net.to(memory_format=torch.channels_last)
        if ema is not None:  # same strides as the net, or the foreach EMA update falls back to a loop
            ema.to(memory_format=torch.channels_last)
    if info.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # shapes are fixed for the whole run
    model = ddp(net, info) if info.world_size > 1 else net
    if not compile:
        return [model, None, None]
    print0(f"torch.compile cache: {use_persistent_cache(log=print0)} (set TORCHINDUCTOR_CACHE_DIR to change)")
    try:
        return [model, torch.compile(model, backend=compile_backend() or "inductor"), None]
    except Exception as e:  # an unknown backend, a broken toolchain: never the end of the run
        return [model, None, one_line(e)]


def settle(wrapped: list, first_forward, net, info: DistInfo):
    """(model, first): the model to train with, and the first step's ``first_forward(compiled)`` if the
    compiled model computed it on every rank (see the module docstring). ``wrapped``: what :func:`wrap`
    returned; it is emptied, so that the wrappers this drops are gone."""
    eager, compiled, error = wrapped
    wrapped.clear()
    buffers = [b.detach().clone() for b in net.buffers()]
    first = None
    if error is None:
        try:
            with _backward_compiled_in_forward():
                first = first_forward(compiled)
        except Exception as e:  # any compiler or toolchain error
            error = one_line(e)  # text only: the traceback would keep the old DDP wrapper alive
    failed = [(rank, e) for rank, e in enumerate(gather_from_all(error)) if e]
    if not failed:
        return compiled, first
    rank, what = failed[0]
    print0(f"warning: torch.compile failed on rank {rank} ({what}); all {info.world_size} rank(s) train "
           "without it (slower); set train.compile=false to skip compiling")
    del first, compiled
    torch._dynamo.reset()
    with torch.no_grad():
        for b, saved in zip(net.buffers(), buffers):
            b.copy_(saved)
    if isinstance(eager, DistributedDataParallel):
        del eager
        gc.collect()  # the old wrapper's gradient hooks must be gone before the new one's first backward
        eager = ddp(net, info)
    return eager, None


def one_line(error: BaseException) -> str:
    """``Type: first line of the message`` of an error and of its root cause (dynamo wraps a backend's
    error into BackendCompilerFailed), at most 300 characters."""
    def line(e):
        return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"

    root = error
    while root.__cause__ is not None or getattr(root, "inner_exception", None) is not None:
        root = root.__cause__ or root.inner_exception
    return (line(error) if root is error else f"{type(error).__name__} <- {line(root)}")[:300]


@contextmanager
def _backward_compiled_in_forward():
    """AOTAutograd compiles the backward graph lazily, in the first backward; this makes it compile in
    the forward, so that a failure there surfaces before any rank enters a gradient all-reduce.
    (torch versions without the switch compile it lazily.)"""
    import torch._functorch.config as functorch_config

    if not hasattr(functorch_config, "force_non_lazy_backward_lowering"):
        yield
        return
    with functorch_config.patch(force_non_lazy_backward_lowering=True):
        yield
