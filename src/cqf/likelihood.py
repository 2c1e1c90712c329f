"""Likelihood evaluation: bits/dim over a data split (ELBO and IWAE-K), and the GAN's approximate bound.

Protocol (DESIGN sections 1 and 4): the headline is the test-split ELBO in bits/dim, an upper bound on the
true bits/dim; the importance-weighted bound with K samples (IWAE-K) is tighter and labelled with K. The
dequantization noise and the latent noise come from a fixed seed, so numbers are comparable between
checkpoints.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .checkpoint import LoadedModel
from .config import EvalConfig, ModelConfig
from .data import ImageData, batch_indices, dequantize
from .errors import CQFError
from .files import sha256_file
from .models import DensityModel, Generator, gan_density_model

__all__ = ["bits_per_dim", "checkpoint_bits_per_dim", "gan_bits_per_dim", "histogram_bits_per_dim"]


@torch.no_grad()
def bits_per_dim(
    model: DensityModel,
    x_int: Tensor,
    levels: int,
    num_importance: int = 0,
    batch_size: int = 250,
    device: torch.device | str = "cpu",
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Mean bits/dim of integer images under `model`: ELBO (always) and IWAE-K (when num_importance > 0).

    Args:
        x_int: (N, C, H, W) integer images.
        levels: grey levels of the data.
        num_importance: K of the importance-weighted bound; 0 skips it.
    Returns:
        {"bpd_elbo", "bpd_iwae" (if K > 0), "iw_samples", "num_images", "dequantization_seed"}.
        A non-finite value anywhere raises: it is never averaged away.
    """
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    sums = {"bpd_elbo": 0.0, "bpd_iwae": 0.0}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in tqdm(range(0, len(x_int), batch_size), desc="bits/dim", disable=not progress):
            x = dequantize(x_int[start : start + batch_size], levels, generator).to(device)
            elbo = model.bits_per_dim(model.elbo(x).elbo).double()
            sums["bpd_elbo"] += elbo.sum().item()
            if num_importance > 0:
                sums["bpd_iwae"] += model.bits_per_dim(model.log_prob(x, num_importance)).double().sum().item()
    model.train(was_training)
    result = {"bpd_elbo": sums["bpd_elbo"] / len(x_int)}
    if num_importance > 0:
        result["bpd_iwae"] = sums["bpd_iwae"] / len(x_int)
    for key, value in result.items():
        if not math.isfinite(value):
            raise CQFError(f"{key} is not finite ({value}): the model diverged or the data do not match it")
    return result | {"iw_samples": num_importance, "num_images": len(x_int), "dequantization_seed": seed}


def histogram_bits_per_dim(x_train: Tensor, x_test: Tensor, levels: int) -> float:
    """The baseline every density model must beat: independent per-dimension histograms of the training
    images with add-one smoothing, p_d(k) = (count_d(k) + 1) / (N + levels); exact test bits/dim.

    Args:
        x_train, x_test: (N, C, H, W) integer images in 0..levels-1.
    """
    train, test = x_train.flatten(1).long(), x_test.flatten(1).long()
    counts = torch.zeros(train.shape[1], levels, dtype=torch.float64)
    counts.scatter_add_(1, train.T, torch.ones(train.T.shape, dtype=torch.float64))
    log_p = (counts + 1).log() - math.log(len(train) + levels)  # (D, levels)
    return -log_p.gather(1, test.T).sum().item() / (test.numel() * math.log(2))


def gan_bits_per_dim(
    generator: Generator,
    cfg: ModelConfig,
    x_train: Tensor,
    x_test: Tensor,
    steps: int = 2000,
    batch_size: int = 64,
    lr: float = 1e-3,
    num_importance: int = 100,
    device: torch.device | str = "cpu",
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Approximate bits/dim of a GAN (the slides' "(*)", DESIGN section 3).

    Freezes the generator G, fits an encoder (the density models' encoder for `cfg`) and one isotropic sigma
    on the training images by maximizing the ELBO of p(x|z) = N(x; G(z), sigma^2 I), and reports the
    test-split bound (ELBO and IWAE-K).
    """
    from tqdm.auto import tqdm

    levels = generator.levels
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = gan_density_model(generator, cfg).to(device)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=lr)
        model.train()
        for step in tqdm(range(steps), desc="fit encoder + sigma", disable=not progress):
            x = dequantize(x_train[batch_indices(step, len(x_train), batch_size, seed)], levels).to(device)
            loss = -model.elbo(x).elbo.mean()
            if not torch.isfinite(loss):
                raise CQFError(f"GAN bits/dim: non-finite ELBO at fitting step {step}; lower the learning rate")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    result = bits_per_dim(model, x_test, levels, num_importance, device=device, seed=seed, progress=progress)
    sigma = model.likelihood.log_scale(model.decoder.raw_scale).exp().item()
    return result | {
        "approximate": True,
        "estimator": "GAN (*): ELBO of N(x; G(z), sigma^2 I), G frozen, encoder and one sigma fitted on train",
        "fit_steps": steps,
        "sigma": sigma,
    }


def checkpoint_bits_per_dim(loaded: LoadedModel, data: ImageData, cfg: EvalConfig) -> dict:
    """Bits/dim of a loaded checkpoint on `cfg.bpd_split` of `data` (checked by the caller to fit the model),
    with the estimators and the checkpoint's hash written into the result.

    A GAN needs `cfg.gan_bpd_steps > 0`: the fitting steps of its approximate bound (`gan_bits_per_dim`).
    """
    model: nn.Module = loaded.model
    x_int, _ = data.split(cfg.bpd_split)
    if cfg.max_images > 0:
        x_int = x_int[: cfg.max_images]
    if isinstance(model, DensityModel):
        result = bits_per_dim(model, x_int, data.levels, cfg.iw_samples, device=cfg.device, progress=cfg.progress)
        estimators = (
            "bpd_elbo: one-sample ELBO (upper bound on bits/dim); bpd_iwae: importance-weighted "
            f"bound with K={cfg.iw_samples} latent samples per image"
        )
        if loaded.config.variant == "NVP":  # no latent variable: the likelihood itself
            estimators = "exact: ln N(f(x); 0, I) + ln|det df/dx| (no latent: bpd_elbo = bpd_iwae)"
    elif cfg.gan_bpd_steps > 0:
        result = gan_bits_per_dim(model, loaded.config.model, data.x_train, x_int, cfg.gan_bpd_steps,
                                  num_importance=cfg.iw_samples, device=cfg.device, progress=cfg.progress)
        estimators = "APPROXIMATE: " + result.pop("estimator")
    else:
        raise CQFError(f"{loaded.path} is a GAN and has no density; add --gan-bpd for the approximate bound")
    return {
        "variant": loaded.config.variant,
        "data": data.name,
        "split": cfg.bpd_split,
        **result,
        "levels": data.levels,
        "estimators": estimators,
        "checkpoint": str(loaded.path),
        "checkpoint_sha256": sha256_file(loaded.path),
    }
