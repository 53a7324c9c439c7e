"""Smoke test of the benchmarks: both scripts run end to end on the CPU at --quick sizes (no timing checks)."""
import subprocess
import sys

import torch

from conftest import ROOT, python_env


def test_benchmarks_run_on_cpu_quick(mnist_root):
    commands = {
        "train_throughput": [sys.executable, "bench/train_throughput.py", "--device", "cpu", "--quick",
                             "--data-root", str(mnist_root)],
        "sampling": [sys.executable, "-m", "bench.sampling", "--device", "cpu", "--quick"],
    }
    # Side by side: each is one thread (python_env), and most of their time is importing torch.
    procs = {name: subprocess.Popen(cmd, cwd=ROOT, env=python_env(), stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True) for name, cmd in commands.items()}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"bench {name} failed:\n{out}"
        header = next((line for line in out.splitlines() if line.startswith("| section")), "")
        for column in ("images/s", "vs baseline", "peak memory", "MFU"):
            assert column in header, f"bench {name}: column {column!r} missing from {header!r}"
        assert "baseline" in out and "ours" in out
        assert f"torch {torch.__version__}" in out
