"""Finer heatmaps: layer3 (an 8 x 8 grid at the demo model's 128 px) and layer fusions."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ml import MLError
from ml.explain import LayerCapture, explain, resolve_layer
from ml.model import build_model


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(5)
    return build_model("none").eval().to(memory_format=torch.channels_last)


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, 3, size // 8, size // 8, generator=g)
    return F.interpolate(coarse, size=(size, size), mode="bilinear") + 0.3 * torch.randn(n, 3, size, size, generator=g)


def _grid(model, name: str, size: int) -> tuple[int, int]:
    with torch.no_grad(), LayerCapture(resolve_layer(model, name)) as capture:
        model(torch.zeros(1, 3, size, size))
    return tuple(capture.captured().shape[-2:])


def test_finer_layers_double_the_grid(resnet):
    # at the demo model's 128 px: layer4 is 4 x 4, layer3 8 x 8 (the case page's minimum),
    # layer2 (the worker's default) 16 x 16
    assert _grid(resnet, "layer4", 128) == (4, 4)
    assert _grid(resnet, "layer3", 128) == (8, 8)
    assert _grid(resnet, "layer2", 128) == (16, 16)


def test_a_layer2_map_is_smooth_at_the_input_size(resnet):
    # upsampled bilinearly, not one value per grid cell: far more distinct values than the
    # 16 x 16 cells, and neighbouring pixels differ by at most 1/8 (a cell spans 8 pixels)
    _, maps = explain(resnet, _images(1, 128, seed=6), "gradcam", "layer2")
    assert maps.shape == (1, 128, 128)
    assert maps.unique().numel() > 4 * 16 * 16
    assert maps.diff(dim=1).abs().max() < 0.25 and maps.diff(dim=2).abs().max() < 0.25


def test_a_fusion_is_the_rescaled_mean_of_its_layers_maps(resnet):
    x = _images(2, 64, seed=3)
    p3, m3 = explain(resnet, x, "gradcam", "layer3")
    p4, m4 = explain(resnet, x, "gradcam", "layer4")
    p, fused = explain(resnet, x, "gradcam", "layer3+layer4")
    # the fusion reports its first layer's probabilities; every layer's run is the same forward
    assert torch.equal(p, p3) and torch.allclose(p3, p4, atol=1e-5)
    mean = (m3 + m4) / 2
    flat = mean.flatten(1)
    lo, hi = flat.amin(1).view(-1, 1, 1), flat.amax(1).view(-1, 1, 1)
    assert torch.allclose(fused, (mean - lo) / (hi - lo), atol=1e-6)
    assert fused.shape == x.shape[:1] + x.shape[2:]
    assert fused.amin() == 0 and fused.amax() == 1


@pytest.mark.parametrize("name", ["layer3+", "+layer4", "layer3++layer4", "layer3+nope"])
def test_a_bad_fusion_names_the_problem(resnet, name):
    with pytest.raises(MLError, match="fusion|no layer"):
        explain(resnet, _images(1, 32), "gradcam", name)


def test_a_capture_ignores_forwards_of_other_threads(resnet):
    # a threaded worker shares one model: thread B's forward, run while thread A holds a
    # capture, must leave A's capture empty and B's output untouched by A's leaf
    import threading

    x = _images(1, 32, seed=4)
    with torch.no_grad():
        expected = resnet(x)
    seen = {}

    def other_thread():
        with torch.no_grad():
            out = resnet(x)
        seen["requires_grad"], seen["out"] = out.requires_grad, out

    with torch.no_grad(), LayerCapture(resolve_layer(resnet, "layer3"), track_grad=True) as capture:
        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join()
        assert capture.activation is None
        resnet(x)  # this thread's own forward is captured
        assert capture.activation is not None and capture.activation.requires_grad
    assert seen["requires_grad"] is False
    assert torch.allclose(seen["out"], expected, atol=1e-5)  # same forward; thread pools may sum in another order
