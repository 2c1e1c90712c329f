"""The NVP baseline (Dinh et al. 2017): the Real-NVP flow alone over a standard normal base, no latent variable.

    ln p(x) = ln N(f(x); 0, I) + ln|det df/dx|    (exact),        x = f^-1(eps),  eps ~ N(0, I)

Selected by `model.latent_dim: 0`. It has the interface of the VAE family (`cqf.models.DensityModel`), so the
one training loop, `cqf eval` and `cqf sample` use it unchanged: `elbo` returns the exact log-density as
`log_px_z` with a zero KL, and `log_prob` returns the same value for every K.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import losses
from .distributed import randn_rows
from .models import ElboTerms

__all__ = ["NVP"]


class NVP(nn.Module):
    """Density model p(x) = N(f(x); 0, I) |det df/dx| of model-space images.

    Its latent is the base-space point eps of image size: `latent_dim` is C * H * W, and `sample(z=...)` takes
    (N, C * H * W) (or image-shaped) base points, so that fixed sample grids work as for the VAE family.

    Args:
        flow: the invertible f (density direction), e.g. `flows.real_nvp`.
        image_shape: (C, H, W).
        levels: grey levels of the data (for bits/dim).
    """

    def __init__(self, flow: nn.Module, image_shape: tuple[int, int, int], levels: int):
        super().__init__()
        self.flow = flow
        self.image_shape, self.levels = tuple(image_shape), levels
        self.latent_dim = math.prod(self.image_shape)
        self.temperature = 1.0  # base N(0, T^2 I) for density and samples alike (`models.tempered`; not saved)

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def elbo(self, x: Tensor) -> ElboTerms:
        """Exact ln p(x) of x (B, C, H, W) as `log_px_z` (B,) nats, with kl = 0: the 'ELBO' is no bound here."""
        y, logdet = self.flow(x)
        if self.temperature == 1.0:
            log_p = losses.standard_normal_log_prob(y) + logdet
        else:  # ln N(y; 0, T^2 I) = ln N(y / T; 0, I) - D ln T
            t = self.temperature
            log_p = losses.standard_normal_log_prob(y / t) - self.latent_dim * math.log(t) + logdet
        return ElboTerms(log_p, torch.zeros_like(log_p), torch.zeros((), dtype=log_p.dtype, device=log_p.device))

    def elbo_and_sample(self, x: Tensor, num_samples: int, noise: bool = True,
                        batched: bool = True) -> tuple[ElboTerms, Tensor | None]:
        """`elbo(x)` then `sample(num_samples)` (the VAE's interface; the flow has no decoder call to share)."""
        return self.elbo(x), self.sample(num_samples, noise=noise) if num_samples else None

    @torch.no_grad()
    def log_prob(self, x: Tensor, num_importance: int = 100, chunk: int = 25) -> Tensor:
        """Exact ln p(x), (B,) nats; `num_importance` and `chunk` are ignored (there is no latent to sample)."""
        return self.elbo(x).log_px_z

    def sample(self, num_samples: int, noise: bool = True, z: Tensor | None = None) -> Tensor:
        """x = f^-1(eps) with eps ~ N(0, I) of image size (or the given base points z); `noise` has no effect:
        eps is the model's only randomness. At temperature T (`models.tempered`) x = f^-1(T eps)."""
        if z is None:
            z = randn_rows(num_samples, *self.image_shape, device=self._device())
        z = z.reshape(-1, *self.image_shape)
        return self.flow.inverse(z if self.temperature == 1.0 else self.temperature * z)

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """f^-1(f(x)): x itself up to the flow's round-off (the reconstruction grid shows the inverse works)."""
        return self.flow.inverse(self.flow(x)[0])

    def bits_per_dim(self, log_p: Tensor) -> Tensor:
        """(B,) nats of model-space images -> bits/dim of the integer images (`losses.bits_per_dim`)."""
        return losses.bits_per_dim(log_p, self.latent_dim, self.levels)
