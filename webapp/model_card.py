"""The model card of a registered version: what it is for, what it learnt from, how it
scored (with intervals, on which test set) and what it must not be used for. Built from
the registry row, plus evaluations recorded for bundled checkpoints (demo/evaluations.json,
keyed by the checkpoint's sha256)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from webapp.config import PROJECT_ROOT
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
#: Evaluations of bundled checkpoints made after the file was written (the demo model's
#: external test), keyed by sha256 so that no other file inherits them.
RECORDED_EVALUATIONS = PROJECT_ROOT / "demo" / "evaluations.json"

#: The metric rows of a card, in reading order, with the words shown for each.
METRICS = (
    ("roc_auc", "ROC-AUC"), ("sensitivity", "Sensitivity"), ("specificity", "Specificity"),
    ("precision", "Precision (PPV)"), ("f1", "F1"), ("accuracy", "Accuracy"), ("pr_auc", "PR-AUC"),
    ("brier", "Brier score"), ("ece", "Calibration error (ECE)"), ("ece_uncalibrated", "ECE before calibration"),
    ("threshold", "Threshold"),
    ("n", "Images"), ("n_positive", "Cancer images"),
    ("tp", "True positives"), ("fn", "False negatives"), ("tn", "True negatives"), ("fp", "False positives"),
)
_LABELS = dict(METRICS)


def metric_label(key: str) -> str:
    """The words for a metric key (``roc_auc`` -> ``ROC-AUC``; unknown keys spaced out)."""
    return _LABELS.get(key, key.replace("_", " "))


def metric_rows(values: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """(key, label, value) per metric, known ones first in METRICS order, then any others
    that are plain numbers; nested records (confusion matrices, curves) are left out."""
    values = dict(values or {})
    confusion = values.get("confusion")
    if isinstance(confusion, dict):  # counts of the 2 x 2 table, one row each
        for key in ("tp", "fn", "tn", "fp"):
            values.setdefault(key, confusion.get(key))
    rows = [(key, label, values[key]) for key, label in METRICS if values.get(key) is not None]
    known = {key for key, _ in METRICS} | {"recall", "roc_auc_ci"}
    rows += [(key, metric_label(key), value) for key, value in values.items()
             if key not in known and isinstance(value, (int, float)) and not isinstance(value, bool)]
    return rows


@dataclass
class TestEvaluation:
    """Figures on one test set, and where they come from."""

    test_set: str
    source: str
    metrics: dict[str, Any]
    rows: list[tuple[str, str, Any]]
    note: str | None = None
    command: str | None = None


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
    tests: list[TestEvaluation] = field(default_factory=list)  # locked / external test sets, if any
    validation_rows: list[tuple[str, str, Any]] = field(default_factory=list)
    validation_set: str = ""

    @property
    def headline_test(self) -> TestEvaluation | None:
        return self.tests[0] if self.tests else None


@lru_cache(maxsize=4)
def _recorded(path: Path, mtime: float) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def recorded_evaluations(checksum: str, path: Path = RECORDED_EVALUATIONS) -> list[dict[str, Any]]:
    """Evaluations recorded for the checkpoint with this sha256 (none for most versions)."""
    try:
        mtime = path.stat().st_mtime
    except OSError:
        return []
    found = _recorded(path, mtime).get(checksum) or []
    return [e for e in found if isinstance(e, dict) and isinstance(e.get("metrics"), dict)]


def _validation_set(meta: dict[str, Any], metrics: dict[str, Any]) -> str:
    n, positives = metrics.get("n"), metrics.get("n_positive")
    size = f"{int(n)} images" if isinstance(n, (int, float)) else "size not recorded"
    if isinstance(positives, (int, float)):
        size += f", {int(positives)} cancer"
    split = "the validation split held out during training"
    if meta.get("target_sensitivity"):
        target = float(meta["target_sensitivity"])
        confidence = meta.get("threshold_confidence")
        reached = metrics.get("target_confidence")
        rule = (f"kept on new cancers with probability {float(confidence):.0%}" if confidence
                else "met on these images")
        if confidence and isinstance(reached, (int, float)):
            rule += f"; {float(reached):.0%} reached"
        split += f" (threshold chosen on it for sensitivity {target:.2f}, {rule})"
    return f"{split}: {size}. Optimistic: the threshold and the best epoch were chosen on these images."


ARCH_WORDS = {"resnet18": "ResNet18", "efficientnet_lite0": "EfficientNet-Lite0"}


def _origin_words(origin: Any) -> str:
    """Where a network's starting weights came from, in words."""
    if not isinstance(origin, dict):
        return "(starting weights not recorded)"
    if origin.get("source") == "imagenet":
        digest = f", sha256 {str(origin['sha256'])[:12]}…" if origin.get("sha256") else ""
        return f"from ImageNet weights ({origin.get('package')} {origin.get('version') or ''}{digest})".replace(" )", ")")
    if origin.get("source") == "checkpoint":
        return f"fine-tuned from {origin.get('file')} ({_origin_words(origin.get('parent_origin'))})"
    return "from random weights"


