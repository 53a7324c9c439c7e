"""Images between the model's space and uint8: normalisation undone, uint8 conversion, sample grids."""
import math

import numpy as np
import torch


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """x: float (N, C, H, W) in [-1, 1] → uint8 (N, H, W, C).

    Maps -1 → 0 and 1 → 255 by ``((x + 1) * 127.5).round().clamp(0, 255)``; torch rounds half to even,
    so 0 → 127.5 → 128. Values outside [-1, 1] (samplers overshoot) are clamped, never wrapped.
    """
    if x.ndim != 4:
        raise ValueError(f"to_uint8 expects (N, C, H, W), got shape {tuple(x.shape)}")
    u8 = ((x.detach().float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return u8.permute(0, 2, 3, 1).cpu().numpy()


def to_unit(x: torch.Tensor, normalize: tuple[float, float] | None) -> torch.Tensor:
    """Undo StepBatcher's normalisation: x in [0, 1] (clamped; model samples may overshoot), for figures."""
    if normalize is None:
        return ((x + 1) / 2).clamp(0, 1)
    mean, std = normalize
    return (x * std + mean).clamp(0, 1)


def model_to_uint8(x: torch.Tensor, normalize: tuple[float, float] | None) -> np.ndarray:
    """Samples in the model's space (N, C, H, W) (``data.normalize`` undone, clamped) → uint8 (N, H, W, C).

    What the training job archives and the evaluation job scores, so both quantise the same way."""
    return to_uint8(to_unit(x.float(), normalize) * 2 - 1)


def make_grid(images_u8: np.ndarray, nrow: int, padding: int = 2) -> np.ndarray:
    """images_u8: uint8 (N, H, W, C) → uint8 grid (H', W', C) with ``nrow`` images per row.

    Same layout as torchvision.utils.make_grid (black padding of ``padding`` px around every image):
    cols = min(nrow, N), rows = ceil(N / cols), H' = rows * (H + p) + p, W' = cols * (W + p) + p.
    Unlike torchvision it keeps 1-channel images 1-channel, so grayscale PNGs stay grayscale.
    """
    if images_u8.ndim != 4 or images_u8.dtype != np.uint8 or len(images_u8) == 0:
        raise ValueError(f"make_grid expects non-empty uint8 (N, H, W, C), got {images_u8.dtype} "
                         f"{images_u8.shape}")
    n, h, w, c = images_u8.shape
    cols = max(1, min(nrow, n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * (h + padding) + padding, cols * (w + padding) + padding, c), np.uint8)
    for i, img in enumerate(images_u8):
        y = padding + (i // cols) * (h + padding)
        x = padding + (i % cols) * (w + padding)
        grid[y:y + h, x:x + w] = img
    return grid
