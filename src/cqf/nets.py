"""Plain networks, no probability: encoder, decoder, coupling conditioners, discriminator.

Sizes follow the image: the encoder halves the resolution while it stays even and above 4 pixels
(32 -> 16 -> 8 -> 4, 28 -> 14 -> 7, 8 -> 4, 48 -> ... -> 3, 64 -> ... -> 4) and the decoder mirrors it
(DCGAN-like); the width doubles at each stage up to `MAX_WIDTH` times `channels` (reached at 32x32's third
stage, so that 48 and 64 pixels add a stage, not a 1024-channel layer). The residual twins of the encoder and
decoder are in `cqf.resnets`.
"""

from __future__ import annotations

from itertools import pairwise

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DISC_SIZES", "ConvDecoder", "ConvEncoder", "Discriminator", "GaussianEncoder", "coupling_net",
           "default_disc_size", "num_downsamplings", "zero_conv"]


MAX_WIDTH = 8  # the conv nets' widest layer, in units of `channels`


def _widths(channels: int, stages: int) -> list[int]:
    """Channels after the first conv and after each downsampling stage."""
    return [channels * min(2**i, MAX_WIDTH) for i in range(stages + 1)]


def num_downsamplings(height: int, width: int) -> int:
    """How many stride-2 stages take (height, width) down to <= 4 pixels, while both stay even."""
    count = 0
    while height > 4 and height % 2 == 0 and width % 2 == 0:
        height, width, count = height // 2, width // 2, count + 1
    return count


