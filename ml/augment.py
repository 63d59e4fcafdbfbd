"""Batched train-time augmentation for ultrasound and mammography, on uint8 tensors.

Applied to whole batches (one affine_grid/grid_sample call) so the data side costs little
next to a ResNet18 step. Chosen for grey-scale clinical images: small rotations, zoom and
shifts (probe position), horizontal flips (left/right breast), brightness/contrast/gamma
(gain and TGC settings) and speckle-like multiplicative noise. No vertical flips or colour
jitter: the skin line is at the top of an ultrasound frame and the content is grey.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def augment_batch(batch: torch.Tensor, generator: torch.Generator | None = None,
                  max_rotate_deg: float = 12.0, zoom: tuple[float, float] = (0.9, 1.15),
                  max_shift: float = 0.06, p_flip: float = 0.5, brightness: float = 0.15,
                  contrast: float = 0.2, gamma: float = 0.2, noise: float = 0.05,
                  masks: torch.Tensor | None = None, max_aspect: float = 1.0):
    """uint8 N x 3 x H x W in, float32 in [0, 255] out (same shape), randomly transformed.

    ``max_aspect`` > 1 also stretches each image horizontally against vertically by a ratio
    drawn log-uniformly from [1/max_aspect, max_aspect] (area kept): sites export frames of
    other shapes (4:3 to 16:9) that a square resize squashes differently, so a lesion's
    width-to-height ratio alone must not decide. 1 draws nothing (the same random stream
    as before the option existed).

    With ``masks`` (N x 1 x H x W, 0/255) the same geometric transform is applied to them and
    ``(images, masks)`` is returned, masks as float32 in [0, 1]."""
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
    if max_aspect > 1.0:
        log_r = uniform(-math.log(max_aspect), math.log(max_aspect))
        theta[:, :, 0] = theta[:, :, 0] * torch.exp(log_r / 2).view(n, 1)
        theta[:, :, 1] = theta[:, :, 1] * torch.exp(-log_r / 2).view(n, 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if masks is not None:
        masks = F.grid_sample(masks.float() / 255.0, grid, mode="bilinear", padding_mode="zeros",
                              align_corners=False)

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
    x = x.clamp(0, 255)
    return x if masks is None else (x, masks)


def scanner_shift(x: torch.Tensor, generator: torch.Generator | None = None, p: float = 0.8,
                  max_blur: float = 1.5, min_scale: float = 0.4, max_gain_slope: float = 0.5,
                  speckle: float = 0.15) -> torch.Tensor:
    """What changes from one ultrasound machine to another, applied to a float [0, 255]
    batch (after :func:`augment_batch`): resolution (down- then up-sampling by up to
    1/``min_scale``), blur (Gaussian, sigma up to ``max_blur`` px), depth gain (a top-to-
    bottom ramp of up to ``max_gain_slope``, as time-gain compensation differs) and coarser
    multiplicative speckle. Each image is changed with probability ``p``."""
    n, _, h, w = x.shape
    g = generator

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(n, generator=g) * (hi - lo) + lo

    chosen = (torch.rand(n, generator=g) < p).view(n, 1, 1, 1)
    out = x
    # resolution: one factor per batch keeps it a single interpolate call
    scale = float(uniform(min_scale, 1.0)[0])
    small = F.interpolate(out, size=(max(8, int(h * scale)), max(8, int(w * scale))), mode="bilinear",
                          align_corners=False, antialias=True)
    out = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    # blur: a separable Gaussian per batch
    sigma = float(uniform(0.1, max_blur)[0])
    radius = max(1, int(round(2 * sigma)))
    taps = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-taps ** 2 / (2 * sigma ** 2))
    kernel = (kernel / kernel.sum()).to(out.dtype)
    c = out.shape[1]
    out = F.conv2d(F.pad(out, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    out = F.conv2d(F.pad(out, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)
    # depth gain: brighter or darker with depth
    slope = uniform(-max_gain_slope, max_gain_slope).view(n, 1, 1, 1)
    ramp = torch.linspace(-0.5, 0.5, h).view(1, 1, h, 1)
    out = out * (1 + slope * ramp)
    # coarse speckle: noise on a quarter-resolution grid, upsampled
    coarse = torch.randn(n, 1, max(2, h // 4), max(2, w // 4), generator=g)
    out = out * (1 + speckle * F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False))
    return torch.where(chosen, out, x).clamp(0, 255)


def erase_lesions(images: torch.Tensor, masks: torch.Tensor, chosen: torch.Tensor,
                  generator: torch.Generator | None = None, feather: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Lesion-free copies of ultrasound frames, from the same scanner: a synthetic "normal".

    For each image with ``chosen`` set and a lesion in its mask (uint8 N x 1 x H x W, 255 =
    lesion), the lesion's bounding box, widened by a sixth of its size (at least twice
    ``feather``, so the blended seam lies outside the lesion) and extended down by its
    height (posterior shadowing or enhancement belongs to the lesion), is replaced by the
    tissue just beside it at the same depth: a horizontal shift by the box's width, left or
    right at random where the frame has room. Breast tissue lies in horizontal layers
    (skin, fat, gland, muscle), so the filler continues the layers; the edges are blended
    over ``feather`` pixels so the seam is not a sharp line. A box too wide to shift is left
    alone. Returns (uint8 images, bool N: erased). A site whose normal frames the model
    never sees (BrEaST has 4) otherwise teaches that its scanner means "lesion".
    """
    out = images.clone()
    erased = torch.zeros(len(images), dtype=torch.bool)
    h, w = images.shape[-2:]
    for i in torch.nonzero(chosen).flatten().tolist():
        rows = torch.nonzero(masks[i, 0].amax(dim=1) > 127).flatten()
        cols = torch.nonzero(masks[i, 0].amax(dim=0) > 127).flatten()
        if len(rows) == 0:
            continue
        r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        pad_r, pad_c = max(2 * feather, (r1 - r0) // 6), max(2 * feather, (c1 - c0) // 6)
        r0, r1 = max(0, r0 - pad_r), min(h, r1 + pad_r + (r1 - r0))
        c0, c1 = max(0, c0 - pad_c), min(w, c1 + pad_c)
        width = c1 - c0
        sides = [s for s, ok in ((-1, c0 - width >= 0), (1, c1 + width <= w)) if ok]
        if not sides:
            continue
        side = sides[int(torch.randint(len(sides), (1,), generator=generator))]
        src = images[i, :, r0:r1, c0 + side * width:c1 + side * width].float()
        alpha = torch.zeros(1, 1, h, w)
        alpha[..., r0:r1, c0:c1] = 1.0
        if feather > 0:  # soften the box's edge: a box filter shrunk inside the box, then smoothed
            k = 2 * feather + 1
            alpha = -F.max_pool2d(-alpha, k, stride=1, padding=feather)
            alpha = F.avg_pool2d(alpha, k, stride=1, padding=feather, count_include_pad=False)
        a = alpha[0, :, r0:r1, c0:c1]
        patch = out[i, :, r0:r1, c0:c1].float() * (1 - a) + src * a
        out[i, :, r0:r1, c0:c1] = patch.round().clamp(0, 255).to(images.dtype)
        erased[i] = True
    return out, erased


def mix_styles(features: torch.Tensor, generator: torch.Generator | None = None,
               alpha: float = 0.1, eps: float = 1e-6) -> torch.Tensor:
    """MixStyle (Zhou et al., "Domain generalization with MixStyle", ICLR 2021), for a batch
    of feature maps N x C x H x W: each image's per-channel mean and standard deviation (its
    "style": gain, texture, the scanner's look) are replaced by a mix of its own and those of
    another image of the batch, with a weight drawn from Beta(alpha, alpha) per image, while
    its normalised content stays. A batch that holds two hospitals then trains on scanner
    looks in between them. The statistics are taken without gradient, as in the paper; all
    randomness comes from ``generator``, so a seeded run repeats."""
    n = features.shape[0]
    if n < 2:
        return features
    mean = features.mean(dim=(2, 3), keepdim=True).detach()
    std = (features.var(dim=(2, 3), keepdim=True) + eps).sqrt().detach()
    # Beta draws from the torch generator's stream (torch's own Beta sampler takes no generator)
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    lam = np.random.default_rng(seed).beta(alpha, alpha, size=(n, 1, 1, 1))
    lam = torch.from_numpy(lam).to(device=features.device, dtype=features.dtype)
    other = torch.randperm(n, generator=generator).to(features.device)
    mixed_mean = lam * mean + (1 - lam) * mean[other]
    mixed_std = lam * std + (1 - lam) * std[other]
    return (features - mean) / std * mixed_std + mixed_mean


def random_convolution(x: torch.Tensor, generator: torch.Generator | None = None, p: float = 0.5,
                       kernel_sizes: tuple[int, ...] = (1, 3, 5, 7)) -> torch.Tensor:
    """RandConv (Xu et al., "Robust and generalizable visual representation learning via
    random convolutions", ICLR 2021), for grey ultrasound: each image of a float [0, 255]
    batch is, with probability ``p``, filtered by a random k x k kernel (k drawn per batch from
    ``kernel_sizes``, weights from He's normal), brought back to its own mean and standard
    deviation, and blended with the original by a weight drawn from U(0, 1). A random filter
    changes local texture and edge response (what differs between scanners and presets) but
    keeps shapes, so a model trained on it leans more on lesion shape and less on a
    scanner's texture. The image stays grey (one kernel for the grey level, the result on
    every channel). All randomness comes from ``generator``; ``p`` = 0 draws nothing."""
    if p <= 0:
        return x
    n, c, h, w = x.shape
    g = generator
    chosen = (torch.rand(n, generator=g) < p).view(n, 1, 1, 1)
    k = kernel_sizes[int(torch.randint(len(kernel_sizes), (1,), generator=g))]
    weights = torch.randn(n, 1, k, k, generator=g) * math.sqrt(2.0 / (k * k))
    alpha = torch.rand(n, generator=g).view(n, 1, 1, 1)
    grey = x.mean(dim=1, keepdim=True)                                    # N x 1 x H x W
    pad = k // 2
    padded = F.pad(grey.reshape(1, n, h, w), (pad, pad, pad, pad), mode="reflect" if pad < min(h, w) else "replicate")
    filtered = F.conv2d(padded, weights.to(x.dtype), groups=n).reshape(n, 1, h, w)
    mean, std = grey.mean(dim=(2, 3), keepdim=True), grey.std(dim=(2, 3), keepdim=True)
    f_mean, f_std = filtered.mean(dim=(2, 3), keepdim=True), filtered.std(dim=(2, 3), keepdim=True)
    filtered = (filtered - f_mean) / (f_std + 1e-6) * std + mean
    blended = (alpha * grey + (1 - alpha) * filtered).clamp(0, 255).expand(n, c, h, w)
    return torch.where(chosen, blended, x)
