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

from .data import dequantize, load_dataset, to_unit
from .errors import CQFError

__all__ = ["bits_per_dim", "gan_bits_per_dim", "evaluate_checkpoint", "sample_grid", "format_table"]


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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
        "checkpoint_sha256": _sha256(Path(path)),
    }


def format_table(result: dict) -> str:
    """A Markdown table of the bits/dim results."""
    mark = " (approximate, GAN *)" if result.get("approximate") else ""
    rows = [("variant", result["variant"]), ("data / split", f"{result['data']} / {result['split']}"),
            ("images", str(result["num_images"])), (f"bits/dim, ELBO{mark}", f"{result['bpd_elbo']:.4f}")]
    if "bpd_iwae" in result:
        rows.append((f"bits/dim, IWAE-{result['iw_samples']}{mark}", f"{result['bpd_iwae']:.4f}"))
    width = max(len(k) for k, _ in rows)
    lines = [f"| {'metric'.ljust(width)} | value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {k.ljust(width)} | {v} |" for k, v in rows]
    return "\n".join(lines)


@torch.no_grad()
def sample_grid(path: str | Path, num_samples: int, out: str | Path, seed: int = 0, device: str = "cpu") -> Path:
    """Draw `num_samples` from a checkpoint and save them as one PNG grid."""
    from torchvision.utils import save_image

    from .checkpoint import load

    model = load(path, device=device)
    torch.manual_seed(seed)
    images = to_unit(model.sample(num_samples), model.levels).float().cpu()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image(images, out, nrow=int(math.ceil(math.sqrt(num_samples))), padding=1)
    return out


def write_json(result: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(result, indent=2) + "\n")
