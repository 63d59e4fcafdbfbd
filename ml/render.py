"""Pictures of a heatmap: a colour overlay on the original image, a transparent colour layer
for the case page, and a grayscale PNG.

Heatmaps here are float arrays in [0, 1] with the image's own height and width. Colours come
from a perceptually uniform table (viridis by default: equal steps in value look like equal
steps in colour, and it stays readable in grey and for colour-blind readers). Low values are
transparent, so an all-zero heatmap leaves the image exactly as it was.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image, ImageFilter

from ml import MLError

DEFAULT_COLORMAP = "viridis"
DEFAULT_OPACITY = 0.45
# heatmap values up to TRANSPARENT_BELOW are not drawn; opacity then rises smoothly and is
# full from OPAQUE_FROM on (values in [0, 1], after the per-image scaling)
TRANSPARENT_BELOW = 0.2
OPAQUE_FROM = 0.6
# the outlined "hottest region": heatmap >= this share of its maximum
HOTTEST_LEVEL = 0.8
OUTLINE_COLOUR = (255, 255, 255)


@lru_cache(maxsize=16)
def colormap_table(name: str = DEFAULT_COLORMAP) -> np.ndarray:
    """256 x 3 uint8 lookup table for a matplotlib colormap name (``viridis``, ``inferno``...)."""
    import matplotlib  # only the colormap registry: no pyplot, no GUI backend

    try:
        cmap = matplotlib.colormaps[name]
    except KeyError as exc:
        raise MLError(f"unknown colormap {name!r} (try viridis, inferno, magma, cividis)") from exc
    rgba = cmap(np.linspace(0.0, 1.0, 256))
    table = np.round(rgba[:, :3] * 255).astype(np.uint8)
    table.setflags(write=False)
    return table


def resize_heatmap(heatmap: np.ndarray, size: tuple[int, int], resize: str = "square-bilinear") -> np.ndarray:
    """Bilinear resize of a [0, 1] float heatmap to ``size`` = (width, height), kept in [0, 1].

    ``resize`` is how the image became the model's square input (ml.data.RESIZE_MODES): for a
    letterboxed input only the part over the image is kept, so the map lands on the image."""
    heatmap = np.asarray(heatmap, dtype=np.float32)
    if resize != "square-bilinear":
        from ml.data import content_box

        left, top, right, bottom = content_box(size[0], size[1], heatmap.shape[0], resize)
        heatmap = heatmap[top:bottom, left:right]
    if heatmap.shape[::-1] == tuple(size):
        return heatmap.copy()
    resized = np.asarray(Image.fromarray(heatmap).resize(size, Image.BILINEAR), dtype=np.float32)
    return np.clip(resized, 0.0, 1.0)


def _as_uint8(heatmap: np.ndarray) -> np.ndarray:
    return np.round(np.clip(np.asarray(heatmap, dtype=np.float32), 0.0, 1.0) * 255).astype(np.uint8)


def heatmap_image(heatmap: np.ndarray) -> Image.Image:
    """The raw heatmap as an 8-bit grayscale ('L') image: 0 = ignored, 255 = most used."""
    return Image.fromarray(_as_uint8(heatmap))  # 2-D uint8 is mode L


def visibility(heatmap: np.ndarray, transparent_below: float = TRANSPARENT_BELOW,
               opaque_from: float = OPAQUE_FROM) -> np.ndarray:
    """Per-pixel opacity in [0, 1]: 0 up to ``transparent_below``, 1 from ``opaque_from``,
    a smoothstep in between (no visible edge where the colour starts)."""
    if not 0.0 <= transparent_below < opaque_from <= 1.0:
        raise MLError("need 0 <= transparent_below < opaque_from <= 1")
    t = np.clip((np.asarray(heatmap, dtype=np.float32) - transparent_below) / (opaque_from - transparent_below),
                0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def hottest_region(heatmap: np.ndarray, level: float = HOTTEST_LEVEL) -> np.ndarray:
    """Boolean mask of the pixels at or above ``level`` times the heatmap's maximum; empty for
    an all-zero heatmap."""
    heatmap = np.asarray(heatmap, dtype=np.float32)
    peak = float(heatmap.max()) if heatmap.size else 0.0
    if peak <= 0:
        return np.zeros(heatmap.shape, dtype=bool)
    return heatmap >= level * peak


def outline_mask(region: np.ndarray, width: int | None = None) -> np.ndarray:
    """The inner boundary of a boolean ``region``, ``width`` pixels thick (default: about
    1/200 of the shorter side, at least 1)."""
    region = np.asarray(region, dtype=bool)
    if not region.any():
        return region.copy()
    if width is None:
        width = max(1, round(min(region.shape) / 200))
    as_image = Image.fromarray(region.astype(np.uint8) * 255)
    eroded = as_image.filter(ImageFilter.MinFilter(2 * width + 1))
    # pixels outside the image count as outside the region, so a region touching the edge
    # is outlined along the edge too
    inner = np.asarray(eroded) > 127
    inner[:width, :] = inner[-width:, :] = False
    inner[:, :width] = inner[:, -width:] = False
    return region & ~inner


def coloured_heatmap(heatmap: np.ndarray, colormap: str = DEFAULT_COLORMAP, outline: bool = True,
                     level: float = HOTTEST_LEVEL) -> Image.Image:
    """The heatmap as an RGBA layer to lay over the image (the case page does, with its own
    opacity slider): colour from ``colormap``, alpha from :func:`visibility`, so low values
    are fully transparent; with ``outline`` the boundary of the hottest region
    (:func:`hottest_region`) is drawn opaque in white."""
    values = _as_uint8(heatmap)
    rgba = np.empty(values.shape + (4,), dtype=np.uint8)
    rgba[..., :3] = colormap_table(colormap)[values]
    rgba[..., 3] = np.round(visibility(heatmap) * 255).astype(np.uint8)
    if outline:
        edge = outline_mask(hottest_region(heatmap, level))
        rgba[edge, :3] = OUTLINE_COLOUR
        rgba[edge, 3] = 255
    return Image.fromarray(rgba)  # H x W x 4 uint8 is RGBA


def overlay(image: Image.Image, heatmap: np.ndarray, colormap: str = DEFAULT_COLORMAP,
            opacity: float = DEFAULT_OPACITY, outline: bool = False,
            level: float = HOTTEST_LEVEL) -> Image.Image:
    """Blend the coloured heatmap onto ``image`` (RGB) at the image's size.

    Each pixel mixes ``opacity * visibility(value)`` of the colour with the image: values
    below the transparency threshold leave the image unchanged, so an all-zero heatmap
    returns the image as it was; ``opacity`` 0 gives the image unchanged everywhere.
    ``outline`` draws the boundary of the hottest region in white. A heatmap of another size
    is resized to the image first.
    """
    if not 0.0 <= opacity <= 1.0:
        raise MLError(f"opacity must be between 0 and 1, not {opacity}")
    image = image.convert("RGB")
    heatmap = resize_heatmap(heatmap, image.size)
    colour = colormap_table(colormap)[_as_uint8(heatmap)].astype(np.float32)
    base = np.asarray(image, dtype=np.float32)
    alpha = (opacity * visibility(heatmap))[..., None]
    blended = (1.0 - alpha) * base + alpha * colour
    out = np.round(blended).astype(np.uint8)
    if outline:
        out[outline_mask(hottest_region(heatmap, level))] = OUTLINE_COLOUR
    return Image.fromarray(out)  # H x W x 3 uint8 is RGB
