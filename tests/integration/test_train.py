"""End-to-end training on real MNIST (CPU): learning, exact resume after kill -9 / SIGUSR2, checkpoint
fallback, DDP equivalence, and the bad inputs that must exit 2 and touch nothing."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import h5py
import pytest
import torch
from PIL import Image

from ddpm.run.metrics_log import read_metrics
from ddpm.run.samples import list_groups
from jobs.train import main as train_main

from conftest import ROOT, python_env

TRAIN = [sys.executable, "-m", "jobs.train"]


def final_weights(run_dir):
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    return torch.load(run_dir / "checkpoints" / latest / "state.pt", map_location="cpu", weights_only=True)


def assert_same_weights(a, b):
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs"


def start(config, run_dir, *overrides):
    return subprocess.Popen([*TRAIN, "--config", str(config), "--run-dir", str(run_dir), *overrides], cwd=ROOT,
                            env=python_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_step(run_dir, step, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = run_dir / "metrics.jsonl"
        if path.exists() and any(r["step"] >= step for r in read_metrics(path)):
            return
        assert proc.poll() is None, f"training exited early:\n{proc.stdout.read()}"
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def steps_once(run_dir, total):
    lines = [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, total + 1))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, mnist_root):
    """An uninterrupted 20-step run of the tiny config, in a subprocess with the same environment (thread
    count) as the interrupted runs: bit-exactness holds for a fixed machine and thread count."""
    from conftest import TINY_MNIST
    d = tmp_path_factory.mktemp("ref")
    cfg = d / "tiny.yaml"
    cfg.write_text(TINY_MNIST.format(root=mnist_root))
    proc = start(cfg, d / "run")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    return d / "run"


def resume_in_subprocess(config, run_dir):
    proc = start(config, run_dir)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    return out


def test_uninterrupted_run_layout(reference):
    assert (reference / "config.json").is_file()
    steps = sorted(p.name for p in (reference / "checkpoints").glob("step_*"))
    assert steps == ["step_000000015", "step_000000020"]  # keep_last=2
    assert any((reference / "tb").glob("events.out.tfevents.*"))
    steps_once(reference, 20)
    groups = list_groups(reference / "samples.h5")
    assert groups == ["train/step_000000020/gamma_1", "train/step_000000020/gamma_3"]
    with h5py.File(reference / "samples.h5", "r") as f:
        g = f["train/step_000000020/gamma_3"]
        assert g["images"].shape == (10, 28, 28, 1) and g["images"].dtype == "uint8"
        assert list(g["labels"][:]) == list(range(10))
        assert g.attrs["guidance_scale"] == 3.0 and g.attrs["guidance_convention"] == "gamma"
        assert g.attrs["step"] == 20 and bool(g.attrs["ema"])
    # Every sampling event also leaves a labelled PNG per scale: 10 rows (classes) of per_class=1 images,
    # drawn 2x, with a title above and the class names left of the grid.
    pngs = sorted(p.name for p in (reference / "samples").iterdir())
    assert pngs == ["step_000000020_gamma_1.png", "step_000000020_gamma_3.png"]
    with Image.open(reference / "samples" / pngs[1]) as im:
        assert im.mode in ("RGB", "RGBA") and im.height > 10 * 2 * 30 and im.width > 2 * 30


def test_loss_goes_down_on_real_mnist(tiny_config, tmp_path):
    run = tmp_path / "run"
    assert train_main(["--config", str(tiny_config), "--run-dir", str(run), "train.steps=80"]) == 0
    loss = [r["loss"] for r in read_metrics(run / "metrics.jsonl")]
    first, last = sum(loss[:10]) / 10, sum(loss[-10:]) / 10
    assert last < 0.6 * first, (first, last)


def test_kill9_at_random_steps_resumes_bit_exact(tiny_config, tmp_path, reference):
    run = tmp_path / "run"
    for kill_at in (3, 9, 16):  # fixed "random" steps: before, between and after checkpoints
        proc = start(tiny_config, run)
        wait_for_step(run, kill_at, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert "resuming at step" in resume_in_subprocess(tiny_config, run)
    steps_once(run, 20)
    assert_same_weights(final_weights(run), final_weights(reference))


def test_sigusr2_checkpoints_exits_75_and_resumes_bit_exact(tiny_config, tmp_path, reference):
    run = tmp_path / "run"
    proc = start(tiny_config, run)
    wait_for_step(run, 7, proc)
    proc.send_signal(signal.SIGUSR2)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, out
    stopped = int((run / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert 7 <= stopped < 20 and f"at step {stopped}: checkpoint saved" in out
    out = resume_in_subprocess(tiny_config, run)
    assert f"resuming at step {stopped}" in out
    # The last line sums up the run this process did: its steps, wall time and average throughput.
    assert re.search(rf"done: 20 steps, run dir .* \({20 - stopped} steps in \d:\d\d:\d\d: [\d,]+ img/s on average",
                     out), out
    # Then where to look and what to run next.
    assert f"samples: {run}/samples/step_000000020_gamma_3.png (also step_000000020_gamma_1.png)" in out, out
    assert f"python -m jobs.evaluate {run}" in out and f"python -m jobs.tensorboard {run.parent}" in out
    steps_once(run, 20)
    assert_same_weights(final_weights(run), final_weights(reference))


def test_a_sample_grid_that_cannot_be_written_is_a_warning_not_the_end(tiny_config, tmp_path, capsys):
    run = tmp_path / "run"
    assert train_main(["--config", str(tiny_config), "--run-dir", str(run), "train.steps=3"]) == 0
    shutil.rmtree(run / "samples")
    (run / "samples").write_text("a file where the grids' folder should be")
    capsys.readouterr()
    assert train_main(["--config", str(tiny_config), "--run-dir", str(run), "train.steps=5"]) == 0
    out = capsys.readouterr().out
    assert f"warning: could not write the sample grid {run}/samples/step_000000005_gamma_1.png" in out
    assert "train/step_000000005/gamma_3" in list_groups(run / "samples.h5")  # the archive still has them
    assert "samples:" not in out and "next:" in out  # no grid to point at, the next commands still


def test_truncated_newest_checkpoint_falls_back(tiny_config, tmp_path, reference):
    run = tmp_path / "run"
    resume_in_subprocess(tiny_config, run)
    newest = run / "checkpoints" / "step_000000020" / "state.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    out = resume_in_subprocess(tiny_config, run)
    assert "step_000000020" in out and "truncated" in out  # the warning names the skipped checkpoint
    assert "resuming at step 15" in out
    steps_once(run, 20)
    assert_same_weights(final_weights(run), final_weights(reference))


DDP = ["model.arch=res_unet", "model.channels=8", "train.steps=6", "train.batch_size=16", "train.grad_clip=0",
       "checkpoint.every=3", "sample.guidance=[1.0]"]


def test_two_process_ddp_matches_one_process_and_resumes(tmp_path, mnist_root):
    from conftest import TINY_MNIST
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY_MNIST.format(root=mnist_root).replace("model: {arch: cs180_class_unet, hidden: 8}",
                                                             "model: {arch: res_unet, channels: 8}"))
    overrides = [o for o in DDP if not o.startswith("model.")]
    single, multi = tmp_path / "single", tmp_path / "multi"
    assert train_main(["--config", str(cfg), "--run-dir", str(single), *overrides]) == 0
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "jobs.train",
                "--config", str(cfg), "--run-dir", str(multi)]
    half = [o.replace("train.steps=6", "train.steps=3") for o in overrides]
    r = subprocess.run(torchrun + half, cwd=ROOT, env=python_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "on 2 x cpu" in r.stdout
    r = subprocess.run(torchrun + overrides, cwd=ROOT, env=python_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resuming at step 3" in r.stdout
    steps_once(multi, 6)
    a, b = final_weights(single), final_weights(multi)
    # Reduction order differs between 1 and 2 ranks; Adam normalises near-zero gradients, so a rare
    # element can move by a fraction of one step (lr = 2e-3). A wrong data split moves most by ~lr.
    diff = torch.cat([(a["model"][k] - b["model"][k]).abs().flatten() for k in a["model"]])
    assert diff.max() < 1e-4 and diff.mean() < 1e-7, (diff.max(), diff.mean())
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in b["model"])


def snapshot(path):
    # Files and folders, but not the folders' mtimes: a resume refused after it took the run dir's lock
    # (a checkpoint that does not fit) has created and removed lock.json, and changed no file.
    return sorted((str(p.relative_to(path)), p.stat().st_size if p.is_file() else None,
                   p.stat().st_mtime_ns if p.is_file() else None) for p in path.rglob("*"))


@pytest.fixture
def existing_run(tiny_config, tmp_path):
    run = tmp_path / "existing"
    assert train_main(["--config", str(tiny_config), "--run-dir", str(run), "train.steps=5"]) == 0
    return run


def bad_input_cases(tmp_path, tiny_config, existing_run):
    broken_yaml = tmp_path / "broken.yaml"
    broken_yaml.write_text(tiny_config.read_text().replace("T: 50,", "T: [50,"))
    corrupt_root = tmp_path / "corrupt"
    (corrupt_root / "MNIST" / "raw").mkdir(parents=True)
    src = os.path.join(json.loads((existing_run / "config.json").read_text())["data"]["root"], "MNIST", "raw")
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        data = open(os.path.join(src, name), "rb").read()
        (corrupt_root / "MNIST" / "raw" / name).write_bytes(data[: len(data) // 2] if "images" in name else data)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    new = str(tmp_path / "new-run")
    c = str(tiny_config)
    return [
        (["--config", str(tmp_path / "missing.yaml"), "--run-dir", new], "not found"),
        (["--config", str(broken_yaml), "--run-dir", new], "YAML syntax error .* line 5"),
        (["--config", c, "--run-dir", new, "train.lrr=1"], "did you mean 'lr'"),
        (["--config", c, "--run-dir", new, "train.batch_size=many"], "train.batch_size must be a number"),
        (["--config", c, "--run-dir", new, "diffusion.p_uncond=2"], "diffusion.p_uncond must be in"),
        (["--config", c, "--run-dir", new, f"data.root={tmp_path / 'nodata'}"], "prepare_data"),
        (["--config", c, "--run-dir", new, f"data.root={corrupt_root}"], "corrupt|truncated"),
        (["--config", c, "--run-dir", str(existing_run), "train.lr=0.5"], "different config"),
        (["--config", c, "--run-dir", str(a_file / "run")], "cannot write|not a run directory"),
        (["--config", c, "--run-dir", str(existing_run), "model.hidden=16", "--force"], "does not fit"),
        (["--config", c, "--run-dir", new, "train.device=cuda"], "CUDA is not available"),
        (["--config", c, "--run-dir", new, "train.lr="], "malformed override"),
        (["--config", c, "--run-dir", new, "=3"], "malformed override"),
        (["--config", c, "--run-dir", new, "train.batch_size=70000"], "fewer than one batch"),
    ]


def test_bad_inputs_exit_2_with_one_line_and_touch_nothing(tmp_path, tiny_config, existing_run, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # train.device=cuda must fail on GPU hosts too
    for argv, pattern in bad_input_cases(tmp_path, tiny_config, existing_run):
        before = snapshot(tmp_path)
        assert train_main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), (argv, err)
        assert re.search(pattern, err[0]), (argv, err[0])
        assert snapshot(tmp_path) == before, f"{argv} wrote something"


def test_dry_run_prints_and_writes_nothing(tiny_config, tmp_path, capsys):
    run = tmp_path / "run"
    assert train_main(["--config", str(tiny_config), "--run-dir", str(run), "--dry-run", "train.lr=3e-4"]) == 0
    out = capsys.readouterr().out
    assert '"lr": 0.0003' in out and f"run dir: {run} (new run)" in out
    assert not run.exists()


def test_help_and_subprocess_exit_code(tmp_path):
    r = subprocess.run([*TRAIN, "--help"], cwd=ROOT, env=python_env(), capture_output=True, text=True)
    assert r.returncode == 0 and "--dry-run" in r.stdout and "examples:" in r.stdout
    r = subprocess.run([*TRAIN, "--config", "nope.yaml"], cwd=ROOT, env=python_env(), capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: config file nope.yaml not found")


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(tiny_config, tmp_path, monkeypatch, capsys):
    from ddpm.train.loop import Trainer
    real_loss = Trainer.forward_loss

    def poisoned(self, *args):
        out, t = real_loss(self, *args)
        return (out * float("nan") if self.step >= 7 else out), t

    monkeypatch.setattr(Trainer, "forward_loss", poisoned)
    run = tmp_path / "run"
    assert train_main(["--config", str(tiny_config), "--run-dir", str(run)]) == 1
    err = capsys.readouterr().err
    assert "error: the loss became NaN/Inf at or before step 8; the last good checkpoint (step 5) is intact" in err
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_000000005"]
    state = final_weights(run)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
