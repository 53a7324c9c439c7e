"""Sample-quality maths: label accuracy, feature statistics, the Fréchet distance, and cached statistics.

Feature-FID uses the classifier of :mod:`ddpm.evaluate.feature_cnn`; it is only comparable between
evaluations that use the same classifier file, and it is not the Inception FID of the literature (that
one is :mod:`ddpm.evaluate.fidelity`, through torch-fidelity; tests/evaluate/test_fidelity.py checks that
these statistics and this Fréchet distance agree with torch-fidelity's on the same features).
"""
import hashlib
import zipfile
from pathlib import Path

import numpy as np
import torch

from ddpm.run.atomic import atomic_path


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose argmax equals the label; logits (N, K), labels (N,)."""
    return float((logits.argmax(1) == labels.cpu()).float().mean())


def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """features (N, D) → (mean (D,), covariance (D, D)) in float64; N = 1 gives a zero covariance."""
    f = np.asarray(features, dtype=np.float64)
    mu = f.mean(0)
    sigma = np.cov(f, rowvar=False) if len(f) > 1 else np.zeros((f.shape[1], f.shape[1]))
    return mu, np.atleast_2d(sigma)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2)`` between two Gaussians.

    Uses symmetric eigendecompositions (no scipy): ``tr((S1 S2)^1/2)`` equals the trace of the square root
    of the PSD matrix ``S1^1/2 S2 S1^1/2``, whose eigenvalues are clipped at 0 against rounding.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root1 @ s2 @ root1
    cross = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    # Rounding can push identical distributions a hair below 0; a distance is never negative.
    return max(0.0, float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * cross))


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cached_stats(cache: Path, key: str, compute) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) from ``cache`` if it was written for ``key``, else ``compute()`` and try to cache it."""
    z = cached_arrays(cache, key, lambda: dict(zip(("mu", "sigma"), compute())))
    return z["mu"], z["sigma"]


def cached_arrays(cache: Path, key: str, compute) -> dict:
    """{name: array} from ``cache`` if it was written for ``key``, else ``compute()`` (a dict of arrays)
    and try to cache it. A damaged or foreign cache is recomputed and replaced; a read-only cache
    directory only costs the recomputation (a warning is printed)."""
    if cache.is_file():
        try:
            with np.load(cache) as z:
                if str(z["key"]) == key:
                    return {k: z[k] for k in z.files if k != "key"}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            pass  # damaged or foreign: recompute and overwrite
    arrays = compute()
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(cache) as tmp, open(tmp, "wb") as f:  # a file object: np.savez would append ".npz"
            np.savez(f, key=np.array(key), **arrays)
    except OSError as e:
        print(f"warning: could not cache reference statistics at {cache} ({e.strerror}); recomputing next time")
    return arrays
