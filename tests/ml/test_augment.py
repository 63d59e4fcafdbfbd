"""Train-time augmentation: shapes, ranges, repeatability, and what scanner_shift changes."""
from __future__ import annotations

import torch

from ml.augment import augment_batch, scanner_shift


def _batch(n: int = 6, size: int = 48) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def test_augmentations_keep_shape_and_range_and_repeat_with_the_seed():
    x = _batch()
    a = scanner_shift(augment_batch(x, torch.Generator().manual_seed(1)), torch.Generator().manual_seed(2))
    b = scanner_shift(augment_batch(x, torch.Generator().manual_seed(1)), torch.Generator().manual_seed(2))
    assert a.shape == x.shape and a.dtype == torch.float32
    assert torch.equal(a, b) and 0 <= a.min() and a.max() <= 255


def test_scanner_shift_with_p_zero_changes_nothing_and_otherwise_smooths_and_ramps():
    x = _batch().float()
    assert torch.equal(scanner_shift(x, torch.Generator().manual_seed(0), p=0.0), x)
    flat = torch.full((4, 3, 64, 64), 100.0)
    ramped = scanner_shift(flat, torch.Generator().manual_seed(3), p=1.0, speckle=0.0, max_gain_slope=0.5)
    rows = ramped.mean(dim=(1, 3))                     # a flat image gains a depth ramp, nothing else
    slopes = rows[:, -1] - rows[:, 0]
    assert (slopes.abs() > 0).all() and (slopes.abs() <= 50 + 1e-3).all()
    noisy = _batch(4, 64).float()
    smoothed = scanner_shift(noisy, torch.Generator().manual_seed(4), p=1.0, speckle=0.0, max_gain_slope=0.0)
    # resolution loss and blur remove pixel-level noise: neighbouring pixels become alike
    def roughness(t):
        return (t[..., 1:] - t[..., :-1]).abs().mean()
    assert roughness(smoothed) < 0.8 * roughness(noisy)
