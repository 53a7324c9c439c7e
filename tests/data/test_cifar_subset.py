"""The CIFAR-10 loader on real bytes: the subset of the official batch files in ../shared/data/cifar10.

The subset is read-only (in CI too): tests that change files work on copies in tmp_path.
"""
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from ddpm.data.batcher import StepBatcher
from ddpm.data.datasets import DATASETS, load_dataset, prepare_dataset
from ddpm.errors import UserError

from conftest import ROOT

FIRST_LABELS = [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]  # data_batch_1 of the official release
OFFICIAL_MEANS = (0.4914, 0.4822, 0.4465)  # channel means of all 50,000 training images


def test_the_real_subset_loads_with_the_official_labels(cifar_subset):
    images, labels = load_dataset("cifar10", cifar_subset, train=True)
    assert images.shape == (5170, 3, 32, 32) and images.dtype == torch.uint8 and images.is_contiguous()
    assert labels.dtype == torch.int64 and labels[:10].tolist() == FIRST_LABELS
    assert sorted(set(labels.tolist())) == list(range(10))
    assert labels.bincount().min() >= 400  # a prefix of shuffled batches is nearly balanced
    first_file = images[:1102].double().div(255).mean(dim=(0, 2, 3))
    assert first_file.tolist() == pytest.approx([0.491, 0.484, 0.446], abs=2e-3)
    assert images.double().div(255).mean(dim=(0, 2, 3)).tolist() == pytest.approx(OFFICIAL_MEANS, abs=1e-2)
    test_images, test_labels = load_dataset("cifar10", cifar_subset, train=False)
    assert test_images.shape == (1017, 3, 32, 32) and test_labels.shape == (1017,)
    # Rows are CHW: a real photo's red plane differs from its blue plane, and neighbouring pixels are close
    # (a wrong reshape would put unrelated pixels side by side).
    img = images[0].double()
    assert (img[0] - img[2]).abs().mean() > 5
    assert (img[:, :, 1:] - img[:, :, :-1]).abs().mean() < 0.5 * (img - img.mean()).abs().mean()


def test_horizontal_flips_on_real_images(cifar_subset):
    images, labels = load_dataset("cifar10", cifar_subset, train=True)
    x, y = StepBatcher(images, labels, 64, seed=3, hflip=True).batch(5)
    u8 = x.add(1).mul(127.5).round().to(torch.uint8)
    flat, flipped = images.flatten(1), images.flip(-1).flatten(1)
    kinds = []
    for img, label in zip(u8.flatten(1), y):
        plain, mirror = (flat == img).all(1).nonzero(), (flipped == img).all(1).nonzero()
        assert len(plain) + len(mirror) == 1  # exactly one training image, as stored or mirrored
        index = (plain if len(plain) else mirror).item()
        assert labels[index] == label
        kinds.append(bool(len(mirror)))
    assert 10 < sum(kinds) < 54  # about half of the 64 are flipped


def test_prepare_data_reports_the_subset_offline(cifar_subset):
    r = subprocess.run([sys.executable, "-m", "jobs.prepare_data", "--dataset", "cifar10", "--root", str(cifar_subset),
                        "--offline"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "train:   5170 images (3x32x32 uint8), a subset of the official 50000" in r.stdout
    assert "test:    1017 images, a subset of the official 10000" in r.stdout
    assert "not comparable with full-data numbers" in r.stdout and r.stdout.rstrip().endswith("OK")
    info = prepare_dataset("cifar10", cifar_subset, offline=True)
    assert (info["train"], info["test"], info["subset"]) == (5170, 1017, True)
    assert DATASETS["cifar10"]["train_size"] == 50_000 and DATASETS["cifar10"]["test_size"] == 10_000


@pytest.fixture
def subset_copy(cifar_subset, tmp_path):
    shutil.copytree(cifar_subset / "cifar-10-batches-py", tmp_path / "cifar-10-batches-py")
    for p in (tmp_path / "cifar-10-batches-py").iterdir():
        p.chmod(0o644)
    return tmp_path


def _rewrite(path, **changes):
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    entry.update(changes)
    path.write_bytes(pickle.dumps(entry, protocol=4))


def _read(path, key):
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")[key]


def _full_size_file(path):
    entry = {b"data": np.zeros((10_000, 3072), np.uint8), b"labels": [0] * 10_000}
    path.write_bytes(pickle.dumps(entry, protocol=4))


def _prepare(root):
    return subprocess.run([sys.executable, "-m", "jobs.prepare_data", "--dataset", "cifar10", "--root", str(root),
                           "--offline"], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("damage,message", [
    ("truncated", "corrupt or truncated"),
    ("labels", "labels in [0, 10)"),
    ("width", "expected uint8 (N, 3072)"),
])
def test_a_damaged_batch_file_is_one_line_naming_it_and_the_fix(subset_copy, damage, message):
    path = subset_copy / "cifar-10-batches-py" / "data_batch_2"
    if damage == "truncated":  # cut in the middle of image 500 (the pixels start after the 1,017 labels)
        data = path.read_bytes()
        start = data.index(_read(path, "data")[:2].tobytes())
        path.write_bytes(data[:start + 3072 * 500 + 1536])
    elif damage == "labels":
        _rewrite(path, labels=_read(path, "labels")[:-1] + [10])
    else:
        _rewrite(path, data=np.ascontiguousarray(_read(path, "data")[:, :3000]))
    r = _prepare(subset_copy)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert str(path) in lines[0] and message in lines[0] and "delete it and re-run" in lines[0]


def test_a_mix_of_full_and_subset_files_is_refused(subset_copy):
    full = subset_copy / "cifar-10-batches-py" / "data_batch_4"
    _full_size_file(full)
    r = _prepare(subset_copy)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "mixes" in lines[0] and "data_batch_4" in lines[0] and "data_batch_1" in lines[0]
    # A test split in full next to a training subset is a mix too, even when only the test split is read.
    _rewrite(full, labels=[0] * 1017, data=np.zeros((1017, 3072), np.uint8))
    _full_size_file(subset_copy / "cifar-10-batches-py" / "test_batch")
    with pytest.raises(UserError, match="mixes"):
        load_dataset("cifar10", subset_copy, train=False)


def test_a_damaged_full_download_is_still_caught(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        _full_size_file(folder / name)  # the official row count, not the official bytes
    with pytest.raises(UserError, match=r"data_batch_1 is corrupt or truncated \(md5 differs from the official"):
        load_dataset("cifar10", tmp_path, train=True)
