"""Sample quality per epoch and per second: the course recipe against configs/mnist.yaml, and the quick-start.

    python -m bench.quality [--device cpu|cuda] [--quick] [--epochs 1,3] [--which recipe,ours,quickstart]
                            [--data-root data] [--classifier PATH] [--judge PATH] [--samples 300] [--keep DIR]
                            [--seed S] [--objective eps|edm]

Rows, all measured in this run on this device:
- recipe: ``python -m jobs.train --config configs/recipes/cs180_mnist.yaml`` (the CS180 course recipe:
  batch 128, Adam 1e-3, fp32, no EMA), trained for the largest of --epochs.
- ours: ``python -m jobs.train --config configs/mnist.yaml`` (with its ``on_cpu`` section on a CPU), the
  same number of epochs. ``--objective`` trains it with that objective instead of its config's (eps: the
  config's linear schedule, T=300; edm: EDM's preconditioning, loss weight and noise levels), so that one
  bench shows what the objective buys on MNIST.
  Both keep a checkpoint at every epoch boundary; each --epochs row evaluates that checkpoint. Wall time
  runs from process start (imports, data loading, compilation) to the moment the epoch's checkpoint was
  written; img/s = training images seen / that wall time.
- quickstart: ``python -m jobs.train`` with no config (the embedded quick-start), timed from process start
  to exit (its end-of-run samples included); its quality is that of its own final γ=5 samples, read back
  from its samples.h5, and of the γ=5 samples that the evaluation job draws again with its defaults,
  ``python -m jobs.evaluate RUN --only grids,metrics --guidance 5 --per-class 20 [--seed S]``, for its
  default seed and --redraws more (the worst and the mean of them are shown).

Quality: every recipe/ours checkpoint is scored by the same command, ``python -m jobs.evaluate RUN
--checkpoint STEP --only grids,metrics --guidance 1,5 --sampler dpmpp_2m --steps 25 --metric-samples N
--seed 0``, with one classifier (jobs.train_classifier): label accuracy at γ=1 and γ=5 and feature-FID at
γ=5 (DPM-Solver++ fits every generative objective; docs/QUALITY.md shows that it matches DDIM-100 there).
``--judge`` re-scores the γ=5 samples with a second classifier (another --seed of jobs.train_classifier), so
that no verdict rests on one classifier. ``--seed`` is the training seed (train.seed) of recipe and ours;
sampling always uses seed 0.
Feature-FID shrinks with the number of samples, so compare rows with the same n only.
--quick: D=8 nets, 2 steps per "epoch", 20 samples with 5 sampler steps: it checks that every path runs,
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

if __package__ in (None, ""):  # run as a file: python bench/quality.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench import common, scoring

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"recipe": ROOT / "configs" / "recipes" / "cs180_mnist.yaml", "ours": ROOT / "configs" / "mnist.yaml"}
MNIST_TRAIN_IMAGES = 60_000
QUICK = ["model.hidden=8", "log.every=1"]
# --objective: the ours row with this objective; both sample their end-of-run images the same way.
OBJECTIVES = {"eps": ["diffusion.objective=eps", "diffusion.schedule=linear", "diffusion.T=300",
                      "diffusion.beta_start=0.0001", "diffusion.beta_end=0.02"],
              "edm": ["diffusion.objective=edm"]}
SAME_SAMPLER = ["sample.sampler=dpmpp_2m", "sample.steps=25"]


def run_job(cmd: list[str], log: Path) -> float:
    """Run one job in a fresh process (the way a user starts it); returns its wall time. Output goes to log."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    t0 = time.time()
    with open(log, "w") as out:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        tail = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"{' '.join(cmd[2:4])} exited {proc.returncode}: {tail[0][:200]} (log: {log})")
    return t0


