"""Test bits/dim of the per-pixel histogram baseline (`cqf.likelihood.histogram_bits_per_dim`), fitted on the
whole training split (validation slice included). Every density model must beat it.

    python benchmarks/histogram_baseline.py digits npz:../shared/data/mnist.npz npz:../shared/data/cifar10.npz

Exact (no dequantization bound): bits/dim = -mean log2 p(k) over the test images' dimensions.
"""

from __future__ import annotations

import argparse

from cqf.data import load_dataset
from cqf.likelihood import histogram_bits_per_dim


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", nargs="+", help="data set names (digits, mnist, cifar10, npz:PATH)")
    args = parser.parse_args()
    print("| data | train images | test images | levels | histogram bits/dim (test) |")
    print("|---|---|---|---|---|")
    for name in args.data:
        data = load_dataset(name, val_size=0)
        bpd = histogram_bits_per_dim(data.x_train, data.x_test, data.levels)
        print(f"| {name} | {len(data.x_train)} | {len(data.x_test)} | {data.levels} | {bpd:.4f} |")


if __name__ == "__main__":
    main()
