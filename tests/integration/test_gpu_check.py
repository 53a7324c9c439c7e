"""bench/gpu_check.sh: its output folder fits what a lent GPU machine returns (at most 8 plain files, plain
names, no folder); a tight budget skips steps with a line saying so, and a step stopped at its time cap
keeps the rows it measured; bad arguments exit 2 and write nothing; its CPU dry run (--device cpu --quick,
slow) runs every step."""
import json
import re
import subprocess
import sys
import tarfile

import pytest

from conftest import ROOT, python_env

STEPS = ("data", "cuda_tests", "train_1epoch", "eval_1epoch", "train_throughput", "sampling", "sample_job",
         "end_to_end")
OUTPUTS = {"summary.md", "results.json", "logs.tar.gz"}
PLAIN_NAME = re.compile(r"[A-Za-z0-9._-]+")


def gpu_check(*args, timeout=600, **env):
    return subprocess.run(["bash", "bench/gpu_check.sh", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=python_env(DDPM_PYTHON=sys.executable, **env))


def read_outputs(out) -> tuple[str, dict, tarfile.TarFile]:
    """The output folder within a lent machine's limits; (summary.md, results.json parsed, logs.tar.gz opened)."""
    entries = list(out.iterdir())
    assert len(entries) <= 8 and {p.name for p in entries} == OUTPUTS, entries
    assert all(p.is_file() and not p.is_symlink() and PLAIN_NAME.fullmatch(p.name) for p in entries), entries
    return (out / "summary.md").read_text(), json.loads((out / "results.json").read_text()), \
        tarfile.open(out / "logs.tar.gz")


def test_a_tight_budget_skips_steps_and_a_stopped_step_keeps_its_rows(tmp_path, mnist_root, untrained_classifier):
    # The data step (estimate 10 s, cap 20 s in the dry run) measures one row, then hangs: the cap stops it,
    # and then cuda_tests (30 s) no longer fits in the 40-s budget. env may take up to 20 s of it.
    stub = (f"{sys.executable} -c \"from bench.tables import Table; Table('stub table', ['row', 'value'])"
            f".add(['first', 1], {{'value': 1}}); import time; time.sleep(600)\"")
    out, work = tmp_path / "out", tmp_path / "work"
    r = gpu_check(out, "--device", "cpu", "--quick", "--data-root", mnist_root, "--classifier", untrained_classifier,
                  "--budget-s", 40, "--work", work, "--steps", "data,cuda_tests", timeout=120,
                  DDPM_GPU_CHECK_STUB=f"data={stub}")
    assert r.returncode == 1, r.stdout + r.stderr
    summary, results, logs = read_outputs(out)
    steps = {s["name"]: s for s in results["steps"]}
    assert list(steps) == ["env", *STEPS]
    assert steps["env"]["result"] == "ok" and results["environment"]["python"] in steps["env"]["note"]
    assert steps["data"]["result"].startswith("stopped at"), steps["data"]
    assert steps["cuda_tests"]["result"] == "skipped: no time left" and "needs ~30 s" in steps["cuda_tests"]["note"]
    assert all(steps[s]["result"] == "not selected (--steps)" for s in STEPS[2:])
    (row,) = results["rows"]
    assert (row["table"], row["cells"], row["values"]) == ("stub table", ["first", "1"], {"value": 1})
    assert "## stub table" in summary and re.search(r"\| first +\| 1 +\|", summary), summary
    assert "| cuda_tests       | skipped: no time left" in summary
    assert {"logs/env.log", "logs/data.log"} <= set(logs.getnames())
    assert results["used_s"] <= 40 + 5 and results["budget_s"] == 40
    assert (work / "logs" / "data.log").is_file()  # the work dir holds the rest


def test_bad_arguments_exit_2_and_write_nothing(tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "mine.txt").write_text("keep")
    for args, message in [((), "the first argument is the output folder"),
                          ((tmp_path / "a", "--device", "tpu"), "--device must be cuda or cpu"),
                          ((tmp_path / "b", "--budget-s", "10"), "--budget-s must be"),
                          ((tmp_path / "c", "--frobnicate"), "unknown argument"),
                          ((tmp_path / "d", "--device", "cpu"), "full sizes need a GPU"),
                          ((tmp_path / "e", "--device", "cpu", "--quick", "--steps", "env,x"), "unknown step 'x'"),
                          ((full, "--device", "cpu", "--quick"), "not empty"),
                          ((tmp_path / "f", "--device", "cpu", "--quick", "--work", full), "not empty")]:
        r = gpu_check(*args)
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.splitlines()) == 1, (args, r.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]
    assert [p.name for p in full.iterdir()] == ["mine.txt"] and (full / "mine.txt").read_text() == "keep"


@pytest.mark.slow  # a minute or two: every benchmark again (test_bench and the bench template run them too)
def test_cpu_dry_run_runs_every_step(tmp_path, mnist_root, untrained_classifier):
    out = tmp_path / "out"
    r = gpu_check(out, "--device", "cpu", "--quick", "--data-root", mnist_root, "--classifier", untrained_classifier,
                  "--budget-s", 900, "--work", tmp_path / "work")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    summary, results, logs = read_outputs(out)
    assert [(s["name"], s["result"]) for s in results["steps"]] == [(s, "ok") for s in ("env", *STEPS)], summary
    titles = list(dict.fromkeys(row["table"] for row in results["rows"]))
    assert titles == ["MNIST 1 epoch: training (jobs.train --config configs/mnist.yaml)",
                      "MNIST 1 epoch: evaluation (jobs.evaluate --only metrics)", "training throughput",
                      "sampling speed", "jobs.sample", "MNIST end to end"], titles
    assert all(f"## {title}" in summary for title in titles)
    evaluated = [row["cells"][0] for row in results["rows"] if row["table"].startswith("MNIST 1 epoch: evaluation")]
    assert evaluated == ["γ=1", "γ=5"]
    assert {f"logs/{s}.log" for s in ("env", *STEPS)} <= set(logs.getnames())
    cuda_tests = logs.extractfile("logs/cuda_tests.log").read().decode()
    assert re.search(r"\d+ skipped", cuda_tests) and "failed" not in cuda_tests  # the CUDA tests skip on a CPU
