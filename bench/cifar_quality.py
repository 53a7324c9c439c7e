"""CIFAR-10 sample quality on a CPU budget: a small configs/cifar10.yaml net trained on real images, against
the untrained net and against the training images themselves (the ceiling).

    python -m bench.cifar_quality [--data-root ../shared/data/cifar10] [--classifier PATH] [--steps 2000]
                                  [--samples 200] [--device cpu|cuda] [--keep DIR | --reuse DIR] [--quick]

Rows, all measured in this run with one classifier and the same number of images n per row:
- training images: the first n/10 training images of each class, scored like samples: the accuracy and
  feature-FID a perfect generator would reach at this n.
- trained: ``python -m jobs.train --config configs/cifar10.yaml`` at a CPU-sized width (SMALL below) for
  --steps steps of batch 64, then ``python -m jobs.evaluate RUN --only grids,metrics --guidance 0,1,3
  --convention w --sampler ddim --steps 25 --clip-x0 --metric-samples n --seed 0`` on its EMA weights
  (x0 clipped at every step, as configs/cifar10.yaml samples; --no-clip shows what happens without).
- untrained: the same config and evaluation after one step at lr 1e-12, i.e. the initial weights.
Label accuracy: the fraction the classifier assigns to the requested class (chance: 0.10). Feature-FID:
the Fréchet distance of the classifier's penultimate features to the test split's; it shrinks with n, so
compare rows with the same n only. On the subset of ../shared/data/cifar10 both the classifier and the
reference statistics come from a subset: the numbers are not comparable with full-data ones.
--reuse DIR: evaluate the runs and classifier that an earlier ``--keep DIR`` left, without training again.
--quick: 4 steps, 20 samples, DDIM-3: it checks that every path runs, its numbers mean nothing.
"""
import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: python bench/cifar_quality.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench import common
from bench.quality import run_job

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "cifar10.yaml"
# configs/cifar10.yaml narrowed for 2 CPU cores: base 32, levels 32/64/64, one residual block per level,
# attention at 16x16 as shipped, no dropout (far from overfitting in half an hour); lr and warm-up for
# a run of ~2,000 steps instead of 800k.
SMALL = ["model.base=32", "model.ch_mult=[1,2,2]", "model.num_res_blocks=1", "model.dropout=0.0",
         "train.batch_size=64", "train.lr=1e-3", "train.warmup_steps=100", "train.ema_decay=0.995"]
GUIDANCE = (0.0, 1.0, 3.0)


def train(args, name: str, work: Path, extra: list[str]) -> tuple[Path, float]:
    run_dir = work / name
    t0 = time.time()
    run_job([sys.executable, "-m", "jobs.train", "--config", str(CONFIG), f"data.root={args.data_root}",
             f"train.device={args.device}", "log.progress=lines", "log.tensorboard=false", *SMALL, *extra,
             "sample.steps=5", "sample.per_class=1", "--run-dir", str(run_dir)], work / f"{name}-train.log")
    return run_dir, time.time() - t0


def evaluate(args, run_dir: Path, work: Path) -> tuple[dict, Path]:
    """The evaluation job's guidance rows {scale: row} and its guidance grid."""
    cmd = [sys.executable, "-m", "jobs.evaluate", str(run_dir), "--only", "grids,metrics",
           "--guidance", ",".join(f"{g:g}" for g in GUIDANCE), "--convention", "w", "--sampler", "ddim",
           "--steps", "3" if args.quick else "25", "--no-clip-x0" if args.no_clip else "--clip-x0",
           "--metric-samples", str(args.samples), "--seed", "0",
           "--device", args.device, "--classifier", str(args.classifier)]
    run_job(cmd, work / f"{run_dir.name}-eval.log")
    out = sorted((run_dir / "eval").iterdir())[-1]
    m = json.loads((out / "metrics.json").read_text())
    return {r["scale"]: r for r in m["sections"]["guidance"]["rows"]}, out / "guidance_grid.png"


def training_images(args) -> dict:
    """The ceiling: the first n/10 training images of each class, scored as if they were samples."""
    from ddpm.data.datasets import load_dataset
    from ddpm.evaluate import feature_cnn, metrics

    images, labels = load_dataset("cifar10", args.data_root, train=True)
    k = args.samples // 10
    idx = torch.cat([(labels == c).nonzero()[:k, 0] for c in range(10)])
    device = torch.device(args.device)
    net, _ = feature_cnn.load_classifier(args.classifier, "cifar10", device)
    reference = feature_cnn.reference_stats(args.classifier, net, "cifar10", args.data_root, device)
    logits, feats = feature_cnn.classify(net, images[idx], device)
    return {"n": len(idx), "accuracy": metrics.accuracy(logits, labels[idx]),
            "feature_fid": metrics.frechet_distance(*metrics.feature_stats(feats.numpy()), *reference)}


