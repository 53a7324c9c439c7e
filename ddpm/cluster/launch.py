"""Launch training through submitit: one run or a sweep, on SLURM or locally, requeued on preemption/timeout.

Every task of a job runs ``python -m jobs.train --config C [overrides] --run-dir D`` as a child process
(one task per GPU; the child inherits the task's SLURM environment, so it becomes one DDP rank). A
rerun of the same command resumes D from its newest verified checkpoint, which is all a requeue needs.

How a time limit or a preemption becomes a requeue: submitit asks SLURM for ``--signal=USR2@S`` and runs
the tasks under srun, so S seconds (give or take 30) before the limit SLURM sends USR2 to every process
of the step — the submitit task and its ``jobs.train`` child. The child sets its flag and, at the next
step boundary, saves a checkpoint and exits 75. In the task of rank 0, submitit's USR2 handler calls
:meth:`TrainJob.checkpoint`, which forwards the signal to the child (repeatedly: a child still importing
torch ignores USR2, see ``_ignore_preemption_signal``), waits for it to exit and returns a
``DelayedSubmission`` of itself; submitit pickles that and runs ``scontrol requeue``. A preemption's
SIGTERM reaches the child directly and SLURM requeues the job itself.
"""
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import submitit

from ddpm.cluster import slurm
from ddpm.cluster.sweep import JobSpec, write_manifest
from ddpm.errors import NO_SPACE_EXIT_CODE, REQUEUE_EXIT_CODE, UserError
from ddpm.run import restarts

REPO_ROOT = Path(__file__).resolve().parents[2]  # holds ddpm/ and jobs/


def _preemption_signal() -> signal.Signals:
    """The signal submitit asks SLURM for (USR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise)."""
    return signal.Signals["SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")]


def _ignore_preemption_signal() -> None:
    # Runs in the child between fork and exec. An ignored signal stays ignored across exec, so a USR2
    # that arrives while the child still imports torch is dropped instead of killing it (the default
    # action); ddpm.preempt installs the real handler before the first step, and checkpoint() re-sends.
    signal.signal(_preemption_signal(), signal.SIG_IGN)


class TrainingFailed(Exception):
    """jobs.train exited with an error; the message names the exit code and what it means."""


def _meaning(rc: int) -> str:
    if rc < 0:
        return f"killed by {signal.Signals(-rc).name if -rc in signal.valid_signals() else f'signal {-rc}'}"
    return {1: "diverged or crashed: see the traceback above", 2: "bad input: see the 'error:' line above",
            NO_SPACE_EXIT_CODE: "out of disk space or quota: see the 'error:' line above; not requeued",
            REQUEUE_EXIT_CODE: "checkpoint saved after a stop signal, but the job was not requeued; "
                               "resubmit the same --run-dir to resume"}.get(rc, "see the log above")


