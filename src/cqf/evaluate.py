"""Evaluation: bits/dim over a data split (ELBO and IWAE-K), sample grids, checkpoint reports.

Protocol (DESIGN sections 1 and 4): the headline is the test-split ELBO in bits/dim, an upper bound on the
true bits/dim; the importance-weighted bound with K samples (IWAE-K) is tighter and labelled with K. The
dequantization noise and the latent noise come from a fixed seed, so numbers are comparable between
checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from torch import Tensor, nn

from .checkpoint import sha256_file
from .config import EVAL_METRICS, DataConfig
from .data import dequantize, load_dataset, to_unit
from .errors import CQFError

__all__ = ["bits_per_dim", "evaluate_checkpoint", "format_table", "gan_bits_per_dim", "sample_grid"]


@torch.no_grad()
def bits_per_dim(
    model: nn.Module,
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


def gan_bits_per_dim(
    generator: nn.Module,
    x_train: Tensor,
    x_test: Tensor,
    steps: int = 2000,
    batch_size: int = 64,
    lr: float = 1e-3,
    num_importance: int = 100,
    channels: int = 32,
    sigma_floor: float = 1.0,
    device: torch.device | str = "cpu",
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Approximate bits/dim of a GAN (the slides' "(*)", DESIGN section 3).

    Freezes the generator G, fits an encoder and one isotropic sigma on the training images by maximizing the
    ELBO of p(x|z) = N(x; G(z), sigma^2 I), and reports the test-split bound (ELBO and IWAE-K).
    """
    from tqdm.auto import tqdm

    from .data import batch_indices
    from .models import gan_density_model

    levels = generator.levels
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = gan_density_model(generator, channels, sigma_floor).to(device)
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


def evaluate_checkpoint(
    path: str | Path,
    split: str = "test",
    num_importance: int = 100,
    device: str = "cpu",
    data_override: str | None = None,
    max_images: int = 0,
    progress: bool = True,
    gan_bpd_steps: int = 0,
) -> dict:
    """Bits/dim of a checkpoint on a data split, with the protocol written into the result.

    For a GAN checkpoint `gan_bpd_steps > 0` is required: it is the number of fitting steps of the
    approximate bound (`gan_bits_per_dim`).
    """
    from .checkpoint import load

    model = load(path, device=device)
    cfg = model.config
    if not getattr(model, "has_density", False) and gan_bpd_steps <= 0:
        raise CQFError(f"{path} is a GAN and has no density; add --gan-bpd for the approximate bits/dim bound")
    data = load_dataset(data_override or cfg.data.name, cfg.data.root, cfg.data.val_size)
    if data.image_shape != model.image_shape or data.levels != model.levels:
        raise CQFError(
            f"data set {data.name} has images {data.image_shape} with {data.levels} levels but the model was "
            f"trained on {model.image_shape} with {model.levels}; evaluate on its own data set"
        )
    return model_bits_per_dim(model, data, path, split, num_importance, device, max_images, progress, gan_bpd_steps)


def model_bits_per_dim(model: nn.Module, data, path: str | Path, split: str = "test", num_importance: int = 100,
                       device: str = "cpu", max_images: int = 0, progress: bool = True,
                       gan_bpd_steps: int = 0) -> dict:
    """`evaluate_checkpoint` for a model and data set already loaded and checked to match (callers check)."""
    cfg = model.config
    x_int, _ = data.split(split)
    if max_images > 0:
        x_int = x_int[:max_images]
    if getattr(model, "has_density", False):
        result = bits_per_dim(model, x_int, data.levels, num_importance, device=device, progress=progress)
        estimators = (
            "bpd_elbo: one-sample ELBO (upper bound on bits/dim); bpd_iwae: importance-weighted "
            f"bound with K={num_importance} latent samples per image"
        )
    else:
        result = gan_bits_per_dim(model, data.x_train, x_int, gan_bpd_steps, num_importance=num_importance,
                                  sigma_floor=cfg.model.sigma_floor, device=device, progress=progress)
        estimators = "APPROXIMATE: " + result.pop("estimator")
    return {
        "variant": cfg.variant,
        "data": data.name,
        "split": split,
        **result,
        "levels": data.levels,
        "estimators": estimators,
        "checkpoint": str(path),
        "checkpoint_sha256": sha256_file(path),
    }


