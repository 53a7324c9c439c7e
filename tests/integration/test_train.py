"""End-to-end training on real MNIST (CPU): learning, exact resume after kill -9 / SIGUSR2, checkpoint
fallback, DDP equivalence, epoch schedules (grids, GIFs, checkpoints, held-out loss, the best checkpoint),
and the bad inputs that must exit 2 and touch nothing."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import h5py
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ddpm.run.metrics_log import read_metrics
from ddpm.run.samples import list_groups
from jobs.train import main as train_main

from conftest import (ROOT, TRAIN, assert_same_weights, latest_state, python_env,
                      start_train, steps_once, train_reference, wait_for_step, write_small_mnist,
                      write_tiny_config)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, mnist_root):
    """An uninterrupted 20-step run of the tiny config."""
    d = tmp_path_factory.mktemp("ref")
    return train_reference(write_tiny_config(d, mnist_root), d / "run")


def resume_in_subprocess(config, run_dir):
    proc = start_train(config, run_dir)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    return out


def stop_with_usr2(config, run_dir, at_step):
    """Train until ``at_step``, then SIGUSR2: exit 75 with a checkpoint. Returns (its step, the output)."""
    proc = start_train(config, run_dir)
    wait_for_step(run_dir, at_step, proc)
    proc.send_signal(signal.SIGUSR2)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, out
    return int((run_dir / "checkpoints" / "latest").read_text().strip().split("_")[1]), out


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
        proc = start_train(tiny_config, run)
        wait_for_step(run, kill_at, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert "resuming at step" in resume_in_subprocess(tiny_config, run)
    steps_once(run, 20)
    assert_same_weights(latest_state(run), latest_state(reference))


def test_sigusr2_checkpoints_exits_75_and_resumes_bit_exact(tiny_config, tmp_path, reference):
    run = tmp_path / "run"
    stopped, out = stop_with_usr2(tiny_config, run, 7)
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
    assert_same_weights(latest_state(run), latest_state(reference))


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
    assert_same_weights(latest_state(run), latest_state(reference))


DDP = ["model.arch=res_unet", "model.channels=8", "train.steps=6", "train.batch_size=16", "train.grad_clip=0",
       "checkpoint.every=3", "sample.guidance=[1.0]"]


def test_two_process_ddp_matches_one_process_and_resumes(tmp_path, mnist_root):
    cfg = write_tiny_config(tmp_path, mnist_root, model="{arch: res_unet, channels: 8}")
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
    a, b = latest_state(single), latest_state(multi)
    # Reduction order differs between 1 and 2 ranks; Adam normalises near-zero gradients, so a rare
    # element can move by a fraction of one step (lr = 2e-3). A wrong data split moves most by ~lr.
    diff = torch.cat([(a["model"][k] - b["model"][k]).abs().flatten() for k in a["model"]])
    assert diff.max() < 1e-4 and diff.mean() < 1e-7, (diff.max(), diff.mean())
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in b["model"])


def test_two_processes_measure_the_epoch_and_held_out_losses_of_one(tmp_path, mnist_root):
    """On 64 training images (an epoch is 4 steps; the two processes resume at step 3, mid-epoch) and 41
    test images (21 + 20 on the ranks), the epoch's training loss and the held-out loss agree with one
    process up to far less than a wrong share of the images would change (a rank measuring only its part,
    or sums not reduced: percents). A GroupNorm net, as above: BatchNorm trains on each rank's half batch."""
    cfg = write_tiny_config(tmp_path, write_small_mnist(tmp_path / "data", 64, 50), model="{arch: res_unet, channels: 8}")
    overrides = [o for o in DDP if not o.startswith("model.")] + ["log.test_images=41", "checkpoint.best=true"]
    single, multi = tmp_path / "single", tmp_path / "multi"
    assert train_main(["--config", str(cfg), "--run-dir", str(single), *overrides]) == 0
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "jobs.train",
                "--config", str(cfg), "--run-dir", str(multi)]
    for steps in (3, 6):
        args = [o.replace("train.steps=6", f"train.steps={steps}") for o in overrides]
        r = subprocess.run(torchrun + args, cwd=ROOT, env=python_env(), capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
    one, two = (read_metrics(run / "metrics.jsonl")[3] for run in (single, multi))
    assert one["step"] == two["step"] == 4 and one["epoch"] == 1.0
    for key in ("epoch_loss", "test_loss", "test_loss/q0", "test_loss/q3"):
        assert two[key] == pytest.approx(one[key], rel=1e-3), key
    assert latest_state(single)["best"] == {"step": 4, "test_loss": one["test_loss"]}
    assert latest_state(multi)["best"]["step"] == 4


# 160 training images at batch 32: an epoch is 5 steps, the run 3 epochs (15 steps).
EPOCHS = dict(name="epochs", train="{batch_size: 32, epochs: 3, lr: 2.0e-3, ema_decay: 0.99, device: cpu, grad_clip: 1.0}",
              log="{every: 2, progress: lines, sample_every_epochs: [1, every 2], gif_every_epochs: [2], test_images: 40}",
              checkpoint="{every: 1000, every_epochs: [1], keep_last: 1, best: true}")


@pytest.fixture(scope="module")
def epoch_run(tmp_path_factory, mnist_root):
    """(config, run dir, output) of an uninterrupted 3-epoch run on 160 images, in a subprocess (the
    reference of the resumed runs: the same thread count)."""
    d = tmp_path_factory.mktemp("epochs")
    config = write_tiny_config(d, write_small_mnist(d / "data", 160, 100), "epochs.yaml", **EPOCHS)
    proc = start_train(config, d / "run")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    return config, d / "run", out


def epoch_rows(run_dir):
    return {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl") if "epoch_loss" in r}


def test_epoch_schedules_sample_save_and_measure_at_the_ends_of_epochs(epoch_run):
    config, run, out = epoch_run
    lines = out.splitlines()
    assert lines[0] == "model: cs180_class_unet, 32,457 parameters"  # the job's first line
    assert "starting: 15 steps (3 epochs of 5)" in lines[1]
    assert "sample grids at the end of epoch 1, 2 (step = epoch x 5)" in out
    assert "held-out loss of 40 test images at the end of epoch 1, 2, 3" in out
    # Grids at epochs 1 and 2 (and the end), GIFs at epoch 2, each scale; the archive says which epoch.
    names = sorted(p.name for p in (run / "samples").iterdir())
    assert names == sorted(f"step_{s:09d}_gamma_{g}.{ext}" for s, ext in ((5, "png"), (10, "png"), (15, "png"),
                                                                         (10, "gif")) for g in (1, 3))
    groups = list_groups(run / "samples.h5")
    assert groups == [f"train/step_{s:09d}/gamma_{g}" for s in (5, 10, 15) for g in (1, 3)]
    with h5py.File(run / "samples.h5", "r") as f:
        assert [int(f[f"train/step_{s:09d}/gamma_3"].attrs["epoch"]) for s in (5, 10, 15)] == [1, 2, 3]
    with Image.open(run / "samples" / "step_000000010_gamma_3.gif") as gif:
        assert gif.n_frames == 6  # every one of the 5 DDIM steps, then the samples
    # The epochs' rows: mean training loss and held-out loss; the epoch's loss is the mean of its steps.
    rows, every = epoch_rows(run), read_metrics(run / "metrics.jsonl")
    assert sorted(rows) == [5, 10, 15] and all({"test_loss", "test_loss/q0"} <= r.keys() for r in rows.values())
    by_step = {r["step"]: r for r in every}
    assert rows[5]["epoch_loss"] == pytest.approx((2 * by_step[2]["loss"] + 2 * by_step[4]["loss"] + by_step[5]["loss"])
                                                  / 5, rel=1e-9)
    assert f"epoch 1: train loss {rows[5]['epoch_loss']:.4f} | test loss {rows[5]['test_loss']:.4f}" in out
    tb = EventAccumulator(str(run / "tb"))  # TensorBoard's own reader: the same numbers next to the loss
    tb.Reload()
    for tag in ("epoch_loss", "test_loss"):
        assert [(e.step, round(e.value, 5)) for e in tb.Scalars(tag)] == [(s, round(rows[s][tag], 5)) for s in (5, 10, 15)]
    # Checkpoints: epoch 1's is kept (checkpoint.every_epochs), keep_last=1 keeps the end, `best` the lowest.
    best = min(rows, key=lambda s: rows[s]["test_loss"])
    steps = sorted(int(p.name[5:]) for p in (run / "checkpoints").glob("step_*"))
    assert steps == sorted({5, best, 15})
    assert (run / "checkpoints" / "best").read_text() == f"step_{best:09d}\n"
    assert latest_state(run)["best"] == {"step": best, "test_loss": rows[best]["test_loss"]}
    assert f"best: {run}/checkpoints/step_{best:09d} (test loss {rows[best]['test_loss']:.4f}" in out


def test_a_resume_mid_epoch_repeats_the_epoch_losses_and_the_best_checkpoint(epoch_run, tmp_path):
    config, reference, _ = epoch_run
    run = tmp_path / "run"
    stopped, _ = stop_with_usr2(config, run, 6)
    state = torch.load(run / "checkpoints" / f"step_{stopped:09d}" / "state.pt", weights_only=True)
    assert state["epoch_loss"][1] == (stopped % 5) * 32  # the epoch's training losses so far (images)
    resume_in_subprocess(config, run)
    keys = ("loss", "epoch_loss", "test_loss", "test_loss/q0", "test_loss/q1", "test_loss/q2", "test_loss/q3")
    ours, ref = epoch_rows(run), epoch_rows(reference)
    assert {s: [r[k] for k in keys] for s, r in ours.items()} == {s: [r[k] for k in keys] for s, r in ref.items()}
    assert_same_weights(latest_state(run), latest_state(reference))
    assert latest_state(run)["best"] == latest_state(reference)["best"]
    assert (run / "checkpoints" / "best").read_text() == (reference / "checkpoints" / "best").read_text()
    # A `best` pointer that disagrees with the checkpoint's record (a crash between the save and the
    # pointer) is put right when the run resumes; an extended run goes on choosing the lowest.
    (run / "checkpoints" / "best").write_text("step_000000005\n")
    r = subprocess.run([*TRAIN, "--config", str(config), "--run-dir", str(run), "train.epochs=4"], cwd=ROOT,
                       env=python_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = epoch_rows(run)
    best = min(rows, key=lambda s: rows[s]["test_loss"])
    assert sorted(rows) == [5, 10, 15, 20] and (run / "checkpoints" / "best").read_text() == f"step_{best:09d}\n"
    assert (run / "checkpoints" / f"step_{best:09d}").is_dir()


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
        (["--config", c, "--run-dir", new, "log.sample_every_epochs=[0]"], "must be a period"),
        (["--config", c, "--run-dir", new, "checkpoint.every_epochs=often"], "must be a period"),
        (["--config", c, "--run-dir", new, "log.gif_every_epochs=-2"], "must be a period"),
        (["--config", c, "--run-dir", new, "log.test_images=0"], r"log.test_images must be in \[1"),
        (["--config", c, "--run-dir", new, "checkpoint.best=true", "log.test_every_epochs=0"], "needs the held-out"),
        (["--config", c, "--run-dir", new, "sample.sampler=ddpm"], "the ddpm sampler runs all T=50 steps"),
        (["--config", c, "--run-dir", new, "--frobnicate"], r"unrecognized arguments: --frobnicate \(see"),
    ]


def test_bad_inputs_exit_2_with_one_line_and_touch_nothing(tmp_path, tiny_config, existing_run, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # train.device=cuda must fail on GPU hosts too
    for argv, pattern in bad_input_cases(tmp_path, tiny_config, existing_run):
        before = snapshot(tmp_path)
        try:
            rc = train_main(argv)
        except SystemExit as e:  # argparse's errors
            rc = e.code
        assert rc == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), (argv, err)
        assert re.search(pattern, err[0]), (argv, err[0])
        assert snapshot(tmp_path) == before, f"{argv} wrote something"


def test_dry_run_prints_and_writes_nothing(tiny_config, tmp_path, capsys):
    run = tmp_path / "run"
    assert train_main(["--config", str(tiny_config), "--run-dir", str(run), "--dry-run", "train.lr=3e-4"]) == 0
    out = capsys.readouterr().out
    assert '"lr": 0.0003' in out and f"run dir: {run} (new run)" in out
    assert "model: cs180_class_unet, 32,457 parameters" in out  # counted without making the weights
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
    state = latest_state(run)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
