"""Shards of a sampling request under ``RUN_DIR/samples/``: committed one by one, assembled once.

A request to generate N samples (``jobs.sample``) is split into fixed shards of sample indices. While
it runs, ``NAME.shards/`` holds ``request.json`` (the settings) and one ``shard_KKKKKK.npz`` per
finished shard (images uint8 (n, H, W, C), labels int64 (n,)), each written atomically: a killed job
leaves only whole shards, and its rerun redoes only the missing ones. When every shard is there, the
shards are assembled into ``NAME.h5`` (one sample group ``samples`` with the settings as attrs, read
back with :func:`ddpm.run.samples.read_samples`) and the shard folder is removed.
"""
import json
import shutil
from pathlib import Path

import numpy as np

from ddpm.errors import UserError
from ddpm.run.atomic import atomic_path, atomic_write
from ddpm.run.samples import read_samples, write_samples

GROUP = "samples"  # the one sample group of a request file


def differences(old: dict, new: dict) -> list[str]:
    """Setting names whose values differ between two settings dicts."""
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def finished_settings(out: Path) -> dict | None:
    """The settings a finished request file was made with, or None if there is none."""
    if not out.exists():
        return None
    try:
        _, _, attrs = read_samples(out, GROUP)
        return json.loads(attrs["settings"])
    except (UserError, KeyError, ValueError) as e:
        raise UserError(f"{out} exists but is not a finished sample request ({' '.join(str(e).split())[:120]}); "
                        "pass another --out NAME, or move it away") from None


class ShardStore:
    """The shard folder of one request; ``n`` samples in shards of ``size`` indices."""

    def __init__(self, folder: Path, n: int, size: int):
        self.folder, self.n, self.size = Path(folder), n, size
        self.count = -(-n // size)

    def indices(self, k: int) -> range:
        return range(k * self.size, min(self.n, (k + 1) * self.size))

    def path(self, k: int) -> Path:
        return self.folder / f"shard_{k:06d}.npz"

    def _request(self, settings: dict) -> dict:
        """What request.json holds: the settings and the shard layout (which the samples do not depend on,
        but the committed shards do)."""
        return {**settings, "shard_size": self.size}

    def check(self, settings: dict, what: str) -> None:
        """UserError if the folder was started for other settings or another shard size."""
        request = self.folder / "request.json"
        if request.is_file():
            try:
                old = json.loads(request.read_text())
            except ValueError:
                old = {}
            diff = differences(old, self._request(settings))
            if diff:
                raise UserError(f"{self.folder} holds an unfinished request with other settings (differs in "
                                f"{', '.join(diff)}); {what}")

    def begin(self, settings: dict) -> None:
        """Create the folder and its request.json (rank 0, before any rank commits)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if not (self.folder / "request.json").is_file():
            atomic_write(self.folder / "request.json", json.dumps(self._request(settings), indent=2, sort_keys=True) + "\n")

    def done(self, k: int) -> bool:
        return self.path(k).is_file()

    def commit(self, k: int, images: np.ndarray, labels: np.ndarray) -> None:
        with atomic_path(self.path(k)) as tmp, open(tmp, "wb") as f:  # a file object: savez would add ".npz"
            np.savez(f, images=images, labels=labels)

    def assemble(self, out: Path, attrs: dict) -> int:
        """Concatenate every shard into ``out`` (atomically, group ``samples``), then remove the folder."""
        images, labels = [], []
        for k in range(self.count):
            with np.load(self.path(k)) as z:
                images.append(z["images"])
                labels.append(z["labels"])
        images, labels = np.concatenate(images), np.concatenate(labels)
        if len(images) != self.n:
            raise RuntimeError(f"assembled {len(images)} samples from {self.folder}, expected {self.n}")
        write_samples(out, GROUP, images, labels, attrs)
        shutil.rmtree(self.folder)
        return len(images)
