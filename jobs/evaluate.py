"""Evaluate a trained run post hoc: figures, sample metrics, archived samples and a report.

Writes RUN_DIR/eval/step_XXXXXXXXX/ (PNG/GIF figures, metrics.json, report.md) and adds the samples to
RUN_DIR/samples.h5 under eval/step_XXXXXXXXX/<convention>_<scale>. Defaults come from the run's
config (sample.guidance, sample.convention, sample.sampler/steps, sample.per_class, sample.seed,
sample.ema). On a CPU a config sampler of ddpm (all T steps) becomes ddim with --fast-steps steps
unless --sampler ddpm is given. Progression and interpolation always decode with DDIM (Euler for
rectified flow) and --fast-steps steps; single-scale figures use the median of the guidance list.
Label accuracy and feature-FID need the classifier of jobs.train_classifier (found in
DATA_ROOT/classifiers/ by default; without it they are skipped with a warning). Inception FID, IS, KID
and precision/recall (torch-fidelity, against the training split) need --inception-weights.
--fid-samples N adds the paper-scale part: N samples per guidance scale, made like jobs.sample (sharded
over every rank of torchrun or srun, resumable, in RUN_DIR/samples/), then scored on rank 0.
Bad input: a one-line 'error: ...' and exit status 2, with nothing written. Exit status 75: stopped by
SIGUSR2/SIGTERM while making the --fid-samples shards (rerun or requeue to finish; shards are kept).
"""
import argparse
import sys

from ddpm.errors import BAD_INPUT_EXIT_CODE, UserError
from ddpm.evaluate.fidelity import WEIGHTS_URL
from ddpm.evaluate.parts import PARTS, run_parts
from ddpm.evaluate.plan import EvaluationArgs, plan_evaluation

EXAMPLES = f"""parts (--only, comma-separated): {', '.join(PARTS)}
  generative runs: all but denoiser (fid only with --fid-samples); one-step denoiser runs: curves, denoiser;
  noisy classifiers: curves, metrics (accuracy vs timestep)

examples:
  python -m jobs.evaluate runs/00003-mnist-cond-cfg-b512
  python -m jobs.evaluate RUN --guidance 0,1,3,5,7,10,15 --convention gamma --per-class 8
  python -m jobs.evaluate RUN --convention w --guidance 0,0.5,1,2,3 --sampler ddim --steps 50
  python -m jobs.evaluate RUN --checkpoint 5000 --no-ema --only grids,curves
  python -m jobs.evaluate RUN --device cuda --sampler ddpm --metric-samples 5000 --export-npz samples.npz
  torchrun --nproc_per_node 4 -m jobs.evaluate RUN --guidance 3 --convention w --sampler ddim --steps 50 \\
      --fid-samples 50000 --inception-weights ~/weights/weights-inception-2015-12-05-6726825d.pth
  sbatch --ntasks-per-node 4 --gpus-per-node 4 slurm/evaluate.sh RUN --fid-samples 50000 --inception-weights W
  the Inception weights, once, on a machine with internet (compute nodes need none):
    wget {WEIGHTS_URL}

cost with the defaults on 2 CPU cores, configs/mnist.yaml (D=64 CS180 UNet, T=300, guidance 1,5): about
4 minutes: the guided samples (100 per scale, ddim 20 steps) ~1.5 min, the steps table (20 samples, DDPM
300 steps + DDIM 10/20/50/100) ~2 min, the rest ~0.5 min. Skip parts with --only, or use --device cuda.
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit status 2, like every other bad input
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(BAD_INPUT_EXIT_CODE)


def parse_args(argv=None):
    p = _Parser(prog="python -m jobs.evaluate", description=__doc__, epilog=EXAMPLES,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory written by jobs.train")
    p.add_argument("--checkpoint", default="latest", metavar="WHICH",
                   help="latest (default), a step number, or a checkpoint dir / state.pt path")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                   help="use the EMA weights (default: sample.ema of the config, if the checkpoint has them)")
    p.add_argument("--guidance", metavar="LIST", help="comma-separated guidance scales, e.g. 0,1,3,5,7,10,15 "
                                                       "(default: sample.guidance)")
    p.add_argument("--convention", metavar="gamma|w", help="guidance convention: gamma: eps_u + g (eps_c - eps_u); "
                                                           "w: (1 + w) eps_c - w eps_u (default: sample.convention)")
    p.add_argument("--sampler", metavar="NAME", help="ddpm, ddim (eps/x0/v runs), euler, heun (rectified flow)")
    p.add_argument("--clip-x0", action=argparse.BooleanOptionalAction, default=None,
                   help="clip the predicted x0 to [-1, 1] at every ddpm/ddim step (default: sample.clip_x0)")
    p.add_argument("--steps", type=int, metavar="N", help="sampling steps (ddim <= T; ddpm always runs T)")
    p.add_argument("--eta", type=float, metavar="E", help="DDIM's stochasticity in [0, 1]: 0 deterministic, 1 as "
                                                          "DDPM (default: sample.eta)")
    p.add_argument("--per-class", type=int, metavar="K", help="samples per class in the per-scale grids "
                                                               "(default: sample.per_class)")
    p.add_argument("--seed", type=int, metavar="S", help="seed of the sampling noise (default: sample.seed)")
    p.add_argument("--device", metavar="cpu|cuda", help="default: cuda (cuda:LOCAL_RANK) if available, else cpu")
    p.add_argument("--only", metavar="PARTS", help="run only these parts (see below); default: all that apply")
    p.add_argument("--classifier", metavar="PATH", help="classifier from jobs.train_classifier "
                                                        "(default: DATA_ROOT/classifiers/DATASET_cnn.pt)")
    p.add_argument("--inception-weights", metavar="PATH", help="torch-fidelity's InceptionV3 weights file: adds "
                   "Inception FID, IS, KID, precision/recall against the training split (nothing is downloaded)")
    p.add_argument("--fid-samples", type=int, metavar="N", help="also score N samples per guidance scale (e.g. "
                   "50000, as papers report FID), made on every rank like jobs.sample; resumable")
    p.add_argument("--export-npz", metavar="PATH", help="also write this evaluation's samples as arr_0 (images) "
                                                        "/ arr_1 (labels) npz; must not exist yet")
    p.add_argument("--metric-samples", type=int, default=100, metavar="N",
                   help="samples per guidance scale for accuracy/FID, rounded up to whole classes; also test "
                        "images for denoiser and noisy-classifier runs (default: 100)")
    p.add_argument("--table-samples", type=int, default=20, metavar="N",
                   help="samples per sampler setting in the steps-vs-quality table (default: 20)")
    p.add_argument("--fast-steps", type=int, default=20, metavar="N",
                   help="steps of the fast sampler for progression and interpolation (default: 20)")
    p.add_argument("--reference-images", type=int, metavar="N",
                   help="training images for the Inception reference (default: all; cached next to the data)")
    return p.parse_args(argv)


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
        ev = plan_evaluation(EvaluationArgs(  # every check; nothing is written before it passes
            run_dir=a.run_dir, checkpoint=a.checkpoint, ema=a.ema, guidance=a.guidance, convention=a.convention,
            sampler=a.sampler, steps=a.steps, eta=a.eta, per_class=a.per_class, seed=a.seed,
            device=a.device or info.device.type, only=a.only, inception_weights=a.inception_weights,
            export_npz=a.export_npz, classifier=a.classifier, metric_samples=a.metric_samples,
            table_samples=a.table_samples, fast_steps=a.fast_steps, reference_images=a.reference_images,
            clip_x0=a.clip_x0, fid_samples=a.fid_samples))
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
