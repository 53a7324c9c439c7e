"""The data sets: the one table of their facts, loading a split into memory, verifying, unpacking, downloading.

Files live in torchvision's on-disk layout (``<root>/MNIST/raw/*-ubyte``,
``<root>/cifar-10-batches-py/*``). Compute nodes usually have no internet, so loading never downloads
unless asked; ``jobs.prepare_data`` (-> :func:`prepare_dataset`) fetches or unpacks the files once.
"""
import gzip
import os
import pickle
import shlex
import tarfile
from pathlib import Path

import numpy as np

from ddpm.errors import UserError

# The facts every layer needs about a data set. Importing this module does not import torch, so the
# config can validate against the table cheaply.
# train_size / test_size: the images of the official release; fewer loaded means a subset (see is_subset).
DATASETS = {
    "mnist": dict(channels=1, size=28, classes=10, class_names=tuple("0123456789"),
                  train_size=60_000, test_size=10_000),
    "cifar10": dict(channels=3, size=32, classes=10, class_names=(
        "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
        train_size=50_000, test_size=10_000),
}
_CIFAR_BATCH_ROWS = 10_000  # every official CIFAR-10 batch file holds exactly this many images
_CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def is_subset(name: str, n_images: int, train: bool = True) -> bool:
    """Whether a split of ``n_images`` is smaller than the official one: numbers measured on it (classifier
    accuracy, feature-FID) are not comparable with full-data numbers."""
    return n_images < DATASETS[name]["train_size" if train else "test_size"]


def _check_name(name: str) -> str:
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)} (data.dataset=...)")
    return name


def _prepare_cmd(name: str, root: Path) -> str:
    return f"python -m jobs.prepare_data --dataset {name} --root {shlex.quote(str(root))}"


def _corrupt(path: Path, reason: str, name: str, root: Path) -> UserError:
    reason = " ".join(str(reason).split())[:200]  # one line, even for multi-line library errors
    return UserError(f"{path} is corrupt or truncated ({reason}): delete it and re-run '{_prepare_cmd(name, root)}'")


def load_dataset(name: str, root, train: bool = True, download: bool = False):
    """Load a whole split into memory.

    Returns torch tensors: images uint8 (N, C, H, W) contiguous and labels int64 (N,), both on CPU.
    download=True fetches missing files first (needs internet; run it on one process only).
    Raises UserError for a missing, corrupt or unknown data set, naming the fix.
    """
    name, root = _check_name(name), Path(root).expanduser()
    load = _load_mnist if name == "mnist" else _load_cifar10
    try:
        return load(root, train)
    except UserError:
        if not download:
            raise
    prepare_dataset(name, root, offline=False)
    return load(root, train)


# ----------------------------------------------------------------------------------------- MNIST
def _load_mnist(root: Path, train: bool):
    raw = root / "MNIST" / "raw"
    prefix = "train" if train else "t10k"
    image_file, label_file = raw / f"{prefix}-images-idx3-ubyte", raw / f"{prefix}-labels-idx1-ubyte"
    for path in (image_file, label_file):
        if not path.is_file():
            raise UserError(_mnist_missing_message(root, still_compressed=path.with_name(path.name + ".gz").is_file()))
    from torchvision.datasets import mnist as tv_mnist  # only now: importing torchvision takes seconds

    images = _read_idx(image_file, tv_mnist.read_image_file, root)
    labels = _read_idx(label_file, tv_mnist.read_label_file, root)
    if tuple(images.shape[1:]) != (28, 28):
        raise _corrupt(image_file, f"images are {tuple(images.shape[1:])}, expected (28, 28)", "mnist", root)
    if len(labels) != len(images) or len(labels) == 0 or labels.min() < 0 or labels.max() >= 10:
        raise _corrupt(label_file, f"{len(labels)} labels in [0, 10) expected for {len(images)} images", "mnist", root)
    return images.unsqueeze(1).contiguous(), labels.long()