def format_table(result: dict) -> str:
    """The results of `evaluate` as a two-column Markdown table, then what could not be computed and why."""
    protocol, bpd, scored = result["protocol"], result.get("bits_per_dim"), result["metrics"]
    generated, reference = protocol["generated"], protocol["reference"]
    rows = [("source", f"{generated['source']} ({generated.get('variant', generated['kind'])})")]
    if bpd is not None:
        mark = " (approximate, GAN *)" if bpd.get("approximate") else ""
        rows.append((f"bits/dim {bpd['split']}, ELBO{mark}", f"{bpd['bpd_elbo']:.4f}"))
        if "bpd_iwae" in bpd:
            rows.append((f"bits/dim {bpd['split']}, IWAE-{bpd['iw_samples']}{mark}", f"{bpd['bpd_iwae']:.4f}"))
    names = {"fid": "FID", "kid_mean": "KID", "is_mean": "IS", "precision": "precision", "recall": "recall",
             "density": "density", "coverage": "coverage"}
    for key, label in names.items():
        if key in scored:
            value = f"{scored[key]:.4f}"
            if key in ("kid_mean", "is_mean"):
                value += f" ± {scored[key.replace('mean', 'std')]:.4f}"
            rows.append((label, value))
    if "extractor" in protocol:
        rows.append(("generated / reference", f"{generated['num_images']} / {reference['num_images']} "
                     f"({reference['data']} {reference['split']})"))
        rows.append(("features", f"{protocol['extractor']['name']} sha256 {protocol['extractor']['weights_sha256'][:12]}"))
    width = max(len(k) for k, _ in rows)
    lines = [f"| {'metric'.ljust(width)} | value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {k.ljust(width)} | {v} |" for k, v in rows]
    if protocol.get("note"):
        lines.append(f"note: {protocol['note']}")
    lines += [f"unavailable: {m}: {why}" for m, why in result.get("unavailable", {}).items()]
    return "\n".join(lines)


def save_grid(images: Tensor, path: str | Path, nrow: int | None = None, padding: int = 1,
              pad_value: float = 0.0) -> Tensor:
    """Save images in [0, 1] (N, C, H, W) as one PNG grid; small images are enlarged (nearest) to >= 32 px.

    Returns the grid tensor (C, H', W'), e.g. for TensorBoard.
    """
    from torchvision.utils import make_grid, save_image

    scale = max(1, math.ceil(32 / images.shape[-2]))
    if scale > 1:
        images = torch.nn.functional.interpolate(images.float(), scale_factor=scale, mode="nearest")
    grid = make_grid(images, nrow=nrow or int(math.ceil(math.sqrt(len(images)))), padding=padding,
                     pad_value=pad_value)
    save_image(grid, path)
    return grid


@torch.no_grad()
def sample_grid(path: str | Path, num_samples: int, out: str | Path, seed: int = 0, device: str = "cpu") -> Path:
    """Draw `num_samples` from a checkpoint and save them as one PNG grid."""
    from .checkpoint import load

    model = load(path, device=device)
    torch.manual_seed(seed)
    images = to_unit(model.sample(num_samples), model.levels).float().cpu()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_grid(images, out)
    return out


