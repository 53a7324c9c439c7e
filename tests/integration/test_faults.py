"""The fault matrix of docs/RELIABILITY.md on real processes and real files: a second writer, a stale lock,
a full disk, damaged outputs and damaged run state. Each row: what the user sees (one line, an exit code)
and that nothing is lost (the run finishes bit-identical to an uninterrupted one)."""
import json
import shutil
import signal
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ddpm.errors import NO_SPACE_EXIT_CODE
from ddpm.run.samples import list_groups, read_samples

from conftest import (ROOT, TRAIN, assert_same_weights, latest_state, python_env, start_train, steps_once,
                      train_reference, wait_for_step, write_tiny_config)


def start(config, run_dir, *overrides, limit_bytes=None):
    return start_train(config, run_dir, *overrides, limit_bytes=limit_bytes, merge_stderr=False)


def finish(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def train(config, run_dir, *overrides, **kw):
    return finish(start(config, run_dir, *overrides, **kw))


def assert_same(run_a, run_b):
    a, b = latest_state(run_a), latest_state(run_b)
    assert a["step"] == b["step"]
    assert_same_weights(a, b)


@pytest.fixture(scope="module")
def config(mnist_root, tmp_path_factory):
    return write_tiny_config(tmp_path_factory.mktemp("cfg"), mnist_root)


@pytest.fixture(scope="module")
def reference(config, tmp_path_factory):
    """Uninterrupted runs of 20 and 60 steps, in subprocesses like the runs they are compared with."""
    d = tmp_path_factory.mktemp("reference")
    return {steps: train_reference(config, d / str(steps), f"train.steps={steps}") for steps in (20, 60)}


def test_a_second_trainer_on_a_live_run_dir_is_refused_and_the_first_is_untouched(config, reference, tmp_path):
    run = tmp_path / "run"
    first = start(config, run, "train.steps=60")
    wait_for_step(run, 3, first)
    rc, out, err = train(config, run, "train.steps=60")
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: {run} is in use: run dir locked by pid {first.pid} on ") and "heartbeat" in err
    rc, out, err = finish(first)
    assert rc == 0, err
    assert not (run / "lock.json").exists()  # released at the end
    steps_once(run, 60)
    assert_same(run, reference[60])


def test_a_lock_left_by_a_killed_trainer_is_taken_over(config, reference, tmp_path):
    run = tmp_path / "run"
    proc = start(config, run)
    wait_for_step(run, 7, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (run / "lock.json").exists()
    rc, out, err = train(config, run)
    assert rc == 0, err
    assert "took over the stale lock" in out and "is gone" in out and "resuming at step 5" in out
    steps_once(run, 20)
    assert_same(run, reference[20])


def test_a_file_size_limit_is_one_line_no_debris_then_a_bit_exact_resume(config, reference, tmp_path):
    """The first checkpoint is bigger than the limit: the job ends with one line naming what, where, how much
    space is free and the last good checkpoint, exit 74; the rerun without the limit resumes bit-exactly."""
    run = tmp_path / "run"
    rc, out, err = train(config, run, limit_bytes=64 * 1024)
    assert rc == NO_SPACE_EXIT_CODE and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: out of space writing checkpoint step 5 to {run}/checkpoints (File too large; ")
    assert "GiB free there); no checkpoint was written yet: free space or raise the quota, then rerun" in err
    debris = [p.name for p in (run / "checkpoints").iterdir()]
    assert debris == [], debris  # the half-written checkpoint is gone
    assert not (run / "lock.json").exists()
    rc, out, err = train(config, run)
    assert rc == 0, err
    steps_once(run, 20)
    assert_same(run, reference[20])


def _mount_tmpfs(path, size):
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def test_a_full_disk_keeps_the_last_good_checkpoint_and_resumes_bit_exactly(config, reference, tmp_path):
    """A real full filesystem (a small tmpfs; needs root, else skipped: the file-size test covers the rest)."""
    fs = tmp_path / "small"
    if not _mount_tmpfs(fs, "3m"):
        pytest.skip("cannot mount a tmpfs here (not root?)")
    try:
        run = fs / "run"
        filler = fs / "filler"
        rc, out, err = train(config, run, "train.steps=5")  # one checkpoint: how big is it?
        assert rc == 0, err
        size = (run / "checkpoints" / "step_000000005" / "state.pt").stat().st_size
        free = shutil.disk_usage(fs).free
        filler.write_bytes(b"\0" * max(0, free - size // 2))  # room for the logs, not for another checkpoint
        rc, out, err = train(config, run, "train.steps=20")
        assert rc == NO_SPACE_EXIT_CODE and len(err.strip().splitlines()) == 1, err
        assert "out of space" in err and "the last good checkpoint is step 5" in err, err
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_000000005"]
        filler.unlink()
        rc, out, err = train(config, run, "train.steps=20")
        assert rc == 0 and "resuming at step 5" in out, err
        steps_once(run, 20)
        assert_same(run, reference[20])
    finally:
        subprocess.run(["umount", str(fs)])


def _first_run(config, run, steps=5):
    rc, out, err = train(config, run, f"train.steps={steps}")
    assert rc == 0, err


def test_damaged_sample_archive_and_event_file_never_stop_training(config, reference, tmp_path):
    run = tmp_path / "run"
    _first_run(config, run)
    (run / "samples.h5").write_bytes(b"not an HDF5 file, a stray write")
    events = next((run / "tb").glob("events.out.tfevents.*"))
    data = bytearray(events.read_bytes())
    data[len(data) // 2] ^= 0xFF
    events.write_bytes(bytes(data))
    rc, out, err = train(config, run, "train.steps=20")
    assert rc == 0, err
    assert f"warning: {run}/samples.h5 was damaged; moved it to {run}/samples.h5.damaged-" in out
    assert f"warning: TensorBoard event file {events.name} is damaged; moved it to {run}/tb-damaged/" in out
    assert list_groups(run / "samples.h5") == ["train/step_000000020/gamma_1", "train/step_000000020/gamma_3"]
    assert read_samples(run / "samples.h5", "train/step_000000020/gamma_3")[0].shape == (10, 28, 28, 1)
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")][-1] == 20
    steps_once(run, 20)
    assert_same(run, reference[20])


def test_damaged_metrics_lines_are_set_aside_and_training_goes_on(config, reference, tmp_path):
    run = tmp_path / "run"
    _first_run(config, run)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:2] + ["{garbage"] + lines[2:]) + "\n")
    rc, out, err = train(config, run, "train.steps=20")
    assert rc == 0, err
    assert "has damaged lines; moved it to" in out
    assert list(run.glob("metrics.jsonl.damaged-*"))
    steps_once(run, 20)
    assert_same(run, reference[20])


def test_damaged_config_json_is_one_line_and_force_recovers(config, reference, tmp_path):
    run = tmp_path / "run"
    _first_run(config, run)
    (run / "config.json").write_text('{"name": "tiny", "data": ')
    for cmd in ([*TRAIN, "--config", str(config), "--run-dir", str(run)], [sys.executable, "-m", "jobs.evaluate", str(run)]):
        r = subprocess.run(cmd, cwd=ROOT, env=python_env(), capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "config.json is" in r.stderr and "--force" in r.stderr, r.stderr
    rc, out, err = train(config, run, "--force", "train.steps=20")
    assert rc == 0 and "resuming at step 5" in out, err
    assert json.loads((run / "config.json").read_text())["name"] == "tiny"
    assert_same(run, reference[20])


def test_damaged_latest_and_newest_manifest_fall_back_to_a_verified_checkpoint(config, reference, tmp_path):
    run = tmp_path / "run"
    _first_run(config, run, steps=10)
    (run / "checkpoints" / "latest").write_text("garbage\n")
    (run / "checkpoints" / "step_000000010" / "manifest.json").write_text("{")
    rc, out, err = train(config, run, "train.steps=20")
    assert rc == 0, err
    assert "ignoring garbled" in err and "step_000000010: unreadable manifest" in err and "resuming at step 5" in out
    steps_once(run, 20)
    assert_same(run, reference[20])


def test_a_trainer_that_lost_its_lock_stops_without_writing(config, tmp_path):
    """Someone took the lock over (a stale-lock takeover after a long stall, say): the old trainer stops at its
    next log step, before writing anything more."""
    run = tmp_path / "run"
    proc = start(config, run, "train.steps=2000", "checkpoint.every=1000")
    wait_for_step(run, 3, proc)
    holder = json.loads((run / "lock.json").read_text())
    (run / "lock.json").write_text(json.dumps({**holder, "token": "someone else", "pid": 1}))
    rc, out, err = finish(proc, timeout=120)
    assert rc == 2 and "another job took over the lock of" in err and len(err.strip().splitlines()) == 1, err
    assert not list(run.glob("checkpoints/step_*"))
