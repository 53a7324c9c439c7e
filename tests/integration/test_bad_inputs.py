"""Bad command-line and config input across the jobs: exit status 2, at most two lines on stderr (the
first one `error: ...` naming the problem and the fix), and nothing written anywhere."""
import json

import pytest

from jobs import evaluate, prepare_data, sample, submit, tensorboard, train_classifier
from jobs import train as train_job

from conftest import write_tiny_config

JOBS = {"train": train_job.main, "evaluate": evaluate.main, "submit": submit.main, "tensorboard": tensorboard.main,
        "prepare_data": prepare_data.main, "train_classifier": train_classifier.main, "sample": sample.main}


@pytest.fixture(scope="module")
def world(tmp_path_factory, mnist_root):
    """A tiny config, a finished 5-step run, a plain folder and an existing file, shared by the cases."""
    d = tmp_path_factory.mktemp("world")
    config = write_tiny_config(d, mnist_root)
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
    ("evaluate", [R, "--checkpoint", "best"], "no best checkpoint"),
    ("evaluate", [R, "--classifier-guidance", R], "not a noisy classifier"),
    ("evaluate", [R, "--classifier-guidance", f"{P}/plain"], "is not a run directory"),
    ("evaluate", [R, "--mix", "3:1,x:1"], "mnist has no class 'x'"),
    ("sample", [f"{P}/nowhere", "--num", "10"], "is not a run directory"),
    ("sample", [R, "--num", "10", "--checkpoint", "best"], "no best checkpoint"),
    ("sample", [R, "--num", "10", "--classifier-guidance", R], "not a noisy classifier"),
    ("sample", [R, "--num", "10", "--mix", "3:1"], "names one class"),
    ("submit", ["--config", f"{P}/missing.yaml", "--local"], "config file"),
    ("submit", ["--config", C, "--time", "forever"], "invalid --time 'forever'"),
    ("submit", ["--config", C, "--local", "--sweep", "train.lr"], "malformed --sweep"),
    ("submit", ["--status", f"{P}/missing.json"], "manifest"),
    ("submit", [], "--config is required"),
    ("tensorboard", [f"{P}/nowhere"], "is not a directory"),
    ("tensorboard", [P, "--port", "0"], "is not a TCP port"),
    ("prepare_data", ["--dataset", "imagenet", "--root", P], "unknown dataset"),
    ("prepare_data", ["--dataset", "mnist", "--root", f"{P}/plain", "--offline"], "MNIST not found"),
    ("train", ["--config", C, "log.sample_every_epochs=[1, every x]"], "log.sample_every_epochs must be a period"),
    ("train", ["--config", C, "checkpoint.best=true", "log.test_every_epochs=0"], "needs the held-out loss"),
    ("train_classifier", ["--dataset", "imagenet", "--root", P], "unknown --dataset"),
    ("train_classifier", ["--dataset", "mnist", "--root", P, "--steps", "0"], "--steps must be >= 1"),
]
# A mistyped value or option: argparse's error as one line (not its usage block), exit 2.
ARGPARSE = [
    ("train", ["--config", C, "--frobnicate"], "unrecognized arguments: --frobnicate"),
    ("submit", ["--config", C, "--nodes", "two"], "argument --nodes: invalid int value: 'two'"),
    ("submit", ["--config", C, "--signal-delay", "soon"], "argument --signal-delay: invalid int value"),
    ("tensorboard", [P, "--port", "abc"], "argument --port: invalid int value: 'abc'"),
    ("tensorboard", [], "the following arguments are required: RUN_ROOT"),
    ("prepare_data", ["--dataset", "mnist"], "the following arguments are required: --root"),
    ("train_classifier", ["--dataset", "mnist", "--root", P, "--steps", "abc"], "argument --steps: invalid int value"),
    ("train_classifier", ["--dataset", "mnist", "--seed", "1.5"], "argument --seed: invalid int value: '1.5'"),
    ("sample", [R, "--num-samples", "abc"], "argument --num-samples/--num: invalid int value: 'abc'"),
    ("sample", [R, "--num", "10", "--cg-scale", "x"], "argument --cg-scale: invalid float value: 'x'"),
    ("sample", [R], "the following arguments are required: --num-samples/--num"),
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


@pytest.mark.parametrize("job,argv,message", ARGPARSE, ids=[f"{j}-{i}" for i, (j, _, _) in enumerate(ARGPARSE)])
def test_a_mistyped_argument_is_one_line_naming_help(world, capsys, job, argv, message):
    argv = [a.format(config=world / "tiny.yaml", run=world / "run", world=world) for a in argv]
    before = snapshot(world)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        JOBS[job](argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, (argv, err)
    assert err[0].startswith("error: ") and message in err[0] and err[0].endswith(f"(see python -m jobs.{job} --help)")
    assert snapshot(world) == before


def test_enough_cases_for_every_job():
    assert len(CASES) >= 25 and {job for job, _, _ in CASES} == set(JOBS)
    assert json.dumps(CASES)  # plain data: the list is what the docs' fault matrix counts
