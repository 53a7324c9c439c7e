"""The small CNN classifier behind label accuracy and feature-FID: its recipe, training, file and inference.

The classifier (``FeatureCNN``) is trained once per data set by ``jobs.train_classifier`` and cached as
``DATA_ROOT/classifiers/<dataset>_cnn.pt``. It serves two metrics for generated samples: label accuracy
(does the sample show the requested class?) and feature-FID, the Fréchet distance between Gaussians fitted
to its 128-d penultimate features of the samples and of the test set. The test-set statistics are cached
next to the classifier (``<name>.test_stats.npz``), keyed by the classifier file's sha256.
(Not to be confused with the noisy classifier of classifier guidance, ``ddpm.nets.noisy_classifier``.)
Images enter as uint8 (N, C, H, W) tensors, exactly as the data set stores them, so real and generated
images are quantised the same way.
"""
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ddpm.data.batcher import StepBatcher
from ddpm.data.datasets import DATASETS, is_subset, load_dataset
from ddpm.errors import UserError
from ddpm.evaluate.metrics import accuracy, cached_stats, feature_stats, file_sha256
from ddpm.run.atomic import atomic_path

# Training recipe per data set; MNIST reaches >= 99 % test accuracy with it.
RECIPES = {"mnist": dict(width=32, epochs=3, lr=2e-3, batch_size=128, hflip=False),
           "cifar10": dict(width=64, epochs=15, lr=2e-3, batch_size=128, hflip=True)}
FEATURE_DIM = 128
BATCH = 500  # images per forward when classifying; bounded memory on any device


