"""Bad command-line and config input across the jobs: exit status 2, at most two lines on stderr (the
first one `error: ...` naming the problem and the fix), and nothing written anywhere."""
import json

import pytest

from jobs import evaluate, prepare_data, submit, tensorboard
from jobs import train as train_job

from conftest import TINY_MNIST

JOBS = {"train": train_job.main, "evaluate": evaluate.main, "submit": submit.main, "tensorboard": tensorboard.main,
        "prepare_data": prepare_data.main}


@pytest.fixture(scope="module")
def world(tmp_path_factory, mnist_root):
    """A tiny config, a finished 5-step run, a plain folder and an existing file, shared by the cases."""
    d = tmp_path_factory.mktemp("world")
    config = d / "tiny.yaml"
    config.write_text(TINY_MNIST.format(root=mnist_root))
    assert train_job.main(["--config", str(config), "--run-dir", str(d / "run"), "train.steps=5"]) == 0
    (d / "plain").mkdir()
    (d / "plain" / "notes.txt").write_text("mine")
    (d / "exists.npz").write_bytes(b"x")
    return d


def snapshot(root):
    return sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*"))


C, R, P = "{config}", "{run}", "{world}"
CASES = [
    ("train", ["--config", f"{P}/missing.yaml"], "config file"),
    ("train", ["--config", C, "train.lr="], "malformed override"),
    ("train", ["--config", C, "train.lrr=1"], "did you mean 'lr'"),
    ("train", ["--config", C, "sample.guidance=[a,b]"], "sample.guidance must be a list of numbers"),
    ("train", ["--config", C, "train.betas=[0.9]"], "train.betas must hold exactly 2 numbers"),
    ("train", ["--config", C, "train.batch_size=0"], "train.batch_size must be in"),
    ("train", ["--config", C, "model.arch=unet9"], "unknown model.arch"),
    ("train", ["--config", C, "model.hidden=-1"], "model.hidden=-1 is invalid"),
    ("train", ["--config", C, "data.root=/nonexistent", "--run-dir", f"{P}/new"], "MNIST not found"),
    ("train", ["--config", C, "--run-dir", f"{P}/plain"], "is not a run directory"),
    ("train", ["--config", C, "train.lr=0.5", "--run-dir", R], "different config"),
    ("evaluate", [f"{P}/nowhere"], "is not a run directory"),
    ("evaluate", [f"{P}/plain"], "is not a run directory"),
    ("evaluate", [R, "--guidance", "abc"], "--guidance 'abc' is not a comma-separated list"),
    ("evaluate", [R, "--only", "bogus"], "unknown --only part"),
    ("evaluate", [R, "--per-class", "0"], "--per-class must be >= 1"),
    ("evaluate", [R, "--sampler", "euler"], "does not fit diffusion.objective=eps"),
    ("evaluate", [R, "--steps", "1000"], "exceeds diffusion.T=50"),
    ("evaluate", [R, "--export-npz", f"{P}/exists.npz"], "already exists"),
    ("evaluate", [R, "--inception-weights", f"{P}/none.pt"], "Inception weights"),
    ("evaluate", [R, "--device", "tpu"], "unknown --device"),
    ("evaluate", [R, "--checkpoint", "999"], "no checkpoint for step 999"),
    ("evaluate", [R, "--frobnicate"], "unrecognized arguments"),
    ("submit", ["--config", f"{P}/missing.yaml", "--local"], "config file"),
    ("submit", ["--config", C, "--time", "forever"], "invalid --time 'forever'"),
    ("submit", ["--config", C, "--local", "--sweep", "train.lr"], "malformed --sweep"),
    ("submit", ["--status", f"{P}/missing.json"], "manifest"),
    ("submit", [], "--config is required"),
    ("tensorboard", [f"{P}/nowhere"], "is not a directory"),
    ("tensorboard", [P, "--port", "0"], "is not a TCP port"),
    ("prepare_data", ["--dataset", "imagenet", "--root", P], "unknown dataset"),
    ("prepare_data", ["--dataset", "mnist", "--root", f"{P}/plain", "--offline"], "MNIST not found"),
]


@pytest.mark.parametrize("job,argv,message", CASES, ids=[f"{j}-{i}" for i, (j, _, _) in enumerate(CASES)])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(world, capsys, job, argv, message):
    argv = [a.format(config=world / "tiny.yaml", run=world / "run", world=world) for a in argv]
    before = snapshot(world)
    capsys.readouterr()
    try:
        rc = JOBS[job](argv)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, (argv, err)
    assert err and len(err) <= 2 and message in err[-1], (argv, err)
    assert snapshot(world) == before, f"{job} {argv} wrote something"


def test_enough_cases_for_every_job():
    assert len(CASES) >= 25 and {job for job, _, _ in CASES} == set(JOBS)
    assert json.dumps(CASES)  # plain data: the list is what the docs' fault matrix counts
