"""Train-time augmentation: shapes, ranges, repeatability, and what scanner_shift changes."""
from __future__ import annotations

import torch

from ml.augment import augment_batch, mix_styles, random_convolution, scanner_shift


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


def test_aspect_stretch_changes_a_discs_width_against_its_height_and_is_off_by_default():
    disc = torch.zeros(16, 3, 64, 64, dtype=torch.uint8)
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    disc[:, :, ((yy - 32) ** 2 + (xx - 32) ** 2) < 12 ** 2] = 255
    quiet = dict(max_rotate_deg=0, zoom=(1, 1), max_shift=0, brightness=0, contrast=0, gamma=0, noise=0)

    def ratios(out):
        lit = out[:, 0] > 127
        return lit.any(dim=1).sum(dim=1).float() / lit.any(dim=2).sum(dim=1).float()  # width / height

    same = augment_batch(disc, torch.Generator().manual_seed(0), **quiet)
    assert torch.allclose(ratios(same), torch.ones(16), atol=0.1)
    # the default draws nothing extra: the stream matches a call without the option
    assert torch.equal(augment_batch(disc, torch.Generator().manual_seed(0)),
                       augment_batch(disc, torch.Generator().manual_seed(0), max_aspect=1.0))
    r = ratios(augment_batch(disc, torch.Generator().manual_seed(0), max_aspect=1.6, **quiet))
    assert r.min() < 0.9 and r.max() > 1.1 and r.min() > 1 / 1.6 - 0.1 and r.max() < 1.6 + 0.1


def test_mix_styles_keeps_each_images_content_and_moves_its_statistics_towards_another_images():
    scale = torch.arange(1, 7, dtype=torch.float32).view(6, 1, 1, 1)
    x = torch.randn(6, 4, 5, 5, generator=torch.Generator().manual_seed(0)) * scale + 10 * scale
    out = mix_styles(x, torch.Generator().manual_seed(1))
    assert torch.equal(out, mix_styles(x, torch.Generator().manual_seed(1)))   # repeats with the seed

    def content(t):
        return (t - t.mean(dim=(2, 3), keepdim=True)) / t.std(dim=(2, 3), keepdim=True)
    assert torch.allclose(content(out), content(x), atol=1e-4)
    before, after = x.mean(dim=(2, 3)), out.mean(dim=(2, 3))
    # every new mean is a mix of the batch's means: inside their range, and not all where they were
    assert (after >= before.min(dim=0).values - 1e-4).all() and (after <= before.max(dim=0).values + 1e-4).all()
    assert (after - before).abs().max() > 1.0
    single = x[:1]
    assert torch.equal(mix_styles(single, torch.Generator().manual_seed(1)), single)   # nothing to mix with


def test_random_convolution_changes_texture_keeps_grey_brightness_and_shape_and_repeats():
    x = _batch(8, 48).float()
    assert torch.equal(random_convolution(x, torch.Generator().manual_seed(0), p=0.0), x)   # off: untouched
    out = random_convolution(x, torch.Generator().manual_seed(5), p=1.0)
    assert torch.equal(out, random_convolution(x, torch.Generator().manual_seed(5), p=1.0))
    assert out.shape == x.shape and 0 <= out.min() and out.max() <= 255
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])         # still grey
    assert not torch.equal(out, x.mean(dim=1, keepdim=True).expand_as(x))                 # texture changed
    # each image keeps its brightness (mean), up to clipping at 0 and 255
    assert torch.allclose(out.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)), atol=12)
    # a bright disc on a dark field stays a disc: filtering changes texture, not where things are
    disc = torch.full((6, 3, 64, 64), 20.0)
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    inside = ((yy - 32) ** 2 + (xx - 32) ** 2) < 14 ** 2
    disc[:, :, inside] = 200.0
    r = ((yy - 32) ** 2 + (xx - 32) ** 2).float().sqrt()
    for seed in range(4):
        f = random_convolution(disc, torch.Generator().manual_seed(seed), p=1.0)[:, 0]
        # flat regions stay flat (a filter of a constant is a constant): all the structure left
        # is at the disc's outline, where it was
        assert (f[:, r < 9].std(dim=1) < 1e-2).all() and (f[:, r > 19].std(dim=1) < 1e-2).all()
        assert (f.flatten(1).std(dim=1) > 1).all()
    mixed = random_convolution(x, torch.Generator().manual_seed(1), p=0.5)
    kept = (mixed == x).flatten(1).all(dim=1)
    assert 0 < int(kept.sum()) < len(x)   # about half the images are filtered
