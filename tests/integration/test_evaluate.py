"""jobs.evaluate end to end on a tiny CPU checkpoint (trained in the test, resumed once): every figure is
written and read back with the expected grid geometry, metrics.json has every field, the resumed run's
loss curve has each step once, archive groups carry their attrs, the npz export; denoiser, noisy-
classifier, unconditional and rectified-flow runs; and every bad input fails in one line with exit 2,
writing nothing."""
import hashlib
import json
import math
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from ddpm.config import load_config
from ddpm.evaluate.measured import loss_series
from ddpm.nets.registry import build_net
from ddpm.run.checkpoints import CheckpointManager
from ddpm.run.metrics_log import RunLogger, read_metrics
from ddpm.run.rundir import write_config
from jobs.evaluate import main as evaluate

from conftest import ROOT, python_env, write_tiny_config

CELL, PAD = 28, 2
FAST = ["--device", "cpu", "--metric-samples", "20", "--table-samples", "4", "--fast-steps", "4"]


def _grid_px(n: int, scale: int) -> int:
    return (n * (CELL + PAD) + PAD) * scale


@pytest.fixture(scope="module")
def config_path(tmp_path_factory, mnist_root):
    return write_tiny_config(tmp_path_factory.mktemp("cfg"), mnist_root, "tiny_mnist.yaml")


@pytest.fixture(scope="module")
def run(tmp_path_factory, config_path):
    """The tiny run trained for 10 steps, then resumed to 20 (checkpoints 15 and 20 are kept)."""
    from jobs.train import main as train

    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    assert train(["--config", str(config_path), "--run-dir", str(run_dir), "train.steps=10"]) == 0
    assert train(["--config", str(config_path), "--run-dir", str(run_dir), "train.steps=20"]) == 0
    return run_dir


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def evaluated(run, untrained_classifier, tmp_path_factory):
    npz = tmp_path_factory.mktemp("npz") / "samples.npz"
    assert evaluate([str(run), "--classifier", str(untrained_classifier), "--export-npz", str(npz), *FAST]) == 0
    out = run / "eval" / "step_000000020"
    return out, json.loads((out / "metrics.json").read_text()), npz


def _figures(m: dict) -> list[dict]:
    return [f for s in m["sections"].values() for f in s.get("figures", [])]


def _check_grid(out, fig: dict, rows: int, cols: int) -> np.ndarray:
    """The figure's grid box has the make_grid geometry; returns the grid at 1x (H, W) uint8."""
    assert (fig["rows"], fig["cols"]) == (rows, cols), fig["file"]
    image = np.asarray(Image.open(out / fig["file"]).convert("L"))
    x, y, w, h = fig["grid_box"]
    s = fig["scale"]
    assert (w, h) == (_grid_px(cols, s), _grid_px(rows, s)), fig["file"]
    assert image.shape[0] > y + h and image.shape[1] >= x + w  # labels and title around the grid
    crop = image[y:y + h, x:x + w]
    assert (crop[:s * PAD].max(), crop[:, :s * PAD].max()) == (0, 0)  # black make_grid padding at the edges
    return crop[::s, ::s]


def test_every_figure_with_grid_geometry(evaluated):
    out, m, _ = evaluated
    figs = {f["file"]: f for f in _figures(m)}
    expected = {"guidance_grid.png", "samples_gamma_1.png", "samples_gamma_3.png", "loss_curves.png",
                "progression.png", "denoising_xt.png", "denoising_x0.png", "steps_vs_quality.png",
                "interpolation.png", "samples_vs_real_gamma_1.png", "samples_vs_real_gamma_3.png",
                "dataset_preview.png", "mixture_sweep.png", "mixture_shares.png"} | \
        {f"denoising_class{c}.gif" for c in range(10)}
    assert set(figs) == expected
    assert {p.name for p in out.iterdir() if p.suffix in (".png", ".gif")} == expected
    _check_grid(out, figs["guidance_grid.png"], 10, 2)  # rows: classes, columns: the two scales
    _check_grid(out, figs["samples_gamma_3.png"], 10, 1)  # per_class: 1 in the tiny config
    _check_grid(out, figs["progression.png"], 2, 10)  # checkpoints 15 and 20 x classes
    n_cols = m["sections"]["gifs"]["frames"] - 1  # 5 DDIM steps: all captured, fewer than 8 columns
    _check_grid(out, figs["denoising_xt.png"], 10, n_cols)
    _check_grid(out, figs["interpolation.png"], 5, 8)
    _check_grid(out, figs["samples_vs_real_gamma_3.png"], 2, 10)  # per_class 1: a sample row above a real row
    _check_grid(out, figs["dataset_preview.png"], 10, 10)  # classes x 10 training images
    _check_grid(out, figs["mixture_sweep.png"], 4, 7)  # 4 noises x 7 mixing weights
    for name in ("loss_curves.png", "steps_vs_quality.png"):
        w, h = Image.open(out / name).size
        assert w >= 600 and h >= 300
    gif = Image.open(out / "denoising_class3.gif")
    assert gif.n_frames == m["sections"]["gifs"]["frames"] == 6
    assert list(gif.size) == figs["denoising_class3.gif"]["size"]
    report = (out / "report.md").read_text()
    for name in expected:
        assert f"]({name})" in report, name


