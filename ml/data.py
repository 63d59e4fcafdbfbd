"""Image folders in, training tensors out: ImageFolder scanning, the decoded-image cache,
lesion masks, near-duplicate groups and splits.

Every image becomes 3-channel uint8 at a square size once (the cache: squashed or
letterboxed, RESIZE_MODES); normalisation and
augmentation then run on whole batches of tensors, so later epochs decode no files.
Decoding and resizing one image is :mod:`ml.images` (re-exported here).
"""
from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ml import MLError
from ml.images import DataError, check_resize, fit_square, load_image, resize_to_tensor
from ml.images import (IMAGENET_MEAN, IMAGENET_STD, RESIZE_MODES, RESIZE_NAMES,  # noqa: F401 (re-exported)
                       content_box, normalise, preprocess, to_rgb)

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".pgm", ".ppm", ".pbm", ".tif", ".tiff", ".bmp"}
DEFAULT_POSITIVE = ("cancer", "malignant")
LABEL_NAMES = ("normal", "cancer")  # index = binary target


def positive_names(positive_classes: Sequence[str] | None = None) -> list[str]:
    """The folder names that mean "malignant" for a model trained with ``positive_classes``.

    ``cancer`` and ``malignant`` are always synonyms, so a model trained on one layout can
    be evaluated on the other (a locked test set need not match the training folders).
    """
    names = [c.lower() for c in (positive_classes or ())]
    return names + [c for c in DEFAULT_POSITIVE if c not in names]


@dataclass
class FolderIndex:
    """The files of an ImageFolder directory with their binary targets."""

    root: Path
    paths: list[Path]
    class_names: list[str]          # folder names, sorted
    class_of: list[int]             # index into class_names per file
    positive_classes: list[str]
    targets: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        positive = {self.class_names.index(c) for c in self.positive_classes}
        self.targets = np.array([1 if c in positive else 0 for c in self.class_of], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.paths)

    def fingerprint(self) -> dict:
        """File count and a sha256 of the sorted relative file list with labels."""
        rows = sorted(f"{p.relative_to(self.root).as_posix()}\t{t}" for p, t in zip(self.paths, self.targets))
        digest = hashlib.sha256("\n".join(rows).encode()).hexdigest()
        return {"n_files": len(rows), "sha256": digest,
                "n_positive": int(self.targets.sum()), "classes": self.class_names}

    def subset(self, indices: Sequence[int]) -> "FolderIndex":
        idx = list(indices)
        return FolderIndex(self.root, [self.paths[i] for i in idx], self.class_names,
                           [self.class_of[i] for i in idx], self.positive_classes)


