"""Fetch or unpack a data set once, so that training jobs on compute nodes never download.

    python -m jobs.prepare_data --dataset mnist --root /scratch/$USER/data            # login node
    python -m jobs.prepare_data --dataset mnist --root /scratch/$USER/data --offline  # no internet
"""
import argparse
import sys

from ddpm.data.datasets import DATASETS, prepare_dataset
from ddpm.errors import BAD_INPUT_EXIT_CODE, UserError
from jobs.cli import Parser

EPILOG = """\
without --offline: files that already load are only verified; missing ones are downloaded
  (torchvision checks the official md5s) -- run this on a machine with internet, e.g. the login node.
with --offline: nothing is downloaded; the official archives must already be in place:
  mnist:   the four .gz files (train-images-idx3-ubyte.gz, ...) in ROOT/MNIST/raw/
  cifar10: cifar-10-python.tar.gz in ROOT/, or its extracted folder ROOT/cifar-10-batches-py/
Afterwards point training at the same root (data.root=ROOT). Exit status 2 on any problem."""


def main(argv=None) -> int:
    parser = Parser(prog="python -m jobs.prepare_data", description=__doc__.splitlines()[0],
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, metavar="NAME", help=f"one of: {', '.join(DATASETS)}")
    parser.add_argument("--root", required=True, metavar="DIR", help="data root, the same as data.root in the config")
    parser.add_argument("--offline", action="store_true",
                        help="never download: only verify and unpack files already placed under --root")
    args = parser.parse_args(argv)
    try:
        info = prepare_dataset(args.dataset, args.root, offline=args.offline)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return BAD_INPUT_EXIT_CODE
    c, h, w = info["shape"]
    facts = DATASETS[info["dataset"]]

    def of_official(n, split):
        return f", a subset of the official {facts[split + '_size']}" if n < facts[split + "_size"] else ""

    print(f"dataset: {info['dataset']}")
    print(f"path:    {info['path']}")
    print(f"train:   {info['train']} images ({c}x{h}x{w} uint8){of_official(info['train'], 'train')}")
    print(f"test:    {info['test']} images{of_official(info['test'], 'test')}")
    if info["subset"]:
        print("note:    a subset: classifier accuracy and feature-FID measured on it are not comparable with "
              "full-data numbers")
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
