"""One writer per run dir: ``RUN_DIR/lock.json``, held by the training job for its whole life.

Why a lock file and not ``flock``/``filelock``: on the shared filesystems of a cluster (NFS, Lustre, GPFS)
``flock`` is often local to one node or absent, and a lock must also say who holds it. The file is created
with ``O_CREAT | O_EXCL`` (atomic on those filesystems), holds the holder's host, pid, SLURM job id and
start time, and a thread of the holder rewrites it every ``heartbeat_s`` seconds (atomically), so its
modification time is the heartbeat.

A lock is stale, and taken over without a human, when
- its holder is a process on this host that no longer exists (kill -9, a crash), or
- its heartbeat is older than ``stale_after_s`` (default 300 s = 10 heartbeats: a node that crashed, a
  job killed on another node). Ages are measured against the filesystem's own clock (the modification
  time of a file written just now), so clock skew between nodes does not matter, or
- its holder is this very SLURM job (``SLURM_JOB_ID`` equal): a requeued job takes its own lock over,
  also while the previous run of it is still in SLURM's kill wait, or
- its holder ran on another node as a SLURM job that ``squeue`` no longer lists as running.
Taking over renames the stale file away first (atomic: of two contenders only one succeeds), then
creates a new one. A holder whose lock was taken over notices at its next heartbeat (:attr:`RunLock.lost`).
"""
import json
import os
import socket
import subprocess
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

from ddpm.errors import UserError
from ddpm.run.atomic import atomic_write

LOCK_FILE = "lock.json"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0


def _holder_record(token: str) -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "slurm_restart": os.environ.get("SLURM_RESTART_COUNT", "0"), "token": token,
            "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _fs_now(directory: Path) -> float:
    """The filesystem's current time: the mtime of a file written just now in ``directory``."""
    probe = directory / f".clock-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    probe.write_bytes(b"")
    try:
        return probe.stat().st_mtime
    finally:
        probe.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, belongs to someone else
        return True
    return True


def _slurm_job_ended(job_id: str) -> bool:
    """True if SLURM says the job is not running (any more); False if it is, or if SLURM cannot be asked."""
    try:
        r = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%T"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    if r.returncode != 0:  # squeue fails for ids it no longer knows: a finished job
        return "Invalid job id" in r.stderr
    return r.stdout.strip() not in ("RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED")


def describe(holder: dict, age_s: float) -> str:
    job = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return (f"pid {holder.get('pid')} on {holder.get('host')}{job}, since {holder.get('since')}, "
            f"heartbeat {age_s:.0f} s ago")


class RunLock:
    """``with RunLock(run_dir): ...`` holds ``RUN_DIR/lock.json``; a live holder makes acquire() raise a
    one-line UserError naming it, or wait up to ``wait_s`` seconds for it to go."""

    def __init__(self, directory, name: str = LOCK_FILE, heartbeat_s: float = HEARTBEAT_S,
                 stale_after_s: float = STALE_AFTER_S, what: str = "run dir", own_job_takes_over: bool = True):
        self.directory, self.path = Path(directory), Path(directory) / name
        self.heartbeat_s, self.stale_after_s, self.what = heartbeat_s, stale_after_s, what
        self.own_job_takes_over = own_job_takes_over
        self.token = uuid.uuid4().hex
        self.lost = False            # set by the heartbeat thread when another process took the lock
        self.took_over: str | None = None  # whose stale lock this one replaced, for the log
        self._stop = threading.Event()
        self._thread = None

    # ---- acquiring ---------------------------------------------------------------------------------
    def acquire(self, wait_s: float = 0.0) -> "RunLock":
        self.directory.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + wait_s
        while True:
            if self._create():
                break
            holder, age = self.read()
            if holder is None:  # vanished or half-written between our create and read: try again
                continue
            reason = self.stale_reason(holder, age)
            if reason:
                self._take_over(holder, age, reason)
                continue
            if time.monotonic() >= deadline:
                raise UserError(f"{self.directory} is in use: {self.what} locked by {describe(holder, age)} "
                                f"({self.path}); wait for that job to end, or stop it"
                                f"{' (scancel ' + holder['slurm_job_id'] + ')' if holder.get('slurm_job_id') else ''},"
                                f" or use another run dir; a lock whose holder died is taken over by itself")
            time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))
        self._thread = threading.Thread(target=self._beat, name="ddpm-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(_holder_record(self.token), f)
            f.flush()
            os.fsync(f.fileno())
        return True

    def read(self) -> tuple[dict | None, float]:
        """(holder record, heartbeat age in seconds), or (None, 0) if there is no lock file. A file that is
        not a holder record (damaged, or being written this instant) reads as {}."""
        try:
            mtime = self.path.stat().st_mtime
            text = self.path.read_text()
        except OSError:
            return None, 0.0
        try:
            holder = json.loads(text)
        except ValueError:
            holder = {}
        return holder if isinstance(holder, dict) else {}, max(0.0, _fs_now(self.directory) - mtime)

    def stale_reason(self, holder: dict, age: float) -> str | None:
        mine = os.environ.get("SLURM_JOB_ID")
        if self.own_job_takes_over and mine and holder.get("slurm_job_id") == mine:
            return f"held by an earlier run of this SLURM job ({mine})"
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int) \
                and not _alive(holder["pid"]):
            return f"its holder, pid {holder['pid']} on this host, is gone"
        if age > self.stale_after_s:
            return f"no heartbeat for {age:.0f} s (more than {self.stale_after_s:.0f} s)"
        if not holder.get("token"):
            # Damaged, or created this instant and not yet written: only an old one is taken over.
            return "the lock file is damaged" if age > 5 else None
        job = holder.get("slurm_job_id")
        if job and holder.get("host") != socket.gethostname() and _slurm_job_ended(job):
            return f"its SLURM job {job} is no longer running"
        return None

    def _take_over(self, holder: dict, age: float, reason: str) -> None:
        aside = self.path.with_name(f"{self.path.name}.stale-{uuid.uuid4().hex[:8]}")
        try:
            os.replace(self.path, aside)  # only one of several contenders gets the file
        except FileNotFoundError:
            return
        aside.unlink(missing_ok=True)
        self.took_over = f"{describe(holder, age)}: {reason}"

    # ---- holding -----------------------------------------------------------------------------------
    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            holder, _ = self.read()
            if holder is None or holder.get("token") != self.token:
                self.lost = True
                return
            try:
                atomic_write(self.path, json.dumps(holder))
            except OSError:  # a full disk must not kill the holder; the next beat tries again
                pass

    def owned(self) -> bool:
        """Whether the lock file still names this holder (a cheap read: no clock probe)."""
        if self.lost:
            return False
        try:
            self.lost = json.loads(self.path.read_text()).get("token") != self.token
        except (OSError, ValueError, AttributeError):
            self.lost = True
        return not self.lost

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._thread, self._stop = None, threading.Event()
        holder, _ = self.read()
        if holder is not None and holder.get("token") == self.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "RunLock":
        return self if self._thread is not None else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
