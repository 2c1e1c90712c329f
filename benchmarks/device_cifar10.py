"""CIFAR-10 Table 1 on one GPU: the five variants at the bundled configs, equal wall-clock budgets.

Made for a short lease of a GPU machine with no network: the data arrive as an LZMA-compressed subset (made by
`--pack`), every run trains for `--minutes`, then bits/dim (test ELBO and IWAE-K; GAN: the approximate bound)
is computed there, and `--num-samples` samples per variant are saved as uint8 .npz for FID/KID/precision/recall
with Inception features on another machine (`cqf eval samples.npz --data ...`).

    python benchmarks/device_cifar10.py --pack ../shared/data/cifar10.npz --train 24000 --test 2000 --to .devdata/c10.xz
    PYTHONPATH=src python benchmarks/device_cifar10.py --data .devdata/c10.xz --minutes 1.2 --out $OUT
    PYTHONPATH=src python benchmarks/device_cifar10.py --data .devdata/c10.xz --minutes 6 --seeds 2 --parallel \\
        --out $OUT
"""

from __future__ import annotations

import argparse
import json
import lzma
import tempfile
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


def train_one(variant: str, seed: int, npz: Path, args, out: Path, extra: list[str] = ()) -> dict:
    """Train one variant for `args.minutes`, then its bits/dim and `args.num_samples` samples (uint8 NHWC .npz)."""
    from cqf import config as cqf_config
    from cqf.data import load_dataset
    from cqf.likelihood import bits_per_dim, gan_bits_per_dim
    from cqf.quality import sample_images
    from cqf.train import train

    out.mkdir(parents=True, exist_ok=True)
    cfg = cqf_config.load_config(f"cifar10-{variant}", [
        f"data.name=npz:{npz}", f"train.minutes={args.minutes}", "train.steps=10000000", f"seed={seed}",
        "train.eval_iw_samples=0", "train.sample_every=0", "train.eval_every=0", "train.ckpt_every=0",
        "train.log_every=200", *args.overrides, *extra])
    run_dir = Path(tempfile.mkdtemp(prefix=f"cqf-{out.name}-"))  # fresh: a leftover run dir would be resumed
    start = time.time()
    model = train(cfg, run_dir, progress=False)
    seconds = time.time() - start
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = max(r["step"] for r in records)
    rate = [r["images_per_s"] for r in records if "images_per_s" in r][-1]
    data = load_dataset(cfg.data.name, val_size=cfg.data.val_size)
    device = next(model.parameters()).device
    t = time.time()
    if variant == "gan":
        bpd = gan_bits_per_dim(model, cfg.model, data.x_train, data.x_test, steps=args.gan_bpd_steps,
                               num_importance=args.iw_samples, device=device)
    else:
        bpd = bits_per_dim(model, data.x_test, data.levels, args.iw_samples, device=device)
    bpd_seconds = time.time() - t
    samples = sample_images(model, args.num_samples, seed=0)
    np.savez(out / "samples.npz", x=samples.permute(0, 2, 3, 1).numpy())
    result = {"variant": cfg.variant, "seed": seed, "steps": steps, "train_seconds": round(seconds, 1),
              "images_per_s": round(rate, 1), "bpd": bpd, "bpd_seconds": round(bpd_seconds, 1),
              "parameters": sum(p.numel() for p in model.parameters()), "overrides": [*args.overrides, *extra],
              "last_log": records[-1]}
    (out / "run.json").write_text(json.dumps(result, indent=2))
    return result


def run(args) -> None:
    """All (variant, seed) runs, one after another or all at once as processes sharing the GPU (`--parallel`).

    Samples come back as one .npz per variant with one key per seed (`s0`, `s1`, ...), to stay within a few files.
    """
    import subprocess
    import sys

    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    npz = unpack(args.data, Path("/tmp/cifar10-subset.npz"))
    jobs = [(v, s, f"{v}-s{s}", []) for s in range(args.seeds) for v in args.variants.split(",")]
    if args.jobs:  # NAME:VARIANT:SEED[:key=value;key=value]
        jobs = [(j.split(":")[1], int(j.split(":")[2]), f'{j.split(":")[0]}-s{j.split(":")[2]}',
                 j.split(":", 3)[3].split(";") if j.count(":") >= 3 else []) for j in args.jobs]
    parts = Path(tempfile.mkdtemp(prefix="cqf-parts-"))
    summary = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
               "torch": torch.__version__, "minutes_per_run": args.minutes, "overrides": args.overrides,
               "concurrent_runs": len(jobs) if args.parallel else 1, "runs": {}}
    if args.parallel:
        procs = []
        for v, s, name, extra in jobs:
            log = open((parts / f"{name}.log"), "w")
            cmd = [sys.executable, __file__, "--worker", v, str(s), "--npz", str(npz), "--minutes", str(args.minutes),
                   "--num-samples", str(args.num_samples), "--iw-samples", str(args.iw_samples),
                   "--gan-bpd-steps", str(args.gan_bpd_steps), "--out", str(parts / name)]
            cmd += [a for o in [*args.overrides, *extra] for a in ("--set", o)]
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))
        codes = [p.wait() for p in procs]
        summary["exit_codes"] = {name: c for (_, _, name, _), c in zip(jobs, codes, strict=True)}
        summary["failed_logs"] = {name: (parts / f"{name}.log").read_text()[-2000:]
                                  for (_, _, name, _), c in zip(jobs, codes, strict=True) if c != 0}
    else:
        for v, s, name, extra in jobs:
            train_one(v, s, npz, args, parts / name, extra)
    for _, _, name, _ in jobs:
        if (parts / name / "run.json").exists():
            summary["runs"][name] = json.loads((parts / name / "run.json").read_text())
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    groups = {}  # one file per variant or job name (keys s0, s1, ...)
    for v, s, name, _ in jobs:
        groups.setdefault(name.rsplit("-s", 1)[0] if args.jobs else v, {})[f"s{s}"] = parts / name / "samples.npz"
    for group, files in groups.items():
        arrays = {key: np.load(path)["x"] for key, path in files.items() if path.exists()}
        if arrays:
            np.savez_compressed(args.out / f"samples-{group}.npz", **arrays)
    print(json.dumps(summary, indent=1))
    failed = [name for name, code in summary.get("exit_codes", {}).items() if code != 0]
    if failed:  # what did finish is saved above; the caller still learns that the call was not whole
        sys.exit(f"device_cifar10.py: {len(failed)} of {len(jobs)} runs failed ({', '.join(failed)}): their logs "
                 "are in summary.json's failed_logs")


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
    parser.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 of each variant")
    parser.add_argument("--parallel", action="store_true", help="all runs at once, sharing the GPU")
    parser.add_argument("--job", dest="jobs", action="append", default=[],
                        help="NAME:VARIANT:SEED[:key=value;...] a run with its own overrides (replaces "
                             "variants/seeds); runs of one NAME are the seeds of one table row")
    parser.add_argument("--worker", nargs=2, metavar=("VARIANT", "SEED"), help=argparse.SUPPRESS)
    parser.add_argument("--npz", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override")
    parser.add_argument("--out", type=Path, default=Path("device-out"))
    args = parser.parse_args()
    if args.pack:
        pack(args.pack, args.train, args.test, args.to)
    elif args.worker:
        train_one(args.worker[0], int(args.worker[1]), args.npz, args, args.out, [])
    else:
        run(args)


if __name__ == "__main__":
    main()
