"""jobs.sample end to end on a tiny MNIST run (CPU): 1 process vs 2 under torchrun bit for bit, kill -9
and rerun, srun with 2 tasks on the CI cluster, npz / PNG outputs read back, and the bad inputs."""
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from PIL import Image

from jobs.sample import main as sample
from jobs.train import main as train

from conftest import ROOT, python_env, write_tiny_config

SAMPLE = [sys.executable, "-m", "jobs.sample"]
FAST = ["--sampler", "ddim", "--steps", "5", "--guidance", "3"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, mnist_root):
    d = tmp_path_factory.mktemp("sample")
    write_tiny_config(d, mnist_root)
    assert train(["--config", str(d / "tiny.yaml"), "--run-dir", str(d / "run"), "train.steps=10"]) == 0
    return d / "run"


def read(run, name):
    with h5py.File(run / "samples" / f"{name}.h5", "r") as f:
        return f["samples/images"][()], f["samples/labels"][()], dict(f["samples"].attrs)


def job(*args, launcher=SAMPLE, **kw):
    return subprocess.run([*launcher, *map(str, args)], cwd=ROOT, env=python_env(), capture_output=True, text=True,
                          timeout=300, **kw)


@pytest.fixture(scope="module")
def one_process(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("outputs")
    r = job(run, "--num", 300, "--batch", 50, "--out", "one", *FAST, "--npz", out / "one.npz", "--png-dir", out / "png")
    assert r.returncode == 0, r.stdout + r.stderr
    return read(run, "one"), out, r.stdout


def test_one_process_makes_balanced_labelled_samples_with_their_settings(one_process):
    (images, labels, attrs), _, stdout = one_process
    assert images.shape == (300, 28, 28, 1) and images.dtype == np.uint8
    assert labels.tolist() == [i % 10 for i in range(300)]
    assert (attrs["num"], attrs["sampler"], attrs["steps"], attrs["guidance"]) == (300, "ddim", 5, 3.0)
    assert "batch" not in attrs  # the shard size changes no sample (see the next test)
    assert "samples/s" in stdout and "done: 300 samples" in stdout


def test_a_stochastic_sampler_gives_the_same_samples_for_any_shard_size(run):
    """DDPM's per-step noise is a function of (seed, sample index, step): shards of 7 and of 20 give the
    same bytes, and a finished request is reused under another --batch."""
    ddpm = ["--num", 20, "--sampler", "ddpm", "--guidance", "3"]
    assert job(run, *ddpm, "--batch", 7, "--out", "ddpm7").returncode == 0
    r = job(run, *ddpm, "--batch", 20, "--out", "ddpm20")
    assert r.returncode == 0, r.stdout + r.stderr
    a, b = read(run, "ddpm7"), read(run, "ddpm20")
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert "already complete" in job(run, *ddpm, "--batch", 5, "--out", "ddpm7").stdout


def test_ddim_with_eta_is_named_for_it_and_the_same_for_any_shard_size(run, one_process):
    """DDIM with eta > 0 draws per-step noise as a function of (seed, sample index, step), like DDPM: shards
    of 7 and of 20 give the same bytes; the file's default name and attrs carry eta."""
    eta = ["--num", 20, "--sampler", "ddim", "--steps", "5", "--guidance", "3", "--eta", "0.5"]
    assert job(run, *eta, "--batch", 7).returncode == 0
    r = job(run, *eta, "--batch", 20, "--out", "eta20")
    assert r.returncode == 0, r.stdout + r.stderr
    a, b = read(run, "step_000000010_gamma_3_ddim5_eta0.5_n20_seed1234"), read(run, "eta20")
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2]["eta"] == 0.5
    (deterministic, _, _), _, _ = one_process  # the same request with eta 0 (its first 20 samples)
    assert not np.array_equal(a[0], deterministic[:20])


def test_two_processes_under_torchrun_give_the_same_samples_bit_for_bit(run, one_process):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29611",
                "-m", "jobs.sample"]
    r = job(run, "--num-samples", 300, "--batch", 50, "--out", "two", *FAST, launcher=launcher)
    assert r.returncode == 0, r.stdout + r.stderr
    images, labels, attrs = read(run, "two")
    (ref, ref_labels, _), _, _ = one_process
    assert np.array_equal(images, ref) and np.array_equal(labels, ref_labels)


def test_npz_and_png_outputs_read_back(one_process):
    (images, labels, _), out, _ = one_process
    with np.load(out / "one.npz") as z:
        assert np.array_equal(z["arr_0"], images) and np.array_equal(z["arr_1"], labels)
    pngs = sorted((out / "png").glob("*.png"))
    assert len(pngs) == 300 and pngs[0].name == "000000.png"
    assert np.array_equal(np.asarray(Image.open(out / "png" / "000123.png")), images[123, ..., 0])


def test_a_finished_request_is_not_redone(run, one_process, capsys):
    path = run / "samples" / "one.h5"
    before = path.stat().st_mtime_ns
    assert sample([str(run), "--num", "300", "--batch", "50", "--out", "one", *FAST]) == 0
    assert "already complete" in capsys.readouterr().out and path.stat().st_mtime_ns == before


