"""CIFAR-10 quality per compute: the DDPM paper's recipe, diffusers' example recipe and ours, at equal CPU budgets.

    python -m bench.cifar_quality [--budgets 10,20,40] [--seeds 0,1] [--recipes ddpm,diffusers,ours] [--ablations]
                                  [--samples 500] [--score-at MIN,MIN] [--nfe 25] [--per-class 8]
                                  [--keep DIR | --reuse DIR] [--quick] [--data-root DIR]

Every row trains on the real CIFAR-10 subset (../shared/data/cifar10) with the same small net (SMALL: the
cifar_unet at base 32, levels 32/64/64, one residual block per level, attention at 16x16: the width of
configs/cifar10.yaml's on_cpu section) and the same CPU budget (bench/cpu_budget.py: one thread per run,
budgets in CPU minutes from a probe of each recipe, the CPU time actually spent reported per checkpoint):
- ddpm: ``configs/recipes/ddpm_cifar10.yaml`` (Ho et al. 2020: eps, linear T = 1000, uniform t, Adam 2e-4 with
  5,000 warm-up steps, batch 128, dropout 0.1, EMA 0.9999, x0 clipping).
- diffusers: the same file with diffusers' ``examples/unconditional_image_generation/train_unconditional.py``
  settings as its README runs it (batch 16, AdamW 1e-4 with betas 0.95/0.999 and weight decay 1e-6, cosine
  decay over the run after 500 warm-up steps, ``--use_ema`` with max decay 0.9999, gradient clipping at 1,
  UNet2DModel's dropout 0, DDPMScheduler's x0 clipping), class-conditional the same way as ours.
- ours: ``configs/cifar10.yaml`` exactly as a user runs it on a CPU (its on_cpu section).
A recipe whose schedules do not depend on the run length (constant learning rate after warm-up: ddpm, ours)
trains once per seed with a kept checkpoint at every budget; diffusers' cosine decay is set by the run
length, so it trains once per budget. --ablations adds the steps from ddpm to ours (LADDER) and ours with each of
EDM's three parts taken out (bench/edm_parts.py), at the middle budget and the first seed.

Every checkpoint is scored by the same command: ``python -m jobs.evaluate RUN --checkpoint STEP --only
grids,metrics --guidance 0,1,3 --convention w --sampler dpmpp_2m --steps 25 --metric-samples N --seed SEED``
with classifier 1 (jobs.train_classifier --seed 0); its archived samples are scored again by classifier 2
(--seed 1, bench/scoring.py). Seed s trains with train.seed=s and samples with --seed s. Label accuracy:
the fraction the classifier assigns to the requested class (chance 0.10); feature-FID: Fréchet distance of
the classifier's features to the test split's (it shrinks with n: compare equal n only). Subset numbers are
not comparable with full-data ones.
--keep DIR: work in DIR (new) and keep it; --reuse DIR: go on in the DIR of an earlier --keep, skipping the
probes, trainings and evaluations already done there (several processes may share it, each with other
--recipes/--seeds). --quick: a tiny net and budget, 20 samples, 3 sampler steps: it checks every path.
"""
import argparse
import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a file: python bench/cifar_quality.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common, cpu_budget, edm_parts, scoring

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["model.base=32", "model.ch_mult=[1,2,2]", "model.num_res_blocks=1", "model.attn_resolutions=[16]"]
QUICK = ["model.base=16", "model.num_groups=8", "model.ch_mult=[1,2]", "model.num_res_blocks=1", "train.batch_size=8"]
DIFFUSERS = ["model.dropout=0.0", "train.batch_size=16", "train.optimizer=adamw", "train.lr=1e-4",
             "train.betas=[0.95,0.999]", "train.weight_decay=1e-6", "train.lr_schedule=cosine", "train.warmup_steps=500",
             "train.ema_decay=0.9999", "train.grad_clip=1.0"]
GUIDANCE = (0.0, 1.0, 3.0)
PAPER = ROOT / "configs" / "recipes" / "ddpm_cifar10.yaml"
OURS = ROOT / "configs" / "cifar10.yaml"


@dataclass
class Recipe:
    label: str
    config: Path
    overrides: list = field(default_factory=list)
    nested: bool = True          # its schedules ignore the run length: one run, a checkpoint per budget
    ablation: bool = False       # a LADDER step or an EDM part: middle budget, first seed
    entry: tuple = ()            # ("bench.edm_parts",): its jobs run with bench/edm_parts.py's objectives registered
    probe_as: str = ""           # the recipe whose probe it shares (the same net, batch and dropout: the same cost per
                                 # step), so that rows compared at one budget train the same number of steps


