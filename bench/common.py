"""What the benchmarks share: CLI flags, honest timing, peak memory, FLOPs per image, MFU, the tables.

Timing: every timed region starts and ends with ``torch.cuda.synchronize`` (on CUDA), comes after a
warm-up (which holds any compilation), and the reported figure is the median over repeats.
FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` on one forward (+ backward) of the net built on the
``meta`` device, so counting even the 35.7 M-parameter CIFAR net costs no compute. It counts matrix
products, convolutions and attention (2 FLOPs per multiply-add); elementwise work, norms and the
optimizer are not counted, as is usual for MFU.
Tables: :mod:`bench.tables` (each row printed and streamed to $DDPM_BENCH_RESULTS as it is measured).
"""
import argparse
import contextlib
import datetime
import os
import platform
import resource
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.tables import Table, markdown

# Dense peak TFLOP/s by device-name pattern: (bf16 tensor cores, fp32 without tensor cores).
# H100 SXM5 and H200 share the GH100 compute die and clocks; the PCIe H100 has fewer SMs and lower clocks.
PEAK_TFLOPS = (("H100 PCIe", 756.0, 51.0), ("H100", 989.0, 67.0), ("H200", 989.0, 67.0))


def parse_args(prog: str, description: str, extra=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu",
                   help="default: cuda when available")
    p.add_argument("--quick", action="store_true", help="smoke sizes: tiny nets, batches and step counts")
    p.add_argument("--check", action="store_true",
                   help="the selection of bench/gpu_check.sh: only the rows it reports, fewer steps and repeats "
                        "(minutes on one GPU); with --quick at smoke sizes")
    p.add_argument("--which", default="mnist,cifar", metavar="SECTIONS", help="comma-separated sections: mnist, cifar")
    p.add_argument("--repeats", type=int, default=None, metavar="N", help="timed repeats per row (median is reported)")
    p.add_argument("--peak-tflops", default=None, metavar="BF16,FP32",
                   help="dense peak TFLOP/s for MFU (default: table for H100/H200; CPU prints n/a)")
    if extra:
        extra(p)
    args = p.parse_args()
    args.which = {w.strip() for w in args.which.split(",") if w.strip()}
    unknown = args.which - {"mnist", "cifar"}
    if unknown:
        p.error(f"unknown --which section(s): {', '.join(sorted(unknown))}; choose mnist, cifar")
    args.device = torch.device(args.device)
    if args.device.type == "cuda":
        if not torch.cuda.is_available():
            p.error("--device cuda but CUDA is not available; use --device cpu")
        args.device = torch.device("cuda", torch.cuda.current_device())
    return args


# ----------------------------------------------------------------------------------------- device facts
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({len(os.sched_getaffinity(0))} cores usable)"


def peak_tflops(device: torch.device, override: str | None) -> dict | None:
    """{'bf16': TFLOP/s, 'fp32': TFLOP/s} for MFU, or None (CPU, or a GPU not in the table)."""
    if override:
        bf16, fp32 = (float(v) for v in override.split(","))
        return {"bf16": bf16, "fp32": fp32}
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for pattern, bf16, fp32 in PEAK_TFLOPS:
        if pattern in name:
            return {"bf16": bf16, "fp32": fp32}
    return None


def header(title: str, args, peaks: dict | None) -> None:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"# {title}")
    print(f"device: {device_name(args.device)} | torch {torch.__version__} | {now}"
          f"{' | QUICK (smoke sizes, not comparable numbers)' if args.quick else ''}"
          f"{' | CHECK (fewer steps, repeats and rows)' if getattr(args, 'check', False) else ''}")
    if peaks:
        print(f"MFU peaks: bf16 {peaks['bf16']:g} TFLOP/s, fp32 {peaks['fp32']:g} TFLOP/s (dense; fp32 rows may run "
              "convolutions on TF32 tensor cores, so their MFU can read high)")
    elif args.device.type == "cuda":
        print("MFU: n/a (device not in the peak table; pass --peak-tflops BF16,FP32)")


# --------------------------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    """Seconds for one call of fn(), with the device drained before and after."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def median_time(fn, device: torch.device, repeats: int) -> float:
    return statistics.median(timed(fn, device) for _ in range(repeats))


@contextlib.contextmanager
def cold_compile(device: torch.device):
    """On CUDA: forget every compiled graph and use an empty inductor cache for the block, so a compiled
    row pays its whole compilation (a persistent cache would make the second run look free). CPU: no-op."""
    if device.type != "cuda":
        yield
        return
    from torch._inductor.utils import fresh_cache

    torch._dynamo.reset()
    with fresh_cache():
        yield


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> str:
    """CUDA: max allocated since the last reset. CPU: the process's peak RSS so far (monotonic over rows)."""
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f} GiB RSS"


