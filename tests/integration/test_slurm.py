"""The sbatch templates in slurm/, submitted unchanged to a real SLURM cluster (../shared/slurm-ci).

Jobs run from a temporary working directory (so logs/ and runs/ land there, as they would in a user's
checkout) with sbatch command-line options only for what the CI node lacks: 1 CPU per task and a short
--time. The node declares 4 GPUs without CUDA behind them, so training falls back to CPU + gloo.
The fast tests at the end check the shell helpers without a cluster.
"""
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ddpm.run import restarts
from ddpm.run import samples as archive
from ddpm.train.dist import master_port

from conftest import ROOT, SHARED, _missing, python_env, write_tiny_config

SLURM_DIR = ROOT / "slurm"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE"}
CI_OPTS = ["--time=5", "--cpus-per-task=1"]  # every job: a time limit, and 1 of the node's 8 CPUs


# ----- helpers ---------------------------------------------------------------------------------------

def job_env(**extra):
    """What sbatch passes on to the job: this Python first on PATH (so the templates' `python` is the
    venv's), the repo importable, no leftover template variables from the caller's shell."""
    env = {k: v for k, v in python_env().items()
           if k not in ("DDPM_RUN_DIR", "DDPM_CONFIG", "DDPM_ROOT", "DDPM_PYTHON", "MASTER_ADDR", "MASTER_PORT")}
    bindir = Path(sys.executable).parent
    env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"
    if not (bindir / "python").exists():
        env["DDPM_PYTHON"] = sys.executable
    env.update({k: str(v) for k, v in extra.items()})
    return env


