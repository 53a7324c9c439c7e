"""Process-group setup from torchrun or SLURM, and the few collectives the rest of the code uses.

Launch detection order: torchrun (RANK/WORLD_SIZE/LOCAL_RANK) -> SLURM with more than one task
(SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID) -> a single process without a process group.
"""
import os
import re
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping

import torch
import torch.distributed as dist

from ddpm.errors import UserError


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


def master_port(job_id: int, restart_count: int) -> int:
    """A rendezvous port in [20000, 60000): spread over job ids, different after every requeue.

    A requeued job may land on a node where the old port is still in TIME_WAIT or held by a dying
    process; moving by one per restart gives each attempt a fresh rendezvous.
    """
    return 20000 + (job_id * 2654435761 + restart_count) % 40000  # Knuth's multiplicative hash


def _job_id(value: str) -> int:
    digits = re.sub(r"\D", "", value)
    return int(digits) if digits else 0


def _launch_info(env: Mapping[str, str]) -> tuple[int, int, int, dict[str, str]]:
    """(rank, world_size, local_rank, rendezvous env defaults) for the way this process was started."""
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun sets MASTER_ADDR/MASTER_PORT itself
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), {}
    # A 1-task job (or a batch script started by sbatch) also has SLURM_PROCID: that is one process.
    ntasks = int(env.get("SLURM_NTASKS", "1") or 1)
    if "SLURM_PROCID" in env and ntasks > 1:
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
    # With --gpus-per-task each task sees one GPU, so local_rank may exceed the visible count.
    index = int(device[5:]) if device.startswith("cuda:") else local_rank % torch.cuda.device_count()
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
        if "SLURM_PROCID" in os.environ and "RANK" not in os.environ and "SLURM_STEP_ID" not in os.environ:
            print(f"warning: SLURM_NTASKS={world_size} but this process was not started by srun; it will wait "
                  f"for {world_size - 1} peers that may never come (launch with 'srun python -m ...')", file=sys.stderr)
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s))
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


def cleanup() -> None:
    """Leave the process group (call once at the end of a run); no-op without one."""
    if _initialized():
        dist.destroy_process_group()


def broadcast_from_main(value):
    """Rank 0's ``value`` (any picklable object) on every rank; the value itself without a process group."""
    if not _initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