def fmt(v, digits=3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def parse_args():
    p = argparse.ArgumentParser(prog="python -m bench.cifar_quality", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="smoke sizes: checks every path, numbers mean nothing")
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data" / "cifar10"), metavar="DIR",
                   help="data root holding cifar-10-batches-py/ (default: ../shared/data/cifar10, the real subset)")
    p.add_argument("--classifier", metavar="PATH", help="CIFAR-10 classifier of jobs.train_classifier (default: "
                                                        "train one into the work folder first, ~2.5 min on 2 cores)")
    p.add_argument("--steps", type=int, metavar="N", help="training steps of batch 64 (default: 2000, ~25 min on 2 cores; --quick 4)")
    p.add_argument("--samples", type=int, metavar="N", help="images per row (default: 200; --quick 20)")
    p.add_argument("--keep", metavar="DIR", help="write the runs, logs and grids to DIR (new) and keep them")
    p.add_argument("--reuse", metavar="DIR", help="only evaluate the runs of an earlier --keep DIR (its classifier too)")
    p.add_argument("--no-clip", action="store_true", help="evaluate without x0 clipping")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available; use --device cpu")
    args.steps = args.steps or (4 if args.quick else 2000)
    args.samples = args.samples or (20 if args.quick else 200)
    if args.steps < 1 or args.samples < 10 or args.samples % 10:
        p.error(f"--steps must be >= 1 and --samples a multiple of 10 (whole classes); got {args.steps}, {args.samples}")
    if not (Path(args.data_root) / "cifar-10-batches-py" / "data_batch_1").is_file():
        p.error(f"CIFAR-10 not found in {args.data_root}/cifar-10-batches-py: run 'python -m jobs.prepare_data "
                f"--dataset cifar10 --root {args.data_root}' or pass --data-root")
    args.data_root = str(Path(args.data_root).resolve())
    if args.classifier and not Path(args.classifier).is_file():
        p.error(f"--classifier {args.classifier} not found; omit it to train one, or train it with "
                f"'python -m jobs.train_classifier --dataset cifar10 --root {args.data_root} --out PATH'")
    if args.keep and Path(args.keep).exists():
        p.error(f"--keep {args.keep} already exists; name a new directory")
    if args.reuse:
        if args.keep:
            p.error("--reuse DIR already names where the runs are; drop --keep")
        if not all((Path(args.reuse) / run / "config.json").is_file() for run in ("trained", "untrained")):
            p.error(f"--reuse {args.reuse} does not hold the trained/ and untrained/ runs of an earlier --keep")
        args.keep = args.reuse
        args.classifier = args.classifier or str(Path(args.reuse) / "cifar10_cnn.pt")
    return args


def main() -> int:
    args = parse_args()
    common.header("ddpm-hpc CIFAR-10 sample quality: a small net trained on real images vs the untrained net "
                  "and the training images", argparse.Namespace(device=torch.device(args.device), quick=args.quick), None)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep).resolve() if args.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.reuse:  # the logs of this evaluation go next to the first ones
            work = work / ("reuse-noclip" if args.no_clip else "reuse")
            work.mkdir(exist_ok=True)
        if args.classifier is None:
            args.classifier = work / "cifar10_cnn.pt"
            run_job([sys.executable, "-m", "jobs.train_classifier", "--dataset", "cifar10", "--root", args.data_root,
                     "--out", str(args.classifier), "--device", args.device, *(["--steps", "20"] if args.quick else [])],
                    work / "classifier.log")
        args.classifier = Path(args.classifier).resolve()
        clf_meta = torch.load(args.classifier, map_location="cpu", weights_only=True)["meta"]
        ceiling = training_images(args)
        if args.reuse:
            runs = Path(args.reuse).resolve()
            trained, untrained = runs / "trained", runs / "untrained"
            args.steps = json.loads((trained / "config.json").read_text())["train"]["steps"]
            wall = float("nan")
        else:
            trained, wall = train(args, "trained", work, [f"train.steps={args.steps}",
                                                          f"checkpoint.every={max(1, args.steps // 4)}"])
            untrained, _ = train(args, "untrained", work, ["train.steps=1", "train.lr=1e-12", "train.warmup_steps=0"])
        rows_t, grid = evaluate(args, trained, work)
        rows_u, _ = evaluate(args, untrained, work)
        cfg = json.loads((trained / "config.json").read_text())
        n_params = sum(v.numel() for v in torch.load(
            trained / "checkpoints" / (trained / "checkpoints" / "latest").read_text().strip() / "state.pt",
            map_location="cpu", weights_only=True)["model"].values())
        print(f"classifier: {args.classifier} (test accuracy {clf_meta['test_accuracy']:.3f} on "
              f"{clf_meta.get('test_images')} test images, trained on {clf_meta.get('train_images')})")
        print(f"trained: base {cfg['model']['base']}, ch_mult {cfg['model']['ch_mult']}, {n_params / 1e6:.2f} M "
              f"parameters, {args.steps} steps x {cfg['train']['batch_size']}"
              + (f" in {wall:.0f} s ({args.steps * cfg['train']['batch_size'] / wall:.1f} img/s, process start to exit)"
                 if wall == wall else " (trained by an earlier run: --reuse)")
              + f"; sampling: ddim 25 steps, x0 {'not ' if args.no_clip else ''}clipped")
        print()
        cols = ["row", "w", "n", "label accuracy", "feature-FID", "FID vs untrained"]
        lines = [["training images (ceiling)", "-", ceiling["n"], fmt(ceiling["accuracy"]),
                  fmt(ceiling["feature_fid"], 1), "-"]]
        for g in GUIDANCE:
            t, u = rows_t[g], rows_u[g]
            lines.append([f"trained, {args.steps} steps", f"{g:g}", t["n"], fmt(t["accuracy"]), fmt(t["feature_fid"], 1),
                          f"{t['feature_fid'] / u['feature_fid']:.2f}x"])
        for g in GUIDANCE:
            u = rows_u[g]
            lines.append(["untrained (initial weights)", f"{g:g}", u["n"], fmt(u["accuracy"]), fmt(u["feature_fid"], 1),
                          "1.00x"])
        common.print_markdown(cols, lines)
        if args.keep:
            shutil.copy(grid, work / "guidance_grid.png")
            print(f"\ngrid: {work / 'guidance_grid.png'}")
            (work / "results.json").write_text(json.dumps({"ceiling": ceiling, "trained": rows_t, "untrained": rows_u,
                                                           "train_wall_s": wall, "steps": args.steps}, indent=2,
                                                          default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