def test_guidance_grid_shows_the_archived_samples(evaluated, run):
    """Row c, column j of the guidance grid is the first archived sample of class c at scale j."""
    out, m, _ = evaluated
    fig = next(f for f in _figures(m) if f["file"] == "guidance_grid.png")
    grid = _check_grid(out, fig, 10, 2)
    k = m["sections"]["guidance"]["per_class"]
    with h5py.File(run / "samples.h5", "r") as f:
        for j, row in enumerate(m["sections"]["guidance"]["rows"]):
            images = f[row["group"]]["images"][()]
            for c in range(10):
                y, x = PAD + c * (CELL + PAD), PAD + j * (CELL + PAD)
                assert np.array_equal(grid[y:y + CELL, x:x + CELL], images[c * k, :, :, 0]), (c, j)


def test_real_rows_are_the_archived_samples_above_training_images_of_their_class(evaluated, mnist_root):
    """Bonn figure 2: per scale, row 1 is the first archived sample of each class, row 2 a training image of
    the column's class (the indices are in metrics.json)."""
    from ddpm.data.datasets import load_dataset

    out, m, _ = evaluated
    real = m["sections"]["real_rows"]
    images, labels = load_dataset("mnist", str(mnist_root), train=True)
    assert real["per_class"] == 1 and real["train_images"] == 60000
    assert [int(labels[i]) for i in real["real_indices"]] == list(range(10))
    assert [int(labels[i]) for i in real["preview_indices"]] == list(range(10)) * 10  # row j: one image per class
    row = m["sections"]["guidance"]["rows"][1]
    fig = next(f for f in _figures(m) if f["file"] == "samples_vs_real_gamma_3.png")
    grid = _check_grid(out, fig, 2, 10)
    with h5py.File(out.parent.parent / "samples.h5", "r") as f:
        made = f[row["group"]]["images"][()]
    k = m["sections"]["guidance"]["per_class"]
    for c in range(10):
        x = PAD + c * (CELL + PAD)
        assert np.array_equal(grid[PAD:PAD + CELL, x:x + CELL], made[c * k, :, :, 0]), c
        y = PAD + CELL + PAD
        assert np.array_equal(grid[y:y + CELL, x:x + CELL], images[real["real_indices"][c]][0].numpy()), c
    assert "## Samples above real training images" in (out / "report.md").read_text()


def test_metrics_json_has_every_field(evaluated, run, untrained_classifier):
    _, m, _ = evaluated
    cfg = load_config_from_run(run)
    assert {"run_dir", "run_name", "objective", "dataset", "config_hash", "created", "command", "checkpoint", "seed",
            "device", "parts", "sampler", "guidance", "samples", "classifier", "classifier_note", "inception",
            "versions", "archive", "export_npz", "timings_s", "sections"} <= set(m)
    assert m["checkpoint"] == {"step": 20, "path": str(run / "checkpoints" / "step_000000020"), "ema": True,
                               "best_step": None}
    assert m["config_hash"] == cfg.hash() and m["seed"] == 1234 and m["device"] == "cpu"
    assert set(m["versions"]) >= {"python", "torch", "torchvision", "ddpm-hpc"}
    assert m["sampler"]["name"] == "ddim" and m["sampler"]["steps"] == 5  # the config's sampler
    assert m["guidance"] == {"convention": "gamma", "scales": [1.0, 3.0], "display_scale": 3.0, "conditional": True}
    assert m["classifier"]["path"] == str(untrained_classifier) and len(m["classifier"]["sha256"]) == 64
    assert set(m["sections"]) == {"guidance", "real_rows", "mixture", "curves", "progression", "gifs", "steps",
                                  "interpolation"}
    assert m["mixture"] == "3:1.5,8:1.5" and m["classifier_guidance"] is None  # the default mix: gamma 3 / 2 each
    for row in m["sections"]["guidance"]["rows"]:
        assert set(row) == {"scale", "gamma", "n", "group", "wall_s", "accuracy", "feature_fid", "inception_fid",
                            "inception_score", "kid", "precision", "recall"}
        assert row["n"] == 20 and 0 <= row["accuracy"] <= 1 and row["feature_fid"] > 0
        assert row["inception_fid"] is None  # no --inception-weights
    table = m["sections"]["steps"]["rows"]
    # every sampler of the objective at 10, 20, 50, 100 network evaluations, capped at T=50 (ddpm: all T)
    assert [(r["sampler"], r["steps"]) for r in table] == [("ddpm", 50), ("ddim", 10), ("ddim", 20), ("ddim", 50),
                                                            ("dpmpp_2m", 10), ("dpmpp_2m", 20), ("dpmpp_2m", 50)]
    assert all(r["wall_s"] > 0 and r["accuracy"] is not None and r["feature_fid"] is not None for r in table)
    assert m["sections"]["progression"]["checkpoint_steps"] == [15, 20]
    assert set(m["timings_s"]) == set(m["sections"]) | {"total"}
    json.dumps(m, allow_nan=False)


