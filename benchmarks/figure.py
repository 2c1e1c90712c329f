"""The paper's qualitative figure at our scale: real test images, their reconstructions and the model's samples.

Writes one PNG of three blocks side by side, each `--rows` x `--cols` images: real test images (evenly spaced
over the test split), their reconstructions f^-1(mu(z)) at the posterior mean (`cqf` reconstruction grids),
and samples z ~ p(z), x = f^-1(mu(z) + sigma(z) eps) (`--no-noise`: f^-1(mu(z)) without the decoder noise).

    python benchmarks/figure.py runs/celeba64/model.safetensors --data npz:../shared/data/celeba64_sample.npz \
        --out docs/results/celeba64-figure.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from cqf import checkpoint
from cqf.data import dequantize, load_dataset, to_unit
from cqf.errors import CQFError
from cqf.images import save_grid
from cqf.models import DensityModel
from cqf.quality import check_no_noise


def blocks(loaded: checkpoint.LoadedModel, x_int: torch.Tensor, num: int, noise: bool,
           seed: int) -> list[torch.Tensor]:
    """[real, reconstructions, samples] in [0, 1], `num` images each; the real ones evenly spaced over `x_int`."""
    model, levels = loaded.model, loaded.levels
    if not isinstance(model, DensityModel):
        raise SystemExit(f"error: {loaded.path} is a GAN: it has no encoder to reconstruct with; use `cqf sample`")
    with torch.no_grad():
        x = dequantize(x_int[torch.linspace(0, len(x_int) - 1, num).long()], levels,
                       torch.Generator().manual_seed(seed))
        recon = model.reconstruct(x)
        torch.manual_seed(seed)  # the samples are those of `torch.manual_seed(seed); model.sample(num)`
        samples = model.sample(num, noise=noise)
    return [to_unit(t, levels).float().clamp(0, 1) for t in (x, recon, samples)]


def side_by_side(parts: list[torch.Tensor], rows: int, cols: int, gap: int = 4) -> torch.Tensor:
    """Each part (rows*cols, C, H, W) tiled rows x cols with 1-pixel borders, then the tiles joined with white
    gaps of `gap` pixels: one (C, H', W') image."""
    tiles = []
    for part in parts:
        c, h, w = part.shape[1:]
        grid = torch.ones(c, rows * (h + 1) + 1, cols * (w + 1) + 1)
        for i, image in enumerate(part[: rows * cols]):
            r, k = divmod(i, cols)
            grid[:, 1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + k * (w + 1): 1 + k * (w + 1) + w] = image
        tiles.append(grid)
    white = torch.ones(tiles[0].shape[0], tiles[0].shape[1], gap)
    return torch.cat([t for tile in tiles for t in (tile, white)][:-1], dim=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="model.safetensors or ckpt-*.pt")
    parser.add_argument("--data", default="", help="data.name of the real images [the checkpoint's]")
    parser.add_argument("--rows", type=int, default=6)
    parser.add_argument("--cols", type=int, default=6)
    parser.add_argument("--no-noise", action="store_true", help="samples without the decoder noise")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.rows < 1 or args.cols < 1:
        parser.error("--rows and --cols must be at least 1")
    try:
        loaded = checkpoint.load(args.checkpoint)
        if args.no_noise:
            check_no_noise(loaded.config.variant)
        data = load_dataset(args.data or loaded.data_name, loaded.config.data.root, val_size=0,
                            image_size=loaded.config.data.image_size)
    except CQFError as err:
        parser.error(str(err))
    if (tuple(data.x_test.shape[1:]), data.levels) != (loaded.image_shape, loaded.levels):
        parser.error(f"{args.data or loaded.data_name} has {tuple(data.x_test.shape[1:])} images of {data.levels} "
                     f"levels, the model {loaded.image_shape} of {loaded.levels}: pass the data set it was trained "
                     "on with --data")
    num = args.rows * args.cols
    parts = blocks(loaded, data.x_test, num, noise=not args.no_noise, seed=args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_grid(side_by_side(parts, args.rows, args.cols).unsqueeze(0), args.out, nrow=1, padding=0)
    print(f"{args.out}: real test images | reconstructions | samples{' (no noise)' if args.no_noise else ''}")


if __name__ == "__main__":
    main()
