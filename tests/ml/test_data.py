from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ml import MLError
from ml.data import (DataError, cache_images, load_image, named_groups, near_duplicate_groups, preprocess,
                     scan_folder, stratified_folds, train_val_split)
from tests.ml.conftest import make_folder


def test_grayscale_becomes_three_equal_channels(tmp_path):
    Image.fromarray(np.full((10, 20), 77, np.uint8), "L").save(tmp_path / "g.png")
    img = load_image(tmp_path / "g.png")
    assert img.mode == "RGB" and img.size == (20, 10)
    assert np.asarray(img)[0, 0].tolist() == [77, 77, 77]


def test_rgba_is_composited_on_black(tmp_path):
    arr = np.zeros((8, 8, 4), np.uint8)
    arr[..., 0] = 200
    arr[..., 3] = 128  # half transparent red
    Image.fromarray(arr, "RGBA").save(tmp_path / "a.png")
    r, g, b = np.asarray(load_image(tmp_path / "a.png"))[0, 0]
    assert abs(int(r) - 100) <= 1 and g == 0 and b == 0


def test_sixteen_bit_is_scaled_by_its_own_range(tmp_path):
    arr = np.zeros((4, 6), np.uint16)
    arr[:, 3:] = 4095  # a 12-bit image stored in 16 bits
    Image.fromarray(arr).save(tmp_path / "d.png")
    assert Image.open(tmp_path / "d.png").mode.startswith("I")
    out = np.asarray(load_image(tmp_path / "d.png"))
    assert out[0, 0, 0] == 0 and out[0, 5, 0] == 255


@pytest.mark.parametrize("ext", ["pgm", "tiff", "bmp", "jpg"])
def test_other_formats_and_odd_sizes_preprocess_to_the_square(tmp_path, ext):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (37, 91), dtype=np.uint8), "L").save(tmp_path / f"x.{ext}")
    batch = preprocess([tmp_path / f"x.{ext}"], size=32)
    assert batch.shape == (1, 3, 32, 32) and batch.dtype == torch.float32
    # ImageNet normalisation: a mid-grey pixel maps near 0.2, black near -2
    assert -2.2 < float(batch.min()) and float(batch.max()) < 2.7


def test_unreadable_image_raises_with_its_name(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(DataError, match="broken.png"):
        load_image(bad)


def test_class_mapping_cancer_and_malignant_positive(tmp_path):
    root = make_folder(tmp_path / "busi", n_per_class=2, classes=("benign", "Malignant", "normal"))
    index = scan_folder(root)
    assert index.class_names == ["Malignant", "benign", "normal"]
    assert index.positive_classes == ["Malignant"]
    by_class = {p.parent.name: int(t) for p, t in zip(index.paths, index.targets)}
    assert by_class == {"Malignant": 1, "benign": 0, "normal": 0}


def test_positive_classes_can_be_overridden(tmp_path):
    root = make_folder(tmp_path / "d", n_per_class=2, classes=("lesion", "clear"))
    index = scan_folder(root, positive_classes=["lesion"])
    assert sorted(zip([p.parent.name for p in index.paths], index.targets.tolist())) == \
        [("clear", 0), ("clear", 0), ("lesion", 1), ("lesion", 1)]


def test_empty_and_one_class_folders_are_refused(tmp_path):
    (tmp_path / "empty" / "cancer").mkdir(parents=True)
    with pytest.raises(DataError, match="holds no images"):
        scan_folder(tmp_path / "empty")
    root = make_folder(tmp_path / "one", n_per_class=3, classes=("normal",))
    with pytest.raises(DataError, match="only one class"):
        scan_folder(root)
    with pytest.raises(DataError, match="does not exist"):
        scan_folder(tmp_path / "missing")


def test_cache_reports_unreadable_files_by_name(tiny_folder):
    (tiny_folder / "normal" / "corrupt.png").write_bytes(b"garbage")
    index = scan_folder(tiny_folder)
    cache = cache_images(index, 24)
    assert [p.name for p, _ in cache.skipped] == ["corrupt.png"]
    assert cache.images.shape == (24, 3, 24, 24) and len(cache.paths) == 24
    with pytest.raises(DataError, match="corrupt.png"):
        cache_images(index, 24, strict=True)


def test_stratified_split_keeps_class_balance_and_is_repeatable():
    y = np.array([1] * 30 + [0] * 70)
    tr, va = train_val_split(y, 0.2, seed=3)
    assert len(va) == 20 and y[va].sum() == 6
    assert set(tr).isdisjoint(va) and len(tr) + len(va) == 100
    tr2, va2 = train_val_split(y, 0.2, seed=3)
    assert np.array_equal(va, va2)
    _, va3 = train_val_split(y, 0.2, seed=4)
    assert not np.array_equal(va, va3)


def test_grouped_folds_keep_groups_together_and_balance_classes():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(50), 2)          # pairs of near-duplicates
    y = np.repeat(rng.integers(0, 2, 50), 2)
    folds = stratified_folds(y, 5, seed=1, groups=groups)
    assert sorted(np.concatenate(folds).tolist()) == list(range(100))
    for f in folds:
        assert all(set(np.nonzero(groups == g)[0]) <= set(f) for g in np.unique(groups[f]))
        assert abs(y[f].mean() - y.mean()) < 0.12
    assert [f.tolist() for f in folds] == [f.tolist() for f in stratified_folds(y, 5, seed=1, groups=groups)]


