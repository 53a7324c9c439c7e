"""ddpm.data.images: [-1, 1] → uint8 mapping, grid geometry."""
import numpy as np
import pytest
import torch

from ddpm.data.images import make_grid, to_uint8


def test_to_uint8_maps_endpoints_midpoint_and_clamps():
    x = torch.tensor([-1.0, 1.0, 0.0, -3.0, 2.5, -0.5]).view(1, 1, 1, 6)
    u8 = to_uint8(x)
    assert u8.dtype == np.uint8 and u8.shape == (1, 1, 6, 1)
    # 0 → 127.5 rounds half to even → 128; -0.5 → 63.75 → 64; out-of-range values clamp.
    assert u8.ravel().tolist() == [0, 255, 128, 0, 255, 64]


def test_to_uint8_moves_channels_last():
    x = torch.zeros(2, 3, 4, 5)
    x[:, 0] = 1.0  # red channel full on
    u8 = to_uint8(x)
    assert u8.shape == (2, 4, 5, 3)
    assert (u8[..., 0] == 255).all() and (u8[..., 1:] == 128).all()


def test_grid_geometry_and_placement():
    imgs = np.stack([np.full((28, 28, 1), i + 1, np.uint8) for i in range(10)])
    grid = make_grid(imgs, nrow=5)
    assert grid.shape == (2 * 28 + 3 * 2, 5 * 28 + 6 * 2, 1) and grid.dtype == np.uint8
    # image 7 sits in row 1, column 2; padding stays black
    y, x = 2 + 1 * 30, 2 + 2 * 30
    assert (grid[y:y + 28, x:x + 28] == 8).all()
    assert (grid[:2] == 0).all() and (grid[:, :2] == 0).all() and (grid[30:32] == 0).all()


def test_grid_last_row_partial_and_few_images():
    imgs = np.ones((7, 8, 8, 3), np.uint8)
    assert make_grid(imgs, nrow=3).shape == (3 * 10 + 2, 3 * 10 + 2, 3)
    assert make_grid(imgs[:2], nrow=8).shape == (10 + 2, 2 * 10 + 2, 3)  # cols = min(nrow, N)
    with pytest.raises(ValueError):
        make_grid(imgs.astype(np.float32), nrow=3)