def train(args, which: str, work: Path) -> tuple[Path, float, dict]:
    """Train config ``which`` for max(--epochs) epochs with a kept checkpoint at every epoch boundary.
    Returns (run dir, process start time, resolved config as a dict)."""
    from ddpm.config import load_config

    base = [f"data.root={args.data_root}", f"train.device={args.device}", "log.progress=lines",
            "log.tensorboard=false", f"train.seed={args.seed}", *(QUICK if args.quick else [])]
    if which == "ours" and args.objective:
        base += [*OBJECTIVES[args.objective], *SAME_SAMPLER]
    cfg = load_config(CONFIGS[which], base)
    per_epoch = 2 if args.quick else MNIST_TRAIN_IMAGES // cfg.train.batch_size
    length = [f"train.steps={per_epoch * max(args.epochs)}"] if args.quick else [f"train.epochs={max(args.epochs)}"]
    extra = [*length, f"checkpoint.every={per_epoch}", f"checkpoint.keep_every={per_epoch}"]
    if args.quick:
        extra += ["sample.sampler=dpmpp_2m", "sample.steps=5", "sample.per_class=1"]
    run_dir = work / which
    t0 = run_job([sys.executable, "-m", "jobs.train", "--config", str(CONFIGS[which]), *base, *extra,
                  "--run-dir", str(run_dir)], work / f"{which}-train.log")
    cfg = json.loads((run_dir / "config.json").read_text())
    cfg["per_epoch"] = per_epoch
    return run_dir, t0, cfg


def evaluate(args, run_dir: Path, step: int, work: Path) -> dict:
    """The evaluation job's guidance rows {scale: row} and its γ=5 grid for checkpoint ``step``."""
    steps = "5" if args.quick else "25"
    cmd = [sys.executable, "-m", "jobs.evaluate", str(run_dir), "--checkpoint", str(step), "--only", "grids,metrics",
           "--guidance", "1,5", "--convention", "gamma", "--sampler", "dpmpp_2m", "--steps", steps,
           "--metric-samples", str(args.samples), "--seed", "0", "--device", args.device,
           "--classifier", str(args.classifier)]
    run_job(cmd, work / f"{run_dir.name}-eval-{step}.log")
    out = run_dir / "eval" / f"step_{step:09d}"
    m = json.loads((out / "metrics.json").read_text())
    rows = {r["scale"]: r for r in m["sections"]["guidance"]["rows"]}
    judged = scoring.score_group(args.judge, "mnist", args.data_root, run_dir / "samples.h5", rows[5.0]["group"]) \
        if args.judge else {"accuracy": None, "feature_fid": None}
    return {"rows": rows, "judge": judged, "grid": out / "samples_gamma_5.png"}


def checkpoint_time(run_dir: Path, step: int) -> float:
    """When checkpoint ``step`` was complete (its state file's mtime)."""
    return (run_dir / "checkpoints" / f"step_{step:09d}" / "state.pt").stat().st_mtime


def quickstart(args, work: Path) -> dict:
    """The embedded quick-start as a user runs it; quality of its own final γ=5 samples."""
    from ddpm.run import samples as archive

    run_dir = work / "quickstart"
    extra = [*QUICK, "train.steps=4", "sample.steps=5", "sample.per_class=2"] if args.quick else []
    t0 = run_job([sys.executable, "-m", "jobs.train", f"data.root={args.data_root}", f"train.device={args.device}",
                  "log.progress=lines", *extra, "--run-dir", str(run_dir)], work / "quickstart-train.log")
    wall = time.time() - t0
    groups = [g for g in archive.list_groups(run_dir / "samples.h5") if g.endswith("/gamma_5")]
    images, labels, _ = archive.read_samples(run_dir / "samples.h5", groups[-1])
    own = scoring.score_images(args.classifier, "mnist", args.data_root, images, labels, args.device)
    cfg = json.loads((run_dir / "config.json").read_text())
    steps = int(groups[-1].split("/")[1][len("step_"):])
    grid = sorted((run_dir / "samples").glob(f"step_{steps:09d}_gamma_5.png"))
    redrawn = []
    for seed in [None, *range(args.redraws)]:  # the evaluation job's defaults, then other seeds
        cmd = [sys.executable, "-m", "jobs.evaluate", str(run_dir), "--only", "grids,metrics", "--guidance", "5",
               "--per-class", "2" if args.quick else "20", "--device", args.device, "--classifier", str(args.classifier),
               *([] if seed is None else ["--seed", str(seed)])]
        run_job(cmd, work / f"quickstart-eval-{seed}.log")
        m = json.loads((run_dir / "eval" / f"step_{steps:09d}" / "metrics.json").read_text())
        redrawn.append(m["sections"]["guidance"]["rows"][0]["accuracy"])
    return {"wall": wall, "images": steps * cfg["train"]["batch_size"], "n": len(images), "redrawn": redrawn,
            "accuracy": own["accuracy"], "fid": own["feature_fid"],
            "config": f"D={cfg['model']['hidden']} b{cfg['train']['batch_size']}, {steps} steps, "
                      f"{cfg['sample']['sampler']} {cfg['sample']['steps']}", "grid": grid[0] if grid else None}