class TrainJob(submitit.helpers.Checkpointable):
    """One training run as a submitit job: ``TrainJob(config, overrides, run_dir, cwd)()``.

    config: absolute path of the YAML file; overrides: ``key.sub=value`` strings; run_dir: absolute
    path; cwd: directory the child runs in (relative paths in the config, e.g. data.root, resolve there).
    grace_s: how long checkpoint() waits for the child to save (keep it below the signal delay).
    max_idle_restarts: restarts in a row without a new checkpoint before the job stops requeueing itself
    (default: ``ddpm.run.restarts.max_idle_restarts()``: DDPM_MAX_IDLE_RESTARTS, else its MAX_IDLE_RESTARTS).
    """

    def __init__(self, config: str, overrides: list[str], run_dir: str, cwd: str, grace_s: float = 60.0,
                 max_idle_restarts: int | None = None):
        self.config, self.overrides, self.run_dir, self.cwd = config, list(overrides), run_dir, cwd
        self.grace_s = grace_s
        self.max_idle_restarts = restarts.max_idle_restarts() if max_idle_restarts is None else max_idle_restarts
        self.outcome: int | None = None  # set when the child ended on its own while a signal was handled
        self._child: subprocess.Popen | None = None
        self._rc: int | None = None

    def command(self) -> list[str]:
        return [sys.executable, "-m", "jobs.train", "--config", self.config, *self.overrides, "--run-dir", self.run_dir]

    def __getstate__(self) -> dict:  # checkpoint() pickles self: no process handles in the pickle
        return {**self.__dict__, "_child": None, "_rc": None}

    @property
    def idle_restarts(self) -> int:
        """Restarts in a row of this job that ended without a new checkpoint (kept in the run dir, where
        the sbatch templates keep theirs: ``ddpm.run.restarts``)."""
        return restarts.idle_restarts(self.run_dir)

    def __call__(self) -> dict:
        """The submitit entry point (every task). Returns {"run_dir", "returncode"}; raises TrainingFailed."""
        rc = self.outcome if self.outcome is not None else self._run_child(dict(os.environ))
        if rc == REQUEUE_EXIT_CODE:
            self._await_requeue()
        if rc != 0:
            raise TrainingFailed(f"jobs.train exited with {rc} ({_meaning(rc)}); run dir {self.run_dir}")
        if "SUBMITIT_EXECUTOR" in os.environ:
            # Training is done: a time-limit signal from now on must not requeue, nor kill this task while
            # Python shuts down (finalization resets Python-level handlers to SIG_DFL, which for USR2 means
            # death, and sacct would say FAILED). An ignored signal stays ignored through finalization.
            signal.signal(_preemption_signal(), signal.SIG_IGN)
        return {"run_dir": self.run_dir, "returncode": 0}

    def run_local(self) -> int:
        """Run in this process without SLURM: a single rank, whatever allocation we may be inside."""
        return self._run_child({k: v for k, v in os.environ.items() if not k.startswith("SLURM_")})

    def _run_child(self, env: dict) -> int:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
        env.setdefault("PYTHONUNBUFFERED", "1")
        print(f"ddpm.launch: {shlex.join(self.command())}  (in {self.cwd})", flush=True)
        self._rc = None
        self._child = subprocess.Popen(self.command(), cwd=self.cwd, env=env, preexec_fn=_ignore_preemption_signal)
        # A thread reaps the child, so that the signal handler (checkpoint) never re-enters Popen.wait,
        # whose lock the interrupted main thread may hold; both only poll self._rc.
        threading.Thread(target=self._reap, args=(self._child,), daemon=True).start()
        while self._rc is None:
            time.sleep(0.2)
        return self._rc

    def _reap(self, child: subprocess.Popen) -> None:
        self._rc = child.wait()

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """Called by submitit's signal handler (rank 0): stop the child at a step boundary, then requeue."""
        child, sig = self._child, _preemption_signal()
        deadline, kick = time.monotonic() + self.grace_s, 0.0
        while child is not None and self._rc is None and time.monotonic() < deadline:
            if time.monotonic() >= kick:
                try:
                    os.kill(child.pid, sig)  # the handler in ddpm.train.preempt is idempotent
                except ProcessLookupError:
                    pass
                kick = time.monotonic() + 2.0
            time.sleep(0.1)
        rc = self._rc
        if rc is not None and rc >= 0 and rc != REQUEUE_EXIT_CODE:
            self.outcome = rc  # it finished (or failed) on its own: the rerun only reports that
        state = "still running" if rc is None else f"exited with {rc}"
        step = restarts.latest_step(self.run_dir)
        # Stopped for the signal: a restart; did this run get past where the previous one stopped?
        idle = restarts.idle_restarts(self.run_dir, stopped_at=step) if self.outcome is None else 0
        if idle > self.max_idle_restarts:
            # submitit: no DelayedSubmission means no requeue; the job ends as not completed.
            newest = f"step {step}" if step >= 0 else "none"
            print(f"ddpm.launch: error: {idle} restarts in a row ended before a new checkpoint "
                  f"(newest: {newest}): the time limit or preemption comes before training reaches one; not "
                  "requeueing. Give it a longer --signal-delay or --time, or a smaller checkpoint.every, and "
                  f"submit again with the same run dir ({self.run_dir}; or raise {restarts.MAX_IDLE_RESTARTS_ENV})",
                  flush=True)
            return None
        print(f"ddpm.launch: {sig.name}: jobs.train {state}; requeueing (run dir {self.run_dir})", flush=True)
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)

    def _await_requeue(self) -> None:
        # The child stopped for a SIGTERM (scontrol requeue, preemption) or because another rank was
        # signalled; SLURM requeues or kills this task within KillWait. If nothing happens (a bare
        # `scancel --signal=TERM`), rank 0 requeues through submitit's own handler, i.e. checkpoint().
        if "SUBMITIT_EXECUTOR" not in os.environ:
            return
        time.sleep(self.grace_s)
        if os.environ.get("SLURM_PROCID", "0") == "0":
            os.kill(os.getpid(), _preemption_signal())
            time.sleep(self.grace_s)


# ----- what each job asks for --------------------------------------------------------------------

