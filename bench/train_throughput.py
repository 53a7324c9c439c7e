"""Training throughput in one table: the course recipe and diffusers against ddpm-hpc's own Trainer.

    python -m bench.train_throughput [--device cuda|cpu] [--quick] [--check] [--which mnist,cifar]
                                     [--data-root data] [--ablations] [--repeats N] [--peak-tflops BF16,FP32]

MNIST: (a) the CS180 course recipe (bench/course_recipe.py: DataLoader over torchvision MNIST, batch 128,
fp32) against (b) ``ddpm.train.loop.Trainer`` running configs/mnist.yaml (GPU-resident data, batch 512,
bf16 + torch.compile on CUDA). CIFAR: diffusers' UNet2DModel in the DDPM-CIFAR10 configuration (batch 128,
fp32 and bf16 autocast; only when ``import diffusers`` works) against the Trainer running
configs/cifar10.yaml at batch 128 and 512. The CIFAR rows train on random uint8 images of CIFAR's shape:
throughput does not depend on pixel values.

Our rows run the real Trainer for (1 + intervals) log intervals and read its own images/s from
metrics.jsonl (the loop syncs with the host only at log steps): the first interval holds compilation
and warm-up, the median of the others is the steady state. Checkpoint writes and the end-of-run sample
grid are switched off (they are not training steps). MNIST needs the real data set in DATA_ROOT/MNIST/raw
(python -m jobs.prepare_data --dataset mnist --root data).
--check (bench/gpu_check.sh, minutes on one GPU): the same nets and batches, fewer steps and repeats, and
only the rows that answer the targets: MNIST course recipe vs ours; CIFAR diffusers bf16 vs ours at batch
128 (two cold compiles instead of three).
"""
import io
import statistics
import sys
import tempfile
from contextlib import redirect_stdout
from pathlib import Path

if __package__ in (None, ""):  # run as a file: python bench/train_throughput.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench import common, course_recipe, diffusers_baseline
from bench.common import Row
from ddpm.config import load_config
from ddpm.nets.registry import build_net
from ddpm.run.metrics_log import read_metrics
from ddpm.train.dist import DistInfo
from ddpm.train.loop import Trainer

ROOT = Path(__file__).resolve().parents[1]
MNIST_TRAIN_IMAGES = 60_000


def sizes(quick: bool, check: bool) -> dict:
    if quick:  # smoke sizes for a 2-core CPU: every code path, seconds in all
        sz = dict(hidden=16, course_batch=32, ours_batch=32, warmup=1, steps=2, repeats=1, every=2, intervals=1,
                  cifar_base=32, cifar_batches=(2, 4))
    else:  # ours_batch None: the config's own batch (512 on a GPU, its on_cpu batch on a CPU).
        sz = dict(hidden=64, course_batch=128, ours_batch=None, warmup=10, steps=50, repeats=5, every=50,
                  intervals=5, cifar_base=128, cifar_batches=(128, 512))
    if check:  # each timed span still lasts some hundred milliseconds on an H100 (an estimate)
        sz.update(cifar_batches=sz["cifar_batches"][:1])
        if not quick:
            sz.update(warmup=5, steps=30, repeats=2, every=20, intervals=2)
    return sz


def steps_per_second(step, next_batch, device, warmup, steps, repeats) -> float:
    for _ in range(warmup):
        step(*next_batch())

    def chunk():
        for _ in range(steps):
            step(*next_batch())

    return steps / common.median_time(chunk, device, repeats)


def run_trainer(config, overrides, device, sz, images=None, labels=None) -> dict:
    """Run the real Trainer for (1 + intervals) log intervals; its own images/s from metrics.jsonl."""
    every, steps = sz["every"], sz["every"] * (1 + sz["intervals"])
    cfg = load_config(ROOT / "configs" / config, [
        *overrides, f"train.steps={steps}", f"log.every={every}", "log.tensorboard=false", "log.progress=none",
        "log.sample_every=0", "log.test_every_epochs=[]", f"checkpoint.every={10 ** 9}", f"train.device={device.type}"])
    common.reset_peak_memory(device)
    with common.cold_compile(device), tempfile.TemporaryDirectory() as tmp, redirect_stdout(io.StringIO()):
        trainer = Trainer(cfg, Path(tmp), DistInfo(0, 1, 0, device, None), images=images, labels=labels)
        trainer.save = lambda: None  # measure training steps, not checkpoint I/O
        trainer.write_samples = lambda logger: None  # nor the end-of-run sample grid (nor, above, the held-out loss)
        trainer.run()
        ips = [row["images_per_s"] for row in read_metrics(Path(tmp) / "metrics.jsonl")]
    batch = cfg.train.batch_size
    steady = statistics.median(ips[1:])
    first_extra = max(0.0, every * batch / ips[0] - every * batch / steady)  # compilation + warm-up
    return dict(ips=steady, first_extra=first_extra, memory=common.peak_memory(device), cfg=cfg)


