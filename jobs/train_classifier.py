"""Train the small CNN classifier that jobs.evaluate uses for label accuracy and feature-FID, once.

The result is cached: when --out already holds a classifier for the same data set and recipe, nothing
is retrained (pass --force to retrain). Training is reproducible (fixed seed, step-indexed data order,
deterministic algorithms); MNIST reaches >= 99 % test accuracy in 3 epochs (about 2 minutes on 2 CPU
cores). The test-set feature statistics for feature-FID are computed and cached next to the file.
Exit status: 0 done (or cached), 2 bad input (nothing written).
"""
import argparse
import os
import sys
from pathlib import Path

from ddpm.errors import BAD_INPUT_EXIT_CODE, UserError
from jobs.cli import Parser

EXAMPLES = """examples:
  python -m jobs.train_classifier --dataset mnist --root data
      -> data/classifiers/mnist_cnn.pt (+ mnist_cnn.test_stats.npz), found by jobs.evaluate for runs
         whose data.root is data
  python -m jobs.train_classifier --dataset cifar10 --root /scratch/$USER/data --device cuda
  python -m jobs.train_classifier --dataset mnist --out /tmp/mnist_cnn.pt --steps 200   # quick, weak
"""


def parse_args(argv=None):
    p = Parser(prog="python -m jobs.train_classifier", description=__doc__, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, metavar="NAME", help="mnist or cifar10")
    p.add_argument("--root", default="data", metavar="DIR", help="data root, as data.root in configs (default: data)")
    p.add_argument("--out", metavar="PATH", help="classifier file (default: ROOT/classifiers/DATASET_cnn.pt, "
                                                 "where jobs.evaluate looks for it)")
    p.add_argument("--steps", type=int, metavar="N", help="optimizer steps instead of the recipe's epochs "
                                                          "(quick tests; accuracy will be lower)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, dropout and data order (default: 0)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    p.add_argument("--force", action="store_true", help="retrain even if --out already holds a classifier")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        from ddpm.data.datasets import DATASETS, load_dataset
        if args.dataset not in DATASETS:
            raise UserError(f"unknown --dataset {args.dataset!r}; choose one of: {', '.join(DATASETS)}")
        if args.steps is not None and args.steps < 1:
            raise UserError(f"--steps must be >= 1, got {args.steps}")
        import torch

        from ddpm.evaluate import feature_cnn
        device = args.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device not in ("cpu", "cuda") or (device == "cuda" and not torch.cuda.is_available()):
            raise UserError(f"--device {args.device} is not usable here; pass --device cpu")
        out = Path(args.out or feature_cnn.default_classifier_path(args.dataset, args.root))
        _check_writable(out.parent)
        load_dataset(args.dataset, args.root, train=False)  # missing data fails now, before any training
        if not args.force and _cached(out, args.dataset, args.steps, args.seed):
            print(f"classifier already trained: {out} (pass --force to retrain)")
            return 0
        net, meta, features = feature_cnn.train_classifier(args.dataset, args.root, steps=args.steps, seed=args.seed,
                                                       device=device)
        feature_cnn.save_classifier(out, net, meta)
        feature_cnn.reference_stats(out, net, args.dataset, args.root, device, features=features.numpy())
        print(f"test accuracy {meta['test_accuracy']:.4f} after {meta['steps']} steps "
              f"({meta['train_seconds']:.0f} s); saved {out}")
        if feature_cnn.subset_note(meta):
            print(f"note: {feature_cnn.subset_note(meta)}")
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return BAD_INPUT_EXIT_CODE


def _check_writable(folder: Path) -> None:
    """Before minutes of training: a read-only data root (a shared copy, ../shared/data) cannot hold the result."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {folder} ({e.strerror}); pass --out PATH somewhere writable, "
                        "then give jobs.evaluate --classifier PATH") from None
    if not os.access(folder, os.W_OK):
        raise UserError(f"{folder} is not writable (a read-only data root?); pass --out PATH somewhere writable, "
                        "then give jobs.evaluate --classifier PATH")


def _cached(out, dataset, steps, seed) -> bool:
    from ddpm.evaluate import feature_cnn
    if not Path(out).is_file():
        return False
    try:
        _, meta = feature_cnn.load_classifier(out, dataset)
    except UserError:
        return False  # not a usable classifier: train a new one over it
    return (meta.get("recipe") == feature_cnn.RECIPES[dataset] and meta.get("seed") == seed
            and meta.get("requested_steps") == steps)


if __name__ == "__main__":
    sys.exit(main())
