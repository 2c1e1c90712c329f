"""Write a cqf data set as the `.npz` the tables' commands read (`data.name=npz:PATH`): uint8 NHWC images
`x_train`, `x_test` and int64 labels `y_train`, `y_test`, the whole training split (cqf holds out its
validation slice itself).

The tables in README.md and docs/results.md were measured on the development machines' copies: `mnist.npz`
(MNIST) and `cifar10.npz`, a CIFAR-10 decoded from JPEG files (quality 75), whose numbers differ from the
official files' (its per-pixel histogram baseline is 7.876 bits/dim). This script writes the official files
that torchvision reads (`data.root`, `$CQF_DATA` or ~/.cache/cqf) in the same format, so that every command
runs; compare FIDs and bits/dim only among runs on one file.

    python benchmarks/to_npz.py cifar10 data/cifar10.npz
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from cqf.data import DATASETS, default_root
from cqf.errors import CQFError


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help="a registered data set without an argument (mnist, cifar10, ...)")
    parser.add_argument("out", type=Path)
    parser.add_argument("--root", default="", help="where its files are [$CQF_DATA or ~/.cache/cqf]")
    args = parser.parse_args()
    if args.name not in DATASETS:
        parser.error(f"unknown data set {args.name!r}; choose {', '.join(n for n in DATASETS if ':' not in n)}")
    try:
        levels, x_train, y_train, x_test, y_test = DATASETS[args.name](
            Path(args.root) if args.root else default_root(), "", 0)
    except CQFError as err:
        parser.error(str(err))
    if levels != 256:
        parser.error(f"{args.name} has {levels} grey levels; an npz data set is read as 8-bit images")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(args.out, x_train=x_train.permute(0, 2, 3, 1).numpy(), y_train=y_train.numpy(),
             x_test=x_test.permute(0, 2, 3, 1).numpy(), y_test=y_test.numpy())
    print(f"{args.out}: {len(x_train)} train and {len(x_test)} test images of {tuple(x_train.shape[1:])}")


if __name__ == "__main__":
    main()