def _legacy_origin(meta: dict[str, Any]) -> dict[str, Any] | None:
    """What a checkpoint written before ``weights_origin`` was recorded says of its start."""
    weights = (meta.get("args") or {}).get("weights") if isinstance(meta.get("args"), dict) else None
    if weights == "none":
        return {"source": "random"}
    return {"source": "checkpoint", "file": Path(str(weights)).name} if weights and weights != "imagenet" else None


def network_words(meta: dict[str, Any]) -> str:
    """The architecture and the origin of its weights, per member for an ensemble."""
    fallback = meta.get("weights_origin") or _legacy_origin(meta)
    members = (meta.get("ensemble") or {}).get("members") if isinstance(meta.get("ensemble"), dict) else None
    if isinstance(members, list) and members:
        return "; ".join(f"{ARCH_WORDS.get(m.get('architecture') or meta.get('architecture'), meta.get('architecture'))} "
                         f"{_origin_words(m.get('weights_origin') or fallback)}"
                         for m in members if isinstance(m, dict))
    arch = meta.get("architecture") or "resnet18"
    return f"{ARCH_WORDS.get(arch, arch)} {_origin_words(fallback)}"


RESIZE_WORDS = {"square-bilinear": "squashed to a square",
                "letterbox-bilinear": "letterboxed (scaled whole onto a black square: lesion shape kept)"}