def warmup_label(device) -> str:
    return "compile+warm-up" if device.type == "cuda" else "warm-up"


def precision_label(cfg, device) -> tuple[str, str]:
    """(precision for MFU, human label) of a Trainer config on this device."""
    t = cfg.train
    if device.type != "cuda":
        return "fp32", "fp32 eager" + ("+channels_last" if t.channels_last else "") + " (bf16/compile: CUDA only)"
    parts = [t.precision] + (["compile"] if t.compile else ["eager"]) + (["channels_last"] if t.channels_last else [])
    return t.precision, "+".join(parts)


# ---------------------------------------------------------------------------------------------- MNIST
def mnist_rows(args, sz, peaks, table) -> None:
    dev, D = args.device, sz["hidden"]
    flops = common.flops_per_image(lambda: build_net("cs180_class_unet", hidden=D), (1, 28, 28))
    section = "MNIST train"

    def course(row):
        torch.backends.cudnn.benchmark = False  # the baselines run with PyTorch's defaults (Trainer sets it)
        torch.manual_seed(0)
        trainer = course_recipe.CourseTrainer(build_net("cs180_class_unet", hidden=D), 300, dev)
        batches = course_recipe.endless(course_recipe.mnist_loader(args.data_root, sz["course_batch"]))
        common.reset_peak_memory(dev)
        sps = steps_per_second(trainer.step, lambda: next(batches), dev, sz["warmup"], sz["steps"], sz["repeats"])
        row.images_per_s, row.memory = sps * sz["course_batch"], common.peak_memory(dev)
        row.mfu = common.mfu(flops * row.images_per_s, "fp32", peaks)
        row.note = f"20 epochs ≈ {20 * MNIST_TRAIN_IMAGES / row.images_per_s:.0f} s"

    config = f"D={D} b{sz['course_batch']} fp32, DataLoader+ToTensor"
    common.run_row(table, Row(section, "baseline: course recipe", config, baseline=True), course)

    variants = [("ours: Trainer, configs/mnist.yaml", [])]
    if args.ablations and dev.type == "cuda":
        # The path from the recipe to our config, one change per row; the row above is the "+ compile" step.
        # Every Trainer row has GPU-resident data, fused Adam, no per-step host syncs and cudnn.benchmark.
        variants += [
            ("ours: fp32 eager, recipe batch", ["train.precision=fp32", "train.compile=false",
                                                f"train.batch_size={sz['course_batch']}"]),
            ("ours: + batch 512", ["train.precision=fp32", "train.compile=false"]),
            ("ours: + bf16 (eager)", ["train.compile=false"]),
            ("ours: + channels_last (with compile)", ["train.channels_last=true"]),
        ]
    elif args.ablations:
        # CPU: what the on_cpu section's two choices are worth, one at a time, at the recipe's batch.
        variants += [
            ("ours: recipe batch, NCHW", [f"train.batch_size={sz['course_batch']}", "train.channels_last=false"]),
            ("ours: recipe batch, + channels_last", [f"train.batch_size={sz['course_batch']}"]),
        ]
    for name, overrides in variants:
        def ours(row, overrides=overrides):
            batch = [f"train.batch_size={sz['ours_batch']}"] if sz["ours_batch"] else []
            r = run_trainer("mnist.yaml", [f"data.root={args.data_root}", f"model.hidden={D}", *batch, *overrides],
                            dev, sz)
            precision, label = precision_label(r["cfg"], dev)
            b = r["cfg"].train.batch_size
            row.config = f"D={D} b{b} {label}"
            row.images_per_s, row.memory = r["ips"], r["memory"]
            row.mfu = common.mfu(flops * r["ips"], precision, peaks)
            epoch_s = (MNIST_TRAIN_IMAGES // b) * b / r["ips"]
            row.note = (f"{warmup_label(dev)} {r['first_extra']:.1f} s; "
                        f"20 epochs ≈ {20 * epoch_s + max(r['first_extra'], 0):.0f} s incl. it")

        common.run_row(table, Row(section, name, ""), ours)


# ---------------------------------------------------------------------------------------------- CIFAR
def cifar_rows(args, sz, peaks, table) -> None:
    dev, base = args.device, sz["cifar_base"]
    section = "CIFAR train"
    b0 = sz["cifar_batches"][0]
    gen = torch.Generator().manual_seed(0)
    n_images = max(4 * max(sz["cifar_batches"]), 1024 if not args.quick else 16)
    images = torch.randint(0, 256, (n_images, 3, 32, 32), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 10, (n_images,), generator=gen)

    def diffusers_row(row, bf16, version):
        torch.backends.cudnn.benchmark = False  # PyTorch's default, as in diffusers' training example
        torch.manual_seed(0)
        net = diffusers_baseline.ddpm_cifar10_unet(base)
        flops = common.flops_per_image(lambda: diffusers_baseline.ddpm_cifar10_unet(base), (3, 32, 32),
                                       diffusers_baseline.forward)
        trainer = diffusers_baseline.DiffusersTrainer(net, dev, bf16)
        pool = (images[:4 * b0].to(dev).float() / 127.5 - 1, labels[:4 * b0].to(dev))
        k = iter(range(10 ** 9))

        def next_batch():
            i = next(k) % 4
            return pool[0][i * b0:(i + 1) * b0], pool[1][i * b0:(i + 1) * b0]

        common.reset_peak_memory(dev)
        sps = steps_per_second(trainer.step, next_batch, dev, sz["warmup"], sz["steps"], sz["repeats"])
        row.images_per_s, row.memory = sps * b0, common.peak_memory(dev)
        row.mfu = common.mfu(flops * row.images_per_s, "bf16" if bf16 else "fp32", peaks)
        row.note = f"diffusers {version}, {flops / 1e9:.1f} GFLOP/img"

    common.diffusers_rows(table, section, dev, "diffusers UNet2DModel",
                          lambda bf16: f"base={base} b{b0} {'bf16 autocast' if bf16 else 'fp32'}", diffusers_row,
                          check=args.check)

    flops = common.flops_per_image(lambda: build_net("cifar_unet", base=base), (3, 32, 32))
    for batch in sz["cifar_batches"]:
        def ours(row, batch=batch):
            r = run_trainer("cifar10.yaml", [f"model.base={base}", f"train.batch_size={batch}"], dev, sz,
                            images, labels)
            precision, label = precision_label(r["cfg"], dev)
            row.config = f"base={base} b{batch} {label}"
            row.images_per_s, row.memory = r["ips"], r["memory"]
            row.mfu = common.mfu(flops * r["ips"], precision, peaks)
            row.note = f"{warmup_label(dev)} {r['first_extra']:.1f} s; {flops / 1e9:.1f} GFLOP/img"

        common.run_row(table, Row(section, "ours: Trainer, configs/cifar10.yaml", ""), ours)


def print_flop_reference() -> None:
    """Full-size FLOPs per training image (fwd + bwd), whatever sizes this run used; free on meta."""
    cs180 = common.flops_per_image(lambda: build_net("cs180_class_unet", hidden=64), (1, 28, 28))
    cifar = common.flops_per_image(lambda: build_net("cifar_unet"), (3, 32, 32))
    line = (f"FLOPs per training image (fwd+bwd, FlopCounterMode): CS180 class UNet D=64 {cs180 / 1e9:.3f} GFLOP; "
            f"DDPM-CIFAR10 cifar_unet {cifar / 1e9:.2f} GFLOP")
    if common.diffusers_status()[0]:
        d = common.flops_per_image(diffusers_baseline.ddpm_cifar10_unet, (3, 32, 32), diffusers_baseline.forward)
        line += f"; diffusers UNet2DModel {d / 1e9:.2f} GFLOP"
    print(line)


def main() -> int:
    def extra(p):
        p.add_argument("--data-root", default="data", metavar="DIR",
                       help="torchvision root holding MNIST/raw (default: data)")
        p.add_argument("--ablations", action="store_true",
                       help="also MNIST rows that separate the gains, one change per row (CUDA: from the recipe's "
                            "fp32 eager batch 128 to our config, and + channels_last; CPU: batch and channels_last)")

    args = common.parse_args("python -m bench.train_throughput",
                             "Training throughput: course recipe / diffusers vs the ddpm-hpc Trainer.", extra)
    sz = sizes(args.quick, args.check)
    if args.repeats:
        sz["repeats"] = args.repeats
    if "mnist" in args.which and not (Path(args.data_root) / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        print(f"error: MNIST not found in {args.data_root}/MNIST/raw: run 'python -m jobs.prepare_data --dataset mnist "
              f"--root {args.data_root}' (or pass --data-root, or --which cifar)", file=sys.stderr)
        return 2
    peaks = common.peak_tflops(args.device, args.peak_tflops)
    common.header("ddpm-hpc training throughput", args, peaks)
    print_flop_reference()
    table = common.RowTable("training throughput")
    if "mnist" in args.which:
        mnist_rows(args, sz, peaks, table)
    if "cifar" in args.which:
        cifar_rows(args, sz, peaks, table)
    print()
    table.print_final()
    return 1 if table.failed else 0


if __name__ == "__main__":
    sys.exit(main())
