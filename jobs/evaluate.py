"""Evaluate a trained run post hoc: figures, sample metrics, archived samples and a report.

Writes RUN_DIR/eval/step_XXXXXXXXX/ (PNG/GIF figures, metrics.json, report.md) and adds the samples to
RUN_DIR/samples.h5 under eval/step_XXXXXXXXX/<convention>_<scale>. Defaults come from the run's config
(sample.guidance, convention, sampler/steps, per_class, seed, ema). On a CPU a config sampler of ddpm (all T
steps) becomes ddim with --fast-steps steps unless --sampler ddpm is given. Progression and interpolation
decode deterministically (DDIM, or the objective's own sampler) with --fast-steps steps; single-scale figures
use the median of the guidance list. Label accuracy and feature-FID need the classifier of
jobs.train_classifier (DATA_ROOT/classifiers/ by default; without it they are skipped with a warning).
Inception FID, IS, KID and precision/recall (torch-fidelity, against the training split) need
--inception-weights. --fid-samples N adds the paper-scale part: N samples per guidance scale, made like
jobs.sample (sharded over every rank of torchrun or srun, resumable, in RUN_DIR/samples/), then scored.
--classifier-guidance RUN (a noisy-classifier run) adds classifier guidance at each --cg-scale, compared with
the classifier-free sweep at matched label accuracy; --mix sets the class mixture of the mixture part.
Bad input: a one-line 'error: ...' and exit status 2, with nothing written. Exit status 75: stopped by
SIGUSR2/SIGTERM while making the --fid-samples shards (rerun or requeue to finish; shards are kept).
"""
import argparse
import dataclasses
import re
import sys

from ddpm.errors import BAD_INPUT_EXIT_CODE, UserError
from ddpm.evaluate.fidelity import WEIGHTS_URL
from ddpm.evaluate.parts import PARTS, run_parts
from ddpm.evaluate.plan import DEFAULT_CG_SCALES, EvaluationArgs, plan_evaluation
from jobs.cli import Parser

EXAMPLES = f"""parts (--only, comma-separated): {', '.join(PARTS)}
  generative runs: all but denoiser (mixture: class-conditional runs; fid only with --fid-samples, cg only with
  --classifier-guidance); one-step denoisers: curves, denoiser; noisy classifiers: curves, metrics

examples:
  python -m jobs.evaluate runs/00003-mnist-cond-cfg-b512
  python -m jobs.evaluate RUN --guidance -1,0,1,3 --convention w --per-class 4 --checkpoint best
  python -m jobs.evaluate RUN --convention w --guidance 0,0.5,1,2,3 --sampler ddim --steps 50
  python -m jobs.evaluate RUN --checkpoint 5000 --no-ema --only grids,real,curves
  python -m jobs.evaluate RUN --classifier-guidance runs/noisy-clf --cg-scale 1,3,10 --only cg
  python -m jobs.evaluate RUN --mix 3:2,8:2 --only mixture
  python -m jobs.evaluate RUN --device cuda --sampler ddpm --metric-samples 5000 --export-npz samples.npz
  torchrun --nproc_per_node 4 -m jobs.evaluate RUN --guidance 3 --convention w --sampler ddim --steps 50 \\
      --fid-samples 50000 --inception-weights ~/weights/weights-inception-2015-12-05-6726825d.pth
  sbatch --ntasks-per-node 4 --gpus-per-node 4 slurm/evaluate.sh RUN --fid-samples 50000 --inception-weights W
  the Inception weights, once, on a machine with internet (compute nodes need none): wget {WEIGHTS_URL}

cost with the defaults on 2 CPU cores, configs/mnist.yaml (D=64 CS180 UNet, T=300, guidance 1,5): about
5 minutes; the steps table (DDPM 300 steps + DDIM, DPM-Solver++) ~2 min. Skip parts with --only, or --device cuda.
"""
NUMBER_LISTS = ("--guidance", "--cg-scale")  # their values may start with "-", which argparse reads as an option


def _negative_lists(argv: list) -> list:
    """'--guidance -1,0,1' → '--guidance=-1,0,1': argparse takes a value starting with '-' for an option."""
    out = []
    for item in argv:
        if out and out[-1] in NUMBER_LISTS and re.match(r"-[\d.]", item):
            out[-1] = f"{out[-1]}={item}"
        else:
            out.append(item)
    return out


