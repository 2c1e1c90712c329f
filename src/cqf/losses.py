"""Pure functions of tensors. Log-likelihood terms are per-sample (B,) tensors in nats; callers reduce.

The training objective is in nats per image (DESIGN section 3); bits/dim is a reporting unit only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "bits_per_dim",
    "diag_gaussian_log_prob",
    "discriminator_bce",
    "kl_to_standard_normal",
    "quality_loss",
    "standard_normal_log_prob",
]

LOG_2PI = math.log(2 * math.pi)


def diag_gaussian_log_prob(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """Elementwise log N(x; mean, exp(log_scale)^2) in nats, same shape as x."""
    return -0.5 * (LOG_2PI + 2 * log_scale + ((x - mean) * torch.exp(-log_scale)) ** 2)


def standard_normal_log_prob(z: Tensor) -> Tensor:
    """log N(z; 0, I) summed over non-batch dims -> (B,) nats."""
    return (-0.5 * (LOG_2PI + z**2)).flatten(1).sum(1)


def kl_to_standard_normal(mean: Tensor, log_scale: Tensor) -> Tensor:
    """KL(N(mean, exp(log_scale)^2) || N(0, I)) summed over non-batch dims -> (B,) nats."""
    kl = 0.5 * (mean**2 + torch.exp(2 * log_scale) - 1) - log_scale
    return kl.flatten(1).sum(1)


def bits_per_dim(log_p: Tensor, num_dims: int, levels: int = 256) -> Tensor:
    """Bits/dim of integer data from the log-density (nats) of its dequantized model-space version.

    The model saw x = 2 (k + u) / levels - 1 with k in {0..levels-1}^D, u ~ U[0, 1)^D, so the density of
    k + u is p(x) * (2 / levels)^D and

        bpd = -(ln p(x) + D ln(2 / levels)) / (D ln 2).

    For 8-bit images this is (-ln p(x) + D ln 128) / (D ln 2) (DESIGN section 1). A uniform model on
    (-1, 1)^D gives exactly log2(levels).

    Args:
        log_p: (B,) log-density (or a lower bound on it) in model space, nats.
        num_dims: D = C * H * W.
        levels: grey levels per dimension.
    """
    return -(log_p + num_dims * math.log(2 / levels)) / (num_dims * math.log(2))


def discriminator_bce(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """-E log D(x) - E log(1 - D(x_gen)), D = sigmoid(logit); real = 1, model samples = 0. Scalar, nats."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def quality_loss(fake_logits: Tensor) -> Tensor:
    """L_Q = -E_z ln(D / (1 - D)) = -E_z logit(x_gen): nats per image, like L_C (DESIGN section 3)."""
    return -fake_logits.mean()
