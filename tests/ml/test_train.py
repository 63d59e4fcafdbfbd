import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ml import MLError
from ml.checkpoint import load_checkpoint
from ml.data import scan_folder
from ml.inference import Predictor
from ml.metrics import sensitivity_confidence, threshold_metrics
from ml.train import TrainConfig, fit


def config(data, out, **kw):
    base = dict(data=str(data), out=str(out), epochs=1, img_size=32, batch_size=8, seed=0,
                progress=False, group_duplicates=False)
    base.update(kw)
    return TrainConfig(**base)


def test_one_epoch_writes_a_complete_checkpoint(tiny_folder, tmp_path):
    out = tmp_path / "model.pt"
    result = fit(config(tiny_folder, out))
    assert out.exists() and not (tmp_path / "model.pt.resume.pt").exists()
    meta = load_checkpoint(out)["meta"]
    assert meta["architecture"] == "resnet18" and meta["input_size"] == 32
    assert meta["positive_classes"] == ["cancer"] and meta["class_names"] == ["cancer", "normal"]
    assert meta["labels"] == ["normal", "cancer"] and meta["threshold_default"] == 0.5
    assert meta["data_fingerprint"] == scan_folder(tiny_folder).fingerprint()
    assert meta["seed"] == 0 and meta["args"]["epochs"] == 1
    for key in ("roc_auc", "pr_auc", "sensitivity", "specificity", "precision", "f1", "accuracy"):
        assert key in meta["val_metrics"]["at_threshold"]
    assert result["history"][0].train_images > 0
    json.dumps(meta)  # metadata is plain data


def test_group_pattern_splits_by_the_named_patient_and_is_recorded(tiny_folder, tmp_path):
    out = tmp_path / "model.pt"
    result = fit(config(tiny_folder, out, group_pattern=r"(\d)\.png$"))   # "patient" = the last digit: 10 of them
    split = load_checkpoint(out)["meta"]["split"]
    assert split["group_pattern"] == r"(\d)\.png$" and split["n_groups"] == 10
    # the result names the validation images: whole "patients", as many as the split records
    val = [Path(p) for p in result["val_paths"]]
    assert len(val) == split["n_val"] > 0
    val_patients = {p.name[-5] for p in val}
    every = [p for p in Path(tiny_folder).rglob("*.png")]
    assert {p.name for p in every if p.name[-5] in val_patients} == {p.name for p in val}


def test_a_broken_group_pattern_fails_before_training(tiny_folder, tmp_path):
    with pytest.raises(MLError, match="not a regular expression"):
        fit(config(tiny_folder, tmp_path / "m.pt", group_pattern="([0-9"))
    assert not (tmp_path / "m.pt").exists()


def test_threshold_meets_target_sensitivity_on_validation(tiny_folder, tmp_path):
    out = tmp_path / "m.pt"
    fit(config(tiny_folder, out, target_sensitivity=0.75))
    meta = load_checkpoint(out)["meta"]
    assert meta["val_metrics"]["at_threshold"]["sensitivity"] >= 0.75
    assert meta["target_sensitivity"] == 0.75


def test_the_stored_threshold_is_in_sample_by_default_and_can_be_confident(tmp_path):
    from tests.ml.conftest import make_folder

    data = make_folder(tmp_path / "data", n_per_class=40, seed=4)
    fit(config(data, tmp_path / "confident.pt", target_sensitivity=0.75, threshold_confidence=0.8))
    fit(config(data, tmp_path / "default.pt", target_sensitivity=0.75))
    confident, in_sample = (load_checkpoint(tmp_path / f"{name}.pt")["meta"] for name in ("confident", "default"))
    assert confident["threshold_confidence"] == 0.8 and in_sample["threshold_confidence"] is None
    # the same seed trains the same weights: only the rule differs, and it never raises the threshold
    assert confident["val_metrics"]["at_0.5"]["roc_auc"] == in_sample["val_metrics"]["at_0.5"]["roc_auc"]
    assert confident["threshold"] <= in_sample["threshold"]
    op = confident["val_metrics"]["at_threshold"]
    n, missed = op["n_positive"], op["confusion"]["fn"]
    assert op["target_confidence"] == pytest.approx(sensitivity_confidence(n, missed, 0.75))
    # the most the validation cancers allow: >= 0.8 where they are enough, else none missed
    assert op["target_confidence"] >= 0.8 or missed == 0
    assert in_sample["val_metrics"]["at_threshold"]["sensitivity"] >= 0.75