def write_json(result: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(result, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# Sample quality: FID, KID, IS, precision/recall, density/coverage under one written protocol (DESIGN section 4).

ALL_METRICS = EVAL_METRICS
FULL_PROTOCOL_SAMPLES = 50_000


@torch.no_grad()
def sample_images(model: nn.Module, num: int, batch_size: int = 250, seed: int = 0, device: str = "cpu",
                  progress: bool = False) -> Tensor:
    """`num` samples of a model as uint8 images (N, C, H, W) in 0..255, from a fixed seed."""
    from tqdm.auto import tqdm

    from .data import levels_to_uint8, to_levels

    out = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in tqdm(range(0, num, batch_size), desc="sampling", disable=not progress, unit="batch"):
            x = model.sample(min(batch_size, num - start)).float().cpu()
            out.append(levels_to_uint8(to_levels(x, model.levels), model.levels))
    return torch.cat(out)


def load_image_folder(folder: Path, channels: int | None = None) -> Tensor:
    """All PNG/JPEG/BMP files of a folder (sorted by name) as uint8 (N, C, H, W); grey or RGB as `channels`."""
    import numpy as np
    from PIL import Image

    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"))
    if not files:
        raise CQFError(f"no .png/.jpg images in {folder}")
    mode = {1: "L", 3: "RGB", None: None}[channels]
    arrays = []
    for f in files:
        with Image.open(f) as image:
            arrays.append(np.asarray(image.convert(mode or ("L" if image.mode in ("L", "1", "I") else "RGB"))))
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise CQFError(f"images in {folder} have different shapes {sorted(shapes)[:3]}; resize them first")
    x = torch.from_numpy(np.stack(arrays))
    return x[:, None] if x.dim() == 3 else x.permute(0, 3, 1, 2).contiguous()


def load_npz_images(path: Path, key: str | None = None) -> Tensor:
    """uint8 images (NHW or NHWC) from an .npz: `key`, or the first of x, samples, images, arr_0, x_test."""
    import numpy as np

    from .data import _as_nchw

    arrays = np.load(path)
    candidates = [key] if key else ["x", "samples", "images", "arr_0", "x_test"]
    found = next((k for k in candidates if k in arrays.files), None)
    if found is None:
        raise CQFError(f"{path} has no array {' / '.join(candidates)}; pick one of {arrays.files} with --npz-key")
    return _as_nchw(arrays[found], f"{path}[{found}]")


class ImagesDataset(torch.utils.data.Dataset):
    """uint8 images (N, C, H, W) as a Dataset of tensors: the input torch-fidelity's calculate_metrics takes."""

    def __init__(self, images: Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Tensor:
        return self.images[index]


def write_image_folder(images: Tensor, folder: Path) -> Path:
    """uint8 (N, C, H, W) -> folder/000000.png ... (grey or RGB), readable by torch-fidelity and others."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        array = image[0].numpy() if image.shape[0] == 1 else image.permute(1, 2, 0).numpy()
        Image.fromarray(array).save(folder / f"{i:06d}.png")
    return folder


def _fixed_subset(x_int: Tensor, num: int) -> Tensor:
    """A fixed random subset (seed 0): image files sorted by class must not give a one-class subset."""
    if num <= 0 or num >= len(x_int):
        return x_int
    return x_int[torch.randperm(len(x_int), generator=torch.Generator().manual_seed(0))[:num]]


def reference_features(extractor, data, split: str, num: int, cache_dir: Path | None, batch_size: int,
                       device: str, progress: bool) -> tuple[dict, bool]:
    """Features of the reference split, cached per (data set, split, size, extractor weights)."""
    from .data import levels_to_uint8
    from .features import extract

    x_ref = levels_to_uint8(_fixed_subset(data.split(split)[0], num), data.levels)
    key = hashlib.sha256(f"{data.name}|{split}|{len(x_ref)}|{extractor.name}|{extractor.sha256}".encode()).hexdigest()
    path = Path(cache_dir) / f"ref-{key[:24]}.pt" if cache_dir else None
    if path is not None and path.is_file():
        try:
            return torch.load(path, weights_only=True), True
        except Exception:
            path.unlink()  # a broken cache entry is recomputed, never trusted
    features = extract(extractor, x_ref, batch_size, device, progress)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(features, tmp)
        tmp.replace(path)
    return features, False


def feature_metrics(gen: dict, ref: dict, extractor, wanted: tuple[str, ...]) -> dict:
    """The requested feature metrics from extracted features; a metric that cannot run is reported, not faked."""
    from . import metrics

    f_gen, f_ref = gen[extractor.feature_key], ref[extractor.feature_key]
    out, unavailable = {}, {}
    for name, f in (("generated", f_gen), ("reference", f_ref)):
        if not torch.isfinite(f).all():
            raise CQFError(f"non-finite {name} features: the extractor's weights are broken or the images invalid")
    if "fid" in wanted:
        # Fewer images than feature dimensions: the covariance is singular (2,048 for Inception's pool3).
        if min(len(f_gen), len(f_ref)) < f_gen.shape[1]:
            unavailable["fid"] = f"FID needs >= {f_gen.shape[1]} images per set (covariance is singular)"
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


def evaluate(
    source: str | Path,
    data_name: str | None = None,
    metrics_wanted: tuple[str, ...] = ALL_METRICS,
    bpd_split: str = "test",
    reference: str = "train",
    num_samples: int = FULL_PROTOCOL_SAMPLES,
    num_reference: int = 0,
    features: str = "inception",
    inception_weights: str | None = None,
    num_importance: int = 100,
    gan_bpd_steps: int = 0,
    seed: int = 0,
    batch_size: int = 64,
    device: str = "cpu",
    npz_key: str | None = None,
    neighbours: Path | None = None,
    cache_dir: Path | None = None,
    max_images: int = 0,
    progress: bool = True,
) -> dict:
    """The one evaluator: a checkpoint, an image folder or an .npz of images, against a data split.

    Returns a result dict with a complete `protocol` block, `bits_per_dim` (checkpoints with a density, or a
    GAN with `gan_bpd_steps`), `metrics` and `unavailable` (metric -> reason).
    """
    from .checkpoint import load
    from .data import levels_to_uint8
    from .features import FeatureError, extract, make_extractor

    source = Path(source)
    unknown = sorted(set(metrics_wanted) - set(ALL_METRICS))
    if unknown:
        raise CQFError(f"unknown metric {unknown[0]!r}; choose from {', '.join(ALL_METRICS)}")
    is_checkpoint = source.suffix in (".pt", ".safetensors")
    model = load(source, device=device) if is_checkpoint else None
    if model is None and data_name is None:
        raise CQFError("images given without a data set: add --data NAME (the reference images)")
    name = data_name or model.data_name
    # The training split excludes the validation slice the model's run held out (the default one for images).
    data_cfg = model.config.data if model is not None else DataConfig()
    root, val_size = data_cfg.root, data_cfg.val_size
    data = load_dataset(name, root, val_size)
    result = {
        "protocol": {
            "generated": {"source": str(source), "kind": "checkpoint" if is_checkpoint else
                          ("folder" if source.is_dir() else "npz"), "seed": seed},
            "reference": {"data": data.name, "split": reference},
            "design": "cqf DESIGN section 4: FID/KID/precision/recall against the training split by default, "
                      "the test split with --reference test; bits/dim on the test split",
        },
        "bits_per_dim": None, "metrics": {}, "unavailable": {},
    }
    if is_checkpoint:
        if model.image_shape != data.image_shape or model.levels != data.levels:
            raise CQFError(f"{source} models {model.image_shape} images with {model.levels} levels, but {data.name} "
                           f"has {data.image_shape} with {data.levels}; evaluate on its own data set")
        result["protocol"]["generated"] |= {"sha256": sha256_file(source), "variant": model.config.variant}
        if "bpd" in metrics_wanted:
            result["bits_per_dim"] = model_bits_per_dim(model, data, source, bpd_split, num_importance, device,
                                                        max_images, progress, gan_bpd_steps) if (
                model.has_density or gan_bpd_steps > 0) else None
            if result["bits_per_dim"] is None:
                result["unavailable"]["bpd"] = "a GAN has no density: add --gan-bpd for the approximate bound"
    elif "bpd" in metrics_wanted:
        result["unavailable"]["bpd"] = "bits/dim needs a model checkpoint, not a set of images"

    feature_wanted = tuple(m for m in metrics_wanted if m != "bpd")
    if not feature_wanted:
        return result
    try:
        extractor = make_extractor(features, inception_weights, device)
    except FeatureError as err:
        result["unavailable"] |= {m: str(err) for m in feature_wanted}
        result["error"] = str(err)
        return result
    if is_checkpoint:
        x_gen = sample_images(model, num_samples, seed=seed, device=device, progress=progress)
    elif source.is_dir():
        x_gen = load_image_folder(source, data.image_shape[0])
    else:
        x_gen = load_npz_images(source, npz_key)
    if not is_checkpoint:
        x_gen = _fixed_subset(x_gen, num_samples)
    if tuple(x_gen.shape[1:]) != data.image_shape:
        raise CQFError(f"generated images are {tuple(x_gen.shape[1:])} but {data.name} images are {data.image_shape}")
    ref, cached = reference_features(extractor, data, reference, num_reference, cache_dir, batch_size, device,
                                     progress)
    gen = extract(extractor, x_gen, batch_size, device, progress)
    scored = feature_metrics(gen, ref, extractor, feature_wanted)
    result["metrics"] = scored["metrics"]
    result["unavailable"] |= scored["unavailable"]
    num_ref = len(ref[extractor.feature_key])
    result["protocol"]["generated"]["num_images"] = len(x_gen)
    result["protocol"]["reference"] |= {"num_images": num_ref, "features_cached": cached}
    result["protocol"]["extractor"] = extractor.protocol
    result["protocol"]["neighbourhoods"] = {"precision_recall_k": 3, "density_coverage_k": 5,
                                            "kid_subsets": 100, "kid_subset_size": min(1000, len(x_gen), num_ref)}
    if len(x_gen) < FULL_PROTOCOL_SAMPLES:
        result["protocol"]["note"] = (
            f"{len(x_gen)} generated images, fewer than the protocol's {FULL_PROTOCOL_SAMPLES}: a quick check; "
            "FID and KID are biased by the sample count, compare only at equal counts")
    if neighbours is not None:
        x_ref = levels_to_uint8(_fixed_subset(data.split(reference)[0], num_reference), data.levels)
        neighbours_grid(x_gen, gen[extractor.feature_key], x_ref, ref[extractor.feature_key], neighbours)
        result["neighbours_png"] = str(neighbours)
    return result
