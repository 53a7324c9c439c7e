"""Training logs on rank 0: TensorBoard event files (RUN_DIR/tb) and RUN_DIR/metrics.jsonl.

The caller passes values already reduced across ranks; other ranks build ``RunLogger(enabled=False)``,
whose methods do nothing. metrics.jsonl holds the same scalars for the evaluation job, one JSON object
per line: ``{"step": int, "epoch": float | null, "time": unix seconds, **scalars}``. The training job's
scalars: ``loss``, ``loss/q0``..``q3`` (by noise-level quartile), ``lr``, ``grad_norm``, ``images_per_s``
(``gpu_mem_gb`` on CUDA) at every logged step; at the step that ends an epoch (``epoch`` a whole number)
also ``epoch_loss`` (the epoch's mean training loss) and, at the ``log.test_every_epochs`` epochs,
``test_loss`` and ``test_loss/q0``..``q3`` (the held-out loss of the weights samples use, EMA or not).

Resume: the steps after the checkpoint are redone, so ``RunLogger(resume_step=k)`` drops every
metrics.jsonl row with step > k and opens TensorBoard with ``purge_step=k + 1`` (readers then hide the
old events from step k + 1 on). In the end every optimizer step appears exactly once.
"""
import json
import math
import os
import struct
import time
from pathlib import Path

import numpy as np

from ddpm.errors import UserError
from ddpm.run.atomic import atomic_write, damaged_name

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"