def _read_idx(path: Path, reader, root: Path):
    try:
        return reader(str(path))
    # A damaged IDX file fails in many ways (AssertionError on the magic, RuntimeError from .view on a
    # short buffer, KeyError on an unknown type code); every one of them means "this file is bad".
    except Exception as e:
        raise _corrupt(path, f"{type(e).__name__}: {e}", "mnist", root) from e


def _mnist_missing_message(root: Path, still_compressed: bool) -> str:
    raw, cmd = root / "MNIST" / "raw", _prepare_cmd("mnist", root)
    if still_compressed:
        return f"MNIST in {raw} is not unpacked yet (only .gz files): run '{cmd} --offline' to verify and unpack it, or set data.download=true"
    return (f"MNIST not found in {raw}: run '{cmd}' on a machine with internet (e.g. the login node), or copy the "
            f"four official .gz files into {raw}/ and run the same command with --offline, or set data.download=true")


def _unpack_mnist(root: Path, offline: bool, first_error: UserError) -> None:
    """Verify the .gz files against torchvision's md5s (downloading them unless offline) and unpack them."""
    raw, cmd = root / "MNIST" / "raw", _prepare_cmd("mnist", root)
    if offline and not any(raw.glob("*.gz")):
        raise first_error
    from torchvision.datasets import MNIST
    from torchvision.datasets.utils import check_integrity

    have = {gz: (raw / gz).is_file() and check_integrity(str(raw / gz), md5) for gz, md5 in MNIST.resources}
    if offline and not all(have.values()):
        bad = [gz for gz, ok in have.items() if not ok and (raw / gz).is_file()]
        if bad:
            raise UserError(f"{raw / bad[0]} does not match the official md5 (corrupt or not MNIST): replace it with the official file and re-run '{cmd} --offline'")
        missing = ", ".join(gz for gz, ok in have.items() if not ok)
        raise UserError(f"MNIST files missing from {raw}: {missing}: copy them there and re-run '{cmd} --offline', or run '{cmd}' on a machine with internet")
    for gz, md5 in MNIST.resources:
        if not have[gz]:
            _download([m + gz for m in MNIST.mirrors], raw, gz, md5, cmd)
        tmp = raw / (gz[:-3] + ".tmp")
        with gzip.open(raw / gz, "rb") as src, open(tmp, "wb") as dst:
            dst.write(src.read())
        os.replace(tmp, raw / gz[:-3])  # a killed unpack never leaves a half file under the final name


# -------------------------------------------------------------------------------------- CIFAR-10
def _load_cifar10(root: Path, train: bool):
    # Read the pickles ourselves: torchvision's CIFAR10 insists on the official md5 of every file (so a
    # tiny test set can never load) and then reads them without saying which file is broken.
    from torchvision.datasets import CIFAR10

    folder = root / CIFAR10.base_folder
    files = CIFAR10.train_list if train else CIFAR10.test_list
    if not all((folder / f).is_file() for f, _ in files):
        cmd = _prepare_cmd("cifar10", root)
        raise UserError(f"CIFAR-10 not found in {folder}: run '{cmd}' on a machine with internet (e.g. the login node), or "
                        f"copy {CIFAR10.filename} into {root}/ and run the same command with --offline, or set data.download=true")
    parts = [_read_cifar_batch(folder / f, root) for f, _ in files]  # each file readable, or named
    _refuse_a_mix(folder, root)
    from torchvision.datasets.utils import check_integrity

    # A structurally valid file of official size but the wrong md5 is a damaged real download; smaller
    # files are subsets (like ../shared/data/cifar10, or test fixtures) that no official checksum fits.
    for (f, md5), (data, _) in zip(files, parts):
        if len(data) == _CIFAR_BATCH_ROWS and not check_integrity(str(folder / f), md5):
            raise _corrupt(folder / f, f"md5 differs from the official {md5}", "cifar10", root)
    images = np.concatenate([p[0] for p in parts]).reshape(-1, 3, 32, 32)  # rows are already CHW
    labels = np.concatenate([p[1] for p in parts])
    import torch

    return torch.from_numpy(images), torch.from_numpy(labels)


