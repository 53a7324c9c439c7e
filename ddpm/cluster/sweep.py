"""Sweeps: parse and expand ``--sweep key=v1,v2``, validate every job's config, name its run dir, and keep
the manifest (JSON) that ``jobs.submit --status`` reads back.
"""
import itertools
import json
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from ddpm.cluster import slurm
from ddpm.errors import UserError
from ddpm.run.atomic import atomic_write

# ----- what to launch -------------------------------------------------------------------------------

def split_values(text: str) -> list[str]:
    """'1e-3,2e-3' -> ['1e-3', '2e-3']; commas inside [...] or {...} stay ('[1,2],[3]' -> 2 values)."""
    values, depth, start = [], 0, 0
    for i, ch in enumerate(text + ","):
        depth += (ch in "[{") - (ch in "]}")
        if ch == "," and depth == 0:
            values.append(text[start:i].strip())
            start = i + 1
    return values


def parse_sweeps(items: list[str], overrides: list[str]) -> list[tuple[str, list[str]]]:
    """['train.lr=1e-3,2e-3', ...] -> [('train.lr', ['1e-3', '2e-3']), ...]; malformed -> UserError."""
    from ddpm.config import parse_override

    fixed = {o.partition("=")[0].strip() for o in overrides}
    out = []
    for item in items:
        key, sep, rest = item.partition("=")
        key, values = key.strip(), split_values(rest)
        if not sep or not key or not rest.strip() or any(not p.isidentifier() for p in key.split(".")) \
                or any(not v for v in values):
            raise UserError(f"malformed --sweep '{item}'; write key.sub=v1,v2,..., e.g. --sweep train.lr=1e-4,2e-4")
        if key in fixed or key in dict(out):
            raise UserError(f"{key} is given twice (as an override or in another --sweep); give it once")
        if len(set(values)) != len(values):
            raise UserError(f"--sweep {item} repeats a value; list each value once")
        for v in values:
            parse_override(f"{key}={v}")  # unparsable values fail here, before any config is built
        out.append((key, values))
    return out


def expand_sweeps(sweeps: list[tuple[str, list[str]]]) -> list[list[str]]:
    """Cartesian product -> one list of 'key=value' overrides per job ([[]] without sweeps)."""
    keys = [k for k, _ in sweeps]
    return [[f"{k}={v}" for k, v in zip(keys, combo)] for combo in itertools.product(*(v for _, v in sweeps))]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_")[:40] or "x"


def _next_index(root: Path) -> int:
    taken = [int(m.group(1)) for p in (root.iterdir() if root.is_dir() else []) if (m := re.match(r"(\d+)-", p.name))]
    return max(taken, default=-1) + 1


@dataclass(frozen=True)
class JobSpec:
    overrides: list[str]  # base overrides + this job's sweep values
    sweep: list[str]      # this job's sweep values only
    run_dir: Path
    name: str             # the config's name (job name)


def plan_jobs(config, overrides: list[str], sweep_items: list[str], run_root, world_size: int = 1,
              gpus: bool = True) -> list[JobSpec]:
    """Validate every job's config (UserError, naming the sweep value) and give each a new run dir
    ``RUN_ROOT/00012-<name>-<sweep values>`` (``-b<batch>`` without a sweep). Writes nothing.

    world_size: DDP ranks per job (the global batch must split evenly); gpus: whether jobs get GPUs.
    run_root None: the config's run_root."""
    from ddpm.config import load_config

    sweeps = parse_sweeps(sweep_items, overrides)
    cfgs = []
    for combo in expand_sweeps(sweeps):
        try:
            cfg = load_config(config, [*overrides, *combo], device="cuda" if gpus else "cpu")
        except UserError as e:
            raise UserError(f"{'sweep value ' + ' '.join(combo) + ': ' if combo else ''}{e}") from None
        if cfg.train.batch_size % world_size:
            raise UserError(f"train.batch_size={cfg.train.batch_size} is not divisible by the {world_size} ranks "
                            "(nodes x tasks per node, one task per GPU); pick a multiple or change --gpus-per-node")
        if not gpus and cfg.train.device.startswith("cuda"):
            raise UserError(f"train.device={cfg.train.device} but --gpus-per-node 0; request GPUs or set train.device=auto")
        cfgs.append((combo, cfg))
    first = None
    jobs = []
    for i, (combo, cfg) in enumerate(cfgs):
        root = Path(run_root if run_root is not None else cfg.run_root).resolve()
        first = _next_index(root) if first is None else first
        tag = "-".join(f"{_slug(c.partition('=')[0].split('.')[-1])}{_slug(c.partition('=')[2])}" for c in combo)
        name = f"{first + i:05d}-{_slug(cfg.name)}-{tag or 'b' + str(cfg.train.batch_size)}"
        jobs.append(JobSpec([*overrides, *combo], combo, root / name, cfg.name))
    return jobs