def load_config_from_run(run):
    from ddpm.run.rundir import read_run_config
    return read_run_config(run)


def test_archive_groups_and_npz_export(evaluated, run):
    _, m, npz = evaluated
    groups = ["eval/step_000000020/gamma_1", "eval/step_000000020/gamma_3"]
    assert m["archive"]["groups"] == groups
    cfg = load_config_from_run(run)
    with h5py.File(run / "samples.h5", "r") as f:
        assert any(name.startswith("step_") for name in f["train"])  # the training groups are still there
        for group, scale in zip(groups, (1.0, 3.0)):
            g = f[group]
            assert g["images"].shape == (20, 28, 28, 1) and g["images"].dtype == np.uint8
            assert list(g["labels"][()]) == [c for c in range(10) for _ in range(2)]
            a = dict(g.attrs)
            assert (a["step"], a["sampler"], a["steps"], a["guidance_scale"], a["guidance_convention"], a["seed"],
                    bool(a["ema"]), a["config_hash"]) == (20, "ddim", 5, scale, "gamma", 1234, True, cfg.hash())
    with np.load(npz) as z:
        assert z["arr_0"].shape == (40, 28, 28, 1) and z["arr_0"].dtype == np.uint8
        assert list(z["arr_1"][:20]) == [c for c in range(10) for _ in range(2)]
    assert m["export_npz"] == {"path": str(npz), "images": 40}


def test_resumed_run_loss_curve_has_each_step_once(run, evaluated):
    rows = read_metrics(run / "metrics.jsonl")
    series = loss_series(rows)
    assert series["step"] == list(range(1, 21))  # trained 1-10, resumed 11-20
    assert len(series["loss"]) == len(series["loss_smooth"]) == len(series["lr"]) == 20
    assert set(series["buckets"]) == {"q0", "q1", "q2", "q3"} and all(len(v) == 20 for v in series["buckets"].values())
    assert all(len(v) == 20 for v in series["buckets_smooth"].values())
    assert series["epoch"] == [1] and series["epoch_loss"][0] == pytest.approx(np.mean(series["loss"]))
    assert series["epoch_complete"] == [False] and series["test_loss"] == []  # 20 of 1875 steps: no epoch end
    # rows of a killed attempt left in the file (here: stale copies of 11-15) never show up twice
    lines = (run / "metrics.jsonl").read_text().splitlines()
    stale = [json.dumps({**json.loads(line), "loss": 99.0}) for line in lines[10:15]]
    mixed = run.parent / "mixed.jsonl"
    mixed.write_text("\n".join(lines[:10] + stale + lines[10:]) + "\n")
    again = loss_series(read_metrics(mixed))
    assert again["step"] == series["step"] and again["loss"] == series["loss"] and 99.0 not in again["loss"]
    assert m_curves(evaluated)["logged_steps"] == 20


def m_curves(evaluated):
    return evaluated[1]["sections"]["curves"]


def test_loss_series_per_epoch_means():
    rows = [{"step": s, "epoch": s / 4, "loss": float(s), "lr": 1e-3} for s in (2, 4, 6, 8, 9)]
    series = loss_series(rows)
    assert series["epoch"] == [1, 2, 3]  # steps 1-4, 5-8, 9
    assert series["epoch_loss"] == [pytest.approx((2 * 2 + 4 * 2) / 4), pytest.approx((6 * 2 + 8 * 2) / 4), 9.0]
    assert series["buckets"] == {}
    assert all(math.isfinite(v) for v in series["loss_smooth"])
    assert series["epoch_complete"] == [True, True, False] and series["epoch_step"] == [4, 8, 9]


