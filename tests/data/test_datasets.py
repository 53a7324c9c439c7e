"""ddpm.data.datasets / ddpm.data.batcher: loading (real MNIST, tiny CIFAR-10, missing / corrupt files) and the step-indexed batcher."""
import gzip
import shutil
import tarfile
import time

import pytest
import torch

from ddpm.data.batcher import StepBatcher
from ddpm.data.datasets import DATASETS, load_dataset, prepare_dataset
from ddpm.data.images import to_unit
from ddpm.errors import UserError

from tiny_cifar import make_tiny_cifar

MNIST_NORM = (0.1307, 0.3081)


@pytest.fixture(scope="module")
def mnist_train(mnist_root):
    t0 = time.perf_counter()
    images, labels = load_dataset("mnist", mnist_root, train=True)
    return images, labels, time.perf_counter() - t0


def _toy(n=50, c=1, size=4, seed=0):
    """Random images; label i == index i, so a batch's y says exactly which images it holds."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, size, size), generator=g, dtype=torch.uint8), torch.arange(n)


# ------------------------------------------------------------------------------------ loading
def test_mnist_train_is_the_real_data_and_loads_fast(mnist_train):
    images, labels, seconds = mnist_train
    assert images.shape == (60000, 1, 28, 28) and images.dtype == torch.uint8 and images.is_contiguous()
    assert labels.shape == (60000,) and labels.dtype == torch.int64
    assert labels[:5].tolist() == [5, 0, 4, 1, 9]
    assert abs(images.float().mean().item() / 255 - 0.1307) < 1e-3
    assert seconds < 5, f"loading unpacked MNIST took {seconds:.1f} s"


def test_mnist_test_split(mnist_root):
    images, labels = load_dataset("mnist", mnist_root, train=False)
    assert images.shape == (10000, 1, 28, 28) and labels.shape == (10000,)
    assert labels[:5].tolist() == [7, 2, 1, 0, 4]


def test_datasets_table():
    assert DATASETS["mnist"] == dict(channels=1, size=28, classes=10, class_names=tuple("0123456789"),
                                     train_size=60_000, test_size=10_000)
    assert DATASETS["cifar10"] == dict(channels=3, size=32, classes=10, class_names=(
        "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
        train_size=50_000, test_size=10_000)


def test_unknown_dataset_lists_choices(tmp_path):
    with pytest.raises(UserError, match="mnist, cifar10"):
        load_dataset("imagenet", tmp_path)


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_missing_data_says_how_to_get_it(tmp_path, name):
    with pytest.raises(UserError) as e:
        load_dataset(name, tmp_path)
    msg = str(e.value)
    assert "prepare_data" in msg and f"--dataset {name}" in msg and "--offline" in msg and "data.download=true" in msg
    assert "\n" not in msg


def test_mnist_gz_only_asks_for_offline_unpack(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]:
        (raw / name).write_bytes(b"")
    with pytest.raises(UserError, match=r"not unpacked.*--offline"):
        load_dataset("mnist", tmp_path)


def _copy_mnist_test_split(src_root, dst_root):
    raw = dst_root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]:
        shutil.copy(src_root / "MNIST" / "raw" / name, raw / name)
    return raw


@pytest.mark.parametrize("file, damage", [
    ("t10k-images-idx3-ubyte", "truncate"),
    ("t10k-labels-idx1-ubyte", "truncate"),
    ("t10k-images-idx3-ubyte", "garbage"),
])
def test_corrupt_mnist_file_is_named(mnist_root, tmp_path, file, damage):
    raw = _copy_mnist_test_split(mnist_root, tmp_path)
    path = raw / file
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"this is not an IDX file")
    with pytest.raises(UserError) as e:
        load_dataset("mnist", tmp_path, train=False)
    msg = str(e.value)
    assert str(path) in msg and "corrupt" in msg and "delete it" in msg and "prepare_data" in msg
    assert "\n" not in msg


def test_tiny_cifar_loads(tmp_path):
    ref = make_tiny_cifar(tmp_path, n_per_batch=6, n_test=4)
    images, labels = load_dataset("cifar10", tmp_path, train=True)
    assert images.shape == (30, 3, 32, 32) and images.dtype == torch.uint8 and images.is_contiguous()
    assert labels.dtype == torch.int64
    assert torch.equal(images, torch.from_numpy(ref["train_images"]))
    assert labels.tolist() == ref["train_labels"].tolist()
    images, labels = load_dataset("cifar10", tmp_path, train=False)
    assert images.shape == (4, 3, 32, 32) and torch.equal(images, torch.from_numpy(ref["test_images"]))
    assert labels.tolist() == ref["test_labels"].tolist()


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_tiny_cifar_batch_is_named(tmp_path, damage):
    make_tiny_cifar(tmp_path, n_per_batch=6)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x80\x02garbage")
    with pytest.raises(UserError) as e:
        load_dataset("cifar10", tmp_path, train=True)
    assert str(path) in str(e.value) and "prepare_data" in str(e.value)


def test_prepare_dataset_verifies_present_files_offline(tmp_path):
    make_tiny_cifar(tmp_path, n_per_batch=3, n_test=5)
    info = prepare_dataset("cifar10", tmp_path, offline=True)
    assert (info["train"], info["test"], info["shape"], info["subset"]) == (15, 5, (3, 32, 32), True)


def test_prepare_dataset_rejects_a_wrong_archive_offline(tmp_path):
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz"):
        pass
    with pytest.raises(UserError, match="official md5"):
        prepare_dataset("cifar10", tmp_path, offline=True)


def test_prepare_dataset_unpacks_mnist_gz_offline(mnist_root, tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]:
        shutil.copy(mnist_root / "MNIST" / "raw" / (name + ".gz"), raw / (name + ".gz"))
    (raw / "t10k-labels-idx1-ubyte").write_bytes(b"truncated")  # a stale broken unpack gets replaced
    info = prepare_dataset("mnist", tmp_path, offline=True)
    assert (info["train"], info["test"], info["shape"]) == (60000, 10000, (1, 28, 28))
    with gzip.open(raw / "t10k-labels-idx1-ubyte.gz") as f:
        assert (raw / "t10k-labels-idx1-ubyte").read_bytes() == f.read()


# ----------------------------------------------------------------------------------- batching
def test_batch_is_a_pure_function_of_seed_step_rank():
    images, labels = _toy()
    a = StepBatcher(images, labels, global_batch=8, seed=3, hflip=True)
    b = StepBatcher(images, labels, global_batch=8, seed=3, hflip=True)
    for step in [0, 5, 17, 6, 0]:  # out of order and across epochs: the cache must not leak state
        xa, ya = a.batch(step)
        xb, yb = StepBatcher(images, labels, global_batch=8, seed=3, hflip=True).batch(step)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        b.batch(step + 11)
    assert not torch.equal(a.batch(1)[1], a.batch(2)[1])
    assert not torch.equal(a.batch(1)[1], StepBatcher(images, labels, 8, seed=4).batch(1)[1])


@pytest.mark.parametrize("hflip", [False, True])
@pytest.mark.parametrize("normalize", [None, MNIST_NORM])
def test_ranks_concatenated_equal_world_size_one(hflip, normalize):
    images, labels = _toy(n=50, c=3)
    one = StepBatcher(images, labels, 8, hflip=hflip, normalize=normalize, seed=1)
    two = [StepBatcher(images, labels, 8, world_size=2, rank=r, hflip=hflip, normalize=normalize, seed=1) for r in (0, 1)]
    for step in range(15):  # spans epochs 0..2 (6 steps per epoch)
        x, y = one.batch(step)
        parts = [t.batch(step) for t in two]
        assert parts[0][0].shape == (4, 3, 4, 4)
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)


@pytest.mark.parametrize("world_size", [1, 2])
def test_each_index_once_per_epoch(world_size):
    images, labels = _toy(n=50)
    batchers = [StepBatcher(images, labels, 8, world_size=world_size, rank=r) for r in range(world_size)]
    assert batchers[0].steps_per_epoch == 6
    epochs = []
    for e in range(2):
        seen = torch.cat([b.batch(s)[1] for s in range(6 * e, 6 * (e + 1)) for b in batchers])
        assert len(seen) == 48 and len(set(seen.tolist())) == 48
        epochs.append(seen)
    assert not torch.equal(epochs[0], epochs[1])


def test_epoch_of():
    b = StepBatcher(*_toy(n=50), global_batch=8)
    assert (b.epoch_of(0), b.epoch_of(6), b.epoch_of(9)) == (0.0, 1.0, 1.5)


def test_hflip_flips_some_images_horizontally():
    images, labels = _toy(n=64, size=5)
    x, y = StepBatcher(images, labels, 64, hflip=True).batch(0)
    u8 = images[y].float() / 127.5 - 1
    same = torch.isclose(x, u8, atol=1e-6).flatten(1).all(1)
    flipped = torch.isclose(x, u8.flip(-1), atol=1e-6).flatten(1).all(1)
    assert (same | flipped).all() and same.sum() > 10 and flipped.sum() > 10


def test_normalisation_values_and_to_unit():
    images, labels = _toy(n=16)
    images[0] = 0
    images[1] = 255
    x, y = StepBatcher(images, labels, 16, normalize=None).batch(0)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.allclose(x, images[y].float() / 127.5 - 1, atol=1e-6)  # float32 rounding
    assert x.min() == -1 and x.max() == 1
    assert torch.allclose(to_unit(x, None), images[y].float() / 255, atol=1e-6)
    x, y = StepBatcher(images, labels, 16, normalize=MNIST_NORM).batch(0)
    assert torch.allclose(x, (images[y].float() / 255 - 0.1307) / 0.3081, atol=1e-6)
    assert torch.allclose(to_unit(x, MNIST_NORM), images[y].float() / 255, atol=1e-6)
    assert to_unit(torch.tensor([-3.0, 3.0]), None).tolist() == [0.0, 1.0]


def test_mnist_normalised_mean_is_zero(mnist_train):
    images, labels, _ = mnist_train
    x, _ = StepBatcher(images, labels, 10000, normalize=MNIST_NORM, seed=0).batch(0)
    assert abs(x.mean().item()) < 0.01 and abs(x.std().item() - 1) < 0.05


def test_batch_not_divisible_by_world_size():
    with pytest.raises(UserError, match=r"train.batch_size=130 is not divisible by the world size 4; choose a multiple of 4"):
        StepBatcher(*_toy(n=500), global_batch=130, world_size=4)


def test_data_smaller_than_one_batch():
    with pytest.raises(UserError, match="fewer than one batch"):
        StepBatcher(*_toy(n=10), global_batch=16)


def test_tiny_cifar_through_the_batcher(tmp_path):
    make_tiny_cifar(tmp_path, n_per_batch=4)
    images, labels = load_dataset("cifar10", tmp_path)
    x, y = StepBatcher(images, labels, 10, hflip=True).batch(3)
    assert x.shape == (10, 3, 32, 32) and -1 <= x.min() and x.max() <= 1 and y.max() < 10


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_equal_cpu_batches():
    # Permutations and flips come from CPU generators, so the device does not change the data order.
    images, labels = _toy(n=50, c=3)
    cpu = StepBatcher(images, labels, 8, hflip=True, seed=2)
    gpu = StepBatcher(images, labels, 8, hflip=True, seed=2, device="cuda")
    assert gpu.images.is_cuda
    for step in [0, 7, 13]:
        (xc, yc), (xg, yg) = cpu.batch(step), gpu.batch(step)
        assert xg.is_cuda and torch.equal(xg.cpu(), xc) and torch.equal(yg.cpu(), yc)
