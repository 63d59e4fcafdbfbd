"""Mask-guided training (the lesion-attention loss) and the layer4 stride option: each piece
against a direct computation, then a real training run through the CLI."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from ml.augment import augment_batch, erase_lesions
from ml.checkpoint import load_model
from ml.data import DataError, load_masks
from ml.explain import auto_layer, explain, explain_images
from ml.inference import Predictor
from ml.model import build_model, features_and_logits, malignancy_logit
from ml.train import TrainConfig, class_directions, fit, lesion_attention_loss
from tests.ml.conftest import make_folder


def lesion_folder(root, n_per_class=8, seed=0):
    """benign/malignant/normal images (48 x 40); benign and malignant carry a dark disc whose
    mask is written under root/masks with the image's file name; every 4th has no mask."""
    rng = np.random.default_rng(seed)
    data, masks = root / "data", root / "masks"
    masks.mkdir(parents=True)
    for cls in ("benign", "malignant", "normal"):
        (data / cls).mkdir(parents=True)
        for i in range(n_per_class):
            arr = rng.normal(120, 25, (40, 48)).clip(0, 255)
            mask = np.zeros((40, 48), dtype=bool)
            if cls != "normal":
                cy, cx, r = rng.integers(10, 30), rng.integers(10, 38), rng.integers(5, 9)
                yy, xx = np.mgrid[:40, :48]
                mask = np.hypot(yy - cy, xx - cx) < r
                arr[mask] = 30 if cls == "malignant" else 200
            name = f"{cls}_{i:03d}.png"
            Image.fromarray(arr.astype(np.uint8), mode="L").save(data / cls / name)
            if mask.any() and i % 4:
                Image.fromarray((mask * 255).astype(np.uint8), mode="L").save(masks / name)
    return data, masks


def test_features_and_logits_is_the_models_forward_at_either_stride():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 128, 128)
    for stride, side in ((2, 4), (1, 8)):
        model = build_model("none", 3, (1,), layer4_stride=stride).eval()
        a, out = features_and_logits(model, x)
        assert a.shape == (2, 512, side, side)
        assert torch.allclose(out, model(x), atol=1e-5)
    with pytest.raises(Exception, match="stride must be 1 or 2"):
        build_model("none", 1, layer4_stride=3)


def test_auto_layer_takes_layer4_once_its_grid_is_eight_cells_a_side():
    assert auto_layer(build_model("none", 1), 128) == "layer2"            # 4 x 4
    assert auto_layer(build_model("none", 1), 256) == "layer4"            # 8 x 8
    assert auto_layer(build_model("none", 1, layer4_stride=1), 128) == "layer4"
    assert auto_layer(build_model("none", 1, layer4_stride=1), 64) == "layer2"


def test_lesion_attention_loss_is_the_share_of_the_map_outside_the_lesion():
    features = torch.zeros(2, 2, 4, 4)
    features[0, 0, 1, 1] = 3.0           # all of image 0's map in cell (1, 1)
    features[1, 0, 3, 3] = 2.0           # all of image 1's map in cell (3, 3)
    features[1, 0, 1, 1] = 2.0           # ... and half in (1, 1)
    directions = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    masks = torch.zeros(2, 1, 16, 16)
    masks[:, :, 5:7, 5:7] = 1.0          # a lesion inside cell (1, 1) only: 4 of its 16 pixels
    loss = lesion_attention_loss(features, directions, masks)
    assert loss.item() == pytest.approx((0.0 + 0.5) / 2, abs=1e-5)
    # a negative direction gives an empty map: no mass anywhere, nothing outside
    assert lesion_attention_loss(features, -directions, masks).item() == pytest.approx(0.0, abs=1e-6)


def test_a_margin_counts_the_cells_around_the_lesion_as_inside():
    features = torch.zeros(3, 1, 6, 6)
    features[0, 0, 2, 3] = 1.0           # beside the lesion's cell (2, 2)
    features[1, 0, 3, 3] = 1.0           # diagonal to it
    features[2, 0, 2, 4] = 1.0           # two cells away
    directions = torch.ones(3, 1)
    masks = torch.zeros(3, 1, 24, 24)
    masks[:, :, 9:11, 9:11] = 1.0        # a lesion inside cell (2, 2) only
    per_image = [lesion_attention_loss(features[i:i + 1], directions[i:i + 1], masks[i:i + 1], margin)
                 for margin in (0, 1, 2) for i in range(3)]
    assert [round(v.item(), 4) for v in per_image] == [1, 1, 1, 0, 0, 1, 0, 0, 0]


