"""The learning loop: feedback export -> merge with base data -> train -> evaluate on the
locked test set -> register -> promotion gate. `manage.py retrain` only parses and calls
`retrain`; the model registry commands call `promote` and `rollback`.

Runs inside the Flask app context; imports torch (through ml.train) only when called.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flask import current_app
from sqlalchemy import select

from webapp.extensions import db
from webapp.models import ModelVersion, User, audit
from webapp.registry import RegistryError, activate_version, register_model_version
from worker.feedback import FeedbackExport, export_feedback, select_feedback

PROMOTE_MODES = ("auto", "never", "force")
INIT_MODES = ("active", "imagenet", "none")
# The figures compared side by side, in the order printed.
COMPARED = ("roc_auc", "sensitivity", "specificity", "precision", "f1", "accuracy", "threshold", "n", "n_positive")


class RetrainError(ValueError):
    """The retraining cannot run as asked; the message says what to change."""


@dataclass
class PromotionDecision:
    promote: bool
    reasons: list[str]


@dataclass
class RetrainOutcome:
    version: ModelVersion
    previous: ModelVersion | None
    candidate_metrics: dict[str, Any]
    active_metrics: dict[str, Any] | None
    decision: PromotionDecision
    feedback: FeedbackExport
    merge: Any
    report_files: list[Path] = field(default_factory=list)


def _number(metrics: dict | None, key: str) -> float:
    value = (metrics or {}).get(key)
    return float("nan") if value is None else float(value)


def promotion_decision(candidate: dict[str, Any], active: dict[str, Any] | None, target_sensitivity: float,
                       mode: str = "auto", min_specificity: float = 0.0) -> PromotionDecision:
    """Whether the candidate becomes active, and why, from locked-test metrics.

    ``auto`` promotes only if the candidate's ROC-AUC is not lower than the active
    model's (no active model: nothing to beat), its sensitivity at its own threshold
    is at least ``target_sensitivity``, and its specificity there is at least
    ``min_specificity`` or not lower than the active model's (a floor that stops a
    threshold which calls nearly every case suspicious, without locking out a version
    that is no worse than the live one); a metric that could not be computed fails.
    ``never`` registers only; ``force`` promotes and lists what the gate would have said.
    """
    if mode not in PROMOTE_MODES:
        raise RetrainError(f"--promote must be one of {', '.join(PROMOTE_MODES)}")
    failures = []
    auc, sens = _number(candidate, "roc_auc"), _number(candidate, "sensitivity")
    if active is not None:
        active_auc = _number(active, "roc_auc")
        if math.isnan(auc) or (not math.isnan(active_auc) and auc < active_auc):
            failures.append(f"ROC-AUC {auc:.3f} is lower than the active model's {active_auc:.3f}")
    elif math.isnan(auc):
        failures.append("ROC-AUC could not be computed on the locked test set")
    if math.isnan(sens) or sens < target_sensitivity:
        failures.append(f"sensitivity {sens:.3f} at its threshold is below the target {target_sensitivity:.3f}")
    spec = _number(candidate, "specificity")
    if min_specificity > 0 and (math.isnan(spec) or spec < min_specificity):
        active_spec = _number(active, "specificity") if active is not None else float("nan")
        if math.isnan(spec) or math.isnan(active_spec) or spec < active_spec:
            also = "" if math.isnan(active_spec) else f" and below the active model's {active_spec:.3f}"
            failures.append(f"specificity {spec:.3f} at its threshold is below the floor {min_specificity:.3f}{also}: "
                            f"it would call most cases without cancer suspicious")
    if mode == "never":
        return PromotionDecision(False, ["--promote never: registered only"] + failures)
    if mode == "force":
        return PromotionDecision(True, ["--promote force: gate not applied"] + failures)
    if failures:
        return PromotionDecision(False, failures)
    return PromotionDecision(True, ["ROC-AUC not lower than the active model's, sensitivity meets the target"
                                    + (" and specificity clears the floor" if min_specificity > 0 else "")])


def _specificity_floor(value: float | None) -> float:
    """The gate's specificity floor: ``value``, else the app's RETRAIN_MIN_SPECIFICITY."""
    floor = current_app.config["RETRAIN_MIN_SPECIFICITY"] if value is None else value
    if not 0 <= floor <= 1:
        raise RetrainError(f"the specificity floor must lie between 0 and 1, not {floor}")
    return float(floor)


def _clean(result: dict[str, Any]) -> dict[str, Any]:
    """Evaluation results as JSON-safe values (NaN as null, raw score arrays dropped)."""
    from ml.evaluate import to_json

    data = json.loads(to_json(result))
    data.pop("calibration", None)
    data.pop("model", None)
    return data


def _folder_fingerprint(folder: str | Path) -> str:
    from ml.export import locked_test_digests

    return hashlib.sha256("\n".join(sorted(locked_test_digests(folder))).encode()).hexdigest()


def check_locked_test(locked_test: str | Path, *checkpoint_metas: dict[str, Any] | None) -> int:
    """Refuse, before any training, a locked test set that a model could not be scored on.

    Each model is evaluated with its own positive classes plus the ``cancer``/``malignant``
    synonyms, so the set must hold both a positive and a negative folder under those rules.
    Returns the number of image files found.
    """
    from ml import MLError
    from ml.data import positive_names, scan_folder

    count = 0
    for meta in checkpoint_metas or (None,):
        try:
            count = len(scan_folder(locked_test, positive_names((meta or {}).get("positive_classes"))))
        except MLError as exc:
            raise RetrainError(f"the locked test set cannot compare the models: {exc}") from None
    return count


def retrain(base_data: str | Path, locked_test: str | Path, work_dir: str | Path, *, epochs: int = 10,
            init: str = "active", promote: str = "auto", img_size: int | None = None, batch_size: int = 32,
            seed: int = 0, min_reviews: int = 1, consensus_rule: str = "majority",
            target_sensitivity: float | None = None, n_boot: int = 1000, name: str | None = None,
            actor: User | None = None, feedback_weight: int = 1, group_pattern: str | None = None,
            min_specificity: float | None = None, arch: str | None = None) -> RetrainOutcome:
    """Run the whole loop once and return what happened (see the module docstring).

    The new version is registered whatever the decision (with its parent, data
    fingerprint, locked-test metrics and ROC curve), so a refused model can still be
    inspected or promoted by hand later. Raises RetrainError or ml.MLError for input
    an admin can fix; nothing is registered then.

    Images whose patient is known (a reviewed DICOM case's ``patient_key``; a base file
    name matched by ``group_pattern``) keep each patient on one side of the fine-tune's
    validation split, from which the new threshold and calibration are fitted.
    """
    from ml.evaluate import evaluate_folder, write_report
    from ml.export import MERGED_GROUP_PATTERN, merge_training_data
    from ml.checkpoint import load_checkpoint
    from ml.data import compile_group_pattern
    from ml.ensemble import fine_tune
    from ml.train import TrainConfig

    if init not in INIT_MODES:
        raise RetrainError(f"--init must be one of {', '.join(INIT_MODES)}")
    if group_pattern:
        compile_group_pattern(group_pattern)   # a broken pattern fails before anything is written
    if promote not in PROMOTE_MODES:
        raise RetrainError(f"--promote must be one of {', '.join(PROMOTE_MODES)}")
    target = current_app.config["RETRAIN_TARGET_SENSITIVITY"] if target_sensitivity is None else target_sensitivity
    floor = _specificity_floor(min_specificity)
    store = current_app.extensions["file_store"]
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    active = db.session.scalar(select(ModelVersion).where(ModelVersion.is_active.is_(True)))
    if init == "active" and active is None:
        raise RetrainError("--init active: there is no active model to start from; use --init imagenet or none")
    active_path = store.path(active.file_key) if active is not None else None
    if init == "active" and arch and arch != (active.meta or {}).get("architecture", "resnet18"):
        raise RetrainError(f"--arch {arch}: the active model is a {(active.meta or {}).get('architecture')} network; "
                           "--init active keeps it (use --init imagenet for another architecture)")
    # Checked now, not after an hour of training: both models must be scorable on it.
    check_locked_test(locked_test, active.meta if active is not None else None, {"positive_classes": ["malignant"]})

    feedback = export_feedback(work / "feedback", min_reviews=min_reviews, rule=consensus_rule)
    merge = merge_training_data(base_data, work / "feedback", locked_test, work / "train",
                                feedback_copies=feedback_weight, group_pattern=group_pattern)
    size = img_size or (active.input_size if active is not None and active.input_size else 224)
    checkpoint = work / "candidate.pt"
    checkpoint.unlink(missing_ok=True)
    cfg = TrainConfig(data=str(work / "train"), out=str(checkpoint), epochs=epochs,
                      weights=str(active_path) if init == "active" else init, img_size=size,
                      arch=None if init == "active" else arch,
                      batch_size=batch_size, seed=seed, target_sensitivity=target, progress=False,
                      group_pattern=MERGED_GROUP_PATTERN if merge.n_grouped else None)
    fine_tune(cfg)   # fit(cfg); from an active ensemble, every member is fine-tuned and recombined

    candidate_eval = evaluate_folder(checkpoint, locked_test, n_boot=n_boot)
    candidate_metrics = _clean(candidate_eval)
    active_metrics = _clean(evaluate_folder(active_path, locked_test, n_boot=n_boot)) if active is not None else None
    report_files = write_report(candidate_eval, work / "report")
    roc_key, _ = store.put((work / "report" / "roc.png").read_bytes(), "reports", ".png")
    decision = promotion_decision(candidate_metrics, active_metrics, target, promote, floor)

    meta = dict(load_checkpoint(checkpoint)["meta"])
    meta.update({
        "data_fingerprint": merge.fingerprint,
        "locked_test": dict(candidate_metrics, fingerprint=_folder_fingerprint(locked_test)),
        "compared_with": {"version": active.name, "locked_test": active_metrics} if active is not None else None,
        "training_data": {"base_data": str(base_data), "n_base": merge.n_base, "n_feedback": merge.n_feedback,
                          "duplicates_removed": merge.duplicates_removed,
                          "relabelled_by_feedback": merge.relabelled_by_feedback,
                          "left_out_locked_test": merge.left_out_locked_test, "per_label": merge.per_label,
                          "feedback_left_out": dict(feedback.left_out), "init": init, "epochs": epochs,
                          "feedback_weight": feedback_weight, "group_pattern": group_pattern,
                          "images_with_patient": merge.n_grouped, "patients": merge.n_patients},
        "roc_key": roc_key,
        "promotion": {"mode": promote, "promote": decision.promote, "reasons": decision.reasons,
                      "target_sensitivity": target, "min_specificity": floor},
    })
    version = _register_and_gate(checkpoint, meta, active, decision, promote, name, actor,
                                 notes=f"retrained from {active.name if active else 'scratch'} with "
                                       f"{merge.n_feedback} reviewed case(s)")
    return RetrainOutcome(version, active, candidate_metrics, active_metrics, decision, feedback, merge, report_files)


def _register_and_gate(checkpoint: Path, meta: dict[str, Any], active: ModelVersion | None,
                       decision: PromotionDecision, promote: str, name: str | None, actor: User | None,
                       notes: str) -> ModelVersion:
    """Register the candidate (parent: the active version) and apply the gate's decision,
    audited in the same transaction; RetrainError when the registry refuses it."""
    try:
        version = register_model_version(checkpoint, meta, name=name, actor=actor, parent=active, notes=notes)
    except RegistryError as exc:
        raise RetrainError(f"not registered: {exc}") from None
    if decision.promote:
        audit("model.promote", actor=actor, target=version, mode=promote, reasons=decision.reasons,
              previous=active.name if active else None)
        activate_version(version, actor)  # commits the activation and the audit events together
    else:
        audit("model.promotion_refused", actor=actor, target=version, mode=promote, reasons=decision.reasons)
        db.session.commit()
    return version


def comparison_table(outcome: RetrainOutcome) -> list[str]:
    """Side-by-side lines: metric, active model, new model (locked test set)."""
    active_name = outcome.previous.name if outcome.previous else "(none)"
    lines = [f"{'locked test set':16} {active_name + ' (active)':>18} {outcome.version.name + ' (new)':>18}"]

    def fmt(metrics, key):
        value = (metrics or {}).get(key)
        if value is None:
            return "–"
        return f"{value:d}" if isinstance(value, int) else f"{value:.3f}"

    for key in COMPARED:
        lines.append(f"{key:16} {fmt(outcome.active_metrics, key):>18} {fmt(outcome.candidate_metrics, key):>18}")
    ci = outcome.candidate_metrics.get("roc_auc_ci") or [None, None]
    if None not in ci:
        lines.append(f"{'new ROC-AUC 95% CI':16} {'':>18} {f'{ci[0]:.3f}-{ci[1]:.3f}':>18}")
    verdict = "PROMOTED: now the active model" if outcome.decision.promote else "NOT PROMOTED"
    lines.append(f"decision: {verdict} ({'; '.join(outcome.decision.reasons)})")
    return lines


def site_images() -> list[Path]:
    """The stored images of this site's uploads, newest first (at most
    ml.adapt.MAX_ADAPT_IMAGES; withdrawn cases and missing files left out): what
    ``recalibrate --adapt-bn`` measures the site's statistics on."""
    from ml.adapt import MAX_ADAPT_IMAGES
    from webapp.models import Case

    store = current_app.extensions["file_store"]
    query = select(Case.image_key).where(Case.withdrawn_at.is_(None)).order_by(Case.id.desc())
    paths = []
    for key in db.session.scalars(query):
        if store.exists(key):
            paths.append(store.path(key))
            if len(paths) == MAX_ADAPT_IMAGES:
                break
    return paths