def _read_cifar_batch(path: Path, root: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")  # the official files are Python 2 pickles
        entry = {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}
        data = np.asarray(entry["data"])
        labels = np.asarray(entry["labels"] if "labels" in entry else entry["fine_labels"], dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(f"data is {data.dtype} {data.shape}, expected uint8 (N, 3072)")
        if labels.shape != (len(data),) or len(data) == 0 or labels.min() < 0 or labels.max() >= 10:
            raise ValueError(f"{labels.shape[0]} labels in [0, 10) expected for {len(data)} images")
    # Unpickling damaged bytes can raise almost anything (UnpicklingError, EOFError, KeyError, ...).
    except Exception as e:
        raise _corrupt(path, f"{type(e).__name__}: {e}", "cifar10", root) from e
    return data, labels


def _refuse_a_mix(folder: Path, root: Path) -> None:
    """Official files and subset files side by side: the splits would mix two data sets. Told by size alone
    (an official file holds 10,000 rows of 3,072 bytes), so loading one split checks the other one too.
    Runs after the split's own files were read, so a truncated file of a full download is named as such."""
    present = [folder / f for f in _CIFAR_FILES if (folder / f).is_file()]
    full = [p.name for p in present if p.stat().st_size >= _CIFAR_BATCH_ROWS * 3072]
    if full and len(full) < len(present):
        cut = [p.name for p in present if p.name not in full]
        raise UserError(f"{folder} mixes official full-size batch files ({', '.join(full)}) with smaller subset files "
                        f"({', '.join(cut)}): use one complete copy (delete the folder and re-run "
                        f"'{_prepare_cmd('cifar10', root)}') or a folder of subset files only")


def _unpack_cifar10(root: Path, offline: bool, first_error: UserError) -> None:
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import check_integrity

    tar, cmd = root / CIFAR10.filename, _prepare_cmd("cifar10", root)
    if not check_integrity(str(tar), CIFAR10.tgz_md5):
        if offline and tar.is_file():
            raise UserError(f"{tar} does not match the official md5 (corrupt or truncated): replace it and re-run '{cmd} --offline'")
        if offline:
            raise first_error
        _download([CIFAR10.url], root, CIFAR10.filename, CIFAR10.tgz_md5, cmd)
    with tarfile.open(tar, "r:gz") as t:
        t.extractall(root, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))


# ------------------------------------------------------------------------------------- preparing
def _download(urls: list[str], folder: Path, filename: str, md5: str, cmd: str) -> None:
    from torchvision.datasets.utils import download_url

    errors = []
    for url in urls:
        try:
            download_url(url, str(folder), filename, md5)  # re-fetches a present file with a wrong md5
            return
        except (OSError, RuntimeError) as e:  # URLError is an OSError
            errors.append(f"{url}: {' '.join(str(e).split())}")
    raise UserError(f"could not download {filename} ({'; '.join(errors)}): this node may have no internet; run "
                    f"'{cmd}' on the login node, or copy {filename} into {folder}/ and add --offline")


def prepare_dataset(name: str, root, offline: bool = False) -> dict:
    """Make both splits of `name` loadable under `root` without network access later.

    Files that already load are only verified. Otherwise the official archives are checked against
    torchvision's md5s and unpacked; missing ones are downloaded unless offline=True.
    Returns {"dataset", "path", "train", "test", "shape", "subset"} (split sizes in images, shape (C, H, W),
    subset: either split is smaller than the official release).
    """
    name, root = _check_name(name), Path(root).expanduser()
    try:
        return _summary(name, root)
    except UserError as e:
        first_error = e
    (_unpack_mnist if name == "mnist" else _unpack_cifar10)(root, offline, first_error)
    return _summary(name, root)


def _summary(name: str, root: Path) -> dict:
    sizes = {split: load_dataset(name, root, train=split == "train")[0].shape for split in ("train", "test")}
    path = root / "MNIST" / "raw" if name == "mnist" else root / "cifar-10-batches-py"
    train, test = sizes["train"][0], sizes["test"][0]
    return dict(dataset=name, path=str(path), train=train, test=test, shape=tuple(sizes["train"][1:]),
                subset=is_subset(name, train) or is_subset(name, test, train=False))
