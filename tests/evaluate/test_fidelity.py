"""ddpm.evaluate.fidelity and ddpm.evaluate.metrics against torch-fidelity: our feature statistics and
Fréchet distance agree with torch-fidelity's on the same features; the Inception metrics' plumbing with a
randomly initialised weights file of the same architecture (reference features of the training split,
cached under the weights' hash; limits: the reference itself has FID 0 and precision = recall = 1); and
weights files that are missing, damaged, foreign or unsafe give one line (UserError) and run nothing."""
import importlib.util

import numpy as np
import pytest
import torch

from ddpm.data.datasets import load_dataset
from ddpm.errors import UserError
from ddpm.evaluate import feature_cnn, fidelity, metrics

pytestmark = pytest.mark.usefixtures("one_thread")
# torch-fidelity is a dependency of the package, but a machine may lack it (the lent GPU image does): only
# the tests that need it skip there.
needs_torch_fidelity = pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is None,
                                          reason="torch-fidelity is not installed")


@needs_torch_fidelity
def test_statistics_and_frechet_distance_agree_with_torch_fidelity(untrained_classifier, mnist_root):
    """1e-6 relative on full-rank features: correlated Gaussians and the feature-FID classifier's own
    128-d features of real MNIST images (train vs test)."""
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(64, 64))
    a = rng.normal(size=(2000, 64)) @ mix
    b = rng.normal(size=(1500, 64)) @ (mix + 0.3 * rng.normal(size=(64, 64))) + 0.5
    net, _ = feature_cnn.load_classifier(untrained_classifier, "mnist")
    train, _ = load_dataset("mnist", mnist_root, train=True)
    test, _ = load_dataset("mnist", mnist_root, train=False)
    real = (feature_cnn.classify(net, train[:1500])[1].double().numpy(),
            feature_cnn.classify(net, test[:1000])[1].double().numpy())
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    def theirs(x, y) -> float:
        return fid_statistics_to_metric(fid_features_to_statistics(torch.from_numpy(x)),
                                        fid_features_to_statistics(torch.from_numpy(y)), False)["frechet_inception_distance"]

    for x, y in ((a, b), real, (a, a[::-1].copy())):
        ours, stats = metrics.feature_stats(x), fid_features_to_statistics(torch.from_numpy(x))
        np.testing.assert_allclose(ours[0], stats["mu"], rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(ours[1], stats["sigma"], rtol=1e-6, atol=1e-12)
        d = metrics.frechet_distance(*ours, *metrics.feature_stats(y))
        assert d == pytest.approx(theirs(x, y), rel=1e-6, abs=1e-6)
    assert metrics.frechet_distance(*metrics.feature_stats(a), *metrics.feature_stats(b)) > 1


@needs_torch_fidelity
def test_bad_weights_files_give_one_line(tmp_path, mnist_root):
    def refused(path, message):
        with pytest.raises(UserError, match=message) as e:
            fidelity.InceptionMetrics(path, "cpu", "mnist", mnist_root)
        assert "\n" not in str(e.value) and fidelity.WEIGHTS_NAME in str(e.value)

    refused(tmp_path / "missing.pth", "cannot read Inception weights")
    (tmp_path / "junk.pth").write_text("hello")
    refused(tmp_path / "junk.pth", "not a plain tensor state dict")
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "foreign.pth")
    refused(tmp_path / "foreign.pth", "is not torch-fidelity's InceptionV3 state dict")
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    refused(tmp_path / "list.pth", "hold a list, not a state dict")
    from torchvision.models import inception_v3  # torchvision's Inception: another architecture's keys

    torch.save(inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict(), tmp_path / "tv.pth")
    refused(tmp_path / "tv.pth", "is not torch-fidelity's InceptionV3 state dict")
    # A pickle that would run code when loaded without weights_only: refused, and never executed.
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    marker.unlink(missing_ok=True)  # torch.save itself does not run it, but be sure
    refused(tmp_path / "evil.pth", "not a plain tensor state dict")
    assert not marker.exists()