# ---------------------------------------------------------------------------------------------- FLOPs
def flops_per_image(build, input_shape, forward=None, backward=True, num_classes=10) -> float:
    """FLOPs for one image: build() → net on the meta device, one forward (+ backward) at batch 2, / 2.

    forward(net, x, t, y) → output tensor; default ``net(x, t, y)`` (the ddpm.nets convention).
    """
    forward = forward or (lambda net, x, t, y: net(x, t, y))
    with torch.device("meta"):
        net = build()
        x = torch.randn(2, *input_shape, requires_grad=False)
        t = torch.randint(0, 300, (2,))
        y = torch.randint(0, num_classes + 1, (2,))
    counter = FlopCounterMode(display=False)
    with counter:
        if backward:
            forward(net, x, t, y).float().pow(2).mean().backward()
        else:
            with torch.no_grad():
                forward(net, x, t, y)
    return counter.get_total_flops() / 2


def mfu(flops_per_second: float, precision: str, peaks: dict | None) -> str:
    if not peaks:
        return "n/a"
    return f"{100 * flops_per_second / (peaks[precision] * 1e12):.1f} %"


# ---------------------------------------------------------------------------------------------- table
@dataclass
class Row:
    section: str          # e.g. "MNIST train"
    name: str             # e.g. "baseline: course recipe"
    config: str           # batch, precision, compile, ...
    images_per_s: float | None = None
    seconds: float | None = None      # sampling: seconds per batch of images
    memory: str = ""
    mfu: str = "n/a"
    note: str = ""
    baseline: bool = False  # the section's ratios are against its first baseline row
    failed: bool = False


def fmt_rate(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


class RowTable(Table):
    """The speed tables of Row objects; ratios are against the first baseline row of each section, measured
    in this run (it comes first, so a row's ratio is known when it is printed)."""

    def __init__(self, title: str, sampling: bool = False):
        super().__init__(title, ["section", "row", "config"] + (["s/batch"] if sampling else [])
                         + ["images/s", "vs baseline", "peak memory", "MFU", "note"])
        self.sampling, self.base, self.failed = sampling, {}, False

    def add_row(self, r: Row) -> None:
        if r.section not in self.base and r.baseline and r.images_per_s:
            self.base[r.section] = r.images_per_s
        b = self.base.get(r.section)
        ratio = r.images_per_s / b if (r.images_per_s and b) else None
        cells = [r.section, r.name, r.config] + ([f"{r.seconds:.3f}" if r.seconds else "-"] if self.sampling else [])
        cells += [fmt_rate(r.images_per_s), f"{ratio:.2f}x" if ratio else "-", r.memory or "-", r.mfu, r.note]
        self.failed |= r.failed
        self.add(cells, {**asdict(r), "vs_baseline": ratio})


def print_markdown(cols: list[str], lines: list[list]) -> None:
    """A Markdown table with aligned columns (pastes into docs/PERFORMANCE.md as is)."""
    print("\n".join(markdown(cols, lines)))


def run_row(table: RowTable, row: Row, fn) -> None:
    """Fill ``row`` with fn(row) and add it; a failure becomes a note in the table (and a non-zero exit later)."""
    try:
        fn(row)
    except Exception as e:  # one broken row must not hide the others
        row.failed, row.note = True, f"FAILED: {type(e).__name__}: {' '.join(str(e).split())[:160]}"
    table.add_row(row)


def diffusers_status() -> tuple[str | None, str]:
    """(version, "") when diffusers imports, else (None, why); diffusers is a benchmark-only dependency."""
    try:
        import diffusers
    except Exception as e:  # not installed, or installed but broken against this torch
        return None, f"diffusers not importable ({type(e).__name__}: {str(e).splitlines()[0][:80]})"
    return diffusers.__version__, ""


def diffusers_rows(table: RowTable, section: str, dev, name: str, config, fill, check: bool = False) -> None:
    """The diffusers rows of a section: "baseline: NAME" in fp32, then NAME with bf16 autocast (CUDA only).

    config(bf16) → the config cell; fill(row, bf16, version) measures. Without diffusers, or bf16 on the
    CPU, the row says why it was skipped. ``check`` (bench/gpu_check.sh): only the bf16 row on CUDA, as
    the baseline (its fp32 row on a CPU).
    """
    version, why = diffusers_status()
    wanted = [dev.type == "cuda"] if check else [False, True]
    for bf16 in wanted:
        row = Row(section, name if bf16 and not check else f"baseline: {name}", config(bf16),
                  baseline=bf16 == wanted[0])
        if version is None:
            row.note = f"skipped: {why}"
            table.add_row(row)
            return
        if bf16 and dev.type != "cuda":
            row.note = "skipped: bf16 autocast is benchmarked on CUDA only"
            table.add_row(row)
            continue
        run_row(table, row, lambda row, bf16=bf16: fill(row, bf16, version))
