"""Differentiable augmentation of every image the discriminator sees (Zhao et al. 2020, "DiffAugment").

Real and generated images go through the same random family of transforms, in the D step and in the G step,
so that D cannot memorise a small training set and its gradients still reach the generator. Pure functions of
model-space images (B, C, H, W) in (-1, 1); randomness from the global RNG (reseeded every training step),
drawn per sample (`cqf.distributed`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .distributed import rand_rows, randint_rows

__all__ = ["POLICIES", "augment", "color", "cutout", "translation"]


def color(x: Tensor) -> Tensor:
    """Per image: brightness shift in [-0.5, 0.5], saturation factor in [0, 2], contrast factor in [0.5, 1.5]."""
    b = x.shape[0]
    x = x + (rand_rows(b, 1, 1, 1, dtype=x.dtype, device=x.device) - 0.5)
    if x.shape[1] > 1:  # saturation: scale the distance to the per-pixel channel mean
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * (2 * rand_rows(b, 1, 1, 1, dtype=x.dtype, device=x.device)) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (rand_rows(b, 1, 1, 1, dtype=x.dtype, device=x.device) + 0.5) + mean


def translation(x: Tensor, ratio: float = 0.125) -> Tensor:
    """Per image: shift by up to `ratio` of the size in each direction (whole pixels), zeros shifted in."""
    b, _, h, w = x.shape
    max_dy, max_dx = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = randint_rows(-max_dy, max_dy + 1, b, 1, 1, device=x.device)
    dx = randint_rows(-max_dx, max_dx + 1, b, 1, 1, device=x.device)
    rows = torch.arange(h, device=x.device).view(1, h, 1) - dy + max_dy  # source row in the padded image
    cols = torch.arange(w, device=x.device).view(1, 1, w) - dx + max_dx
    padded = F.pad(x, (max_dx, max_dx, max_dy, max_dy))
    index = (rows * padded.shape[-1] + cols).view(b, 1, h * w).expand(-1, x.shape[1], -1)
    return padded.flatten(2).gather(2, index).view_as(x)


def cutout(x: Tensor, ratio: float = 0.5) -> Tensor:
    """Per image: zero a square of `ratio` of the size at a random position (it may hang over the border)."""
    b, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    top = randint_rows(0, h + (1 - ch % 2), b, 1, 1, device=x.device) - ch // 2
    left = randint_rows(0, w + (1 - cw % 2), b, 1, 1, device=x.device) - cw // 2
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    inside = (rows >= top) & (rows < top + ch) & (cols >= left) & (cols < left + cw)
    return x * (~inside).unsqueeze(1).to(x.dtype)


POLICIES = {"color": color, "translation": translation, "cutout": cutout}


def augment(x: Tensor, policy: tuple[str, ...]) -> Tensor:
    """Apply the named transforms in the order DiffAugment uses (color, translation, cutout)."""
    for name in ("color", "translation", "cutout"):
        if name in policy:
            x = POLICIES[name](x)
    return x
