"""Write reviewed cases as an ImageFolder, and merge such a folder into training data.

Pillow and the standard library only (no torch), so the command that gathers the rows
from the database stays light. Images are re-encoded from their pixels alone: no EXIF,
text chunks, ICC profiles or other metadata reach the export.
"""
from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageOps

from ml import MLError
from ml.hashing import file_sha256

# The class folders of an export and of merged training data (malignant = the positive class).
EXPORT_LABELS = ("malignant", "benign", "normal")
MANIFEST = "manifest.csv"
MANIFEST_FIELDS = ("case_id", "file", "label", "verdict", "class_source", "source", "n_reviews", "votes_cancer", "votes_normal",
                   "model_label", "model_version", "sha256", "file_sha256", "first_review_at", "last_review_at",
                   "patient_key")
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".pgm", ".ppm"}


class ExportError(MLError):
    """The export cannot be written as asked (unknown label, unreadable image, ...)."""


@dataclass(frozen=True)
class FeedbackImage:
    """One reviewed case to export. ``image`` is a path or the image's bytes; ``sha256``
    is the digest of the image as uploaded (the key that finds duplicates later)."""

    case_id: int
    image: Path | bytes
    label: str                       # the class folder: malignant, benign or normal
    sha256: str
    source: str = ""                 # "model-confirmed" or "reviewer-corrected"
    n_reviews: int = 0
    votes_cancer: int = 0
    votes_normal: int = 0
    model_label: str = ""
    model_version: str = ""
    first_review_at: str = ""
    last_review_at: str = ""
    verdict: str = ""                # the reviewers' consensus: cancer (malignant) or normal (not)
    class_source: str = ""           # where a not-malignant class came from: reviewers, model or default
    patient_key: str = ""            # the case's per-site patient pseudonym (DICOM), "" when unknown


@dataclass
class ExportSummary:
    written: int = 0
    unchanged: int = 0
    removed: int = 0
    per_label: dict[str, int] = field(default_factory=dict)