def shown(args, path) -> str:
    return str(path) if args.keep and path else "- (use --keep)"


def fmt(v, digits=3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu",
                   help="default: cuda when available")
    p.add_argument("--quick", action="store_true", help="smoke sizes: checks every path, numbers mean nothing")
    p.add_argument("--epochs", default="1,3", metavar="E,E", help="epochs to compare at (default: 1,3)")
    p.add_argument("--which", default="recipe,ours,quickstart", metavar="ROWS",
                   help="comma-separated rows: recipe, ours, quickstart (default: all)")
    p.add_argument("--data-root", default="data", metavar="DIR", help="torchvision root holding MNIST/raw")
    p.add_argument("--classifier", metavar="PATH",
                   help="MNIST classifier of jobs.train_classifier (default: DATA_ROOT/classifiers/mnist_cnn.pt)")
    p.add_argument("--judge", metavar="PATH", help="a second MNIST classifier (jobs.train_classifier --seed 1) that "
                                                   "re-scores the γ=5 samples (default: none)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="training seed of recipe and ours (default: 0)")
    p.add_argument("--objective", choices=tuple(OBJECTIVES),
                   help="train ours with this objective instead of configs/mnist.yaml's (default: the config's)")
    p.add_argument("--samples", type=int, metavar="N", help="samples per guidance scale (default: 300; --quick 20)")
    p.add_argument("--keep", metavar="DIR", help="write the runs, logs and grids to DIR (new) and keep them")
    p.add_argument("--redraws", type=int, metavar="K", help="seeds of the quick-start's re-drawn samples besides "
                                                            "the evaluation's default (default: 4; --quick 1)")
    args = p.parse_args()
    args.redraws = (1 if args.quick else 4) if args.redraws is None else args.redraws
    try:
        args.epochs = sorted({int(e) for e in args.epochs.split(",")})
    except ValueError:
        p.error(f"--epochs {args.epochs!r} is not a comma-separated list of whole numbers, e.g. 1,3")
    if args.epochs[0] < 1:
        p.error("--epochs must be >= 1")
    args.which = [w.strip() for w in args.which.split(",") if w.strip()]
    if not args.which or set(args.which) - {"recipe", "ours", "quickstart"}:
        p.error(f"--which takes recipe, ours, quickstart; got {','.join(args.which) or 'nothing'}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available; use --device cpu")
    args.samples = args.samples or (20 if args.quick else 300)
    if args.samples < 10:
        p.error(f"--samples must be >= 10 (one per class), got {args.samples}")
    if not (Path(args.data_root) / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        p.error(f"MNIST not found in {args.data_root}/MNIST/raw: run 'python -m jobs.prepare_data --dataset mnist "
                f"--root {args.data_root}' or pass --data-root")
    args.data_root = str(Path(args.data_root).resolve())
    args.classifier = Path(args.classifier or Path(args.data_root) / "classifiers" / "mnist_cnn.pt").resolve()
    if not args.classifier.is_file():
        p.error(f"no MNIST classifier at {args.classifier}: train one with 'python -m jobs.train_classifier "
                f"--dataset mnist --root {args.data_root}' or pass --classifier")
    if args.judge:
        args.judge = Path(args.judge).resolve()
        if not args.judge.is_file():
            p.error(f"--judge {args.judge}: no such file; train one with 'python -m jobs.train_classifier --dataset "
                    f"mnist --root {args.data_root} --seed 1 --out PATH'")
    if args.keep and Path(args.keep).exists():
        p.error(f"--keep {args.keep} already exists; name a new directory")

    common.header("ddpm-hpc sample quality per epoch: the course recipe vs configs/mnist.yaml, and the quick-start",
                  argparse.Namespace(device=torch.device(args.device), quick=args.quick), None)
    cols = ["row", "epochs", "steps x batch", "wall s", "img/s", "acc γ=1", "acc γ=5", "feature-FID γ=5",
            "acc γ=5 (judge 2)", "feature-FID γ=5 (judge 2)", "n", "grid γ=5"]
    label = {"recipe": f"recipe: {CONFIGS['recipe'].relative_to(ROOT)}",
             "ours": f"ours: {CONFIGS['ours'].relative_to(ROOT)}"
                     + (f" (objective {args.objective})" if args.objective else "")}
    lines, failed = [], False
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep).resolve() if args.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for which in [w for w in ("recipe", "ours") if w in args.which]:
            try:
                run_dir, t0, cfg = train(args, which, work)
                batch, per_epoch = cfg["train"]["batch_size"], cfg["per_epoch"]
                for e in args.epochs:
                    step = e * per_epoch
                    wall = checkpoint_time(run_dir, step) - t0
                    ev = evaluate(args, run_dir, step, work)
                    r1, r5, j = ev["rows"][1.0], ev["rows"][5.0], ev["judge"]
                    lines.append([label[which], e, f"{step} x {batch}", f"{wall:.0f}",
                                  common.fmt_rate(step * batch / wall), fmt(r1["accuracy"]), fmt(r5["accuracy"]),
                                  fmt(r5["feature_fid"], 1), fmt(j["accuracy"]), fmt(j["feature_fid"], 1), r5["n"],
                                  shown(args, ev["grid"])])
                    print(f"  done: {which}, {e} epoch(s): accuracy γ=5 {fmt(r5['accuracy'])}", flush=True)
            except Exception as e:  # one broken row must not hide the others
                failed = True
                lines.append([which, *["-"] * 10, f"FAILED: {' '.join(str(e).split())[:200]}"])
        if "quickstart" in args.which:
            try:
                q = quickstart(args, work)
                lines.append(["quickstart: python -m jobs.train", "-", q["config"], f"{q['wall']:.0f}",
                              common.fmt_rate(q["images"] / q["wall"]), "-", fmt(q["accuracy"]), fmt(q["fid"], 1),
                              "-", "-", q["n"], shown(args, q["grid"])])
                r = q["redrawn"]
                lines.append([f"quickstart re-drawn by jobs.evaluate ({len(r)} seeds): worst / mean", "-", "-", "-", "-",
                              "-", f"{fmt(min(r))} / {fmt(sum(r) / len(r))}", "-", "-", "-", q["n"], "-"])
                print(f"  done: quickstart in {q['wall']:.0f} s: accuracy γ=5 {fmt(q['accuracy'])}, re-drawn "
                      f"{', '.join(fmt(a) for a in r)}", flush=True)
            except Exception as e:
                failed = True
                lines.append(["quickstart", *["-"] * 10, f"FAILED: {' '.join(str(e).split())[:200]}"])
        print()
        common.print_markdown(cols, lines)
        print("\nwall s: from process start to the epoch's checkpoint (quick-start: to exit, final samples included). "
              "Accuracy: fraction of samples the classifier assigns to the requested class; "
              f"classifier {args.classifier}" + (f"; judge 2 {args.judge}." if args.judge else "."))
        if args.keep:
            print(f"runs, logs and grids kept in {work}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
