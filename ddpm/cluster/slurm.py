"""What a SLURM cluster offers and what its jobs are doing, through the client commands only.

Partitions come from ``sinfo``, job states from ``sacct`` (which remembers finished and requeued runs;
needs accounting) with ``squeue`` for jobs accounting does not know yet. Time strings follow sbatch.
"""
import re
import subprocess
from dataclasses import dataclass

from ddpm.errors import UserError

TIME_FORMATS = "HH:MM:SS, MM:SS, D-HH:MM:SS, D-HH or minutes"


def parse_time(text: str) -> int:
    """An sbatch ``--time`` string -> seconds (> 0).

    Accepts what sbatch accepts: ``M``, ``M:S``, ``H:M:S``, ``D-H``, ``D-H:M``, ``D-H:M:S``
    (e.g. ``90`` = 90 minutes, ``30:00`` = 30 minutes, ``24:00:00``, ``2-00:00:00``).
    """
    s = str(text).strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", s)
    bad = UserError(f"invalid --time '{text}': use {TIME_FORMATS}, e.g. --time 24:00:00")
    if not m:
        raise bad
    days, a, b, c = (int(g) if g is not None else None for g in m.groups())
    if days is None:
        if b is None:
            seconds = a * 60                          # minutes
        elif c is None:
            seconds, small = a * 60 + b, (b,)         # minutes:seconds
        else:
            seconds, small = a * 3600 + b * 60 + c, (b, c)  # hours:minutes:seconds
        if b is not None and any(v >= 60 for v in small):
            raise bad
    else:
        if a >= 24 or (b is not None and b >= 60) or (c is not None and c >= 60):
            raise bad
        seconds = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    if seconds <= 0:
        raise UserError(f"--time '{text}' is zero; give the job some time, e.g. --time 24:00:00")
    return seconds


def format_time(seconds: int) -> str:
    """Seconds -> ``D-HH:MM:SS`` (``HH:MM:SS`` under a day), as sinfo/squeue print it."""
    days, rest = divmod(int(seconds), 86400)
    hms = f"{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    return f"{days}-{hms}" if days else hms


@dataclass(frozen=True)
class Partition:
    name: str
    default: bool
    max_time_s: int | None   # None: no limit
    nodes: int
    gpus_per_node: int       # the most GPUs any of its nodes declares (gres gpu)


def _run(cmd: list[str]) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise UserError(f"'{cmd[0]}' not found: run this on the cluster's login node, or use --local") from None
    except subprocess.TimeoutExpired:
        raise UserError(f"'{' '.join(cmd)}' did not answer within 60 s: is slurmctld up? (try 'sinfo')") from None
    if r.returncode != 0:
        first = (r.stderr.strip().splitlines() or ["no message"])[0]
        raise UserError(f"'{' '.join(cmd)}' failed: {first} (on the cluster's login node? or use --local)")
    return r.stdout


def _gpus(gres: str) -> int:
    """'gpu:4', 'gpu:a100:8(S:0-1)', 'gpu:a100:4,gpu:v100:2' -> the largest count; '(null)' -> 0."""
    counts = [int(n) for n in re.findall(r"gpu(?::[^:,(]+)?:(\d+)", gres)]
    return max(counts, default=0)


def partitions() -> dict[str, Partition]:
    """Partitions from ``sinfo`` (one line per partition and node group), merged by name."""
    merged: dict[str, dict] = {}
    for line in _run(["sinfo", "-h", "-o", "%P|%l|%D|%G"]).splitlines():
        if line.count("|") != 3:
            continue
        name, limit, nodes, gres = line.split("|")
        p = merged.setdefault(name.rstrip("*"), {"default": False, "limit": limit, "nodes": 0, "gpus": 0})
        p["default"] |= name.endswith("*")
        p["nodes"] += int(nodes) if nodes.isdigit() else 0
        p["gpus"] = max(p["gpus"], _gpus(gres))
    out = {}
    for name, p in merged.items():
        limit = p["limit"].strip()
        max_s = None if limit.lower() in ("infinite", "unlimited", "n/a", "") else parse_time(limit)
        out[name] = Partition(name, p["default"], max_s, p["nodes"], p["gpus"])
    return out


