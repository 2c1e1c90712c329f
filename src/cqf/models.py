"""Probability models: the VAE / VAE-F family (DESIGN section 2) and the GAN generator.

    p(x | z) = N(f(x); mu(z), diag sigma(z)^2) |det df/dx|,   p(z) = N(0, I),   q(z | x) = N(m(x), diag s(x)^2)

with f a Real-NVP flow (VAE-F, CQ-F) or the identity (VAE, CQ), and q optionally followed by IAF steps
(`cqf.iaf`). The NVP baseline, the flow alone (`model.latent_dim: 0`), is `cqf.nvp.NVP`. Models expose `elbo`,
`log_prob` and `sample`; they hold no optimizers and no loss weights.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import flows, iaf, losses, nets, resnets
from .config import ModelConfig
from .distributed import randn_rows
from .errors import ConfigError, CQFError

__all__ = [
    "DECODERS",
    "ENCODERS",
    "VAE",
    "DensityModel",
    "ElboTerms",
    "FlowGaussian",
    "Generator",
    "ImageModel",
    "IsotropicDecoder",
    "build_encoder",
    "build_flow",
    "build_model",
    "check_temperature",
    "gan_density_model",
    "model_space_sigma_floor",
    "tempered",
]


@runtime_checkable
class ImageModel(Protocol):
    """Anything that draws model-space images: every variant, GAN included."""

    latent_dim: int
    image_shape: tuple[int, int, int]
    levels: int

    def sample(self, num_samples: int, noise: bool = True, z: Tensor | None = None) -> Tensor: ...


@runtime_checkable
class DensityModel(ImageModel, Protocol):
    """An `ImageModel` with a density: the VAE family (not the GAN). Terms in nats, (B,) per image."""

    def elbo(self, x: Tensor) -> ElboTerms: ...

    def log_prob(self, x: Tensor, num_importance: int = 100) -> Tensor: ...

    def bits_per_dim(self, log_p: Tensor) -> Tensor: ...

    def reconstruct(self, x: Tensor) -> Tensor: ...


def model_space_sigma_floor(sigma_floor: float, levels: int) -> float:
    """`model.sigma_floor` (in units of 1/levels) -> the bound on the decoder's sigma in model space.

    One grey level is 2 / levels wide in model space (DESIGN section 6); sigma >= sigma_floor / levels.
    """
    return sigma_floor / levels


def check_temperature(model: nn.Module, temperature: float) -> nn.Module | None:
    """The module whose `temperature` `tempered` sets (None: a model without noise, which only T = 1 fits);
    refuses T <= 0, and T != 1 for a GAN, with the fix."""
    if not (temperature > 0 and math.isfinite(temperature)):
        raise CQFError(f"--temperature must be a positive number (1 = the model as trained), got {temperature}")
    holder = getattr(model, "likelihood", model)
    if hasattr(holder, "temperature"):
        return holder
    if temperature != 1.0:
        raise CQFError("--temperature scales a density model's noise; a GAN has none (its generator is "
                       "deterministic): drop --temperature")
    return None


@contextlib.contextmanager
def tempered(model: nn.Module, temperature: float) -> Iterator[nn.Module]:
    """`model` at temperature T inside the block: the VAE family's decoder sigma becomes T sigma, the NVP
    baseline's base N(0, I) becomes N(0, T^2 I). Both are density models in their own right, so the block's
    bits/dim and samples are one model's: T < 1 trades likelihood for less sample noise (`cqf eval
    --temperature`). T = 1 is the model as trained (any model, a GAN too); `check_temperature` refuses the
    rest. The previous temperature is restored on leaving."""
    holder = check_temperature(model, temperature)
    if holder is None:
        yield model
        return
    previous, holder.temperature = holder.temperature, float(temperature)
    try:
        yield model
    finally:
        holder.temperature = previous


@dataclass
class ElboTerms:
    """Per-sample terms of the ELBO, each (B,) in nats, in model space."""

    log_px_z: Tensor  # ln N(f(x); mu, sigma^2) + ln|det df/dx|, one z per image
    kl: Tensor  # KL(q(z|x) || p(z))
    sigma_at_floor: Tensor  # scalar: fraction of decoder sigmas within 1% of their floor (diagnostic)
    sigma_mean: Tensor | None = None  # scalar: mean decoder sigma in feature space, model-space units (diagnostic)

    @property
    def elbo(self) -> Tensor:
        return self.log_px_z - self.kl


class FlowGaussian(nn.Module):
    """The observation model N(f(x); mu, sigma^2) |det df/dx|; sigma = floor + softplus(raw) (DESIGN section 6)."""

    def __init__(self, flow: nn.Module, sigma_floor: float):
        super().__init__()
        self.flow = flow
        self.sigma_floor = sigma_floor
        self.temperature = 1.0  # sigma -> T sigma for density and samples alike (`tempered`; not saved)

    def log_scale(self, raw_scale: Tensor) -> Tensor:
        log_scale = torch.log(self.sigma_floor + F.softplus(raw_scale))
        return log_scale if self.temperature == 1.0 else log_scale + math.log(self.temperature)

    def features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(f(x), ln|det df/dx|). Independent of z: computed once per image."""
        return self.flow(x)

    def log_prob(self, features: tuple[Tensor, Tensor], mean: Tensor, raw_scale: Tensor) -> Tensor:
        y, logdet = features
        return losses.diag_gaussian_log_prob(y, mean, self.log_scale(raw_scale)).flatten(1).sum(1) + logdet

    def sample(self, mean: Tensor, raw_scale: Tensor, noise: bool = True, sigma_grad: bool = True,
               decoder_grad: bool = True, mean_grad: bool = True) -> Tensor:
        """x = f^-1(mu + sigma * eps): the decoder noise lives in feature space (DESIGN section 2). With
        `sigma_grad=False` no gradient of the samples reaches sigma (`train.quality_sigma`), with
        `mean_grad=False` none reaches mu (`train.quality_mean`); with `decoder_grad=False` none reaches mu or
        sigma, only the flow (`train.quality_decoder`)."""
        if not decoder_grad:
            mean, raw_scale = mean.detach(), raw_scale.detach()
        elif not mean_grad:
            mean = mean.detach()
        if noise:
            eps = randn_rows(len(mean), *mean.shape[1:], dtype=mean.dtype, device=mean.device)
            sigma = self.log_scale(raw_scale).exp()
            y = mean + (sigma if sigma_grad else sigma.detach()) * eps
        else:
            y = mean
        return self.flow.inverse(y)


class VAE(nn.Module):
    """VAE with a (flow-)Gaussian decoder. VAE, VAE-F, CQ and CQ-F are this class; they differ in `flow`
    (identity or Real NVP) and in the training loss weights, never in code.

    Args:
        encoder: the posterior: a Gaussian encoder x -> (mean, log_scale) of q(z|x) (analytic KL), or an
            `iaf.IAFPosterior` returning z and ln q(z|x) (one-sample KL estimate ln q(z|x) - ln p(z)).
        decoder: z -> (mean, raw_scale) in feature space.
        likelihood: `FlowGaussian`.
        latent_dim: size of z.
        levels: grey levels of the data (for bits/dim).
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        likelihood: FlowGaussian,
        latent_dim: int,
        image_shape: tuple[int, int, int],
        levels: int,
    ):
        super().__init__()
        self.encoder, self.decoder, self.likelihood = encoder, decoder, likelihood
        self.latent_dim, self.image_shape, self.levels = latent_dim, tuple(image_shape), levels

    @property
    def flow(self) -> nn.Module:
        return self.likelihood.flow

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def elbo(self, x: Tensor) -> ElboTerms:
        """One-sample ELBO terms of model-space images x (B, C, H, W)."""
        return self.elbo_and_sample(x, 0)[0]

    def elbo_and_sample(self, x: Tensor, num_samples: int, noise: bool = True, batched: bool = True,
                        sigma_grad: bool = True, decoder_grad: bool = True,
                        mean_grad: bool = True) -> tuple[ElboTerms, Tensor]:
        """`elbo(x)` and `sample(num_samples)`, with the same random draws, in one decoder call on the posterior
        and the prior z together (the decoder is per-sample, so this is exact). `batched=False` makes two calls:
        cheaper when the two losses are then differentiated apart, since each backward pass would otherwise
        run through the other loss's half of the batch."""
        if not batched:
            return self.elbo(x), self.sample(num_samples, noise=noise, sigma_grad=sigma_grad,
                                             decoder_grad=decoder_grad, mean_grad=mean_grad)
        z, kl = self._posterior_sample(x)
        if num_samples:
            z = torch.cat([z, randn_rows(num_samples, self.latent_dim, dtype=z.dtype, device=z.device)])
        mean, raw_scale = self.decoder(z)
        batch = x.shape[0]
        log_px_z = self.likelihood.log_prob(self.likelihood.features(x), mean[:batch], raw_scale[:batch])
        with torch.no_grad():
            sigma = self.likelihood.log_scale(raw_scale[:batch]).exp()
            at_floor = (sigma < 1.01 * self.likelihood.sigma_floor).float().mean()
        terms = ElboTerms(log_px_z, kl, at_floor, sigma.mean())
        samples = (self.likelihood.sample(mean[batch:], raw_scale[batch:], noise=noise, sigma_grad=sigma_grad,
                                          decoder_grad=decoder_grad, mean_grad=mean_grad) if num_samples else None)
        return terms, samples

    def _posterior_sample(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """One z ~ q(z|x) per image (B, latent) and the KL term (B,) in nats: analytic for a Gaussian q, the
        one-sample estimate ln q(z|x) - ln p(z) for an IAF posterior."""
        eps = randn_rows(len(x), self.latent_dim, dtype=x.dtype, device=x.device)
        if isinstance(self.encoder, iaf.IAFPosterior):
            z, log_q = self.encoder(x, eps)
            return z, log_q - losses.standard_normal_log_prob(z)
        q_mean, q_log_scale = self.encoder(x)
        return q_mean + q_log_scale.exp() * eps, losses.kl_to_standard_normal(q_mean, q_log_scale)

    @torch.no_grad()
    def log_prob(self, x: Tensor, num_importance: int = 100, chunk: int = 25) -> Tensor:
        """Importance-weighted bound on ln p(x) with K = num_importance samples (Burda et al. 2016), (B,) nats.

        It is a lower bound that tightens as K grows, and at K = 1 has the ELBO's expectation.
        """
        if isinstance(self.encoder, iaf.IAFPosterior):  # the same q as the ELBO's: through the IAF steps
            encoded, draw = self.encoder.encode(x), self.encoder.transform
        else:
            encoded, draw = self.encoder(x), iaf.gaussian_sample
        features = self.likelihood.features(x)  # the flow runs once, not once per z
        batch = x.shape[0]
        log_w = []
        for start in range(0, num_importance, chunk):
            k = min(chunk, num_importance - start)
            eps = torch.randn(k, batch, self.latent_dim, dtype=x.dtype, device=x.device)
            z, log_qz = draw(eps, *encoded)  # (k, B, latent), (k, B): ln q(z|x) tracked exactly
            z = z.flatten(0, 1)  # (k B, latent)
            repeated = tuple(t.repeat(k, *([1] * (t.dim() - 1))) for t in features)
            log_px_z = self.likelihood.log_prob(repeated, *self.decoder(z)).view(k, batch)
            log_pz = losses.standard_normal_log_prob(z).view(k, batch)
            log_w.append(log_px_z + log_pz - log_qz)
        return torch.logsumexp(torch.cat(log_w), 0) - math.log(num_importance)

    def sample(self, num_samples: int, noise: bool = True, z: Tensor | None = None,
               sigma_grad: bool = True, decoder_grad: bool = True, mean_grad: bool = True) -> Tensor:
        """Model-space images: z ~ p(z) (or the given z), x = f^-1(mu(z) + sigma(z) eps); `sigma_grad`,
        `decoder_grad` and `mean_grad` as in `FlowGaussian.sample`."""
        if z is None:
            z = randn_rows(num_samples, self.latent_dim, device=self._device())
        return self.likelihood.sample(*self.decoder(z), noise=noise, sigma_grad=sigma_grad,
                                      decoder_grad=decoder_grad, mean_grad=mean_grad)

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """f^-1(mu(z)) at the posterior mean z (with IAF: the image of eps = 0), for reconstruction grids."""
        z = self.encoder.mode(x) if isinstance(self.encoder, iaf.IAFPosterior) else self.encoder(x)[0]
        return self.likelihood.sample(*self.decoder(z), noise=False)

    def bits_per_dim(self, log_p: Tensor) -> Tensor:
        """(B,) nats of model-space images -> bits/dim of the integer images (`losses.bits_per_dim`)."""
        return losses.bits_per_dim(log_p, math.prod(self.image_shape), self.levels)


class Generator(nn.Module):
    """GAN baseline: x = mu(z), the decoder's mean path, deterministic; no density (DESIGN section 2)."""

    def __init__(self, decoder: nn.Module, latent_dim: int, image_shape: tuple[int, int, int], levels: int):
        super().__init__()
        self.decoder, self.latent_dim, self.image_shape, self.levels = decoder, latent_dim, tuple(image_shape), levels

    def sample(self, num_samples: int, noise: bool = True, z: Tensor | None = None) -> Tensor:
        if z is None:
            z = randn_rows(num_samples, self.latent_dim, device=next(self.parameters()).device)
        return self.decoder(z)[0]


class IsotropicDecoder(nn.Module):
    """z -> (G(z), one shared raw scale): the GAN's frozen generator with a single learned isotropic sigma."""

    def __init__(self, generator: Generator):
        super().__init__()
        self.generator = generator.requires_grad_(False)
        self.raw_scale = nn.Parameter(torch.zeros(()))

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        mean = self.generator.decoder(z)[0]
        return mean, self.raw_scale.expand_as(mean)


ENCODERS = {"conv": nets.ConvEncoder, "resnet": resnets.ResEncoder}  # `model.arch`
DECODERS = {"conv": nets.ConvDecoder, "resnet": resnets.ResDecoder}


def build_encoder(cfg: ModelConfig, image_shape: tuple[int, int, int]) -> nn.Module:
    """q(z|x) of the density models: the Gaussian encoder of `model.arch`, followed by `model.iaf_steps` IAF
    steps when > 0; also the encoder fitted for a GAN's approximate bits/dim (same capacity)."""
    if cfg.iaf_steps == 0:
        return ENCODERS[cfg.arch](image_shape, cfg.latent_dim, cfg.channels)
    encoder = ENCODERS[cfg.arch](image_shape, cfg.latent_dim, cfg.channels, context_dim=cfg.iaf_context)
    return iaf.IAFPosterior(encoder, cfg.latent_dim, cfg.iaf_context, cfg.iaf_hidden, cfg.iaf_steps)


def build_flow(cfg: ModelConfig, image_shape: tuple[int, int, int]) -> nn.Module:
    """The feature flow f: Real NVP of `model.flow_*`, or the identity when `model.flow_couplings` is 0."""
    if cfg.flow_couplings == 0:
        return flows.Identity()
    _, height, width = image_shape
    if height % 2 or width % 2:
        raise ConfigError(
            f"the flow needs even image height and width for its squeeze, got {height}x{width}: "
            "set model.flow_couplings=0 or crop the images to an even size"
        )
    return flows.real_nvp(
        *image_shape,
        num_couplings=cfg.flow_couplings,
        hidden=cfg.flow_hidden,
        scales=cfg.flow_scales,
        max_log_scale=cfg.flow_max_log_scale,
        actnorm=cfg.flow_actnorm,
        blocks=cfg.flow_blocks,
    )


def gan_density_model(generator: Generator, cfg: ModelConfig) -> VAE:
    """The slides' "(*)": p(x|z) = N(x; G(z), sigma^2 I) with G frozen, a new encoder and one sigma to fit.

    Its ELBO bounds the likelihood of the GAN's generator made stochastic; it is an approximate bits/dim
    for a model that has no density of its own (DESIGN section 3). The encoder is the one the density
    models of the same config use, so that the bound is not loosened by a smaller encoder.
    """
    floor = model_space_sigma_floor(cfg.sigma_floor, generator.levels)
    likelihood = FlowGaussian(flows.Identity(), floor)
    return VAE(build_encoder(cfg, generator.image_shape), IsotropicDecoder(generator), likelihood,
               generator.latent_dim, generator.image_shape, generator.levels)


def build_model(cfg: ModelConfig, image_shape: tuple[int, int, int], levels: int, gan: bool = False) -> nn.Module:
    """The only place that knows which parts make which variant (`gan` is `Config.is_gan`)."""
    if cfg.latent_dim == 0:  # no latent variable: the flow alone
        from .nvp import NVP  # here, not at the top: cqf.nvp imports ElboTerms from this module

        return NVP(build_flow(cfg, image_shape), image_shape, levels)
    decoder = DECODERS[cfg.arch](image_shape, cfg.latent_dim, cfg.channels)
    if gan:
        return Generator(decoder, cfg.latent_dim, image_shape, levels)
    likelihood = FlowGaussian(build_flow(cfg, image_shape), model_space_sigma_floor(cfg.sigma_floor, levels))
    return VAE(build_encoder(cfg, image_shape), decoder, likelihood, cfg.latent_dim, image_shape, levels)