class FeatureCNN(nn.Module):
    """x: (B, C, S, S) in [-1, 1] → logits (B, num_classes); ``features`` gives the 128-d penultimate layer.

    Two Conv-BN-ReLU-MaxPool stages (width, 2·width channels), a 128-unit ReLU layer, dropout, a linear head.
    """

    def __init__(self, in_channels=1, image_size=28, num_classes=10, width=32):
        super().__init__()
        self.config = dict(in_channels=in_channels, image_size=image_size, num_classes=num_classes, width=width)
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(2 * width * (image_size // 4) ** 2, FEATURE_DIM), nn.ReLU())
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.dropout(self.body(x)))


def default_classifier_path(dataset: str, root) -> Path:
    """Where ``jobs.train_classifier`` caches the classifier of ``dataset`` (next to the data)."""
    return Path(root) / "classifiers" / f"{dataset}_cnn.pt"


def stats_path(classifier_path) -> Path:
    """The cached test-set feature statistics that belong to a classifier file."""
    p = Path(classifier_path)
    return p.with_name(p.stem + ".test_stats.npz")


def to_input(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) → float (N, C, H, W) in [-1, 1], the classifier's input."""
    return images_u8.float().div(127.5).sub(1.0)


def train_classifier(dataset: str, root, *, epochs: float | None = None, steps: int | None = None, seed: int = 0,
                     device="cpu", log=print) -> tuple[FeatureCNN, dict, torch.Tensor]:
    """Train the ``FeatureCNN`` of ``dataset`` on its training split, reproducibly.

    The batch order is ``StepBatcher``'s pure function of (seed, step), weights and dropout come from
    ``seed``, and deterministic algorithms are enforced, so the same call gives the same weights (on CPU).
    ``steps`` (if given) overrides the recipe's epochs, e.g. for quick tests. Returns (net in eval mode,
    meta dict with the recipe, the test accuracy and timings, the test split's features (N, 128), which
    :func:`reference_stats` can take instead of computing them again).
    """
    recipe = RECIPES[dataset]
    facts = DATASETS[dataset]
    channels, size, classes = facts["channels"], facts["size"], facts["classes"]
    images, labels = load_dataset(dataset, root, train=True)
    torch.manual_seed(seed)
    # channels_last: ~20 % faster convolutions on CPU (oneDNN) and on CUDA (tensor cores), same maths.
    net = FeatureCNN(channels, size, classes, recipe["width"]).to(device, memory_format=torch.channels_last)
    batcher = StepBatcher(images, labels, recipe["batch_size"], seed=seed, hflip=recipe["hflip"], device=device)
    epochs = recipe["epochs"] if epochs is None else epochs
    total = steps if steps is not None else max(1, round(epochs * batcher.steps_per_epoch))
    opt = torch.optim.Adam(net.parameters(), lr=recipe["lr"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe["lr"], total_steps=total, pct_start=0.15)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    t0 = time.perf_counter()
    try:
        net.train()
        for step in range(total):
            x, y = batcher.batch(step)
            loss = F.cross_entropy(net(x.contiguous(memory_format=torch.channels_last)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if (step + 1) % max(1, total // 10) == 0 or step + 1 == total:
                log(f"step {step + 1}/{total}  loss {loss.item():.4f}  ({time.perf_counter() - t0:.0f} s)")
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
    net.eval()
    test_images, test_labels = load_dataset(dataset, root, train=False)
    logits, features = classify(net, test_images, device)
    meta = dict(dataset=dataset, recipe=recipe, seed=seed, requested_steps=steps, steps=total,
                epochs=total / batcher.steps_per_epoch,
                test_accuracy=accuracy(logits, test_labels), train_seconds=time.perf_counter() - t0,
                torch=str(torch.__version__), train_images=len(images), test_images=len(test_images),
                subset=is_subset(dataset, len(images)) or is_subset(dataset, len(test_images), train=False))
    return net, meta, features


def subset_note(meta: dict) -> str | None:
    """A warning for classifiers trained or tested on a subset of the data set (None for full data)."""
    if not meta.get("subset"):
        return None
    facts = DATASETS[meta["dataset"]]
    return (f"the classifier was trained on a subset ({meta['train_images']} of {facts['train_size']} training images, "
            f"tested on {meta['test_images']} of {facts['test_size']}): its accuracy and feature-FID are not "
            f"comparable with those of a full-data classifier")


def save_classifier(path, net: FeatureCNN, meta: dict) -> None:
    """torch.save {"model", "config", "meta"} atomically (tmp + rename); loadable with weights_only=True."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save({"model": net.state_dict(), "config": net.config, "meta": meta}, tmp)


def load_classifier(path, dataset: str, device="cpu") -> tuple[FeatureCNN, dict]:
    """(net in eval mode, meta) from a file written by :func:`save_classifier`; UserError if it is missing,
    not such a file, or trained on another data set."""
    path = Path(path)
    fix = f"train it with: python -m jobs.train_classifier --dataset {dataset} --out {path}"
    if not path.is_file():
        raise UserError(f"classifier {path} not found; {fix}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        net = FeatureCNN(**blob["config"])
        net.load_state_dict(blob["model"])
        meta = dict(blob["meta"])
    except Exception as e:  # a damaged or foreign file fails in many ways; all mean "not our classifier"
        raise UserError(f"{path} is not a classifier written by jobs.train_classifier "
                        f"({type(e).__name__}: {' '.join(str(e).split())[:120]}); {fix}") from None
    if meta.get("dataset") != dataset:
        raise UserError(f"classifier {path} was trained on {meta.get('dataset')}, but this run uses {dataset}; "
                        f"pass --classifier with a {dataset} classifier, or {fix}")
    return net.to(device).eval(), meta


@torch.no_grad()
def classify(net: FeatureCNN, images_u8: torch.Tensor, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """images_u8: uint8 (N, C, H, W) → (logits (N, K), penultimate features (N, 128)), float32 on CPU."""
    logits, feats = [], []
    for i in range(0, len(images_u8), BATCH):
        f = net.features(to_input(images_u8[i:i + BATCH].to(device)))
        feats.append(f.cpu())
        logits.append(net.head(f).cpu())
    return torch.cat(logits), torch.cat(feats)


def reference_stats(classifier_path, net: FeatureCNN, dataset: str, root, device="cpu", features=None):
    """(mu, sigma) of the classifier's features on the whole test split, cached next to the classifier.

    ``features``: those features (N, 128) if already at hand (right after training), else computed."""
    def compute():
        if features is not None:
            return feature_stats(np.asarray(features))
        images, _ = load_dataset(dataset, root, train=False)
        return feature_stats(classify(net, images, device)[1].numpy())

    key = f"{dataset}-test-{file_sha256(classifier_path)}"
    return cached_stats(stats_path(classifier_path), key, compute)
