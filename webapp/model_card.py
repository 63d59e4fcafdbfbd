"""The model card of a registered version: what it is for, what it learnt from, how it
scored (with intervals) and what it must not be used for. Built from the registry row."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from webapp.models import ModelVersion

INTENDED_USE = ("Research and clinical-review support: flags breast ultrasound images as cancer or "
                "normal so that expert reviewers can check the output and correct it.")
NOT_FOR = "NOT for clinical use: not a diagnosis, not a medical device, not validated prospectively."
LIMITATIONS = (
    "Trained and tested on small, single-source data sets; performance on other scanners, sites or "
    "populations is unknown.",
    "Validation figures from a random split are optimistic where near-duplicate images exist; "
    "the locked test set is the fairer figure.",
    "Reviewer feedback is selected by which cases were reviewed, not a random sample.",
    "The heatmap shows where the model looked, not why; it can highlight borders or annotations.",
)


@dataclass
class ModelCard:
    version: ModelVersion
    intended_use: str = INTENDED_USE
    not_for: str = NOT_FOR
    limitations: tuple[str, ...] = LIMITATIONS
    training_data: dict[str, Any] = field(default_factory=dict)
    locked_test: dict[str, Any] = field(default_factory=dict)
    compared_with: dict[str, Any] | None = None
    promotion: dict[str, Any] | None = None


def model_card(version: ModelVersion) -> ModelCard:
    """Everything the model card page shows for ``version``."""
    meta = version.meta or {}
    training = dict(meta.get("training_data") or {})
    fingerprint = meta.get("data_fingerprint")
    if isinstance(fingerprint, dict):  # a checkpoint trained by `manage.py train`
        training.setdefault("files", fingerprint.get("n_files"))
        training.setdefault("classes", ", ".join(fingerprint.get("classes") or []))
    return ModelCard(version=version, training_data=training, locked_test=meta.get("locked_test") or {},
                     compared_with=meta.get("compared_with"), promotion=meta.get("promotion"))
