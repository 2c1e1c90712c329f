"""Data sets by name, and the uniform dequantization that maps integer images to model space.

Every data set is held in memory as uint8 images (N, C, H, W) with integer labels, split into train, a
held-out validation slice of train, and test. Model space (DESIGN section 1):

    x = 2 * (k + u) / levels - 1,  k in {0..levels-1}^D,  u ~ U[0, 1)^D,

so `x` lies in (-1, 1) and the Jacobian of `k + u -> x` is (2 / levels)^D, which `losses.bits_per_dim` adds.

Data sets are found by name in a registry (`register_dataset`): `digits`, `mnist`, `cifar10`, the scheme
`npz:PATH`, and those of `cqf.datasets` (`stl10`, `celeba64`, `imagenet64`, `lsun-bedroom64`, `folder:PATH`),
which resize to `data.image_size`; a new data set is one decorated loader.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .errors import DataError

__all__ = [
    "DATASETS",
    "ImageData",
    "as_nchw",
    "batch_indices",
    "beyond_range",
    "content_hash",
    "default_root",
    "dequantize",
    "levels_to_uint8",
    "load_dataset",
    "register_dataset",
    "to_levels",
    "to_unit",
]


@dataclass
class ImageData:
    """Integer images in memory. `x_*` are uint8 (N, C, H, W), `y_*` int64 (N,)."""

    name: str
    levels: int  # number of grey levels per dimension (256 for 8-bit images, 17 for sklearn digits)
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    identity: str = ""  # what the images are, wherever they lie (`content_hash`, for npz: and folder:); "" = the name

    @property
    def key(self) -> str:
        """The data set's identity for resume checks: the same images give the same key, from any path."""
        return self.identity or self.name

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])

    def split(self, name: str) -> tuple[Tensor, Tensor]:
        if name not in ("train", "val", "test"):
            raise DataError(f"unknown split {name!r}; choose train, val or test")
        return getattr(self, f"x_{name}"), getattr(self, f"y_{name}")


def dequantize(x_int: Tensor, levels: int, generator: torch.Generator | None = None) -> Tensor:
    """Uniform dequantization to model space: x = 2 (k + u) / levels - 1 in (-1, 1), default dtype."""
    k = x_int.to(torch.get_default_dtype())
    u = torch.rand(k.shape, generator=generator, dtype=k.dtype, device=k.device)
    return 2 * (k + u) / levels - 1


def to_unit(x: Tensor, levels: int) -> Tensor:
    """Model-space images -> [0, 1] for display: quantize to the nearest level, then scale by levels - 1."""
    return to_levels(x, levels) / (levels - 1)


def beyond_range(x: Tensor, bound: float = 1.0) -> Tensor:
    """Which model-space pixels lie beyond [-bound, bound] (the data range at bound 1, which `to_levels` clips
    to), counting values that are not finite as beyond."""
    return ~(x.abs() <= bound)


def to_levels(x: Tensor, levels: int) -> Tensor:
    """Model-space images -> integer levels k in {0..levels-1} (the inverse of dequantization, u dropped)."""
    return torch.floor((x.clamp(-1, 1) + 1) / 2 * levels).clamp(0, levels - 1).long()


def levels_to_uint8(k: Tensor, levels: int) -> Tensor:
    """Integer images with `levels` grey levels -> uint8 0..255 (k * 255 / (levels - 1), rounded)."""
    if levels == 256:
        return k.to(torch.uint8)
    return torch.round(k.double() * 255 / (levels - 1)).to(torch.uint8)


def batch_indices(step: int, num_items: int, batch_size: int, seed: int) -> Tensor:
    """Indices of training batch `step`: epochs of a permutation seeded by (seed, epoch), drop-last.

    A function of the step alone, so a resumed run sees exactly the batches it would have seen.
    """
    batch_size = min(batch_size, num_items)
    per_epoch = num_items // batch_size
    epoch, position = divmod(step, per_epoch)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    permutation = torch.randperm(num_items, generator=generator)
    return permutation[position * batch_size : (position + 1) * batch_size]


def default_root() -> Path:
    return Path(os.environ.get("CQF_DATA") or Path.home() / ".cache" / "cqf")


def as_nchw(x: np.ndarray, where: str) -> Tensor:
    """uint8 NHW or NHWC array -> uint8 tensor (N, C, H, W); a one-line DataError names anything else."""
    if x.dtype != np.uint8:
        raise DataError(f"{where}: images must be uint8 (0..255), got {x.dtype}")
    if x.ndim == 3:  # NHW grey
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3):  # NHWC
        x = x.transpose(0, 3, 1, 2)
    else:
        raise DataError(f"{where}: images must be NHW or NHWC with 1 or 3 channels, got shape {x.shape}")
    return torch.from_numpy(np.ascontiguousarray(x))


def _split_val(name, levels, x_train, y_train, x_test, y_test, val_size: int) -> ImageData:
    if not 0 <= val_size < len(x_train):
        raise DataError(f"data.val_size={val_size} must be in [0, {len(x_train)}) for {name}")
    # A fixed permutation (seed 0), independent of the run's seed: every run holds out the same images.
    order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(0))
    val, train = order[:val_size], order[val_size:]
    return ImageData(name, levels, x_train[train], y_train[train], x_train[val], y_train[val], x_test, y_test)


# name -> loader(root, argument, image_size) returning (levels, x_train, y_train, x_test, y_test). A name ending
# in ":" is a scheme whose argument follows it (npz:PATH); the others take no argument. image_size 0 asks for the
# data set's own size; a loader that cannot resize ignores it and load_dataset refuses a size it did not deliver.
Loader = Callable[[Path, str, int], tuple]
DATASETS: dict[str, Loader] = {}


