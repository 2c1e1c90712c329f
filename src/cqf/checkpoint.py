"""Checkpoints: state dicts plus the resolved config, written atomically, loaded with `weights_only=True`.

A training checkpoint `ckpt-{step:07d}.pt` holds everything needed to resume exactly. `model.safetensors`
holds the weights used for sampling and evaluation (the EMA weights when EMA is on), with the config in its
metadata; `cqf.load` reads either.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .config import Config, from_dict, to_dict
from .errors import CheckpointError, ConfigError

__all__ = ["FORMAT", "latest", "load", "load_payload", "save", "save_safetensors"]

FORMAT = "cqf-checkpoint-v1"


def _state_of(value):
    return value.state_dict() if hasattr(value, "state_dict") else value


def sha256_file(path: str | Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks (checkpoint and weights hashes in results)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file and rename: a crash never leaves a truncated checkpoint behind."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save(path: Path, **state) -> None:
    """Save state dicts (modules, optimizers) and plain entries (step, config, ...) atomically."""
    payload = {key: _state_of(value) for key, value in state.items()}
    payload |= {"format": FORMAT, "version": __version__}
    _atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_payload(path: Path) -> dict:
    """The checkpoint's contents; a one-line CheckpointError if missing, corrupt or not a cqf checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found; pass a ckpt-*.pt or model.safetensors from a run")
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # zip, pickle, EOF and weights_only errors all mean: not readable as ours
        raise CheckpointError(
            f"checkpoint {path} is corrupt, truncated or not a PyTorch file ({type(err).__name__}); "
            "use an earlier ckpt-*.pt from its run"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a cqf checkpoint (no '{FORMAT}' marker); was it written by cqf?")
    return payload


def latest(run_dir: Path) -> Path | None:
    """The newest training checkpoint in run_dir (zero-padded names sort by step), or None."""
    found = sorted(Path(run_dir).glob("ckpt-*.pt"))
    return found[-1] if found else None


def prune(run_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` training checkpoints."""
    for old in sorted(Path(run_dir).glob("ckpt-*.pt"))[:-keep] if keep > 0 else []:
        old.unlink()


def save_safetensors(path: Path, model: nn.Module, config: Config, **meta) -> None:
    """Model weights as safetensors, config and shapes in the metadata; atomic."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    metadata = {"format": FORMAT, "version": __version__, "config": json.dumps(to_dict(config))}
    metadata |= {k: json.dumps(v) for k, v in meta.items()}
    _atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def _load_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path} is corrupt or not a safetensors file ({err})") from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a cqf model file (no '{FORMAT}' marker in its metadata)")
    payload = {k: json.loads(v) for k, v in metadata.items() if k not in ("format", "version")}
    return payload | {"format": FORMAT, "version": metadata.get("version"), "model": tensors}


def load(path: str | Path, device: str | torch.device = "cpu", weights: str = "auto") -> nn.Module:
    """Rebuild the model a checkpoint describes and load its weights; returned in eval mode.

    Args:
        path: a `ckpt-*.pt` training checkpoint or a `model.safetensors` file.
        weights: "auto" (EMA weights when the run kept an EMA), "ema" or "model".
    """
    from .models import build_model

    payload = load_payload(Path(path))
    try:
        cfg = from_dict(Config, payload["config"])
        image_shape, levels = tuple(payload["image_shape"]), int(payload["levels"])
    except (KeyError, TypeError, ConfigError) as err:
        raise CheckpointError(f"{path}: its config or data description is unreadable ({err})") from None
    model = build_model(cfg.model, image_shape, levels, gan=cfg.train.coverage_weight == 0)
    key = {"auto": "ema" if payload.get("ema") is not None else "model", "ema": "ema", "model": "model"}[weights]
    if payload.get(key) is None:
        raise CheckpointError(f"{path} holds no '{key}' weights")
    try:
        model.load_state_dict(payload[key])
    except RuntimeError as err:
        first = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
        raise CheckpointError(f"{path}: weights do not fit the model its config describes ({first})") from None
    model.config, model.data_name = cfg, payload.get("data_name", cfg.data.name)
    return model.to(device).eval()
