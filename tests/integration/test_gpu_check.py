"""bench/gpu_check.sh: its CPU dry run (--device cpu --quick) runs every step and writes the summary and
the tables; bad arguments exit 2 and write nothing; a tight budget skips steps instead of overrunning."""
import subprocess
import sys

import pytest

from conftest import ROOT, python_env

STEPS = ("env", "data", "cuda_tests", "train_1epoch", "eval_1epoch", "train_throughput", "sampling", "sample_job",
         "end_to_end")


def gpu_check(*args, timeout=600):
    return subprocess.run(["bash", "bench/gpu_check.sh", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=python_env(DDPM_PYTHON=sys.executable))


@pytest.mark.slow  # a minute: every benchmark again (test_bench and the bench template run them too)
def test_cpu_dry_run_runs_every_step(tmp_path, mnist_root, untrained_classifier):
    out = tmp_path / "out"
    r = gpu_check(out, "--device", "cpu", "--quick", "--data-root", mnist_root, "--classifier", untrained_classifier,
                  "--budget-s", 900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    summary = (out / "summary.md").read_text()
    for step in STEPS:
        assert f"| {step} | ok |" in summary, (step, summary)
    for table in ("train_throughput", "sampling", "sample_job", "end_to_end"):
        assert (out / f"{table}.md").read_text().startswith("| ")
        assert f"## {table}" in summary
    assert "gamma_5" in summary  # the evaluation's metric lines
    assert "6 skipped" in (out / "cuda_tests.log").read_text()  # the 6 CUDA tests, collected; they skip on a CPU


def test_bad_arguments_and_a_tight_budget(tmp_path, mnist_root, untrained_classifier):
    for args, message in [((), "the first argument is the output folder"),
                          ((tmp_path / "a", "--device", "tpu"), "--device must be cuda or cpu"),
                          ((tmp_path / "b", "--budget-s", "10"), "--budget-s must be"),
                          ((tmp_path / "c", "--frobnicate"), "unknown argument"),
                          ((tmp_path / "d", "--device", "cpu"), "full sizes need a GPU")]:
        r = gpu_check(*args)
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr)
    assert not any((tmp_path / n).exists() and any((tmp_path / n).iterdir()) for n in "abcd")
    full = tmp_path / "full"
    full.mkdir()
    (full / "mine.txt").write_text("keep")
    r = gpu_check(full, "--device", "cpu", "--quick")
    assert r.returncode == 2 and "not empty" in r.stderr and (full / "mine.txt").read_text() == "keep"
    # 60 s: the cheap steps run, the ones estimated longer than what is left are skipped, not overrun.
    r = gpu_check(tmp_path / "tight", "--device", "cpu", "--quick", "--data-root", mnist_root,
                  "--classifier", untrained_classifier, "--budget-s", 60, timeout=120)
    summary = (tmp_path / "tight" / "summary.md").read_text()
    assert "skipped: no time left" in summary and "| env | ok |" in summary, summary