def test_loss_series_takes_the_logged_epoch_and_held_out_losses():
    """The training job's epoch rows (whole-number epoch): its epoch_loss wins over the mean of the logged rows,
    and test_loss is placed at its epoch and step."""
    rows = [{"step": s, "epoch": s / 4, "loss": float(s)} for s in (2, 4, 6, 8)]
    rows[1].update(epoch_loss=0.5, test_loss=0.7)
    rows[3].update(epoch_loss=0.25, test_loss=0.6)
    series = loss_series(rows)
    assert series["epoch"] == [1, 2] and series["epoch_loss"] == [0.5, 0.25]
    assert (series["test_epoch"], series["test_step"], series["test_loss"]) == ([1, 2], [4, 8], [0.7, 0.6])


def test_options_checkpoint_convention_and_merge(run, evaluated, untrained_classifier):
    """--checkpoint STEP --no-ema --convention w: another eval dir, w groups; a later --only run adds to it."""
    assert evaluate([str(run), "--checkpoint", "15", "--no-ema", "--convention", "w", "--guidance", "0,2",
                     "--only", "grids", "--per-class", "2", "--metric-samples", "10", "--seed", "7"]) == 0
    out = run / "eval" / "step_000000015"
    m = json.loads((out / "metrics.json").read_text())
    assert m["checkpoint"]["ema"] is False and m["guidance"]["scales"] == [0.0, 2.0] and m["seed"] == 7
    figs = {f["file"]: f for f in _figures(m)}
    assert set(figs) == {"guidance_grid.png", "samples_w_0.png", "samples_w_2.png"}
    _check_grid(out, figs["samples_w_2.png"], 10, 2)
    with h5py.File(run / "samples.h5", "r") as f:
        a = dict(f["eval/step_000000015/w_2"].attrs)
        assert (a["guidance_convention"], a["guidance_scale"], a["gamma"], bool(a["ema"]), a["seed"]) == \
            ("w", 2.0, 3.0, False, 7)
    assert evaluate([str(run), "--checkpoint", "15", "--no-ema", "--only", "curves"]) == 0
    m2 = json.loads((out / "metrics.json").read_text())
    assert set(m2["sections"]) == {"guidance", "curves"}  # the earlier sweep is kept in the report
    assert "samples_w_2.png" in (out / "report.md").read_text() and "loss_curves.png" in (out / "report.md").read_text()


# ---- other kinds of runs (random weights: the figures, not the quality, are under test) ----------

def _fake_run(tmp_path, config_path, name, overrides, rows=5):
    cfg = load_config(config_path, overrides)
    run_dir = tmp_path / name
    write_config(run_dir, cfg)
    torch.manual_seed(0)
    net = build_net(cfg.model["arch"], **cfg.net_kwargs())
    CheckpointManager(run_dir / "checkpoints").save(rows, {"model": net.state_dict(), "ema": None, "optimizer": {},
                                                           "step": rows, "config": cfg.to_dict()})
    with RunLogger(run_dir, tensorboard=False) as log:
        for s in range(1, rows + 1):
            log.log_scalars(s, {"loss": 1.0 / s, "lr": 1e-3}, epoch=s / 100)
    return run_dir


def test_denoiser_run(tmp_path, config_path):
    """As configs/recipes/cs180_denoiser.yaml: images in [0, 1] (data.normalize [0, 1]), so σ is on that scale."""
    run_dir = _fake_run(tmp_path, config_path, "den", ["model={arch: cs180_denoiser, hidden: 8}",
                                                       "diffusion.objective=denoiser", "diffusion.sigma=0.3",
                                                       "sample.guidance=[1.0]", "train.ema_decay=0",
                                                       "data.normalize=[0.0, 1.0]"])
    assert evaluate([str(run_dir), "--metric-samples", "16"]) == 0
    out = run_dir / "eval" / "step_000000005"
    m = json.loads((out / "metrics.json").read_text())
    d = m["sections"]["denoiser"]
    assert d["sigmas"] == [0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0] and d["train_sigma"] == 0.3 and d["n"] == 16
    assert d["mse_noisy"][0] == 0 and d["mse_noisy"][-1] == pytest.approx(1.0, rel=0.2)
    figs = {f["file"]: f for f in _figures(m)}
    assert set(figs) == {"loss_curves.png", "denoiser_sigmas.png", "denoiser_ood.png"}
    grid = _check_grid(out, figs["denoiser_sigmas.png"], 8, 8)  # 4 digits x (noisy, denoised) rows, 8 sigmas
    from ddpm.data.datasets import load_dataset
    test_images, _ = load_dataset("mnist", load_config(config_path).data.root, train=False)
    for i in range(4):  # σ = 0: the test digit itself, read back from [0, 1] exactly
        y = PAD + 2 * i * (CELL + PAD)
        assert np.array_equal(grid[y:y + CELL, PAD:PAD + CELL], test_images[i, 0].numpy()), i
    assert d["image_range"] == [0.0, 1.0] and d["mse_noisy"][1] == pytest.approx(0.04, rel=0.2)  # σ² on [0, 1]
    report = (out / "report.md").read_text()
    assert "## One-step denoiser" in report and "on the scale of the images the model sees, [0, 1]" in report


