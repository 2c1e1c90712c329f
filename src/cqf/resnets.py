"""Residual networks (`model.arch: resnet`): SNGAN-style encoder and decoder, and Real NVP's residual conditioner.

The blocks are SNGAN's (Miyato et al. 2018) pre-activation ResNet blocks, ReLU -> conv 3x3 -> ReLU -> conv 3x3
plus a shortcut, with nearest-neighbour upsampling in the decoder and average-pool downsampling in the encoder,
but **without normalisation layers**. BatchNorm (SNGAN's generator has it) computes its statistics over the
batch in training mode, so it would make
- one image's ELBO depend on the other images of its batch (the per-sample terms would not be per-sample);
- `VAE.elbo_and_sample` inexact: the posterior and the prior z share one decoder call, so the ELBO would
  depend on the samples drawn for L_Q;
- the ELBO differ between train and eval mode (running statistics), and the IWAE bound (K z's per image in
  one batch) differ from K one-sample ELBOs;
- a sharded (torchrun) step differ from the single-process step (per-rank statistics).
The width is constant (`channels` in every block, as SNGAN's 256 in G and 128 in D), the number of
resolution changes is `nets.num_downsamplings` of the image, as in the convolutional nets.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .nets import GaussianEncoder, num_downsamplings, zero_conv

__all__ = ["ResBlock", "ResDecoder", "ResEncoder", "residual_coupling_net"]


class ResBlock(nn.Module):
    """Pre-activation residual block: x + conv(relu(conv(relu(x)))), resampled by `resample`.

    Args:
        resample: "up" (nearest-neighbour 2x before the first conv), "down" (2x2 average pool after the
            second conv) or "none".
        first: the block sees raw pixels (no ReLU in front, SNGAN's "optimized block").
    """

    def __init__(self, in_channels: int, out_channels: int, resample: str = "none", first: bool = False):
        super().__init__()
        if resample not in ("up", "down", "none"):
            raise ValueError(f"resample must be up, down or none, got {resample!r}")
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        learnable = in_channels != out_channels or resample != "none"
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1) if learnable else None
        self.resample, self.first = resample, first

    def forward(self, x: Tensor) -> Tensor:
        h = x if self.first else F.relu(x)
        if self.resample == "up":
            h = F.interpolate(h, scale_factor=2, mode="nearest")
        h = self.conv2(F.relu(self.conv1(h)))
        if self.resample == "down":
            h = F.avg_pool2d(h, 2)
        # The 1x1 shortcut conv commutes with nearest upsampling and with average pooling: it runs at the
        # lower resolution of the two (SNGAN's order elsewhere, the same function).
        skip = F.avg_pool2d(x, 2) if self.resample == "down" else x
        if self.shortcut is not None:
            skip = self.shortcut(skip)
        if self.resample == "up":
            skip = F.interpolate(skip, scale_factor=2, mode="nearest")
        return h + skip


class ResEncoder(GaussianEncoder):
    """x (B, C, H, W) -> (mean, log_scale) of q(z | x), each (B, latent_dim): residual twin of `nets.ConvEncoder`.

    One downsampling block per `nets.num_downsamplings` stage (32 -> 16 -> 8 -> 4), one more block at the
    final resolution, ReLU, and a linear head on the flattened features. With `context_dim > 0` the head also
    gives the context h of an IAF posterior (`encode`).
    """

    def __init__(self, image_shape: tuple[int, int, int], latent_dim: int, channels: int, context_dim: int = 0):
        super().__init__()
        c, h, w = image_shape
        stages = num_downsamplings(h, w)
        blocks = [ResBlock(c if i == 0 else channels, channels, "down", first=i == 0) for i in range(stages)]
        blocks.append(ResBlock(channels if stages else c, channels, first=stages == 0))
        self.features = nn.Sequential(*blocks, nn.ReLU())
        self.head = nn.Linear(channels * (h >> stages) * (w >> stages), 2 * latent_dim + context_dim)
        self.latent_dim = latent_dim



class ResDecoder(nn.Module):
    """z (B, latent_dim) -> (mean, raw_scale) of image shape: residual twin of `nets.ConvDecoder` (SNGAN's G
    without BatchNorm): a linear map to (channels, H/2^n, W/2^n), n upsampling blocks, ReLU, a 3x3 output conv."""

    def __init__(self, image_shape: tuple[int, int, int], latent_dim: int, channels: int):
        super().__init__()
        c, h, w = image_shape
        stages = num_downsamplings(h, w)
        self.start_shape = (channels, h >> stages, w >> stages)
        self.head = nn.Linear(latent_dim, channels * self.start_shape[1] * self.start_shape[2])
        self.blocks = nn.Sequential(*[ResBlock(channels, channels, "up") for _ in range(stages)], nn.ReLU())
        self.out = nn.Conv2d(channels, 2 * c, 3, padding=1)

    @property
    def last(self) -> nn.Conv2d:
        """The output layer of the mean and the scale: every gradient that reaches the decoder passes here."""
        return self.out

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        out = self.out(self.blocks(self.head(z).view(-1, *self.start_shape))).to(z.dtype)  # (B, 2C, H, W)
        mean, raw_scale = out.chunk(2, dim=1)
        return mean, raw_scale


def residual_coupling_net(in_channels: int, out_channels: int, hidden: int, blocks: int) -> nn.Module:
    """Real NVP's residual conditioner (Dinh et al. 2017, section 4.1), without its batch norm (a flow's
    log-det must be per sample): conv 3x3, `blocks` residual blocks of `hidden` channels, ReLU, and a
    zero-initialised conv 3x3 output, so that the coupling starts as the identity."""
    last = zero_conv(hidden, out_channels)
    return nn.Sequential(
        nn.Conv2d(in_channels, hidden, 3, padding=1),
        *[ResBlock(hidden, hidden) for _ in range(blocks)],
        nn.ReLU(),
        last,
    )
