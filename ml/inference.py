"""Batched prediction with a saved checkpoint, preprocessing exactly as training did."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from ml.checkpoint import load_model
from ml.data import normalise, resize_to_tensor, load_image
from ml.model import select_device


@dataclass(frozen=True)
class PredictionResult:
    probability: float   # sigmoid of the logit: model's probability of cancer
    label: str           # "cancer" or "normal" at ``threshold``
    threshold: float


class Predictor:
    """A loaded checkpoint ready to predict: the model, its metadata and its device."""

    def __init__(self, model: torch.nn.Module, meta: dict[str, Any], device: torch.device):
        self.model = model.to(memory_format=torch.channels_last)
        self.meta = meta
        self.device = device

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device | None = None) -> "Predictor":
        """Load once (raises CheckpointError with the reason for a bad file)."""
        dev = select_device(str(device) if device is not None else None)
        model, meta = load_model(path, dev)
        return cls(model, meta, dev)

    @property
    def threshold(self) -> float:
        return float(self.meta["threshold"])

    @property
    def input_size(self) -> int:
        return int(self.meta["input_size"])

    def to_batch(self, images: Sequence[str | Path | Image.Image]) -> torch.Tensor:
        """Images (paths or PIL) -> normalised tensor on the model's device."""
        uint8 = torch.stack([resize_to_tensor(load_image(im), self.input_size) for im in images])
        return normalise(uint8.to(self.device), self.meta["mean"], self.meta["std"])

    def label_for(self, probability: float) -> str:
        labels = self.meta["labels"]
        return labels[1] if probability >= self.threshold else labels[0]

    @torch.inference_mode()
    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model(batch).float().flatten())

    def predict(self, images: Sequence[str | Path | Image.Image], batch_size: int = 32) -> list[PredictionResult]:
        """Probability and label (at the checkpoint's operating threshold) per image, in order."""
        results: list[PredictionResult] = []
        for start in range(0, len(images), batch_size):
            probs = self.probabilities(self.to_batch(images[start:start + batch_size]))
            for p in probs.tolist():
                results.append(PredictionResult(p, self.label_for(p), self.threshold))
        return results
