"""Invertible layers (Real NVP, Dinh et al. 2017) for the feature map y = f(x) of the CQF decoder.

Convention: `forward(x) -> (y, logdet)` is the density direction (data -> features), with `logdet` the
per-sample log|det dy/dx| of shape (B,); `inverse(y) -> x` is the sampling direction. Every flow keeps the
shape of its input except `Squeeze`/`Unsqueeze`, and `real_nvp` as a whole maps (C, H, W) to (C, H, W).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .nets import coupling_net
from .resnets import residual_coupling_net

__all__ = [
    "ActNorm",
    "AffineCoupling",
    "FactorOut",
    "Identity",
    "Sequential",
    "Squeeze",
    "Unsqueeze",
    "channel_mask",
    "checkerboard",
    "real_nvp",
]


def checkerboard(channels: int, height: int, width: int, parity: int) -> Tensor:
    """(C, H, W) binary mask, 1 where (i + j + parity) is even: the conditioning entries of a coupling."""
    i, j = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    mask = ((i + j + parity) % 2 == 0).to(torch.get_default_dtype())
    return mask.expand(channels, height, width).clone()


def channel_mask(channels: int, height: int, width: int, parity: int) -> Tensor:
    """(C, H, W) binary mask selecting the first (parity 0) or second (parity 1) half of the channels."""
    mask = torch.zeros(channels, height, width)
    half = channels // 2
    if parity == 0:
        mask[:half] = 1
    else:
        mask[half:] = 1
    return mask


class AffineCoupling(nn.Module):
    """Masked affine coupling: y = m x + (1 - m) (x exp(s(m x)) + t(m x)), m the binary mask.

    The log-scale is bounded, s = c tanh(raw / c), so neither exp(s) nor exp(-s) can overflow; the
    conditioner's last layer is zero-initialised, so the coupling starts as the identity. The conditioner is
    the plain `nets.coupling_net` (`blocks=0`) or Real NVP's residual net of `blocks` blocks.
    """

    def __init__(self, mask: Tensor, hidden: int, max_log_scale: float = 2.0, blocks: int = 0):
        super().__init__()
        self.register_buffer("mask", mask)  # (C, H, W); 1 = conditioning entries
        channels = mask.shape[0]
        self.net = (residual_coupling_net(channels, 2 * channels, hidden, blocks) if blocks > 0
                    else coupling_net(channels, 2 * channels, hidden))
        self.max_log_scale = max_log_scale

    def _scale_shift(self, x_masked: Tensor) -> tuple[Tensor, Tensor]:
        raw, shift = self.net(x_masked).to(x_masked.dtype).chunk(2, dim=1)  # float32 under bf16 autocast
        log_scale = self.max_log_scale * torch.tanh(raw / self.max_log_scale)
        free = 1 - self.mask
        return log_scale * free, shift * free

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        log_scale, shift = self._scale_shift(x * self.mask)
        return x * log_scale.exp() + shift, log_scale.flatten(1).sum(1)

    def inverse(self, y: Tensor) -> Tensor:
        log_scale, shift = self._scale_shift(y * self.mask)  # y * mask == x * mask
        return (y - shift) * torch.exp(-log_scale)


class ActNorm(nn.Module):
    """Per-channel affine y = (x + bias) exp(log_scale) (Kingma & Dhariwal 2018).

    Data-dependent init: the first forward pass in training mode sets zero mean and unit variance per
    channel on that batch; the `initialized` buffer records it, so a loaded checkpoint is not re-initialised.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.log_scale = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(False))
        self._known_initialized = False  # host-side copy of `initialized`: no device sync once it is known

    def _load_from_state_dict(self, *args, **kwargs):
        self._known_initialized = False  # the loaded buffer decides again
        super()._load_from_state_dict(*args, **kwargs)

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        std = x.std(dim=(0, 2, 3), keepdim=True) if x.numel() > x.shape[1] else torch.ones_like(mean)
        self.bias.copy_(-mean)
        self.log_scale.copy_(-torch.log(std + 1e-6))
        self.initialized.fill_(True)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.training and not self._known_initialized:
            if not bool(self.initialized):
                self.initialize(x)
            self._known_initialized = True
        height, width = x.shape[2:]
        logdet = (height * width * self.log_scale.sum()).expand(x.shape[0])
        return (x + self.bias) * self.log_scale.exp(), logdet

    def inverse(self, y: Tensor) -> Tensor:
        return y * torch.exp(-self.log_scale) - self.bias


