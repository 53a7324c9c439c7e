"""HDF5 sample archives (``RUN_DIR/samples.h5``) and their npz export.

Layout: one group per sampling event, named by the caller, e.g. ``train/step_000001000/gamma_3`` or
``eval/step_000005000/w_1``. Each holds ``images`` (uint8 (N, H, W, C), chunked, gzip 4) and ``labels``
(int64 (N,)), and attrs describing how the samples were made (step, sampler, steps, guidance_scale,
guidance_convention, seed, ema, config_hash, ...) plus ``created`` (ISO 8601 time).

Why copy-on-write instead of SWMR (the design note said SWMR): HDF5 without SWMR can be left
unreadable by a kill in the middle of a metadata write, and SWMR mode cannot create groups or datasets,
only append to existing ones, so it cannot add one group per sampling event. So every write copies
``samples.h5`` to ``samples.h5.tmp``, adds the group there, closes and fsyncs the copy and renames it
over ``samples.h5`` (then fsyncs the directory). A job killed at any moment leaves ``samples.h5`` as
it was before or after the write, with every earlier group readable. The price is one file copy per
write, fine for training-time sample grids; write big evaluation sets as few large groups.

Two processes may write one archive (the training job and an evaluation of the same run): each write
holds ``samples.h5.lock`` (:class:`ddpm.run.lock.RunLock`) around its copy-modify-rename, so neither
loses the other's group; a second writer waits for the first.
"""
import datetime
import os
import shutil
from pathlib import Path

import h5py
import numpy as np

from ddpm.errors import UserError
from ddpm.run.atomic import atomic_path, damaged_name
from ddpm.run.lock import RunLock

CHUNK_ROWS = 64  # images per chunk: reading a few samples back decompresses at most 64 images
LOCK_WAIT_S = 600  # how long a writer waits for another one (training vs evaluation) to finish its group


def write_samples(path, group: str, images: np.ndarray, labels: np.ndarray, attrs: dict) -> None:
    """Add (or replace) one sample group, crash-safely.

    images: uint8 (N, H, W, C), C in {1, 3}; labels: integer (N,) class indices (the null class
    included); attrs: str → None | bool | int | float | str | numpy scalar | sequence of numbers or
    of str. None is stored as the string "none". ``created`` is added unless given. A group that
    already exists (a resumed run redoing a step) is replaced.
    """
    path = os.fspath(path)
    group = _clean_group_name(group)
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 \
            or images.shape[3] not in (1, 3) or len(images) == 0:
        raise ValueError(f"images must be non-empty uint8 (N, H, W, C) with C in (1, 3), got "
                         f"{getattr(images, 'dtype', type(images))} {getattr(images, 'shape', '')}")
    labels = np.asarray(labels)
    if labels.shape != (len(images),) or labels.dtype.kind not in "iu":
        raise ValueError(f"labels must be integer ({len(images)},), got {labels.dtype} {labels.shape}")
    stored_attrs = {k: _attr_value(group, k, v) for k, v in attrs.items()}
    stored_attrs.setdefault("created", datetime.datetime.now().astimezone().isoformat(timespec="seconds"))

    lock = RunLock(os.path.dirname(os.path.abspath(path)), name=os.path.basename(path) + ".lock",
                   what="sample archive", own_job_takes_over=False)
    with lock.acquire(wait_s=LOCK_WAIT_S), atomic_path(path) as tmp:  # a stale tmp is simply overwritten
        if os.path.exists(path):
            _check_hdf5(path)
            shutil.copyfile(path, tmp)
        with h5py.File(tmp, "r+" if os.path.exists(path) else "w") as f:
            _check_group_slot(f, path, group)
            if group in f:
                # Deleting leaves the old bytes as free space in the file (HDF5 does not reclaim it);
                # this happens only when a resumed run redoes a step, so the waste stays small.
                del f[group]
            g = f.create_group(group)
            chunks = (min(CHUNK_ROWS, len(images)),) + images.shape[1:]
            g.create_dataset("images", data=images, chunks=chunks, compression="gzip",
                             compression_opts=4)
            g.create_dataset("labels", data=labels.astype(np.int64), compression="gzip",
                             compression_opts=4)
            for k, v in stored_attrs.items():
                g.attrs[k] = v


def set_aside_if_damaged(path) -> Path | None:
    """If ``path`` exists but is not a readable archive, move it to ``PATH.damaged-<time>`` (returned),
    so that writing starts a fresh one; a readable archive (or none) is left alone (returns None)."""
    if not os.path.exists(path):
        return None
    try:
        _open_read(path).close()
        return None
    except UserError:
        aside = damaged_name(path)
        os.replace(path, aside)
        return aside


def list_groups(path) -> list[str]:
    """Full paths (no leading "/") of every sample group, i.e. every group holding an "images"
    dataset, sorted (zero-padded step numbers make that chronological)."""
    with _open_read(path) as f:
        return _sample_groups(f)


