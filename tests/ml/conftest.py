"""Small generated data for the ml tests: nothing here reads ../shared."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ml.data import IMAGENET_MEAN, IMAGENET_STD


def synthetic_image(rng: np.random.Generator, cancer: bool, size: tuple[int, int] = (48, 40)) -> Image.Image:
    """Speckled grey background; 'cancer' images carry a dark round lesion with a bright rim."""
    w, h = size
    arr = rng.normal(120, 25, (h, w)).clip(0, 255)
    if cancer:
        cy, cx = rng.integers(h // 4, 3 * h // 4), rng.integers(w // 4, 3 * w // 4)
        r = rng.integers(min(w, h) // 6, min(w, h) // 4 + 1)
        yy, xx = np.mgrid[:h, :w]
        d = np.hypot(yy - cy, xx - cx)
        arr[d < r] = 30
        arr[(d >= r) & (d < r + 2)] = 230
    return Image.fromarray(arr.astype(np.uint8), mode="L")


def make_folder(root: Path, n_per_class: int = 12, classes=("cancer", "normal"), seed: int = 0,
                size: tuple[int, int] = (48, 40)) -> Path:
    rng = np.random.default_rng(seed)
    for cls in classes:
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            img = synthetic_image(rng, cancer=cls in ("cancer", "malignant"), size=size)
            img.save(root / cls / f"{cls}_{i:03d}.png")
    return root


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    return make_folder(tmp_path / "data")


def tiny_meta(input_size: int = 32, threshold: float = 0.5) -> dict:
    return {"architecture": "resnet18", "class_names": ["cancer", "normal"], "positive_classes": ["cancer"],
            "labels": ["normal", "cancer"], "input_size": input_size, "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD), "threshold": threshold, "threshold_default": 0.5}