def test_reload_gives_identical_predictions(tiny_folder, tmp_path):
    out = tmp_path / "m.pt"
    fit(config(tiny_folder, out))
    images = sorted((tiny_folder / "cancer").glob("*.png"))[:4]
    first = Predictor.from_checkpoint(out, "cpu").predict(images)
    second = Predictor.from_checkpoint(out, "cpu").predict(images)
    assert [r.probability for r in first] == [r.probability for r in second]


def test_same_seed_same_run(tiny_folder, tmp_path):
    a = fit(config(tiny_folder, tmp_path / "a.pt", epochs=2))
    b = fit(config(tiny_folder, tmp_path / "b.pt", epochs=2))
    assert [h.train_loss for h in a["history"]] == [h.train_loss for h in b["history"]]
    wa, wb = (load_checkpoint(tmp_path / n)["state_dict"]["fc.weight"] for n in ("a.pt", "b.pt"))
    assert torch.equal(wa, wb)


@pytest.mark.parametrize("option", ["mixstyle", "randconv"])
def test_a_training_only_option_repeats_with_the_seed_changes_training_and_is_recorded(tiny_folder, tmp_path, option):
    runs = {name: fit(config(tiny_folder, tmp_path / f"{name}.pt", **kw))
            for name, kw in (("a", {option: 1.0}), ("b", {option: 1.0}), ("off", {}))}
    weights = {name: load_checkpoint(tmp_path / f"{name}.pt")["state_dict"]["fc.weight"] for name in runs}
    assert torch.equal(weights["a"], weights["b"])
    assert not torch.equal(weights["a"], weights["off"])
    assert load_checkpoint(tmp_path / "a.pt")["meta"]["args"][option] == 1.0


def test_mixstyle_hooks_change_the_forward_pass_only_while_open():
    from ml.model import build_model
    from ml.train import style_mixing

    model = build_model("none", 1)
    with style_mixing(model, torch.Generator().manual_seed(0), 1.0) as switch:
        assert len(model.layer1._forward_hooks) == len(model.layer2._forward_hooks) == 1
        x = torch.randn(4, 3, 32, 32)
        model.eval()
        switch["on"] = False
        plain = model(x)
        switch["on"] = True
        assert not torch.allclose(model(x), plain)
    assert not model.layer1._forward_hooks and not model.layer2._forward_hooks
    assert torch.equal(model(x), plain)


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("ema", [0.0, 0.9])
def test_interrupted_run_resumes_to_the_same_result(tiny_folder, tmp_path, ema):
    full = fit(config(tiny_folder, tmp_path / "full.pt", epochs=3, ema=ema))

    def stop_after_two(entry):
        if entry.epoch == 2:
            raise Interrupt
    with pytest.raises(Interrupt):
        fit(config(tiny_folder, tmp_path / "r.pt", epochs=3, ema=ema), on_epoch=stop_after_two)
    # the callback runs before the epoch's state is saved, so the run resumes at epoch 2
    assert (tmp_path / "r.pt.resume.pt").exists()
    resumed = fit(config(tiny_folder, tmp_path / "r.pt", epochs=3, resume=True, ema=ema))
    assert [h.epoch for h in resumed["history"]] == [1, 2, 3]
    assert [h.train_loss for h in resumed["history"]] == pytest.approx([h.train_loss for h in full["history"]])
    assert [h.val["roc_auc"] for h in resumed["history"]] == pytest.approx([h.val["roc_auc"] for h in full["history"]])


