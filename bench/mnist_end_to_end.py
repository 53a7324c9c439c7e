"""MNIST end to end: the course recipe's 20 epochs against one ``python -m jobs.train``, time and quality.

    python -m bench.mnist_end_to_end [--device cuda|cpu] [--quick] [--data-root data] [--classifier PATH]
                                     [--metric-samples N] [--keep DIR]

Rows, all in this run on this device:
- baseline: the course recipe (bench/course_recipe.py: DataLoader over torchvision MNIST, fp32, batch 128,
  Adam 1e-3, ExponentialLR 0.1^(1/20) per epoch) for 20 epochs, timed in this process from building the
  DataLoader to the last step (a notebook has torch imported already). Its weights are then written as a
  run dir with the config of configs/recipes/cs180_mnist.yaml, so the evaluation job reads them like ours.
- ours: ``python -m jobs.train --config configs/mnist.yaml`` exactly as a user starts it, timed from process
  start to exit: imports, data loading, compilation (cold: an empty TORCHINDUCTOR_CACHE_DIR), checkpoints
  and the end-of-run sample grid all included.
- ours, warm compile cache (CUDA with train.compile only): the same command once more with that cache,
  which is what a requeued job or the next run of a sweep pays (see ddpm/diffusion/compiled.py).

Quality: ``python -m jobs.evaluate RUN --only metrics`` on every run: the course's sampler (DDPM, all T=300
steps) at guidance gamma = 5, --metric-samples samples (balanced over the classes, the same seed for
every run), label accuracy and feature-FID from the MNIST classifier of jobs.train_classifier.
--quick: D=16 nets, 10 steps of batch 32 each, 10 samples with DDIM-5; it checks that the path runs,
its numbers mean nothing.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: python bench/mnist_end_to_end.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench import common, course_recipe
from bench.tables import Table
from ddpm.config import load_config
from ddpm.evaluate.feature_cnn import default_classifier_path
from ddpm.nets.loading import clean_state_dict
from ddpm.nets.registry import build_net
from ddpm.run.checkpoints import CheckpointManager
from ddpm.run.metrics_log import read_metrics
from ddpm.run.rundir import write_config

ROOT = Path(__file__).resolve().parents[1]
GAMMA = 5.0


def sizes(quick: bool) -> dict:
    if quick:
        return dict(hidden=16, course_batch=32, steps=10, samples=10, sampler=["--sampler", "ddim", "--steps", "5"],
                    ours=["model.hidden=16", "train.batch_size=32", "train.steps=10", "log.every=5",
                          "checkpoint.every=10", "sample.guidance=[5.0]", "sample.per_class=1"])
    return dict(hidden=64, course_batch=128, steps=None, samples=1000, sampler=["--sampler", "ddpm"], ours=[])


# ------------------------------------------------------------------------------------ the course recipe
def train_course(args, sz, run_dir: Path) -> dict:
    """The course loop for 20 epochs (or sz['steps'] steps); writes its weights as a run dir."""
    dev = args.device
    cfg = load_config(ROOT / "configs" / "recipes" / "cs180_mnist.yaml",
                      [f"data.root={args.data_root}", f"model.hidden={sz['hidden']}",
                       f"train.batch_size={sz['course_batch']}", f"train.device={dev.type}"])
    torch.manual_seed(0)
    common.reset_peak_memory(dev)
    common.sync(dev)
    t0 = time.perf_counter()
    loader = course_recipe.mnist_loader(args.data_root, sz["course_batch"])
    trainer = course_recipe.CourseTrainer(build_net(cfg.model["arch"], **cfg.net_kwargs()), cfg.diffusion.T, dev,
                                          lr=cfg.train.lr, p_uncond=cfg.diffusion.p_uncond)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(trainer.opt, cfg.train.lr_gamma)
    steps = 0
    for _ in range(int(cfg.train.epochs)):
        for x, y in loader:
            trainer.step(x, y)
            steps += 1
            if steps == sz["steps"]:
                break
        scheduler.step()
        if steps == sz["steps"]:
            break
    common.sync(dev)
    wall = time.perf_counter() - t0
    write_config(run_dir, cfg)
    CheckpointManager(run_dir / "checkpoints").save(steps, {
        "model": clean_state_dict(trainer.net.state_dict()), "ema": None, "optimizer": trainer.opt.state_dict(),
        "step": steps, "config": cfg.to_dict()})
    return dict(wall=wall, images=steps * sz["course_batch"], memory=common.peak_memory(dev),
                config=f"D={sz['hidden']} b{sz['course_batch']} fp32, DataLoader+ToTensor, {steps} steps")


# ------------------------------------------------------------------------------------------------- ours
def train_ours(args, sz, run_dir: Path, cache: Path) -> dict:
    """``python -m jobs.train --config configs/mnist.yaml`` in a fresh process, timed from start to exit."""
    overrides = [f"data.root={args.data_root}", f"train.device={args.device.type}", *sz["ours"]]
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache),
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    cmd = [sys.executable, "-m", "jobs.train", "--config", str(ROOT / "configs" / "mnist.yaml"), *overrides,
           "--run-dir", str(run_dir)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - t0
    (run_dir.parent / f"{run_dir.name}.log").write_text(proc.stdout)
    if proc.returncode != 0:
        raise RuntimeError(f"jobs.train exited {proc.returncode}: {proc.stdout.strip().splitlines()[-1:]}")
    rows = read_metrics(run_dir / "metrics.jsonl")
    steps = rows[-1]["step"]
    cfg = load_config(ROOT / "configs" / "mnist.yaml", overrides)
    mem = max((r.get("gpu_mem_gb", 0.0) for r in rows), default=0.0)
    cuda = args.device.type == "cuda"
    label = "+".join([cfg.train.precision] + (["compile"] if cfg.train.compile else [])) if cuda else "fp32 eager"
    return dict(wall=wall, images=steps * cfg.train.batch_size, memory=f"{mem:.2f} GiB" if mem else "-",
                config=f"D={cfg.model['hidden']} b{cfg.train.batch_size} {label}, data on the {args.device.type}, "
                       f"{steps} steps",
                compiled=cuda and cfg.train.compile)


# ---------------------------------------------------------------------------------------------- quality
def quality(args, sz, run_dir: Path) -> dict:
    """Accuracy and feature-FID at gamma=5 from ``python -m jobs.evaluate RUN --only metrics``."""
    cmd = [sys.executable, "-m", "jobs.evaluate", str(run_dir), "--only", "metrics", "--guidance", f"{GAMMA:g}",
           "--convention", "gamma", *sz["sampler"], "--metric-samples", str(args.metric_samples or sz["samples"]),
           "--per-class", "1", "--seed", "0", "--device", args.device.type, "--classifier", str(args.classifier)]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    (run_dir.parent / f"{run_dir.name}-eval.log").write_text(proc.stdout)
    if proc.returncode != 0:
        raise RuntimeError(f"jobs.evaluate exited {proc.returncode}: {proc.stdout.strip().splitlines()[-1:]}")
    (path,) = run_dir.glob("eval/step_*/metrics.json")
    m = json.loads(path.read_text())
    (row,) = m["sections"]["guidance"]["rows"]
    return dict(accuracy=row["accuracy"], fid=row["feature_fid"], n=row["n"], sampler=m["sampler"])


# ------------------------------------------------------------------------------------------------ table
def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.mnist_end_to_end",
                                description="MNIST end to end: the course recipe's 20 epochs vs one "
                                            "`python -m jobs.train --config configs/mnist.yaml`, time and quality.")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu",
                   help="default: cuda when available")
    p.add_argument("--quick", action="store_true", help="smoke sizes (10 steps, 10 samples): checks the path only")
    p.add_argument("--data-root", default="data", metavar="DIR",
                   help="torchvision root holding MNIST/raw (default: data)")
    p.add_argument("--classifier", metavar="PATH",
                   help="MNIST classifier of jobs.train_classifier (default: DATA_ROOT/classifiers/mnist_cnn.pt)")
    p.add_argument("--metric-samples", type=int, metavar="N",
                   help="samples per run for the quality columns (default: 1000)")
    p.add_argument("--keep", metavar="DIR", help="write the runs and logs to DIR (new) and keep them; "
                                                 "default: a temporary directory")
    args = p.parse_args()
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available; use --device cpu")
    if args.device.type == "cpu" and not args.quick:
        p.error("full sizes need a GPU (the course recipe's 20 epochs take hours on a CPU); add --quick for a "
                "smoke run")
    if args.metric_samples is not None and args.metric_samples < 10:
        p.error(f"--metric-samples must be >= 10 (one per class), got {args.metric_samples}")
    if not (Path(args.data_root) / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        p.error(f"MNIST not found in {args.data_root}/MNIST/raw: run 'python -m jobs.prepare_data --dataset mnist "
                f"--root {args.data_root}' or pass --data-root")
    args.data_root = str(Path(args.data_root).resolve())
    args.classifier = Path(args.classifier or default_classifier_path("mnist", args.data_root)).resolve()
    if not args.classifier.is_file():
        p.error(f"no MNIST classifier at {args.classifier}: train one with 'python -m jobs.train_classifier "
                f"--dataset mnist --root {args.data_root}' or pass --classifier")
    if args.keep and Path(args.keep).exists():
        p.error(f"--keep {args.keep} already exists; name a new directory")
    sz = sizes(args.quick)

    common.header("ddpm-hpc MNIST end to end: time to a trained model and its sample quality", args, None)
    table = Table("MNIST end to end", ["row", "config", "wall s", "images/s", "speed-up", "peak memory",
                                       f"accuracy γ={GAMMA:g}", f"feature-FID γ={GAMMA:g}", "note"])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep).resolve() if args.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        cache = work / "cache"
        course = measure(args, sz, table, "baseline: course recipe", work / "course",
                         lambda d: train_course(args, sz, d))
        ours = measure(args, sz, table, "ours: jobs.train configs/mnist.yaml", work / "ours",
                       lambda d: train_ours(args, sz, d, cache), course)
        results = [course, ours]
        if ours.get("compiled"):
            results.append(measure(args, sz, table, "ours: same, warm compile cache", work / "ours-warm",
                                   lambda d: train_ours(args, sz, d, cache), course))
        print()
        table.print_final()
        print("\nwall s: baseline from its DataLoader to its last step (in process); ours from process start to exit "
              "(imports, data, compilation, checkpoints, sample grid). Targets (issue 7): ours <= 25 s with accuracy "
              "and feature-FID at least as good as the baseline's.")
        if args.keep:
            print(f"runs and logs kept in {work}")
    return 1 if any("failed" in r for r in results) else 0


def fmt3(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def measure(args, sz, table, name: str, run_dir: Path, train, baseline: dict | None = None) -> dict:
    """Results of train(run_dir) and its quality, added to ``table`` at once (speed-up against ``baseline``,
    the course row; None: this is it); a failure becomes {'failed': why}."""
    try:
        r = train(run_dir)
        print(f"  trained: {name} in {r['wall']:.1f} s", flush=True)
        r.update(quality(args, sz, run_dir))
    except Exception as e:  # one broken row must not hide the others
        r = {"failed": f"FAILED: {type(e).__name__}: {' '.join(str(e).split())[:200]}"}
    if "failed" in r:
        table.add([name, "-", "-", "-", "-", "-", "-", "-", r["failed"]], {"failed": r["failed"]})
        return r
    base = (baseline or r).get("wall")
    speed = base / r["wall"] if base else None
    table.add([name, r["config"], f"{r['wall']:.1f}", common.fmt_rate(r["images"] / r["wall"]),
               f"{speed:.2f}x" if speed else "-", r["memory"], fmt3(r["accuracy"]), fmt3(r["fid"]),
               f"{r['n']} samples, {r['sampler']['name']} {r['sampler']['steps']} steps"],
              dict(wall_s=r["wall"], images_per_s=r["images"] / r["wall"], speedup=speed, memory=r["memory"],
                   accuracy=r["accuracy"], feature_fid=r["fid"], n=r["n"], config=r["config"]))
    return r


if __name__ == "__main__":
    sys.exit(main())