@dataclass(frozen=True)
class Resources:
    """What each job asks SLURM for. One task (= one DDP rank) per GPU, one per node without GPUs."""
    nodes: int = 1
    gpus_per_node: int = 1
    time_s: int = 3600
    partition: str | None = None
    cpus_per_task: int | None = None
    mem: str | None = None
    account: str | None = None
    signal_delay_s: int = 120
    max_timeouts: int = 20

    @property
    def tasks_per_node(self) -> int:
        return max(1, self.gpus_per_node)

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node

    def check(self) -> None:
        """Checks that need no cluster (UserError): counts, memory syntax, room for the signal."""
        for name, v in (("--nodes", self.nodes), ("--cpus-per-task", self.cpus_per_task or 1),
                        ("--signal-delay", self.signal_delay_s), ("--max-timeouts", self.max_timeouts)):
            if v < 1:
                raise UserError(f"{name} must be at least 1, got {v}")
        if self.gpus_per_node < 0:
            raise UserError(f"--gpus-per-node must be 0 or more, got {self.gpus_per_node}")
        if self.mem is not None and not re.fullmatch(r"\d+[KMGT]?", self.mem, re.I):
            raise UserError(f"invalid --mem '{self.mem}': use sbatch's syntax, e.g. 64G or 4000M")
        # SLURM checks limits every 30 s and signals at the first check with <= delay + 30 s left: with
        # less than delay + 60 s the signal can come before Python has installed any handler.
        if self.time_s < self.signal_delay_s + 60:
            raise UserError(f"--time {slurm.format_time(self.time_s)} leaves no room for --signal-delay "
                            f"{self.signal_delay_s} (needs at least delay + 60 s); raise --time or lower --signal-delay")

    def executor_parameters(self, job_name: str) -> dict:
        """Parameters for submitit.SlurmExecutor.update_parameters (sbatch names, time in minutes)."""
        p = {"job_name": job_name, "time": math.ceil(self.time_s / 60), "nodes": self.nodes,
             "ntasks_per_node": self.tasks_per_node, "signal_delay_s": self.signal_delay_s,
             "setup": [f"export PYTHONPATH={shlex.quote(str(REPO_ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}"],
             "additional_parameters": {"requeue": True},  # clusters with JobRequeue=0 need it
             # A crashed rank takes the step down at once instead of leaving its peers in a collective.
             "srun_args": ["--kill-on-bad-exit=1"]}
        optional = {"gpus_per_node": self.gpus_per_node or None, "partition": self.partition,
                    "cpus_per_task": self.cpus_per_task, "mem": self.mem, "account": self.account}
        return {**p, **{k: v for k, v in optional.items() if v is not None}}


def sbatch_flags(params: dict, n_jobs: int) -> str:
    """What the sbatch script will say, for --dry-run (submitit adds output/error paths)."""
    p = {k: v for k, v in params.items() if k not in ("setup", "additional_parameters", "signal_delay_s", "srun_args")}
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in p.items()]
    flags += [f"--signal=USR2@{params['signal_delay_s']}", "--requeue", "--open-mode=append"]
    return " ".join(flags + ([f"--array=0-{n_jobs - 1}"] if n_jobs > 1 else []))


# ----- submitting and running -----------------------------------------------------------------------

def submit_slurm(jobs: list[JobSpec], config, resources: Resources, folder: Path, job_name: str) -> list[dict]:
    """Reserve the run dirs, submit one job per spec (a job array when several) and return manifest
    entries {"job_id", "overrides", "sweep", "run_dir", "log"}."""
    max_idle = restarts.max_idle_restarts()  # a bad DDPM_MAX_IDLE_RESTARTS: UserError before anything
    for spec in jobs:
        spec.run_dir.mkdir(parents=True)  # reserves the number: the next launch picks the one after
    ex = submitit.SlurmExecutor(folder=str(folder / "%j"), max_num_timeout=resources.max_timeouts)
    ex.update_parameters(**resources.executor_parameters(job_name))
    grace = max(10.0, resources.signal_delay_s - 20.0)
    try:
        with ex.batch():
            handles = [ex.submit(TrainJob(str(Path(config).resolve()), spec.overrides, str(spec.run_dir),
                                          os.getcwd(), grace, max_idle)) for spec in jobs]
    except Exception as e:  # sbatch refused: nothing was submitted
        for spec in jobs:
            spec.run_dir.rmdir()
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise UserError(f"sbatch refused the job: {first}") from None
    return [{"job_id": h.job_id, "overrides": s.overrides, "sweep": s.sweep, "run_dir": str(s.run_dir),
             "log": str(h.paths.stdout)} for h, s in zip(handles, jobs)]


def run_local(jobs: list[JobSpec], config, manifest_path: Path, manifest: dict) -> int:
    """Run the jobs one after another in this process (no SLURM); update the manifest after each.
    Returns how many failed."""
    manifest["jobs"] = [{"job_id": f"local-{i}", "overrides": s.overrides, "sweep": s.sweep,
                         "run_dir": str(s.run_dir), "state": "PENDING"} for i, s in enumerate(jobs)]
    write_manifest(manifest_path, manifest)
    failed = 0
    for entry, spec in zip(manifest["jobs"], jobs):
        spec.run_dir.mkdir(parents=True)
        entry["state"] = "RUNNING"
        write_manifest(manifest_path, manifest)
        job = TrainJob(str(Path(config).resolve()), spec.overrides, str(spec.run_dir), os.getcwd(),
                       max_idle_restarts=restarts.MAX_IDLE_RESTARTS)  # never requeued here: the limit is moot
        rc = job.run_local()
        entry["state"], entry["returncode"] = ("COMPLETED" if rc == 0 else "PREEMPTED" if rc == REQUEUE_EXIT_CODE
                                               else "FAILED"), rc
        failed += rc != 0
        write_manifest(manifest_path, manifest)
    return failed


