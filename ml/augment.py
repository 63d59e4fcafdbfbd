"""Batched train-time augmentation for ultrasound and mammography, on uint8 tensors.

Applied to whole batches (one affine_grid/grid_sample call) so the data side costs little
next to a ResNet18 step. Chosen for grey-scale clinical images: small rotations, zoom and
shifts (probe position), horizontal flips (left/right breast), brightness/contrast/gamma
(gain and TGC settings) and speckle-like multiplicative noise. No vertical flips or colour
jitter: the skin line is at the top of an ultrasound frame and the content is grey.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def augment_batch(batch: torch.Tensor, generator: torch.Generator | None = None,
                  max_rotate_deg: float = 12.0, zoom: tuple[float, float] = (0.9, 1.15),
                  max_shift: float = 0.06, p_flip: float = 0.5, brightness: float = 0.15,
                  contrast: float = 0.2, gamma: float = 0.2, noise: float = 0.05) -> torch.Tensor:
    """uint8 N x 3 x H x W in, float32 in [0, 255] out (same shape), randomly transformed."""
    n = batch.shape[0]
    g = generator
    x = batch.float()

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(n, generator=g) * (hi - lo) + lo

    angle = uniform(-max_rotate_deg, max_rotate_deg) * math.pi / 180
    scale = 1.0 / uniform(*zoom)
    flip = torch.where(torch.rand(n, generator=g) < p_flip, -1.0, 1.0)
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([
        torch.stack([cos * flip, -sin, uniform(-max_shift, max_shift) * 2], dim=1),
        torch.stack([sin * flip, cos, uniform(-max_shift, max_shift) * 2], dim=1),
    ], dim=1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    c = uniform(1 - contrast, 1 + contrast).view(n, 1, 1, 1)
    b = uniform(-brightness, brightness).view(n, 1, 1, 1) * 255
    x = ((x - mean) * c + mean + b).clamp(0, 255)
    gam = torch.exp(uniform(-gamma, gamma)).view(n, 1, 1, 1)
    x = 255.0 * (x / 255.0) ** gam
    if noise > 0:
        # one grey noise field per image, shared across channels (the images are grey)
        speckle = 1 + noise * torch.randn(n, 1, x.shape[2], x.shape[3], generator=g)
        x = x * speckle
    return x.clamp(0, 255)