class RunLogger:
    """Rank-0 logger; ``with RunLogger(run_dir, enabled=rank == 0, resume_step=...) as log: ...``.

    Pass ``resume_step=0`` when restarting from scratch in a run dir that may hold an earlier
    attempt's logs, so that none of its rows survive.
    """

    def __init__(self, run_dir, enabled: bool = True, resume_step: int | None = None,
                 tensorboard: bool = True, log=print):
        self.enabled = enabled
        self._metrics = None
        self._tb = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        metrics_path = run_dir / METRICS_FILE
        _repair_metrics(metrics_path, resume_step, log)
        for damaged in set_aside_damaged_events(run_dir / TB_DIR):
            log(f"warning: TensorBoard event file {damaged.name} is damaged; moved it to {damaged}, logging goes on")
        # Line-buffered: each row reaches the OS as soon as it is written, so a killed job loses at
        # most the row in progress (which readers and the next resume drop).
        self._metrics = open(metrics_path, "a", buffering=1, encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge_step = resume_step + 1 if resume_step is not None else None
            self._tb = SummaryWriter(log_dir=str(run_dir / TB_DIR), purge_step=purge_step)

    def log_scalars(self, step: int, scalars: dict, epoch: float | None = None) -> None:
        """scalars: tag → number (float, int, numpy or 0-d tensor), e.g. "loss", "loss/q0", "lr".

        Non-finite values are written as null in metrics.jsonl (strict JSON has no NaN/Infinity).
        """
        if not self.enabled:
            return
        clash = {"step", "epoch", "time"} & scalars.keys()
        if clash:
            raise ValueError(f"scalar names {sorted(clash)} are reserved in metrics.jsonl")
        values = {k: _number(v) for k, v in scalars.items()}
        row = {"step": int(step), "epoch": None if epoch is None else _finite_or_none(float(epoch)),
               "time": time.time(), **{k: _finite_or_none(v) for k, v in values.items()}}
        self._metrics.write(json.dumps(row, allow_nan=False) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, int(step))

    def log_image(self, step: int, tag: str, grid_u8: np.ndarray) -> None:
        """grid_u8: uint8 (H, W, C), C in {1, 3} (e.g. from ddpm.images.make_grid); TensorBoard only."""
        if not self.enabled or self._tb is None:
            return
        if grid_u8.dtype != np.uint8 or grid_u8.ndim != 3 or grid_u8.shape[2] not in (1, 3):
            raise ValueError(f"log_image expects uint8 (H, W, 1|3), got {grid_u8.dtype} {grid_u8.shape}")
        self._tb.add_image(tag, grid_u8, int(step), dataformats="HWC")

    def flush(self) -> None:
        """Push everything to disk (fsync for metrics.jsonl, so it survives a node crash too)."""
        if self._metrics is not None:
            self._metrics.flush()
            os.fsync(self._metrics.fileno())
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._metrics is not None:
            self.flush()
            self._metrics.close()
            self._metrics = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        self.enabled = False  # later calls are no-ops instead of writes to closed files

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_metrics(path) -> list[dict]:
    """metrics.jsonl → rows sorted by step; when a step appears twice the later line wins.

    A truncated last line (a job killed mid-write) is ignored; a damaged line elsewhere is a UserError.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no metrics file at {path} (expected RUN_DIR/{METRICS_FILE} written by "
                        f"training; check the run directory)")
    by_step = {}
    for row in _parse_rows(path):
        by_step[row["step"]] = row
    return [by_step[s] for s in sorted(by_step)]


# ---- helpers -------------------------------------------------------------------------------------

def _parse_rows(path: Path, skip_damaged: bool = False) -> list[dict]:
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    # A complete file ends with "\n", so the last element is "" or the row being written when killed:
    # either way it is not a complete row.
    complete = lines[:-1]
    rows = []
    for i, line in enumerate(complete, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError("no integer 'step'")
        except ValueError as e:
            if skip_damaged:
                continue
            raise UserError(f"{path} line {i} is not a metrics row ({e}); delete that line") from None
        rows.append(row)
    return rows


def _repair_metrics(path: Path, resume_step: int | None, log=print) -> None:
    """Atomically rewrite metrics.jsonl without a truncated last line and, when resuming, without rows
    after resume_step. Untouched when nothing would change (it is appended to, not rewritten, on a
    normal start). A damaged line elsewhere (a stray write, a full disk) does not stop training: the
    file is kept as ``metrics.jsonl.damaged-<time>`` and the new one holds every readable row."""
    if not path.exists():
        return
    data = path.read_bytes()
    if resume_step is None and (not data or data.endswith(b"\n")):
        return
    try:
        parsed = _parse_rows(path)
    except UserError:
        aside = damaged_name(path)
        os.replace(path, aside)
        parsed = _parse_rows(aside, skip_damaged=True)
        log(f"warning: {path} has damaged lines; moved it to {aside} and kept its {len(parsed)} readable rows "
            "in a new one")
    rows = [r for r in parsed if resume_step is None or r["step"] <= resume_step]
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))


def set_aside_damaged_events(tb_dir: Path) -> list[Path]:
    """Move TensorBoard event files whose records fail their checksums to ``RUN_DIR/tb-damaged/`` (outside
    the folder TensorBoard reads). A record cut short at the end is what a killed writer leaves: fine."""
    moved = []
    for f in sorted(tb_dir.glob("events.out.tfevents.*")) if tb_dir.is_dir() else []:
        if _events_intact(f):
            continue
        target = tb_dir.parent / "tb-damaged" / f.name
        target.parent.mkdir(exist_ok=True)
        os.replace(f, target)
        moved.append(target)
    return moved


def _events_intact(path: Path) -> bool:
    """TFRecord framing: uint64 length, masked crc32c of it, data, masked crc32c of the data."""
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    data = path.read_bytes()
    pos = 0
    while pos + 12 <= len(data):
        header, (crc,) = data[pos:pos + 8], struct.unpack("<I", data[pos + 8:pos + 12])
        if masked_crc32c(header) != crc:
            return False
        (length,) = struct.unpack("<Q", header)
        end = pos + 12 + length + 4
        if end > len(data):
            return True  # cut short by a kill: the writer's last record
        (crc,) = struct.unpack("<I", data[end - 4:end])
        if masked_crc32c(data[pos + 12:end - 4]) != crc:
            return False
        pos = end
    return True


def _number(v):
    """int stays int; anything else numeric (numpy scalar, 0-d tensor, float) becomes float."""
    if isinstance(v, (bool, np.bool_)):
        return int(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    return float(v)


def _finite_or_none(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v
