"""Several networks as one model: the mean of their raw outputs. Members may differ
in architecture (ResNet18 beside EfficientNet-Lite0): both expose the same stages.

Independently trained networks make partly independent mistakes, and on a hospital none of
them saw, the mean of two ranks cases better than either one (docs/model-quality.md). The
ensemble is built to look like one ResNet to the rest of the code: its stages (``conv1``,
``layer1`` .. ``layer4``) run every member side by side on its own share of the channels, and
its ``fc`` averages the members' heads. So:

* ``features_and_logits`` gives layer4's activations of all members, concatenated
  (N x 512M x h x w), and the output is ``fc(mean_hw A)`` as for one ResNet;
* Grad-CAM at ``layer4`` explains the ensemble's own malignancy score: since that score is the
  mean of the members' logits, the map is the members' maps, each weighted by its share of
  the score, added before the ReLU; the closed-form head gradient still applies;
* a checkpoint stores the members as ``members.K.<resnet key>`` and its metadata says
  ``ensemble: {"members": [...]}``; calibration and threshold are the ensemble's own, fitted
  by :func:`ml.ensemble.combine` on the members' shared validation part.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ml import MLError
from ml.model import build_model, features_and_logits


class _SideBySide(nn.Module):
    """One stage of every member, each on its own share of the input channels (``sizes``: the
    previous stage's output channels of each member; or, for the stem, each on the whole
    image); the outputs are concatenated along the channels.

    The members' modules are owned (and saved) by :class:`EnsembleNet`'s ``members``; they
    are kept here in a plain list so that they are not registered (and saved) twice."""

    def __init__(self, parts: Sequence[nn.Module], sizes: Sequence[int] | None = None):
        super().__init__()
        self.parts = list(parts)
        self.sizes = list(sizes) if sizes is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inputs = [x] * len(self.parts) if self.sizes is None else x.split(self.sizes, dim=1)
        return torch.cat([part(chunk) for part, chunk in zip(self.parts, inputs)], dim=1)


class _MeanHead(nn.Module):
    """The members' linear heads averaged: ``mean_k fc_k(pooled_k)``, which is one linear layer
    with the members' weights side by side divided by their number (``weight``)."""

    def __init__(self, heads: Sequence[nn.Linear]):
        super().__init__()
        self.parts = list(heads)
        self.in_features = sum(h.in_features for h in heads)
        self.out_features = heads[0].out_features

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([h.weight for h in self.parts], dim=1) / len(self.parts)

    @property
    def bias(self) -> torch.Tensor:
        return torch.stack([h.bias for h in self.parts]).mean(dim=0)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        chunks = pooled.split([h.in_features for h in self.parts], dim=1)
        return torch.stack([h(c) for h, c in zip(self.parts, chunks)]).mean(dim=0)


class EnsembleNet(nn.Module):
    """Member networks whose raw outputs are averaged, shaped like one ResNet (module doc)."""

    is_ensemble = True

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        if len(members) < 2:
            raise MLError("an ensemble needs at least two members")
        strides = {getattr(m, "layer4_stride", 2) for m in members}
        heads = {m.fc.out_features for m in members}
        if len(strides) > 1 or len(heads) > 1:
            raise MLError("ensemble members must share the layer4 stride and the number of outputs")
        self.members = nn.ModuleList(members)
        self.conv1 = _SideBySide([nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool) for m in members])
        # features_and_logits applies bn1, relu and maxpool after conv1: here the stem did
        self.bn1, self.relu, self.maxpool = nn.Identity(), nn.Identity(), nn.Identity()
        channels = _stage_channels(members)
        for k, name in enumerate(("layer1", "layer2", "layer3", "layer4")):
            setattr(self, name, nn.Sequential(_SideBySide([getattr(m, name) for m in members], channels[k])))
        self.architectures = [getattr(m, "architecture", "resnet18") for m in members]
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = _MeanHead([m.fc for m in members])
        self.layer4_stride = strides.pop()
        positive = getattr(members[0], "positive_outputs", None)
        if positive is not None:
            self.positive_outputs = positive

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return features_and_logits(self, x)[1]


def _stage_channels(members: Sequence[nn.Module]) -> list[list[int]]:
    """For each of layer1..layer4, each member's input channels (its previous stage's output),
    read off a tiny forward pass (the stride-2 stem needs at least a few pixels)."""
    sizes = []
    with torch.no_grad():
        for m in members:
            was_training = m.training
            m.eval()
            x, row = torch.zeros(1, 3, 64, 64), []
            x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
            for name in ("layer1", "layer2", "layer3"):
                row.append(x.shape[1])
                x = getattr(m, name)(x)
            row.append(x.shape[1])
            m.train(was_training)
            sizes.append(row)
    return [list(col) for col in zip(*sizes)]


def build_ensemble(n_members: int, num_outputs: int, positive: tuple[int, ...] | None, stride: int,
                   input_norm: str = "fixed", archs: Sequence[str] | None = None) -> EnsembleNet:
    """An ensemble of ``n_members`` randomly initialised networks, ``archs[k]`` each (default
    all ResNet18; weights are loaded after)."""
    archs = list(archs or ["resnet18"] * n_members)
    if len(archs) != n_members:
        raise MLError(f"{n_members} members but {len(archs)} architectures")
    return EnsembleNet([build_model("none", num_outputs, positive, stride, input_norm, a) for a in archs])
