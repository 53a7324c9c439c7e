"""ddpm.evaluate.feature_cnn / metrics / jobs.train_classifier: Fréchet distance against closed forms,
reproducible classifier training, caching, bad inputs, and the >= 99 % MNIST floor (slow). The Inception
metrics (torch-fidelity) are in test_fidelity.py."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from ddpm.data.datasets import load_dataset
from ddpm.errors import UserError
from ddpm.evaluate import feature_cnn, metrics

from conftest import ROOT, python_env


def test_frechet_distance_closed_forms():
    d, rng = 6, np.random.default_rng(0)
    mu = rng.normal(size=d)
    # N(0, I) vs N(mu, 4 I): |mu|^2 + d (1 + 4 - 2 * 2)
    assert metrics.frechet_distance(np.zeros(d), np.eye(d), mu, 4 * np.eye(d)) == pytest.approx(mu @ mu + d)
    a = rng.normal(size=(d, d))
    s1 = a @ a.T + 0.1 * np.eye(d)
    b = rng.normal(size=(d, d))
    s2 = b @ b.T
    assert metrics.frechet_distance(mu, s1, mu, s1) == pytest.approx(0, abs=1e-8)
    fwd, back = metrics.frechet_distance(mu, s1, 0 * mu, s2), metrics.frechet_distance(0 * mu, s2, mu, s1)
    assert fwd == pytest.approx(back, rel=1e-9)
    # tr((S1 S2)^1/2) through the eigenvalues of S1 S2 (real and non-negative for PSD matrices)
    cross = np.sqrt(np.clip(np.linalg.eigvals(s1 @ s2).real, 0, None)).sum()
    assert fwd == pytest.approx(mu @ mu + np.trace(s1) + np.trace(s2) - 2 * cross, rel=1e-7)
    # a singular covariance (fewer samples than dimensions) still gives a finite, non-negative distance
    feats = rng.normal(size=(3, d))
    assert 0 <= metrics.frechet_distance(*metrics.feature_stats(feats), np.zeros(d), np.eye(d)) < np.inf


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def small_test_split():
    """The first 1000 MNIST test images stand in for the split in the quick tests (the slow test and the
    job subprocess see all 10000): classifying 10000 images for every check would dominate the run time."""
    import ddpm.data.datasets

    real = ddpm.data.datasets.load_dataset

    def first_1000(name, root, train=True, download=False):
        images, labels = real(name, root, train, download)
        return (images, labels) if train else (images[:1000], labels[:1000])

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ddpm.data.datasets, "load_dataset", first_1000)
        mp.setattr(feature_cnn, "load_dataset", first_1000)
        yield


@pytest.fixture(scope="module")
def quick_classifier(tmp_path_factory, mnist_root, small_test_split):
    """A classifier trained for 20 steps with the real recipe, and its path (weak but real)."""
    net, meta, _ = feature_cnn.train_classifier("mnist", mnist_root, steps=20, log=lambda s: None)
    path = tmp_path_factory.mktemp("clf") / "mnist_cnn.pt"
    feature_cnn.save_classifier(path, net, meta)
    return path, net, meta


def test_classifier_training_is_reproducible(quick_classifier, mnist_root):
    _, net, meta = quick_classifier
    again, meta2, _ = feature_cnn.train_classifier("mnist", mnist_root, steps=20, log=lambda s: None)
    for (k, a), b in zip(net.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    assert meta2["test_accuracy"] == meta["test_accuracy"] and meta["steps"] == 20
    assert meta["test_accuracy"] > 0.3  # 20 steps already learn a lot; a broken loop stays near 0.1


def test_save_load_and_reference_stats(quick_classifier, mnist_root, monkeypatch):
    path, net, meta = quick_classifier
    loaded, meta2 = feature_cnn.load_classifier(path, "mnist")
    assert meta2["test_accuracy"] == meta["test_accuracy"]
    images, labels = load_dataset("mnist", mnist_root, train=False)
    images, labels = images[:1000], labels[:1000]  # as small_test_split does
    logits, feats = feature_cnn.classify(loaded, images[:500])
    assert logits.shape == (500, 10) and feats.shape == (500, feature_cnn.FEATURE_DIM)
    assert metrics.accuracy(logits, labels[:500]) == pytest.approx(
        metrics.accuracy(feature_cnn.classify(net, images[:500])[0], labels[:500]))

    mu, sigma = feature_cnn.reference_stats(path, loaded, "mnist", mnist_root)
    assert feature_cnn.stats_path(path).is_file() and mu.shape == (128,) and sigma.shape == (128, 128)
    # the test set against its own statistics: distance 0
    all_feats = feature_cnn.classify(loaded, images)[1].numpy()
    assert metrics.frechet_distance(*metrics.feature_stats(all_feats), mu, sigma) == pytest.approx(0, abs=1e-4)
    # cached: a second call does not touch the data
    monkeypatch.setattr(feature_cnn, "classify", lambda *a, **k: pytest.fail("recomputed cached statistics"))
    mu2, _ = feature_cnn.reference_stats(path, loaded, "mnist", mnist_root)
    assert np.array_equal(mu, mu2)


def test_load_classifier_bad_inputs(tmp_path, quick_classifier):
    with pytest.raises(UserError, match="not found.*jobs.train_classifier"):
        feature_cnn.load_classifier(tmp_path / "nope.pt", "mnist")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="not a classifier written by jobs.train_classifier"):
        feature_cnn.load_classifier(junk, "mnist")
    with pytest.raises(UserError, match="trained on mnist, but this run uses cifar10"):
        feature_cnn.load_classifier(quick_classifier[0], "cifar10")


def test_train_classifier_job_caches(tmp_path, mnist_root, capsys, small_test_split):
    from jobs.train_classifier import main

    out = tmp_path / "c" / "mnist_cnn.pt"
    args = ["--dataset", "mnist", "--root", str(mnist_root), "--out", str(out), "--steps", "5"]
    assert main(args) == 0
    assert out.is_file() and feature_cnn.stats_path(out).is_file()
    first = out.read_bytes()
    capsys.readouterr()
    assert main(args) == 0
    assert "already trained" in capsys.readouterr().out and out.read_bytes() == first


def test_train_classifier_job_bad_inputs(tmp_path, capsys):
    from jobs.train_classifier import main

    for args, message in ((["--dataset", "svhn"], "unknown --dataset 'svhn'"),
                          (["--dataset", "mnist", "--root", str(tmp_path / "none")], "MNIST not found"),
                          (["--dataset", "mnist", "--steps", "0"], "--steps must be >= 1")):
        assert main(args + ["--out", str(tmp_path / "x.pt")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_classifier_reaches_99_percent_on_mnist(tmp_path, mnist_root):
    """The real recipe, through the job, on real MNIST (a few minutes on 2 CPU cores)."""
    out = tmp_path / "mnist_cnn.pt"
    r = subprocess.run([sys.executable, "-m", "jobs.train_classifier", "--dataset", "mnist", "--root",
                        str(mnist_root), "--out", str(out), "--device", "cpu"],
                       cwd=ROOT, env=python_env(), capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr
    _, meta = feature_cnn.load_classifier(out, "mnist")
    assert meta["test_accuracy"] >= 0.99, meta
    assert meta["steps"] == round(feature_cnn.RECIPES["mnist"]["epochs"] * (60000 // 128))


def test_cached_arrays_recompute_a_damaged_or_foreign_cache(tmp_path, capsys):
    cache, calls = tmp_path / "stats" / "ref.npz", []

    def compute(value=1.0):
        calls.append(value)
        return {"mu": np.full(4, value), "sigma": np.eye(4) * value}

    first = metrics.cached_arrays(cache, "key-a", compute)
    assert calls == [1.0] and cache.is_file()
    np.testing.assert_array_equal(metrics.cached_arrays(cache, "key-a", lambda: pytest.fail("recomputed"))["mu"],
                                  first["mu"])
    assert metrics.cached_stats(cache, "key-b", lambda: (np.zeros(4), np.eye(4)))[0].tolist() == [0] * 4  # foreign
    whole = cache.read_bytes()
    for damaged in (whole[:len(whole) // 2], whole[:40], b"", b"not a zip file at all"):
        cache.write_bytes(damaged)  # a kill while a foreign tool wrote it, a full disk, ...
        assert metrics.cached_arrays(cache, "key-a", lambda: compute(2.0))["mu"].tolist() == [2.0] * 4
        assert metrics.cached_arrays(cache, "key-a", lambda: pytest.fail("recomputed"))["mu"].tolist() == [2.0] * 4
    blocked = tmp_path / "a-file"  # a cache folder that cannot be made (as for a read-only data root, even as root)
    blocked.write_text("")
    out = metrics.cached_arrays(blocked / "ref.npz", "key-c", lambda: compute(3.0))
    assert out["mu"].tolist() == [3.0] * 4 and "warning: could not cache" in capsys.readouterr().out