RECIPES = {
    "ddpm": Recipe("DDPM paper (configs/recipes/ddpm_cifar10.yaml)", PAPER, SMALL),
    "diffusers": Recipe("diffusers train_unconditional, class-conditional", PAPER, SMALL + DIFFUSERS, nested=False),
    "ours": Recipe("ours (configs/cifar10.yaml, on_cpu)", OURS),
}
# From the paper's recipe to ours, one change at a time (--ablations); each adds to the previous one.
LADDER = [
    ("+lr", "+ lr 1e-3, 100 warm-up steps", ["train.lr=1e-3", "train.warmup_steps=100"]),
    ("+b32", "+ batch 32", ["train.batch_size=32"]),
    ("+drop0", "+ dropout 0", ["model.dropout=0.0"]),
]
for i, (name, label, extra) in enumerate(LADDER):
    RECIPES[f"ddpm{name}"] = Recipe(label, PAPER, SMALL + [o for _, _, e in LADDER[:i + 1] for o in e], ablation=True,
                                    probe_as="ours" if i == len(LADDER) - 1 else "")
# Ours with one of EDM's three parts put back as the DDPM paper has it (bench/edm_parts.py).
edm_parts.register()
for name, what in edm_parts.PARTS.items():
    RECIPES[name] = Recipe(f"ours with {what}", OURS, [f"diffusion.objective={name}"], ablation=True,
                           entry=("bench.edm_parts",), probe_as="ours")


def train_cmd(args, recipe: Recipe, run_dir: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", *recipe.entry, "jobs.train", "--config", str(recipe.config),
            f"data.root={args.data_root}", "train.device=cpu", "log.progress=lines", "log.tensorboard=false",
            *recipe.overrides, *(QUICK if args.quick else []), "sample.per_class=1", "sample.steps=3", *extra,
            "--run-dir", str(run_dir)]


def done(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def save(path: Path, value) -> dict:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=1, default=str) + "\n")
    os.replace(tmp, path)
    return value