def sbatch(workdir, script, *args, env=None):
    """Submit slurm/<script> from `workdir` (its logs/ made first); returns the job id."""
    (workdir / "logs").mkdir(exist_ok=True)
    r = subprocess.run(["sbatch", "--parsable", *CI_OPTS, *_split_opts(args, script)], cwd=workdir,
                       env=env or job_env(), capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, f"sbatch {script} failed: {r.stderr}"
    return r.stdout.strip().split(";")[0]


def _split_opts(args, script):
    """sbatch options (leading --x) go before the script, the rest are the script's arguments."""
    args = [str(a) for a in args]
    n = next((i for i, a in enumerate(args) if not a.startswith("--")), len(args))
    return [*args[:n], str(SLURM_DIR / script), *args[n:]]


def slurm_cmd(*cmd, conf=None, check=False):
    """Run a SLURM client command (against the cluster of SLURM_CONF `conf`, default the main one)."""
    env = dict(os.environ, SLURM_CONF=conf) if conf else None
    return subprocess.run(list(cmd), env=env, capture_output=True, text=True, timeout=30, check=check).stdout


def sacct(job_id, duplicates=False, conf=None, fields="JobID,State,ExitCode", allocations=True):
    """[(JobID, State, ExitCode), ...] of the job's allocations (array tasks, earlier runs if asked)."""
    out = slurm_cmd("sacct", *(["-X"] if allocations else []), "-n", "-P", "-j", job_id, "-o", fields,
                    *(["--duplicates"] if duplicates else []), conf=conf)
    return [tuple(line.split("|")) for line in out.split("\n") if line.strip()]


def start_end(job_id):
    """(Start, End) of the job's latest run, ISO timestamps that sort in time order."""
    return sacct(job_id, fields="Start,End")[-1]


def log_text(path, limit=6000):
    path = Path(path)
    text = path.read_text(errors="replace") if path.exists() else f"(no log at {path})"
    return text if len(text) <= limit else "...\n" + text[-limit:]


def wait_job(job_id, logs, timeout=240, n_tasks=1, conf=None):
    """Wait until every allocation of the job is in a final state; returns sacct's rows. On timeout the
    assertion message holds the job's log(s)."""
    end, rows = time.monotonic() + timeout, []
    while time.monotonic() < end:
        rows = sacct(job_id, conf=conf)
        if len(rows) >= n_tasks and all(state.split()[0] in TERMINAL for _, state, _ in rows):
            return rows
        time.sleep(1)
    slurm_cmd("scancel", job_id, conf=conf)
    logs = logs if isinstance(logs, (list, tuple)) else [logs]
    pytest.fail(f"job {job_id} not done after {timeout}s: {rows}\n" + "\n".join(log_text(p) for p in logs))


def wait_for_steps(metrics, n, job_id, log, timeout=180, conf=None):
    """Wait until metrics.jsonl logs at least n optimizer steps (the job is mid-training)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= n:
            return
        if any(state.split()[0] in TERMINAL for _, state, _ in sacct(job_id, conf=conf)):
            break
        time.sleep(0.2)
    pytest.fail(f"job {job_id} never reached step {n}: {sacct(job_id, conf=conf)}\n{log_text(log)}")


def logged_steps(run_dir):
    return [json.loads(line)["step"] for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def final_state(run_dir):
    ckpt = Path(run_dir) / "checkpoints"
    return torch.load(ckpt / (ckpt / "latest").read_text().strip() / "state.pt", map_location="cpu", weights_only=True)


def assert_same_weights(run_dir, reference, what):
    got, want = final_state(run_dir), final_state(reference)
    assert got["step"] == want["step"]
    for part in ("model", "ema"):
        assert got[part].keys() == want[part].keys()
        differ = [k for k in want[part] if not torch.equal(got[part][k], want[part][k])]
        assert not differ, f"{what}: {part} weights differ from the uninterrupted run in {differ[:5]}"


@pytest.fixture(scope="module")
def tiny_yaml(mnist_root, tmp_path_factory):
    """The tiny CPU MNIST config of conftest, shared by the jobs of this module."""
    return write_tiny_config(tmp_path_factory.mktemp("cfg"), mnist_root, "tiny_mnist.yaml")


# ----- 1. the template as shipped -------------------------------------------------------------------

@pytest.mark.slurm
def test_mnist_template_trains_on_cpu_when_the_gpus_have_no_cuda(slurm, mnist_root, tmp_path):
    """`sbatch slurm/mnist.sh overrides...` with configs/mnist.yaml (train.device=auto): COMPLETED, and
    the run dir runs/mnist-<id> holds checkpoints, TensorBoard events and samples.h5."""
    small = [f"data.root={mnist_root}", "model.hidden=8", "diffusion.T=50", "train.batch_size=32", "train.steps=10",
             "train.warmup_steps=0", "log.every=1", "checkpoint.every=5", "sample.sampler=ddim", "sample.steps=5",
             "sample.per_class=1", "sample.guidance=[1.0]"]
    job = sbatch(tmp_path, "mnist.sh", *small)
    log = tmp_path / "logs" / f"mnist-{job}.out"
    rows = wait_job(job, log)
    assert rows == [(job, "COMPLETED", "0:0")], log_text(log)
    text = log.read_text()
    assert "on 1 x cpu" in text and f"run dir: runs/mnist-{job} (new run)" in text, text

    run = tmp_path / "runs" / f"mnist-{job}"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000000010"
    assert (run / "checkpoints" / "step_000000010" / "state.pt").is_file()
    assert logged_steps(run) == list(range(1, 11))
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == list(range(1, 11))
    assert archive.list_groups(run / "samples.h5") == ["train/step_000000010/gamma_1"]
    images, labels, attrs = archive.read_samples(run / "samples.h5", "train/step_000000010/gamma_1")
    assert images.shape == (10, 28, 28, 1) and attrs["step"] == 10


@pytest.mark.slurm
def test_cifar10_template_trains_four_tasks_on_the_real_subset(slurm, cifar_subset, tmp_path):
    """`sbatch slurm/cifar10.sh` unchanged (4 tasks, 4 declared GPUs without CUDA: gloo on CPU) against the
    real CIFAR-10 subset, at a small width: COMPLETED, every rank took part, colour samples archived."""
    small = [f"data.root={cifar_subset}", "model.base=16", "model.num_groups=8", "model.ch_mult=[1,2]",
             "model.num_res_blocks=1", "train.batch_size=16", "train.steps=6", "train.warmup_steps=0",
             "log.every=1", "checkpoint.every=3", "sample.steps=3", "sample.per_class=1", "sample.guidance=[3.0]"]
    job = sbatch(tmp_path, "cifar10.sh", "--mem=6G", *small)
    log = tmp_path / "logs" / f"cifar10-{job}.out"
    rows = wait_job(job, log, timeout=300)
    assert rows == [(job, "COMPLETED", "0:0")], log_text(log)
    text = log.read_text()
    assert "on 4 x cpu" in text and f"run dir: runs/cifar10-{job} (new run)" in text, text
    run = tmp_path / "runs" / f"cifar10-{job}"
    assert logged_steps(run) == list(range(1, 7))
    images, labels, attrs = archive.read_samples(run / "samples.h5", "train/step_000000006/w_3")
    assert images.shape == (10, 32, 32, 3) and labels.tolist() == list(range(10))


# ----- 2./3. preemption: signal -> checkpoint -> exit 75 -> requeue -> resume; also with 2 tasks ----

PREEMPT_STEPS = 80


@pytest.fixture(scope="module")
def preempted(slurm, tiny_yaml, tmp_path_factory):
    """Jobs interrupted mid-training, side by side:
    usr2     the time-limit warning as `--signal=B:USR2` delivers it (to the batch shell only);
    requeue  `scontrol requeue` (SIGTERM to the batch shell and the tasks);
    ddp      a 2-task job (DDP over gloo) getting the time-limit warning;
    plus the 1-process run uninterrupted (python -m jobs.train), and an evaluation job chained to the
    usr2 job with --dependency=afterok."""
    work = tmp_path_factory.mktemp("preempt")
    overrides = [f"train.steps={PREEMPT_STEPS}", "checkpoint.every=10", "sample.guidance=[1.0]"]
    env, submitted, reference = job_env(DDPM_CONFIG=tiny_yaml), [], None

    def submit(script, *args):
        submitted.append(sbatch(work, script, *args, env=env))
        return submitted[-1]

    try:
        jobs = {"usr2": submit("mnist.sh", *overrides), "requeue": submit("mnist.sh", *overrides),
                "ddp": submit("mnist.sh", "--ntasks-per-node=2", "--gpus-per-node=2", *overrides)}
        evaluation = submit("evaluate.sh", f"--dependency=afterok:{jobs['usr2']}", f"runs/mnist-{jobs['usr2']}",
                            "--only", "curves")
        reference = subprocess.Popen([sys.executable, "-m", "jobs.train", "--config", str(tiny_yaml), *overrides,
                                      "--run-dir", str(work / "reference")], cwd=work, env=python_env(),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        logs = {k: work / "logs" / f"mnist-{j}.out" for k, j in jobs.items()}
        for kind, job in jobs.items():
            wait_for_steps(work / "runs" / f"mnist-{job}" / "metrics.jsonl", 3, job, logs[kind])
            cmd = ["scontrol", "requeue", job] if kind == "requeue" else ["scancel", "--batch", "--signal=USR2", job]
            subprocess.run(cmd, check=True, timeout=30)
        out = {k: dict(job=j, rows=wait_job(j, logs[k]), log=logs[k], run=work / "runs" / f"mnist-{j}")
               for k, j in jobs.items()}
        eval_log = work / "logs" / f"evaluate-{evaluation}.out"
        out["evaluate"] = dict(job=evaluation, rows=wait_job(evaluation, eval_log), log=eval_log)
        ref_out, _ = reference.communicate(timeout=300)
        assert reference.returncode == 0, ref_out
        out["reference"] = work / "reference"
        yield out
    finally:  # nothing of a failed setup lingers (no-ops once everything finished)
        subprocess.run(["scancel", *submitted], timeout=30)
        if reference is not None and reference.poll() is None:
            reference.kill()
            reference.wait()


def check_requeued_once(p, signal, conf=None):
    """The job ran twice under one id (REQUEUED, then COMPLETED), stopped on `signal` mid-run, resumed
    where it stopped, and logged every optimizer step exactly once. Returns the step it stopped at."""
    text = log_text(p["log"], limit=20000)
    assert p["rows"] == [(p["job"], "COMPLETED", "0:0")], text
    assert [state for _, state, _ in sacct(p["job"], duplicates=True, conf=conf)] == ["REQUEUED", "COMPLETED"], text
    assert f"preemption signal ({signal}) at step" in text, text
    stopped = int(text.split(f"preemption signal ({signal}) at step ")[1].split(":")[0])
    assert 0 < stopped < PREEMPT_STEPS and f"resuming at step {stopped}:" in text, text
    assert logged_steps(p["run"]) == list(range(1, PREEMPT_STEPS + 1)), "every step logged exactly once"
    return stopped


@pytest.mark.slurm
@pytest.mark.parametrize("kind,signal", [("usr2", "SIGUSR2"), ("requeue", "SIGTERM")])
def test_preempted_job_is_requeued_and_resumes_bit_exactly(preempted, kind, signal):
    p = preempted[kind]
    stopped = check_requeued_once(p, signal)
    if kind == "usr2":  # only the batch shell got the signal: it handed it on and requeued the job
        text = p["log"].read_text()
        assert "batch shell got SIGUSR2, forwarding it" in text and "requeueing job" in text, text
    assert_same_weights(p["run"], preempted["reference"], f"{kind} (stopped at step {stopped})")


@pytest.mark.slurm
def test_two_task_job_is_preempted_and_resumes_on_a_fresh_rendezvous(preempted):
    p = preempted["ddp"]
    stopped = check_requeued_once(p, "SIGUSR2")
    text = p["log"].read_text()
    assert text.count("global batch 32 on 2 x cpu") == 2, text  # both runs: 2 ranks in the process group
    assert stopped % 10 == 0, "with several ranks the flag is agreed on every 10th step"
    steps = sacct(f"{p['job']}.0", duplicates=True, fields="NTasks", allocations=False)
    assert steps == [("2",), ("2",)], steps  # the training step ran as 2 tasks, before and after the requeue
    ports = [int(line.rsplit(":", 1)[1]) for line in text.splitlines() if "rendezvous " in line]
    assert ports == [master_port(int(p["job"]), 0), master_port(int(p["job"]), 1)], ports


@pytest.mark.slurm
def test_evaluation_chained_with_afterok_starts_after_the_requeued_training_completed(preempted):
    train, ev = preempted["usr2"], preempted["evaluate"]
    assert ev["rows"] == [(ev["job"], "COMPLETED", "0:0")], log_text(ev["log"])
    assert start_end(ev["job"])[0] >= start_end(train["job"])[1], "evaluation began before training ended"
    report = train["run"] / "eval" / f"step_{PREEMPT_STEPS:09d}" / "report.md"
    assert report.is_file(), log_text(ev["log"])


# ----- multi-node: 2 nodes x 1 task on a second, 2-node cluster --------------------------------------

def _free_ports(start, n=4):
    """The first base >= start (in steps of 5) with ports base..base+n-1 all free: slurmctld, 2 slurmds,
    slurmdbd. Another session's test cluster on this machine may hold the first ones."""
    for base in range(start, start + 1000, 5):
        socks = []
        try:
            for port in range(base, base + n):
                socks.append(socket.socket())
                socks[-1].bind(("", port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError(f"no {n} free ports from {start}")


@pytest.fixture(scope="module")
def two_node_cluster(slurm):
    """A second slurm-ci cluster beside the main one, emulating 2 nodes (two slurmds, <host>-n1 and
    <host>-n2, both at NodeAddr 127.0.0.1), stopped and deleted afterwards. Yields its SLURM_CONF."""
    main_port = int(next(line.split("=")[1] for line in Path(slurm).read_text().splitlines()
                         if line.startswith("SlurmctldPort=")))
    env = dict(os.environ, SLURM_CI_DIR=f"/tmp/ddpm-2n-{os.getpid()}", SLURM_CI_PORT_BASE=str(_free_ports(main_port + 50)),
               SLURM_CI_NODES="2", SLURM_CI_CPUS="4", SLURM_CI_NO_INSTALL="1")
    tools = SHARED / "slurm-ci"
    r = subprocess.run(["bash", str(tools / "start-slurm.sh")], env=env, capture_output=True, text=True, timeout=300)
    try:
        if r.returncode != 0:
            _missing(f"a 2-node slurm-ci cluster did not start:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        yield f"{env['SLURM_CI_DIR']}/etc/slurm.conf"
    finally:
        subprocess.run(["bash", str(tools / "stop-slurm.sh")], env=dict(env, SLURM_CI_PURGE="1"),
                       capture_output=True, timeout=120)
        Path(f"{env['SLURM_CI_DIR']}.lock").unlink(missing_ok=True)


@pytest.mark.slurm
def test_two_node_job_meets_on_the_first_node_and_resumes_after_requeue(two_node_cluster, tiny_yaml, tmp_path):
    """sbatch --nodes=2 --ntasks-per-node=1: one rank per node, rendezvous at the first node, the
    time-limit warning forwarded to both nodes, requeue, a new port, and the run finished exactly once."""
    conf = two_node_cluster
    job = sbatch(tmp_path, "mnist.sh", "--nodes=2", "--ntasks-per-node=1", f"train.steps={PREEMPT_STEPS}",
                 "checkpoint.every=10", "sample.guidance=[1.0]", env=job_env(DDPM_CONFIG=tiny_yaml, SLURM_CONF=conf))
    log, run = tmp_path / "logs" / f"mnist-{job}.out", tmp_path / "runs" / f"mnist-{job}"
    wait_for_steps(run / "metrics.jsonl", 3, job, log, conf=conf)
    slurm_cmd("scancel", "--batch", "--signal=USR2", job, conf=conf, check=True)
    p = dict(job=job, rows=wait_job(job, log, conf=conf), log=log, run=run)
    check_requeued_once(p, "SIGUSR2", conf=conf)
    text = log.read_text()
    assert text.count("global batch 32 on 2 x cpu") == 2, text
    steps = sacct(f"{job}.0", duplicates=True, conf=conf, fields="NNodes,NTasks", allocations=False)
    assert steps == [("2", "2"), ("2", "2")], steps  # both runs: 2 tasks spread over 2 nodes
    first_node = slurm_cmd("scontrol", "show", "hostnames", sacct(job, conf=conf, fields="NodeList")[-1][0],
                           conf=conf).split()[0]
    addr = slurm_cmd("scontrol", "-o", "show", "node", first_node, conf=conf).split("NodeAddr=")[1].split()[0]
    rendezvous = [line.rsplit(" ", 1)[1] for line in text.splitlines() if "rendezvous " in line]
    assert rendezvous == [f"{addr}:{master_port(int(job), 0)}", f"{addr}:{master_port(int(job), 1)}"], rendezvous


# ----- 5. a sweep file as a job array ---------------------------------------------------------------

@pytest.mark.slurm
def test_sweep_array_runs_one_line_per_task(slurm, tiny_yaml, tmp_path):
    sweep = tmp_path / "lr.txt"
    sweep.write_text("# learning rate x width\n\ntrain.lr=1e-3 model.hidden=8\n"
                     "   # an indented comment\ntrain.lr=5e-4 model.hidden=12  # wider\n")
    job = sbatch(tmp_path, "sweep.sh", "--array=0-1", sweep, "train.steps=5", "sample.guidance=[1.0]",
                 env=job_env(DDPM_CONFIG=tiny_yaml))
    logs = [tmp_path / "logs" / f"sweep-{job}_{i}.out" for i in (0, 1)]
    rows = wait_job(job, logs, n_tasks=2)
    assert sorted(rows) == [(f"{job}_0", "COMPLETED", "0:0"), (f"{job}_1", "COMPLETED", "0:0")], \
        "\n".join(log_text(p) for p in logs)
    for i, (lr, hidden) in enumerate([(1e-3, 8), (5e-4, 12)]):
        cfg = json.loads((tmp_path / "runs" / f"lr-{job}_{i}" / "config.json").read_text())
        assert (cfg["train"]["lr"], cfg["model"]["hidden"], cfg["train"]["steps"]) == (lr, hidden, 5), log_text(logs[i])


# ----- 6. bad input fails fast, first line of the log, no requeue -----------------------------------

@pytest.mark.slurm
def test_bad_override_fails_fast_with_the_message_first_and_no_requeue(slurm, tiny_yaml, tmp_path):
    job = sbatch(tmp_path, "mnist.sh", "train.lr=", env=job_env(DDPM_CONFIG=tiny_yaml))
    log = tmp_path / "logs" / f"mnist-{job}.out"
    rows = wait_job(job, log, timeout=120)
    assert rows == [(job, "FAILED", "2:0")], log_text(log)
    first = log.read_text().splitlines()[0]
    assert first == "error: malformed override 'train.lr='; write key.sub=value, e.g. train.lr=2e-4", log_text(log)
    assert len(sacct(job, duplicates=True)) == 1, "exit 2 must not requeue"
    assert not (tmp_path / "runs").exists()
    # An evaluation chained to it is cancelled (--kill-on-invalid-dep) instead of pending forever.
    evaluation = sbatch(tmp_path, "evaluate.sh", f"--dependency=afterok:{job}", f"runs/mnist-{job}")
    assert wait_job(evaluation, tmp_path / "logs" / f"evaluate-{evaluation}.out", timeout=60)[0][1].startswith("CANCELLED")


@pytest.mark.slurm
def test_a_plain_python_in_a_multi_task_batch_script_fails_at_once(slurm, tiny_yaml, tmp_path):
    """Without srun, a 2-task job's batch script is one process that SLURM's variables call rank 0 of 2:
    one line at once, instead of waiting train.collective_timeout_s for a peer that never comes."""
    script = tmp_path / "plain.sh"
    script.write_text(f"#!/bin/bash\ncd {ROOT}\nexec {sys.executable} -m jobs.train --config {tiny_yaml} "
                      f"--run-dir {tmp_path / 'run'}\n")
    r = subprocess.run(["sbatch", "--parsable", *CI_OPTS, "--ntasks=2", f"--output={tmp_path / 'plain.out'}",
                        str(script)], cwd=tmp_path, env=job_env(), capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip()
    started = time.monotonic()
    rows = wait_job(job, tmp_path / "plain.out", timeout=120)
    assert rows == [(job, "FAILED", "2:0")], log_text(tmp_path / "plain.out")
    assert time.monotonic() - started < 60
    lines = (tmp_path / "plain.out").read_text().splitlines()
    assert lines == [l for l in lines if l.startswith("error: SLURM_NTASKS=2 but this process runs in the job's "
                                                      "batch script, not in an srun step")] and len(lines) == 1, lines
    assert not (tmp_path / "run").exists()


# ----- 7. faults: a stale lock of its own, a crashed rank, restarts without progress ---------------

@pytest.mark.slurm
def test_a_requeued_job_takes_over_the_lock_its_earlier_run_left(slurm, tiny_yaml, tmp_path):
    """The lock of an earlier run of the same job id (e.g. a node that died) does not block the rerun."""
    job = sbatch(tmp_path, "mnist.sh", "--hold", "train.steps=5", env=job_env(DDPM_CONFIG=tiny_yaml))
    run = tmp_path / "runs" / f"mnist-{job}"
    run.mkdir(parents=True)
    (run / "lock.json").write_text(json.dumps({"host": "node-that-died", "pid": 1, "slurm_job_id": job,
                                               "since": "2026-12-01T00:00:00+00:00", "token": "earlier run"}))
    slurm_cmd("scontrol", "release", job, check=True)
    log = tmp_path / "logs" / f"mnist-{job}.out"
    assert wait_job(job, log) == [(job, "COMPLETED", "0:0")], log_text(log)
    assert f"earlier run of this SLURM job ({job})" in log.read_text()
    assert not (run / "lock.json").exists()


def _pid_of_rank(job, rank, timeout=60):
    """The pid of the jobs.train process that is rank `rank` of SLURM job `job` (the cluster is this host)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for proc in Path("/proc").iterdir():
            try:
                env = (proc / "environ").read_bytes().split(b"\0")
                cmd = (proc / "cmdline").read_bytes()
            except (OSError, ValueError):
                continue
            if b"jobs.train" in cmd and f"SLURM_JOB_ID={job}".encode() in env \
                    and f"SLURM_PROCID={rank}".encode() in env and b"--dry-run" not in cmd:
                return int(proc.name)
        time.sleep(0.2)
    pytest.fail(f"no rank {rank} of job {job} found")


@pytest.mark.slurm
def test_a_crashed_rank_ends_a_two_task_job_within_a_minute_and_is_not_requeued(slurm, tiny_yaml, tmp_path):
    job = sbatch(tmp_path, "mnist.sh", "--ntasks-per-node=2", "--gpus-per-node=2", "train.steps=100000",
                 "checkpoint.every=100000", env=job_env(DDPM_CONFIG=tiny_yaml))
    log = tmp_path / "logs" / f"mnist-{job}.out"
    wait_for_steps(tmp_path / "runs" / f"mnist-{job}" / "metrics.jsonl", 2, job, log)
    os.kill(_pid_of_rank(job, 1), 9)
    killed = time.monotonic()
    rows = wait_job(job, log, timeout=120)
    assert time.monotonic() - killed < 60, "the surviving rank waited for a collective timeout"
    assert rows[0][1] == "FAILED", log_text(log)
    assert len(sacct(job, duplicates=True)) == 1, "a crash is not a preemption: no requeue"


@pytest.mark.slurm
def test_restarts_that_never_reach_a_new_checkpoint_stop_requeueing(slurm, tiny_yaml, tmp_path):
    """The time-limit warning arrives again and again before training gets anywhere (a slow start, say):
    after DDPM_MAX_IDLE_RESTARTS restarts without a new checkpoint the job stops with one line."""
    job = sbatch(tmp_path, "mnist.sh", "train.steps=100000", env=job_env(DDPM_CONFIG=tiny_yaml,
                                                                          DDPM_MAX_IDLE_RESTARTS=1))
    log = tmp_path / "logs" / f"mnist-{job}.out"
    end, signalled = time.monotonic() + 300, set()
    while time.monotonic() < end:
        state = sacct(job)[0][1].split()[0] if sacct(job) else "PENDING"
        if state in TERMINAL:
            break
        text = log.read_text(errors="replace") if log.exists() else ""
        restarts = text.count(f"job {job} restart ")
        if state == "RUNNING" and restarts and restarts not in signalled:
            subprocess.run(["scancel", "--batch", "--signal=USR2", job], timeout=30)  # before the first step
            signalled.add(restarts)
        time.sleep(0.2)
    rows = wait_job(job, log, timeout=60)
    text = log_text(log, limit=20000)
    assert rows[0][1] == "FAILED", text
    assert "restarts in a row ended before a new checkpoint" in text and "not requeueing" in text, text
    assert 2 <= len(signalled) <= 4, (signalled, text)


# ----- 8. the benchmark template -----------------------------------------------------------------

def _submit_bench(tmp_path, *script_args, **env):
    (tmp_path / "logs").mkdir(exist_ok=True)
    r = subprocess.run(["sbatch", "--parsable", "--time=10", "--cpus-per-task=1", "--mem=4G",
                        str(SLURM_DIR / "bench.sh"), *script_args], cwd=tmp_path, env=job_env(**env),
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().split(";")[0]
    return job, tmp_path / "logs" / f"bench-{job}.out"


@pytest.mark.slurm
@pytest.mark.slow  # 45 s of the benchmarks test_bench runs too; the template's own checks stay in the default run
def test_bench_template_runs_every_benchmark_quick_on_a_node_without_cuda(slurm, mnist_root, untrained_classifier,
                                                                          tmp_path):
    """`sbatch slurm/bench.sh --quick`: all three tables in the log, on the CPU (the GPUs have no CUDA)."""
    data = tmp_path / "data"
    (data / "classifiers").mkdir(parents=True)
    (data / "MNIST").symlink_to(Path(mnist_root) / "MNIST")
    (data / "classifiers" / "mnist_cnn.pt").write_bytes(untrained_classifier.read_bytes())
    job, log = _submit_bench(tmp_path, "--quick", DDPM_DATA_ROOT=data)
    rows = wait_job(job, log, timeout=600)
    assert rows == [(job, "COMPLETED", "0:0")], log_text(log, 20000)
    text = log.read_text()
    for bench in ("train_throughput", "sampling", "mnist_end_to_end"):
        assert f"python -m bench.{bench} --device cpu --quick" in text, text
    for title in ("training throughput", "sampling speed", "MNIST end to end"):
        assert title in text, text
    assert text.count("| baseline") >= 4 and "| ours: jobs.train configs/mnist.yaml" in text, text


@pytest.mark.slurm
def test_bench_template_refuses_full_sizes_without_a_gpu(slurm, mnist_root, tmp_path):
    job, log = _submit_bench(tmp_path, DDPM_DATA_ROOT=Path(mnist_root))
    rows = wait_job(job, log, timeout=120)
    assert rows == [(job, "FAILED", "2:0")], log_text(log)
    assert "error: no CUDA device in this job" in log.read_text() and "add --quick" in log.read_text()


# ----- the templates' #SBATCH lines are valid and schedulable ----------------------------------------

@pytest.mark.slurm
@pytest.mark.parametrize("script,args", [("mnist.sh", []), ("cifar10.sh", ["--mem=1G"]),
                                         ("evaluate.sh", []), ("sweep.sh", ["--array=0-3"]),
                                         ("bench.sh", ["--mem=4G"]), ("sample.sh", ["--mem=4G"])])
def test_sbatch_accepts_the_template(slurm, tmp_path, script, args):
    """`sbatch --test-only`: every #SBATCH line parses, and the request (4 GPUs for cifar10.sh) fits a
    4-GPU node once CPUs and memory are scaled to the CI node."""
    r = subprocess.run(["sbatch", "--test-only", *CI_OPTS, *args, str(SLURM_DIR / script)], cwd=tmp_path,
                       env=job_env(), capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "to start at" in r.stderr, r.stderr


# ----- fast: the shell helpers, no cluster ----------------------------------------------------------

def _bash(fake, script, **env):
    """Run `script` in bash after sourcing slurm/common.sh, with a stand-in scontrol written to `fake`/."""
    (fake / "scontrol").write_text('#!/bin/sh\ncase "$*" in\n'
                                   '  "show hostnames "*) echo "$3" | tr , "\\n" ;;\n'
                                   '  "-o show node node07") echo "NodeName=node07 NodeAddr=10.1.0.7 NodeHostName=node07" ;;\n'
                                   'esac\n')
    (fake / "scontrol").chmod(0o755)
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    base["PATH"] = f"{fake}{os.pathsep}{base['PATH']}"
    r = subprocess.run(["bash", "-c", f'set -euo pipefail; DDPM_ROOT="{ROOT}"; . "{SLURM_DIR}/common.sh"; {script}'],
                       env={**base, **env}, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.parametrize("job_id,restarts", [("7", None), ("7", "1"), ("123456", "3"), ("98765432", "0")])
def test_template_rendezvous_port_matches_ddpm_dist(tmp_path, job_id, restarts):
    """MASTER_ADDR is the first node's address; the port is the one ddpm.train.dist would derive, new per restart."""
    env = {"SLURM_JOB_ID": job_id, "SLURM_JOB_NODELIST": "node07,node08"}
    if restarts is not None:
        env["SLURM_RESTART_COUNT"] = restarts
    out = _bash(tmp_path, 'ddpm_rendezvous; echo "$MASTER_ADDR $MASTER_PORT"', **env)
    assert out.split() == ["10.1.0.7", str(master_port(int(job_id), int(restarts or 0)))]


def test_sweep_run_lines_skip_comments_and_blanks(tmp_path):
    f = tmp_path / "s.txt"
    f.write_text("# header\n\n  \na=1 b=2\n   # indented comment\nc=3  # trailing comment\nname=x#y\n")
    assert _bash(tmp_path, f'ddpm_sweep_runs "{f}"').splitlines() == ["a=1 b=2", "c=3", "name=x#y"]


def test_template_asks_python_for_the_latest_step_and_the_idle_count(tmp_path, monkeypatch):
    """ddpm_latest_step and ddpm_idle_restarts are Python's answers (ddpm.run.restarts), and the count the
    templates record is the one the submitit launcher reads."""
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    run = tmp_path / "run"
    assert _bash(tmp_path, f'ddpm_latest_step "{run}"').split() == [str(restarts.latest_step(run))] == ["-1"]
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step_000000120\n")
    script = f'ddpm_latest_step "{run}"; ddpm_idle_restarts "{run}" 120; ddpm_idle_restarts "{run}" 120; ' \
             f'ddpm_idle_restarts "{run}"; ddpm_idle_restarts "{run}" 130'
    assert _bash(tmp_path, script, SLURM_JOB_ID="4242").split() == ["120", "0", "1", "1", "0"]
    assert restarts.idle_restarts(run) == 0 and (run / restarts.RESTARTS_FILE).read_text() == "0 130 4242\n"
    assert _bash(tmp_path, "ddpm_requeue_fact max-idle-restarts").strip() == str(restarts.max_idle_restarts({}))
    assert _bash(tmp_path, "ddpm_requeue_fact max-idle-restarts", DDPM_MAX_IDLE_RESTARTS="5").strip() == "5"


@pytest.mark.parametrize("what,message", [
    ("training", "restarts in a row ended before a new checkpoint (newest: none)"),
    ("sampling", "restarts in a row ended before a new sample shard was committed")])
def test_run_step_stops_requeueing_after_the_limit_and_names_the_progress(tmp_path, what, message):
    """A step that keeps exiting 75 without progress: requeued twice (the default limit), then one error line
    saying what progress it lacked; a bad DDPM_MAX_IDLE_RESTARTS is one error line and exit 2."""
    run = tmp_path / "run"
    run.mkdir()
    sampling = "_ddpm_progress=ddpm_committed_shards _ddpm_what=sampling; " if what == "sampling" else ""
    step = f'{sampling}ddpm_trap_signals; ' \
           f'ddpm_run_step "{run}" sh -c "exit $REQUEUE_EXIT_CODE" 2>&1 && echo "rc=0" || echo "rc=$?"'
    out = _bash(tmp_path, f"{step}; {step}; {step}", SLURM_JOB_ID="77")
    assert [line for line in out.splitlines() if line.startswith("rc=")] == ["rc=0", "rc=0", "rc=1"], out
    assert out.count("requeueing job 77") == 2 and f"error: 3 {message}" in out and "not requeueing" in out, out
    if what == "sampling":
        assert "checkpoint" not in out.split("error:")[1], out
    out = _bash(tmp_path, step, SLURM_JOB_ID="78", DDPM_MAX_IDLE_RESTARTS="x")
    assert "rc=2" in out and "error: DDPM_MAX_IDLE_RESTARTS='x' is not a whole number" in out, out


def test_templates_define_no_number_that_python_owns():
    """The shell asks Python (ddpm.cluster.requeue) for the requeue exit code, the restart limit and count,
    the latest step and the port: none of them is spelled out in the templates' code (comments may)."""
    forbidden = {"a default restart limit": r"DDPM_MAX_IDLE_RESTARTS:-|\$\{?DDPM_MAX_IDLE_RESTARTS\b",
                 "the port formula": r"2654435761|40000|MASTER_PORT=\$\(\(",
                 "parsing checkpoints/latest": r"checkpoints/latest|step_",
                 "the idle-count file": r"restarts_without_progress",
                 "the requeue exit code": r"\b75\b"}
    found = []
    for script in sorted(SLURM_DIR.glob("*.sh")):
        for n, line in enumerate(script.read_text().splitlines(), 1):
            if line.lstrip().startswith("#"):
                continue
            found += [f"{script.name}:{n}: {what}: {line.strip()}" for what, pattern in forbidden.items()
                      if re.search(pattern, line)]
    assert not found, "\n".join(found)


def test_a_signal_before_the_step_starts_is_a_stop_without_progress(tmp_path):
    """The time-limit warning between the last check and srun (while the shell asks Python, say): the step
    is not started and the job requeues, counted as a restart without progress, instead of training on."""
    out = _bash(tmp_path, f'ddpm_trap_signals; kill -USR2 $$; ddpm_run_step "{tmp_path / "run"}" '
                          f'sh -c "echo step started" 2>&1; ddpm_idle_restarts "{tmp_path / "run"}"', SLURM_JOB_ID="9")
    assert "step started" not in out and "not starting it" in out and "requeueing job 9" in out, out
    assert out.splitlines()[-1] == "1", out
