"""Ensembles: several trained networks as one checkpoint, explained and calibrated as one."""
from pathlib import Path

import numpy as np
import pytest
import torch

from ml import MLError
from ml.checkpoint import load_checkpoint, load_model
from ml.ensemble import EnsembleNet, combine
from ml.evaluate import evaluate_folder
from ml.explain import explain
from ml.inference import Predictor
from ml.model import build_model
from ml.train import TrainConfig, fit

from tests.ml.conftest import make_folder


def members(n_outputs: int = 1, positive=None, stride: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    return [build_model("none", n_outputs, positive, stride).eval() for _ in range(2)]


@pytest.mark.parametrize("n_outputs, positive", [(1, None), (3, (1,))])
def test_the_ensemble_outputs_the_mean_of_its_members(n_outputs, positive):
    nets = members(n_outputs, positive)
    ensemble = EnsembleNet(nets).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        expected = (nets[0](x) + nets[1](x)) / 2
        assert torch.allclose(ensemble(x), expected, atol=1e-5)
    assert ensemble.fc.out_features == n_outputs
    # saved once: the members' weights and nothing else
    assert set(ensemble.state_dict()) == {f"members.{i}.{k}" for i in range(2) for k in nets[0].state_dict()}


def test_an_ensemble_of_one_network_twice_explains_as_that_network():
    # (Grad-CAM; Grad-CAM++'s weights are not invariant to the gradient's scale, which halves here)
    method = "gradcam"
    net = members(3, (1,), stride=1)[0]
    twin = build_model("none", 3, (1,), 1).eval()
    twin.load_state_dict(net.state_dict())
    x = torch.randn(2, 3, 64, 64)
    p1, maps1 = explain(net, x, method, "layer4")
    p2, maps2 = explain(EnsembleNet([net, twin]).eval(), x, method, "layer4")
    assert torch.allclose(p1, p2, atol=1e-5)
    assert torch.allclose(maps1, maps2, atol=1e-4)


def test_the_ensembles_map_explains_its_own_score_with_or_without_autograd():
    ensemble = EnsembleNet(members(3, (1,), stride=1)).eval()
    x = torch.randn(2, 3, 64, 64)
    _, analytic = explain(ensemble, x, "gradcam", None)
    _, autograd = explain(ensemble, x, "gradcam", None, analytic_gradient=False)
    assert torch.allclose(analytic, autograd, atol=1e-4)
    # and it is not simply one member's map
    _, first = explain(ensemble.members[0], x, "gradcam", None)
    assert (first - analytic).abs().max() > 1e-2


def test_members_must_share_their_shape():
    with pytest.raises(MLError, match="at least two"):
        EnsembleNet(members()[:1])
    with pytest.raises(MLError, match="share"):
        EnsembleNet([build_model("none", 1, None, 1), build_model("none", 1, None, 2)])


def cfg(data, out, **kw):
    base = dict(data=str(data), out=str(out), epochs=2, img_size=32, batch_size=8, seed=0,
                progress=False, group_duplicates=False)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two members trained on one folder with one validation part (seeds 0 and 1, split seed 0),
    and a third with its own split."""
    root = tmp_path_factory.mktemp("ens")
    data = make_folder(root / "data", n_per_class=16)
    paths = []
    for seed in (0, 1):
        fit(cfg(data, root / f"m{seed}.pt", seed=seed, split_seed=0))
        paths.append(root / f"m{seed}.pt")
    fit(cfg(data, root / "other-split.pt", seed=1))
    return data, paths, root / "other-split.pt", root


def test_a_split_seed_keeps_the_validation_part_across_training_seeds(trained):
    data, (a, b), other, _ = trained
    split = [load_checkpoint(p)["meta"]["split"] for p in (a, b, other)]
    assert split[0]["val_sha"] == split[1]["val_sha"] != split[2]["val_sha"]
    assert split[1]["seed"] == 0 and load_checkpoint(b)["meta"]["seed"] == 1
    wa, wb = (load_model(p)[0].fc.weight for p in (a, b))
    assert not torch.allclose(wa, wb)  # the training seed still differs


def test_combine_writes_one_checkpoint_that_predicts_the_members_mean(trained, tmp_path):
    data, (a, b), _, _ = trained
    out = tmp_path / "ensemble.pt"
    result = combine([a, b], data, out)
    meta = result["meta"]
    assert len(result["val_paths"]) == meta["ensemble"]["n_val"]
    assert [m["seed"] for m in meta["ensemble"]["members"]] == [0, 1]
    assert all(len(m["sha256"]) == 64 for m in meta["ensemble"]["members"])
    ensemble = Predictor.from_checkpoint(out)
    singles = [Predictor.from_checkpoint(p) for p in (a, b)]
    images = sorted(Path(data).rglob("*.png"))[:6]
    batch = ensemble.to_batch(images)
    expected = (singles[0].outputs(batch) + singles[1].outputs(batch)) / 2
    assert torch.allclose(ensemble.outputs(batch), expected, atol=1e-4)
    # its own calibration and threshold, fitted on the shared validation part
    assert meta["calibration"]["method"] == "platt"
    assert meta["calibration"]["n"] == load_checkpoint(a)["meta"]["split"]["n_val"] == meta["ensemble"]["n_val"]
    assert 0 <= meta["threshold"] <= 1 and ensemble.threshold == meta["threshold"]
    assert meta["val_metrics"]["at_threshold"]["sensitivity"] >= meta["target_sensitivity"] - 1e-9
    results = ensemble.predict(images)
    assert all(0 <= r.probability <= 1 for r in results)


def test_the_leakage_guard_knows_every_members_images(trained, tmp_path):
    data, (a, b), _, _ = trained
    out = tmp_path / "ensemble.pt"
    combine([a, b], data, out)
    r = evaluate_folder(out, data, n_boot=100)
    assert r["overlap_exact"] == r["n"]  # every image was a member's training or validation image


def test_combine_refuses_members_validated_on_other_images(trained, tmp_path):
    data, (a, _), other, _ = trained
    with pytest.raises(MLError, match="validated on other images.*--split-seed"):
        combine([a, other], data, tmp_path / "e.pt")
    assert not (tmp_path / "e.pt").exists()


def test_combine_refuses_a_folder_the_members_were_not_trained_on(trained, tmp_path):
    _, (a, b), _, root = trained
    elsewhere = make_folder(root / "elsewhere", n_per_class=16, seed=5)
    with pytest.raises(MLError, match="not the folder the members were trained on"):
        combine([a, b], elsewhere, tmp_path / "e.pt")


def test_combine_refuses_a_single_member_or_an_ensemble_as_member(trained, tmp_path):
    data, (a, b), _, _ = trained
    with pytest.raises(MLError, match="at least two"):
        combine([a], data, tmp_path / "e.pt")
    combine([a, b], data, tmp_path / "e.pt")
    with pytest.raises(MLError, match="already an ensemble"):
        combine([tmp_path / "e.pt", a], data, tmp_path / "e2.pt")


def test_fine_tuning_from_an_ensemble_starts_from_its_first_member(trained, tmp_path):
    data, (a, b), _, _ = trained
    out = tmp_path / "e.pt"
    combine([a, b], data, out)
    started = build_model(str(out), 1)
    first = load_model(a)[0]
    for key, value in first.state_dict().items():
        if value.is_floating_point():
            assert torch.allclose(started.state_dict()[key], value, atol=1e-3), key


def test_an_ensemble_checkpoint_is_refused_when_its_member_list_is_broken(trained, tmp_path):
    data, (a, b), _, _ = trained
    out = tmp_path / "e.pt"
    combine([a, b], data, out)
    payload = torch.load(out, weights_only=True)
    payload["meta"]["ensemble"]["members"] = payload["meta"]["ensemble"]["members"][:1]
    torch.save(payload, tmp_path / "broken.pt")
    from ml.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="at least two members"):
        load_model(tmp_path / "broken.pt")
    assert np.isfinite(load_checkpoint(out)["meta"]["threshold"])


def test_site_recalibration_keeps_an_ensemble_whole(trained, tmp_path):
    from ml.adapt import recalibrate

    data, (a, b), _, _ = trained
    out = tmp_path / "e.pt"
    combine([a, b], data, out)
    site = sorted(Path(make_folder(tmp_path / "site", n_per_class=12, seed=9)).rglob("*.png"))
    trained_on = sorted(Path(data).rglob("*.png"))
    images = site + trained_on
    labels = [int(p.parent.name == "cancer") for p in images]
    meta = recalibrate(out, images, labels, tmp_path / "site.pt", target_sensitivity=0.9, site="here")
    # the members' own training and validation images are left out: their scores flatter
    assert meta["ensemble"]["members"] and meta["site_adaptation"]["n"] == len(site)
    assert meta["site_adaptation"]["left_out_seen"] == len(trained_on)
    with pytest.raises(MLError, match=f"{len(trained_on)} more were left out"):
        recalibrate(out, trained_on, labels[len(site):], tmp_path / "no.pt", target_sensitivity=0.9)
    before, after = Predictor.from_checkpoint(out), Predictor.from_checkpoint(tmp_path / "site.pt")
    batch = before.to_batch(images[:4])
    assert torch.allclose(before.outputs(batch), after.outputs(batch), atol=1e-3)  # same weights


def test_fine_tuning_an_ensemble_tunes_every_member_and_combines_them(trained, tmp_path):
    from ml.ensemble import fine_tune

    data, (a, b), _, _ = trained
    start = tmp_path / "e.pt"
    combine([a, b], data, start)
    out = tmp_path / "tuned.pt"
    result = fine_tune(cfg(data, out, epochs=1, weights=str(start), lr=3e-4))
    assert len(result["members"]) == 2 and result["checkpoint"] == str(out)
    meta = load_checkpoint(out)["meta"]
    assert [m["seed"] for m in meta["ensemble"]["members"]] == [0, 1]
    tuned, before = load_model(out)[0], load_model(start)[0]
    for k in range(2):
        assert not torch.allclose(tuned.members[k].fc.weight, before.members[k].fc.weight)  # both trained
    assert not torch.allclose(tuned.members[0].fc.weight, tuned.members[1].fc.weight)      # still two
    # a single network's fine-tune is plain fit()
    single = fine_tune(cfg(data, tmp_path / "one.pt", epochs=1, weights=str(a)))
    assert "members" not in single and "ensemble" not in load_checkpoint(tmp_path / "one.pt")["meta"]
