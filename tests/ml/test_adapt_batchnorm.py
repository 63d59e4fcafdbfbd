"""ml.adapt.adapt_batchnorm: a network's batch-normalisation statistics re-estimated on one
site's images (no labels, no gradient)."""
from __future__ import annotations

import copy

import pytest
import torch

from ml import MLError
from ml.adapt import adapt_batchnorm
from ml.model import build_model


def _grey(n: int, size: int = 48, seed: int = 0) -> torch.Tensor:
    """Grey 'ultrasound' inputs: the same value in the three channels, speckle-like texture."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, size, size, generator=g) * 0.5 + 0.2
    return x.expand(-1, 3, -1, -1).contiguous()


@pytest.fixture
def trained_net() -> torch.nn.Module:
    """A ResNet18 whose statistics are those of a 'training site' (not the init's 0 and 1)."""
    torch.manual_seed(0)
    net = build_model("none", 3, (1,), layer4_stride=1)
    adapt_batchnorm(net, [_grey(16, seed=1), _grey(16, seed=2)])
    return net.eval()


def test_the_first_layer_statistics_become_the_site_images_statistics(trained_net):
    site = [_grey(16, seed=3) * 1.8 + 0.1, _grey(16, seed=4) * 1.8 + 0.1]
    before = trained_net.bn1.running_mean.clone()
    seen = adapt_batchnorm(trained_net, site)
    assert seen == 32
    with torch.no_grad():
        z = [trained_net.conv1(b) for b in site]
    # two batches of equal size: the average of their means is the mean over all images
    expected_mean = torch.stack([b.mean(dim=(0, 2, 3)) for b in z]).mean(0)
    expected_var = torch.stack([b.transpose(0, 1).flatten(1).var(dim=1) for b in z]).mean(0)
    assert torch.allclose(trained_net.bn1.running_mean, expected_mean, rtol=1e-4, atol=1e-6)
    assert torch.allclose(trained_net.bn1.running_var, expected_var, rtol=1e-3, atol=1e-6)
    assert not torch.allclose(before, expected_mean, atol=1e-3)
    assert not trained_net.training and trained_net.bn1.momentum == 0.1   # left as found


def test_a_scanner_with_other_gain_and_contrast_gets_back_the_training_site_outputs(trained_net):
    """A site whose images are an affine change of the training site's (contrast x2.5, gain
    -0.7) shifts the first layer's activations affinely; statistics measured there undo it,
    so the adapted network answers (nearly) as the original did on the original images."""
    home = _grey(32, seed=1)
    away = home * 2.5 - 0.7
    with torch.no_grad():
        reference, unadapted = trained_net(home), trained_net(away)
        adapted_net = copy.deepcopy(trained_net)
        adapt_batchnorm(adapted_net, [away[:16], away[16:]])
        adapted = adapted_net(away)
    error_before = (unadapted - reference).abs().max()
    error_after = (adapted - reference).abs().max()
    assert error_after < error_before / 5, (float(error_before), float(error_after))
    # the weights themselves are untouched
    for (name, p), q in zip(trained_net.named_parameters(), adapted_net.parameters()):
        assert torch.equal(p, q), name


def test_a_weight_mixes_site_and_training_statistics(trained_net):
    site = [_grey(16, seed=5) * 2.0]
    saved = trained_net.bn1.running_mean.clone()
    only_site = copy.deepcopy(trained_net)
    adapt_batchnorm(only_site, site, weight=1.0)
    adapt_batchnorm(trained_net, site, weight=0.5)
    assert torch.allclose(trained_net.bn1.running_mean, (saved + only_site.bn1.running_mean) / 2, atol=1e-6)


def test_no_images_leaves_the_statistics_and_bad_arguments_are_refused(trained_net):
    saved = {k: v.clone() for k, v in trained_net.state_dict().items()}
    assert adapt_batchnorm(trained_net, []) == 0
    for k, v in trained_net.state_dict().items():
        assert torch.equal(v, saved[k]), k
    with pytest.raises(MLError, match="weight"):
        adapt_batchnorm(trained_net, [_grey(4)], weight=0)
    with pytest.raises(MLError, match="no batch normalisation"):
        adapt_batchnorm(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)), [_grey(2)])


def test_stages_limits_the_re_estimation_to_the_stem_and_the_first_stages(trained_net):
    """``stages=1`` re-measures the stem's and layer1's statistics and leaves layer2..4 as
    trained, in a plain network and inside an ensemble's members alike."""
    from ml.adapt import batchnorm_stage
    assert [batchnorm_stage(n) for n in ("bn1", "layer1.0.bn2", "members.1.layer4.0.downsample.1",
                                         "members.0.bn1")] == [0, 1, 4, 0]
    saved = {k: v.clone() for k, v in trained_net.state_dict().items()}
    adapt_batchnorm(trained_net, [_grey(16, seed=6) * 2.0 - 0.3], stages=1)
    changed = {k.rsplit(".", 1)[0] for k, v in trained_net.state_dict().items()
               if k.endswith("running_mean") and not torch.equal(v, saved[k])}
    assert "bn1" in changed and "layer1.1.bn2" in changed
    assert all(batchnorm_stage(name) <= 1 for name in changed), changed
