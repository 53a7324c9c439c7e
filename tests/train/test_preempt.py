"""ddpm.train.preempt: signals set a flag (and nothing else); ranks agree on stopping via all_reduce."""
import datetime
import json
import os
import signal
import threading
import time

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from ddpm.errors import REQUEUE_EXIT_CODE
from ddpm.train.preempt import PreemptionHandler, should_stop


@pytest.fixture(autouse=True)
def keep_signal_handlers():
    """Whatever a test does, the next one starts from the handlers pytest had."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR2, signal.SIGTERM)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


def wait_for(predicate, timeout=2.0):
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.001)
    return predicate()


@pytest.mark.parametrize("sig", [signal.SIGUSR2, signal.SIGTERM], ids=["SIGUSR2", "SIGTERM"])
def test_own_signal_sets_flag_and_does_not_terminate(sig):
    handler = PreemptionHandler().install()
    try:
        assert not handler.requested and handler.signal_name is None
        os.kill(os.getpid(), sig)  # default action for both would kill pytest right here
        assert wait_for(lambda: handler.requested)
        assert handler.signal_name == sig.name
        # Repeats (SLURM may signal again; scancel after the warning) stay just a flag.
        other = signal.SIGTERM if sig == signal.SIGUSR2 else signal.SIGUSR2
        os.kill(os.getpid(), sig)
        os.kill(os.getpid(), other)
        time.sleep(0.01)
        assert handler.requested and handler.signal_name == sig.name
    finally:
        handler.restore()


def test_restore_reinstates_previous_handlers():
    seen = []
    previous = lambda signum, frame: seen.append(signum)  # noqa: E731
    signal.signal(signal.SIGUSR2, previous)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with PreemptionHandler() as handler:
        assert signal.getsignal(signal.SIGUSR2) != previous
        handler.install()  # installing twice must not make our own handler the "previous" one
        os.kill(os.getpid(), signal.SIGUSR2)
        assert wait_for(lambda: handler.requested)
        assert seen == []  # ours replaced it, it did not chain
    assert signal.getsignal(signal.SIGUSR2) is previous
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    os.kill(os.getpid(), signal.SIGUSR2)
    assert wait_for(lambda: seen == [signal.SIGUSR2])

    only_usr2 = PreemptionHandler(signals=[signal.SIGUSR2]).install()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    only_usr2.restore()
    assert signal.getsignal(signal.SIGUSR2) is previous


def test_install_outside_main_thread_is_refused():
    errors = []

    def run():
        try:
            PreemptionHandler().install()
        except RuntimeError as e:
            errors.append(str(e))

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert errors and "main thread" in errors[0]


def test_should_stop_without_process_group_returns_the_flag():
    assert not dist.is_initialized()
    assert should_stop(True, "cpu") is True
    assert should_stop(False, "cpu") is False
    assert REQUEUE_EXIT_CODE == 75


def _rank_main(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        handler = PreemptionHandler().install()
        if rank == 1:  # only rank 1 is told; rank 0 learns it from the all_reduce
            os.kill(os.getpid(), signal.SIGUSR2)
            wait_for(lambda: handler.requested)
        agreed = should_stop(handler.requested, "cpu")
        nobody = should_stop(False, "cpu")
        handler.restore()
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"local": handler.requested, "agreed": agreed, "nobody": nobody}, f)
    finally:
        dist.destroy_process_group()


def test_should_stop_agrees_across_two_gloo_ranks(tmp_path):
    # fork where there is one: each spawned rank would import torch again (~10 s on 2 busy cores);
    # the ranks do no tensor compute beyond a 1-element all_reduce, so fork is safe here.
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    ctx = mp.start_processes(_rank_main, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2,
                             join=False, start_method=method)
    deadline = time.monotonic() + 120
    try:
        while not ctx.join(timeout=1):
            assert time.monotonic() < deadline, "ranks did not finish"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["local"] for r in results] == [False, True]
    assert [r["agreed"] for r in results] == [True, True]
    assert [r["nobody"] for r in results] == [False, False]
