"""File helpers used by checkpoints, classifiers and caches: atomic writes, hashes, safetensors with metadata."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

from torch import Tensor

from .errors import CQFError

__all__ = ["atomic_write", "read_safetensors", "sha256_file", "write_safetensors"]

_PLAIN = ("format", "version")  # metadata stored as plain strings; the rest is JSON


def _read_umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it: once, at import, not while files are written
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def sha256_file(path: str | Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks (checkpoint and weights hashes in results)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> None:
    """Call `write(tmp)` on a temporary name beside `path`, then rename: a crash never leaves a truncated file.

    The previous file at `path`, if any, survives any failure of `write` (the temporary file is removed). The
    file gets the permissions of a plain `open(path, "w")` (writers such as safetensors' create it 0600).
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:  # on disk before the rename: a power cut cannot leave an empty file
            os.fsync(f.fileno())
        try:
            os.chmod(tmp, 0o666 & ~_UMASK)
        except OSError:  # some network file systems refuse chmod; the file is still whole
            pass
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_safetensors(path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, object]) -> None:
    """Tensors (moved to CPU, contiguous) and metadata, written atomically.

    `format` and `version` are stored as plain strings, every other metadata value as JSON.
    """
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    encoded = {k: v if k in _PLAIN else json.dumps(v) for k, v in metadata.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=encoded))


def read_safetensors(path: str | Path, marker: str, what: str, error: type[CQFError] = CQFError) -> tuple[dict, dict]:
    """(tensors, metadata) of a safetensors file whose metadata `format` is `marker`; JSON values are decoded.

    Raises `error` with a one-line message naming `what` the file should be if it is unreadable or was not
    written with `marker`.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise error(f"{path} is corrupt or not a safetensors file ({err}); expected {what}") from None
    if metadata.get("format") != marker:
        raise error(f"{path} is not {what} (no '{marker}' marker in its metadata)")
    try:
        decoded = {k: v if k in _PLAIN else json.loads(v) for k, v in metadata.items()}
    except json.JSONDecodeError:
        raise error(f"{path} has unreadable metadata; expected {what}") from None
    return tensors, decoded
