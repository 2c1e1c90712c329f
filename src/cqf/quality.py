"""Sample quality: FID, KID, IS, precision/recall and density/coverage under one written protocol (DESIGN 4).

Samples and reference images enter as uint8 (N, C, H, W); features come from one extractor
(`cqf.features`); the metrics are torch-fidelity's own functions on those features (`cqf.metrics`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .config import EVAL_METRICS
from .data import ImageData, beyond_range, levels_to_uint8, to_levels
from .errors import CQFError
from .images import save_grid
from .models import ImageModel

if TYPE_CHECKING:  # torch-fidelity is imported only where features are extracted
    from .features import Extractor

__all__ = [
    "FEATURE_METRICS",
    "default_metrics",
    "feature_metrics",
    "fixed_subset",
    "inception_fits",
    "neighbours_grid",
    "check_no_noise",
    "reference_features",
    "decoder_noise_share",
    "sample_images",
    "save_samples",
]

FEATURE_METRICS = tuple(m for m in EVAL_METRICS if m != "bpd")


def inception_fits(image_shape: tuple[int, int, int]) -> bool:
    """Whether ImageNet-Inception features describe these images: colour and at least 32x32 pixels.

    On small grey images (digits 8x8, MNIST 28x28) they mean little; use domain features there.
    """
    channels, height, width = image_shape
    return channels == 3 and min(height, width) >= 32


def default_metrics(image_shape: tuple[int, int, int], features: str, has_model: bool, has_density: bool,
                    data_name: str) -> tuple[tuple[str, ...], str]:
    """(metrics, note): what `cqf eval` computes when no metrics are named, and why when it skips some.

    Bits/dim for a checkpoint with a density (or a GAN given --gan-bpd); the feature metrics too, unless they
    would be Inception features of images that Inception does not describe (then the note says how to get
    domain features instead). Image sets get the feature metrics: scoring them was asked for.
    """
    bpd = ("bpd",) if has_density else ()
    if features == "inception" and not inception_fits(image_shape) and has_model:
        c, h, w = image_shape
        how = (f"train domain features with `cqf classifier train {data_name} --out C.safetensors` and add "
               "--features classifier:C.safetensors (or name the metrics with --metrics)")
        if not bpd:
            return (), f"nothing to compute by default: a GAN has no density (add --gan-bpd), and {how}"
        return bpd, f"sample metrics skipped: Inception features mean little on {c}x{h}x{w} images; {how}"
    return bpd + FEATURE_METRICS, ""


@torch.no_grad()
def sample_images(model: ImageModel, num: int, batch_size: int = 250, seed: int = 0, progress: bool = False,
                  noise: bool = True, stats: dict | None = None) -> Tensor:
    """`num` samples of a model (on the model's device) as uint8 images (N, C, H, W) in 0..255, from a fixed seed;
    `noise=False`: without the decoder noise, x = f^-1(mu(z)) (the same z). Given `stats`, its "out_of_range" and
    "far_out_of_range" are set to the shares of the samples' pixels (model space) with |x| > 1, beyond the data
    range, which the images hold clipped, and with |x| > 2, half the range beyond it (not finite counts as both)."""
    from tqdm.auto import tqdm

    out, beyond, far = [], 0, 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in tqdm(range(0, num, batch_size), desc="sampling", disable=not progress, unit="batch"):
            x = model.sample(min(batch_size, num - start), noise=noise).float().cpu()
            beyond += int(beyond_range(x).sum())
            far += int(beyond_range(x, 2.0).sum())
            out.append(levels_to_uint8(to_levels(x, model.levels), model.levels))
    images = torch.cat(out)
    if stats is not None:
        stats |= {"out_of_range": beyond / max(images.numel(), 1), "far_out_of_range": far / max(images.numel(), 1)}
    return images


@torch.no_grad()
def decoder_noise_share(model, num: int = 1000, batch_size: int = 250, seed: int = 0) -> dict:
    """What the decoder noise contributes to a VAE-family model's samples (model space, per pixel, averaged).

    With the same z, x = f^-1(mu(z) + sigma(z) eps) and x_mean = f^-1(mu(z)):
        total = mean over pixels of Var_z,eps[x]        (the samples' pixel variance)
        noise = E ||x - x_mean||^2 / D                  (what the noise adds around the mean image)
        means = mean over pixels of Var_z[x_mean]       (the variance of the noiseless images)
    and `noise_share = noise / total`. Without a flow, noise = E[sigma^2] and total = means + noise. `sigma_levels`
    is the decoder's mean sigma in feature space, in grey levels (one level is 2 / levels wide).
    """
    sums = {"x": 0.0, "x2": 0.0, "m": 0.0, "m2": 0.0, "noise": 0.0, "sigma": 0.0}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, num, batch_size):
            rows = min(batch_size, num - start)
            z = torch.randn(rows, model.latent_dim, device=next(model.parameters()).device)
            mean, raw_scale = model.decoder(z)
            x = model.likelihood.sample(mean, raw_scale).double()
            x_mean = model.likelihood.sample(mean, raw_scale, noise=False).double()
            sums["x"] += x.sum(0)
            sums["x2"] += x.square().sum(0)
            sums["m"] += x_mean.sum(0)
            sums["m2"] += x_mean.square().sum(0)
            sums["noise"] += (x - x_mean).square().mean((1, 2, 3)).sum().item()
            sums["sigma"] += model.likelihood.log_scale(raw_scale).exp().double().mean((1, 2, 3)).sum().item()
    total = (sums["x2"] / num - (sums["x"] / num).square()).mean().item()
    means = (sums["m2"] / num - (sums["m"] / num).square()).mean().item()
    noise = sums["noise"] / num
    return {"total": total, "noise": noise, "means": means, "noise_share": noise / total,
            "sigma_levels": sums["sigma"] / num * model.levels / 2, "num_samples": num, "seed": seed}


def check_no_noise(variant: str | None) -> None:
    """`--no-noise` asks for f^-1(mu(z)) without a VAE's decoder noise; refused where there is none to remove:
    images given as files (`variant` None), a GAN (deterministic generator), the NVP baseline (f^-1(eps))."""
    if variant is None:
        raise CQFError("--no-noise changes how a checkpoint is sampled; images given as files are what they are: "
                       "drop --no-noise")
    if variant in ("GAN", "NVP"):
        what = "its generator is deterministic" if variant == "GAN" else "its samples are f^-1(eps), eps ~ N(0, I)"
        raise CQFError(f"--no-noise removes a VAE's decoder noise; a {variant} model has none ({what}): "
                       "drop --no-noise")


def save_samples(model: ImageModel, num: int, out: str | Path, seed: int = 0, noise: bool = True) -> Path:
    """`num` samples (`sample_images`, with or without the decoder noise) as one PNG grid when `out` ends in .png,
    else as N PNG files in `out`."""
    from .images import write_image_folder

    out = Path(out)
    grid = out.suffix.lower() == ".png"
    images = sample_images(model, num, seed=seed, progress=not grid, noise=noise)
    if grid:
        save_grid(images.float() / 255, out)  # uint8 0..255 -> [0, 1]; the same images a folder would hold
        return out
    return write_image_folder(images, out)


def fixed_subset(x_int: Tensor, num: int) -> Tensor:
    """A fixed random subset (seed 0): image files sorted by class must not give a one-class subset."""
    if num <= 0 or num >= len(x_int):
        return x_int
    return x_int[torch.randperm(len(x_int), generator=torch.Generator().manual_seed(0))[:num]]


def reference_images(data: ImageData, split: str, num: int) -> Tensor:
    """The reference set of the feature metrics: a fixed subset of a split, as uint8 0..255."""
    return levels_to_uint8(fixed_subset(data.split(split)[0], num), data.levels)


def reference_features(extractor: Extractor, data: ImageData, split: str, num: int, cache_dir: Path | None,
                       batch_size: int, device: str, progress: bool) -> tuple[dict, bool]:
    """Features of the reference split, cached per (data set, split, image count and shape, extractor weights).

    The shape is in the key because one name can give images of several sizes (data.image_size).
    """
    from .features import extract
    from .files import atomic_write

    x_ref = reference_images(data, split, num)
    key = f"{data.name}|{split}|{tuple(x_ref.shape)}|{extractor.name}|{extractor.sha256}"
    key = hashlib.sha256(key.encode()).hexdigest()
    path = Path(cache_dir) / f"ref-{key[:24]}.pt" if cache_dir else None
    if path is not None and path.is_file():
        try:
            return torch.load(path, weights_only=True), True
        except Exception:
            path.unlink()  # a broken cache entry is recomputed, never trusted
    features = extract(extractor, x_ref, batch_size, device, progress)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: torch.save(features, tmp))
    return features, False


def feature_metrics(gen: dict, ref: dict, extractor: Extractor, wanted: tuple[str, ...]) -> dict:
    """The requested feature metrics from extracted features; a metric that cannot run is reported, not faked."""
    from . import metrics

    f_gen, f_ref = gen[extractor.feature_key], ref[extractor.feature_key]
    out, unavailable = {}, {}
    for name, f in (("generated", f_gen), ("reference", f_ref)):
        if not torch.isfinite(f).all():
            raise CQFError(f"non-finite {name} features: the extractor's weights are broken or the images invalid")
    if "fid" in wanted:
        # With N <= F images the F x F covariance has rank < F: singular (2,048 dimensions for Inception's pool3).
        dims = f_gen.shape[1]
        if min(len(f_gen), len(f_ref)) <= dims:
            unavailable["fid"] = (f"FID needs more images than feature dimensions (> {dims} per set, got "
                                  f"{len(f_gen)} generated and {len(f_ref)} reference): the covariance is singular")
        else:
            out["fid"] = metrics.fid(f_gen, f_ref)
    if "kid" in wanted:
        out["kid_mean"], out["kid_std"] = metrics.kid(f_gen, f_ref)
    if "pr" in wanted:
        out["precision"], out["recall"] = metrics.precision_recall(f_gen, f_ref)
    if "dc" in wanted:
        out["density"], out["coverage"] = metrics.density_coverage(f_gen, f_ref)
    if "is" in wanted:
        if extractor.logits_key is None:
            unavailable["is"] = "the Inception weights file has no classifier layer (pool3 only): no Inception Score"
        else:
            out["is_mean"], out["is_std"] = metrics.inception_score(gen[extractor.logits_key])
    return {"metrics": out, "unavailable": unavailable}


def neighbours_grid(x_gen: Tensor, f_gen: Tensor, x_ref: Tensor, f_ref: Tensor, out: Path, rows: int = 16,
                    k: int = 6) -> Path:
    """PNG: each row a generated image followed by its k nearest reference images in feature space."""
    rows = min(rows, len(x_gen))
    nearest = torch.cdist(f_gen[:rows].double(), f_ref.double()).topk(k, largest=False).indices  # (rows, k)
    tiles = []
    for i in range(rows):
        tiles += [x_gen[i]] + [x_ref[j] for j in nearest[i]]
    save_grid(torch.stack(tiles).float() / 255, out, nrow=k + 1, padding=2, pad_value=1.0)
    return out
