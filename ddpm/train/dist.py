"""Process-group setup from torchrun or SLURM, and the few collectives the rest of the code uses.

Launch detection order: torchrun (RANK/WORLD_SIZE/LOCAL_RANK) -> SLURM with more than one task
(SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID) -> a single process without a process group.
"""
import os
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping

import torch
import torch.distributed as dist

from ddpm.errors import UserError
from ddpm.run.restarts import master_port  # the one formula; the sbatch templates ask it too (ddpm.cluster.requeue)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None: single process, no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def parse_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM hostlist: "gpu[01-03,07],cpu5" -> ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"].

    Zero padding follows the width of each range's lower bound, as in SLURM; several bracket groups in
    one name ("r[1-2]n[1-2]") expand to all combinations.
    """
    hosts, depth, start = [], 0, 0
    for i, ch in enumerate(nodelist + ","):
        depth += (ch == "[") - (ch == "]")
        if depth < 0 or (depth > 1 and ch == "["):
            raise ValueError(f"malformed SLURM nodelist {nodelist!r}")
        if ch == "," and depth == 0:
            if nodelist[start:i].strip():
                hosts += _expand_host(nodelist[start:i].strip(), nodelist)
            start = i + 1
    if depth:
        raise ValueError(f"malformed SLURM nodelist {nodelist!r}")
    return hosts


def _expand_host(pattern: str, nodelist: str) -> list[str]:
    m = re.match(r"^([^\[]*)\[([^\]]*)\](.*)$", pattern)
    if not m:
        return [pattern]
    prefix, ranges, rest = m.groups()
    names = []
    for part in ranges.split(","):
        lo, _, hi = part.strip().partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise ValueError(f"malformed range {part!r} in SLURM nodelist {nodelist!r}")
        names += [str(k).zfill(len(lo)) for k in range(int(lo), int(hi or lo) + 1)]
    return [prefix + name + tail for name in names for tail in _expand_host(rest, nodelist)]


def _job_id(value: str) -> int:
    digits = re.sub(r"\D", "", value)
    return int(digits) if digits else 0


def _launch_info(env: Mapping[str, str], pid: int | None = None) -> tuple[int, int, int, dict[str, str]]:
    """(rank, world_size, local_rank, rendezvous env defaults) for the way this process was started.

    A process that SLURM's variables count as one of several tasks but that srun did not start (the
    batch script, or the shell of an interactive ``srun -n4 --pty bash``) would wait for peers that never
    come: that is a UserError at once. ``pid``: this process's id (``os.getpid()`` by default).
    """
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun sets MASTER_ADDR/MASTER_PORT itself
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), {}
    # A 1-task job (or a batch script started by sbatch) also has SLURM_PROCID: that is one process.
    ntasks = int(env.get("SLURM_NTASKS", "1") or 1)
    if "SLURM_PROCID" in env and ntasks > 1:
        _check_started_by_srun(env, ntasks, os.getpid() if pid is None else pid)
        rendezvous = {}
        if not env.get("MASTER_ADDR"):  # values exported by the batch script win
            # Task 0 runs on the first node of the step, which is the first node of the job unless
            # the step uses a subset of it.
            nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", "")
            hosts = parse_nodelist(nodelist)
            if not hosts:
                raise UserError("SLURM_NTASKS > 1 but SLURM_JOB_NODELIST is empty: set MASTER_ADDR to the first node of the job")
            rendezvous["MASTER_ADDR"] = hosts[0]
        if not env.get("MASTER_PORT"):
            restarts = int(env.get("SLURM_RESTART_COUNT", "0") or 0)
            rendezvous["MASTER_PORT"] = str(master_port(_job_id(env.get("SLURM_JOB_ID", "0")), restarts))
        return int(env["SLURM_PROCID"]), ntasks, int(env.get("SLURM_LOCALID", "0")), rendezvous
    return 0, 1, 0, {}


def _check_started_by_srun(env: Mapping[str, str], ntasks: int, pid: int) -> None:
    """UserError unless this process is one of the ``ntasks`` tasks of an srun step (see _launch_info)."""
    launch = (f"launch one process per task with 'srun python -m ...', or run 'torchrun --nproc_per_node={ntasks} "
              f"-m ...', or 'SLURM_NTASKS=1 python -m ...' for one process")
    if "SLURM_STEP_ID" not in env:  # srun sets it for every task; the batch script and salloc's shell lack it
        raise UserError(f"SLURM_NTASKS={ntasks} but this process runs in the job's batch script, not in an srun step: "
                        f"its {ntasks - 1} peers would never come; {launch}")
    step_tasks = env.get("SLURM_STEP_NUM_TASKS")
    if step_tasks and int(step_tasks) != ntasks:
        raise UserError(f"SLURM_NTASKS={ntasks} but this srun step has {step_tasks} task(s) (SLURM_STEP_NUM_TASKS): "
                        f"the ranks would wait for peers that never come; {launch}")
    # srun --pty gives task 0 a terminal; a program started from that shell is not a task itself.
    if env.get("SLURM_PTY_PORT") and env.get("SLURM_TASK_PID") and int(env["SLURM_TASK_PID"]) != pid:
        raise UserError(f"this runs in the shell of an interactive 'srun -n{ntasks} --pty' step, whose other "
                        f"{ntasks - 1} task(s) are not running this program: they would never join; {launch}")


def local_device_index(local_rank: int, visible: int, local_world_size: int | None = None) -> int:
    """The CUDA device index of the task with ``local_rank`` on its node, given ``visible`` GPUs.

    Tasks that each see all the node's GPUs (``--gpus-per-node=4``, torchrun) take GPU ``local_rank``;
    a task bound to its own GPU (``--gpus-per-task=1``: one visible) takes 0. Fewer visible GPUs than
    tasks on the node would put two ranks on one GPU (NCCL refuses that, after the rendezvous): a
    UserError at once.
    """
    if visible < 1:
        raise UserError("CUDA reports no visible GPU on this node; check CUDA_VISIBLE_DEVICES or use train.device=cpu")
    if visible == 1:
        return 0
    if local_rank >= visible or (local_world_size or 0) > visible:
        tasks = local_world_size or local_rank + 1
        raise UserError(f"{tasks} tasks on this node share {visible} visible GPUs (local rank {local_rank}): ask for "
                        f"one GPU per task (#SBATCH --gpus-per-node={tasks}, or --gpus-per-task=1), or start "
                        f"{visible} tasks per node")
    return local_rank


def _local_world_size(env: Mapping[str, str]) -> int | None:
    """Tasks on this node: torchrun's LOCAL_WORLD_SIZE, or SLURM's SLURM_STEP_TASKS_PER_NODE ("4" or "4(x2)")."""
    if "RANK" in env and "WORLD_SIZE" in env:
        value = env.get("LOCAL_WORLD_SIZE", "")
    else:
        value = env.get("SLURM_STEP_TASKS_PER_NODE", "") if "SLURM_STEP_ID" in env else ""
    m = re.match(r"^(\d+)", value)
    return int(m.group(1)) if m else None


def _pick_device(device: str, local_rank: int) -> torch.device:
    if device == "cpu":
        return torch.device("cpu")
    if device != "auto" and device != "cuda" and not re.fullmatch(r"cuda:\d+", device):
        raise UserError(f"train.device={device} is not one of auto, cpu, cuda, cuda:N; use train.device=auto")
    # is_available() is False on a node whose SLURM config declares GPUs it has no driver for.
    if not torch.cuda.is_available():
        if device == "auto":
            return torch.device("cpu")
        raise UserError(f"train.device={device} but CUDA is not available on this node; use train.device=auto to fall back to CPU")
    if device.startswith("cuda:"):
        index = int(device[5:])
    else:
        index = local_device_index(local_rank, torch.cuda.device_count(), _local_world_size(os.environ))
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def init_distributed(device: str = "auto", timeout_s: int = 600) -> DistInfo:
    """Join the process group (if launched with more than one process) and pick this rank's device.

    device: "auto" (cuda:local_rank if CUDA works, else cpu), "cuda", "cuda:N" or "cpu".
    Backend nccl on CUDA, gloo on CPU; timeout_s (``train.collective_timeout_s``) bounds every collective:
    a rank whose peer died fails after it instead of waiting forever.
    """
    rank, world_size, local_rank, rendezvous = _launch_info(os.environ)
    dev = _pick_device(device, local_rank)
    if world_size == 1:
        return DistInfo(rank, 1, local_rank, dev, None)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    # A collective that times out (a peer rank died) tears the process down instead of hanging in NCCL.
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    if not dist.is_initialized():
        os.environ.update(rendezvous)  # only holds keys the environment lacks
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
        if missing:
            raise UserError(f"RANK/WORLD_SIZE are set but {' and '.join(missing)} not: launch with torchrun or srun, "
                            f"or export MASTER_ADDR and MASTER_PORT")
        # device_id binds the NCCL communicator to this rank's GPU at once (no guessing from the rank, no
        # extra context on GPU 0) and lets barriers and the first collective use it.
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s), device_id=dev if dev.type == "cuda" else None)
    return DistInfo(rank, world_size, local_rank, dev, backend)


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def print0(*args, **kw) -> None:
    """print() on rank 0 only (flushed, so SLURM logs show progress as it happens)."""
    rank = dist.get_rank() if _initialized() else int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
    if rank == 0:
        kw.setdefault("flush", True)
        print(*args, **kw)


def barrier() -> None:
    """Wait for all ranks; no-op without a process group."""
    if not _initialized():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def reduce_mean(values, device):
    """Mean over ranks of a dict of floats (-> dict of floats) or of a tensor (-> tensor on `device`).

    Every rank must pass the same keys. Values are reduced in sorted-key order as float64; without a
    process group the input comes back unchanged (dicts as plain floats).
    """
    if isinstance(values, torch.Tensor):
        if not _initialized():
            return values
        t = values.detach().to(device, torch.float64 if not values.is_floating_point() else values.dtype, copy=True)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.div_(dist.get_world_size())
    keys = sorted(values)
    if not _initialized():
        return {k: float(values[k]) for k in keys}
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    t.div_(dist.get_world_size())
    return dict(zip(keys, t.tolist()))


def broadcast_buffers(module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank, in place; no-op without a process group.
    Training never broadcasts them (batch statistics train; rank 0's are saved and sampled with), so a net
    evaluated on every rank (the held-out loss) must first take rank 0's, the ones its checkpoint holds."""
    if _initialized():
        for buffer in module.buffers():
            dist.broadcast(buffer.data, src=0)


def cleanup() -> None:
    """Leave the process group (call once at the end of a run); no-op without one."""
    if _initialized():
        dist.destroy_process_group()


def any_rank(flags, device) -> list[bool]:
    """For each flag, True on every rank if it is set on any rank (one all_reduce MAX); the flags
    themselves without a process group. Collective: every rank passes as many flags at the same point.
    device: where the small tensor lives (the rank's CUDA device for NCCL, cpu for gloo)."""
    if not _initialized():
        return [bool(f) for f in flags]
    t = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def gather_from_all(value) -> list:
    """Every rank's ``value`` (any picklable object), in rank order, on every rank; ``[value]`` alone."""
    if not _initialized():
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def broadcast_from_main(value):
    """Rank 0's ``value`` (any picklable object) on every rank; the value itself without a process group."""
    if not _initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
