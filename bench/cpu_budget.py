"""Equal compute budgets for training runs on a shared CPU: budgets in CPU seconds, not wall seconds.

On a machine that other people's jobs share, wall time measures the neighbours as much as the recipe. The
CPU time of the training process itself (user + system, all its threads, from /proc/PID/stat) does not
depend on how many other processes wait for the cores, so the quality benchmarks give every recipe the
same CPU time: each run trains with one thread (``OMP_NUM_THREADS=1``), so one CPU second is one second
of one core, and a budget of B CPU seconds is B / 2 wall seconds of 2 free cores at perfect scaling.

How a budget becomes a run length: a short **probe** trains the recipe for a few logged intervals and
measures the CPU seconds per optimizer step between its log lines (imports, data loading and the first
interval excluded); a budget of B seconds is then ``B / (CPU s per step)`` steps, and the real run is
started with that ``train.steps``. While it runs, :class:`Watched` samples the process's CPU time several
times a second, so the benchmark reports the CPU time actually spent up to each checkpoint too.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def job_env(threads: int = 1) -> dict:
    """The environment of a benchmark job: the repository importable, unbuffered, ``threads`` threads."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
            "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` (all its threads), or None once it is gone (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime (fields 14 and 15 of proc(5))


class Watched:
    """Run ``cmd`` (output to ``log``), sampling its CPU time every ``every`` seconds until it exits.

    ``samples``: [(unix time, CPU seconds)]; :meth:`cpu_at` interpolates them (e.g. at the time a
    checkpoint was written). Raises RuntimeError if the command fails."""

    def __init__(self, cmd: list[str], log: Path, *, threads: int = 1, every: float = 0.25):
        self.cmd, self.samples = cmd, []
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=job_env(threads), stdout=out, stderr=subprocess.STDOUT)
            while proc.poll() is None:
                cpu = cpu_seconds(proc.pid)
                if cpu is not None:
                    self.samples.append((time.time(), cpu))
                time.sleep(every)
        self.returncode = proc.returncode
        if proc.returncode != 0:
            tail = Path(log).read_text().strip().splitlines()[-1:] or ["(no output)"]
            raise RuntimeError(f"{' '.join(cmd[2:4])} exited {proc.returncode}: {tail[0][:200]} (log: {log})")
        if not self.samples and sys.platform.startswith("linux"):
            raise RuntimeError(f"no CPU-time sample of {' '.join(cmd[2:4])}: it ended too fast to be timed")

    @property
    def cpu_total(self) -> float:
        return self.samples[-1][1] if self.samples else float("nan")

    def cpu_at(self, when: float) -> float:
        """CPU seconds the process had used at unix time ``when`` (linear between samples)."""
        if not self.samples:
            return float("nan")
        before = [s for s in self.samples if s[0] <= when]
        after = [s for s in self.samples if s[0] > when]
        if not before:
            return self.samples[0][1]
        if not after:
            return self.samples[-1][1]
        (t0, c0), (t1, c1) = before[-1], after[0]
        return c0 + (c1 - c0) * (when - t0) / max(t1 - t0, 1e-9)


def log_times(run_dir: Path) -> list[tuple[int, float]]:
    """[(step, unix time)] of a run's metrics.jsonl lines."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(r["step"], r["time"]) for r in rows]


def per_step_cpu(watch: Watched, run_dir: Path) -> float:
    """CPU seconds per optimizer step between the second and the last log line of a probe run."""
    times = log_times(run_dir)
    if len(times) < 3:
        raise RuntimeError(f"the probe in {run_dir} logged {len(times)} lines; it needs 3 (log more often)")
    (s0, t0), (s1, t1) = times[1], times[-1]
    return (watch.cpu_at(t1) - watch.cpu_at(t0)) / (s1 - s0)


def checkpoint_time(run_dir: Path, step: int) -> float:
    """When checkpoint ``step`` was complete (its state file's mtime, unix seconds)."""
    return (Path(run_dir) / "checkpoints" / f"step_{step:09d}" / "state.pt").stat().st_mtime
