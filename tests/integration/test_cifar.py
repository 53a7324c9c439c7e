"""CIFAR-10 end to end on real images (the subset of the official files in ../shared/data/cifar10, CPU):
the classifier, the shipped configs training at a reduced width, kill -9 resume with flips, evaluation.

The subset is read-only: the classifier goes to tmp_path (--out) and evaluation gets --classifier.
"""
import json
import signal

import h5py
import numpy as np
import pytest
from PIL import Image

from ddpm.data.datasets import DATASETS
from ddpm.run.metrics_log import read_metrics
from jobs.evaluate import main as evaluate
from jobs.train import main as train
from jobs.train_classifier import main as train_classifier

from conftest import ROOT, assert_same_weights, latest_state, start_train, train_reference, wait_for_step

CLASS_NAMES = list(DATASETS["cifar10"]["class_names"])
# configs/cifar10.yaml at a CPU-sized width: 2 levels of 16/32 channels (attention at 16x16 kept).
SMALL_UNET = ["model.base=16", "model.num_groups=8", "model.ch_mult=[1,2]", "model.num_res_blocks=1", "model.dropout=0.0"]
SHORT = ["train.batch_size=32", "train.steps=40", "train.warmup_steps=5", "train.lr=2e-3", "log.every=1", "checkpoint.every=10",
         "log.progress=lines", "sample.steps=5", "sample.per_class=1"]
CLASSIFIER_FLOOR = 0.65  # measured 0.679 (the recipe: 15 epochs of the subset, seed 0; docs/QUALITY.md)


@pytest.fixture(scope="module")
def classifier(cifar_subset, tmp_path_factory):
    """A quickly trained CIFAR classifier (100 steps): the evaluation tests need a real one, not a good one."""
    out = tmp_path_factory.mktemp("clf") / "cifar10_cnn.pt"
    assert train_classifier(["--dataset", "cifar10", "--root", str(cifar_subset), "--out", str(out), "--steps", "100"]) == 0
    return out


