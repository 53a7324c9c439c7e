"""ddpm.run.metrics_log: metrics.jsonl + TensorBoard (read back with EventAccumulator), rank gating, resume."""
import json
import math

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ddpm.errors import UserError
from ddpm.run.metrics_log import RunLogger, read_metrics


def _tb_scalars(run_dir, tag):
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)], acc


def test_scalars_land_in_jsonl_and_tensorboard(tmp_path):
    with RunLogger(tmp_path) as log:
        for step in (1, 2, 3):
            log.log_scalars(step, {"loss": 1.0 / step, "loss/q0": np.float32(0.25 * step),
                                   "lr": torch.tensor(1e-4), "images_per_s": 512}, epoch=step / 4)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[1]["loss"] == 0.5 and rows[1]["loss/q0"] == 0.5 and rows[1]["epoch"] == 0.5
    assert rows[0]["lr"] == pytest.approx(1e-4) and rows[0]["images_per_s"] == 512
    assert all(isinstance(r["time"], float) for r in rows)

    loss, acc = _tb_scalars(tmp_path, "loss")
    assert [s for s, _ in loss] == [1, 2, 3]
    assert [v for _, v in loss] == pytest.approx([1.0, 0.5, 1 / 3])
    assert [v for _, v in _tb_scalars(tmp_path, "loss/q0")[0]] == pytest.approx([0.25, 0.5, 0.75])


def test_images_land_in_tensorboard(tmp_path):
    with RunLogger(tmp_path) as log:
        log.log_image(5, "samples/gamma_3", np.zeros((30, 60, 1), np.uint8))
        log.log_image(5, "samples/rgb", np.zeros((30, 60, 3), np.uint8))
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    img = acc.Images("samples/gamma_3")
    assert [(i.step, i.width, i.height) for i in img] == [(5, 60, 30)]
    assert len(acc.Images("samples/rgb")) == 1


def test_disabled_logger_creates_nothing(tmp_path):
    run_dir = tmp_path / "run"
    with RunLogger(run_dir, enabled=False, resume_step=3) as log:
        log.log_scalars(1, {"loss": 1.0})
        log.log_image(1, "samples", np.zeros((4, 4, 3), np.uint8))
        log.flush()
    assert not run_dir.exists()


def test_resume_keeps_every_step_exactly_once(tmp_path):
    with RunLogger(tmp_path) as log:
        for step in range(1, 11):
            log.log_scalars(step, {"loss": float(step)})  # first attempt: loss == step
    with RunLogger(tmp_path, resume_step=6) as log:
        for step in range(7, 11):
            log.log_scalars(step, {"loss": 100.0 + step})  # redone steps log different values

    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 11))  # the file itself, not only read_metrics
    assert [r["loss"] for r in lines] == [1, 2, 3, 4, 5, 6, 107, 108, 109, 110]

    loss, _ = _tb_scalars(tmp_path, "loss")
    assert [s for s, _ in loss] == list(range(1, 11))  # purge_step hid the first attempt's 7..10
    assert [v for _, v in loss] == [1, 2, 3, 4, 5, 6, 107, 108, 109, 110]
    assert len(list((tmp_path / "tb").iterdir())) == 2  # really two event files, old data still there


def test_resume_drops_truncated_last_line(tmp_path):
    with RunLogger(tmp_path, tensorboard=False) as log:
        for step in range(1, 5):
            log.log_scalars(step, {"loss": float(step)})
    path = tmp_path / "metrics.jsonl"
    with open(path, "a") as f:
        f.write('{"step": 5, "epoch": null, "lo')  # killed mid-line
    with RunLogger(tmp_path, resume_step=3, tensorboard=False) as log:
        log.log_scalars(4, {"loss": 40.0})
    assert [json.loads(x)["loss"] for x in path.read_text().splitlines()] == [1, 2, 3, 40]
    assert not (tmp_path / "tb").exists() and not (tmp_path / "metrics.jsonl.tmp").exists()


def test_append_after_truncated_line_without_resume_keeps_file_valid(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
    with RunLogger(tmp_path, tensorboard=False) as log:
        log.log_scalars(2, {"loss": 2.0})
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2]


def test_read_metrics_tolerates_truncated_last_line_and_later_wins(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 2, "loss": 2.0}\n{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 22.0}\n'
                    '{"step": 3, "loss"')
    assert read_metrics(path) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 22.0}]
    path.write_text('{"step": 1}\ngarbage\n{"step": 2}\n')
    with pytest.raises(UserError, match="line 2"):
        read_metrics(path)
    with pytest.raises(UserError, match="no metrics file"):
        read_metrics(tmp_path / "nope.jsonl")


def test_non_finite_values_written_as_null(tmp_path):
    with RunLogger(tmp_path) as log:
        log.log_scalars(1, {"loss": float("nan"), "grad_norm": float("inf"), "lr": 1e-4},
                        epoch=float("nan"))
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    row = json.loads(text)
    assert row["loss"] is None and row["grad_norm"] is None and row["epoch"] is None
    assert row["lr"] == 1e-4
    loss, _ = _tb_scalars(tmp_path, "loss")
    assert math.isnan(loss[0][1])  # TensorBoard keeps the NaN itself


def test_reserved_names_rejected(tmp_path):
    with RunLogger(tmp_path, tensorboard=False) as log:
        with pytest.raises(ValueError, match="reserved"):
            log.log_scalars(1, {"step": 3.0})