def test_inception_metrics_plumbing(random_inception_weights, mnist_root, monkeypatch):
    lines = []
    monkeypatch.setattr(fidelity, "PROGRESS", 10)  # progress lines from 10 images on (batch logs: no terminal)
    inc = fidelity.InceptionMetrics(random_inception_weights, "cpu", "mnist", mnist_root, reference_images=12,
                                    log=lines.append)
    train, _ = load_dataset("mnist", mnist_root, train=True)
    test, _ = load_dataset("mnist", mnist_root, train=False)
    seen, forward = [], inc.net.forward
    new_api = hasattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision")  # torch >= 2.9
    tf32 = (lambda: torch.backends.cudnn.conv.fp32_precision) if new_api else (lambda: torch.backends.cudnn.allow_tf32)
    inc.net.forward = lambda x: (seen.append(tf32()), forward(x))[1]
    before = tf32()
    feats, logits = inc.features(test[:3])
    del inc.net.forward
    assert seen == ["ieee" if new_api else False] and tf32() == before  # no TF32 convolutions
    assert feats.shape == (3, 2048) and logits.shape == (3, 1008) and feats.dtype == torch.float32
    assert feats.std(0).mean() > 1e-3  # the calibrated random net gives features that differ
    same = inc.score(train[:12])  # the reference images themselves
    assert same["inception_fid"] == pytest.approx(0, abs=1e-6) and same["inception_score"] >= 1.0
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    assert any(x.startswith("Inception reference: features of 12 mnist training images, once (cached in ") for x in lines)
    assert any("Inception features of the training split: 12/12" in x for x in lines), lines
    assert any("Inception features of samples: 12/12" in x for x in lines), lines
    assert "12 of the 60000 mnist training images" in inc.comparable_note()  # flagged: not the papers' reference
    assert inc.describe()["comparable_note"] == inc.comparable_note()
    full = fidelity.InceptionMetrics(random_inception_weights, "cpu", "mnist", mnist_root, split_size=60000)
    subset = fidelity.InceptionMetrics(random_inception_weights, "cpu", "cifar10", mnist_root, split_size=5170)
    assert full.comparable_note() is None and "5170 of the 50000 cifar10" in subset.comparable_note()
    other = inc.score(test[:12])
    # KID is unbiased: a set against itself is below 0 (the diagonal is left out), another set above it
    assert other["inception_fid"] > 1 and np.isfinite(same["kid"]) and other["kid"] > same["kid"]
    # the reference is the training split, cached next to the data under the weights' hash
    cache = mnist_root / "fidelity" / f"mnist_train12_inception-{inc.sha256[:12]}.npz"
    assert inc.cache_path() == cache and cache.is_file()
    with np.load(cache) as z:
        assert z["features"].shape == (12, 2048) and z["sigma"].shape == (2048, 2048)
        np.testing.assert_array_equal(z["features"], inc.features(train[:12])[0].numpy())
    monkeypatch.setattr(fidelity.InceptionMetrics, "features", lambda *a: pytest.fail("recomputed"), raising=True)
    again = fidelity.InceptionMetrics(random_inception_weights, "cpu", "mnist", mnist_root, reference_images=12)
    assert again.reference()["mu"].shape == (2048,)  # from the cache, without a forward pass
    # small counts: KID over all the samples there are, precision/recall need 4 (3 neighbours + itself)
    monkeypatch.undo()
    few = inc.score(test[:3])
    assert few["inception_fid"] is not None and few["kid"] is not None and few["precision"] is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/gpu_check.sh runs it)")
def test_inception_features_on_cuda_match_the_cpu(random_inception_weights, tmp_path, monkeypatch):
    """The CUDA path, in full float32 (no TF32 convolutions), gives the CPU's features to float32 rounding,
    and the same scores (precision/recall's distances on the GPU)."""
    images = torch.randint(0, 256, (70, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    on_cpu = fidelity.InceptionMetrics(random_inception_weights, "cpu", "cifar10", tmp_path)
    on_gpu = fidelity.InceptionMetrics(random_inception_weights, "cuda", "cifar10", tmp_path)
    cpu, gpu = on_cpu.features(images), on_gpu.features(images)
    for a, b in zip(cpu, gpu):
        assert b.device.type == "cpu" and b.dtype == torch.float32
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    real = cpu[0][30:].numpy()  # the last 40 images stand in for the training split (no data set needed)
    reference = {"features": real, **dict(zip(("mu", "sigma"), metrics.feature_stats(real)))}
    for inc in (on_cpu, on_gpu):
        monkeypatch.setattr(inc, "reference", lambda: reference)
    a, b = on_cpu.score(images[:30]), on_gpu.score(images[:30])
    assert b["inception_fid"] == pytest.approx(a["inception_fid"], rel=1e-3) and b.keys() == a.keys()
    assert (b["precision"], b["recall"]) == pytest.approx((a["precision"], a["recall"]), abs=0.04)
