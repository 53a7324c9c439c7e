"""The training job from the command line's point of view: config → run dir → lock → train → what next.

``jobs/train.py`` parses the arguments and maps the exceptions of :func:`train` to exit codes.
Only rank 0 writes: it holds the run dir's lock (:mod:`ddpm.run.lock`) from before the first write to the
end; every rank learns whether it got it, so a refused second job exits on all ranks at once.
"""
import json
import shlex
import shutil
from pathlib import Path

from ddpm.config import load_config
from ddpm.errors import OutOfSpace, UserError
from ddpm.run import rundir
from ddpm.run.lock import RunLock


def train(config, overrides=(), run_dir=None, force: bool = False, dry_run: bool = False, log=print) -> int:
    """Train (or resume) one run; returns 0 done, 75 preempted (requeue me). Raises UserError (bad input,
    a second writer), OutOfSpace (with a message that names the last good checkpoint), TrainingDiverged."""
    cfg = load_config(config, overrides)
    if dry_run:
        run_dir, resume = rundir.prepare_run_dir(cfg, run_dir, force)
        log(json.dumps(cfg.to_dict(), indent=2))
        log(model_line(cfg))
        log(f"run dir: {run_dir} ({'resume' if resume else 'new run'})")
        return 0
    from ddpm.train.dist import broadcast_from_main, cleanup, init_distributed
    from ddpm.train.loop import Trainer

    info = init_distributed(cfg.train.device, cfg.train.collective_timeout_s)
    if info.is_main:
        log(model_line(cfg))
    lock, created = None, False
    try:
        run_dir, resume = rundir.prepare_run_dir(cfg, run_dir, force)
        run_dir = Path(broadcast_from_main(str(run_dir)))  # rank 0's choice of a new numbered dir wins
        rundir.check_writable(run_dir)
        created = not run_dir.exists()
        lock = _lock(run_dir, info, log)
        trainer = Trainer(cfg, run_dir, info, lock=lock, resume=resume)  # loads data, net, checkpoint; writes nothing
        if info.is_main and (not resume or force):
            rundir.write_config(run_dir, cfg)
        rc = trainer.run()
        if rc == 0 and info.is_main:
            log(closing_lines(run_dir, trainer.grids, trainer.best))
        return rc
    except OutOfSpace as e:
        raise OutOfSpace(no_space_message(e, run_dir), e.path, e.error) from None
    finally:
        if lock is not None:
            lock.release()
            if created and not any(run_dir.iterdir()):
                run_dir.rmdir()  # a new run that failed before its first write leaves nothing behind
        cleanup()


def model_line(cfg) -> str:
    """``model: res_unet, 712,289 parameters``: the net's size, counted on the meta device (no weights made)."""
    import torch

    from ddpm.nets.registry import build_net

    with torch.device("meta"):
        net = build_net(cfg.model["arch"], **cfg.net_kwargs())
    return f"model: {cfg.model['arch']}, {sum(p.numel() for p in net.parameters()):,} parameters"


def _lock(run_dir: Path, info, log) -> RunLock | None:
    """Rank 0 takes the run dir's lock; every rank raises the same UserError if it could not."""
    from ddpm.train.dist import broadcast_from_main

    lock, refused = None, ""
    if info.is_main:
        try:
            lock = RunLock(run_dir).acquire()
            if lock.took_over:
                log(f"took over the stale lock of {run_dir} ({lock.took_over})")
        except UserError as e:
            refused = str(e)
    refused = broadcast_from_main(refused)
    if refused:
        raise UserError(refused)
    return lock


def no_space_message(e: OutOfSpace, run_dir) -> str:
    """One line: what could not be written where, the free space there, the last good checkpoint, the fix."""
    from ddpm.run.checkpoints import CheckpointManager

    where = Path(e.path if e.path is not None else run_dir)
    probe = where if where.is_dir() else where.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    steps = CheckpointManager(Path(run_dir) / "checkpoints").steps() if run_dir else []
    last = f"the last good checkpoint is step {steps[-1]}" if steps else "no checkpoint was written yet"
    return (f"out of space writing {e.what} to {where} ({e.error.strerror or e.error}; {free / 2 ** 30:.2f} GiB free "
            f"there); {last}: free space or raise the quota, then rerun the same command to resume")


def closing_lines(run_dir: Path, grids: list, best=None) -> str:
    """Where to look and what to run next, after the done: line. ``best``: (step, test_loss) of checkpoints/best."""
    lines = []
    if grids:
        last = grids[-1]
        same_step = [g.name for g in grids[:-1] if g.name.split("_")[1] == last.name.split("_")[1]]
        lines.append(f"samples: {last}" + (f" (also {', '.join(same_step)})" if same_step else ""))
    if best:
        lines.append(f"best: {run_dir / 'checkpoints' / f'step_{best[0]:09d}'} (test loss {best[1]:.4f}; "
                     "checkpoints/best names it)")
    q = shlex.quote
    lines += ["next:", f"  python -m jobs.evaluate {q(str(run_dir))}   # guidance grid, loss curves, GIFs, metrics",
              f"  python -m jobs.tensorboard {q(str(run_dir.parent))}   # curves and grids in a browser (prints the ssh tunnel)"]
    return "\n".join(lines)