def test_ema_saves_averaged_weights_without_changing_training(tiny_folder, tmp_path):
    plain = fit(config(tiny_folder, tmp_path / "plain.pt", epochs=2))
    averaged = fit(config(tiny_folder, tmp_path / "ema.pt", epochs=2, ema=0.5))
    # the EMA only reads the weights: the optimisation itself is unchanged
    assert [h.train_loss for h in averaged["history"]] == [h.train_loss for h in plain["history"]]
    w_plain = load_checkpoint(tmp_path / "plain.pt")["state_dict"]["fc.weight"]
    w_ema = load_checkpoint(tmp_path / "ema.pt")["state_dict"]["fc.weight"]
    assert not torch.equal(w_plain, w_ema)
    assert load_checkpoint(tmp_path / "ema.pt")["meta"]["args"]["ema"] == 0.5


def test_cross_validation_reports_mean_and_sd(tiny_folder, tmp_path):
    out = tmp_path / "cv.pt"
    result = fit(config(tiny_folder, out, folds=3))
    assert len(result["folds"]) == 3 and out.exists()
    assert all((tmp_path / f"cv.fold{k}.pt").exists() for k in (1, 2, 3))
    aucs = [r["val_metrics"]["at_threshold"]["roc_auc"] for r in result["folds"]]
    assert result["cv"]["roc_auc"]["mean"] == pytest.approx(np.mean(aucs))
    assert result["cv"]["roc_auc"]["sd"] == pytest.approx(np.std(aucs, ddof=1))


def test_training_learns_an_easy_task(tmp_path):
    from tests.ml.conftest import make_folder
    data = make_folder(tmp_path / "d", n_per_class=24, seed=1)
    out = tmp_path / "m.pt"
    fit(config(data, out, epochs=6, lr=2e-3))
    assert load_checkpoint(out)["meta"]["val_metrics"]["at_0.5"]["roc_auc"] >= 0.8


def test_letterbox_is_recorded_used_for_prediction_and_kept_by_a_fine_tune(tiny_folder, tmp_path):
    from PIL import Image

    from ml.data import preprocess

    out = tmp_path / "boxed.pt"
    fit(config(tiny_folder, out, resize="letterbox-bilinear"))
    predictor = Predictor.from_checkpoint(out, "cpu")
    assert predictor.meta["resize"] == predictor.resize == "letterbox-bilinear"
    image = next(Path(tiny_folder).rglob("*.png"))   # 48 x 40: letterboxing changes its input
    with Image.open(image) as im:
        assert im.size[0] != im.size[1]
    boxed = preprocess([image], 32, resize="letterbox-bilinear")
    assert torch.equal(predictor.to_batch([image]), boxed)
    assert not torch.equal(boxed, preprocess([image], 32))
    tuned = tmp_path / "tuned.pt"
    fit(config(tiny_folder, tuned, weights=str(out)))           # no --resize: the parent's way
    assert load_checkpoint(tuned)["meta"]["resize"] == "letterbox-bilinear"
    plain = tmp_path / "plain.pt"
    fit(config(tiny_folder, plain))
    assert load_checkpoint(plain)["meta"]["resize"] == "square-bilinear"   # the default is unchanged
    with pytest.raises(MLError, match="resize must be one of"):
        fit(config(tiny_folder, tmp_path / "bad.pt", resize="crop"))
    assert not (tmp_path / "bad.pt").exists()