def test_near_duplicates_share_a_group():
    rng = np.random.default_rng(0)
    base = torch.from_numpy(rng.integers(0, 255, (3, 3, 64, 64), dtype=np.uint8))
    noisy = (base[0].int() + torch.from_numpy(rng.integers(-6, 7, (3, 64, 64)))).clamp(0, 255).to(torch.uint8)
    groups = near_duplicate_groups(torch.cat([base, noisy[None]]))
    assert groups[3] == groups[0]
    assert len({groups[0], groups[1], groups[2]}) == 3


def test_named_groups_join_one_patients_files_and_their_near_duplicates():
    names = [Path(n) for n in ("ALWI_000.png", "ALWI_007.png", "BOMO_001.png", "case001.png",
                               "case002.png", "BOMO_002.png")]
    groups = named_groups(names, r"^([A-Z]{4})_")
    assert groups[0] == groups[1] and groups[2] == groups[5]
    assert len({groups[0], groups[2], groups[3], groups[4]}) == 4   # unmatched files stand alone
    # a near-duplicate of another patient's image joins both patients into one group
    joined = named_groups(names, r"^([A-Z]{4})_", base=[0, 1, 2, 3, 3, 1])
    assert joined[0] == joined[2] == joined[5] and joined[3] == joined[4] and joined[0] != joined[3]
    # a pattern that names no file leaves the base groups exactly as they were (the same split)
    base = np.array([4, 1, 4, 3, 1, 5])
    assert named_groups(names, r"^nobody_", base=base).tolist() == base.tolist()
    whole_match = named_groups(names, r"^case")    # no group: the whole match is the key
    assert whole_match[3] == whole_match[4] and whole_match[0] != whole_match[3]


def test_named_groups_refuse_a_broken_pattern():
    with pytest.raises(MLError, match="not a regular expression"):
        named_groups([Path("a.png")], "([A-Z")


def test_fingerprint_changes_with_labels(tmp_path):
    root = make_folder(tmp_path / "d", n_per_class=2)
    a = scan_folder(root).fingerprint()
    assert a["n_files"] == 4 and len(a["sha256"]) == 64
    (root / "normal" / "normal_000.png").rename(root / "cancer" / "moved.png")
    assert scan_folder(root).fingerprint()["sha256"] != a["sha256"]


def test_letterbox_keeps_the_shape_and_the_mask_stays_on_its_lesion(tmp_path):
    from ml.data import content_box, fit_square, load_masks, resize_to_tensor

    # a 120 x 60 frame, a bright 40 x 20 "lesion" at its centre, and the radiologist's mask of it
    frame = np.full((60, 120), 40, np.uint8)
    frame[20:40, 40:80] = 220
    Image.fromarray(frame, "L").save(tmp_path / "case.png")
    Image.fromarray(np.where(frame > 100, 255, 0).astype(np.uint8), "L").save(tmp_path / "mask.png")
    image = load_image(tmp_path / "case.png")
    assert content_box(120, 60, 32, "letterbox-bilinear") == (0, 8, 32, 24)
    assert content_box(120, 60, 32, "square-bilinear") == content_box(50, 50, 32, "letterbox-bilinear") == (0, 0, 32, 32)
    boxed = resize_to_tensor(image, 64, "letterbox-bilinear")[0].numpy()
    assert (boxed[:16] == 0).all() and (boxed[48:] == 0).all()          # black bands above and below
    lesion = boxed > 130

    def ratio(spot):  # width / height of the bright spot
        rows, cols = np.nonzero(spot)
        return (np.ptp(cols) + 1) / (np.ptp(rows) + 1)

    assert 1.7 < ratio(lesion) < 2.3                                     # still twice as wide as tall
    assert 0.8 < ratio(resize_to_tensor(image, 64)[0].numpy() > 130) < 1.2   # squashing made it square
    # the default is exactly the squash used before the option existed
    old = np.asarray(image.resize((32, 32), Image.BILINEAR, reducing_gap=None))
    assert np.array_equal(resize_to_tensor(image, 32).permute(1, 2, 0).numpy(), old)
    masks, has = load_masks([tmp_path / "case.png"], _mask_dir(tmp_path), 64, "letterbox-bilinear")
    assert has.tolist() == [True] and np.array_equal(masks[0, 0].numpy() > 0, lesion)
    assert fit_square(Image.new("L", (7, 3)), 16, "letterbox-bilinear").size == (16, 16)
    with pytest.raises(DataError, match="resize must be one of"):
        resize_to_tensor(image, 32, "crop")


def _mask_dir(tmp_path):
    folder = tmp_path / "masks"
    folder.mkdir()
    (tmp_path / "mask.png").rename(folder / "case.png")
    return folder
