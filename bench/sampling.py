"""Sampling speed in one table: the course recipe's loop and diffusers' DDIM against ddpm.diffusion.samplers.

    python -m bench.sampling [--device cuda|cpu] [--quick] [--check] [--which mnist,cifar] [--repeats N]
                             [--peak-tflops BF16,FP32]

MNIST: 100 images (10 per class), DDPM T=300, classifier-free guidance gamma = 5, CS180 class UNet D=64.
Baseline: the course loop (bench/course_recipe.py: a conditional and an unconditional forward per step,
fp32). Ours: ``ddpm.diffusion.samplers.sample_ddpm`` with ``classifier_free_guidance`` (cond + uncond in one
batched forward, schedule scalars from the host, no per-step syncs, each sample's per-step noise drawn
on the CPU from its own seed, as every job samples), then on CUDA wrapped by
``ddpm.diffusion.compiled.compile_for_sampling``: bf16 autocast + torch.compile, and + CUDA graphs.
CIFAR: 64 images, DDIM 50 steps, eta 0, CFG w = 2, the DDPM-CIFAR10-size net. Baseline: diffusers'
``DDIMScheduler`` + ``UNet2DModel`` (when ``import diffusers`` works). Ours: ``sample_ddim`` with
``cifar_unet``, the same variants as MNIST.

The nets have random weights: speed does not depend on them. Each row: one untimed first call (for
compiled rows, its time is reported: compilation + CUDA-graph capture), then the median of --repeats
timed calls, each bracketed by device synchronisation.
--check (bench/gpu_check.sh, minutes on one GPU): the same sizes at 2 repeats, without the "+ bf16 +
compile" rows (each a cold compile; "+ CUDA graphs" is the row the targets are about).
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: python bench/sampling.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench import common, course_recipe, diffusers_baseline
from bench.common import Row
from ddpm.diffusion.compiled import compile_for_sampling
from ddpm.diffusion.samplers import StepNoise, classifier_free_guidance, ddim_timesteps, sample_ddim, sample_ddpm
from ddpm.diffusion.schedule import NoiseSchedule
from ddpm.nets.registry import build_net


def sizes(quick: bool, check: bool) -> dict:
    if quick:  # smoke sizes for a 2-core CPU
        return dict(hidden=16, mnist_n=10, T=20, cifar_base=32, cifar_n=4, ddim_steps=5, repeats=1)
    return dict(hidden=64, mnist_n=100, T=300, cifar_base=128, cifar_n=64, ddim_steps=50, repeats=2 if check else 5)


# Our variants: (row name, compile_for_sampling options or None for the plain eager path); CUDA adds the last two.
OURS = [("ours: ddpm.diffusion.samplers, batched CFG", None)]
OURS_CUDA = [("ours: + bf16 + compile", dict(bf16=True, compile=True, cuda_graphs=False)),
             ("ours: + CUDA graphs", dict(bf16=True, compile=True, cuda_graphs=True))]


def variants(device, check: bool):
    """Our rows on this device; --check keeps only the compiled row that the targets are about."""
    if device.type != "cuda":
        return OURS
    return OURS + (OURS_CUDA[-1:] if check else OURS_CUDA)


def fill(row: Row, run, device, n: int, repeats: int, fwd_flops: float, precision: str, peaks, compiled: bool):
    """Time run() (first call apart), and fill the row's seconds, images/s, memory and MFU."""
    common.reset_peak_memory(device)
    first = common.timed(run, device)
    row.seconds = common.median_time(run, device, repeats)
    row.images_per_s = n / row.seconds
    row.memory = common.peak_memory(device)
    row.mfu = common.mfu(fwd_flops * n / row.seconds, precision, peaks)
    row.note = (f"first call {first:.1f} s (compile + capture)" if compiled else "") + row.note


def label_of(opts, device) -> tuple[str, str]:
    if opts is None:
        return "fp32", "fp32 eager"
    parts = ["bf16"] + (["compile"] if opts["compile"] else []) + (["CUDA graphs"] if opts["cuda_graphs"] else [])
    return "bf16", "+".join(parts)


def our_rows(table, section: str, config: str, guided, sample, device, n: int, repeats: int, flops: float, peaks,
             check: bool):
    """One row per variant: time sample(model), model = the guided eps model as the variant compiles it.
    config: the config cell, with {label} for the variant's precision/compile label."""
    for name, opts in variants(device, check):
        precision, label = label_of(opts, device)

        def ours(row, opts=opts, precision=precision):
            with common.cold_compile(device):  # a compiled row pays its whole compilation
                model = compile_for_sampling(guided, device, **opts) if opts else guided
                fill(row, lambda: sample(model), device, n, repeats, flops, precision, peaks, compiled=bool(opts))

        common.run_row(table, Row(section, name, config.format(label=label)), ours)


