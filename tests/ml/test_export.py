"""ml/export: metadata-free ImageFolder export, safe re-runs, and the training-data merge."""
from __future__ import annotations

import csv
import hashlib
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from ml.export import (MANIFEST_FIELDS, ExportError, FeedbackImage, clean_png, merge_training_data,
                       write_feedback_folder)


def _jpeg_with_exif(seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x010F] = "ScannerCorp"      # Make
    exif[0x0110] = "PATIENT-NAME-42"  # Model, standing in for identifying tags
    exif[0x0112] = 6                  # Orientation: rotate 90 degrees
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", exif=exif, quality=95)
    return buffer.getvalue()


def _png_with_text(seed: int = 1) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("PatientName", "Jane Doe")
    buffer = io.BytesIO()
    Image.fromarray(np.full((20, 30), seed * 40, dtype=np.uint8), mode="L").save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _manifest(folder: Path) -> list[dict]:
    with (folder / "manifest.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_clean_png_drops_exif_and_text_but_keeps_pixels_and_orientation():
    jpeg = _jpeg_with_exif()
    out = Image.open(io.BytesIO(clean_png(jpeg)))
    assert out.format == "PNG" and out.size == (24, 32)  # orientation applied: rotated
    assert not out.info.get("exif") and not out.getexif() and b"PATIENT" not in clean_png(jpeg)
    png = clean_png(_png_with_text())
    assert b"Jane Doe" not in png and b"tEXt" not in png and b"iTXt" not in png
    assert Image.open(io.BytesIO(png)).mode == "L"
    with pytest.raises(ExportError):
        clean_png(b"not an image")


def test_folder_and_manifest_exactly_and_reruns_are_safe(tmp_path):
    a, b = _jpeg_with_exif(), _png_with_text()
    items = [FeedbackImage(7, b, "normal", _sha(b), "reviewer-corrected", 3, 1, 2, "cancer", "v1", "2026-01-01T10:00:00", "2026-01-02T10:00:00"),
             FeedbackImage(3, a, "malignant", _sha(a), "model-confirmed", 1, 1, 0, "cancer", "v1", "2026-01-01T09:00:00", "2026-01-01T09:00:00")]
    out = tmp_path / "export"
    first = write_feedback_folder(items, out)
    assert (first.written, first.unchanged, first.removed, first.per_label) == (2, 0, 0, {"malignant": 1, "benign": 0, "normal": 1})
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "malignant/case-000003.png", "manifest.csv", "normal/case-000007.png"]
    rows = _manifest(out)
    assert list(rows[0]) == list(MANIFEST_FIELDS)
    assert [(r["case_id"], r["file"], r["label"], r["source"], r["n_reviews"], r["votes_cancer"], r["votes_normal"])
            for r in rows] == [("3", "malignant/case-000003.png", "malignant", "model-confirmed", "1", "1", "0"),
                               ("7", "normal/case-000007.png", "normal", "reviewer-corrected", "3", "1", "2")]
    assert rows[0]["sha256"] == _sha(a) and rows[0]["file_sha256"] == _sha((out / rows[0]["file"]).read_bytes())
    before = (out / "manifest.csv").read_bytes()

    again = write_feedback_folder(items, out)
    assert (again.written, again.unchanged, again.removed) == (0, 2, 0)
    assert (out / "manifest.csv").read_bytes() == before

    # case 3 relabelled by later reviews, case 7 no longer selected; a user's own file stays
    (out / "normal" / "mine.png").write_bytes(b"x")
    moved = [FeedbackImage(3, a, "normal", _sha(a), "reviewer-corrected", 2, 0, 2, "cancer", "v1")]
    third = write_feedback_folder(moved, out)
    assert (third.written, third.removed) == (1, 2)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "manifest.csv", "normal/case-000003.png", "normal/mine.png"]


