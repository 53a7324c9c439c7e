"""Train a diffusion model: ``python -m jobs.train --config configs/mnist.yaml [key.sub=value ...]``.

Without --config it runs the embedded quick-start: a short class-conditional MNIST run on the CPU.

Giving an existing run directory resumes it (this is how a requeued SLURM job continues). Exit codes:
0 done, 1 the loss became NaN/Inf, 2 bad input or another job holds the run dir (nothing written),
74 out of disk space or quota (the last good checkpoint is kept; never requeued), 75 preempted after saving
a checkpoint (requeue me).
"""
import argparse
import sys
from pathlib import Path

from ddpm.errors import (
    BAD_INPUT_EXIT_CODE,
    DIVERGED_EXIT_CODE,
    NO_SPACE_EXIT_CODE,
    OutOfSpace,
    TrainingDiverged,
    UserError,
)
from jobs.cli import Parser

QUICKSTART = Path(__file__).resolve().parents[1] / "ddpm" / "quickstart.yaml"
EXAMPLES = """examples:
  python -m jobs.train
  python -m jobs.train --config configs/mnist.yaml
  python -m jobs.train --config configs/mnist.yaml train.lr=2e-4 train.epochs=5 --run-dir runs/my-run
  python -m jobs.train --config configs/cifar10.yaml --dry-run     # the resolved config and the parameter count
  python -m jobs.train --config configs/recipes/bonn_mnist.yaml   # a course recipe (see its header)
"""


def parse_args(argv=None):
    p = Parser(prog="python -m jobs.train", description=__doc__, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(QUICKSTART),
                   help="YAML config, e.g. configs/mnist.yaml (default: the embedded quick-start, a short MNIST run)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. train.lr=2e-4")
    p.add_argument("--run-dir", help="run directory; an existing one is resumed (default: a new "
                                     "RUN_ROOT/NNNNN-<name>-b<batch>)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config, the model's parameter count and the run dir, then exit")
    p.add_argument("--force", action="store_true", help="continue a run dir whose config differs from this one")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        from ddpm.train.job import train  # imported after parsing so --help stays fast
        return train(args.config, args.overrides, args.run_dir, args.force, args.dry_run,
                     log=lambda s: print(s, flush=True))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return BAD_INPUT_EXIT_CODE
    except OutOfSpace as e:
        print(f"error: {e}", file=sys.stderr)
        return NO_SPACE_EXIT_CODE
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return DIVERGED_EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
