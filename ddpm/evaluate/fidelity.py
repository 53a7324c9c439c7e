"""Literature-comparable Inception metrics through torch-fidelity: FID, Inception Score, KID, precision/recall.

The net is torch-fidelity's ``FeatureExtractorInceptionV3``: the TF-Inception graph that the FID of the
papers uses (DDPM's 3.17 on CIFAR-10), with the TensorFlow-compatible resize to 299×299. Its weights come
from a file the user supplies (``--inception-weights PATH``); nothing is downloaded at run time. The
standard file is torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` (see ``WEIGHTS_URL``;
fetch it once on a machine with internet). The file is read once: its bytes are checked with
``torch.load(weights_only=True)`` and only those checked bytes reach torch-fidelity (which itself loads
with ``weights_only=False``), so a pickle that runs code is refused and never unpickled.

FID, KID and precision/recall use the 2048-d pool features, the Inception Score the 1008-way
``logits_unbiased``. IS, KID and precision/recall are torch-fidelity's own functions with its defaults
(IS: 10 splits; KID: 100 subsets of up to 1,000, cubic polynomial kernel; precision/recall: 3-NN balls,
as many reference images as samples). FID is the Fréchet distance of :mod:`ddpm.evaluate.metrics` on
those features: it agrees with torch-fidelity's to 1e-6 on full-rank covariances (50,000 samples;
tests/evaluate/test_fidelity.py) and stays >= 0 on rank-deficient ones (a few hundred samples in 2048
dimensions), where torch-fidelity's general eigenvalues give e.g. -0.02 for a set against itself. The reference is the *training* split, as in the papers; its features are computed once
and cached next to the data, ``DATA_ROOT/fidelity/DATASET_train<N>_inception-<sha256[:12]>.npz``.
Grayscale MNIST is repeated to 3 channels.
"""
import hashlib
import io
from pathlib import Path

import numpy as np
import torch

from ddpm.diffusion.compiled import ieee_fp32
from ddpm.errors import UserError
from ddpm.evaluate.metrics import cached_arrays, feature_stats, frechet_distance

WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{WEIGHTS_NAME}"
POOL, LOGITS = "2048", "logits_unbiased"
BATCH = 64
PROGRESS = 2000  # images from which feature extraction reports its progress
KID_SUBSET = 1000
# The keys of score(), in the order reports show them.
METRIC_KEYS = ("inception_fid", "inception_score", "kid", "precision", "recall")
SEED = 2020  # torch-fidelity's rng_seed default: IS shuffling, KID subsets, the precision/recall reference

GET_WEIGHTS = f"pass torch-fidelity's {WEIGHTS_NAME} (wget {WEIGHTS_URL} on a machine with internet)"


