"""The step-indexed batcher and the one seed hash: everything random in a run is a pure function of ints.

:func:`mix_seed` turns (seed, stream, index, ...) into a 63-bit seed; the batcher, the training loop's
noise and dropout draws and the initial weights all derive their generators from it, so a resumed run
repeats an uninterrupted one and any number of ranks sees the same draws.
"""
import torch

from ddpm.errors import UserError

_MASK64 = (1 << 64) - 1
# One id per random stream of a run, so that no two streams ever share a seed.
PERM_STREAM, FLIP_STREAM = 1, 2                        # this batcher: epoch permutations, flips
NOISE_STREAM, DROPOUT_STREAM, INIT_STREAM = 3, 4, 5    # the training loop: noise/t/label drop, dropout, weights
SAMPLE_STREAM, STEP_STREAM = 6, 7                       # sampling: each sample's x_T, each sample's per-step noise
HELDOUT_STREAM = 8                                      # the held-out loss: each test image's fixed noise, level, drop


def mix_seed(*values: int) -> int:
    """splitmix64 over the values: a well-spread 63-bit seed for each (seed, stream, index, ...).

    Stable across processes, runs and machines (pure integer arithmetic, no Python ``hash``). By
    convention the first value is the run's seed and the second a stream id from the table above.
    """
    h = 0
    for v in values:
        h = (h + (v & _MASK64) + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h >> 1


def to_model_space(images_u8: torch.Tensor, normalize: tuple[float, float] | None) -> torch.Tensor:
    """uint8 images (N, C, H, W) -> float32 in the model's space: [-1, 1], or ``(x / 255 - mean) / std``."""
    if images_u8.dtype != torch.uint8:  # .float() of a float tensor is itself: the in-place ops would change it
        raise ValueError(f"to_model_space expects uint8 images, got {images_u8.dtype}")
    x = images_u8.float()
    # Multiplying by the reciprocal, not dividing: CUDA computes a division by a scalar that way, so
    # the CPU and the GPU then give bit-identical batches.
    if normalize is None:
        return x.mul_(1 / 127.5).sub_(1.0)
    mean, std = normalize
    return x.mul_(1 / 255.0).sub_(mean).mul_(1 / std)


class StepBatcher:
    """Batch k of a run as a pure function of (seed, k, rank): resume and DDP need no sampler state.

    The data set sits on `device` as one uint8 tensor. Epoch e = k // steps_per_epoch uses one
    permutation seeded by (seed, e); the global batch is its k-th slice of `global_batch` indices and
    rank r takes the r-th contiguous part, so ranks 0..W-1 concatenated equal the world-size-1 batch.
    """

    def __init__(self, images_u8, labels, global_batch: int, world_size: int = 1, rank: int = 0, seed: int = 0,
                 hflip: bool = False, normalize: tuple[float, float] | None = None, device="cpu"):
        n = len(images_u8)
        if global_batch <= 0 or global_batch % world_size:
            raise UserError(f"train.batch_size={global_batch} is not divisible by the world size {world_size}; "
                            f"choose a multiple of {world_size}")
        if n < global_batch:
            raise UserError(f"the data set has {n} images, fewer than one batch of train.batch_size={global_batch}; "
                            f"choose train.batch_size <= {n}")
        if len(labels) != n:
            raise ValueError(f"{n} images but {len(labels)} labels")
        self.device = torch.device(device)
        self.images = images_u8.to(self.device).contiguous()
        self.labels = labels.to(self.device, torch.int64)
        self.global_batch, self.world_size, self.rank, self.seed = global_batch, world_size, rank, seed
        self.local_batch = global_batch // world_size
        self.hflip, self.normalize = hflip, normalize
        self.steps_per_epoch = n // global_batch  # drop the last partial batch
        self._epoch, self._perm, self._flips = -1, None, None

    def _start_epoch(self, epoch: int) -> None:
        """Draw the epoch's permutation (and the flips of all its steps) on the CPU and upload them once:
        a host-to-device copy per step would make the training loop wait for the GPU at every step."""
        if epoch == self._epoch:
            return
        g = torch.Generator().manual_seed(mix_seed(self.seed, PERM_STREAM, epoch))
        self._perm = torch.randperm(len(self.images), generator=g).to(self.device)
        if self.hflip:  # per step, drawn for the whole global batch: identical flips for any world size
            first = epoch * self.steps_per_epoch
            self._flips = torch.stack([
                torch.rand(self.global_batch, generator=torch.Generator().manual_seed(mix_seed(self.seed, FLIP_STREAM, s)))
                < 0.5 for s in range(first, first + self.steps_per_epoch)]).to(self.device)
        self._epoch = epoch

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x: float32 (global_batch / world_size, C, H, W) on device, normalised; y: int64 labels."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        epoch, pos = divmod(step, self.steps_per_epoch)
        self._start_epoch(epoch)
        lo = pos * self.global_batch + self.rank * self.local_batch
        idx = self._perm[lo:lo + self.local_batch]
        x, y = self.images[idx], self.labels[idx]
        if self.hflip:
            flip = self._flips[pos, self.rank * self.local_batch:(self.rank + 1) * self.local_batch]
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return to_model_space(x, self.normalize), y

    def epoch_of(self, step: int) -> float:
        """Fractional epochs completed after `step` optimizer steps."""
        return step / self.steps_per_epoch