def _recipe(meta: dict[str, Any]) -> dict[str, Any]:
    """How the model sees an image and what shaped its training, in words: the input and how
    a frame becomes it, the last feature grid (what layer4's heatmaps are drawn on), and the
    options that change what it attends to (lesion masks, MixStyle)."""
    size = meta.get("input_size")
    if not isinstance(size, int):
        return {}
    resize = meta.get("resize") or "square-bilinear"
    stride = int(meta.get("layer4_stride") or 2)
    grid = max(1, size // (16 * stride))
    recipe = {"network": network_words(meta), "input": f"{size} × {size} px, {RESIZE_WORDS.get(resize, resize)}",
              "last_feature_grid": f"{grid} × {grid} (layer4 stride {stride})"}
    if meta.get("input_norm") == "image":
        recipe["intensity"] = "each image standardised to its own mean and spread (scanner gain and contrast removed)"
    args = meta.get("args") if isinstance(meta.get("args"), dict) else {}
    if args.get("masks"):
        margin = args.get("mask_margin") or 0
        recipe["lesion_masks"] = (f"used: class activation kept on radiologists' outlines (weight "
                                  f"{args.get('mask_weight', 1.0):g}{f', margin {margin} cell(s)' if margin else ''})")
    if args.get("mixstyle"):
        recipe["mixstyle"] = f"p {args['mixstyle']:g} (feature styles mixed between images in training)"
    if args.get("randconv"):
        recipe["randconv"] = f"p {args['randconv']:g} (random-filter textures blended into training images)"
    site = meta.get("site_adaptation")
    bn = site.get("batchnorm") if isinstance(site, dict) else None
    if isinstance(bn, dict) and bn.get("images"):
        recipe["site_statistics"] = (f"batch-normalisation statistics re-estimated on {bn['images']} images of "
                                     f"{site.get('site') or 'this site'} (weight {float(bn.get('weight', 1)):g}; "
                                     "manage.py recalibrate --adapt-bn)")
    members = (meta.get("ensemble") or {}).get("members") if isinstance(meta.get("ensemble"), dict) else None
    if isinstance(members, list) and members:
        recipe["ensemble"] = (f"{len(members)} networks trained alike (seeds "
                              f"{', '.join(str(m.get('seed')) for m in members)}; best epochs "
                              f"{', '.join(str(m.get('epoch')) for m in members)}), their outputs averaged; "
                              "calibrated and explained as one")
    return recipe


def _calibration(meta: dict[str, Any]) -> str | None:
    """What the probability was calibrated on, with its case mix: a Platt fit carries the share
    of cancers it saw into every probability, so a site whose mix differs is told to recalibrate."""
    calibration = meta.get("calibration")
    if not (isinstance(calibration, dict) and calibration.get("method")):
        return None
    n, positive = calibration.get("n"), calibration.get("n_positive")
    mix = f" ({positive} malignant, {positive / n:.0%})" if isinstance(n, int) and isinstance(positive, int) and n else ""
    site = meta.get("site_adaptation")
    if isinstance(site, dict) and site.get("method") == "prevalence":
        return (f"{calibration['method']} on {n if n is not None else '?'} validation images of its training data, moved "
                f"from their {float(site['prevalence_before']):.0%} cancers to the {float(site['prevalence']):.0%} stated "
                f"for {site.get('site') or 'this site'} (manage.py recalibrate --prevalence; the same verdicts)")
    if isinstance(site, dict):
        return f"{calibration['method']} on {n if n is not None else '?'} reviewed cases of {site.get('site') or 'this site'}{mix}"
    return (f"{calibration['method']} on {n if n is not None else '?'} validation images{mix} of its training data: "
            "the probabilities assume their case mix; a site with another recalibrates on its reviewed cases "
            "(manage.py recalibrate)")


def _training(meta: dict[str, Any]) -> dict[str, Any]:
    training = dict(meta.get("training_data") or {})
    fingerprint = meta.get("data_fingerprint")
    if isinstance(fingerprint, dict):  # a checkpoint trained by `manage.py train`
        training.setdefault("files", fingerprint.get("n_files"))
        if fingerprint.get("n_positive") is not None:
            training.setdefault("cancer_images", fingerprint.get("n_positive"))
        training.setdefault("classes", ", ".join(fingerprint.get("classes") or []))
    if meta.get("training_sites"):
        training.setdefault("sites", "; ".join(meta["training_sites"]))
    if meta.get("epoch") is not None:
        training.setdefault("epoch", meta["epoch"])
    calibration = _calibration(meta)
    if calibration:
        training.setdefault("calibration", calibration)
    for key, value in _recipe(meta).items():
        training.setdefault(key, value)
    return {k: v for k, v in training.items() if v not in (None, "")}


def model_card(version: ModelVersion) -> ModelCard:
    """Everything the model card page shows for ``version``."""
    meta = version.meta or {}
    locked = meta.get("locked_test") or {}
    tests = []
    if locked:
        tests.append(TestEvaluation(
            test_set=meta.get("locked_test_data") or "the locked test set given to 'manage.py retrain --locked-test'",
            source="registry (evaluated when this version was trained)", metrics=locked, rows=metric_rows(locked)))
    for item in recorded_evaluations(version.checksum):
        tests.append(TestEvaluation(test_set=item.get("test_set") or "a recorded test set",
                                    source=f"demo/evaluations.json (evaluated {item.get('evaluated_at', 'later')})",
                                    metrics=item["metrics"], rows=metric_rows(item["metrics"]),
                                    note=item.get("note"), command=item.get("command")))
    metrics = dict(version.metrics or {})
    return ModelCard(version=version, training_data=_training(meta), locked_test=locked,
                     compared_with=meta.get("compared_with"), promotion=meta.get("promotion"), tests=tests,
                     validation_rows=metric_rows(metrics), validation_set=_validation_set(meta, metrics))
