"""Pictures of a heatmap: a colour overlay on the original image and a grayscale PNG.

Heatmaps here are float arrays in [0, 1] with the image's own height and width.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image

from ml import MLError

DEFAULT_COLORMAP = "jet"
DEFAULT_OPACITY = 0.45


@lru_cache(maxsize=16)
def colormap_table(name: str = DEFAULT_COLORMAP) -> np.ndarray:
    """256 x 3 uint8 lookup table for a matplotlib colormap name (``jet``, ``inferno``...)."""
    import matplotlib  # only the colormap registry: no pyplot, no GUI backend

    try:
        cmap = matplotlib.colormaps[name]
    except KeyError as exc:
        raise MLError(f"unknown colormap {name!r} (try jet, turbo, inferno, viridis, magma)") from exc
    rgba = cmap(np.linspace(0.0, 1.0, 256))
    table = np.round(rgba[:, :3] * 255).astype(np.uint8)
    table.setflags(write=False)
    return table


def resize_heatmap(heatmap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a [0, 1] float heatmap to ``size`` = (width, height), kept in [0, 1]."""
    heatmap = np.asarray(heatmap, dtype=np.float32)
    if heatmap.shape[::-1] == tuple(size):
        return heatmap.copy()
    resized = np.asarray(Image.fromarray(heatmap).resize(size, Image.BILINEAR), dtype=np.float32)
    return np.clip(resized, 0.0, 1.0)


def _as_uint8(heatmap: np.ndarray) -> np.ndarray:
    return np.round(np.clip(np.asarray(heatmap, dtype=np.float32), 0.0, 1.0) * 255).astype(np.uint8)


def heatmap_image(heatmap: np.ndarray) -> Image.Image:
    """The raw heatmap as an 8-bit grayscale ('L') image: 0 = ignored, 255 = most used."""
    return Image.fromarray(_as_uint8(heatmap))  # 2-D uint8 is mode L


def overlay(image: Image.Image, heatmap: np.ndarray, colormap: str = DEFAULT_COLORMAP,
            opacity: float = DEFAULT_OPACITY) -> Image.Image:
    """Blend the coloured heatmap onto ``image`` (RGB) at the image's size.

    ``opacity`` 0 gives the image unchanged, 1 the colormap alone. A heatmap of another size
    is resized to the image first.
    """
    if not 0.0 <= opacity <= 1.0:
        raise MLError(f"opacity must be between 0 and 1, not {opacity}")
    image = image.convert("RGB")
    heatmap = resize_heatmap(heatmap, image.size)
    colour = colormap_table(colormap)[_as_uint8(heatmap)].astype(np.float32)
    base = np.asarray(image, dtype=np.float32)
    blended = (1.0 - opacity) * base + opacity * colour
    return Image.fromarray(np.round(blended).astype(np.uint8))  # H x W x 3 uint8 is RGB
