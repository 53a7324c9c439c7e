"""A run's restarts (requeues): where a restart resumes from, how many restarts in a row got no further
and how many may, and the rendezvous port of each. Torch-free and quick to import: the submitit launcher
calls these functions and the sbatch templates ask for them through ``python -m ddpm.cluster.requeue``,
so each fact has one definition.

``DIR/restarts_without_progress`` (DIR: ``RUN_DIR`` for training, ``RUN_DIR/samples`` for sampling) holds
``<count> <progress> <job id>``: how many stops in a row of SLURM job ``<job id>`` ended without progress,
and the progress (a checkpoint step, or sampling's committed shards; -1: none) the last one ended at. A
record of another job (a resubmission) counts as none: a new job starts a new count.
"""
import os
import re
from pathlib import Path

from ddpm.errors import UserError
from ddpm.run.atomic import atomic_write

LATEST_FILE = "latest"  # RUN_DIR/checkpoints/latest: the name of the newest complete checkpoint dir
RESTARTS_FILE = "restarts_without_progress"
MAX_IDLE_RESTARTS = 2  # restarts in a row without progress before a job stops requeueing itself
MAX_IDLE_RESTARTS_ENV = "DDPM_MAX_IDLE_RESTARTS"  # overrides it, for both launchers
NONE = -1  # the progress of a run without a checkpoint (or of sampling without a committed shard)


def parse_latest(text: str) -> int | None:
    """The step a ``latest`` pointer names (``"step_000001234\\n"`` -> 1234); None if it names no step dir."""
    m = re.fullmatch(r"step_([0-9]+)", text.strip())
    return int(m.group(1)) if m else None


def latest_step(run_dir) -> int:
    """The step ``RUN_DIR/checkpoints/latest`` names: where a restart resumes from; NONE (-1) without one.

    Reads only the pointer (no manifest check): a garbled pointer counts as none here, and
    ``CheckpointManager.load_latest`` walks back to the newest checkpoint that verifies."""
    try:
        step = parse_latest((Path(run_dir) / "checkpoints" / LATEST_FILE).read_text(errors="replace"))
    except OSError:
        return NONE
    return NONE if step is None else step


def max_idle_restarts(env=os.environ) -> int:
    """How many restarts in a row may end without progress: ``DDPM_MAX_IDLE_RESTARTS`` if set, else
    ``MAX_IDLE_RESTARTS``. UserError (one line) for anything but a whole number >= 0."""
    value = env.get(MAX_IDLE_RESTARTS_ENV, "").strip()
    if not value:
        return MAX_IDLE_RESTARTS
    if not value.isdigit():
        raise UserError(f"{MAX_IDLE_RESTARTS_ENV}={value!r} is not a whole number >= 0; set it to e.g. 3, or "
                        f"unset it for the default ({MAX_IDLE_RESTARTS})")
    return int(value)


def _job() -> str:
    return os.environ.get("SLURM_JOB_ID") or "-"


def _record(directory) -> tuple[int, int]:
    """(count, progress) of this job's record in DIRECTORY; (0, NONE) without one."""
    try:
        count, progress, job = (Path(directory) / RESTARTS_FILE).read_text().split()
        if job == _job():
            return int(count), int(progress)
    except (OSError, ValueError):  # none, another layout, or garbled: start a new count
        pass
    return 0, NONE


def idle_restarts(directory, stopped_at: int | None = None) -> int:
    """How many restarts in a row of this job ended without progress (0 without a record).

    With ``stopped_at`` (the progress this run stopped at, to be requeued), first record that stop: the
    count goes back to 0 if it is past the progress the previous stop recorded, and up by one otherwise.
    """
    count, progress = _record(directory)
    if stopped_at is not None:
        count = 0 if stopped_at > progress else count + 1
        Path(directory).mkdir(parents=True, exist_ok=True)
        atomic_write(Path(directory) / RESTARTS_FILE, f"{count} {stopped_at} {_job()}\n")
    return count


def master_port(job_id: int, restart_count: int) -> int:
    """A rendezvous port in [20000, 60000): spread over job ids, different after every requeue.

    A requeued job may land on a node where the old port is still in TIME_WAIT or held by a dying
    process; moving by one per restart gives each attempt a fresh rendezvous.
    """
    return 20000 + (job_id * 2654435761 + restart_count) % 40000  # Knuth's multiplicative hash
