"""Image I/O: PNG grids, folders of image files, .npz arrays, and samples as files other tools read.

Images on disk and in `cqf eval` are uint8 (N, C, H, W) in 0..255; grids take floats in [0, 1].
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from .errors import CQFError

__all__ = ["ImagesDataset", "load_image_folder", "load_npz_images", "save_grid", "write_image_folder"]


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
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, path)
    return grid


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


def load_npz_images(path: Path, key: str = "") -> Tensor:
    """uint8 images (NHW or NHWC) from an .npz: `key`, or the first of x, samples, images, arr_0, x_test."""
    import numpy as np

    from .data import as_nchw

    arrays = np.load(path)
    candidates = [key] if key else ["x", "samples", "images", "arr_0", "x_test"]
    found = next((k for k in candidates if k in arrays.files), None)
    if found is None:
        raise CQFError(f"{path} has no array {' / '.join(candidates)}; pick one of {arrays.files} with --npz-key")
    return as_nchw(arrays[found], f"{path}[{found}]")


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