@dataclass
class RecalibrationOutcome:
    version: ModelVersion
    previous: ModelVersion
    candidate_metrics: dict[str, Any]
    active_metrics: dict[str, Any]
    decision: PromotionDecision
    feedback: FeedbackExport | None   # None: moved to a stated prevalence, no reviewed cases used
    site_adaptation: dict[str, Any]


def recalibrate_active(locked_test: str | Path, work_dir: str | Path, *, promote: str = "auto",
                       target_sensitivity: float | None = None, min_reviews: int = 1,
                       consensus_rule: str = "majority", site: str | None = None, n_boot: int = 1000,
                       name: str | None = None, actor: User | None = None,
                       confidence: float | None = None, min_specificity: float | None = None,
                       prevalence: float | None = None, adapt_bn: bool = False,
                       adapt_bn_weight: float = 1.0) -> RecalibrationOutcome:
    """Adapt the active model to this site without retraining: refit its calibration and
    threshold on the reviewed cases (their consensus verdict), register the result as a new
    version (parent: the active one) and put it through the same gate as ``retrain`` on
    ``locked_test`` (same weights, so the same ROC-AUC; the gate's test is the sensitivity
    at the new threshold). ``confidence``: how sure the threshold must be to keep the target
    sensitivity on the site's next cases (None: ml.adapt.SITE_THRESHOLD_CONFIDENCE; 0: met on
    the reviewed cases only, the rule before 2026-11-27). ``prevalence``: instead, move the
    probabilities to a site where this share of cases is malignant (ml.adapt.set_prevalence:
    no reviewed cases used, every verdict kept). ``adapt_bn``: first re-estimate the
    network's batch-normalisation statistics on the site's uploads, reviewed or not
    (ml.adapt.adapt_batchnorm, ``adapt_bn_weight`` of the site's against the training
    statistics); the ranking then changes too, and the gate's ROC-AUC test decides."""
    from ml import MLError
    from ml.adapt import SITE_THRESHOLD_CONFIDENCE, recalibrate, set_prevalence
    from ml.evaluate import evaluate_folder

    if promote not in PROMOTE_MODES:
        raise RetrainError(f"--promote must be one of {', '.join(PROMOTE_MODES)}")
    if adapt_bn and prevalence is not None:
        raise RetrainError("--prevalence keeps every verdict; --adapt-bn changes the network's scores: "
                           "give one or the other")
    target = current_app.config["RETRAIN_TARGET_SENSITIVITY"] if target_sensitivity is None else target_sensitivity
    floor = _specificity_floor(min_specificity)
    store = current_app.extensions["file_store"]
    active = db.session.scalar(select(ModelVersion).where(ModelVersion.is_active.is_(True)))
    if active is None:
        raise RetrainError("there is no active model to adapt")
    active_path = store.path(active.file_key)
    check_locked_test(locked_test, active.meta)
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = work / "recalibrated.pt"
    feedback = None
    try:
        if prevalence is not None:
            meta = set_prevalence(active_path, checkpoint, prevalence, site)
            used = {"stated_prevalence": prevalence}
            notes = f"{active.name} moved to a stated prevalence of {prevalence:.1%}" + (f" for {site}" if site else "")
        else:
            # the reviewed uploads themselves (as the worker reads them) with their consensus verdicts
            feedback = select_feedback(min_reviews=min_reviews, rule=consensus_rule)
            images = [item.image for item in feedback.items]
            malignant = [int(item.verdict == "cancer") for item in feedback.items]
            conf = SITE_THRESHOLD_CONFIDENCE if confidence is None else (confidence or None)
            uploads = site_images() if adapt_bn else None
            meta = recalibrate(active_path, images, malignant, checkpoint, target, site, confidence=conf,
                               site_images=uploads, site_weight=adapt_bn_weight)
            used = {"site_adaptation_cases": len(feedback.items),
                    "per_label": dict(Counter(item.label for item in feedback.items)),
                    "feedback_left_out": dict(feedback.left_out)}
            notes = f"{active.name} recalibrated on {len(feedback.items)} reviewed case(s)" + (f" of {site}" if site else "")
            if adapt_bn:
                bn = meta["site_adaptation"]["batchnorm"]
                notes += f", its batch-normalisation statistics re-estimated on {bn['images']} of the site's images"
    except MLError as exc:
        raise RetrainError(str(exc)) from None
    weights = f"unchanged from {active.name}" + (", batch-normalisation statistics of this site" if adapt_bn else "")
    candidate_metrics = _clean(evaluate_folder(checkpoint, locked_test, n_boot=n_boot))
    active_metrics = _clean(evaluate_folder(active_path, locked_test, n_boot=n_boot))
    decision = promotion_decision(candidate_metrics, active_metrics, target, promote, floor)
    meta.update({
        "locked_test": dict(candidate_metrics, fingerprint=_folder_fingerprint(locked_test)),
        "compared_with": {"version": active.name, "locked_test": active_metrics},
        "training_data": dict(used, weights=weights),
        "promotion": {"mode": promote, "promote": decision.promote, "reasons": decision.reasons,
                      "target_sensitivity": target, "min_specificity": floor},
    })
    version = _register_and_gate(checkpoint, meta, active, decision, promote, name, actor,
                                 notes=notes)
    return RecalibrationOutcome(version, active, candidate_metrics, active_metrics, decision, feedback,
                                meta["site_adaptation"])
