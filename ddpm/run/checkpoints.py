"""Atomic checkpoints: a manifest with sha256, a `latest` pointer, retention, and fallback loading.

Layout under ``RUN_DIR/checkpoints``::

    step_000001234/state.pt        torch.save of a plain dict (tensors, dicts, lists, str, numbers)
    step_000001234/manifest.json   {"step", "created", "torch", "files": {"state.pt": {"size", "sha256"}}}
    latest                         text file holding the name of the newest complete checkpoint dir
    best                           the same for the checkpoint of the lowest held-out loss (if tracked)

A checkpoint counts only once its manifest exists; `latest` is the commit point. A crash at any moment
leaves at worst a ``*.tmp`` dir (removed at the next save) or a step dir without manifest (skipped with a
warning), never a half-written file that looks complete. Save on one rank (rank 0); every rank loads to
CPU itself, so there is no load-on-rank-0-then-broadcast to deadlock.
"""
import datetime
import hashlib
import json
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path

import torch

from ddpm.errors import UserError
from ddpm.run.atomic import atomic_write, fsync_dir
from ddpm.run.restarts import LATEST_FILE, parse_latest

STATE_FILE = "state.pt"
BEST_FILE = "best"  # RUN_DIR/checkpoints/best: names the step dir of the lowest held-out loss (same format as latest)
MANIFEST_FILE = "manifest.json"
_STEP_DIR = re.compile(r"^step_(\d+)(\.old)?$")  # ".old": a checkpoint moved aside while re-saving its step
_CHUNK = 1 << 20


def _dir_name(step: int) -> str:
    return f"step_{step:09d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _remove(path: Path) -> None:
    """Rename to a ``*.tmp`` name first, so a crash mid-delete leaves debris the next save cleans up,
    not a half-deleted dir that still looks like a checkpoint."""
    if not path.exists():
        return
    doomed = path.with_name(path.name + ".deleting.tmp")
    if doomed.exists():
        shutil.rmtree(doomed)
    os.replace(path, doomed)
    shutil.rmtree(doomed)