# ---------------------------------------------------------------------------------------------- MNIST
def mnist_rows(args, sz, peaks, table) -> None:
    dev, D, n, T, gamma = args.device, sz["hidden"], sz["mnist_n"], sz["T"], 5.0
    section = f"MNIST sample {n} img DDPM T={T} CFG"
    labels = torch.arange(10).repeat_interleave(max(1, n // 10))[:n]
    torch.manual_seed(0)
    net = build_net("cs180_class_unet", hidden=D, T=T).to(dev).eval()
    per_eval = common.flops_per_image(lambda: build_net("cs180_class_unet", hidden=D, T=T), (1, 28, 28),
                                      backward=False)
    flops = per_eval * 2 * T  # cond + uncond at every step, per image
    gen = torch.Generator(device=dev)

    def course(row):
        run = lambda: course_recipe.course_sample_cfg(net, labels, T, gamma, dev, gen.manual_seed(0))  # noqa: E731
        fill(row, run, dev, n, sz["repeats"], flops, "fp32", peaks, compiled=False)

    common.run_row(table, Row(section, "baseline: course loop", f"D={D} fp32, 2 forwards/step", baseline=True), course)

    sched = NoiseSchedule.make("linear", T, 1e-4, 0.02)
    y = labels.to(dev)
    x_T = torch.randn((n, 1, 28, 28), generator=torch.Generator().manual_seed(0)).to(dev)
    noise = StepNoise(range(n), (1, 28, 28), dev)  # per sample and step, as every job samples
    our_rows(table, section, f"D={D} {{label}}, 1 batched forward/step",
             classifier_free_guidance(net, gamma, "gamma"),
             lambda model: sample_ddpm(model, x_T, range(T - 1, -1, -1), y, schedule=sched, noise=noise),
             dev, n, sz["repeats"], flops, peaks, args.check)


# ---------------------------------------------------------------------------------------------- CIFAR
def cifar_rows(args, sz, peaks, table) -> None:
    dev, base, n, steps, w = args.device, sz["cifar_base"], sz["cifar_n"], sz["ddim_steps"], 2.0
    section = f"CIFAR sample {n} img DDIM-{steps} CFG"
    labels = torch.arange(n) % 10
    gen = torch.Generator(device=dev)

    def diffusers_row(row, bf16, version):
        torch.manual_seed(0)
        net = diffusers_baseline.ddpm_cifar10_unet(base).to(dev).eval()
        per_eval = common.flops_per_image(lambda: diffusers_baseline.ddpm_cifar10_unet(base), (3, 32, 32),
                                          diffusers_baseline.forward, backward=False)
        run = lambda: diffusers_baseline.sample_ddim_cfg(net, labels, steps, w, dev,  # noqa: E731
                                                         gen.manual_seed(0), bf16=bf16)
        fill(row, run, dev, n, sz["repeats"], per_eval * 2 * steps, "bf16" if bf16 else "fp32", peaks, False)
        row.note = f"diffusers {version}"

    common.diffusers_rows(table, section, dev, "diffusers DDIM",
                          lambda bf16: f"base={base} {'bf16 autocast' if bf16 else 'fp32'}, batched CFG", diffusers_row)

    torch.manual_seed(0)
    net = build_net("cifar_unet", base=base).to(dev).eval()
    flops = common.flops_per_image(lambda: build_net("cifar_unet", base=base), (3, 32, 32), backward=False) * 2 * steps
    sched = NoiseSchedule.make("linear", 1000, 1e-4, 0.02)
    y = labels.to(dev)
    x_T = torch.randn((n, 3, 32, 32), generator=torch.Generator().manual_seed(0)).to(dev)
    our_rows(table, section, f"base={base} {{label}}, batched CFG", classifier_free_guidance(net, w, "w"),
             lambda model: sample_ddim(model, x_T, ddim_timesteps(1000, steps), y, schedule=sched),
             dev, n, sz["repeats"], flops, peaks, args.check)


def main() -> int:
    args = common.parse_args("python -m bench.sampling",
                             "Sampling speed: course loop / diffusers DDIM vs ddpm.diffusion.samplers.")
    sz = sizes(args.quick, args.check)
    if args.repeats:
        sz["repeats"] = args.repeats
    peaks = common.peak_tflops(args.device, args.peak_tflops)
    common.header("ddpm-hpc sampling speed", args, peaks)
    table = common.RowTable("sampling speed", sampling=True)
    if "mnist" in args.which:
        mnist_rows(args, sz, peaks, table)
    if "cifar" in args.which:
        cifar_rows(args, sz, peaks, table)
    print()
    table.print_final()
    return 1 if table.failed else 0


if __name__ == "__main__":
    sys.exit(main())
