"""What scores an evaluation's samples: a frozen :class:`Scorers` from :func:`choose_scorers`.

The classifier of ``jobs.train_classifier`` gives label accuracy and feature-FID against the test set's
features (:mod:`ddpm.evaluate.feature_cnn`, :mod:`ddpm.evaluate.metrics`); the Inception weights give FID,
IS, KID and precision/recall against the training split (:mod:`ddpm.evaluate.fidelity`). Either may be
missing: its numbers are then None, and a missing default classifier is a note, not an error.
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ddpm.evaluate import feature_cnn, fidelity, metrics


@dataclass(frozen=True, eq=False)
class Scorers:
    """The loaded scorers of an evaluation (none for runs that make no samples)."""
    device: torch.device
    classifier: torch.nn.Module | None = None   # feature_cnn.FeatureCNN
    classifier_path: Path | None = None
    classifier_meta: dict | None = None
    reference: tuple | None = None              # feature (mu, sigma) of the test set
    note: str = ""                              # why there is no classifier (printed and in the report)
    inception: fidelity.InceptionMetrics | None = None

    @property
    def any(self) -> bool:
        return self.classifier is not None or self.inception is not None

    def describe_classifier(self) -> dict | None:
        """The classifier block of metrics.json (None without one)."""
        if self.classifier is None:
            return None
        meta = self.classifier_meta
        return {"path": str(self.classifier_path), "sha256": metrics.file_sha256(self.classifier_path),
                "test_accuracy": meta.get("test_accuracy"), "train_images": meta.get("train_images"),
                "subset": bool(meta.get("subset")), "subset_note": feature_cnn.subset_note(meta)}

    def score(self, u8: np.ndarray, labels: torch.Tensor | None) -> dict:
        """Label accuracy and feature-FID (classifier; accuracy only with labels); Inception FID, IS, KID,
        precision and recall (Inception weights) of uint8 samples (N, H, W, C); None where not measured."""
        out = {"accuracy": None, "feature_fid": None, **dict.fromkeys(fidelity.METRIC_KEYS)}
        images = torch.from_numpy(np.ascontiguousarray(u8)).permute(0, 3, 1, 2)
        if self.classifier is not None:
            logits, feats = feature_cnn.classify(self.classifier, images, self.device)
            if labels is not None:
                out["accuracy"] = metrics.accuracy(logits, labels)
            out["feature_fid"] = metrics.frechet_distance(*metrics.feature_stats(feats.numpy()), *self.reference)
        if self.inception is not None:
            out.update(self.inception.score(images))
        return out

    def shares(self, u8: np.ndarray, classes) -> list[float] | None:
        """The fraction of uint8 samples (N, H, W, C) the classifier assigns to each of ``classes`` (a mixture's
        samples); None without a classifier."""
        if self.classifier is None:
            return None
        images = torch.from_numpy(np.ascontiguousarray(u8)).permute(0, 3, 1, 2)
        predicted = feature_cnn.classify(self.classifier, images, self.device)[0].argmax(1)
        return [float((predicted == c).float().mean()) for c in classes]


def choose_scorers(cfg, device: torch.device, *, classifier: str | None = None, use_classifier: bool = True,
                   inception_weights: str | None = None, reference_images: int | None = None) -> Scorers:
    """Load the classifier (``classifier`` or the data set's default; only if ``use_classifier``) and the
    Inception weights (if given: an existing file). UserError for a named classifier that is missing, or a
    classifier or weights that do not fit."""
    found = {}
    if use_classifier:
        path = Path(classifier) if classifier else feature_cnn.default_classifier_path(cfg.data.dataset, cfg.data.root)
        if classifier is None and not path.is_file():
            found["note"] = (f"no classifier at {path}, so no label accuracy or feature-FID; train it once with: "
                             f"python -m jobs.train_classifier --dataset {cfg.data.dataset} --root {cfg.data.root} "
                             "(a read-only data root: add --out PATH, then pass --classifier PATH here)")
        else:
            net, meta = feature_cnn.load_classifier(path, cfg.data.dataset, device)
            found.update(classifier=net, classifier_path=path, classifier_meta=meta,
                         reference=feature_cnn.reference_stats(path, net, cfg.data.dataset, cfg.data.root, device))
    if inception_weights is not None:
        from ddpm.data.datasets import load_dataset

        train, _ = load_dataset(cfg.data.dataset, cfg.data.root, train=True)  # the Inception reference
        found["inception"] = fidelity.InceptionMetrics(inception_weights, device, cfg.data.dataset, cfg.data.root,
                                                       reference_images, split_size=len(train))
    return Scorers(device, **found)
