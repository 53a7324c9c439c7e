"""A tiny CIFAR-10 in the official on-disk layout (<root>/cifar-10-batches-py/*), for offline tests.

The real files cannot be downloaded in tests; these have the same pickled structure (bytes keys as
the official Python 2 pickles show under encoding="bytes") but fewer rows and random pixels.
"""
import pickle
from pathlib import Path

import numpy as np

LABEL_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _write_batch(path: Path, data: np.ndarray, labels: np.ndarray, name: str) -> None:
    entry = {b"batch_label": name.encode(), b"labels": [int(v) for v in labels], b"data": data,
             b"filenames": [f"img_{i:05d}.png".encode() for i in range(len(data))]}
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=2)


def make_tiny_cifar(root, n_per_batch: int = 8, n_test: int | None = None, seed: int = 0) -> dict:
    """Write data_batch_1..5, test_batch and batches.meta under root/cifar-10-batches-py.

    Returns {"train_images", "train_labels", "test_images", "test_labels"}: uint8 (N, 3, 32, 32) and
    int64 (N,) numpy arrays, in file order (what load_dataset must return).
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    splits = [("train", [f"data_batch_{i}" for i in range(1, 6)], n_per_batch), ("test", ["test_batch"], n_test or n_per_batch)]
    for split, files, n in splits:
        images, labels = [], []
        for k, name in enumerate(files):
            data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
            lab = (np.arange(n) + k) % 10
            _write_batch(folder / name, data, lab, f"{split} batch {k + 1} of {len(files)}")
            images.append(data.reshape(n, 3, 32, 32))
            labels.append(lab.astype(np.int64))
        out[f"{split}_images"], out[f"{split}_labels"] = np.concatenate(images), np.concatenate(labels)
    meta = {b"num_cases_per_batch": n_per_batch, b"label_names": [s.encode() for s in LABEL_NAMES], b"num_vis": 3072}
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return out
