"""Checkpoints: state dicts plus the resolved config, written atomically, loaded with `weights_only=True`.

A training checkpoint `ckpt-{step:07d}.pt` holds everything needed to resume exactly. `model.safetensors`
holds the weights used for sampling and evaluation (the EMA weights when EMA is on), with the config in its
metadata; `load` reads either and returns a `LoadedModel`.
"""

from __future__ import annotations

import errno
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ._version import __version__
from .config import Config, from_dict, to_dict
from .errors import CheckpointError, ConfigError
from .files import atomic_write, read_safetensors, write_safetensors

__all__ = ["BEST", "FORMAT", "LoadedModel", "best_bpd", "checkpoints", "first_difference", "latest", "load",
           "load_payload", "prune", "save",
           "save_safetensors"]

FORMAT = "cqf-checkpoint-v1"


def _state_of(value):
    return value.state_dict() if hasattr(value, "state_dict") else value


def save(path: Path, **state) -> None:
    """Save state dicts (modules, optimizers) and plain entries (step, config, ...) atomically.

    A failed write (full disk, quota, file-size limit) is a one-line CheckpointError; the file at `path` and
    every other checkpoint are left as they were.
    """
    path = Path(path)
    payload = {key: _state_of(value) for key, value in state.items()}
    payload |= {"format": FORMAT, "version": __version__}
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # opened here, so that a refused or failed write is an OSError with its errno
            torch.save(payload, f)

    try:
        atomic_write(path, write)
    except (OSError, RuntimeError) as err:  # torch.save reports a failed write as RuntimeError
        previous = latest(path.parent)
        kept = f"the last good checkpoint {previous.name} is intact" if previous else "no earlier checkpoint exists"
        raise CheckpointError(f"could not write {path} ({_reason(err, path)}); {kept}: {_fix(err)} and rerun the "
                              "same command to resume") from None


def _fix(err: Exception) -> str:
    """What the user can do about a failed write, by its cause."""
    code = getattr(err, "errno", None)
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "make the run directory writable"
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) or not isinstance(err, OSError):
        return "free disk space (or raise the quota)"  # torch.save reports a full disk as a RuntimeError
    return "fix the cause above"


def _reason(err: Exception, path: Path) -> str:
    """The OS's words for a failed write (torch.save's own error text names its C++ source line instead)."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        return "write failed"
    return f"write failed with {free / 2**20:.1f} MiB free on its file system"


def load_payload(path: Path) -> dict:
    """The checkpoint's contents; a one-line CheckpointError if missing, corrupt or not a cqf checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found; pass a ckpt-*.pt or model.safetensors from a run")
    if path.suffix == ".safetensors":
        tensors, metadata = read_safetensors(path, FORMAT, "a cqf model file", CheckpointError)
        weights = metadata.get("weights", "model")  # "ema" when the run kept an EMA (older files: "model")
        if weights not in ("ema", "model"):
            raise CheckpointError(f"{path} says it holds {weights!r} weights; a cqf model file holds 'ema' or 'model'")
        return metadata | {weights: tensors}
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


_STEP_NAME = re.compile(r"ckpt-(\d+)\.pt")


def checkpoints(run_dir: Path) -> list[Path]:
    """The training checkpoints `ckpt-{step}.pt` in run_dir, oldest first, ordered by their step number (the
    names are zero-padded to 7 digits only: past step 9,999,999 they no longer sort by name)."""
    found = [(int(m.group(1)), p) for p in Path(run_dir).glob("ckpt-*.pt") if (m := _STEP_NAME.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def latest(run_dir: Path) -> Path | None:
    """The newest training checkpoint in run_dir (the highest step), or None."""
    found = checkpoints(run_dir)
    return found[-1] if found else None


def first_difference(a, b, where: str = "") -> str | None:
    """Where two checkpoint payloads (nested dicts, lists and tensors) first differ, bit for bit, or None when
    they are identical: the check behind "a resumed run equals an uninterrupted one"."""
    if isinstance(a, torch.Tensor):
        return None if isinstance(b, torch.Tensor) and torch.equal(a, b) else where
    if isinstance(a, dict):
        if not isinstance(b, dict) or set(a) != set(b):
            return f"{where}: keys differ"
        return next((d for k in a if (d := first_difference(a[k], b[k], f"{where}/{k}"))), None)
    if isinstance(a, (list, tuple)):
        if not isinstance(b, (list, tuple)) or len(a) != len(b):
            return f"{where}: lengths differ"
        return next((d for i, (x, y) in enumerate(zip(a, b, strict=True))
                     if (d := first_difference(x, y, f"{where}[{i}]"))), None)
    return None if a == b else where


BEST = "best.pt"  # the checkpoint with the lowest validation bits/dim so far (never pruned)


def best_bpd(run_dir: Path) -> float:
    """Validation bits/dim of `best.pt` in run_dir, or inf when there is none (or it is unreadable)."""
    path = Path(run_dir) / BEST
    if not path.is_file():
        return float("inf")
    try:
        return float(load_payload(path).get("val_bpd_elbo", float("inf")))
    except CheckpointError:
        return float("inf")


def prune(run_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` training checkpoints."""
    for old in checkpoints(run_dir)[:-keep] if keep > 0 else []:
        old.unlink()


def save_safetensors(path: Path, model: nn.Module, config: Config, weights: str = "model", **meta) -> None:
    """Model weights as safetensors, config, shapes and which weights they are ("ema" or "model") in the
    metadata; atomic."""
    metadata = {"format": FORMAT, "version": __version__, "config": to_dict(config), "weights": weights} | meta
    write_safetensors(path, model.state_dict(), metadata)


@dataclass(frozen=True)
class LoadedModel:
    """A model rebuilt from a checkpoint, with what the checkpoint says about it."""

    model: nn.Module = field(repr=False)  # in eval mode; a `cqf.models.DensityModel` unless config.is_gan
    config: Config
    data_name: str  # the data set it was trained on
    image_shape: tuple[int, int, int]
    levels: int
    weights: str  # "ema" or "model": which weights were loaded
    path: Path


def load(path: str | Path, device: str | torch.device = "cpu", weights: str = "auto") -> LoadedModel:
    """Rebuild the model a checkpoint describes and load its weights.

    Args:
        path: a `ckpt-*.pt` training checkpoint or a `model.safetensors` file.
        weights: "auto" (EMA weights when the run kept an EMA), "ema" or "model".
    """
    from .models import build_model

    path = Path(path)
    payload = load_payload(path)
    try:
        cfg = from_dict(Config, payload["config"])
        image_shape, levels = tuple(payload["image_shape"]), int(payload["levels"])
    except (KeyError, TypeError, ConfigError) as err:
        raise CheckpointError(f"{path}: its config or data description is unreadable ({err})") from None
    model = build_model(cfg.model, image_shape, levels, gan=cfg.is_gan)
    key = {"auto": "ema" if payload.get("ema") is not None else "model", "ema": "ema", "model": "model"}[weights]
    if payload.get(key) is None:
        raise CheckpointError(f"{path} holds no '{key}' weights")
    try:
        model.load_state_dict(payload[key])
    except RuntimeError as err:
        first = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
        raise CheckpointError(f"{path}: weights do not fit the model its config describes ({first})") from None
    return LoadedModel(model.to(device).eval(), cfg, payload.get("data_name", cfg.data.name), image_shape, levels,
                       key, path)