# ----- manifest and status --------------------------------------------------------------------------

def new_manifest_path(run_root: Path, name: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = run_root / "sweeps" / f"{stamp}-{_slug(name)}.json"
    k = 1
    while path.exists():
        path, k = run_root / "sweeps" / f"{stamp}-{_slug(name)}-{k}.json", k + 1
    return path


def write_manifest(path: Path, manifest: dict) -> None:
    """Atomic: a reader sees the old or the new manifest, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(manifest, indent=2) + "\n")


def read_manifest(path) -> dict:
    path = Path(path)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"manifest {path} not found; jobs.submit prints its path after submitting") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not a manifest written by jobs.submit ({e})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("jobs"), list):
        raise UserError(f"{path} is not a manifest written by jobs.submit (no 'jobs' list)")
    return manifest


def last_logged(run_dir) -> tuple[int | None, float | None]:
    """(step, loss) of the newest row of RUN_DIR/metrics.jsonl; (None, None) before the first one."""
    from ddpm.run.metrics_log import METRICS_FILE, read_metrics

    path = Path(run_dir) / METRICS_FILE
    try:
        rows = read_metrics(path) if path.is_file() else []
    except UserError:
        return None, None
    return (rows[-1]["step"], rows[-1].get("loss")) if rows else (None, None)


def last_evaluation(run_dir) -> str | None:
    """The headline of the newest evaluation (jobs.evaluate's RUN_DIR/eval/step_*/metrics.json), e.g.
    "step 5000: acc 0.982 fFID 3.1 (γ=5)", at the scale its single-scale figures use, from its
    --fid-samples rows if it has them ("... FID 3.17 (w=3, 50000 samples)"); None if none."""
    from ddpm.run.evaluations import headline_row, scale_label

    for path in sorted(Path(run_dir).glob("eval/step_*/metrics.json"), reverse=True):
        try:
            m = json.loads(path.read_text())
            section, r = headline_row(m)
            where = ([scale_label(m, r["scale"])] if m["guidance"]["conditional"] else []) + \
                ([f"{r.get('n')} samples"] if section == "fid" else [])
        except (OSError, ValueError, KeyError, TypeError, AttributeError, StopIteration):
            continue  # half-written, damaged or without samples (a denoiser run): look further back
        parts = [f"{label} {r[key]:.{digits}f}" for key, label, digits in (
            ("accuracy", "acc", 3), ("feature_fid", "fFID", 1), ("inception_fid", "FID", 2),
            ("inception_score", "IS", 2)) if r.get(key) is not None]
        return f"step {m['checkpoint']['step']}: {' '.join(parts) or 'no metrics'}" + (f" ({', '.join(where)})" if where else "")
    return None


def status_rows(manifest: dict) -> list[dict]:
    """One dict per job: job_id, state, requeues, step, loss, eval (last_evaluation), sweep, run_dir."""
    jobs = manifest["jobs"]
    if manifest.get("executor") == "slurm":
        states = slurm.job_states([j["job_id"] for j in jobs])
    else:
        states = {j["job_id"]: (j.get("state", "UNKNOWN"), 1) for j in jobs}
    rows = []
    for j in jobs:
        state, runs = states[j["job_id"]]
        step, loss = last_logged(j["run_dir"])
        rows.append({"job_id": j["job_id"], "state": state, "requeues": max(runs - 1, 0), "step": step,
                     "loss": loss, "eval": last_evaluation(j["run_dir"]),
                     "sweep": " ".join(j.get("sweep") or []) or "-", "run_dir": j["run_dir"]})
    return rows


def format_status(rows: list[dict]) -> str:
    head = ("JOB", "STATE", "REQUEUES", "STEP", "LOSS", "EVALUATED", "SWEEP", "RUN DIR")
    table = [head] + [(r["job_id"], r["state"], str(r["requeues"]), "-" if r["step"] is None else str(r["step"]),
                       "-" if r["loss"] is None else f"{r['loss']:.4f}", r.get("eval") or "-", r["sweep"], r["run_dir"])
                      for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(head) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1] for row in table)
