"""ml.render: perceptually uniform colours, transparent low values, the hottest-region outline,
and the page legend drawn with the same colours."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ml import MLError
from ml.render import (DEFAULT_COLORMAP, HOTTEST_LEVEL, OPAQUE_FROM, OUTLINE_COLOUR, TRANSPARENT_BELOW,
                       colormap_table, coloured_heatmap, hottest_region, outline_mask, overlay,
                       visibility)

ROOT = Path(__file__).resolve().parents[2]


def _image(h: int = 40, w: int = 60, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _blob(h: int = 40, w: int = 60, cy: float = 20, cx: float = 30, r: float = 8) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r)).astype(np.float32)


def _lightness(rgb: np.ndarray) -> np.ndarray:
    """CIE L* of sRGB colours (0-255), float64."""
    c = rgb.astype(np.float64) / 255
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    y = linear @ np.array([0.2126, 0.7152, 0.0722])
    return np.where(y > (6 / 29) ** 3, 116 * np.cbrt(y) - 16, y * (29 / 3) ** 3)


def test_default_table_is_perceptually_ordered_unlike_jet():
    # a perceptually uniform table rises in lightness from low to high at a near-even rate;
    # jet does not (its lightness goes up and down, which invents edges)
    # (every 15th entry: neighbouring entries differ by rounding to 8 bits only)
    steps = np.diff(_lightness(colormap_table(DEFAULT_COLORMAP)[::15]))
    assert DEFAULT_COLORMAP != "jet"
    assert (steps > 0).all()
    assert steps.max() < 1.5 * steps.mean()
    assert (np.diff(_lightness(colormap_table("jet")[::15])) < 0).any()
    with pytest.raises(MLError, match="unknown colormap"):
        colormap_table("no-such-map")


def test_visibility_is_zero_below_the_threshold_full_above_and_monotone():
    values = np.linspace(0, 1, 1001, dtype=np.float32)
    alpha = visibility(values)
    assert (alpha[values <= TRANSPARENT_BELOW] == 0).all()
    assert (alpha[values >= OPAQUE_FROM] == 1).all()
    assert (np.diff(alpha) >= 0).all()
    with pytest.raises(MLError):
        visibility(values, 0.7, 0.5)


def test_an_empty_heatmap_leaves_the_image_unchanged():
    image = _image()
    zero = np.zeros((40, 60), dtype=np.float32)
    assert np.array_equal(np.asarray(overlay(image, zero, opacity=1.0, outline=True)), np.asarray(image))
    layer = np.asarray(coloured_heatmap(zero))
    assert layer.shape == (40, 60, 4) and (layer[..., 3] == 0).all()


def test_overlay_colours_high_values_and_keeps_low_ones():
    image = _image()
    heat = _blob()
    out = np.asarray(overlay(image, heat, opacity=1.0)).astype(int)
    table = colormap_table(DEFAULT_COLORMAP).astype(int)
    index = np.round(heat * 255).astype(int)
    high, low = heat >= OPAQUE_FROM, heat <= TRANSPARENT_BELOW
    assert high.any() and low.any()
    assert np.array_equal(out[high], table[index[high]])
    assert np.array_equal(out[low], np.asarray(image).astype(int)[low])
    with pytest.raises(MLError, match="opacity"):
        overlay(image, heat, opacity=1.5)


def test_outline_surrounds_the_hottest_region_only():
    heat = _blob()
    region = hottest_region(heat)
    assert np.array_equal(region, heat >= HOTTEST_LEVEL * heat.max())
    edge = outline_mask(region, width=1)
    assert edge.any() and not (edge & ~region).any()
    assert not edge[20, 30]  # the centre of the blob is inside, not on the line
    # the line is exactly the region's pixels with one of their 8 neighbours outside it
    padded = np.pad(region, 1)
    inside = np.ones_like(region)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            inside &= padded[dy:dy + region.shape[0], dx:dx + region.shape[1]]
    boundary = region & ~inside
    assert np.array_equal(edge, boundary)
    layer = np.asarray(coloured_heatmap(heat, outline=True))
    assert (layer[edge, :3] == OUTLINE_COLOUR).all() and (layer[edge, 3] == 255).all()
    plain = np.asarray(coloured_heatmap(heat, outline=False))
    assert np.array_equal(plain[~edge], layer[~edge])
    assert not hottest_region(np.zeros((4, 4))).any()


def test_a_region_touching_the_border_is_closed_along_the_border():
    region = np.zeros((20, 20), dtype=bool)
    region[:6, :6] = True
    edge = outline_mask(region, width=1)
    assert edge[0, :6].all() and edge[:6, 0].all() and edge[5, :6].all() and edge[:6, 5].all()
    assert not edge[1:5, 1:5].any()


def test_coloured_layer_alpha_follows_visibility():
    heat = _blob()
    layer = np.asarray(coloured_heatmap(heat, outline=False))
    expected = np.round(visibility(heat) * 255)
    assert np.array_equal(layer[..., 3], expected.astype(np.uint8))
    table = colormap_table(DEFAULT_COLORMAP)
    assert np.array_equal(layer[..., :3], table[np.round(heat * 255).astype(int)])


def test_page_legend_uses_the_render_colours_and_transparency():
    css = (ROOT / "static" / "css" / "heatmap-legend.css").read_text()
    stops = re.findall(r"rgba\((\d+), (\d+), (\d+), ([\d.]+)\) (\d+)%", css)
    assert len(stops) >= 6
    table = colormap_table(DEFAULT_COLORMAP)
    for r, g, b, a, at in stops:
        value = int(at) / 100
        assert [int(r), int(g), int(b)] == table[round(value * 255)].tolist(), at
        assert float(a) == pytest.approx(float(visibility(np.float32(value))), abs=0.006), at
    partial = (ROOT / "templates" / "cases" / "_heatmap_legend.html").read_text()
    assert ">low<" in partial and ">high<" in partial and "heatmap-legend.css" in partial
    assert "<script" not in partial and "style=" not in partial
    detail = (ROOT / "templates" / "cases" / "detail.html").read_text()
    assert '{% include "cases/_heatmap_legend.html" %}' in detail


def test_a_letterboxed_heatmap_lands_on_the_image_not_on_the_bands():
    from ml.render import resize_heatmap

    # a 32 x 32 input map of a 120 x 60 image: the image fills rows 8..23; hot at its top-left
    hm = np.zeros((32, 32), np.float32)
    hm[8:12, 0:4] = 1.0
    full = resize_heatmap(hm, (120, 60), "letterbox-bilinear")
    assert full.shape == (60, 120)
    rows, cols = np.nonzero(full > 0.5)
    assert rows.max() < 20 and cols.max() < 20          # the image's own top-left corner
    squashed = resize_heatmap(hm, (120, 60))           # read as squashed it would sit lower
    assert np.nonzero(squashed > 0.5)[0].min() >= 13