def register_dataset(name: str) -> Callable[[Loader], Loader]:
    """Decorator: make `load_dataset(name)` call `loader(root, argument, image_size)`; `name:` registers a scheme."""

    def register(loader: Loader) -> Loader:
        if name in DATASETS:
            raise ValueError(f"data set {name!r} is registered twice")
        DATASETS[name] = loader
        return loader

    return register


@register_dataset("digits")
def _digits(root: Path, argument: str, image_size: int) -> tuple:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.uint8))[:, None]  # (1797, 1, 8, 8), values 0..16
    y = torch.from_numpy(digits.target.astype(np.int64))
    # sklearn ships no split: hold out a fixed 20% as test.
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    num_test = len(x) // 5
    test, train = order[:num_test], order[num_test:]
    return 17, x[train], y[train], x[test], y[test]


def _torchvision(name: str, root: Path) -> tuple:
    from torchvision import datasets

    cls = {"mnist": datasets.MNIST, "cifar10": datasets.CIFAR10}[name]
    splits = []
    for train in (True, False):
        try:
            try:
                dataset = cls(str(root), train=train, download=False)
            except RuntimeError:
                dataset = cls(str(root), train=train, download=True)
        except Exception as err:  # offline, partial download, ...
            raise DataError(
                f"{name} not found under {root} and could not be downloaded ({type(err).__name__}); "
                f"put torchvision's {cls.__name__} files there, or set data.root / $CQF_DATA, "
                f"or use data.name=npz:PATH"
            ) from None
        images = dataset.data if isinstance(dataset.data, np.ndarray) else dataset.data.numpy()
        splits += [as_nchw(images, name), torch.as_tensor(np.asarray(dataset.targets), dtype=torch.int64)]
    return (256, *splits)


@register_dataset("mnist")
def _mnist(root: Path, argument: str, image_size: int) -> tuple:
    return _torchvision("mnist", root)


@register_dataset("cifar10")
def _cifar10(root: Path, argument: str, image_size: int) -> tuple:
    return _torchvision("cifar10", root)


@register_dataset("npz:")
def _npz(root: Path, argument: str, image_size: int) -> tuple:
    path = Path(argument).expanduser()
    if not path.is_file():
        raise DataError(f"npz data set {path} not found; give data.name=npz:PATH to an existing .npz file")
    try:
        arrays = np.load(path)
        missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in arrays.files]
    except Exception as err:
        raise DataError(f"cannot read {path} as .npz ({type(err).__name__}: {err})") from None
    if missing:
        raise DataError(f"{path} lacks arrays {', '.join(missing)}; it needs x_train, y_train, x_test, y_test")
    x_train, x_test = as_nchw(arrays["x_train"], str(path)), as_nchw(arrays["x_test"], str(path))
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(f"{path}: train images {tuple(x_train.shape[1:])} and test {tuple(x_test.shape[1:])} differ")
    y_train = torch.from_numpy(arrays["y_train"].astype(np.int64))
    y_test = torch.from_numpy(arrays["y_test"].astype(np.int64))
    if len(y_train) != len(x_train) or len(y_test) != len(x_test):
        raise DataError(f"{path}: the numbers of images and labels differ")
    return 256, x_train, y_train, x_test, y_test


def load_dataset(name: str, root: str | Path = "", val_size: int = 200, image_size: int = 0) -> ImageData:
    """Load a data set by name: `digits`, `mnist`, `cifar10`, `npz:PATH`, or one of `cqf.datasets`.

    Args:
        name: data set name. `digits` is scikit-learn's 1,797 8x8 digits (17 levels), always available.
        root: folder of the data sets' files; "" means $CQF_DATA or ~/.cache/cqf.
        val_size: images held out of the training split for validation (a fixed slice).
        image_size: square size the images are resized to; 0 = the data set's own. Only the data sets of
            `cqf.datasets` resize (folder:PATH needs it); the others accept 0 or their own size.
    """
    scheme, sep, argument = name.partition(":")
    loader = DATASETS.get(scheme + sep if sep else name)
    if loader is None:
        choices = ", ".join(n + "PATH" if n.endswith(":") else n for n in DATASETS)
        raise DataError(f"unknown data set {name!r}; choose {choices}")
    parts = loader(Path(root) if root else default_root(), argument, image_size)
    height, width = parts[1].shape[-2:]
    if image_size and (height, width) != (image_size, image_size):
        raise DataError(f"data.image_size={image_size}, but {name} has {height}x{width} images and is not resized; "
                        f"set data.image_size=0")
    data = _split_val(name, *parts, val_size=val_size)
    if sep:  # npz:PATH, folder:PATH: the path may change (moved, another working directory); the images not
        data.identity = f"{scheme}:sha256={content_hash(*parts)}"
    return data


def content_hash(levels: int, *tensors: Tensor) -> str:
    """SHA-256 of a data set's levels and arrays (shapes, dtypes and bytes): the same images and labels give the
    same hash whatever file or folder they were read from."""
    digest = hashlib.sha256(str(levels).encode())
    for t in tensors:
        array = t.contiguous().numpy()
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


# Last: cqf.datasets registers its loaders with register_dataset, defined above (no import cycle). Not bound to
# `datasets`, the name _torchvision gives torchvision's module.
from . import datasets as _datasets  # noqa: E402, F401