def scan_folder(root: str | Path, positive_classes: Sequence[str] | None = None,
                require_both: bool = True) -> FolderIndex:
    """Index an ImageFolder directory (one sub-folder per class).

    Folders named in ``positive_classes`` (default: ``cancer`` or ``malignant``, case
    insensitive) are the positive class; every other folder is negative.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    class_names = [d.name for d in class_dirs]
    wanted = {c.lower() for c in (positive_classes or DEFAULT_POSITIVE)}
    positives = [c for c in class_names if c.lower() in wanted]
    paths, class_of = [], []
    for ci, d in enumerate(class_dirs):
        for p in sorted(d.rglob("*")):
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
                paths.append(p)
                class_of.append(ci)
    if not paths:
        raise DataError(f"{root} holds no images in class sub-folders "
                        f"(expected e.g. {root}/cancer/*.png and {root}/normal/*.png)")
    index = FolderIndex(root, paths, class_names, class_of, positives)
    if require_both:
        n_pos = int(index.targets.sum())
        if n_pos == 0 or n_pos == len(index):
            which = "positive" if n_pos == 0 else "negative"
            raise DataError(
                f"{root} has only one class: no {which} images (folders: {', '.join(class_names)}; "
                f"positive folders are {', '.join(sorted(wanted))})")
    return index


@dataclass
class CachedImages:
    """Decoded, resized images held in memory as one uint8 tensor."""

    images: torch.Tensor            # N x 3 x S x S uint8
    targets: torch.Tensor           # N float32 (0/1)
    paths: list[Path]
    skipped: list[tuple[Path, str]]  # unreadable files with the reason
    classes: torch.Tensor | None = None  # N int64: index into the folder's class names
    resize: str = "square-bilinear"      # how they were fitted to the square (RESIZE_MODES)


def cache_images(index: FolderIndex, size: int, strict: bool = False, progress: bool = False,
                 resize: str = "square-bilinear") -> CachedImages:
    """Decode every file of ``index`` once at ``size`` x ``size`` (``resize``: RESIZE_MODES).

    Unreadable files are logged by name and listed in ``skipped`` (``strict=True`` raises).
    """
    check_resize(resize)
    tensors, targets, kept, skipped, classes = [], [], [], [], []
    iterator = zip(index.paths, index.targets, index.class_of)
    if progress:
        from tqdm import tqdm
        iterator = tqdm(list(iterator), desc=f"decode {size}px", unit="img", leave=False)
    for path, target, class_index in iterator:
        try:
            tensors.append(resize_to_tensor(load_image(path), size, resize))
        except DataError as exc:
            skipped.append((path, str(exc.__cause__ or exc)))
            continue
        targets.append(float(target))
        classes.append(int(class_index))
        kept.append(path)
    if skipped:
        names = ", ".join(str(p) for p, _ in skipped)
        if strict:
            raise DataError(f"unreadable image files: {names}")
        log.warning("skipped %d unreadable image file(s): %s", len(skipped), names)
    if not tensors:
        raise DataError(f"none of the {len(index)} files in {index.root} could be read")
    return CachedImages(torch.stack(tensors), torch.tensor(targets), kept, skipped,
                        torch.tensor(classes, dtype=torch.int64), resize)


def load_masks(paths: Sequence[Path], mask_dir: str | Path, size: int,
               resize: str = "square-bilinear") -> tuple[torch.Tensor, torch.Tensor]:
    """Lesion masks for the images at ``paths``: (N x 1 x size x size uint8, N bool "has a mask").

    ``mask_dir`` holds one grey PNG per image with a lesion, named as the image (or its stem
    plus ``.png``), in any sub-folder: 255 (over 127) = lesion. It is resized (``resize``)
    exactly like the image, so mask and image stay aligned. Images without a mask get zeros and
    ``False``: no supervision, not "no lesion".
    """
    root = Path(mask_dir)
    if not root.is_dir():
        raise DataError(f"mask folder {root} does not exist")
    found = {p.name: p for p in sorted(root.rglob("*")) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS}
    masks = torch.zeros(len(paths), 1, size, size, dtype=torch.uint8)
    has = torch.zeros(len(paths), dtype=torch.bool)
    for i, path in enumerate(paths):
        file = found.get(Path(path).name) or found.get(Path(path).stem + ".png")
        if file is None:
            continue
        try:
            with Image.open(file) as img:
                grey = fit_square(img.convert("L"), size, resize)
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise DataError(f"cannot read mask {file}: {exc}") from exc
        m = torch.from_numpy((np.asarray(grey) > 127).astype(np.uint8) * 255)
        if m.any():
            masks[i, 0], has[i] = m, True
    return masks, has


# ---------------------------------------------------------------- near-duplicates and splits

def difference_hash(images: torch.Tensor, bits: int = 16) -> np.ndarray:
    """256-bit difference hash (16 x 17 grey thumbnail, horizontal gradient signs) per image."""
    grey = images.float().mean(dim=1, keepdim=True)
    thumbs = torch.nn.functional.interpolate(grey, size=(bits, bits + 1), mode="area")[:, 0]
    return (thumbs[:, :, 1:] > thumbs[:, :, :-1]).reshape(len(images), -1).numpy()


class _DisjointSets:
    """Union-find over 0..n-1; a group's label is its root (the first member to lead it)."""

    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        parent = self.parent
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        ri, rj = self.find(i), self.find(j)
        if ri != rj:
            self.parent[rj] = ri

    def labels(self) -> np.ndarray:
        return np.array([self.find(i) for i in range(len(self.parent))])


def compile_group_pattern(pattern: str) -> re.Pattern:
    """The file-name pattern of :func:`named_groups`, compiled, or an MLError naming it."""
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise MLError(f"group pattern {pattern!r} is not a regular expression: {exc}") from exc


