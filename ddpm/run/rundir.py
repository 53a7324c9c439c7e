"""Run directories: descriptive unique names, resume detection, refusal to mix configs.

Layout of ``RUN_DIR``: ``config.json`` (resolved config), ``checkpoints/`` (``step_*/`` + ``latest``),
``metrics.jsonl``, ``tb/`` (TensorBoard), ``samples.h5`` (sample archive), ``eval/`` (evaluation job).
"""
import json
import os
import re
from pathlib import Path

from ddpm.config import Config, from_dict
from ddpm.errors import UserError
from ddpm.run.atomic import atomic_write
from ddpm.run.lock import LOCK_FILE
from ddpm.run.restarts import RESTARTS_FILE

# What the jobs themselves keep in a run dir besides the run: the lock (ddpm.run.lock) and the count of
# restarts without progress that both launchers keep (ddpm.run.restarts).
BOOKKEEPING = (LOCK_FILE, RESTARTS_FILE)
# Keys that may change when a run is resumed: where data lives, how it is logged, how long it runs.
RESUMABLE_CHANGES = ("data.root", "data.download", "train.device", "train.compile", "train.steps", "train.epochs",
                     "train.collective_timeout_s",
                     "log.", "checkpoint.", "sample.", "run_root")


def default_run_dir(cfg: Config) -> Path:
    """``RUN_ROOT/00012-<name>-b<batch>``: the next free number under run_root."""
    root = Path(cfg.run_root)
    taken = [int(m.group(1)) for p in (root.iterdir() if root.is_dir() else [])
             if (m := re.match(r"(\d+)-", p.name))]
    return root / f"{max(taken, default=-1) + 1:05d}-{cfg.name}-b{cfg.train.batch_size}"


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "model":
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(old: dict, new: dict) -> list[str]:
    """Keys whose values differ between two resolved configs, ignoring those a resume may change."""
    a, b = _flatten(old), _flatten(new)
    keys = sorted(set(a) | set(b))
    return [k for k in keys if a.get(k) != b.get(k) and not any(
        k == p or (p.endswith(".") and k.startswith(p)) for p in RESUMABLE_CHANGES)]


def read_run_config(run_dir: Path) -> Config:
    """The resolved config a run directory was started with."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"{run_dir} is not a run directory (no config.json); pass a directory made by jobs.train")
    try:
        raw = json.loads(path.read_text())
        if not isinstance(raw, dict):
            raise UserError(f"{path} is not a run config (a JSON mapping); restore it from a backup, or rerun "
                            "jobs.train on this run dir with --force and its config to rewrite it")
        return from_dict(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        detail = f"{e.msg} at line {e.lineno}" if isinstance(e, json.JSONDecodeError) else "not text"
        raise UserError(f"{path} is not valid JSON ({detail}); restore it from a backup, or rerun jobs.train on this "
                        "run dir with --force and its config to rewrite it") from None


def prepare_run_dir(cfg: Config, run_dir: Path | None, force: bool = False) -> tuple[Path, bool]:
    """Decide the run dir and whether this is a resume; check it without writing anything.

    An existing run dir with the same config (up to RESUMABLE_CHANGES) is resumed; one with a different
    config is refused unless ``force``; a non-empty directory that is not a run is refused.
    """
    if run_dir is None:
        return default_run_dir(cfg), False
    run_dir = Path(run_dir)
    if (run_dir / "config.json").is_file():
        try:
            old = json.loads((run_dir / "config.json").read_text())
            if not isinstance(old, dict):
                raise ValueError("not a mapping")
        except (ValueError, UnicodeDecodeError) as e:
            if not force:
                raise UserError(f"{run_dir / 'config.json'} is damaged ({' '.join(str(e).split())[:80]}); rerun the "
                                "same command with --force to rewrite it from your config and resume from the newest "
                                "checkpoint, or restore it from a backup") from None
            return run_dir, True
        diff = config_differences(old, cfg.to_dict())
        if diff and not force:
            shown = ", ".join(diff[:4]) + (" ..." if len(diff) > 4 else "")
            raise UserError(f"{run_dir} belongs to a different config (differs in {shown}); "
                            "pick a new --run-dir, or pass --force to continue it with the new config")
        return run_dir, True
    # A job that died before writing config.json leaves only its bookkeeping: still a new run.
    if run_dir.exists() and (not run_dir.is_dir() or any(p.name not in BOOKKEEPING and not p.name.startswith(".clock-")
                                                          for p in run_dir.iterdir())):
        raise UserError(f"{run_dir} exists and is not a run directory (no config.json); pick a new or empty --run-dir")
    return run_dir, False


def check_writable(run_dir: Path) -> None:
    """Fail early, before training, if the run dir (or its nearest existing parent) is not writable."""
    p = Path(run_dir)
    while not p.exists():
        p = p.parent
    if not p.is_dir() or not os.access(p, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to {p} (for run dir {run_dir}); choose a writable --run-dir")


def write_config(run_dir: Path, cfg: Config) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / "config.json", json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")
