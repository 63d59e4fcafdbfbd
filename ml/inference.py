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


# What each class folder means on the page, in the reader's words.
CLASS_WORDS = {"normal": "no lesion", "benign": "benign-appearing", "malignant": "malignant-appearing",
               "cancer": "malignant-appearing"}


@dataclass(frozen=True)
class PredictionResult:
    probability: float   # calibrated probability of malignancy (malignant vs the rest)
    label: str           # "cancer" (suspicious for malignancy) or "normal" at ``threshold``
    threshold: float     # on the calibrated scale
    predicted_class: str | None = None            # most likely class of a multi-class model
    class_probabilities: dict[str, float] | None = None


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

    @property
    def resize(self) -> str:
        """How an image becomes the square input (ml.data.RESIZE_MODES); older checkpoints squash."""
        return str(self.meta.get("resize") or "square-bilinear")

    def to_uint8(self, images: Sequence[str | Path | Image.Image]) -> torch.Tensor:
        """Images (paths or PIL) -> the model-size uint8 tensor (CPU), as training caches them."""
        return torch.stack([resize_to_tensor(load_image(im), self.input_size, self.resize) for im in images])

    def normalised(self, uint8: torch.Tensor) -> torch.Tensor:
        """A ``to_uint8`` batch -> the normalised input on the model's device."""
        return normalise(uint8.to(self.device), self.meta["mean"], self.meta["std"])

    def to_batch(self, images: Sequence[str | Path | Image.Image]) -> torch.Tensor:
        """Images (paths or PIL) -> normalised tensor on the model's device."""
        return self.normalised(self.to_uint8(images))

    def label_for(self, probability: float) -> str:
        labels = self.meta["labels"]
        return labels[1] if probability >= self.threshold else labels[0]

    @property
    def class_names(self) -> list[str] | None:
        """The classes of a multi-class model, in output order; None for one logit."""
        return list(self.meta["class_names"]) if int(self.meta.get("num_outputs") or 1) > 1 else None

    def calibrate(self, logits: torch.Tensor) -> torch.Tensor:
        """Calibrated malignancy probabilities for malignancy logits (the checkpoint's
        calibration; an uncalibrated older checkpoint gives plain sigmoids)."""
        c = self.meta.get("calibration") or {"a": 1.0, "b": 0.0}
        return torch.sigmoid(logits.double() * float(c["a"]) + float(c["b"])).float()

    @torch.inference_mode()
    def outputs(self, batch: torch.Tensor) -> torch.Tensor:
        """Raw model outputs (N x K logits)."""
        return self.model(batch).float()

    def calibrated(self, output: torch.Tensor) -> torch.Tensor:
        """Calibrated malignancy probability per row of raw model outputs."""
        from ml.model import model_malignancy_logit

        return self.calibrate(model_malignancy_logit(self.model, output))

    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        """Calibrated malignancy probability per image of a normalised batch."""
        return self.calibrated(self.outputs(batch))

    def classes_of(self, output: torch.Tensor) -> list[tuple[str | None, dict[str, float] | None]]:
        """(most likely class, class probabilities) per row of raw outputs; (None, None)
        for a one-logit model."""
        names = self.class_names
        if names is None:
            return [(None, None)] * len(output)
        probs = torch.softmax(output.float(), dim=1)
        return [(names[int(row.argmax())], {n: round(float(v), 6) for n, v in zip(names, row)}) for row in probs]

    def predict(self, images: Sequence[str | Path | Image.Image], batch_size: int = 32) -> list[PredictionResult]:
        """Calibrated probability, label at the operating threshold and (multi-class
        models) the most likely class, per image, in order."""
        results: list[PredictionResult] = []
        for start in range(0, len(images), batch_size):
            output = self.outputs(self.to_batch(images[start:start + batch_size]))
            probs = self.calibrated(output)
            for p, (cls, dist) in zip(probs.tolist(), self.classes_of(output)):
                results.append(PredictionResult(p, self.label_for(p), self.threshold, cls, dist))
        return results