def probe(args, name: str, recipe: Recipe) -> dict:
    """CPU seconds per optimizer step of ``recipe`` (a short run, 5 log intervals; bench/cpu_budget.py)."""
    out = args.work / "results" / f"probe-{name}.json"
    if done(out):
        return done(out)
    batch = 8 if args.quick else resolved(recipe, args)["train"]["batch_size"]
    every = max(2, (64 if args.quick else 512) // batch)
    run_dir = args.work / "probes" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    w = cpu_budget.Watched(train_cmd(args, recipe, run_dir, [f"train.steps={5 * every}", f"log.every={every}",
                                                             "train.warmup_steps=0"]),
                           args.work / "logs" / f"probe-{name}.log")
    per_step = cpu_budget.per_step_cpu(w, run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    return save(out, {"cpu_s_per_step": per_step, "batch": batch, "cpu_s_per_image": per_step / batch})


def resolved(recipe: Recipe, args) -> dict:
    from ddpm.config import load_config
    over = [f"data.root={args.data_root}", "train.device=cpu", *recipe.overrides, *(QUICK if args.quick else [])]
    return load_config(recipe.config, over, device="cpu").to_dict()


def train(args, name: str, recipe: Recipe, seed: int, budgets: list[float]) -> dict:
    """Train ``recipe`` with train.seed=seed for the budgets (CPU minutes); {budget: checkpoint row}."""
    out = args.work / "results" / f"train-{name}-seed{seed}-{'-'.join(f'{b:g}' for b in budgets)}.json"
    if done(out):
        return {float(k): v for k, v in done(out).items()}
    per_step = probe(args, recipe.probe_as or name, RECIPES.get(recipe.probe_as, recipe))["cpu_s_per_step"]
    steps = {b: max(1, round(60 * b / per_step)) for b in budgets}
    if recipe.nested:  # one checkpoint per budget: the budgets are multiples of the first
        first = steps[budgets[0]]
        steps = {b: first * round(b / budgets[0]) for b in budgets}
    run_dir = args.work / "runs" / out.stem[len("train-"):]
    shutil.rmtree(run_dir, ignore_errors=True)
    last = max(steps.values())
    w = cpu_budget.Watched(train_cmd(args, recipe, run_dir, [
        f"train.seed={seed}", f"train.steps={last}", f"log.every={max(1, min(steps.values()) // 10)}",
        f"checkpoint.every={min(steps.values())}", f"checkpoint.keep_every={min(steps.values())}",
        "checkpoint.keep_last=1"]), args.work / "logs" / f"{out.stem}.log")
    batch = json.loads((run_dir / "config.json").read_text())["train"]["batch_size"]
    rows = {b: {"run_dir": str(run_dir), "step": s, "batch": batch, "images": s * batch,
                "cpu_s": w.cpu_at(cpu_budget.checkpoint_time(run_dir, s)), "cpu_s_planned": 60 * b}
            for b, s in steps.items()}
    save(out, rows)
    return rows


def evaluate(args, key: str, ckpt: dict, seed: int, recipe: Recipe) -> dict:
    """The evaluation job's rows {w: row} for one checkpoint, classifier 2's scores added; the grid kept."""
    out = args.work / "results" / f"eval-{key}.json"
    if done(out):
        return {float(k): v for k, v in done(out).items()}
    run_dir, step = Path(ckpt["run_dir"]), ckpt["step"]
    cpu_budget.Watched([sys.executable, "-m", *recipe.entry, "jobs.evaluate", str(run_dir), "--checkpoint", str(step),
                        "--only", "grids,metrics", "--guidance", ",".join(f"{g:g}" for g in GUIDANCE),
                        "--convention", "w", "--sampler", "dpmpp_2m", "--steps", str(args.nfe),
                        "--metric-samples", str(args.samples), "--per-class", str(args.per_class), "--seed", str(seed),
                        "--device", "cpu", "--classifier", str(args.classifiers[0])],
                       args.work / "logs" / f"eval-{key}.log")
    ev = run_dir / "eval" / f"step_{step:09d}"
    m = json.loads((ev / "metrics.json").read_text())
    rows = {}
    for r in m["sections"]["guidance"]["rows"]:
        second = scoring.score_group(args.classifiers[1], "cifar10", args.data_root, run_dir / "samples.h5", r["group"])
        rows[r["scale"]] = {"n": r["n"], "accuracy": r["accuracy"], "feature_fid": r["feature_fid"],
                            "accuracy_2": second["accuracy"], "feature_fid_2": second["feature_fid"]}
    (args.work / "pictures").mkdir(exist_ok=True)
    shutil.copy(ev / "guidance_grid.png", args.work / "pictures" / f"{key}.png")
    return save(out, rows)


def ceiling(args) -> dict:
    """Training images scored as samples (the first n/10 per class): what a perfect generator would reach."""
    out = args.work / "results" / f"ceiling-n{args.samples}.json"
    if done(out):
        return done(out)
    import numpy as np
    import torch

    from ddpm.data.datasets import load_dataset
    images, labels = load_dataset("cifar10", args.data_root, train=True)
    idx = torch.cat([(labels == c).nonzero()[:args.samples // 10, 0] for c in range(10)])
    u8 = np.ascontiguousarray(images[idx].permute(0, 2, 3, 1).numpy())
    s = [scoring.score_images(c, "cifar10", args.data_root, u8, labels[idx]) for c in args.classifiers]
    return save(out, {"n": len(idx), "accuracy": s[0]["accuracy"], "feature_fid": s[0]["feature_fid"],
                      "accuracy_2": s[1]["accuracy"], "feature_fid_2": s[1]["feature_fid"]})


def classifiers(args) -> list[Path]:
    paths = []
    for seed in (0, 1):
        path = args.work / f"cifar10_cnn_seed{seed}.pt"
        if not path.is_file():
            cpu_budget.Watched([sys.executable, "-m", "jobs.train_classifier", "--dataset", "cifar10", "--root",
                                args.data_root, "--out", str(path), "--seed", str(seed), "--device", "cpu",
                                *(["--steps", "20"] if args.quick else [])], args.work / "logs" / f"classifier{seed}.log")
        paths.append(path)
    return paths


def fmt(v, digits=3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def report(args, results: dict) -> None:
    """The per-run table (ratios against the DDPM row of the same budget, seed and w) and the summary."""
    c = ceiling(args)
    cols = ["recipe", "budget CPU min", "seed", "steps x batch", "CPU s at ckpt", "w", "n", "label accuracy",
            "feature-FID", "vs DDPM", "accuracy (judge 2)", "feature-FID (judge 2)"]
    lines = [["training images (the ceiling)", "-", "-", "-", "-", "-", c["n"], fmt(c["accuracy"]),
              fmt(c["feature_fid"], 1), "-", fmt(c["accuracy_2"]), fmt(c["feature_fid_2"], 1)]]
    for (name, budget, seed), (ckpt, rows) in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        base = results.get(("ddpm", budget, seed))
        for w, r in sorted(rows.items()):
            ratio = f"{r['feature_fid'] / base[1][w]['feature_fid']:.2f}x" if base else "-"
            lines.append([f"{name}: {RECIPES[name].label}", f"{budget:g}", seed, f"{ckpt['step']} x {ckpt['batch']}",
                          f"{ckpt['cpu_s']:.0f}", f"{w:g}", r["n"], fmt(r["accuracy"]), fmt(r["feature_fid"], 1), ratio,
                          fmt(r["accuracy_2"]), fmt(r["feature_fid_2"], 1)])
    common.print_markdown(cols, lines)
    print()
    wins = []
    for budget in sorted({b for _, b, _ in results}):
        for w in GUIDANCE:
            cell = {}
            for name in ("ddpm", "diffusers", "ours"):
                rs = [rows[w] for (n, b, _), (_, rows) in results.items() if n == name and b == budget]
                if rs:
                    cell[name] = rs
            if "ours" not in cell or len(cell) < 2:
                continue
            for judge in ("", "_2"):
                worst = (min(r["accuracy" + judge] for r in cell["ours"]), max(r["feature_fid" + judge] for r in cell["ours"]))
                best = (max(r["accuracy" + judge] for n, rs in cell.items() if n != "ours" for r in rs),
                        min(r["feature_fid" + judge] for n, rs in cell.items() if n != "ours" for r in rs))
                spread = {m: max(max(r[m + judge] for r in rs) - min(r[m + judge] for r in rs) for rs in cell.values())
                          for m in ("accuracy", "feature_fid")}
                strict = worst[0] > best[0] and worst[1] < best[1]
                beyond = worst[0] - best[0] > spread["accuracy"] and best[1] - worst[1] > spread["feature_fid"]
                wins.append([f"{budget:g}", f"{w:g}", "2" if judge else "1", fmt(worst[0]), fmt(best[0]),
                             fmt(spread["accuracy"]), fmt(worst[1], 1), fmt(best[1], 1), fmt(spread["feature_fid"], 1),
                             "yes" if strict else "NO", "yes" if beyond else "NO"])
    if wins:
        print("Ours against the best baseline row (every seed): ours' worst seed vs the baselines' best seed; "
              "'beyond spread': both margins larger than the largest seed-to-seed spread of any recipe")
        common.print_markdown(["budget CPU min", "w", "judge", "ours worst acc", "best baseline acc",
                               "largest seed spread acc", "ours worst fFID", "best baseline fFID",
                               "largest seed spread fFID", "ours wins", "beyond spread"], wins)


def parse_args():
    p = argparse.ArgumentParser(prog="python -m bench.cifar_quality", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke sizes: checks every path, numbers mean nothing")
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data" / "cifar10"), metavar="DIR",
                   help="data root holding cifar-10-batches-py/ (default: ../shared/data/cifar10, the real subset)")
    p.add_argument("--budgets", metavar="MIN,MIN", help="CPU minutes per run, one thread (default 10,20,40; --quick 0.05,0.1)")
    p.add_argument("--seeds", default="0,1", metavar="S,S", help="training and sampling seeds (default: 0,1)")
    p.add_argument("--recipes", default="ddpm,diffusers,ours", metavar="R,R", help=f"of: {', '.join(RECIPES)}")
    p.add_argument("--ablations", action="store_true",
                   help="add the LADDER recipes and the EDM parts (middle budget, first seed)")
    p.add_argument("--samples", type=int, metavar="N", help="samples per guidance scale (default: 500; --quick 20)")
    p.add_argument("--per-class", type=int, default=8, metavar="K",
                   help="images per class and scale in each row's picture (default: 8)")
    p.add_argument("--score-at", metavar="MIN,MIN", help="score only these budgets (default: all): e.g. --samples 500 "
                   "at the largest budget, the rest scored by an earlier --samples 100 run")
    p.add_argument("--nfe", type=int, metavar="N", help="DPM-Solver++ evaluations per sample (default: 25; --quick 3)")
    p.add_argument("--keep", metavar="DIR", help="work in DIR (new) and keep it")
    p.add_argument("--reuse", metavar="DIR", help="go on in the DIR of an earlier --keep (done work is skipped)")
    args = p.parse_args()
    try:
        args.budgets = sorted(float(b) for b in (args.budgets or ("0.05,0.1" if args.quick else "10,20,40")).split(","))
        args.seeds = [int(s) for s in args.seeds.split(",")]
        args.score_at = [float(b) for b in args.score_at.split(",")] if args.score_at else None
    except ValueError:
        p.error("--budgets, --seeds and --score-at take comma-separated numbers, e.g. --budgets 10,20,40 --seeds 0,1")
    if args.score_at and not set(args.score_at) <= set(args.budgets):
        p.error(f"--score-at takes some of the --budgets ({','.join(f'{b:g}' for b in args.budgets)})")
    args.recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    if args.ablations:
        args.recipes += [r for r, rec in RECIPES.items() if rec.ablation and r not in args.recipes]
    if set(args.recipes) - set(RECIPES) or not args.recipes:
        p.error(f"--recipes takes some of {', '.join(RECIPES)}; got {','.join(args.recipes)}")
    if args.budgets[0] <= 0 or any(abs(b / args.budgets[0] - round(b / args.budgets[0])) > 1e-9 for b in args.budgets):
        p.error("--budgets must be positive multiples of the smallest (checkpoints of one run), e.g. 10,20,40")
    args.samples = args.samples or (20 if args.quick else 500)
    args.nfe = args.nfe or (3 if args.quick else 25)
    if args.samples < 10 or args.samples % 10:
        p.error(f"--samples must be a multiple of 10 (whole classes), got {args.samples}")
    if not (Path(args.data_root) / "cifar-10-batches-py" / "data_batch_1").is_file():
        p.error(f"CIFAR-10 not found in {args.data_root}/cifar-10-batches-py: run 'python -m jobs.prepare_data "
                f"--dataset cifar10 --root {args.data_root}' or pass --data-root")
    args.data_root = str(Path(args.data_root).resolve())
    if args.keep and args.reuse:
        p.error("--reuse DIR already names the work folder; drop --keep")
    if args.keep and Path(args.keep).exists():
        p.error(f"--keep {args.keep} already exists; name a new directory (or --reuse it)")
    if args.reuse and not (Path(args.reuse) / "results").is_dir():
        p.error(f"--reuse {args.reuse} is not the folder of an earlier --keep")
    return args


def main() -> int:
    args = parse_args()
    import torch
    common.header("ddpm-hpc CIFAR-10 quality per CPU budget: the DDPM paper's recipe, diffusers' example and ours",
                  argparse.Namespace(device=torch.device("cpu"), quick=args.quick), None)
    with tempfile.TemporaryDirectory() as tmp:
        args.work = Path(args.keep or args.reuse or tmp).resolve()
        for sub in ("results", "logs", "runs", "probes"):
            (args.work / sub).mkdir(parents=True, exist_ok=True)
        args.classifiers = classifiers(args)
        if not args.quick and resolved(RECIPES["ours"], args)["model"] != resolved(RECIPES["ddpm"], args)["model"] | {
                "dropout": resolved(RECIPES["ours"], args)["model"]["dropout"]}:
            raise SystemExit("error: configs/cifar10.yaml's on_cpu net is not SMALL: the rows would not compare")
        results, failed = {}, False
        middle = args.budgets[len(args.budgets) // 2]
        for seed in args.seeds:
            for name in args.recipes:
                recipe = RECIPES[name]
                if recipe.ablation and seed != args.seeds[0]:
                    continue
                budgets = [middle] if recipe.ablation else args.budgets
                try:
                    groups = [budgets] if recipe.nested else [[b] for b in budgets]
                    for group in groups:
                        for budget, ckpt in train(args, name, recipe, seed, group).items():
                            if args.score_at and budget not in args.score_at:
                                continue
                            key = f"{name}-{budget:g}min-seed{seed}-n{args.samples}-nfe{args.nfe}"
                            results[(name, budget, seed)] = (ckpt, evaluate(args, key, ckpt, seed, recipe))
                            print(f"  done: {key}", flush=True)
                except Exception as e:  # one broken recipe must not hide the others
                    failed = True
                    print(f"  FAILED: {name} seed {seed}: {' '.join(str(e).split())[:300]}", flush=True)
        print()
        report(args, results)
        for c in args.classifiers:
            print(f"classifier {c.name}: test accuracy {fmt(scoring.classifier_accuracy(c))}")
        if args.keep or args.reuse:
            print(f"runs, logs, results and pictures kept in {args.work}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