def parse_args(argv=None):
    p = Parser(prog="python -m jobs.evaluate", description=__doc__, epilog=EXAMPLES,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("run_dir", metavar="RUN_DIR", help="run directory written by jobs.train")
    add("--checkpoint", default="latest", metavar="WHICH", help="latest (default), best (the lowest held-out loss, "
        "runs with checkpoint.best), a step number, or a checkpoint dir / state.pt path")
    add("--ema", action=argparse.BooleanOptionalAction, default=None,
        help="use the EMA weights (default: sample.ema of the config, if the checkpoint has them)")
    add("--guidance", metavar="LIST", help="comma-separated guidance scales, e.g. 0,1,3,5,7,10,15 or -1,0,1 "
                                           "(default: sample.guidance)")
    add("--convention", metavar="gamma|w", help="guidance convention: gamma: eps_u + g (eps_c - eps_u); "
                                                "w: (1 + w) eps_c - w eps_u (default: sample.convention)")
    add("--sampler", metavar="NAME", help="ddpm, ddim, dpmpp_2m (eps/x0/v runs), euler, heun, dpmpp_2m (rectified "
                                          "flow), dpmpp_2m (edm)")
    add("--clip-x0", action=argparse.BooleanOptionalAction, default=None,
        help="clip the predicted x0 to [-1, 1] at every ddpm/ddim/dpmpp_2m step (default: sample.clip_x0)")
    add("--steps", type=int, metavar="N", help="sampling steps (ddim, dpmpp_2m <= T; ddpm always runs T)")
    add("--eta", type=float, metavar="E", help="DDIM's stochasticity in [0, 1]: 0 deterministic, 1 as DDPM "
                                               "(default: sample.eta)")
    add("--per-class", type=int, metavar="K", help="samples per class in the grids (default: sample.per_class)")
    add("--seed", type=int, metavar="S", help="seed of the sampling noise (default: sample.seed)")
    add("--device", metavar="cpu|cuda", help="default: cuda (cuda:LOCAL_RANK) if available, else cpu")
    add("--only", metavar="PARTS", help="run only these parts (see below); default: all that apply")
    add("--classifier", metavar="PATH", help="classifier from jobs.train_classifier (default: "
                                             "DATA_ROOT/classifiers/DATASET_cnn.pt)")
    add("--classifier-guidance", metavar="RUN_DIR", help="a noisy-classifier run (configs/recipes/noisy_classifier_"
        "mnist.yaml, this run's schedule): adds classifier guidance compared with classifier-free guidance")
    add("--cg-scale", dest="cg_scales", metavar="LIST",
        help=f"classifier-guidance scales, e.g. 0,1,3 (default: {DEFAULT_CG_SCALES}; 0: unguided)")
    add("--mix", metavar="C:W,...", help="the mixture part's classes and weights, e.g. 3:2,8:2 or cat:1,dog:1 "
                                         "(eps_u + sum w_i (eps_ci - eps_u); default: classes 3 and 8 at γ/2)")
    add("--inception-weights", metavar="PATH", help="torch-fidelity's InceptionV3 weights file: adds Inception FID, "
        "IS, KID, precision/recall against the training split (nothing is downloaded)")
    add("--fid-samples", type=int, metavar="N", help="also score N samples per guidance scale (e.g. 50000, as papers "
                                                     "report FID), made on every rank like jobs.sample; resumable")
    add("--export-npz", metavar="PATH", help="also write this evaluation's samples as arr_0 (images) / arr_1 "
                                             "(labels) npz; must not exist yet")
    add("--metric-samples", type=int, default=100, metavar="N", help="samples per guidance scale for accuracy/FID, "
        "rounded up to whole classes; test images for denoiser and noisy-classifier runs (default: 100)")
    add("--table-samples", type=int, default=20, metavar="N",
        help="samples per row of the steps table and per column of the mixture sweep (default: 20)")
    add("--fast-steps", type=int, default=20, metavar="N",
        help="steps of the fast sampler for progression and interpolation (default: 20)")
    add("--reference-images", type=int, metavar="N",
        help="training images for the Inception reference (default: all; cached next to the data)")
    return p.parse_args(_negative_lists(list(sys.argv[1:] if argv is None else argv)))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        a = parse_args(argv)
    except SystemExit as e:  # --help (0) or a malformed option (2), also when called in-process
        return e.code
    from ddpm.evaluate.sample_sets import RankGroup, make_samples, sampling_model
    from ddpm.train import dist
    from ddpm.train.preempt import PreemptionHandler

    info, log = None, lambda s: print(s, flush=True)
    try:
        info = dist.init_distributed("cpu" if a.device == "cpu" else "auto")
        typed = {f.name: getattr(a, f.name) for f in dataclasses.fields(EvaluationArgs)}
        ev = plan_evaluation(EvaluationArgs(**{**typed, "device": a.device or info.device.type}))  # writes nothing
        if ev.fid_sets:
            model = sampling_model(ev.run)  # compiled once for every scale
            with PreemptionHandler() as preempt:  # only while shards are made: they are what a rerun keeps
                ranks = RankGroup(info.rank, info.world_size, dist.barrier, lambda: preempt.requested)
                for samples in ev.fid_sets:
                    if rc := make_samples(samples, ranks, log=log, model=model):
                        return rc
        if info.is_main:
            run_parts(ev, argv, log=log)
    except UserError as e:
        if info is None or info.is_main:
            print(f"error: {e}", file=sys.stderr)
        return BAD_INPUT_EXIT_CODE
    finally:
        dist.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
