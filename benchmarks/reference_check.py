"""`cqf eval` against torch-fidelity and prdc run directly, on the same images: numbers and wall time.

The generated set is CIFAR-10 test images, the reference CIFAR-10 train images (fixed random subsets of equal
size, the ones `cqf eval` picks). cqf runs through its command line; the direct side calls
`torch_fidelity.calculate_metrics` (its own loading, resizing and feature extraction) and `prdc.compute_prdc`
on the Inception features torch-fidelity cached.

    python benchmarks/reference_check.py --data ../shared/data/cifar10.npz --num 5000 \\
        --inception-weights pt_inception-2015-12-05-pool3.pth --out runs/reference-check
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="npz with x_train and x_test")
    parser.add_argument("--num", type=int, default=5000)
    parser.add_argument("--inception-weights", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--skip-cqf", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}

    if not args.skip_cqf:
        start = time.time()
        subprocess.run([sys.executable, "-m", "cqf", "eval", str(args.data), "--npz-key", "x_test", "--data",
                        f"npz:{args.data}", "--num-samples", str(args.num), "--num-reference", str(args.num),
                        "--metrics", "fid,kid,pr,dc", "--inception-weights", args.inception_weights,
                        "--cache-dir", str(args.out / "cqf-cache"), "--json", str(args.out / "cqf.json")], check=True)
        m = json.loads((args.out / "cqf.json").read_text())["metrics"]
        results["cqf eval"] = m | {"seconds": time.time() - start}

    import prdc
    import torch_fidelity

    from cqf.config import DataConfig
    from cqf.data import load_dataset
    from cqf.images import ImagesDataset, load_npz_images
    from cqf.quality import fixed_subset

    data = load_dataset(f"npz:{args.data}", val_size=DataConfig().val_size)  # the training split cqf uses
    generated = fixed_subset(load_npz_images(args.data, "x_test"), args.num)
    reference = fixed_subset(data.x_train, args.num)
    start = time.time()
    cache = args.out / "tf-cache"
    # The extractor is named because torch-fidelity's default puts precision/recall on VGG-16 features (a second
    # download); cqf computes every metric on the same Inception pool3 features, and so does this side.
    tf = torch_fidelity.calculate_metrics(
        input1=ImagesDataset(generated), input2=ImagesDataset(reference), feature_extractor="inception-v3-compat",
        cuda=torch.cuda.is_available(), fid=True, kid=True, prc=True,
        feature_extractor_weights_path=args.inception_weights, cache_root=str(cache), cache=True,
        input1_cache_name=f"gen{args.num}", input2_cache_name=f"ref{args.num}", save_cpu_ram=True, verbose=False)
    features = {name: torch.load(next(cache.glob(f"{name}{args.num}-*-features-2048*")), weights_only=False)
                for name in ("gen", "ref")}
    pr = prdc.compute_prdc(real_features=features["ref"].numpy(), fake_features=features["gen"].numpy(),
                           nearest_k=5)
    results["torch-fidelity + prdc"] = {
        "fid": tf["frechet_inception_distance"], "kid_mean": tf["kernel_inception_distance_mean"],
        "kid_std": tf["kernel_inception_distance_std"], "precision": tf["precision"], "recall": tf["recall"],
        "density": float(pr["density"]), "coverage": float(pr["coverage"]), "seconds": time.time() - start}

    keys = ["fid", "kid_mean", "precision", "recall", "density", "coverage", "seconds"]
    lines = ["| | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name, m in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{m[k]:.4f}" if k != "seconds" else f"{m[k]:.0f}" for k in keys)
                     + " |")
    table = "\n".join(lines)
    (args.out / "reference_check.md").write_text(table + "\n")
    (args.out / "reference_check.json").write_text(json.dumps(results, indent=2))
    print(table)


if __name__ == "__main__":
    main()