def test_bad_label_or_duplicate_case_writes_nothing(tmp_path):
    data = _png_with_text()
    with pytest.raises(ExportError, match="not one of malignant, benign, normal"):
        write_feedback_folder([FeedbackImage(1, data, "cancer", _sha(data))], tmp_path / "x")
    with pytest.raises(ExportError, match="twice"):
        write_feedback_folder([FeedbackImage(1, data, "normal", "s"), FeedbackImage(1, data, "normal", "s")], tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def _png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((16, 16), value, dtype=np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def test_merge_dedupes_by_sha256_feedback_wins_and_locked_test_stays_out(tmp_path):
    base, locked, feedback = tmp_path / "base", tmp_path / "locked", tmp_path / "feedback"
    for folder, name, value in [(base, "malignant/a.png", 10), (base, "benign/b.png", 20), (base, "normal/c.png", 30),
                                (base, "normal/c-copy.png", 30), (base, "benign/held.png", 40),
                                (locked, "normal/held.png", 40), (locked, "malignant/z.png", 50)]:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(_png(value))
    # reviewers: b (base says benign) is cancer; z is a locked-test image uploaded as a case
    items = [FeedbackImage(1, _png(20), "malignant", _sha(_png(20))), FeedbackImage(2, _png(50), "malignant", _sha(_png(50))),
             FeedbackImage(3, _png(60), "normal", _sha(_png(60)))]
    write_feedback_folder(items, feedback)
    merged = merge_training_data(base, feedback, locked, tmp_path / "train")
    assert (merged.n_base, merged.n_feedback) == (2, 2)  # a, c | b (relabelled), new image 60
    assert merged.duplicates_removed == 2 and merged.relabelled_by_feedback == 1
    assert merged.left_out_locked_test == 2  # held.png from base, z from feedback
    assert merged.per_label == {"malignant": 2, "normal": 2}
    train = {p.parent.name + "/" + p.stem for p in (tmp_path / "train").rglob("*.png")}
    assert train == {f"malignant/{_sha(_png(10))}", f"malignant/{_sha(_png(20))}",
                     f"normal/{_sha(_png(30))}", f"normal/{_sha(_png(60))}"}
    locked_digests = {_sha(p.read_bytes()) for p in locked.rglob("*.png")}
    assert not locked_digests & {_sha(p.read_bytes()) for p in (tmp_path / "train").rglob("*.png")}
    again = merge_training_data(base, feedback, locked, tmp_path / "train")
    assert again.fingerprint == merged.fingerprint and len(merged.fingerprint) == 64


def test_export_module_does_not_import_torch():
    code = "import ml.export, sys; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[2])
    assert result.stdout.strip() == "False", result.stderr


def test_feedback_copies_weigh_reviewed_images_and_leave_base_images_single(tmp_path):
    base, locked, feedback = tmp_path / "base", tmp_path / "locked", tmp_path / "feedback"
    for folder, name, value in [(base, "malignant/a.png", 10), (base, "normal/b.png", 20), (locked, "normal/z.png", 90)]:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(_png(value))
    write_feedback_folder([FeedbackImage(1, _png(60), "benign", _sha(_png(60)))], feedback)
    once = merge_training_data(base, feedback, locked, tmp_path / "once")
    thrice = merge_training_data(base, feedback, locked, tmp_path / "thrice", feedback_copies=3)
    names = sorted(p.relative_to(tmp_path / "thrice").as_posix() for p in (tmp_path / "thrice").rglob("*.png"))
    digest = _sha(_png(60))
    assert names == sorted([f"benign/{digest}.png", f"benign/{digest}.c2.png", f"benign/{digest}.c3.png",
                            f"malignant/{_sha(_png(10))}.png", f"normal/{_sha(_png(20))}.png"])
    assert thrice.per_label == once.per_label == {"benign": 1, "malignant": 1, "normal": 1}
    assert thrice.fingerprint != once.fingerprint
    with pytest.raises(ExportError, match="at least 1"):
        merge_training_data(base, feedback, locked, tmp_path / "none", feedback_copies=0)


def test_merge_tags_each_known_patient_so_training_keeps_them_on_one_side(tmp_path):
    from ml.data import named_groups
    from ml.export import MERGED_GROUP_PATTERN

    base, locked, feedback = tmp_path / "base", tmp_path / "locked", tmp_path / "feedback"
    for folder, name, value in [(base, "malignant/ABCD_1.png", 10), (base, "malignant/ABCD_2.png", 11),
                                (base, "normal/EFGH_1.png", 12), (base, "benign/loose.png", 13),
                                (locked, "normal/z.png", 90)]:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(_png(value))
    write_feedback_folder([FeedbackImage(1, _png(60), "benign", _sha(_png(60)), patient_key="k1"),
                           FeedbackImage(2, _png(61), "malignant", _sha(_png(61)), patient_key="k1"),
                           FeedbackImage(3, _png(62), "normal", _sha(_png(62))),
                           # EFGH_1 reviewed (as benign) without a key: it stays EFGH's
                           FeedbackImage(4, _png(12), "benign", _sha(_png(12)))], feedback)
    assert [r["patient_key"] for r in _manifest(feedback)] == ["k1", "k1", "", ""]
    plain = merge_training_data(base, feedback, locked, tmp_path / "plain")
    grouped = merge_training_data(base, feedback, locked, tmp_path / "grouped", feedback_copies=2,
                                  group_pattern=r"^([A-Z]{4})_")
    # names: DIGEST[.gTAG][.cK].png; a tag only where the patient is known
    assert (plain.n_grouped, plain.n_patients) == (2, 1)         # the reviewed patient k1 only
    assert (grouped.n_grouped, grouped.n_patients) == (5, 3)   # ABCD x2, EFGH, k1 x2
    paths = sorted((tmp_path / "grouped").rglob("*.png"))
    assert len(paths) == 7 + 4   # 7 images, the 4 reviewed ones twice
    assert sum(p.parent.name == "benign" for p in paths) == 2 * 2 + 1   # 60, EFGH_1 relabelled, loose
    tag = {p.name.split(".")[0]: (p.name.split(".")[1] if ".g" in p.name else None) for p in paths}
    assert tag[_sha(_png(10))] == tag[_sha(_png(11))] != tag[_sha(_png(12))]
    assert tag[_sha(_png(60))] == tag[_sha(_png(61))] not in (tag[_sha(_png(10))], tag[_sha(_png(12))])
    assert tag[_sha(_png(13))] is None and tag[_sha(_png(62))] is None
    assert tag[_sha(_png(12))] is not None
    # the content fingerprint does not depend on the tags
    assert grouped.fingerprint == merge_training_data(base, feedback, locked, tmp_path / "p2", feedback_copies=2).fingerprint
    # what ml.train does with the pattern (its near-duplicate groups stand here as one per digest,
    # which is what they make of identical copies): one group per patient, untagged images alone
    digests = sorted({p.name.split(".")[0] for p in paths})
    groups = named_groups(paths, MERGED_GROUP_PATTERN, [digests.index(p.name.split(".")[0]) for p in paths])
    by_digest: dict[str, set] = {}
    for p, g in zip(paths, groups):
        by_digest.setdefault(p.name.split(".")[0], set()).add(int(g))
    assert all(len(g) == 1 for g in by_digest.values())  # a copy stays with its original
    assert len(set(groups.tolist())) == 5   # ABCD, EFGH, k1, loose, the untagged review
    with pytest.raises(ExportError, match="not a regular expression"):
        merge_training_data(base, feedback, locked, tmp_path / "bad", group_pattern="([A-Z")
    assert not (tmp_path / "bad").exists()


def test_exported_and_merged_images_are_private_whatever_the_umask(tmp_path):
    """Issue 31, item 6: the export wrote patients' images 0644 in 0755 folders."""
    import os
    import stat

    from ml.export import merge_training_data

    previous = os.umask(0o022)
    try:
        a = _png_with_text()
        out = tmp_path / "export"
        write_feedback_folder([FeedbackImage(1, a, "malignant", _sha(a), "model-confirmed", 1, 1, 0, "cancer", "v1",
                                             "2026-01-01T09:00:00", "2026-01-01T09:00:00")], out)
        base = tmp_path / "base"
        (base / "normal").mkdir(parents=True)
        (base / "normal" / "n.png").write_bytes(_png_with_text())
        (base / "malignant").mkdir()
        (base / "malignant" / "m.png").write_bytes(_jpeg_with_exif())
        locked = tmp_path / "locked"
        (locked / "normal").mkdir(parents=True)
        merged = tmp_path / "merged"
        merge_training_data(base, out, locked, merged)
    finally:
        os.umask(previous)
    for root in (out, merged):
        for path in [root, *root.rglob("*")]:
            mode = stat.S_IMODE(path.stat().st_mode)
            assert mode == (0o700 if path.is_dir() else 0o600), (path, oct(mode))
