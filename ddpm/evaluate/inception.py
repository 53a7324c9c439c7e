"""Inception FID and Inception Score from a user-supplied torchvision Inception-v3 state dict.

Nothing is downloaded: pass ``--inception-weights PATH``, e.g. a file made on a machine with internet by
``torch.save(torchvision.models.inception_v3(weights="DEFAULT").state_dict(), PATH)``. The net is built
as torchvision builds its pretrained Inception (``transform_input=True``, inputs normalised with the
ImageNet mean/std), so those weights see what they were trained on. Grayscale images are repeated to 3
channels and every image is resized bilinearly to 299×299. FID uses the 2048-d pool features, IS the
1000-way softmax. The numbers are not comparable to papers that use the TF-FID Inception weights; compare
them only between evaluations that use the same weights file.
"""
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ddpm.errors import UserError
from ddpm.evaluate.feature_cnn import default_classifier_path
from ddpm.evaluate.metrics import (
    cached_stats,
    feature_stats,
    file_sha256,
    frechet_distance,
)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
BATCH = 100


class InceptionScorer:
    """Loads the weights on construction (UserError if they do not fit); reference test-set statistics
    are computed on first use and cached next to the classifier (``DATA_ROOT/classifiers/``)."""

    def __init__(self, path, device, dataset: str, root, reference_images: int | None = None):
        from torchvision.models import inception_v3

        self.path, self.device, self.dataset, self.root = Path(path), torch.device(device), dataset, root
        self.reference_images = reference_images
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # foreign pickles, truncated files, ...: all mean "not a state dict"
            raise UserError(f"cannot read Inception weights {path} ({type(e).__name__}); pass a torchvision "
                            "inception_v3 state dict saved with torch.save(model.state_dict(), PATH)") from None
        net = inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=True)
        try:
            net.load_state_dict(state)
        except (RuntimeError, TypeError, AttributeError) as e:
            first = str(e).strip().splitlines()[0][:120]
            raise UserError(f"{path} is not a torchvision inception_v3 state dict ({first}); pass the state dict "
                            "of torchvision.models.inception_v3 (with aux_logits)") from None
        self.net = net.to(self.device).eval()
        self.sha256 = file_sha256(self.path)
        self._pool = None
        self.net.avgpool.register_forward_hook(lambda m, i, o: setattr(self, "_pool", o.flatten(1)))
        self._reference = None

    def describe(self) -> dict:
        return {"path": str(self.path), "sha256": self.sha256, "reference_images": self.reference_images}

    @torch.no_grad()
    def features_and_logits(self, images_u8: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (N, C, H, W) → (pool features (N, 2048), logits (N, 1000)) as float64 numpy."""
        mean = torch.tensor(MEAN, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(STD, device=self.device).view(1, 3, 1, 1)
        feats, logits = [], []
        for i in range(0, len(images_u8), BATCH):
            x = images_u8[i:i + BATCH].to(self.device).float() / 255
            if x.shape[1] == 1:
                x = x.repeat(1, 3, 1, 1)
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
            logits.append(self.net((x - mean) / std).double().cpu())
            feats.append(self._pool.double().cpu())
        return torch.cat(feats).numpy(), torch.cat(logits).numpy()

    def reference(self):
        """(mu, sigma) of the pool features of the test split (the first ``reference_images`` of it)."""
        if self._reference is None:
            from ddpm.data.datasets import load_dataset

            def compute():
                images, _ = load_dataset(self.dataset, self.root, train=False)
                return feature_stats(self.features_and_logits(images[:self.reference_images])[0])

            n = self.reference_images or "all"
            cache = default_classifier_path(self.dataset, self.root).parent / \
                f"{self.dataset}_inception_{self.sha256[:12]}_test{n}.npz"
            self._reference = cached_stats(cache, f"{self.dataset}-test{n}-{self.sha256}", compute)
        return self._reference

    def score(self, images_u8: torch.Tensor) -> tuple[float, float]:
        """(Inception FID against the test split, Inception Score) of uint8 (N, C, H, W) samples."""
        feats, logits = self.features_and_logits(images_u8)
        fid = frechet_distance(*feature_stats(feats), *self.reference())
        return fid, inception_score(logits)


def inception_score(logits: np.ndarray, splits: int | None = None) -> float:
    """exp(E_x KL(p(y|x) || p(y))) averaged over ``splits`` parts (10 when N >= 100, else 1)."""
    logits = np.asarray(logits, np.float64)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    splits = splits or (10 if len(p) >= 100 else 1)
    scores = []
    for part in np.array_split(p, splits):
        marginal = part.mean(0, keepdims=True)
        kl = (part * (np.log(part + 1e-12) - np.log(marginal + 1e-12))).sum(1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores))