def test_a_fine_tune_reads_its_parents_metadata_once_and_sees_a_replaced_parent(tiny_folder, tmp_path, monkeypatch):
    import ml.train as train

    parent = tmp_path / "parent.pt"
    fit(config(tiny_folder, parent, layer4_stride=1))
    reads = []
    real = train.read_checkpoint_file
    monkeypatch.setattr(train, "read_checkpoint_file", lambda path: reads.append(path) or real(path))
    fit(config(tiny_folder, tmp_path / "tuned.pt", weights=str(parent)))
    assert len(reads) == 1      # geometry and resize mode come from one read
    tuned = load_checkpoint(tmp_path / "tuned.pt")["meta"]
    assert tuned["layer4_stride"] == 1 and tuned["resize"] == "square-bilinear"
    fit(config(tiny_folder, parent, resize="letterbox-bilinear"))   # the parent file is replaced
    fit(config(tiny_folder, tmp_path / "tuned2.pt", weights=str(parent)))
    assert len(reads) == 2
    assert load_checkpoint(tmp_path / "tuned2.pt")["meta"]["resize"] == "letterbox-bilinear"


@pytest.mark.parametrize("option, value", [("mask_margin", -1), ("mask_margin", 4), ("erase_lesions", 1.5), ("mixstyle", 1.5),
                                           ("randconv", -0.1), ("ema", 1.0), ("mask_weight", -0.5)])
def test_options_out_of_range_fail_before_training(tiny_folder, tmp_path, option, value):
    with pytest.raises(MLError, match=f"{option} .* is out of range"):
        fit(config(tiny_folder, tmp_path / "m.pt", **{option: value}))
    assert not (tmp_path / "m.pt").exists()


@pytest.mark.parametrize("option, value", [("input_norm", "per-image"), ("layer4_stride", 3)])
def test_a_wrong_choice_fails_before_the_images_are_read(tmp_path, option, value):
    # the folder does not exist: the choice must be refused before anything looks for it
    with pytest.raises(MLError, match=f"{option} {value!r} is not one of"):
        fit(config(tmp_path / "absent", tmp_path / "m.pt", **{option: value}))
    assert not (tmp_path / "m.pt").exists()


def test_snapshot_epochs_are_written_beside_the_best_and_combine_into_an_ensemble(tiny_folder, tmp_path):
    from ml.ensemble import combine
    from ml.train import snapshot_path

    out = tmp_path / "m.pt"
    result = fit(config(tiny_folder, out, epochs=3, snapshot_epochs=(2, 3), split_seed=0))
    snaps = [snapshot_path(out, e) for e in (2, 3)]
    assert snaps[0].name == "m.e2.pt" and all(p.is_file() for p in snaps)
    assert not snapshot_path(out, 1).exists()
    metas = [load_checkpoint(p)["meta"] for p in snaps]
    assert [m["epoch"] for m in metas] == [2, 3]
    assert load_checkpoint(out)["meta"]["epoch"] == result["best_epoch"]  # the best stays the main file
    w2, w3 = (load_checkpoint(p)["state_dict"]["fc.weight"] for p in snaps)
    assert not torch.equal(w2, w3)
    # one run, one split: its snapshots are an ensemble's members as they stand
    ensemble = combine([out, *snaps], tiny_folder, tmp_path / "snap.pt")["meta"]
    assert [m["epoch"] for m in ensemble["ensemble"]["members"]] == [result["best_epoch"], 2, 3]
    assert ensemble["threshold_confidence"] is None  # the members' rule: in-sample


def test_an_ensemble_keeps_its_members_threshold_rule_unless_told_otherwise(tiny_folder, tmp_path):
    from ml.ensemble import combine

    members = []
    for seed in (0, 1):
        members.append(tmp_path / f"m{seed}.pt")
        fit(config(tiny_folder, members[-1], epochs=1, seed=seed, split_seed=0, target_sensitivity=0.75,
                   threshold_confidence=0.5))
    rule = {c: combine(members, tiny_folder, tmp_path / f"e{c}.pt", threshold_confidence=c)["meta"]
            for c in (None, 0, 0.8)}
    assert [rule[c]["threshold_confidence"] for c in (None, 0, 0.8)] == [0.5, None, 0.8]
    # a surer rule never lifts the threshold
    assert rule[0]["threshold"] >= rule[None]["threshold"] >= rule[0.8]["threshold"]
