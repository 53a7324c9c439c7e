"""Model outputs in [-1, 1] → uint8 images, sample grids and PNG files."""
import math
import os

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


def save_png(path, grid_u8: np.ndarray) -> None:
    """Write uint8 (H, W, 1) as a grayscale PNG or (H, W, 3) as an RGB PNG, atomically (tmp + rename)."""
    from PIL import Image

    if grid_u8.dtype != np.uint8 or grid_u8.ndim != 3 or grid_u8.shape[2] not in (1, 3):
        raise ValueError(f"save_png expects uint8 (H, W, 1|3), got {grid_u8.dtype} {grid_u8.shape}")
    image = Image.fromarray(grid_u8[:, :, 0] if grid_u8.shape[2] == 1 else grid_u8)
    path = os.fspath(path)
    tmp = path + ".tmp"
    image.save(tmp, format="PNG")  # format given explicitly: the ".tmp" suffix hides it from PIL
    os.replace(tmp, path)  # a killed job never leaves a half-written PNG under the real name
