"""Samples per second of ``jobs.sample``: one process against P processes on the same request.

    python -m bench.sample_job [--device cpu|cuda] [--processes P] [--num N] [--data-root data] [--quick]

Both rows run the same request on the same run (configs/mnist.yaml trained eagerly for a few steps: the
speed does not depend on the weights): DDIM with 50 steps, γ=5, shards of min(250, N / 2P) samples.
- baseline: ``python -m jobs.sample RUN --num N`` (one process; on a CPU it uses every core)
- ours: ``torchrun --nproc_per_node P -m jobs.sample RUN --num-samples N`` (P ranks; on a CPU one thread
  each, on CUDA one GPU each); left out when P is 1 (one GPU, or --processes 1): one row, and a line saying
  that the second needs two devices
Wall time runs from process start to exit (imports and model loading included); the outputs of the two
rows are compared bit for bit (on a CPU).
--quick: D=8 net, 60 samples of DDIM-5: checks the paths, its numbers mean nothing.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: python bench/sample_job.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from bench import common
from bench.quality import run_job
from bench.tables import Table

ROOT = Path(__file__).resolve().parents[1]


def timed_job(cmd: list[str], log: Path, threads: int | None = None) -> tuple[float, float | None]:
    """(wall seconds, rank 0's own samples/s from its log)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    t0 = time.time()
    with open(log, "w") as out:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... exited {proc.returncode} (log: {log})")
    m = re.search(r"\(([\d.]+) samples/s per rank\)", log.read_text())
    return wall, float(m.group(1)) if m else None


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sample_job", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--processes", type=int, metavar="P",
                   help="ranks of the second row (default: the GPU count on CUDA, the core count on a CPU; "
                        "1: the first row only)")
    p.add_argument("--num", type=int, metavar="N", help="samples per request (default: 2000 on CUDA, 200 on a CPU; "
                                                        "--quick 60)")
    p.add_argument("--data-root", default="data", metavar="DIR", help="torchvision root holding MNIST/raw")
    p.add_argument("--quick", action="store_true", help="smoke sizes: checks every path, numbers mean nothing")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available; use --device cpu")
    if not (Path(args.data_root) / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        p.error(f"MNIST not found in {args.data_root}/MNIST/raw: run 'python -m jobs.prepare_data --dataset mnist "
                f"--root {args.data_root}' or pass --data-root")
    cores = len(os.sched_getaffinity(0))
    procs = args.processes or (torch.cuda.device_count() if args.device == "cuda" else cores)
    num = args.num or (60 if args.quick else 2000 if args.device == "cuda" else 200)
    if procs < 1 or num < procs:
        p.error(f"--processes must be >= 1 and --num >= --processes; got {procs}, {num}")
    common.header("ddpm-hpc jobs.sample: one process vs several on the same request",
                  argparse.Namespace(device=torch.device(args.device), quick=args.quick), None)
    steps = "5" if args.quick else "50"
    batch = min(250, max(1, num // (2 * procs)))  # at least two shards per rank, so every rank works
    print(f"request: {num} samples, ddim {steps} steps, γ=5, shards of {batch}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        run = work / "run"
        # Eager training: its weights do not matter here, and a compile would only add tens of seconds on CUDA.
        run_job([sys.executable, "-m", "jobs.train", "--config", str(ROOT / "configs" / "mnist.yaml"),
                 f"data.root={Path(args.data_root).resolve()}", f"train.device={args.device}", "train.steps=4",
                 "train.compile=false", "log.progress=lines", "log.tensorboard=false", "sample.sampler=ddim",
                 "sample.steps=5", "sample.per_class=1", *(["model.hidden=8"] if args.quick else []),
                 "--run-dir", str(run)], work / "train.log")
        request = ["--sampler", "ddim", "--steps", steps, "--guidance", "5", "--convention", "gamma",
                   "--batch", str(batch), "--device", args.device]
        table = Table("jobs.sample", ["row", "processes", "wall s", "samples/s (wall)", "rank 0 samples/s",
                                             "speed-up (wall)"])
        one = timed_job([sys.executable, "-m", "jobs.sample", str(run), "--num-samples", str(num), *request,
                         "--out", "one"], work / "one.log")
        add_row(table, "baseline: python -m jobs.sample", 1, num, one, one)
        if procs == 1:
            print(f"the second row (torchrun over P processes) needs at least 2 "
                  f"{'GPUs' if args.device == 'cuda' else 'cores'}; this machine gives 1")
        else:
            many = timed_job([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                              str(procs), "-m", "jobs.sample", str(run), "--num-samples", str(num), *request,
                              "--out", "many"], work / "many.log",
                             threads=None if args.device == "cuda" else max(1, cores // procs))
            add_row(table, f"ours: torchrun x {procs}", procs, num, many, one)
            from ddpm.run.samples import read_samples
            a, _, _ = read_samples(run / "samples" / "one.h5", "samples")
            b, _, _ = read_samples(run / "samples" / "many.h5", "samples")
            same = "identical" if np.array_equal(a, b) else "differ (expected only on CUDA)"
            print(f"outputs of the two rows: {same}")
    print()
    table.print_final()
    return 0


def add_row(table, name: str, procs: int, num: int, measured: tuple, baseline: tuple) -> None:
    """One row: measured and baseline are timed_job's (wall seconds, rank 0's samples/s)."""
    wall, rank0 = measured
    table.add([name, procs, f"{wall:.1f}", f"{num / wall:.1f}", common.fmt_rate(rank0), f"{baseline[0] / wall:.2f}x"],
              dict(processes=procs, samples=num, wall_s=wall, samples_per_s=num / wall, rank0_samples_per_s=rank0,
                   speedup=baseline[0] / wall))


if __name__ == "__main__":
    sys.exit(main())