def test_noisy_classifier_run(tmp_path, config_path):
    run_dir = _fake_run(tmp_path, config_path, "clf", ["model={arch: noisy_classifier, base: 8}",
                                                       "diffusion.objective=classifier", "sample.guidance=[1.0]"])
    assert evaluate([str(run_dir), "--metric-samples", "20"]) == 0
    m = json.loads((run_dir / "eval" / "step_000000005" / "metrics.json").read_text())
    acc = m["sections"]["accuracy_vs_t"]
    assert len(acc["t"]) == len(acc["accuracy"]) == 11 and (acc["t"][0], acc["t"][-1]) == (0, 49)
    assert all(0 <= a <= 1 for a in acc["accuracy"]) and acc["n"] == 20
    assert {f["file"] for f in _figures(m)} == {"loss_curves.png", "classifier_accuracy.png"}


def test_unconditional_and_flow_runs(tmp_path, config_path):
    run_dir = _fake_run(tmp_path, config_path, "uncond", ["model={arch: cs180_time_unet, hidden: 8}",
                                                          "sample.guidance=[1.0]"])
    assert evaluate([str(run_dir), "--only", "grids,gifs,interpolation", *FAST]) == 0
    out = run_dir / "eval" / "step_000000005"
    m = json.loads((out / "metrics.json").read_text())
    figs = {f["file"]: f for f in _figures(m)}
    assert "guidance_grid.png" not in figs and m["guidance"]["conditional"] is False
    _check_grid(out, figs["samples_uncond.png"], 1, 10)  # per_class 1: one row of 10
    assert m["archive"]["groups"] == ["eval/step_000000005/uncond"]

    flow = _fake_run(tmp_path, config_path, "flow", ["diffusion.objective=rectified_flow", "sample.sampler=euler"])
    assert evaluate([str(flow), "--only", "gifs,steps", "--table-samples", "2", "--steps", "6"]) == 0
    m = json.loads((flow / "eval" / "step_000000005" / "metrics.json").read_text())
    assert m["sampler"] == {"name": "euler", "steps": 6, "note": None, "clip_x0": False, "eta": 0.0,
                            "fast_sampler": "euler", "fast_steps": 20}
    assert m["sections"]["gifs"]["frames"] == 7
    rows = m["sections"]["steps"]["rows"]
    assert [r["sampler"] for r in rows] == ["euler"] * 4 + ["heun"] * 4 + ["dpmpp_2m"] * 4
    assert [r["evaluations"] for r in rows] == [10, 20, 50, 100] * 3  # equal cost per column (heun: 2 per step)


def test_ddim_eta_is_carried_into_the_samples_and_every_record(tmp_path, config_path):
    run_dir = _fake_run(tmp_path, config_path, "eta", [])
    args = [str(run_dir), "--only", "grids", "--guidance", "3", "--sampler", "ddim", "--steps", "4", "--device", "cpu",
            "--metric-samples", "10"]
    assert evaluate(args + ["--eta", "0.5"]) == 0
    out = run_dir / "eval" / "step_000000005"
    m = json.loads((out / "metrics.json").read_text())
    assert (m["sampler"]["name"], m["sampler"]["eta"], m["sampler"]["fast_sampler"]) == ("ddim", 0.5, "ddim")
    assert "ddim, 4 steps, eta 0.5" in (out / "report.md").read_text()
    with h5py.File(run_dir / "samples.h5", "r") as f:
        stochastic = f["eval/step_000000005/gamma_3"]["images"][()]
        assert f["eval/step_000000005/gamma_3"].attrs["eta"] == 0.5
    assert evaluate(args) == 0  # the config's eta: 0, deterministic
    with h5py.File(run_dir / "samples.h5", "r") as f:
        assert not np.array_equal(f["eval/step_000000005/gamma_3"]["images"][()], stochastic)
        assert f["eval/step_000000005/gamma_3"].attrs["eta"] == "none"