def test_kill9_in_the_middle_then_rerun_finishes_without_redoing_a_shard(run, one_process):
    shards = run / "samples" / "killed.shards"
    args = [*SAMPLE, str(run), "--num", "300", "--batch", "25", "--out", "killed", *FAST]
    proc = subprocess.Popen(args, cwd=ROOT, env=python_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while len(list(shards.glob("shard_*.npz"))) < 3 and time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = sorted(p.name for p in shards.glob("shard_*.npz"))
    assert 3 <= len(kept) < 12 and not list(shards.glob("*.tmp*"))
    r = job(*args[3:])
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{len(kept)} of its 12 shards already committed" in r.stdout
    assert r.stdout.count(" committed · ") == 12 - len(kept)  # each missing shard once, no other
    images, labels, _ = read(run, "killed")
    (ref, ref_labels, _), _, _ = one_process
    assert np.array_equal(labels, ref_labels) and np.array_equal(images, ref)  # DDIM: batching changes nothing
    assert not shards.exists()


def test_sigusr2_stops_between_shards_with_exit_75_and_the_rerun_finishes(run):
    args = [*SAMPLE, str(run), "--num", "300", "--batch", "10", "--out", "usr2", *FAST]
    proc = subprocess.Popen(args, cwd=ROOT, env=python_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    shards = run / "samples" / "usr2.shards"
    deadline = time.time() + 120
    while not list(shards.glob("shard_*.npz")) and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGUSR2)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, out
    assert "stop requested" in out
    assert job(*args[3:]).returncode == 0 and read(run, "usr2")[0].shape == (300, 28, 28, 1)


@pytest.mark.slurm
def test_srun_with_two_tasks_is_preempted_requeued_and_equals_one_process(slurm, run, tmp_path):
    """`sbatch slurm/sample.sh` with 2 tasks: the time-limit warning (USR2) after the first shard stops both
    tasks between shards (exit 75), the job requeues itself, the rerun finishes only the missing shards,
    and the result equals one process's bit for bit."""
    from test_slurm import job_env, log_text, sbatch, wait_job

    args = ["--num", 200, "--batch", 5, *FAST]
    ref = job(run, *args, "--out", "srun-ref")
    assert ref.returncode == 0, ref.stderr
    jid = sbatch(tmp_path, "sample.sh", "--ntasks-per-node=2", "--gpus-per-node=2", "--mem=4G", run, *args,
                 "--out", "srun", env=job_env())
    log = tmp_path / "logs" / f"sample-{jid}.out"
    deadline = time.time() + 120
    while not list((run / "samples" / "srun.shards").glob("shard_*.npz")) and time.time() < deadline:
        time.sleep(0.05)
    subprocess.run(["scancel", "--batch", "--signal=USR2", jid], check=True, timeout=30)
    assert wait_job(jid, log, timeout=240) == [(jid, "COMPLETED", "0:0")], log_text(log)
    text = log.read_text()
    assert "2 rank(s)" in text and "stop requested" in text and "requeueing job" in text, text
    assert "shards already committed" in text.split("requeueing job")[1]
    images, labels, _ = read(run, "srun")
    ref_images, ref_labels, _ = read(run, "srun-ref")
    assert np.array_equal(images, ref_images) and np.array_equal(labels, ref_labels)


@pytest.fixture(scope="module")
def unconditional(tmp_path_factory, mnist_root):
    d = tmp_path_factory.mktemp("uncond")
    write_tiny_config(d, mnist_root)
    assert train(["--config", str(d / "tiny.yaml"), "--run-dir", str(d / "run"), "train.steps=2",
                  "model={arch: cs180_time_unet, hidden: 8}", "diffusion.p_uncond=0.0", "sample.guidance=[1.0]"]) == 0
    return d / "run"


def test_bad_inputs_are_one_line_exit_2_and_overwrite_nothing(run, one_process, unconditional, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    before = (run / "samples" / "one.h5").stat().st_mtime_ns
    cases = [
        ([str(tmp_path / "nope"), "--num", "10"], "not a run directory"),
        ([str(run), "--num", "0"], "--num must be >= 1"),
        ([str(unconditional), "--num", "10", "--guidance", "3"], "unconditional"),
        ([str(run), "--num", "10", "--png-dir", str(tmp_path / "file" / "png"), *FAST], "is not a writable directory"),
        ([str(run), "--num", "300", "--batch", "50", "--out", "one", *FAST[:-1], "5"], "other settings (differs in guidance)"),
        ([str(run), "--num", "10", "--out", "../x"], "must be a plain name"),
        ([str(run), "--num", "10", "--eta", "0.5", "--sampler", "ddpm"], "--eta 0.5 is DDIM's stochasticity"),
        ([str(run), "--num", "10", "--eta", "2"], "--eta must be in [0, 1]"),
    ]
    for argv, message in cases:
        assert sample(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err, (argv, err)
    assert (run / "samples" / "one.h5").stat().st_mtime_ns == before
    assert not list((run / "samples").glob("*.shards"))