def near_duplicate_groups(images: torch.Tensor, max_distance: int = 30) -> np.ndarray:
    """Group id per image: images within ``max_distance`` bits of dHash share a group
    (transitively), so frames of one lesion never straddle a train/validation split."""
    hashes = difference_hash(images).astype(np.uint8)
    n = len(hashes)
    sets = _DisjointSets(n)
    for i in range(n - 1):
        dist = (hashes[i + 1:] != hashes[i]).sum(axis=1)
        for j in np.nonzero(dist < max_distance)[0] + i + 1:
            sets.union(i, int(j))
    return sets.labels()


def named_groups(paths: Sequence[Path], pattern: str,
                 base: Sequence[int] | None = None) -> np.ndarray:
    """Group id per file: files whose names give the same key under ``pattern`` (a regular
    expression searched in the file name; its first group, or the whole match, is the key,
    e.g. a patient id) share a group, and so do files that share a ``base`` group (near
    duplicates). Files the pattern does not match keep their base group, or stand alone.
    """
    rx = compile_group_pattern(pattern)
    n = len(paths)
    matches = [rx.search(Path(path).name) for path in paths]
    if not any(matches):  # nothing named: the base groups as they are (the same split as without)
        return np.asarray(base) if base is not None else np.arange(n)
    sets = _DisjointSets(n)
    first: dict[tuple[str, object], int] = {}
    for i, m in enumerate(matches):
        keys = [("name", m.group(1) if rx.groups else m.group(0))] if m else []
        if base is not None:
            keys.append(("base", int(base[i])))
        for key in keys:
            sets.union(first.setdefault(key, i), i)
    return sets.labels()


def stratified_folds(targets: Sequence[int], k: int, seed: int,
                     groups: Sequence[int] | None = None) -> list[np.ndarray]:
    """Split indices into ``k`` folds with the class balance of the whole, repeatably.

    With ``groups``, whole groups go to one fold (largest groups first, each to the fold
    that most needs its class), like scikit-learn's StratifiedGroupKFold.
    """
    targets = np.asarray(targets)
    if k < 2:
        raise DataError("need at least 2 folds")
    groups = np.arange(len(targets)) if groups is None else np.asarray(groups)
    rng = np.random.default_rng(seed)
    unique = np.unique(groups)
    rng.shuffle(unique)
    members = {g: np.nonzero(groups == g)[0] for g in unique}
    order = sorted(unique, key=lambda g: -len(members[g]))  # stable: ties keep shuffled order
    totals = np.array([(targets == 0).sum(), (targets == 1).sum()], dtype=float)
    counts = np.zeros((k, 2))
    folds: list[list[int]] = [[] for _ in range(k)]
    for g in order:
        idx = members[g]
        add = np.array([(targets[idx] == 0).sum(), (targets[idx] == 1).sum()])
        # choose the fold whose per-class fill after adding stays most even
        cost = [np.std((counts + np.eye(k)[f][:, None] * add) / np.maximum(totals, 1), axis=0).sum()
                + 1e-9 * counts[f].sum() for f in range(k)]
        best = int(np.argmin(cost))
        counts[best] += add
        folds[best].extend(idx.tolist())
    return [np.sort(np.array(f, dtype=np.int64)) for f in folds]


def train_val_split(targets: Sequence[int], val_fraction: float, seed: int,
                    groups: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (optionally grouped) split: returns (train_indices, val_indices)."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError("--val-split must be between 0 and 1")
    targets = np.asarray(targets)
    if groups is None:
        rng = np.random.default_rng(seed)
        val = []
        for cls in (0, 1):
            idx = np.nonzero(targets == cls)[0]
            rng.shuffle(idx)
            n_val = int(round(len(idx) * val_fraction))
            n_val = min(max(n_val, 1), len(idx) - 1) if len(idx) > 1 else 0
            val.extend(idx[:n_val].tolist())
        val_idx = np.sort(np.array(val, dtype=np.int64))
    else:
        k = max(2, int(round(1.0 / val_fraction)))
        val_idx = stratified_folds(targets, k, seed, groups)[0]
    train_idx = np.setdiff1d(np.arange(len(targets)), val_idx)
    if len(val_idx) == 0 or len(np.unique(targets[val_idx])) < 2 or len(np.unique(targets[train_idx])) < 2:
        raise DataError("too few images to give both classes to training and validation")
    return train_idx, val_idx