def check_request(partition: str | None, nodes: int, gpus_per_node: int, time_s: int) -> Partition:
    """The partition a job would run in, after checking that it exists and can hold the request.

    partition None picks the cluster's default partition. Raises UserError (one line) otherwise:
    a request that no node can satisfy would pend forever instead of failing.
    """
    parts = partitions()
    if not parts:
        raise UserError("sinfo lists no partitions: is this a SLURM login node?")
    if partition is None:
        defaults = [p for p in parts.values() if p.default]
        if not defaults:
            raise UserError(f"this cluster has no default partition; pass --partition (one of {', '.join(parts)})")
        part = defaults[0]
    elif partition not in parts:
        raise UserError(f"unknown partition '{partition}'; this cluster has: {', '.join(parts)} (see sinfo)")
    else:
        part = parts[partition]
    if part.max_time_s is not None and time_s > part.max_time_s:
        raise UserError(f"--time {format_time(time_s)} exceeds the time limit of partition {part.name} "
                        f"({format_time(part.max_time_s)}); lower --time (training resumes after a requeue)")
    if nodes > part.nodes:
        raise UserError(f"--nodes {nodes} but partition {part.name} has {part.nodes} node(s)")
    if gpus_per_node > part.gpus_per_node:
        raise UserError(f"--gpus-per-node {gpus_per_node} but the nodes of partition {part.name} have at most "
                        f"{part.gpus_per_node} GPU(s); the job would pend forever")
    return part


def _expand_ids(job_id: str) -> list[str]:
    """'12_[0-2,5%4]' -> ['12_0', '12_1', '12_2', '12_5']; anything else stays as it is."""
    m = re.fullmatch(r"(\d+)_\[([^\]]*)\]", job_id)
    if not m:
        return [job_id]
    out = []
    for part in m.group(2).split("%")[0].split(","):
        lo, _, hi = part.partition("-")
        if lo.isdigit() and (not hi or hi.isdigit()):
            out += [f"{m.group(1)}_{k}" for k in range(int(lo), int(hi or lo) + 1)]
    return out


def job_states(job_ids: list[str]) -> dict[str, tuple[str, int]]:
    """job id ('123' or array task '123_4') -> (state, runs), e.g. ('COMPLETED', 2) for a job that was
    requeued once. Ids neither sacct nor squeue knows -> ('UNKNOWN', 0). Raises UserError when neither
    command works."""
    bases = sorted({j.split("_")[0] for j in job_ids})
    runs: dict[str, list[tuple[str, str]]] = {}
    try:
        out = _run(["sacct", "-D", "-X", "-n", "-P", "-o", "JobID,State,Start", "-j", ",".join(bases)])
    except UserError:
        out = ""  # no accounting: squeue still knows the queued and running jobs
    for line in out.splitlines():
        fields = line.split("|")
        if len(fields) != 3:
            continue
        start = fields[2] if fields[2][:1].isdigit() else "9999"  # Unknown/None: not started, the newest
        for jid in _expand_ids(fields[0]):
            runs.setdefault(jid, []).append((start, fields[1].split()[0] if fields[1].strip() else "UNKNOWN"))
    queued = {}
    try:
        for line in _run(["squeue", "-h", "-o", "%i|%T", "-j", ",".join(bases)]).splitlines():
            jid, _, state = line.partition("|")
            for j in _expand_ids(jid.strip()):
                queued[j] = state.strip()
    except UserError:
        if not out:
            raise
    states = {}
    for jid in job_ids:
        rows = runs.get(jid) or runs.get(jid.split("_")[0], [])  # a whole array before it splits into tasks
        if rows:
            states[jid] = (sorted(rows, key=lambda r: r[0])[-1][1], len(runs.get(jid, rows)))
        elif jid in queued:
            states[jid] = (queued[jid], 1)
        else:
            states[jid] = ("UNKNOWN", 0)
    return states
