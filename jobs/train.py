"""Train a diffusion model: ``python -m jobs.train --config configs/mnist.yaml [key.sub=value ...]``.

Without --config it runs the embedded quick-start: a short class-conditional MNIST run on the CPU.

Giving an existing run directory resumes it (this is how a requeued SLURM job continues). Exit codes:
0 done, 2 bad input (nothing written), 75 preempted after saving a checkpoint (requeue me), 1 failure.
"""
import argparse
import json
import shlex
import sys
from pathlib import Path

from ddpm.config import load_config
from ddpm.errors import BAD_INPUT_EXIT_CODE, DIVERGED_EXIT_CODE, UserError

QUICKSTART = Path(__file__).resolve().parents[1] / "ddpm" / "quickstart.yaml"
EXAMPLES = """examples:
  python -m jobs.train
  python -m jobs.train --config configs/mnist.yaml
  python -m jobs.train --config configs/mnist.yaml train.lr=2e-4 train.epochs=5 --run-dir runs/my-run
  python -m jobs.train --config configs/cifar10.yaml --dry-run
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m jobs.train", description=__doc__, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(QUICKSTART),
                   help="YAML config, e.g. configs/mnist.yaml (default: the embedded quick-start, a short MNIST run)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. train.lr=2e-4")
    p.add_argument("--run-dir", help="run directory; an existing one is resumed (default: a new "
                                     "RUN_ROOT/NNNNN-<name>-b<batch>)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and run dir, then exit")
    p.add_argument("--force", action="store_true", help="continue a run dir whose config differs from this one")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        from ddpm.run import (
            rundir,  # imported after validation so --help and config errors stay fast
        )
        if args.dry_run:
            run_dir, resume = rundir.prepare_run_dir(cfg, args.run_dir, args.force)
            print(json.dumps(cfg.to_dict(), indent=2))
            print(f"run dir: {run_dir} ({'resume' if resume else 'new run'})")
            return 0
        from ddpm.train.dist import cleanup, init_distributed
        from ddpm.train.loop import Trainer, TrainingDiverged
        info = init_distributed(cfg.train.device)
        try:
            run_dir, resume = rundir.prepare_run_dir(cfg, args.run_dir, args.force)
            run_dir = _agree_on_run_dir(run_dir, info)
            rundir.check_writable(run_dir)
            trainer = Trainer(cfg, run_dir, info)
            if resume:
                trainer.load_checkpoint()
            if info.is_main and (not resume or args.force):
                rundir.write_config(run_dir, cfg)
            rc = trainer.run()
            if rc == 0 and info.is_main:
                print(closing_lines(run_dir, trainer.grids), flush=True)
            return rc
        except TrainingDiverged as e:
            print(f"error: {e}", file=sys.stderr)
            return DIVERGED_EXIT_CODE
        finally:
            cleanup()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return BAD_INPUT_EXIT_CODE


def closing_lines(run_dir: Path, grids: list) -> str:
    """Where to look and what to run next, after the done: line."""
    lines = []
    if grids:
        last = grids[-1]
        same_step = [g.name for g in grids[:-1] if g.name.split("_")[1] == last.name.split("_")[1]]
        lines.append(f"samples: {last}" + (f" (also {', '.join(same_step)})" if same_step else ""))
    q = shlex.quote
    lines += ["next:", f"  python -m jobs.evaluate {q(str(run_dir))}   # guidance grid, loss curves, GIFs, metrics",
              f"  python -m jobs.tensorboard {q(str(run_dir.parent))}   # curves and grids in a browser (prints the ssh tunnel)"]
    return "\n".join(lines)


def _agree_on_run_dir(run_dir, info):
    """With several ranks, rank 0's choice of a new numbered run dir wins."""
    if info.world_size == 1:
        return run_dir
    import torch.distributed as dist
    box = [str(run_dir)]
    dist.broadcast_object_list(box, src=0)
    return Path(box[0])


if __name__ == "__main__":
    sys.exit(main())
