"""jobs.submit and its modules (ddpm.cluster.launch, ddpm.cluster.sweep, ddpm.cluster.slurm).

Fast tests check the job's bad inputs and TrainJob's signal handling with a stand-in child (parsing,
planning and the manifest are unit-tested in tests/cluster/test_cluster.py); the tests marked ``slurm`` submit real jobs to the CI cluster (../shared/slurm-ci): a sweep as a job
array, a preemption and a time limit that both end in requeue-and-resume, and bad inputs that must
submit nothing.
"""
import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

submitit = pytest.importorskip("submitit", reason="submitit is not installed")  # e.g. a bare GPU image

from ddpm.cluster import launch, sweep  # noqa: E402  (they import submitit)
from ddpm.cluster import slurm as cluster  # noqa: E402
from ddpm.run import restarts  # noqa: E402
from jobs import submit as submit_job  # noqa: E402

from conftest import ROOT, python_env  # noqa: E402

SUBMIT = [sys.executable, "-m", "jobs.submit"]
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE"}


def run_submit(*args, timeout=180):
    return subprocess.run([*SUBMIT, *map(str, args)], cwd=ROOT, env=python_env(), capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("argv,match", [
    (["--time", "1:99"], "invalid --time '1:99'"), ([], "--time is required"),
    (["--time", "10", "--sweep", "train.lr"], "malformed --sweep"), (["--time", "2"], "no room for --signal-delay"),
    (["--time", "10", "--mem", "lots"], "invalid --mem"), (["--local", "--sweep", "train.lr=1e-3,0"], "sweep value")])
def test_bad_inputs_fail_before_anything(config_only, tmp_path, capsys, argv, match):
    rc = submit_job.main(["--config", str(config_only), "--run-root", str(tmp_path / "runs"), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and match in err and err.count("\n") == 1, err
    assert not (tmp_path / "runs").exists()


def test_help_and_missing_config():
    r = run_submit("--help", timeout=60)
    assert r.returncode == 0 and "--sweep" in r.stdout and "examples:" in r.stdout
    r = run_submit("--time", "10", timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("error: --config is required")


# ----- TrainJob's signal handling with a stand-in for jobs.train -------------------------------------

FAKE_TRAIN = """
import signal, sys, time
time.sleep(1.0)                      # 'importing torch': USR2 is ignored (inherited SIG_IGN)
stop = []
signal.signal(signal.SIGUSR2, lambda *a: stop.append(1))
end = time.time() + {run_s}
while not stop and time.time() < end:
    time.sleep(0.02)
sys.exit(75 if stop else {rc})
"""


class FakeJob(launch.TrainJob):
    def __init__(self, tmp_path, run_s, rc):
        super().__init__("cfg.yaml", [], str(tmp_path / "run"), str(tmp_path), grace_s=20)
        self.script = FAKE_TRAIN.format(run_s=run_s, rc=rc)

    def command(self):
        return [sys.executable, "-c", self.script]


class Requeued(BaseException):
    """What submitit's handler does after checkpoint(): leave the job (sys.exit)."""


def _run_with_signal(job, after_s):
    """Call job() and send ourselves USR2 after `after_s`; the handler calls checkpoint() as submitit's does."""
    box = {}

    def handler(signum, frame):
        box["delayed"] = job.checkpoint()
        raise Requeued()

    old = signal.signal(signal.SIGUSR2, handler)
    timer = threading.Timer(after_s, os.kill, (os.getpid(), signal.SIGUSR2))
    timer.start()
    try:
        with pytest.raises(Requeued):
            job()
    finally:
        timer.cancel()
        signal.signal(signal.SIGUSR2, old)
    return box["delayed"]


def test_checkpoint_forwards_the_signal_until_the_child_saved(tmp_path):
    # The signal comes while the child still 'imports torch' and ignores it: checkpoint() must re-send it
    # (instead of the child dying of USR2's default action or never hearing of it).
    job = FakeJob(tmp_path, run_s=30, rc=0)
    t0 = time.monotonic()
    delayed = _run_with_signal(job, after_s=0.3)
    assert job._rc == launch.REQUEUE_EXIT_CODE and job.outcome is None
    assert time.monotonic() - t0 < 15
    assert isinstance(delayed, submitit.helpers.DelayedSubmission) and delayed.function is job
    clone = pickle.loads(pickle.dumps(delayed.function))  # what submitit writes for the requeued run
    assert clone._child is None and clone._rc is None and clone.run_dir == job.run_dir


def test_a_child_that_ended_during_the_signal_is_not_trained_again(tmp_path):
    job = FakeJob(tmp_path, run_s=0, rc=0)
    for rc, outcome in [(0, 0), (2, 2), (-9, None)]:  # done / bad input: final; killed: resume on the rerun
        job._child = subprocess.Popen([sys.executable, "-c", "pass"])
        job._child.wait()
        job._rc, job.outcome = rc, None
        rerun = pickle.loads(pickle.dumps(job.checkpoint().function))
        assert rerun.outcome == outcome
    rerun.outcome = 0
    rerun.script = "import sys; sys.exit(3)"  # would fail if it ran again
    assert rerun() == {"run_dir": rerun.run_dir, "returncode": 0}


def test_requeues_without_a_new_checkpoint_stop_after_the_limit(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DDPM_MAX_IDLE_RESTARTS", raising=False)
    job = FakeJob(tmp_path, run_s=0, rc=0)
    ckpt = tmp_path / "run" / "checkpoints"
    ckpt.mkdir(parents=True)

    def stopped_for_the_signal(newest):  # one run of the job, ended by the signal; newest checkpoint step
        nonlocal job
        (ckpt / "latest").write_text(f"step_{newest:09d}\n")
        job._child = subprocess.Popen([sys.executable, "-c", "pass"])
        job._child.wait()
        job._rc, job.outcome = launch.REQUEUE_EXIT_CODE, None
        delayed = job.checkpoint()
        if delayed is not None:  # the rerun is what submitit unpickles: the count is in the run dir, not the pickle
            job = pickle.loads(pickle.dumps(delayed.function))
        return delayed

    assert job.max_idle_restarts == restarts.MAX_IDLE_RESTARTS  # the one default (DDPM_MAX_IDLE_RESTARTS unset)
    assert stopped_for_the_signal(10) is not None and job.idle_restarts == 0  # trained: requeue
    for idle in range(1, job.max_idle_restarts + 1):
        assert stopped_for_the_signal(10) is not None and job.idle_restarts == idle
    assert stopped_for_the_signal(10) is None  # submitit: no requeue
    out = capsys.readouterr().out
    assert f"{job.max_idle_restarts + 1} restarts in a row ended before a new checkpoint (newest: step 10)" in out
    assert restarts.idle_restarts(job.run_dir) == job.max_idle_restarts + 1  # where the templates keep theirs
    assert stopped_for_the_signal(20) is not None and job.idle_restarts == 0  # progress resets the count


def test_failures_raise_with_the_meaning_of_the_exit_code(tmp_path):
    from ddpm.errors import REQUEUE_EXIT_CODE

    assert launch.REQUEUE_EXIT_CODE == REQUEUE_EXIT_CODE  # one definition, in ddpm.errors
    job = FakeJob(tmp_path, run_s=0, rc=2)
    with pytest.raises(launch.TrainingFailed, match="exited with 2 \\(bad input"):
        job()
    job.script = "import sys; sys.exit(0)"
    assert job()["returncode"] == 0


# ----- end to end -----------------------------------------------------------------------------------

def test_local_run_completes_and_status_reads_it(tiny_config, tmp_path):
    manifest = tmp_path / "local.json"
    r = run_submit("--config", tiny_config, "train.steps=4", "checkpoint.every=2", "--local",
                   "--run-root", tmp_path / "runs", "--manifest", manifest)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    m = json.loads(manifest.read_text())
    (job,) = m["jobs"]
    assert m["executor"] == "local" and job["state"] == "COMPLETED" and job["returncode"] == 0
    run = Path(job["run_dir"])
    assert run.name == "00000-tiny-b32" and (run / "checkpoints" / "latest").read_text().strip() == "step_000000004"
    r = run_submit("--status", manifest, timeout=60)
    assert r.returncode == 0 and r.stdout.splitlines()[1].split()[:4] == ["local-0", "COMPLETED", "0", "4"], r.stdout


def _wait(predicate, timeout, what, interval=0.5):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _squeue_names():
    r = subprocess.run(["squeue", "-h", "-o", "%j"], capture_output=True, text=True, timeout=30)
    return set(r.stdout.split())


def _finished(job_ids):
    states = cluster.job_states(job_ids)
    return states if all(s in TERMINAL for s, _ in states.values()) else None


def _latest(run_dir):
    return (Path(run_dir) / "checkpoints" / "latest").read_text().strip()


def _steps_once(run_dir, total):
    rows = [json.loads(line)["step"] for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert rows == list(range(1, total + 1))  # every step exactly once: none lost, none repeated


def _sacct_runs(job_id):
    r = subprocess.run(["sacct", "-D", "-X", "-n", "-P", "-o", "State", "-j", job_id], capture_output=True, text=True)
    return r.stdout.split()


@pytest.mark.slurm
def test_sweep_runs_as_a_job_array_and_status_reports_it(slurm, tiny_config, tmp_path):
    """Two configs as one job array; one task is preempted (submitit's job._interrupt(): SIGTERM + USR2
    to its tasks), checkpoints, requeues and resumes. Manifest and --status tell the story."""
    manifest = tmp_path / "sweep.json"
    r = run_submit("--config", tiny_config, "--sweep", "train.lr=1e-3,2e-3", "--gpus-per-node", 1,
                   "--time", "5:00", "--run-root", tmp_path / "runs", "--manifest", manifest)
    assert r.returncode == 0, r.stdout + r.stderr
    m = json.loads(manifest.read_text())
    ids = [j["job_id"] for j in m["jobs"]]
    first = Path(m["jobs"][0]["run_dir"])
    try:
        _wait(lambda: (sweep.last_logged(first)[0] or 0) >= 3, 180, "task 0 to train 3 steps", 0.1)
        submitit.SlurmJob(folder=m["submitit_folder"] + "/%j", job_id=ids[0])._interrupt()
        states = _wait(lambda: _finished(ids), 240, "the sweep to finish", interval=2)
    finally:
        subprocess.run(["scancel", *ids], capture_output=True)
    logs = "".join(Path(j["log"]).read_text() for j in m["jobs"] if Path(j["log"]).exists())
    assert [s for s, _ in states.values()] == ["COMPLETED", "COMPLETED"], (states, logs[-3000:])
    assert len({i.split("_")[0] for i in ids}) == 1 and len(ids) == 2  # one array, two tasks
    assert m["config"] == str(tiny_config) and m["executor"] == "slurm" and m["submitted"]
    assert m["resources"]["gpus_per_node"] == 1 and m["resources"]["partition"] == "debug"
    assert [j["sweep"] for j in m["jobs"]] == [["train.lr=1e-3"], ["train.lr=2e-3"]]
    for i, (j, lr) in enumerate(zip(m["jobs"], ("1e-3", "2e-3"))):
        run = Path(j["run_dir"])
        assert run.name == f"0000{i}-tiny-lr{lr}"
        assert json.loads((run / "config.json").read_text())["train"]["lr"] == float(lr)
        assert _latest(run) == "step_000000020" and (run / "samples.h5").is_file()
        _steps_once(run, 20)
    assert _sacct_runs(ids[0]) == ["REQUEUED", "COMPLETED"] and _sacct_runs(ids[1]) == ["COMPLETED"]
    log0 = Path(m["jobs"][0]["log"]).read_text()
    assert "exited with 75; requeueing" in log0 and "resuming at step" in log0, log0[-3000:]
    r = run_submit("--status", manifest, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:5] == ["JOB", "STATE", "REQUEUES", "STEP", "LOSS"] and len(lines) == 3
    for line, j, requeues in zip(lines[1:], m["jobs"], ("1", "0")):
        assert line.split()[:4] == [j["job_id"], "COMPLETED", requeues, "20"] and line.endswith(j["run_dir"])


@pytest.mark.slurm
def test_dry_run_and_bad_inputs_submit_nothing(slurm, tiny_config, tmp_path, capsys):
    name = f"dry-{uuid.uuid4().hex[:8]}"
    root = tmp_path / "runs"
    r = run_submit("--config", tiny_config, f"name={name}", "--sweep", "train.lr=1e-3,2e-3", "--gpus-per-node", 2,
                   "--nodes", 1, "--time", "1:00:00", "--mem", "2G", "--run-root", root, "--dry-run", timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"--job-name={name}" in r.stdout and "--partition=debug" in r.stdout and "--time=60" in r.stdout
    assert "--ntasks-per-node=2" in r.stdout and "--gpus-per-node=2" in r.stdout and "--array=0-1" in r.stdout
    assert f"{root}/00000-{name}-lr1e-3  name={name} train.lr=1e-3" in r.stdout
    bad = [(["--partition", "no-such-partition", "--time", "10"], "unknown partition 'no-such-partition'"),
           (["--time", "25:61:00"], "invalid --time"),
           (["--time", "10", "--sweep", "train.lr=1e-3,-2e-3"], "sweep value train.lr=-2e-3"),
           (["--time", "10", "--gpus-per-node", "5"], "at most 4 GPU"),
           (["--time", "10", "--gpus-per-node", "3"], "not divisible by the 3 ranks")]
    for argv, match in bad:
        rc = submit_job.main(["--config", str(tiny_config), f"name={name}", "--run-root", str(root), *argv])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("error: ") and match in err and err.count("\n") == 1, (argv, err)
    assert not root.exists()  # no run dir, no manifest, no submitit folder
    assert name not in _squeue_names()
    assert subprocess.run(["sacct", "-n", "-X", "--name", name, "-S", "now-1hour"], capture_output=True,
                          text=True).stdout.strip() == ""


def _train_pids(run_dir):
    """Pids of live jobs.train processes working on run_dir (the jobs run on this machine)."""
    pids = []
    for p in Path("/proc").iterdir():
        try:
            cmd = (p / "cmdline").read_bytes().split(b"\0")
            state = (p / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if b"jobs.train" in cmd and str(run_dir).encode() in cmd and state != "Z":
            pids.append(int(p.name))
    return pids


@pytest.mark.slurm
def test_time_limit_checkpoints_requeues_and_resumes(slurm, tiny_config, tmp_path):
    """A 2-rank job (two tasks, gloo) under --time 2 --signal-delay 60: SLURM sends USR2 30-60 s after the
    start; the ranks checkpoint, submitit requeues, the rerun resumes and completes."""
    steps, manifest = 20, tmp_path / "m.json"
    r = run_submit("--config", tiny_config, f"train.steps={steps}", "checkpoint.every=10", "--gpus-per-node", 2,
                   "--time", "2", "--signal-delay", 60, "--run-root", tmp_path / "runs", "--manifest", manifest)
    assert r.returncode == 0, r.stdout + r.stderr
    m = json.loads(manifest.read_text())
    (job,) = m["jobs"]
    jid, run, log = job["job_id"], Path(job["run_dir"]), Path(job["log"])
    stopped = []
    try:
        # Freeze both ranks after two steps, as if every step were slow, so that training is still going
        # when the signal comes; thaw them when it has come (SLURM also sends SIGCONT with it).
        _wait(lambda: (sweep.last_logged(run)[0] or 0) >= 2, 180, "the first run to train 2 steps", 0.1)
        stopped = _wait(lambda: len(_train_pids(run)) == 2 and _train_pids(run), 30, "both ranks", 0.1)
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)
        _wait(lambda: "Caught signal SIGUSR2" in log.read_text(), 150, "the time-limit signal", 0.5)
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        states = _wait(lambda: _finished([jid]), 240, "the job to complete", 1)
    finally:
        for pid in stopped:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        subprocess.run(["scancel", jid], capture_output=True)
    text = log.read_text()
    # A slow machine may be signalled again before the rerun is done: at least one requeue, all requeues.
    runs = _sacct_runs(jid)
    assert states[jid][0] == "COMPLETED" and runs[-1] == "COMPLETED" and len(runs) >= 2, (runs, text[-3000:])
    assert set(runs[:-1]) == {"REQUEUED"}
    assert "this job is timed-out" in text and "exited with 75; requeueing" in text and "Requeued job" in text
    assert "resuming at step 10" in text and f"done: {steps} steps" in text and "on 2 x cpu" in text
    _steps_once(run, steps)
    assert _latest(run) == f"step_{steps:09d}" and (run / "samples.h5").is_file()