def test_a_long_guidance_scale_reports_its_progress_without_changing_its_samples(tmp_path, config_path, capsys,
                                                                                 monkeypatch):
    """Sampling one scale can take half an hour on a CPU: the log says how far it is (here: every step, with
    PROGRESS_S = 0), and the samples are the same as without the reports (DDPM computes x0 for a callback)."""
    from ddpm.evaluate import sampled
    run_dir = _fake_run(tmp_path, config_path, "progress", ["diffusion.T=6"])
    args = [str(run_dir), "--only", "grids", "--guidance", "3", "--sampler", "ddpm", "--device", "cpu",
            "--metric-samples", "10"]

    def images():
        with h5py.File(run_dir / "samples.h5", "r") as f:
            return f["eval/step_000000005/gamma_3"]["images"][()]
    assert evaluate(args) == 0
    quiet = images()
    assert ": step " not in capsys.readouterr().out
    monkeypatch.setattr(sampled, "PROGRESS_S", 0.0)
    assert evaluate(args) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if ": step " in line]
    assert [line.split(" · ")[0] for line in lines] == [f"  gamma_3: step {k}/6" for k in range(1, 6)], lines
    assert all(line.endswith(" s left") for line in lines), lines
    assert np.array_equal(images(), quiet)


# ---- bad inputs: one line, exit 2, nothing written -----------------------------------------------

def _snapshot(path):
    return {p.relative_to(path): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(path.rglob("*")) if p.is_file()}


