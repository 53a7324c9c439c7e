"""ddpm.run.lock: one holder at a time, a one-line refusal naming it, stale locks taken over (dead pid,
old heartbeat, own SLURM job, damaged file), the heartbeat, and noticing that the lock was taken."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from ddpm.errors import UserError
from ddpm.run.lock import RunLock

from conftest import ROOT, python_env


def write_holder(run, **fields):
    holder = {"host": "node-elsewhere", "pid": 4242, "slurm_job_id": None, "since": "2026-12-01T10:00:00+00:00",
              "token": "theirs", **fields}
    (run / "lock.json").write_text(json.dumps(holder))
    return holder


def test_second_holder_is_refused_with_who_holds_it(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with RunLock(tmp_path) as first:
        with pytest.raises(UserError) as e:
            RunLock(tmp_path).acquire()
        message = str(e.value)
        assert "\n" not in message and f"pid {os.getpid()} on {socket.gethostname()}" in message
        assert "heartbeat" in message and "another run dir" in message
        assert json.loads((tmp_path / "lock.json").read_text())["token"] == first.token
    assert not (tmp_path / "lock.json").exists()  # released
    with RunLock(tmp_path):
        pass


def test_a_dead_holder_on_this_host_is_taken_over(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # a pid that no longer exists
    write_holder(tmp_path, host=socket.gethostname(), pid=proc.pid)
    with RunLock(tmp_path) as lock:
        assert "is gone" in lock.took_over and json.loads((tmp_path / "lock.json").read_text())["token"] == lock.token


def test_an_old_heartbeat_or_a_damaged_file_is_taken_over_a_fresh_one_elsewhere_is_not(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    write_holder(tmp_path)
    with pytest.raises(UserError, match="pid 4242 on node-elsewhere"):
        RunLock(tmp_path).acquire()
    old = time.time() - 1000
    os.utime(tmp_path / "lock.json", (old, old))
    with RunLock(tmp_path, stale_after_s=300) as lock:
        assert "no heartbeat for" in lock.took_over
    (tmp_path / "lock.json").write_text("{not json")
    os.utime(tmp_path / "lock.json", (time.time() - 60, time.time() - 60))
    with RunLock(tmp_path) as lock:
        assert "damaged" in lock.took_over


def test_a_requeued_slurm_job_takes_over_its_own_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "no-slurm-here"))  # squeue cannot say whether job 777 runs
    write_holder(tmp_path, slurm_job_id="777")
    monkeypatch.setenv("SLURM_JOB_ID", "778")
    with pytest.raises(UserError, match=r"SLURM job 777.*scancel 777"):
        RunLock(tmp_path).acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    with RunLock(tmp_path) as lock:
        assert "earlier run of this SLURM job (777)" in lock.took_over
    write_holder(tmp_path, slurm_job_id="777")
    with pytest.raises(UserError):  # the archive lock never passes between two runs of one job
        RunLock(tmp_path, own_job_takes_over=False).acquire()


def test_heartbeat_refreshes_and_a_taken_lock_is_noticed(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    lock = RunLock(tmp_path, heartbeat_s=0.1).acquire()
    try:
        first = (tmp_path / "lock.json").stat().st_mtime_ns
        time.sleep(0.5)
        assert (tmp_path / "lock.json").stat().st_mtime_ns > first and not lock.lost
        write_holder(tmp_path, token="someone else")
        deadline = time.time() + 5
        while not lock.lost and time.time() < deadline:
            time.sleep(0.05)
        assert lock.lost
    finally:
        lock.release()
    assert json.loads((tmp_path / "lock.json").read_text())["token"] == "someone else"  # not ours to remove


def test_waiting_for_a_holder_in_another_process(tmp_path):
    """acquire(wait_s) waits while another process holds the lock and gets it once that one is done."""
    code = ("import sys, time; from ddpm.run.lock import RunLock\n"
            f"lock = RunLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(2); lock.release()\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=python_env(), stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    t0 = time.monotonic()
    with RunLock(tmp_path).acquire(wait_s=30):
        assert time.monotonic() - t0 > 1
    proc.wait(timeout=30)


@pytest.mark.slurm
def test_the_lock_of_a_slurm_job_that_ended_on_another_node_is_taken_over(slurm, tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    job = subprocess.run(["sbatch", "--parsable", "--output=/dev/null", "--wrap", "true"], capture_output=True, text=True,
                         timeout=30).stdout.strip()
    deadline = time.time() + 60
    while subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip() \
            and time.time() < deadline:
        time.sleep(0.5)
    write_holder(tmp_path, slurm_job_id=job)  # fresh heartbeat, another host: only SLURM can tell
    with RunLock(tmp_path) as lock:
        assert f"its SLURM job {job} is no longer running" in lock.took_over
