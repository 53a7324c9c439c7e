"""Compiled training as it runs on a GPU node, on the CPU: ``torch.compile(DDP(net))`` on 2 gloo ranks with
bf16 autocast (DDPM_COMPILE_BACKEND selects a CPU backend and makes compile and bf16 apply there), and a
compile failure that can never take a job down: every rank agrees, trains eagerly, and one warning line
names train.compile=false."""
import itertools
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from ddpm.train.wrap import COMPILE_BACKEND_ENV

from conftest import write_tiny_config

STEPS = 4
LAUNCH_VARS = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _raising_backend(gm, example_inputs):
    """A dynamo backend that fails to compile on rank 1 only (the other rank compiles fine)."""
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise RuntimeError("ptxas fatal: a toolchain hiccup on this node\nsecond line")
    return gm.forward


def _worker(rank, world, port, config, run_dir, backend, overrides):
    torch.set_num_threads(1)  # a forked child must not reuse the parent's intra-op thread pool
    for key in LAUNCH_VARS:
        os.environ.pop(key, None)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(run_dir).parent / "inductor-cache")  # not the home dir
    if backend:
        os.environ[COMPILE_BACKEND_ENV] = backend
    if backend == "ddpm_test_raises":
        torch._dynamo.register_backend(name="ddpm_test_raises")(_raising_backend)
    from ddpm.train.job import train

    lines = []
    rc = train(config, [*overrides], run_dir, log=lines.append)
    assert rc == 0


def _train(tmp_path, name, world, backend, *overrides):
    config = tmp_path / "tiny.yaml"
    run_dir = tmp_path / name
    mp.start_processes(_worker, args=(world, _free_port(), str(config), str(run_dir), backend,
                                      (f"train.steps={STEPS}", "train.precision=bf16", "train.compile=true",
                                       "checkpoint.every=100", "log.tensorboard=false", "sample.per_class=1",
                                       "sample.guidance=[1.0]", *overrides)),
                       nprocs=world, join=True, start_method="fork")
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    return torch.load(run_dir / "checkpoints" / latest / "state.pt", map_location="cpu", weights_only=True)


@pytest.fixture
def tiny(tmp_path, mnist_root):
    write_tiny_config(tmp_path, mnist_root)
    return tmp_path


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a if a[k].is_floating_point())


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_ddp_on_two_gloo_ranks_matches_eager(tiny, capfd, backend):
    """compile(DDP(net, static_graph, bucket views)) + bf16 autocast: it trains, both ranks hold the same
    weights (they are DDP's: rank 0 saves them, and every rank would diverge at once if its gradients
    differed) and they equal the eager run's to bf16 rounding. aot_eager traces and partitions as inductor
    does (DDP's graph split at bucket boundaries, the backward compiled in the forward) without generating
    kernels; inductor's CPU code generation (a C++ compiler, about a minute) is the slow variant."""
    eager = _train(tiny, "eager", 2, backend, "train.compile=false")
    compiled = _train(tiny, "compiled", 2, backend)
    out = capfd.readouterr().out
    assert "warning: torch.compile failed" not in out and out.count("torch.compile cache:") == 1
    assert compiled["step"] == eager["step"] == STEPS
    diff = _max_diff(compiled["model"], eager["model"])
    assert diff < 2e-2, diff  # bf16 autocast: both runs round the same way but for op fusion and ordering
    moved = _max_diff(compiled["model"], _initial_weights())
    assert moved > 10 * diff, (moved, diff)  # the comparison means something: training moved the weights


def _initial_weights() -> dict:
    from ddpm.data.batcher import INIT_STREAM, mix_seed
    from ddpm.nets.registry import build_net

    torch.manual_seed(mix_seed(0, INIT_STREAM))  # the Trainer's own initialisation (train.seed=0)
    return build_net("cs180_class_unet", hidden=8, num_classes=10).state_dict()


def test_a_compile_failure_on_one_rank_makes_every_rank_train_eagerly(tiny, capfd):
    """Rank 1's backend raises in the first step; rank 0's compiles. Both must take the eager path (else
    rank 0 would wait in a gradient all-reduce for rank 1 until the collective timeout), and the result is
    the eager run's, bit for bit: the trial step left nothing behind."""
    eager = _train(tiny, "eager", 2, "aot_eager", "train.compile=false")
    capfd.readouterr()
    fallen_back = _train(tiny, "fallback", 2, "ddpm_test_raises")
    out = capfd.readouterr().out
    warnings = [line for line in out.splitlines() if line.startswith("warning: torch.compile failed")]
    assert len(warnings) == 1, out
    assert "on rank 1 (BackendCompilerFailed" in warnings[0] and "ptxas fatal" in warnings[0]
    assert "second line" not in out and "set train.compile=false" in warnings[0]
    for part in ("model", "ema", "optimizer"):
        got, want = fallen_back[part], eager[part]
        if part == "optimizer":
            got, want = got["state"], want["state"]
            got = {f"{k}.{n}": v for k, s in got.items() for n, v in s.items()}
            want = {f"{k}.{n}": v for k, s in want.items() for n, v in s.items()}
        assert all(torch.equal(got[k], want[k]) for k in want), part


def test_a_backend_that_cannot_be_wrapped_trains_eagerly_in_one_process(tiny, capfd):
    state = _train(tiny, "unknown", 1, "no_such_backend")
    warnings = [line for line in capfd.readouterr().out.splitlines() if line.startswith("warning: torch.compile")]
    assert len(warnings) == 1 and "on rank 0" in warnings[0] and "train.compile=false" in warnings[0], warnings
    assert state["step"] == STEPS


def test_time_based_checkpoints(tiny, monkeypatch):
    """checkpoint.every_minutes bounds what a hard kill loses: a save whenever that much time passed."""
    from ddpm.train import loop

    clock = itertools.count(0, 40)  # every call to the clock: 40 s later
    monkeypatch.setattr(loop.time, "monotonic", lambda: next(clock))
    from ddpm.train.job import train

    run = tiny / "timed"
    assert train(tiny / "tiny.yaml", ["train.steps=6", "checkpoint.every=100", "checkpoint.keep_last=10",
                                      "checkpoint.every_minutes=1", "log.tensorboard=false"], run) == 0
    steps = sorted(int(p.name.split("_")[1]) for p in (run / "checkpoints").glob("step_*"))
    # the clock reads 40 s per call (once per step, once after each save): due after 2 steps, then every 2
    assert steps == [2, 4, 6], steps
    manifest = json.loads((run / "checkpoints" / "step_000000002" / "manifest.json").read_text())
    assert manifest