def _fails(capsys, args, message, watch):
    before = _snapshot(watch)
    assert evaluate(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert _snapshot(watch) == before


def test_bad_inputs_write_nothing(tmp_path, run, evaluated, config_path, capsys):
    r = str(run)
    (tmp_path / "empty").mkdir()
    _fails(capsys, [str(tmp_path / "empty")], "is not a run directory", tmp_path)
    cfg = load_config(config_path)
    write_config(tmp_path / "untrained", cfg)
    _fails(capsys, [str(tmp_path / "untrained")], "no checkpoint in", tmp_path)
    uncond = _fake_run(tmp_path, config_path, "uncond", ["model={arch: cs180_time_unet, hidden: 8}",
                                                          "sample.guidance=[1.0]"])
    _fails(capsys, [str(uncond), "--guidance", "1,3"], "model is unconditional", tmp_path)
    _fails(capsys, [str(uncond), "--ema"], "has no EMA weights", tmp_path)
    junk = tmp_path / "junk.pth"
    junk.write_text("not weights")
    for args, message in (
            (["--guidance", "1,x"], "--guidance '1,x' is not a comma-separated list of numbers"),
            (["--guidance", ""], "is not a comma-separated list"),
            (["--sampler", "dpm++"], "unknown sampler 'dpm++'"),
            (["--sampler", "euler"], "does not fit diffusion.objective=eps"),
            (["--steps", "51"], "--steps 51 exceeds diffusion.T=50"),
            (["--sampler", "ddpm", "--steps", "20"], "ddpm sampler always runs all T=50 steps"),
            (["--eta", "0.5", "--sampler", "ddpm"], "--eta 0.5 is DDIM's stochasticity"),
            (["--eta", "-1"], "--eta must be in [0, 1]"),
            (["--inception-weights", str(tmp_path / "inception.pt")], "Inception weights"),
            (["--inception-weights", str(junk)], "are not a plain tensor state dict"),
            (["--classifier", str(tmp_path / "clf.pt")], "not found"),
            (["--only", "grids,fidd"], "unknown --only part 'fidd'"),
            (["--only", "grids,fid"], "--only fid scores --fid-samples N samples"),
            (["--fid-samples", "0"], "--fid-samples must be >= 1"),
            (["--fid-samples", "10", "--classifier", str(tmp_path / "clf.pt")], "not found"),
            (["--only", "denoiser"], "does not apply to a run with diffusion.objective=eps"),
            (["--checkpoint", "7"], "no checkpoint for step 7"),
            (["--convention", "beta"], "unknown --convention 'beta'"),
            (["--per-class", "0"], "--per-class must be >= 1"),
            (["--device", "tpu"], "unknown --device"),
            (["--export-npz", str(run / "config.json")], "already exists"),
            (["--export-npz", str(tmp_path / "x.npz"), "--only", "curves"], "this evaluation makes none"),
            (["--steps", "x"], "invalid int value")):
        _fails(capsys, [r, *args], message, run)


def test_cli_subprocess_error_and_help(tmp_path, capsys):
    r = subprocess.run([sys.executable, "-m", "jobs.evaluate", str(tmp_path)], cwd=ROOT, env=python_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "not a run directory" in r.stderr and list(tmp_path.iterdir()) == []
    assert evaluate(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--inception-weights" in out and "examples:" in out and "python -m jobs.evaluate RUN" in out


def test_inception_metrics_end_to_end(run, evaluated, random_inception_weights):
    """--inception-weights with a randomly initialised torch-fidelity InceptionV3 (nothing downloaded); few
    images, so it takes seconds even on a CPU."""
    assert evaluate([str(run), "--only", "metrics", "--guidance", "1", "--metric-samples", "10",
                     "--inception-weights", str(random_inception_weights), "--reference-images", "10"]) == 0
    m = json.loads((run / "eval" / "step_000000020" / "metrics.json").read_text())
    assert m["inception"]["path"] == str(random_inception_weights) and m["inception"]["reference_images"] == 10
    assert m["inception"]["reference"] == "train" and m["inception"]["torch_fidelity"]
    row = m["sections"]["guidance"]["rows"][0]
    assert row["inception_fid"] > 0 and row["inception_score"] >= 1.0
    assert row["kid"] is not None and 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1
    report = (run / "eval" / "step_000000020" / "report.md").read_text()
    assert "Inception FID" in report and "| KID |" in report and "reference: the training split" in report
    assert any("10 of the 60000 mnist training images" in n for n in m["notes"]) and "not comparable" in report


def test_fid_samples_uses_jobs_sample_machinery(run, evaluated, untrained_classifier, capsys):
    """--fid-samples N: N samples per scale as jobs.sample makes them (same file, same bytes: a later
    jobs.sample of the same request has nothing to do), scored, in metrics.json, the report and HParams."""
    from ddpm.evaluate.hparams import headline
    from ddpm.run.samples import read_samples
    from jobs.sample import main as sample

    args = [str(run), "--only", "fid", "--fid-samples", "30", "--guidance", "1,3", "--classifier",
            str(untrained_classifier), *FAST]
    assert evaluate(args) == 0
    out = capsys.readouterr().out
    m = json.loads((run / "eval" / "step_000000020" / "metrics.json").read_text())
    rows = m["sections"]["fid"]["rows"]
    assert [(r["scale"], r["n"]) for r in rows] == [(1.0, 30), (3.0, 30)] and m["sections"]["fid"]["n"] == 30
    assert all(0 <= r["accuracy"] <= 1 and r["feature_fid"] > 0 and r["inception_fid"] is None for r in rows)
    files = sorted((run / "samples").glob("*_n30_*.h5"))
    assert [str(f) for f in files] == [r["file"] for r in rows], files
    assert "scored in" in out and "feature-FID" in out
    images, labels, attrs = read_samples(files[1], "samples")
    assert images.shape == (30, 28, 28, 1) and list(labels[:12]) == [*range(10), 0, 1] and attrs["guidance"] == 3.0
    assert sample([str(run), "--num", "30", "--guidance", "3", "--device", "cpu"]) == 0
    assert "already complete" in capsys.readouterr().out  # the same request, the same file
    assert {"eval/accuracy_n30/γ=1", "eval/feature_fid_n30/γ=3"} <= set(headline(m))
    assert "## Paper-scale metrics (--fid-samples)" in (run / "eval" / "step_000000020" / "report.md").read_text()
    # a rerun of the finished evaluation makes no sample again
    assert evaluate(args) == 0 and capsys.readouterr().out.count("already complete") == 2
    np.testing.assert_array_equal(read_samples(files[1], "samples")[0], images)


def test_fid_samples_needs_something_to_score(tmp_path, config_path, capsys):
    fake = _fake_run(tmp_path, config_path, "noclf", [f"data.root={tmp_path / 'root'}"])  # no classifier there
    _fails(capsys, [str(fake), "--fid-samples", "10", "--device", "cpu"], "would make samples that nothing scores",
           fake)


def _hparams_api(port, route, body):
    import urllib.request

    req = urllib.request.Request(f"http://127.0.0.1:{port}/data/plugin/hparams/{route}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", "X-XSRF-Protected": "1"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def test_headline_metrics_and_hparams_reach_tensorboard(evaluated, run):
    """The evaluation's numbers with the run's hyper-parameters, read back through TensorBoard's own HTTP
    API (the HParams plugin) from a server on 127.0.0.1, as `jobs.tensorboard` serves the run root."""
    import time

    from ddpm.cluster import tensorboard as tbs
    from ddpm.evaluate.hparams import headline

    out, _, _ = evaluated
    m = json.loads((out / "metrics.json").read_text())  # as the latest evaluation of this checkpoint left it
    assert m["hparams"] == str(out / "tb")
    expected = headline(m)  # e.g. {"eval/accuracy/γ=3": 0.15, "eval/feature_fid/γ=3": 310.2, ...}
    tag = sorted(expected)[0]
    port = tbs.free_port()
    proc = subprocess.Popen([sys.executable, "-m", "jobs.tensorboard", str(run.parent), "--port", str(port)],
                            cwd=ROOT, env=python_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, experiment = time.monotonic() + 90, {}
        while not experiment.get("metricInfos"):
            assert proc.poll() is None and time.monotonic() < deadline, experiment
            time.sleep(0.5)
            try:
                experiment = _hparams_api(port, "experiment", {"experimentName": ""})
            except OSError:
                pass
        hparams = {h["name"] for h in experiment["hparamInfos"]}
        assert {"run", "model.arch", "train.lr", "train.batch_size", "train.steps", "eval.sampler"} <= hparams
        tags = {mi["name"]["tag"] for mi in experiment["metricInfos"]}
        assert set(expected) == tags and any("/γ=" in t for t in tags), tags
        groups = _hparams_api(port, "session_groups", {
            "experimentName": "", "startIndex": 0, "sliceSize": 10,
            "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"],
            "colParams": [{"hparam": "train.steps"}, {"metric": {"tag": tag, "group": ""}}]})
        assert groups["totalSize"] == 1
        session = groups["sessionGroups"][0]
        assert session["hparams"]["train.steps"] == 20 and session["hparams"]["run"] == "tiny"
        values = {v["name"]["tag"]: v["value"] for v in session["metricValues"]}
        assert math.isclose(values[tag], expected[tag], rel_tol=1e-6)
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.mark.slurm
def test_evaluate_template_with_two_tasks_shares_the_fid_samples_and_survives_preemption(
        slurm, run, evaluated, untrained_classifier, tmp_path):
    """`sbatch --ntasks-per-node=2 slurm/evaluate.sh RUN --fid-samples N`: both tasks make the shards, the
    time-limit warning (USR2) after the first one stops them (exit 75), the job requeues itself, the rerun
    makes only the missing shards, rank 0 scores and writes the report, and the samples equal one
    process's (jobs.sample of the same request) bit for bit."""
    import os
    import shutil
    import time

    from test_slurm import job_env, log_text, sbatch, wait_job

    from ddpm.run.samples import read_samples

    args = ["--only", "fid", "--fid-samples", "2000", "--guidance", "3", "--classifier", untrained_classifier, *FAST]
    jid = sbatch(tmp_path, "evaluate.sh", "--ntasks-per-node=2", "--gpus-per-node=2", "--mem=4G", run, *args,
                 env=job_env())
    log = tmp_path / "logs" / f"evaluate-{jid}.out"
    deadline = time.time() + 120
    while not list((run / "samples").glob("*_n2000_*.shards/shard_*.npz")) and time.time() < deadline:
        time.sleep(0.05)
    subprocess.run(["scancel", "--batch", "--signal=USR2", jid], check=True, timeout=30)
    assert wait_job(jid, log, timeout=300) == [(jid, "COMPLETED", "0:0")], log_text(log)
    text = log.read_text()
    assert "2 rank(s)" in text and "stop requested" in text and "requeueing job" in text, text
    assert "shards already committed" in text.split("requeueing job")[1] and "scored in" in text, text
    m = json.loads((run / "eval" / "step_000000020" / "metrics.json").read_text())
    row = m["sections"]["fid"]["rows"][0]
    assert row["n"] == 2000 and row["feature_fid"] > 0, row
    made = read_samples(row["file"], "samples")
    moved = tmp_path / "srun.h5"
    shutil.move(row["file"], moved)
    r = subprocess.run([sys.executable, "-m", "jobs.sample", str(run), "--num", "2000", "--guidance", "3",
                        "--device", "cpu"], cwd=ROOT, env={**python_env(), "OMP_NUM_THREADS": "1"},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and os.path.isfile(row["file"]), r.stdout + r.stderr
    ref = read_samples(row["file"], "samples")
    assert np.array_equal(made[0], ref[0]) and np.array_equal(made[1], ref[1])