def clean_png(source: Path | bytes) -> bytes:
    """The image's pixels as a PNG with no metadata (orientation applied, then dropped).

    Greyscale stays greyscale; 16-bit is scaled to 8-bit by its own range; anything else
    becomes RGB (alpha composited on black).
    """
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                arr = np.asarray(img, dtype=np.float64)
                lo, hi = float(arr.min()), float(arr.max())
                arr = np.zeros_like(arr) if hi <= lo else (arr - lo) * (255.0 / (hi - lo))
                pixels = arr.round().astype(np.uint8)
            elif img.mode in ("L", "RGB"):
                pixels = np.asarray(img)
            else:
                rgba = img.convert("RGBA")
                pixels = np.asarray(Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ExportError(f"cannot read image {source if not isinstance(source, bytes) else '(bytes)'}: {exc}") from exc
    # A new image from the pixel array alone carries no info dict to leak.
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def _file_name(case_id: int) -> str:
    return f"case-{case_id:06d}.png"


def _read_manifest(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


# Exported and merged images are patients' images: readable by their owner only, as the
# instance folder is (0700 folders, 0600 files), whatever the umask of the admin's shell.
def _private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    for folder in (path, path.parent):
        if folder.stat().st_mode & 0o077:
            folder.chmod(0o700)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)  # an existing file keeps its old mode through O_CREAT


def _copy_private(source: Path, target: Path) -> None:
    shutil.copyfile(source, target)
    os.chmod(target, 0o600)


def write_feedback_folder(items: Iterable[FeedbackImage], out_dir: str | Path) -> ExportSummary:
    """Write ``out_dir/malignant``, ``out_dir/benign`` and ``out_dir/normal`` (one PNG per
    case, named from the case id) and ``manifest.csv`` with one row per image, sorted by case id.

    Re-running into the same folder is safe: files whose content is unchanged are left
    alone, a case whose label changed moves, and images this export wrote before but no
    longer selects are removed. Files that no manifest of ours lists are never touched.
    """
    out = Path(out_dir)
    items = sorted(items, key=lambda i: i.case_id)
    if len({i.case_id for i in items}) != len(items):
        raise ExportError("a case appears twice in the export")
    for item in items:
        if item.label not in EXPORT_LABELS:
            raise ExportError(f"case {item.case_id}: label {item.label!r} is not one of {', '.join(EXPORT_LABELS)}")
    previous = _read_manifest(out / MANIFEST)
    summary = ExportSummary(per_label={label: 0 for label in EXPORT_LABELS})
    rows, keep = [], set()
    for label in EXPORT_LABELS:
        _private_dir(out / label)
    for item in items:
        data = clean_png(item.image)
        relative = f"{item.label}/{_file_name(item.case_id)}"
        target = out / relative
        if target.is_file() and target.read_bytes() == data:
            summary.unchanged += 1
        else:
            tmp = target.with_name(target.name + ".tmp")
            _write_private(tmp, data)
            os.replace(tmp, target)  # never a half-written image under its real name
            summary.written += 1
        keep.add(relative)
        summary.per_label[item.label] += 1
        rows.append({"case_id": item.case_id, "file": relative, "label": item.label, "verdict": item.verdict,
                     "class_source": item.class_source, "source": item.source,
                     "n_reviews": item.n_reviews, "votes_cancer": item.votes_cancer, "votes_normal": item.votes_normal,
                     "model_label": item.model_label, "model_version": item.model_version, "sha256": item.sha256,
                     "file_sha256": hashlib.sha256(data).hexdigest(), "first_review_at": item.first_review_at,
                     "last_review_at": item.last_review_at, "patient_key": item.patient_key})
    for old in previous:
        relative = old.get("file", "")
        # Only our own names in our own folders: a damaged manifest cannot delete elsewhere.
        if relative not in keep and relative.split("/")[0] in EXPORT_LABELS + ("cancer",) and relative.count("/") == 1:
            path = out / relative
            if path.is_file():
                path.unlink()
                summary.removed += 1
    tmp = out / (MANIFEST + ".tmp")   # it names patients' keys: private too
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w", newline="") as fh:
        os.fchmod(fh.fileno(), 0o600)
        writer = csv.DictWriter(fh, fieldnames=MANIFEST_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, out / MANIFEST)
    return summary


# ------------------------------------------------------------------ merging for retraining

@dataclass
class MergeSummary:
    n_base: int = 0
    n_feedback: int = 0
    duplicates_removed: int = 0
    relabelled_by_feedback: int = 0
    left_out_locked_test: int = 0
    per_label: dict[str, int] = field(default_factory=dict)
    fingerprint: str = ""
    n_grouped: int = 0       # images whose patient is known (a manifest's patient_key, or the base pattern)
    n_patients: int = 0      # distinct patients among them


# A merged image whose patient is known carries a group tag in its name; ml.train's
# ``group_pattern`` with this pattern keeps one patient's images on one side of the split.
MERGED_GROUP_PATTERN = r"\.g([0-9a-f]{12})\."


def _group_tag(kind: str, key: str) -> str:
    """A file-name-safe tag for one patient (a digest: names and keys may hold any character)."""
    return hashlib.sha256(f"{kind}\0{key}".encode()).hexdigest()[:12]


def _label_of(folder_name: str, positive: Sequence[str]) -> str:
    """The merged class of a base-data folder: malignant (a positive folder), benign, or normal."""
    name = folder_name.lower()
    if name in positive:
        return "malignant"
    return "benign" if name == "benign" else "normal"


def _folder_images(root: Path) -> list[tuple[Path, str]]:
    """(image path, class folder name) for every image of an ImageFolder directory."""
    if not root.is_dir():
        raise ExportError(f"data directory {root} does not exist")
    found = []
    for class_dir in sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")):
        for path in sorted(class_dir.rglob("*")):
            if path.is_file() and path.suffix.lower() in _IMAGE_SUFFIXES:
                found.append((path, class_dir.name))
    return found


def locked_test_digests(locked_test: str | Path) -> set[str]:
    """sha256 of every image file in the locked test folder."""
    return {file_sha256(path) for path, _ in _folder_images(Path(locked_test))}


def merge_training_data(base_data: str | Path, feedback_dir: str | Path | None, locked_test: str | Path,
                        out_dir: str | Path, positive_classes: Sequence[str] = ("cancer", "malignant"),
                        feedback_copies: int = 1, group_pattern: str | None = None) -> MergeSummary:
    """Build a malignant/benign/normal ImageFolder for training from base data plus a feedback
    export (a base folder with only cancer/normal gives malignant/normal: a binary run).

    ``feedback_copies`` > 1 writes each reviewed image that many times (``DIGEST.cK.png``),
    so a few hundred site cases weigh more against a large base set in a fine-tune; the
    copies are identical images, so the near-duplicate grouping of ``ml.train`` keeps them
    on one side of the validation split.

    Images are identified by sha256: a feedback image that is also in the base data
    appears once, with the feedback label (the reviewers' word wins); an image whose
    content, or whose original upload, is in the locked test set never enters training.
    Files are named by their sha256, so the data fingerprint depends on content and
    labels only. ``out_dir`` is rebuilt from scratch.

    Where the patient is known (a reviewed case's ``patient_key`` in the manifest, or a
    base file name matched by ``group_pattern``: its first group, or the whole match), the
    name also carries a tag of the patient (``DIGEST.gTAG.png``; see MERGED_GROUP_PATTERN)
    so that training can keep each patient's images on one side of the validation split.
    """
    positive = [p.lower() for p in positive_classes]
    try:
        base_rx = re.compile(group_pattern) if group_pattern else None
    except re.error as exc:
        raise ExportError(f"group pattern {group_pattern!r} is not a regular expression: {exc}") from None
    locked = locked_test_digests(locked_test)
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    if feedback_copies < 1:
        raise ExportError("feedback_copies must be at least 1")
    chosen: dict[str, tuple[Path, str]] = {}   # content sha256 -> (file, label)
    from_feedback: set[str] = set()
    tags: dict[str, str] = {}                  # content sha256 -> patient tag, where known
    summary = MergeSummary()
    for path, class_name in _folder_images(Path(base_data)):
        digest = file_sha256(path)
        if digest in locked:
            summary.left_out_locked_test += 1
        elif digest in chosen:
            summary.duplicates_removed += 1
        else:
            chosen[digest] = (path, _label_of(class_name, positive))
            summary.n_base += 1
            match = base_rx.search(path.name) if base_rx is not None else None
            if match:
                tags[digest] = _group_tag("name", match.group(1) if base_rx.groups else match.group(0))
    if feedback_dir is not None:
        feedback = Path(feedback_dir)
        for row in _read_manifest(feedback / MANIFEST):
            path = feedback / row["file"]
            if row["label"] not in EXPORT_LABELS or not path.is_file():
                raise ExportError(f"{feedback / MANIFEST} lists {row['file']}, which is missing or mislabelled")
            identities = {row["sha256"], row.get("file_sha256") or file_sha256(path)}
            if identities & locked:
                summary.left_out_locked_test += 1
                continue
            same = [d for d in identities if d in chosen]
            named = [tags.pop(d) for d in same if d in tags]   # the base file's patient, if its name gave one
            for digest in same:
                if chosen[digest][1] != row["label"]:
                    summary.relabelled_by_feedback += 1
                summary.duplicates_removed += 1
                summary.n_base -= 1
                del chosen[digest]
            chosen[row["sha256"]] = (path, row["label"])
            if row.get("patient_key"):
                tags[row["sha256"]] = _group_tag("patient", row["patient_key"])
            elif named:
                tags[row["sha256"]] = named[0]
            from_feedback.add(row["sha256"])
            summary.n_feedback += 1
    if not chosen:
        raise ExportError("no training images left after merging")
    lines = []
    for digest, (path, label) in sorted(chosen.items()):
        stem = f"{digest}.g{tags[digest]}" if digest in tags else digest
        target = out / label / f"{stem}{path.suffix.lower()}"
        _private_dir(target.parent)
        _copy_private(path, target)
        summary.per_label[label] = summary.per_label.get(label, 0) + 1
        lines.append(f"{digest}\t{label}")
        for k in range(2, feedback_copies + 1 if digest in from_feedback else 0):
            _copy_private(path, target.with_name(f"{stem}.c{k}{path.suffix.lower()}"))
            lines.append(f"{digest}.c{k}\t{label}")
    summary.n_grouped = len(tags)
    summary.n_patients = len(set(tags.values()))
    summary.fingerprint = hashlib.sha256("\n".join(lines).encode()).hexdigest()
    return summary