class GaussianEncoder(nn.Module):
    """The head shared by the encoders: `features` (a network to a feature map) then the linear `head` to
    (mean, log_scale, context); subclasses build both and set `latent_dim`."""

    features: nn.Module
    head: nn.Linear
    latent_dim: int

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(mean, log_scale, context h), (B, latent_dim) twice and (B, context_dim), in x's dtype (the KL's)."""
        out = self.head(self.features(x).flatten(1)).to(x.dtype)
        return out[:, : self.latent_dim], out[:, self.latent_dim : 2 * self.latent_dim], out[:, 2 * self.latent_dim :]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mean, log_scale, _ = self.encode(x)
        return mean, log_scale


class ConvEncoder(GaussianEncoder):
    """x (B, C, H, W) -> (mean, log_scale) of q(z | x), each (B, latent_dim).

    With `context_dim > 0` the head also gives the context h of an IAF posterior (`encode`).
    """

    def __init__(self, image_shape: tuple[int, int, int], latent_dim: int, channels: int, context_dim: int = 0):
        super().__init__()
        c, h, w = image_shape
        widths = _widths(channels, num_downsamplings(h, w))
        layers = [nn.Conv2d(c, channels, 3, padding=1), nn.SiLU()]
        for width_in, width_out in pairwise(widths):
            layers += [nn.Conv2d(width_in, width_out, 4, stride=2, padding=1), nn.SiLU()]
            h, w = h // 2, w // 2
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(widths[-1] * h * w, 2 * latent_dim + context_dim)
        self.latent_dim = latent_dim



class ConvDecoder(nn.Module):
    """z (B, latent_dim) -> (mean, raw_scale) of image shape; the likelihood maps raw_scale to sigma."""

    def __init__(self, image_shape: tuple[int, int, int], latent_dim: int, channels: int):
        super().__init__()
        c, h, w = image_shape
        stages = num_downsamplings(h, w)
        widths = _widths(channels, stages)[::-1]
        self.start_shape = (widths[0], h // 2**stages, w // 2**stages)
        self.head = nn.Linear(latent_dim, self.start_shape[0] * self.start_shape[1] * self.start_shape[2])
        layers = [nn.SiLU()]
        for width_in, width_out in pairwise(widths):
            layers += [nn.ConvTranspose2d(width_in, width_out, 4, stride=2, padding=1), nn.SiLU()]
        layers.append(nn.Conv2d(channels, 2 * c, 3, padding=1))
        self.body = nn.Sequential(*layers)

    @property
    def last(self) -> nn.Conv2d:
        """The output layer of the mean and the scale: every gradient that reaches the decoder passes here."""
        return self.body[-1]

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        out = self.body(self.head(z).view(-1, *self.start_shape)).to(z.dtype)  # (B, 2C, H, W), likelihood in z's dtype
        mean, raw_scale = out.chunk(2, dim=1)
        return mean, raw_scale


def zero_conv(in_channels: int, out_channels: int) -> nn.Conv2d:
    """A 3x3 convolution with zero weights and bias: a conditioner's output layer, so that its coupling starts
    as the identity."""
    conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


def coupling_net(in_channels: int, out_channels: int, hidden: int) -> nn.Module:
    """Conditioner of an affine coupling. The last layer is zero-initialised so the coupling starts as identity."""
    last = zero_conv(hidden, out_channels)
    return nn.Sequential(
        nn.Conv2d(in_channels, hidden, 3, padding=1),
        nn.SiLU(),
        nn.Conv2d(hidden, hidden, 1),
        nn.SiLU(),
        last,
    )


class _DiscBlock(nn.Module):
    """SNGAN residual block (Miyato et al. 2018) with spectral-normalised convs, optional 2x downsampling."""

    def __init__(self, in_channels: int, out_channels: int, downsample: bool, first: bool):
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm
        self.conv1 = sn(nn.Conv2d(in_channels, out_channels, 3, padding=1))
        self.conv2 = sn(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = sn(nn.Conv2d(in_channels, out_channels, 1)) if in_channels != out_channels or downsample else None
        self.downsample, self.first = downsample, first

    def forward(self, x: Tensor) -> Tensor:
        h = x if self.first else F.relu(x)  # the first block sees raw pixels (SNGAN's "optimized block")
        h = self.conv2(F.relu(self.conv1(h)))
        if self.downsample:
            h = F.avg_pool2d(h, 2)
        skip = x
        if self.skip is not None:
            skip = self.skip(skip)
        if self.downsample:
            skip = F.avg_pool2d(skip, 2)
        return h + skip


class Discriminator(nn.Module):
    """SNGAN-style ResNet discriminator: x (B, C, H, W) -> logits (B,).

    CIFAR-10 at 32x32 (SNGAN): 4 blocks of 128 channels, the first two downsampling, ReLU, global sum
    pooling and one spectral-normalised linear logit. Larger images downsample on further blocks while above
    8 pixels (48 -> 24 -> 12 -> 6, 64 -> 32 -> 16 -> 8), so that the last blocks see SNGAN's 8x8 or less.
    """

    def __init__(self, image_shape: tuple[int, int, int], channels: int, num_blocks: int):
        super().__init__()
        c, h, w = image_shape
        blocks, width = [], c
        for i in range(num_blocks):
            downsample = h % 2 == 0 and w % 2 == 0 and h > 4 and (i < 2 or h > 8)
            blocks.append(_DiscBlock(width, channels, downsample, first=i == 0))
            width = channels
            if downsample:
                h, w = h // 2, w // 2
        self.blocks = nn.Sequential(*blocks)
        self.logit = nn.utils.parametrizations.spectral_norm(nn.Linear(channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.blocks(x)).sum(dim=(2, 3))  # global sum pooling
        return self.logit(h).squeeze(1).to(x.dtype)


DISC_SIZES = ("base", "large")


def default_disc_size(image_shape: tuple[int, int, int], size: str = "base") -> tuple[int, int]:
    """(channels, blocks) of the discriminator by resolution and `model.disc_size`.

    base: SNGAN's 128 x 4 at 32x32 and above, 64 x 3 from 16x16, 32 x 2 below. large: twice as wide and two
    blocks deeper (256 x 6 at 32x32), our choice for the paper's "large D" (DESIGN section 3).
    """
    if size not in DISC_SIZES:
        raise ValueError(f"size must be one of {', '.join(DISC_SIZES)}, got {size!r}")
    height = image_shape[1]
    channels, blocks = (128, 4) if height >= 32 else (64, 3) if height >= 16 else (32, 2)
    return (2 * channels, blocks + 2) if size == "large" else (channels, blocks)


class Classifier(nn.Module):
    """Small CNN for domain features on small images (digits, MNIST): x in [0, 1] -> (features, logits).

    Its penultimate layer (`feature_dim` units) plays the role of Inception's pool3 for images where
    Inception features mean little.
    """

    def __init__(self, image_shape: tuple[int, int, int], num_classes: int, width: int = 32, feature_dim: int = 128):
        super().__init__()
        c, h, w = image_shape
        layers, channels = [], c
        for _ in range(max(num_downsamplings(h, w), 1)):
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1),
                       nn.ReLU(), nn.MaxPool2d(2)]
            channels, width = width, 2 * width
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, feature_dim),
                                  nn.ReLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.body(x)
        return features, self.head(features)
