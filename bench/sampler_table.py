"""Sampler steps against quality on one trained checkpoint: DPM-Solver++(2M) at 10, 15, 25 and 50 network
evaluations against DDIM with 50 and 100 steps and DDPM with all T steps.

    python -m bench.sampler_table RUN [--checkpoint STEP] [--guidance 1 --convention w] [--samples 500]
                                      [--seeds 0,1] [--rows dpmpp_2m:10,...,ddim:100,ddpm] --classifier C1
                                      --judge C2 [--keep DIR]

Every row is one ``python -m jobs.evaluate RUN --checkpoint STEP --only metrics --guidance G --convention C
--sampler S --steps N --metric-samples n --seed s --classifier C1`` (one thread), the same samples scored
again by a second classifier C2 (bench/scoring.py), for every seed: the spread between seeds is the noise
that "matches within noise" is measured against. NFE: network evaluations per sample (a guided pair in one
batched forward counts once). Ratios: feature-FID over DDIM-100's, same seed and judge. x0 clipping as the
run's config says (sample.clip_x0).
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: python bench/sampler_table.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common, cpu_budget, scoring

DEFAULT_ROWS = "dpmpp_2m:10,dpmpp_2m:15,dpmpp_2m:25,dpmpp_2m:50,ddim:50,ddim:100,ddpm"


def run_row(args, sampler: str, steps: int | None, seed: int) -> dict:
    key = f"{sampler}{steps or ''}-seed{seed}"
    out = args.work / f"{key}.json"
    if out.is_file():
        return json.loads(out.read_text())
    cmd = [sys.executable, "-m", "jobs.evaluate", str(args.run), "--checkpoint", str(args.checkpoint), "--only",
           "metrics", "--guidance", f"{args.guidance:g}", "--convention", args.convention, "--sampler", sampler,
           "--metric-samples", str(args.samples), "--seed", str(seed), "--device", "cpu",
           "--classifier", str(args.classifier), *(["--steps", str(steps)] if steps else [])]
    t0 = time.time()
    w = cpu_budget.Watched(cmd, args.work / f"{key}.log")
    wall = time.time() - t0
    m = json.loads((args.run / "eval" / f"step_{m_step(args):09d}" / "metrics.json").read_text())
    r = m["sections"]["guidance"]["rows"][0]
    second = scoring.score_group(args.judge, args.dataset, args.data_root, args.run / "samples.h5", r["group"])
    from ddpm.diffusion.from_config import network_evaluations
    row = {"sampler": sampler, "steps": m["sampler"]["steps"], "seed": seed, "n": r["n"],
           "nfe": network_evaluations(sampler, m["sampler"]["steps"]), "sampling_s": r["wall_s"],
           "cpu_s": w.cpu_total, "wall_s": wall, "accuracy": r["accuracy"], "feature_fid": r["feature_fid"],
           "accuracy_2": second["accuracy"], "feature_fid_2": second["feature_fid"]}
    out.write_text(json.dumps(row, indent=1) + "\n")
    return row


def m_step(args) -> int:
    if args.checkpoint == "latest":
        return int((args.run / "checkpoints" / "latest").read_text().strip().split("_")[-1])
    return int(args.checkpoint)


def fmt(v, digits=3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sampler_table", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a run dir (trained by jobs.train)")
    p.add_argument("--checkpoint", default="latest", help="checkpoint step (default: latest)")
    p.add_argument("--guidance", type=float, default=1.0, help="one guidance scale (default: 1)")
    p.add_argument("--convention", default="w", choices=("gamma", "w"))
    p.add_argument("--samples", type=int, default=500, help="samples per row (default: 500)")
    p.add_argument("--seeds", default="0,1", help="sampling seeds (default: 0,1)")
    p.add_argument("--rows", default=DEFAULT_ROWS, help=f"sampler:steps,... (ddpm: all T) (default: {DEFAULT_ROWS})")
    p.add_argument("--classifier", required=True, help="classifier 1 (the evaluation's)")
    p.add_argument("--judge", required=True, help="classifier 2 (another seed of jobs.train_classifier)")
    p.add_argument("--keep", required=True, metavar="DIR", help="results and logs (an existing DIR is resumed)")
    args = p.parse_args()
    args.run, args.work = Path(args.run).resolve(), Path(args.keep).resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((args.run / "config.json").read_text())
    args.dataset, args.data_root = cfg["data"]["dataset"], cfg["data"]["root"]
    rows = [(r.split(":")[0], int(r.split(":")[1]) if ":" in r else None) for r in args.rows.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    import torch
    common.header(f"ddpm-hpc sampler steps vs quality: {args.run} checkpoint {args.checkpoint}, "
                  f"{args.convention}={args.guidance:g}", argparse.Namespace(device=torch.device("cpu"), quick=False), None)
    results = {}
    for seed in seeds:
        for sampler, steps in rows:
            results[(sampler, steps, seed)] = run_row(args, sampler, steps, seed)
            print(f"  done: {sampler} {steps or 'T'} seed {seed}", flush=True)
    lines = []
    for (sampler, steps, seed), r in results.items():
        ref = results.get(("ddim", 100, seed))
        lines.append([sampler, r["steps"], r["nfe"], seed, r["n"], f"{r['sampling_s']:.0f}", fmt(r["accuracy"]),
                      fmt(r["feature_fid"], 2), f"{r['feature_fid'] / ref['feature_fid']:.2f}x" if ref else "-",
                      fmt(r["accuracy_2"]), fmt(r["feature_fid_2"], 2)])
    common.print_markdown(["sampler", "steps", "NFE", "seed", "n", "sampling s", "accuracy", "feature-FID",
                           "vs DDIM-100", "accuracy (judge 2)", "feature-FID (judge 2)"], lines)
    print()
    summary = []
    for sampler, steps in rows:
        rs = [results[(sampler, steps, s)] for s in seeds]
        for judge in ("", "_2"):
            f = [r["feature_fid" + judge] for r in rs]
            a = [r["accuracy" + judge] for r in rs]
            summary.append([sampler, rs[0]["steps"], rs[0]["nfe"], "2" if judge else "1",
                            f"{sum(a) / len(a):.3f} ± {(max(a) - min(a)) / 2:.3f}",
                            f"{sum(f) / len(f):.2f} ± {(max(f) - min(f)) / 2:.2f}"])
    print(f"mean ± half the range over seeds {args.seeds}")
    common.print_markdown(["sampler", "steps", "NFE", "judge", "accuracy", "feature-FID"], summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