def test_class_direction_of_the_malignant_class_is_the_malignancy_logits_gradient():
    torch.manual_seed(1)
    model = build_model("none", 3, (1,)).eval()
    pooled = torch.randn(5, 512, dtype=torch.float64, requires_grad=True)
    w, b = model.fc.weight.double(), model.fc.bias.double()
    out = pooled @ w.T + b
    malignancy_logit(out, (1,)).sum().backward()
    rows = class_directions(w, out, torch.full((5,), 1))
    # malignancy_logit works in float32: agreement to float32 precision
    assert torch.allclose(rows, pooled.grad, rtol=1e-5, atol=1e-7)
    # one logit: its own row, whatever the class
    assert torch.equal(class_directions(w[:1], out[:, :1], None), w[:1].expand(5, -1))


def test_training_with_the_loss_moves_the_map_onto_the_lesion():
    torch.manual_seed(2)
    model = build_model("none", 3, (1,)).train()
    x = torch.randn(8, 3, 64, 64)
    classes = torch.tensor([0, 1] * 4)
    masks = torch.zeros(8, 1, 64, 64)
    masks[:, :, 8:24, 40:56] = 1.0
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)

    def outside() -> torch.Tensor:
        a, out = features_and_logits(model, x)
        return lesion_attention_loss(a, class_directions(model.fc.weight, out, classes), masks)

    before = outside().item()
    for _ in range(15):
        loss = outside()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert outside().item() < before - 0.2, before


def test_masks_are_found_by_name_resized_like_the_image_and_missing_ones_flagged(tmp_path):
    data, masks = lesion_folder(tmp_path, n_per_class=4)
    paths = sorted(data.rglob("*.png"))
    m, has = load_masks(paths, masks, 32)
    names = {p.name for p in masks.iterdir()}
    assert has.tolist() == [p.name in names for p in paths] and 0 < has.sum() < len(paths)
    assert m.dtype == torch.uint8 and m.shape == (len(paths), 1, 32, 32) and not m[~has].any()
    # aligned: the mask covers the dark (malignant) disc of its image
    i = next(k for k, p in enumerate(paths) if has[k] and p.parent.name == "malignant")
    image = torch.from_numpy(np.asarray(Image.open(paths[i]).resize((32, 32), Image.BILINEAR)).copy()).float()
    lesion = m[i, 0] > 0
    assert image[lesion].mean() < 70 < image[~lesion].mean()
    (masks / "benign_001.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot read mask"):
        load_masks(paths, masks, 32)
    with pytest.raises(DataError, match="does not exist"):
        load_masks(paths, tmp_path / "nowhere", 32)


def test_augmentation_moves_the_mask_with_its_image():
    g = torch.Generator().manual_seed(5)
    masks = torch.zeros(6, 1, 48, 48, dtype=torch.uint8)
    masks[:, :, 10:30, 20:40] = 255
    images = masks.expand(-1, 3, -1, -1).clone()
    x, m = augment_batch(images, g, brightness=0, contrast=0, gamma=0, noise=0, masks=masks)
    assert m.shape == (6, 1, 48, 48) and m.dtype == torch.float32
    assert torch.allclose(x[:, :1] / 255.0, m, atol=1e-4)
    assert not torch.allclose(m, masks.float() / 255.0)   # it did move