def read_samples(path, group: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """→ (images uint8 (N, H, W, C), labels int64 (N,), attrs dict of plain Python values).

    Attrs stored as the string "none" (a None at write time) come back as None; arrays as lists.
    """
    group = _clean_group_name(group)
    with _open_read(path) as f:
        g = f.get(group)
        if not _is_sample_group(g):
            raise UserError(_missing_group_message(path, group, _sample_groups(f)))
        attrs = {k: _python_value(v) for k, v in g.attrs.items()}
        return g["images"][()], g["labels"][()].astype(np.int64), attrs


def export_npz(path, out_npz, groups: list[str] | None = None) -> int:
    """Concatenate sample groups (all of them when ``groups`` is None) into an npz with ``arr_0``
    uint8 (N, H, W, C) and ``arr_1`` int64 labels (N,) — the layout external evaluators read (e.g. the
    openai guided-diffusion evaluator). Never overwrites ``out_npz``. Returns N."""
    out_npz = os.fspath(out_npz)
    if os.path.exists(out_npz):
        raise UserError(f"{out_npz} already exists; refusing to overwrite it (pass a new output path)")
    with _open_read(path) as f:
        available = _sample_groups(f)
        groups = available if groups is None else [_clean_group_name(g) for g in groups]
        if not groups:
            raise UserError(f"nothing to export from {os.fspath(path)}: no sample groups given or "
                            f"present (pass group names from list_groups, or write samples first)")
        for name in groups:
            if name not in available:
                raise UserError(_missing_group_message(path, name, available))
        shapes = {name: f[name]["images"].shape[1:] for name in groups}
        first = groups[0]
        for name in groups:
            if shapes[name] != shapes[first]:
                raise UserError(f"cannot export groups with different image shapes: {first} has "
                                f"{shapes[first]}, {name} has {shapes[name]} (export them separately)")
        images = np.concatenate([f[name]["images"][()] for name in groups])
        labels = np.concatenate([f[name]["labels"][()].astype(np.int64) for name in groups])
    with atomic_path(out_npz) as tmp, open(tmp, "wb") as fh:  # a file object: np.savez would append ".npz"
        np.savez(fh, arr_0=images, arr_1=labels)
    return len(images)


# ---- helpers -------------------------------------------------------------------------------------

def _clean_group_name(group: str) -> str:
    parts = str(group).strip("/").split("/")
    if not group or any(p in ("", ".", "..") for p in parts):
        raise UserError(f"bad sample group name {group!r} (use slash-separated names such as "
                        f"'train/step_000001000/gamma_3')")
    return "/".join(parts)


def _check_hdf5(path: str) -> None:
    if not os.path.exists(path):
        raise UserError(f"no sample archive at {path} (expected RUN_DIR/samples.h5 written during "
                        f"training; check the run directory)")
    if os.path.isdir(path) or not h5py.is_hdf5(path):
        raise UserError(f"{path} is not an HDF5 file (expected a sample archive such as "
                        f"RUN_DIR/samples.h5 written by jobs.train; pass that file)")


def _open_read(path) -> h5py.File:
    path = os.fspath(path)
    _check_hdf5(path)
    try:
        return h5py.File(path, "r")
    except OSError as e:  # right signature but unreadable: truncated or damaged by another writer
        raise UserError(f"{path} is an HDF5 file that cannot be read ({e}); restore it or pass "
                        f"another archive") from None


def _sample_groups(f: h5py.File) -> list[str]:
    found = []

    def visit(name, obj):
        if _is_sample_group(obj):
            found.append(name)

    f.visititems(visit)
    return sorted(found)


def _is_sample_group(obj) -> bool:
    return isinstance(obj, h5py.Group) and isinstance(obj.get("images"), h5py.Dataset)


def _check_group_slot(f: h5py.File, path: str, group: str) -> None:
    """Replacing must only ever replace one sample group, never a folder of them (or write inside one)."""
    if group in f and not _is_sample_group(f[group]):
        raise UserError(f"{group} in {path} is not a sample group but holds other entries; "
                        f"choose another group name")
    parts = group.split("/")
    for i in range(1, len(parts)):
        parent = "/".join(parts[:i])
        if parent in f and _is_sample_group(f[parent]):
            raise UserError(f"cannot write {group} in {path}: {parent} is a sample group; "
                            f"choose a name that is not inside it")


def _missing_group_message(path, group: str, available: list[str]) -> str:
    if not available:
        return f"no group {group} in {path}: the archive has no sample groups yet (write samples first)"
    shown = ", ".join(available[-5:])
    more = f" (and {len(available) - 5} more)" if len(available) > 5 else ""
    return f"no group {group} in {path}; existing groups include {shown}{more} (pass one of those)"


def _attr_value(group: str, key: str, value):
    """Python value → something h5py stores as an attribute; None → "none"; else UserError."""
    if not isinstance(key, str) or not key:
        raise UserError(f"attribute names must be non-empty strings, got {key!r} for group {group}")
    if value is None:
        return "none"
    if isinstance(value, (bool, int, float, str, np.bool_, np.integer, np.floating)):
        return value
    if isinstance(value, (list, tuple, np.ndarray)):
        arr = np.asarray(value)
        if arr.dtype.kind in "biuf":
            return arr
        if arr.dtype.kind == "U":  # h5py cannot store numpy unicode arrays; use variable-length str
            return np.array(arr.tolist(), dtype=h5py.string_dtype())
    raise UserError(f"attribute {key}={value!r} of group {group} has type {type(value).__name__}, "
                    f"which HDF5 attrs cannot store (pass None, bool, int, float, str or a list of "
                    f"numbers or strings)")


def _python_value(v):
    if isinstance(v, bytes):
        v = v.decode()
    if isinstance(v, np.ndarray):
        return [x.decode() if isinstance(x, bytes) else x for x in v.tolist()]
    if isinstance(v, np.generic):
        v = v.item()
    return None if v == "none" else v