@pytest.mark.slow
def test_the_classifier_recipe_on_real_images(cifar_subset, tmp_path, capsys):
    """The recipe (15 epochs of the subset, about 2 minutes on 2 cores), through the job."""
    import torch

    out = tmp_path / "cifar10_cnn.pt"
    assert train_classifier(["--dataset", "cifar10", "--root", str(cifar_subset), "--out", str(out)]) == 0
    assert "note: the classifier was trained on a subset (5170 of 50000" in capsys.readouterr().out
    meta = torch.load(out, map_location="cpu", weights_only=True)["meta"]
    assert meta["dataset"] == "cifar10" and meta["test_images"] == 1017 and meta["train_images"] == 5170
    assert meta["subset"] is True and meta["steps"] == 15 * (5170 // 128)
    assert meta["test_accuracy"] >= CLASSIFIER_FLOOR, meta
    assert out.with_name("cifar10_cnn.test_stats.npz").is_file()  # next to --out, not in the data root


def test_a_read_only_default_location_is_refused_before_training(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "classifiers").write_text("not a folder")  # nothing can be created below it (even as root)
    assert train_classifier(["--dataset", "cifar10", "--root", str(data)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pass --out PATH" in err and "--classifier PATH" in err


@pytest.fixture(scope="module")
def config(cifar_subset, tmp_path_factory):
    """configs/cifar10.yaml with the subset as data root (hflip: true, as shipped)."""
    text = (ROOT / "configs" / "cifar10.yaml").read_text()
    assert "hflip: true" in text
    path = tmp_path_factory.mktemp("cfg") / "cifar10.yaml"
    path.write_text(text.replace("root: data ", f"root: {cifar_subset} "))
    return path


@pytest.fixture(scope="module")
def reference(config, tmp_path_factory):
    """An uninterrupted 40-step run of the shipped CIFAR config at a small width, in a subprocess."""
    return train_reference(config, tmp_path_factory.mktemp("ref") / "run", *SMALL_UNET, *SHORT, timeout=600)


def test_the_shipped_config_learns_on_real_cifar(reference):
    losses = [r["loss"] for r in read_metrics(reference / "metrics.jsonl")]
    assert len(losses) == 40
    first, last = np.mean(losses[:8]), np.mean(losses[-8:])
    # EDM's weighted loss starts at 1 (zero-initialised output: the unit-variance target itself) and falls
    # more slowly than an eps MSE, whose low-noise half is nearly free (measured: 0.93 -> 0.74 in 40 steps).
    assert last < 0.85 * first, (first, last)
    with h5py.File(reference / "samples.h5", "r") as f:
        images = f["train/step_000000040/w_3"]["images"][:]
    assert images.shape == (10, 32, 32, 3) and images.dtype == np.uint8
    grid = np.asarray(Image.open(reference / "samples" / "step_000000040_w_3.png").convert("RGB")).astype(int)
    assert grid.shape[1] > 64 and np.abs(grid[..., 0] - grid[..., 2]).max() > 50  # colour samples


def test_kill9_with_flips_resumes_bit_exact(config, reference, tmp_path):
    run = tmp_path / "run"
    proc = start_train(config, run, *SMALL_UNET, *SHORT)
    wait_for_step(run, 14, proc, timeout=300)  # past the checkpoint at 10, mid-way to 20
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert "resuming at step" in resume_in_subprocess_with(config, run)
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == list(range(1, 41))
    assert_same_weights(latest_state(run), latest_state(reference))


def resume_in_subprocess_with(config, run):
    proc = start_train(config, run, *SMALL_UNET, *SHORT)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    return out


def test_the_lab_recipe_trains_on_real_cifar(cifar_subset, tmp_path):
    run = tmp_path / "bonn"
    args = ["--config", str(ROOT / "configs" / "recipes" / "bonn_cifar10.yaml"), "--run-dir", str(run),
            f"data.root={cifar_subset}", "model.channels=8", "train.epochs=null", "train.steps=80",
            "train.batch_size=32", "log.every=1", "sample.sampler=ddim", "sample.steps=5", "sample.per_class=1", "log.progress=lines"]
    assert train(args) == 0
    losses = [r["loss"] for r in read_metrics(run / "metrics.jsonl")]
    assert np.mean(losses[-6:]) < 0.6 * np.mean(losses[:6])


@pytest.fixture(scope="module")
def evaluated(reference, classifier, tmp_path_factory):
    npz = tmp_path_factory.mktemp("npz") / "cifar.npz"
    # Every part but the sampler-steps table (covered on MNIST, the slowest here).
    args = [str(reference), "--classifier", str(classifier), "--only", "grids,metrics,curves,progression,gifs,interpolation",
            "--per-class", "2", "--steps", "5", "--fast-steps", "5", "--metric-samples", "20", "--export-npz", str(npz)]
    assert evaluate(args) == 0
    out = reference / "eval" / "step_000000040"
    return out, json.loads((out / "metrics.json").read_text()), npz


def test_evaluation_renders_colour_grids_named_by_class(evaluated):
    out, m, _ = evaluated
    figs = {f["file"]: f for s in m["sections"].values() for f in s.get("figures", [])}
    grid = figs["guidance_grid.png"]
    assert (grid["rows"], grid["cols"]) == (10, 3) and grid["row_labels"] == CLASS_NAMES
    assert grid["col_labels"] == ["w=0", "w=1", "w=3"]
    image = np.asarray(Image.open(out / "guidance_grid.png").convert("RGB")).astype(int)
    x, y, w, h = grid["grid_box"]
    cells = image[y:y + h, x:x + w]
    assert np.abs(cells[..., 0] - cells[..., 2]).mean() > 2  # colour, not grey
    assert figs["samples_w_3.png"]["row_labels"] == CLASS_NAMES
    assert figs["progression.png"]["col_labels"] == CLASS_NAMES
    assert figs["interpolation.png"]["row_labels"][1] == "class bird"
    for name in ("loss_curves.png", "denoising_xt.png"):
        assert Image.open(out / name).size[0] >= 300
    gif = Image.open(out / "denoising_class3.gif")
    assert gif.n_frames >= 2 and gif.size[0] > 32


def test_evaluation_metrics_use_the_cifar_classifier_and_say_it_saw_a_subset(evaluated, classifier):
    out, m, _ = evaluated
    assert m["dataset"] == "cifar10" and m["classifier"]["path"] == str(classifier)
    assert m["classifier"]["subset"] is True and "5170 of 50000" in m["classifier"]["subset_note"]
    rows = m["sections"]["guidance"]["rows"]
    assert [r["scale"] for r in rows] == [0.0, 1.0, 3.0]
    for r in rows:
        assert 0 <= r["accuracy"] <= 1 and np.isfinite(r["feature_fid"]) and r["n"] == 20
    report = (out / "report.md").read_text()
    assert "**subset**" in report and "not comparable" in report


def test_export_npz_round_trips(evaluated, reference):
    out, m, npz = evaluated
    data = np.load(npz)
    groups = m["archive"]["groups"]
    with h5py.File(reference / "samples.h5", "r") as f:
        images = np.concatenate([f[g]["images"][:] for g in groups])
        labels = np.concatenate([f[g]["labels"][:] for g in groups])
    assert data["arr_0"].shape == images.shape and data["arr_0"].shape[1:] == (32, 32, 3)
    assert np.array_equal(data["arr_0"], images) and np.array_equal(data["arr_1"], labels)
