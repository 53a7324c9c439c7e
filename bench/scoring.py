"""A second judge for the quality benchmarks: re-score the samples an evaluation archived with another
classifier (jobs.train_classifier --seed 1), so that no claim rests on one classifier's quirks.

The evaluation job scores its samples with one classifier and stores them in ``RUN_DIR/samples.h5``; here
they are read back and scored the same way (label accuracy; Fréchet distance of the penultimate features
to the test split's) by any other classifier file.
"""
from pathlib import Path

import numpy as np
import torch


def score_images(classifier: Path, dataset: str, data_root: str, images: np.ndarray, labels,
                 device: str = "cpu") -> dict:
    """images: uint8 (N, H, W, C); labels: (N,) requested classes or None → {accuracy, feature_fid, n}."""
    from ddpm.evaluate import feature_cnn, metrics

    net, _ = feature_cnn.load_classifier(classifier, dataset, device)
    reference = feature_cnn.reference_stats(classifier, net, dataset, data_root, device)
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    logits, feats = feature_cnn.classify(net, x, device)
    acc = None if labels is None else metrics.accuracy(logits, torch.as_tensor(np.asarray(labels)))
    return {"accuracy": acc, "feature_fid": metrics.frechet_distance(*metrics.feature_stats(feats.numpy()), *reference),
            "n": len(images)}


def score_group(classifier: Path, dataset: str, data_root: str, archive: Path, group: str) -> dict:
    """Scores of one archived sample group (``eval/step_000001000/w_3``) by ``classifier``."""
    from ddpm.run.samples import read_samples

    images, labels, _ = read_samples(archive, group)
    return score_images(classifier, dataset, data_root, images, labels if (labels >= 0).all() else None)


def classifier_accuracy(classifier: Path) -> float | None:
    """The test accuracy that jobs.train_classifier recorded in the file."""
    return torch.load(classifier, map_location="cpu", weights_only=True)["meta"].get("test_accuracy")