def read_weights(path) -> tuple[bytes, str]:
    """(the file's bytes, their sha256) after checking they are a state dict torch loads safely."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"cannot read Inception weights {path} ({e.strerror or e}); {GET_WEIGHTS}") from None
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # foreign pickles, truncated files, ...: all mean "not a plain state dict"
        raise UserError(f"Inception weights {path} are not a plain tensor state dict ({type(e).__name__}); "
                        f"{GET_WEIGHTS}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"Inception weights {path} hold a {type(state).__name__}, not a state dict; {GET_WEIGHTS}")
    return data, hashlib.sha256(data).hexdigest()


class InceptionMetrics:
    """Loads the weights on construction (UserError if they do not fit); the reference features of the
    training split are computed on first use and cached (``reference_images``: only the first N)."""

    def __init__(self, path, device, dataset: str, root, reference_images: int | None = None, log=print,
                 split_size: int | None = None):
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError:
            raise UserError("the Inception metrics need torch-fidelity, which is not installed here: "
                            "pip install 'torch-fidelity>=0.4,<0.5'") from None

        self.path, self.device, self.dataset, self.root = Path(path), torch.device(device), dataset, root
        self.reference_images, self.log = reference_images, log
        self.split_size = split_size  # images in the data root's training split, if known
        data, self.sha256 = read_weights(path)
        try:
            net = FeatureExtractorInceptionV3("inception-v3-compat", [POOL, LOGITS],
                                              feature_extractor_weights_path=io.BytesIO(data))
        except (RuntimeError, KeyError, TypeError) as e:
            first = str(e).strip().splitlines()[0][:120]
            raise UserError(f"{path} is not torch-fidelity's InceptionV3 state dict ({first}); {GET_WEIGHTS}") from None
        self.net = net.to(self.device)
        self._reference = None

    def describe(self) -> dict:
        import torch_fidelity

        return {"path": str(self.path), "sha256": self.sha256, "reference": "train",
                "reference_images": self.reference_images, "torch_fidelity": torch_fidelity.__version__,
                "comparable_note": self.comparable_note()}

    def comparable_note(self) -> str | None:
        """A warning when the reference is not the official training split (None when it is, or unknown)."""
        from ddpm.data.datasets import DATASETS

        full = DATASETS[self.dataset]["train_size"]
        used = min(x for x in (self.reference_images, self.split_size, full) if x is not None)
        if used >= full:
            return None
        return (f"the Inception reference is {used} of the {full} {self.dataset} training images (a subset of the "
                "data set or --reference-images): its FID, KID and precision/recall are not comparable with "
                "papers' numbers")

    @torch.no_grad()
    def features(self, images_u8: torch.Tensor, what: str = "samples") -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (N, C, H, W) → (pool features (N, 2048), unbiased logits (N, 1008)), float32 on the CPU.
        From PROGRESS images on, a bar in a terminal, else a line per tenth."""
        import sys
        import time

        from tqdm import tqdm

        pool, logits, n, t0 = [], [], len(images_u8), time.perf_counter()
        long = n >= PROGRESS
        bar = tqdm(total=n, unit="img", desc=f"Inception features ({what})", disable=not (long and sys.stdout.isatty()))
        tenth = max(1, n // 10)
        with ieee_fp32(), bar:
            for i in range(0, n, BATCH):
                x = images_u8[i:i + BATCH].to(self.device)
                if x.shape[1] == 1:
                    x = x.repeat(1, 3, 1, 1)
                f, lg = self.net(x)
                pool.append(f.cpu())
                logits.append(lg.cpu())
                done = min(n, i + BATCH)
                bar.update(done - i)
                if long and bar.disable and (done // tenth > i // tenth or done == n):
                    self.log(f"  Inception features of {what}: {done}/{n} "
                             f"({done / (time.perf_counter() - t0):.0f} images/s)")
        return torch.cat(pool), torch.cat(logits)

    def cache_path(self) -> Path:
        n = self.reference_images or "all"
        return Path(self.root) / "fidelity" / f"{self.dataset}_train{n}_inception-{self.sha256[:12]}.npz"

    def reference(self) -> dict:
        """{"features": (N, 2048) float32, "mu", "sigma"} of the training split (computed once, then cached)."""
        if self._reference is None:
            import torch_fidelity

            from ddpm.data.datasets import load_dataset

            def compute():
                images, _ = load_dataset(self.dataset, self.root, train=True)
                images = images[:self.reference_images]
                self.log(f"Inception reference: features of {len(images)} {self.dataset} training images, once "
                         f"(cached in {self.cache_path()})")
                feats = self.features(images, "the training split")[0].numpy()
                return dict(zip(("features", "mu", "sigma"), (feats, *feature_stats(feats))))

            key = (f"{self.dataset}-train{self.reference_images or 'all'}-{self.sha256}"
                   f"-torch-fidelity-{torch_fidelity.__version__}")
            self._reference = cached_arrays(self.cache_path(), key, compute)
        return self._reference

    def score(self, images_u8: torch.Tensor) -> dict:
        """Inception FID, IS (mean), KID (mean) and precision/recall of uint8 (N, C, H, W) samples against
        the training split; a metric the sample count cannot support (KID, P/R below 4 images) is None."""
        from torch_fidelity.metric_isc import isc_features_to_metric
        from torch_fidelity.metric_kid import kid_features_to_metric
        from torch_fidelity.metric_prc import prc_features_to_metric

        feats, logits = self.features(images_u8)
        ref = self.reference()
        real = torch.from_numpy(np.asarray(ref["features"]))
        n, out = len(feats), dict.fromkeys(METRIC_KEYS)
        out["inception_fid"] = frechet_distance(*feature_stats(feats.numpy()), ref["mu"], ref["sigma"])
        out["inception_score"] = isc_features_to_metric(logits, splits=10 if n >= 100 else 1,
                                                        rng_seed=SEED)["inception_score_mean"]
        m = min(KID_SUBSET, n, len(real))
        if m >= 2:
            out["kid"] = kid_features_to_metric(feats, real, kid_subset_size=m, rng_seed=SEED,
                                                verbose=False)["kernel_inception_distance_mean"]
        if min(n, len(real)) >= 4:  # 3 neighbours besides the point itself
            pick = np.random.RandomState(SEED).permutation(len(real))[:n]
            # the k-NN distances on the GPU when there is one (50,000 x 50,000 of them at paper scale)
            prc = prc_features_to_metric(feats.to(self.device), real[np.sort(pick)].to(self.device),
                                         save_cpu_ram=True, verbose=False)
            out["precision"], out["recall"] = prc["precision"], prc["recall"]
        return out