def verify(ckpt_dir) -> str | None:
    """Check a checkpoint dir against its manifest. Returns None if it is intact, else a short reason."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return "missing directory"
    manifest_path = ckpt_dir / MANIFEST_FILE
    if not manifest_path.is_file():
        return "missing manifest"
    try:
        manifest = json.loads(manifest_path.read_text())
        step = int(manifest["step"])
        files = {name: (int(meta["size"]), str(meta["sha256"])) for name, meta in manifest["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"unreadable manifest ({type(e).__name__}: {e})"
    if STATE_FILE not in files:
        return f"manifest lists no {STATE_FILE}"
    m = _STEP_DIR.match(ckpt_dir.name)
    if m and int(m.group(1)) != step:
        return f"manifest step {step} != directory step {int(m.group(1))}"
    for name, (expected_size, expected_sha) in files.items():
        path = ckpt_dir / name
        if not path.is_file():
            return f"missing {name}"
        size = path.stat().st_size
        if size != expected_size:
            return f"{name} size {size} != {expected_size} (truncated or overwritten)"
        if _sha256(path) != expected_sha:
            return f"{name} sha256 mismatch"
    return None


def _read_state(ckpt_dir: Path) -> dict:
    path = ckpt_dir / STATE_FILE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message spans many lines and suggests weights_only=False; keep the offending name.
        m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        detail = f"found {m.group(1)}" if m else " ".join(str(e).split())[:200]
        raise UserError(
            f"checkpoint {path} holds objects that torch.load(weights_only=True) refuses ({detail}); "
            "save only tensors, dicts, lists, tuples, str, int, float, bool and None "
            "(e.g. model.state_dict(), optimizer.state_dict())") from None


def _manifest_step(ckpt_dir: Path) -> int:
    return int(json.loads((ckpt_dir / MANIFEST_FILE).read_text())["step"])


class CheckpointManager:
    """Saves and loads ``step_XXXXXXXXX`` checkpoints in ``directory`` (= RUN_DIR/checkpoints).

    keep_last: how many of the newest checkpoints to keep (>= 1).
    keep_every: additionally keep every checkpoint whose step is a multiple of this (0 = none).
    keep: additionally keep every checkpoint whose step it is true of (the training's epoch checkpoints).
    The checkpoint ``best`` names is always kept.
    """

    def __init__(self, directory, keep_last: int = 3, keep_every: int = 0, keep=None):
        if keep_last < 1:
            raise UserError(f"checkpoint keep_last must be >= 1, got {keep_last} (set it to 1 or more)")
        if keep_every < 0:
            raise UserError(f"checkpoint keep_every must be >= 0, got {keep_every} (0 disables it)")
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.keep = keep

    # ---- discovery -------------------------------------------------------------------------------
    def _candidates(self) -> list[tuple[int, Path]]:
        """Every step dir (complete or not, plus dirs moved aside), newest step first; for equal steps
        the real dir comes before its moved-aside copy."""
        if not self.directory.is_dir():
            return []
        found = []
        for p in self.directory.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and p.is_dir():
                found.append((int(m.group(1)), m.group(2) is not None, p))
        found.sort(key=lambda c: (-c[0], c[1]))
        return [(step, p) for step, _, p in found]

    def steps(self) -> list[int]:
        """Steps of complete checkpoints (renamed into place, manifest present), ascending."""
        return sorted(step for step, p in self._candidates()
                      if not p.name.endswith(".old") and (p / MANIFEST_FILE).is_file())

    def _latest_step(self, pointer: str = LATEST_FILE) -> int | None:
        """The step `latest` (or `best`) names, or None if the pointer is missing, garbled or names a missing dir."""
        try:
            name = (self.directory / pointer).read_text(errors="replace").strip()
        except OSError:
            return None
        step = parse_latest(name)  # the one parser of `latest`, shared with the launchers and the templates
        if step is None:
            warnings.warn(f"ignoring garbled {self.directory / pointer}: {name[:40]!r}", stacklevel=3)
            return None
        if not any(s == step for s, _ in self._candidates()):
            warnings.warn(f"{self.directory / pointer} names missing {name}; "
                          + ("considering all checkpoints" if pointer == LATEST_FILE else "ignoring it"), stacklevel=3)
            return None
        return step

    def best_step(self) -> int | None:
        """The step ``best`` names (the lowest held-out loss so far), or None."""
        return self._latest_step(BEST_FILE) if (self.directory / BEST_FILE).exists() else None

    def set_best(self, step: int | None) -> None:
        """Point ``best`` at checkpoint ``step`` (which must exist), or remove the pointer (None)."""
        if step is None:
            (self.directory / BEST_FILE).unlink(missing_ok=True)
        else:
            atomic_write(self.directory / BEST_FILE, _dir_name(step) + "\n")

    # ---- saving ----------------------------------------------------------------------------------
    def save(self, step: int, state: dict, best: bool = False) -> Path:
        """Atomically write ``state`` as checkpoint ``step``, point `latest` (and, if ``best``, `best`) at it,
        apply retention.

        state: a plain dict of tensors / dicts / lists / tuples / str / int / float / bool / None
        (model state_dicts unwrapped, see `clean_state_dict`), so it loads with weights_only=True.
        Returns the checkpoint dir. Call on one rank only.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        self.directory.mkdir(parents=True, exist_ok=True)
        self._clean_leftovers()

        final = self.directory / _dir_name(step)
        tmp = final.with_name(final.name + ".tmp")
        aside = final.with_name(final.name + ".old")
        try:
            self._write(step, state, tmp, final, aside)
            if best:
                self.set_best(step)
        except BaseException:
            self._undo(tmp, final, aside)  # a failed save (a full disk, say) leaves the previous state
            raise
        _remove(aside)
        self._apply_retention(step)
        return final

    def _write(self, step: int, state: dict, tmp: Path, final: Path, aside: Path) -> None:
        tmp.mkdir()
        with open(tmp / STATE_FILE, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)
        # Re-saving an existing step (a resumed run): the old copy stays (as .old, still loadable)
        # until the new one has its manifest.
        if final.exists():
            os.replace(final, aside)
        os.replace(tmp, final)
        fsync_dir(self.directory)
        size = (final / STATE_FILE).stat().st_size
        manifest = {
            "step": step,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "files": {STATE_FILE: {"size": size, "sha256": _sha256(final / STATE_FILE)}},
        }
        atomic_write(final / MANIFEST_FILE, json.dumps(manifest, indent=1) + "\n")
        atomic_write(self.directory / LATEST_FILE, final.name + "\n")

    def _undo(self, tmp: Path, final: Path, aside: Path) -> None:
        """Remove what a failed save left (best effort: the disk may still be full)."""
        try:
            if tmp.exists():
                shutil.rmtree(tmp)
            if final.exists() and not (final / MANIFEST_FILE).is_file():
                shutil.rmtree(final)
            if aside.exists() and not final.exists():
                os.replace(aside, final)
        except OSError:
            pass  # the next save's _clean_leftovers finishes the job

    def _clean_leftovers(self) -> None:
        """Remove ``*.tmp`` debris of a crashed save; put back a moved-aside checkpoint whose
        replacement never got its manifest."""
        for p in self.directory.glob("*.tmp"):
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
        for p in self.directory.glob("step_*.old"):
            final = p.with_name(p.name[: -len(".old")])
            if final.is_dir() and (final / MANIFEST_FILE).is_file():
                _remove(p)
            else:
                if final.exists():
                    _remove(final)
                os.replace(p, final)
        fsync_dir(self.directory)

    def _apply_retention(self, step: int) -> None:
        """Keep the newest `keep_last` complete checkpoints up to ``step`` plus multiples of `keep_every`.

        Checkpoints newer than ``step`` (left over from a run resumed at an earlier step) are not
        ranked or deleted: they are replaced when the run gets there again.
        """
        complete = [s for s in self.steps() if s <= step]
        keep = set(complete[-self.keep_last:]) | {step, self.best_step()}
        if self.keep_every:
            keep |= {s for s in complete if s % self.keep_every == 0}
        if self.keep is not None:
            keep |= {s for s in complete if self.keep(s)}
        for s, p in self._candidates():
            if s < step and s not in keep and not p.name.endswith(".old"):
                _remove(p)  # also drops step dirs a crash left without manifest

    # ---- loading ---------------------------------------------------------------------------------
    def load_latest(self) -> tuple[int, dict] | None:
        """(step, state) of the newest checkpoint that verifies, walking back from `latest`.

        None if there is no complete checkpoint at all. Skipped checkpoints are named in a warning.
        Raises UserError if complete checkpoints exist but none verifies.
        """
        candidates = self._candidates()
        latest = self._latest_step()
        if latest is not None:
            candidates = [(s, p) for s, p in candidates if s <= latest]
        tried = []
        for step, path in candidates:
            reason = verify(path)
            if reason is None:
                return step, _read_state(path)
            if reason != "missing manifest":
                tried.append(f"{path.name}: {reason}")
            warnings.warn(f"skipping checkpoint {path}: {reason}", stacklevel=2)
        if tried:
            raise UserError(
                f"no checkpoint in {self.directory} verifies ({'; '.join(tried)}); refusing to start "
                "from scratch over existing work: move the dir away or resume from an explicit path")
        return None

    def load(self, which) -> tuple[int, dict]:
        """(step, state) of a chosen checkpoint. which: an int step, "latest", "best", or a path to a
        checkpoint dir or its state.pt (possibly in another run dir). Raises UserError if it is
        missing or fails verification; never falls back."""
        if isinstance(which, str) and which == "latest":
            found = self.load_latest()
            if found is None:
                raise UserError(f"no checkpoint in {self.directory} to resume from (train from scratch "
                                "by not asking to resume)")
            return found
        if isinstance(which, str) and which == "best":
            which = self.best_step()
            if which is None:
                raise UserError(f"no best checkpoint in {self.directory}: it is kept by runs with checkpoint.best=true "
                                f"(and log.test_every_epochs) once an epoch ends; available steps: {self.steps() or 'none'}")
        if isinstance(which, str) and which.isdigit() and not Path(which).exists():
            which = int(which)
        if isinstance(which, int) and not isinstance(which, bool):
            path = self.directory / _dir_name(which)
            if not path.is_dir():
                raise UserError(f"no checkpoint for step {which} in {self.directory}; "
                                f"available steps: {self.steps() or 'none'}")
        else:
            path = Path(which)
            if path.is_file():
                path = path.parent
            if not path.is_dir():
                raise UserError(f"checkpoint {path} does not exist (pass a step, 'latest', or an "
                                "existing step_XXXXXXXXX dir)")
        reason = verify(path)
        if reason is not None:
            raise UserError(f"checkpoint {path} is unusable: {reason} (pick another step; "
                            f"available: {self.steps() or 'none'})")
        return _manifest_step(path), _read_state(path)