class Squeeze(nn.Module):
    """(B, C, H, W) -> (B, 4C, H/2, W/2), a permutation: log-det 0."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return F.pixel_unshuffle(x, 2), x.new_zeros(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        return F.pixel_shuffle(y, 2)


class Unsqueeze(nn.Module):
    """(B, 4C, H/2, W/2) -> (B, C, H, W), the inverse of `Squeeze`."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return F.pixel_shuffle(x, 2), x.new_zeros(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        return F.pixel_unshuffle(y, 2)


class Identity(nn.Module):
    """f(x) = x: the VAE's 'flow', so that `model.flow` always exists."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x, x.new_zeros(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        return y


class Sequential(nn.Module):
    """f_K o ... o f_1. The only place where log-determinants are summed."""

    def __init__(self, *flows: nn.Module):
        super().__init__()
        self.flows = nn.ModuleList(flows)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logdet = x.new_zeros(x.shape[0])
        for flow in self.flows:
            x, step_logdet = flow(x)
            logdet = logdet + step_logdet
        return x, logdet

    def inverse(self, y: Tensor) -> Tensor:
        for flow in reversed(self.flows):
            y = flow.inverse(y)
        return y


class FactorOut(nn.Module):
    """Real NVP's multi-scale split: `inner` transforms the first half of the channels; the second half is
    factored out (left as it is, its density modelled at this scale).

    The factored-out half is not dropped but re-assembled, so that y keeps the shape of x (DESIGN section 2).
    """

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        transformed, factored = x.chunk(2, dim=1)
        transformed, logdet = self.inner(transformed)
        return torch.cat([transformed, factored], dim=1), logdet

    def inverse(self, y: Tensor) -> Tensor:
        transformed, factored = y.chunk(2, dim=1)
        return torch.cat([self.inner.inverse(transformed), factored], dim=1)


def _couplings(masks: list[Tensor], hidden: int, max_log_scale: float, actnorm: bool,
               blocks: int = 0) -> list[nn.Module]:
    layers = []
    for mask in masks:
        if actnorm:
            layers.append(ActNorm(mask.shape[0]))
        layers.append(AffineCoupling(mask, hidden, max_log_scale, blocks))
    return layers


def real_nvp(
    channels: int,
    height: int,
    width: int,
    num_couplings: int,
    hidden: int = 64,
    scales: int = 1,
    max_log_scale: float = 2.0,
    actnorm: bool = True,
    blocks: int = 0,
) -> Sequential:
    """The CQF feature flow: (C, H, W) -> (C, H, W).

    One scale is `num_couplings` checkerboard couplings at full resolution, a squeeze, `num_couplings`
    channel-mask couplings, and an unsqueeze (Real NVP's recipe, re-assembled to keep the image shape).
    With `scales=2`, half of the squeezed channels go on through a second scale of checkerboard couplings
    at half resolution (the other half is factored out), as in Real NVP's multi-scale architecture.
    `blocks > 0` gives every coupling Real NVP's residual conditioner of that many blocks (`AffineCoupling`).
    """

    if height % 2 or width % 2:
        raise ValueError(f"real_nvp squeezes by 2: height and width must be even, got {height}x{width}")

    def checkerboards(c, h, w):
        return [checkerboard(c, h, w, parity=i % 2) for i in range(num_couplings)]

    layers = _couplings(checkerboards(channels, height, width), hidden, max_log_scale, actnorm, blocks)
    c, h, w = 4 * channels, height // 2, width // 2
    channel_masks = [channel_mask(c, h, w, parity=i % 2) for i in range(num_couplings)]
    layers += [Squeeze(), *_couplings(channel_masks, hidden, max_log_scale, actnorm, blocks)]
    if scales == 2:
        second = _couplings(checkerboards(c // 2, h, w), hidden, max_log_scale, actnorm, blocks)
        layers.append(FactorOut(Sequential(*second)))
    layers.append(Unsqueeze())
    return Sequential(*layers)
