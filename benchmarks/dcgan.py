"""A standard DCGAN (Radford, Metz and Chintala, ICLR 2016), written from the paper's description: the GAN peer of
`benchmarks/peers.py`.

- Generator: z (latent 100) is projected to a `start x start` map by a transposed convolution (the paper's
  "project and reshape" matrix multiplication), then each layer doubles the size and halves the channels:
  ConvTranspose2d(4, stride 2, pad 1) + BatchNorm + ReLU, and the last one gives the image through tanh.
- Discriminator: the mirror image, strided Conv2d(4, stride 2, pad 1) + BatchNorm + LeakyReLU(0.2), no
  BatchNorm on the first layer, no pooling; the last `start x start` map is flattened into one logit by a
  convolution over the whole map (the paper's "flattened and fed into a single sigmoid output"; the sigmoid is
  in the loss).
- N(0, 0.02) weights (BatchNorm scales N(1, 0.02), shifts 0), no biases (BatchNorm supplies the shifts), Adam
  lr 2e-4 with betas (0.5, 0.999), the non-saturating loss.

Sizes: `start` is the image side halved while it stays even and the half is >= 4: 4 for 8x8, 32x32 and 64x64,
7 for 28x28. `width` (64) is the channels of the last hidden map, doubling at each layer towards z: 32x32 images
get 256 -> 128 -> 64 channels, 64x64 images 512 -> 256 -> 128 -> 64. That is the PyTorch reference DCGAN
(64x64 RGB: G 3,576,704 and D 2,765,568 parameters); the paper's LSUN figure draws twice the channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Discriminator", "Generator", "adam", "check_image_shape", "generator_loss", "num_halvings"]

LATENT_DIM = 100


def num_halvings(size: int) -> int:
    """How many stride-2 layers an image side of `size` pixels gets: halve while even and the half is >= 4.

    Raises ValueError for sides the architecture cannot build (odd, or below 8).
    """
    n = 0
    while size % 2 == 0 and size // 2 >= 4:
        size //= 2
        n += 1
    if n == 0:
        raise ValueError(f"DCGAN needs an even image side of at least 8 pixels, got {size}")
    return n


def _init(module: nn.Module) -> None:
    """The paper's initialisation: every weight N(0, 0.02); BatchNorm scales N(1, 0.02) and shifts 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def check_image_shape(image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """(C, H, W) -> (C, H, halvings); ValueError for images the architecture cannot take (not square, odd, < 8)."""
    channels, height, width = image_shape
    if height != width:
        raise ValueError(f"DCGAN takes square images, got {height}x{width}")
    return channels, height, num_halvings(height)


class Generator(nn.Module):
    """z (B, latent_dim) -> images (B, C, H, W) in (-1, 1) (cqf's model space), through tanh.

    Args:
        image_shape: (C, H, W), H == W, H even and >= 8.
        latent_dim: size of z ~ N(0, I) (the paper's 100).
        width: channels of the last hidden map (64); they double at each layer towards z.
    """

    def __init__(self, image_shape: tuple[int, int, int], latent_dim: int = LATENT_DIM, width: int = 64):
        super().__init__()
        channels, size, n = check_image_shape(image_shape)
        self.image_shape, self.latent_dim = tuple(image_shape), latent_dim
        start = size >> n
        c = width * 2 ** (n - 1)  # channels of the start x start map
        layers = [nn.ConvTranspose2d(latent_dim, c, start, 1, 0, bias=False), nn.BatchNorm2d(c), nn.ReLU(True)]
        for _ in range(n - 1):
            layers += [nn.ConvTranspose2d(c, c // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(c // 2), nn.ReLU(True)]
            c //= 2
        layers += [nn.ConvTranspose2d(c, channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        _init(self)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z[:, :, None, None])  # (B, latent) -> (B, latent, 1, 1) -> (B, C, H, W)


class Discriminator(nn.Module):
    """Images (B, C, H, W) in model space -> logits (B,) (D = sigmoid(logit) is the probability of "real")."""

    def __init__(self, image_shape: tuple[int, int, int], width: int = 64):
        super().__init__()
        channels, size, n = check_image_shape(image_shape)
        start = size >> n
        # No BatchNorm on the first layer: the paper found that BatchNorm on D's input (and G's output) makes
        # sample oscillation and model instability.
        layers = [nn.Conv2d(channels, width, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True)]
        c = width
        for _ in range(n - 1):
            layers += [nn.Conv2d(c, 2 * c, 4, 2, 1, bias=False), nn.BatchNorm2d(2 * c), nn.LeakyReLU(0.2, True)]
            c *= 2
        layers += [nn.Conv2d(c, 1, start, 1, 0, bias=False)]  # the flattened start x start map -> one logit
        self.net = nn.Sequential(*layers)
        _init(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).flatten()  # (B, 1, 1, 1) -> (B,)


def adam(params) -> torch.optim.Adam:
    """The paper's optimiser: Adam, lr 2e-4, beta1 0.5 (0.9 oscillated), beta2 0.999."""
    return torch.optim.Adam(params, lr=2e-4, betas=(0.5, 0.999))


def generator_loss(fake_logits: Tensor) -> Tensor:
    """The non-saturating generator loss -E log D(G(z)) (Goodfellow et al. 2014), nats: BCE against "real"."""
    return F.softplus(-fake_logits).mean()