def test_train_cli_with_masks_and_stride_one_then_a_fine_tune_keeps_the_stride(tmp_path):
    from manage import cli

    data, masks = lesion_folder(tmp_path, n_per_class=10)
    out = tmp_path / "model.pt"
    result = CliRunner().invoke(cli, ["train", "--data", str(data), "--out", str(out), "--epochs", "2",
                                      "--img-size", "64", "--batch-size", "8", "--masks", str(masks),
                                      "--layer4-stride", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    model, meta = load_model(out)
    assert meta["layer4_stride"] == 1 and meta["args"]["masks"] == str(masks)
    assert model.layer4[0].conv1.stride == (1, 1)
    predictor = Predictor.from_checkpoint(out, "cpu")
    x = torch.randn(1, 3, 64, 64)
    probs, maps = explain(predictor.model, x, "gradcam")
    assert maps.shape[-2:] == (64, 64) and 0 <= float(probs[0]) <= 1
    # the worker's EXPLAIN_LAYER=auto explains layer4 of this model (8 x 8 at 128 px, 4 x 4 here)
    # only from 128 px up; at 64 px it falls back to layer2, as for any stride-2 model
    image = Image.open(next((data / "malignant").iterdir()))
    auto = explain_images(predictor, [image], target_layer="auto", faithfulness=False)[0]
    layer2 = explain_images(predictor, [image], target_layer="layer2", faithfulness=False)[0]
    assert np.allclose(auto.heatmap, layer2.heatmap)
    # a fine-tune from that checkpoint inherits the geometry unless told otherwise
    tuned = tmp_path / "tuned.pt"
    fit(TrainConfig(data=str(data), out=str(tuned), epochs=1, img_size=64, batch_size=8,
                    weights=str(out), progress=False))
    assert load_model(tuned)[1]["layer4_stride"] == 1
    # a plain folder with no masks trains as before: stride 2, no masks recorded
    plain = make_folder(tmp_path / "plain", n_per_class=6)
    fit(TrainConfig(data=str(plain), out=str(tmp_path / "plain.pt"), epochs=1, img_size=32, batch_size=8,
                    progress=False))
    assert load_model(tmp_path / "plain.pt")[1]["layer4_stride"] == 2


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA GPU: mask-guided training must keep every tensor on the model's device")
def test_mask_guided_training_with_mixstyle_runs_on_a_cuda_device(tmp_path):
    # the masks live on the CPU with the images; indexing them with a mask of the GPU batch
    # failed on every GPU machine ("indices should be either on cpu or on the same device")
    data, masks = lesion_folder(tmp_path, n_per_class=10)
    out = tmp_path / "model.pt"
    result = fit(TrainConfig(data=str(data), out=str(out), epochs=2, img_size=64, batch_size=8,
                             masks=str(masks), layer4_stride=1, mixstyle=0.5, device="cuda", progress=False))
    assert len(result["history"]) == 2
    assert load_model(out)[1]["args"]["masks"] == str(masks)


def test_erase_lesions_fills_the_lesion_with_the_tissue_beside_it_at_the_same_depth():
    rows = torch.arange(64, dtype=torch.float32).view(64, 1).expand(64, 64) * 3   # horizontal layers
    images = rows.to(torch.uint8).expand(3, 3, 64, 64).clone()
    masks = torch.zeros(3, 1, 64, 64, dtype=torch.uint8)
    masks[:, :, 20:30, 28:38] = 255
    images[:, :, 20:30, 28:38] = 0                                  # a dark lesion
    masks[1, :, 20:30, :] = 255                                     # one spanning the frame: no room to shift
    images[1, :, 20:30, :] = 0
    chosen = torch.tensor([True, True, False])
    out, erased = erase_lesions(images, masks, chosen, torch.Generator().manual_seed(0), feather=2)
    assert erased.tolist() == [True, False, False]
    assert torch.equal(out[1:], images[1:])                         # not erasable, not chosen: untouched
    inside = masks[0, 0] > 0
    assert torch.equal(out[0][:, inside], rows.to(torch.uint8)[inside].expand(3, -1))
    # the box reaches down by the lesion's height (posterior features) and no further
    changed = (out[0] != images[0]).any(dim=0)
    assert changed.nonzero()[:, 0].max() < 30 + 4 + 10
    assert not changed[:16].any() and not changed[:, :24].any() and not changed[:, 42:].any()


def test_training_with_erased_lesions_needs_masks_and_a_normal_class(tmp_path):
    from manage import cli

    data, masks = lesion_folder(tmp_path, n_per_class=12)   # 10 or more per class: three outputs
    out = tmp_path / "model.pt"
    result = CliRunner().invoke(cli, ["train", "--data", str(data), "--out", str(out), "--epochs", "1",
                                      "--img-size", "32", "--batch-size", "8", "--masks", str(masks),
                                      "--erase-lesions", "0.5", "--quiet"])
    assert result.exit_code == 0, result.output
    meta = load_model(out)[1]
    assert meta["args"]["erase_lesions"] == 0.5 and meta["class_names"] == ["benign", "malignant", "normal"]
    no_masks = CliRunner().invoke(cli, ["train", "--data", str(data), "--out", str(tmp_path / "b.pt"),
                                        "--erase-lesions", "0.5", "--quiet"])
    assert no_masks.exit_code == 1 and "erasing lesions needs lesion masks (--masks)" in no_masks.output
    (data / "normal").rename(data / "healthy")
    no_normal = CliRunner().invoke(cli, ["train", "--data", str(data), "--out", str(tmp_path / "c.pt"),
                                         "--img-size", "32", "--masks", str(masks), "--erase-lesions", "0.5",
                                         "--quiet"])
    assert no_normal.exit_code == 1 and "needs a 'normal' class" in no_normal.output
    assert not (tmp_path / "b.pt").exists() and not (tmp_path / "c.pt").exists()
