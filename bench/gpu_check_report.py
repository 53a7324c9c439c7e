"""The GPU check's report (bench/gpu_check.sh): what the machine is, and the check's three output files.

    python -m bench.gpu_check_report env WORK [WHEEL ...]     # the env step: versions to stdout and WORK/env.json
    python -m bench.gpu_check_report write WORK OUT --run RUN --budget S --started UNIX --command CMD

WORK is the check's work dir: steps.tsv (one line per step as the script ends or skips it: name, result,
seconds, note), rows.jsonl (every benchmark row the moment it was measured, see bench.tables), env.json,
logs/ (one log per step) and the runs. ``write`` (after every step) derives the rows of the 1-epoch run
RUN from its metrics.jsonl and evaluation, and replaces OUT's three files: summary.md (versions, what
ran, failed or was skipped, every table), results.json (the same, machine-readable) and logs.tar.gz (the
step logs, the 1-epoch run's metrics, evaluation and sample grids). A lent GPU machine returns at most
8 files and no folders from its output folder: nothing else goes there. Only ``env`` imports torch.
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from bench.tables import markdown, read_rows
from ddpm.run.evaluations import scale_label, scored_rows
from ddpm.run.metrics_log import read_metrics

PACKAGES = ("torchvision", "numpy", "triton", "h5py", "tensorboard", "yaml", "matplotlib", "tqdm", "scipy",
            "submitit", "torch_fidelity", "diffusers")
# What logs.tar.gz holds, relative to WORK: small files only (each file back from the machine is <= 16 MiB).
ARCHIVED = ("logs/*.log", "runs/*/config.json", "runs/*/metrics.jsonl", "runs/*/samples/*.png",
            "runs/*/eval/*/metrics.json", "runs/*/eval/*/report.md", "end_to_end/*.log")


# ------------------------------------------------------------------------------------------------ env
def version_of(name: str) -> str:
    try:
        module = __import__(name)
    except ModuleNotFoundError:
        return "MISSING"
    except Exception as e:  # present but broken (against this torch, say)
        return f"BROKEN ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:80]})"
    return str(getattr(module, "__version__", "?"))


def nvidia_smi(*args: str) -> str | None:
    try:
        r = subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def probe_env(wheels: list[str]) -> dict:
    """Versions of the interpreter, torch, CUDA, the driver and the GPU, and which packages import."""
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version(), "cuda_available": torch.cuda.is_available(),
           "host": platform.node(), "cpu_cores": len(os.sched_getaffinity(0)), "wheels": wheels}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_count=torch.cuda.device_count(), capability=f"{props.major}.{props.minor}",
                   gpu_memory_gib=round(props.total_memory / 2 ** 30, 1))
    driver = nvidia_smi("--query-gpu=driver_version", "--format=csv,noheader")
    env["driver"] = driver.splitlines()[0] if driver else None
    env["packages"] = {name: version_of(name) for name in PACKAGES}
    return env


def env_line(env: dict) -> str:
    if not env:
        return "environment: unknown (the env step did not finish)"
    gpu = (f"{env['gpu']} ({env['gpu_memory_gib']} GiB, sm {env['capability']}, {env['gpu_count']} GPU(s))"
           if env.get("gpu") else f"no CUDA device ({env['cpu_cores']} CPU cores)")
    return (f"python {env['python']} · torch {env['torch']} · torchvision {env['packages']['torchvision']} · "
            f"CUDA {env['cuda']} · cuDNN {env['cudnn']} · driver {env['driver'] or 'n/a'} · {gpu}")


def env_main(work: Path, wheels: list[str]) -> int:
    full = nvidia_smi()
    if full:
        print(full)
    if wheels:
        print("installed from .whl/: " + " ".join(wheels))
    env = probe_env(wheels)
    print("packages: " + ", ".join(f"{k} {v}" for k, v in env["packages"].items()))
    print(env_line(env))  # last: the step's note in the summary
    (work / "env.json").write_text(json.dumps(env, indent=1))
    return 0


# ------------------------------------------------------------------------------------------- the run
def record(table: str, columns: list[str], cells: list, values: dict) -> dict:
    """A row in the shape of bench.tables' rows.jsonl."""
    return {"bench": "gpu_check", "table": table, "columns": columns, "cells": [str(c) for c in cells],
            "values": values}


