"""Generate N samples of a trained run (e.g. 50,000 for FID), sharded over any number of processes.

    python -m jobs.sample RUN_DIR --num 50000 --guidance 3 --convention w --sampler ddim --steps 50
    torchrun --nproc_per_node 4 -m jobs.sample RUN_DIR --num-samples 50000 ...   # or: sbatch slurm/sample.sh
    python -m jobs.sample RUN_DIR --num 1000 --classifier-guidance runs/noisy-clf --cg-scale 3   # classifier guidance
    python -m jobs.sample RUN_DIR --num 1000 --mix 3:1,8:1                                   # a mixture of classes
"""
import argparse
import dataclasses
import sys

from ddpm.errors import BAD_INPUT_EXIT_CODE, UserError
from jobs.cli import Parser

EPILOG = """\
output: RUN_DIR/samples/NAME.h5 (group 'samples': images uint8 (N, H, W, C), labels, the settings as
  attrs); NAME defaults to step_<step>_<convention>_<scale>_<sampler><steps>[_eta<eta>][_raw][_clip]_n<num>
  _seed<seed> (_eta: DDIM with eta > 0; _raw: not the EMA weights; _clip: x0 clipped; cg_<scale> or
  mix<c>w<w>_... in place of the scale with --classifier-guidance or --mix). jobs.evaluate --fid-samples N
  makes and reuses the same files.
  --npz writes arr_0/arr_1 (the layout external evaluators read), --png-dir one PNG per sample.
sample i's noise and label depend only on (seed, i): any number of processes gives the same samples.
resuming: finished shards are kept; a killed or requeued job redoes only the rest; rerunning a finished
  request does nothing. Exit status: 0 done, 2 bad input (nothing written), 75 stopped by SIGUSR2/SIGTERM
  between shards (rerun or requeue to finish)."""


def parse_args(argv=None):
    p = Parser(prog="python -m jobs.sample", description=__doc__.splitlines()[0], epilog=EPILOG,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory written by jobs.train")
    p.add_argument("--num-samples", "--num", dest="num", type=int, required=True, metavar="N",
                   help="number of samples (under torchrun spell it --num-samples: torchrun takes --num for its "
                        "own --numa-binding)")
    p.add_argument("--guidance", type=float, metavar="S", help="one guidance scale (default: the median of "
                                                               "sample.guidance)")
    p.add_argument("--convention", metavar="gamma|w", help="guidance convention (default: sample.convention)")
    p.add_argument("--classifier-guidance", metavar="RUN_DIR", help="guide with this noisy-classifier run instead "
                   "of classifier-free guidance (Dhariwal & Nichol 2021; labels i mod classes)")
    p.add_argument("--cg-scale", type=float, metavar="S", help="classifier-guidance scale (default: 1)")
    p.add_argument("--mix", metavar="C:W,...", help="guide every sample toward this mixture of classes, e.g. 3:1,8:1 "
                   "(eps_u + sum w_i (eps_ci - eps_u), Liu et al. 2022)")
    p.add_argument("--sampler", metavar="NAME", help="ddpm, ddim, dpmpp_2m, euler, heun (default: sample.sampler; "
                                                     "ddim on CPU)")
    p.add_argument("--steps", type=int, metavar="N", help="sampling steps (default: sample.steps)")
    p.add_argument("--eta", type=float, metavar="E", help="DDIM's stochasticity in [0, 1]: 0 deterministic, 1 as "
                                                          "DDPM (default: sample.eta)")
    p.add_argument("--clip-x0", action=argparse.BooleanOptionalAction, default=None,
                   help="clip the predicted x0 to [-1, 1] at every ddpm/ddim step (default: sample.clip_x0)")
    p.add_argument("--checkpoint", default="latest", metavar="WHICH", help="latest (default), best, a step, or a path")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                   help="use the EMA weights (default: sample.ema of the config)")
    p.add_argument("--seed", type=int, metavar="S", help="seed of the sampling noise (default: sample.seed)")
    p.add_argument("--batch", type=int, default=250, metavar="B", help="samples per shard and sampler call "
                   "(default: 250; memory, not the samples: sample i is the same for any B)")
    p.add_argument("--out", metavar="NAME", help="output name under RUN_DIR/samples/ (default: from the settings)")
    p.add_argument("--npz", metavar="PATH", help="also write the samples as an npz (arr_0, arr_1); must not exist")
    p.add_argument("--png-dir", metavar="DIR", help="also write one PNG per sample (000000.png, ...) into DIR")
    p.add_argument("--device", default="auto", metavar="auto|cpu|cuda", help="default: cuda:LOCAL_RANK if available")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)  # a mistyped value: one line and exit status 2 (jobs.cli.Parser)
    from ddpm.evaluate.sample_sets import RankGroup, SamplesArgs, make_samples, plan_samples
    from ddpm.train import dist
    from ddpm.train.preempt import PreemptionHandler

    info = None
    try:
        info = dist.init_distributed(args.device)
        typed = {f.name: getattr(args, f.name) for f in dataclasses.fields(SamplesArgs)}
        samples = plan_samples(SamplesArgs(**{**typed, "device": info.device.type}))
        with PreemptionHandler() as preempt:
            ranks = RankGroup(info.rank, info.world_size, dist.barrier, lambda: preempt.requested)
            return make_samples(samples, ranks, log=lambda s: print(s, flush=True))
    except UserError as e:
        if info is None or info.is_main:
            print(f"error: {e}", file=sys.stderr)
        return BAD_INPUT_EXIT_CODE
    finally:
        dist.cleanup()


if __name__ == "__main__":
    sys.exit(main())
