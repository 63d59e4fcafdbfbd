"""One image in, one model input out: decoding any file or Pillow mode to RGB (DataError
when it cannot be read), fitting it to the square input (squashed or letterboxed,
RESIZE_MODES) and normalising a uint8 batch with the ImageNet statistics; `preprocess` does
all of it for a list of images. Training's cache (:mod:`ml.data`, which re-exports these
names) and prediction (:mod:`ml.inference`) prepare images with the same functions.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ml import MLError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DataError(MLError):
    """The data cannot be used as given (empty folder, one class, unreadable files...)."""


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB.

    16-bit and float images are scaled by their own min..max (medical exports rarely use the
    full 16-bit range); alpha is composited onto black; palettes and CMYK are expanded.
    """
    image = ImageOps.exif_transpose(image) if image.format in ("JPEG", "TIFF") else image
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = np.zeros_like(arr) if hi <= lo else (arr - lo) * (255.0 / (hi - lo))
        image = Image.fromarray(scaled.round().astype(np.uint8), mode="L")
    elif mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, rgba)
    elif mode == "1":
        image = image.convert("L")
    return image.convert("RGB")


def load_image(source: str | Path | Image.Image) -> Image.Image:
    """Open a path (or take a PIL image) and return it as RGB; raise DataError if unreadable."""
    if isinstance(source, Image.Image):
        return to_rgb(source)
    try:
        with Image.open(source) as img:
            img.load()
            return to_rgb(img)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image {source}: {exc}") from exc


# How an image becomes the model's square input (a checkpoint's ``resize``): squashed to the
# square, or scaled whole by its longer side and centred on black ("letterbox": shapes kept).
RESIZE_MODES = ("square-bilinear", "letterbox-bilinear")
# The command-line names of the modes (train --resize, benchmarks/train_sites.py --resize).
RESIZE_NAMES = {"squash": "square-bilinear", "letterbox": "letterbox-bilinear"}


def check_resize(mode: str) -> str:
    if mode not in RESIZE_MODES:
        raise DataError(f"resize must be one of {', '.join(RESIZE_MODES)}, not {mode!r}")
    return mode


def content_box(width: int, height: int, size: int, mode: str = "square-bilinear") -> tuple[int, int, int, int]:
    """Where a ``width`` x ``height`` image lies in the ``size`` x ``size`` input:
    (left, top, right, bottom), the whole square unless letterboxed."""
    if check_resize(mode) == "square-bilinear" or width == height:
        return 0, 0, size, size
    scale = size / max(width, height)
    w, h = max(1, round(width * scale)), max(1, round(height * scale))
    left, top = (size - w) // 2, (size - h) // 2
    return left, top, left + w, top + h


def fit_square(image: Image.Image, size: int, mode: str = "square-bilinear") -> Image.Image:
    """``image`` as the ``size`` x ``size`` input (bilinear with antialiasing; see RESIZE_MODES)."""
    left, top, right, bottom = content_box(*image.size, size, mode)
    resized = image.resize((right - left, bottom - top), Image.BILINEAR, reducing_gap=None)
    if resized.size == (size, size):
        return resized
    canvas = Image.new(image.mode, (size, size))   # black (0) around the image
    canvas.paste(resized, (left, top))
    return canvas


def resize_to_tensor(image: Image.Image, size: int, mode: str = "square-bilinear") -> torch.Tensor:
    """RGB PIL image -> uint8 tensor 3 x size x size (squashed, or letterboxed: RESIZE_MODES)."""
    resized = fit_square(image, size, mode)
    return torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy()).permute(2, 0, 1)


def normalise(batch_uint8: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 N x 3 x H x W -> float32 normalised, channels_last (faster convolutions on CPU)."""
    mean_t = torch.tensor(mean, dtype=torch.float32, device=batch_uint8.device).view(1, 3, 1, 1) * 255
    std_t = torch.tensor(std, dtype=torch.float32, device=batch_uint8.device).view(1, 3, 1, 1) * 255
    out = (batch_uint8.float() - mean_t) / std_t
    return out.contiguous(memory_format=torch.channels_last)


def preprocess(images: Iterable[str | Path | Image.Image], size: int,
               mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
               resize: str = "square-bilinear") -> torch.Tensor:
    """Evaluation preprocessing exactly as training: RGB, square input, ImageNet normalisation."""
    tensors = [resize_to_tensor(load_image(img), size, resize) for img in images]
    if not tensors:
        raise DataError("no images given")
    return normalise(torch.stack(tensors), mean, std)