def run_rows(run: Path, train_s: float | None) -> list[dict]:
    """The 1-epoch run's training row (from metrics.jsonl) and its evaluation's rows (from metrics.json)."""
    rows = []
    if (run / "metrics.jsonl").is_file() and (run / "config.json").is_file():
        m = read_metrics(run / "metrics.jsonl")
        batch = json.loads((run / "config.json").read_text())["train"]["batch_size"]
        ips = [r["images_per_s"] for r in m if r.get("images_per_s")]
        steady = statistics.median(ips[1:] or ips) if ips else None  # the first interval holds compilation
        mem = max((r.get("gpu_mem_gb") or 0 for r in m), default=0)
        values = dict(steps=m[-1]["step"] if m else 0, batch=batch, wall_s=train_s, images_per_s=steady,
                      loss=m[-1].get("loss") if m else None, gpu_mem_gib=mem or None)
        rows.append(record("MNIST 1 epoch: training (jobs.train --config configs/mnist.yaml)",
                           ["steps", "batch", "wall s (process)", "images/s (steady)", "last loss", "peak GPU memory"],
                           [values["steps"], batch, "-" if train_s is None else f"{train_s:.0f}",
                            "-" if steady is None else f"{steady:,.0f}",
                            "-" if values["loss"] is None else f"{values['loss']:.4f}",
                            f"{mem:.2f} GiB" if mem else "-"], values))
    for path in sorted(run.glob("eval/step_*/metrics.json"))[-1:]:
        m = json.loads(path.read_text())
        for section, r in scored_rows(m):
            values = {k: r.get(k) for k in ("scale", "n", "accuracy", "feature_fid", "wall_s")}
            rows.append(record(
                "MNIST 1 epoch: evaluation (jobs.evaluate --only metrics)",
                ["guidance", "samples", "sampler", "label accuracy", "feature-FID", "sampling s"],
                [scale_label(m, r["scale"]), r["n"], f"{m['sampler']['name']} {m['sampler']['steps']}",
                 *(("n/a" if v is None else f"{v:.3f}") for v in (r.get("accuracy"), r.get("feature_fid"))),
                 r.get("wall_s", "-")], {**values, "section": section, "step": m["checkpoint"]["step"]}))
    return rows


# ----------------------------------------------------------------------------------------- the report
def read_steps(path: Path) -> list[dict]:
    steps = []
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            name, result, seconds, note = (line.split("\t") + ["", "", ""])[:4]
            steps.append(dict(name=name, result=result, seconds=int(seconds or 0), note=note))
    return steps


def tables(rows: list[dict]) -> list[str]:
    """Markdown: one table per (bench, table) in order of first appearance."""
    groups = {}
    for r in rows:
        groups.setdefault((r["bench"], r["table"]), (r["columns"], []))[1].append(r["cells"])
    out = []
    for (bench, title), (cols, lines) in groups.items():
        out += ["", f"## {title}" + ("" if bench == "gpu_check" else f" (bench.{bench})"), "", *markdown(cols, lines)]
    return out


def summary(meta: dict, env: dict, steps: list[dict], rows: list[dict]) -> str:
    count = {what: sum(s["result"].startswith(what) for s in steps) for what in ("ok", "skipped", "not selected")}
    bad = len(steps) - sum(count.values())
    head = [f"# GPU check: {env.get('gpu') or 'CPU'}, {meta['date']}", "",
            f"`{meta['command']}` · budget {meta['budget_s']} s, used {meta['used_s']} s · steps: {count['ok']} ok, "
            f"{bad} failed or stopped, {count['skipped']} skipped for lack of time, {count['not selected']} not "
            "selected", "", env_line(env)]
    if env.get("packages"):
        head += ["", "packages: " + ", ".join(f"{k} {v}" for k, v in env["packages"].items())]
    head += ["", "## Steps", "", *markdown(["step", "result", "time", "note"],
                                           [[s["name"], s["result"], f"{s['seconds']} s", s["note"]] for s in steps])]
    return "\n".join(head + tables(rows)) + "\n"


def archive(work: Path, path: Path) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for pattern in ARCHIVED:
            for f in sorted(work.glob(pattern)):
                tar.add(f, arcname=str(f.relative_to(work)))


def replace(path: Path, write) -> None:
    """write(tmp) then rename over ``path``: a reader (or a machine taken back mid-write) sees a whole file."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def write_main(a) -> int:
    work, out = Path(a.work), Path(a.out)
    steps = read_steps(work / "steps.tsv")
    env = json.loads((work / "env.json").read_text()) if (work / "env.json").is_file() else {}
    train_s = next((s["seconds"] for s in steps if s["name"] == "train_1epoch" and s["result"] == "ok"), None)
    try:
        derived = run_rows(Path(a.run), train_s)
    except Exception as e:  # a run cut short must not cost the report the benchmark rows
        print(f"warning: no rows from {a.run}: {type(e).__name__}: {e}", file=sys.stderr)
        derived = []
    rows = derived + read_rows(work / "rows.jsonl")
    meta = {"command": a.command, "budget_s": a.budget, "used_s": round(time.time() - a.started),
            "date": datetime.datetime.fromtimestamp(a.started, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    replace(out / "summary.md", lambda p: p.write_text(summary(meta, env, steps, rows)))
    replace(out / "results.json", lambda p: p.write_text(json.dumps(
        {**meta, "environment": env, "steps": steps, "rows": rows}, indent=1)))
    replace(out / "logs.tar.gz", lambda p: archive(work, p))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check_report", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    e = sub.add_parser("env", help="print and record the versions (imports torch)")
    e.add_argument("work")
    e.add_argument("wheels", nargs="*", help="the wheel files installed from .whl/")
    w = sub.add_parser("write", help="(re)write OUT's summary.md, results.json and logs.tar.gz")
    w.add_argument("work")
    w.add_argument("out")
    w.add_argument("--run", required=True, help="the 1-epoch run dir")
    w.add_argument("--budget", type=int, required=True)
    w.add_argument("--started", type=float, required=True, help="unix time the check started")
    w.add_argument("--command", required=True)
    a = p.parse_args()
    return env_main(Path(a.work), a.wheels) if a.what == "env" else write_main(a)


if __name__ == "__main__":
    sys.exit(main())
