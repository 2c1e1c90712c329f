"""CIFAR-10 Table 1 on one GPU: the five variants at the bundled paper-size configs, equal wall-clock budgets.

Made for a short lease of a GPU machine with no network: the data arrive as an LZMA-compressed subset (made by
`--pack`), every run trains for `--minutes`, then bits/dim (test ELBO and IWAE-K; GAN: the approximate bound)
is computed there, and `--num-samples` samples per variant are saved as uint8 .npz for FID/KID/precision/recall
with Inception features on another machine (`cqf eval samples.npz --data ...`).

    python benchmarks/device_cifar10.py --pack ../shared/data/cifar10.npz --train 24000 --test 2000 --to .devdata/c10.xz
    PYTHONPATH=src python benchmarks/device_cifar10.py --data .devdata/c10.xz --minutes 1.2 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import lzma
import time
from pathlib import Path

import numpy as np

VARIANTS = ["vae", "vae-f", "cq", "cq-f", "gan"]


def pack(source: Path, num_train: int, num_test: int, out: Path) -> None:
    """A fixed random subset (seed 0) of an npz data set as one LZMA stream: header JSON line, then raw arrays."""
    data = np.load(source)
    rng = np.random.default_rng(0)
    train = np.sort(rng.permutation(len(data["x_train"]))[:num_train])
    test = np.sort(rng.permutation(len(data["x_test"]))[:num_test])
    arrays = {"x_train": data["x_train"][train], "y_train": data["y_train"][train].astype(np.int64),
              "x_test": data["x_test"][test], "y_test": data["y_test"][test].astype(np.int64)}
    header = {k: [list(v.shape), str(v.dtype)] for k, v in arrays.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    with lzma.open(out, "wb", preset=6) as f:
        f.write((json.dumps(header) + "\n").encode())
        for v in arrays.values():
            f.write(np.ascontiguousarray(v).tobytes())
    print(f"{out}: {out.stat().st_size / 2**20:.1f} MiB, {header}")


def unpack(path: Path, out: Path) -> Path:
    with lzma.open(path, "rb") as f:
        header = json.loads(f.readline())
        arrays = {}
        for key, (shape, dtype) in header.items():
            count = int(np.prod(shape)) * np.dtype(dtype).itemsize
            arrays[key] = np.frombuffer(f.read(count), dtype=dtype).reshape(shape)
    np.savez(out, **arrays)
    return out


def run(args) -> None:
    import torch

    from cqf import config as cqf_config
    from cqf.evaluate import bits_per_dim, gan_bits_per_dim, sample_images
    from cqf.train import train

    args.out.mkdir(parents=True, exist_ok=True)
    npz = unpack(args.data, Path("/tmp/cifar10-subset.npz"))
    summary = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
               "torch": torch.__version__, "minutes_per_run": args.minutes, "overrides": args.overrides, "runs": {}}
    for variant in args.variants.split(","):
        cfg = cqf_config.load_config(f"cifar10-{variant}", [
            f"data.name=npz:{npz}", f"train.minutes={args.minutes}", "train.steps=10000000",
            "train.eval_iw_samples=0", "train.sample_every=0", "train.eval_every=0", "train.ckpt_every=0",
            "train.log_every=200", *args.overrides])
        run_dir = Path("/tmp/runs") / variant
        start = time.time()
        model = train(cfg, run_dir, progress=False)
        seconds = time.time() - start
        last = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        steps = max(r["step"] for r in last)
        rate = [r["images_per_s"] for r in last if "images_per_s" in r][-1]
        from cqf.data import load_dataset

        data = load_dataset(cfg.data.name, val_size=cfg.data.val_size)
        t = time.time()
        if variant == "gan":
            bpd = gan_bits_per_dim(model, data.x_train, data.x_test, steps=args.gan_bpd_steps,
                                   num_importance=args.iw_samples, device=model.decoder.head.weight.device)
        else:
            bpd = bits_per_dim(model, data.x_test, data.levels, args.iw_samples,
                               device=next(model.parameters()).device)
        bpd_seconds = time.time() - t
        samples = sample_images(model, args.num_samples, seed=0, device=next(model.parameters()).device)
        np.savez_compressed(args.out / f"samples-{variant}.npz", x=samples.permute(0, 2, 3, 1).numpy())
        summary["runs"][variant] = {"variant": cfg.variant, "steps": steps, "train_seconds": round(seconds, 1),
                                    "images_per_s": round(rate, 1), "bpd": bpd, "bpd_seconds": round(bpd_seconds, 1),
                                    "parameters": sum(p.numel() for p in model.parameters())}
        print(json.dumps({variant: summary["runs"][variant]}), flush=True)
        (args.out / "summary.json").write_text(json.dumps(summary, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pack", type=Path, help="make the subset file from this npz and exit")
    parser.add_argument("--train", type=int, default=24000)
    parser.add_argument("--test", type=int, default=2000)
    parser.add_argument("--to", type=Path, default=Path(".devdata/c10.xz"))
    parser.add_argument("--data", type=Path, help="subset file made by --pack")
    parser.add_argument("--minutes", type=float, default=1.2)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--num-samples", type=int, default=2048)
    parser.add_argument("--iw-samples", type=int, default=100)
    parser.add_argument("--gan-bpd-steps", type=int, default=2000)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override")
    parser.add_argument("--out", type=Path, default=Path("device-out"))
    args = parser.parse_args()
    if args.pack:
        pack(args.pack, args.train, args.test, args.to)
    else:
        run(args)


if __name__ == "__main__":
    main()
