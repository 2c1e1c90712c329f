"""Training and evaluation throughput of the bundled CIFAR-10 configs, against the machine's matmul peak.

For each variant (`cifar10-{vae,vae-f,cq,cq-f,gan}`, L_Q on from the first step) at batch 64, on synthetic
32x32 RGB images (throughput does not depend on the pixels):

    train img/s     training images per second over `--steps` timed steps (after one untimed step)
    GFLOP/img       model FLOPs per training image: matmuls and convolutions, forward and backward, every pass
                    of one training step (D steps included), counted by torch.utils.flop_counter
    % peak          achieved FLOP/s over the matmul peak measured in the same run, in the training dtype
    peak MiB        peak memory of the variant's process: CUDA allocator peak, or the CPU process's peak RSS
    sample img/s    model.sample, no gradients (the EMA weights when the config has an EMA)
    bpd img/s       test bits/dim evaluation: ELBO (K = 0), and IWAE-K at the config's K unless --quick
and once per run: Inception pool3 feature extraction (FID/KID/precision/recall) images/s, when weights are found
(`--inception-weights` or CQF_INCEPTION_WEIGHTS).

    python benchmarks/throughput.py --quick                       # CPU, under a minute
    python benchmarks/throughput.py --device cuda --steps 30      # GPU
    python benchmarks/throughput.py --device cuda --set train.precision=bf16 --set train.compile=true

Each variant runs in its own process, so that peak memory is its own. The targets of the speed work are
printed under the table (CPU: CQ-F at >= 50% of the matmul peak; GPU: CQ-F >= 3x 1,250 img/s).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

VARIANTS = ["vae", "vae-f", "cq", "cq-f", "gan"]
GPU_BEFORE = 1250.0  # CQ-F img/s on an H200 before the speed work (float32, paper-size config, alone)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, seconds: float = 1.5) -> float:
    """FLOP/s of a large square matmul, the best of repeated timings."""
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        for _ in range(10):
            a @ b
        _sync(device)
        best = min(best, (time.perf_counter() - t) / 10)
    return 2 * n**3 / best


def _synthetic(num: int, seed: int = 0):
    from cqf.data import ImageData

    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (num, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.zeros(num, dtype=torch.int64)
    return ImageData("synthetic-cifar10", 256, x, y, x[:64], y[:64], x[:num], y[:num])


def _timed(fn, device: torch.device, reps: int) -> float:
    """Seconds per call, after one untimed call."""
    fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / reps


def measure_variant(variant: str, args) -> dict:
    """One variant, in this process: training, FLOPs, memory, sampling and bits/dim throughput."""
    from torch.utils.flop_counter import FlopCounterMode

    from cqf.config import load_config
    from cqf.likelihood import bits_per_dim
    from cqf.models import DensityModel
    from cqf.run import build_run
    from cqf.step import training_step

    torch.manual_seed(0)
    overrides = [f"train.batch_size={args.batch}", "train.warmup_steps=0", "train.quality_ramp_steps=0",
                 f"train.device={args.device}", "train.eval_every=0", "train.sample_every=0", "train.steps=1000000",
                 *args.set]
    cfg = load_config(f"cifar10-{variant}", overrides)
    data = _synthetic(max(4 * args.batch, 256))
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        run = build_run(cfg, data, tmp)
    run.model.train()
    with FlopCounterMode(display=False) as counter:  # the untimed first step: FLOPs of one whole step
        training_step(run, data)
    flops = counter.get_total_flops()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_s = _timed(lambda: training_step(run, data), device, args.steps)
    peak_mib = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
    model = run.eval_model.eval()
    with torch.no_grad():
        sample_s = _timed(lambda: model.sample(args.batch), device, max(2, args.steps // 2))
    out = {"variant": variant, "train_img_s": args.batch / step_s, "flops_per_img": flops / args.batch,
           "flop_s": flops / step_s, "peak_mib": peak_mib, "sample_img_s": args.batch / sample_s}
    if isinstance(model, DensityModel):
        x = data.x_test[: 4 * args.batch]
        for key, k in [("bpd_elbo_img_s", 0)] + ([] if args.quick else [("bpd_iwae_img_s", cfg.train.eval_iw_samples)]):
            seconds = _timed(lambda k=k: bits_per_dim(model, x, data.levels, k, batch_size=args.batch, device=device),
                             device, 1)
            out[key] = len(x) / seconds
        out["iw_samples"] = cfg.train.eval_iw_samples
    return out


def feature_throughput(args) -> float | None:
    from cqf.features import extract, make_extractor

    weights = args.inception_weights or os.environ.get("CQF_INCEPTION_WEIGHTS")
    if not weights or not os.path.isfile(weights):
        return None
    extractor = make_extractor("inception", weights, device=args.device)
    images = _synthetic(32 if args.quick else 4 * args.batch).x_train
    seconds = _timed(lambda: extract(extractor, images, batch_size=args.batch, device=args.device),
                     torch.device(args.device), 1)
    return len(images) / seconds


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=None, help="timed training steps (default 3 CPU, 20 GPU)")
    parser.add_argument("--quick", action="store_true", help="2 timed steps, no IWAE timing: under a minute on CPU")
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--inception-weights", default=None)
    parser.add_argument("--label", default="", help="a name for this configuration in the table and JSON")
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: measure one variant, print JSON
    args = parser.parse_args()
    if args.steps is None:
        args.steps = 2 if args.quick else (20 if args.device.startswith("cuda") else 3)
    if args.one:
        print("RESULT " + json.dumps(measure_variant(args.one, args)))
        return

    device = torch.device(args.device)
    precision = next((s.split("=", 1)[1] for s in args.set if s.startswith("train.precision=")), "fp32")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    peak = matmul_peak(device, dtype)
    rows = []
    for variant in args.variants:
        command = [sys.executable, __file__, "--one", variant, "--device", args.device, "--batch", str(args.batch),
                   "--steps", str(args.steps)] + (["--quick"] if args.quick else [])
        for item in args.set:
            command += ["--set", item]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        line = next((ln for ln in result.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{variant} failed:\n{result.stderr[-3000:]}")
        rows.append(json.loads(line[len("RESULT "):]))
    features = feature_throughput(args)

    label = args.label or " ".join(args.set) or "defaults"
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\n{where}; batch {args.batch}; {precision} matmul peak {peak / 1e12:.3f} TFLOP/s; {label}\n")
    print("| variant | train img/s | GFLOP/img | TFLOP/s | % peak | peak MiB | sample img/s | bpd ELBO img/s "
          "| bpd IWAE img/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        iwae = r.get("bpd_iwae_img_s")
        print(f"| {r['variant']} | {r['train_img_s']:.1f} | {r['flops_per_img'] / 1e9:.2f} | "
              f"{r['flop_s'] / 1e12:.3f} | {100 * r['flop_s'] / peak:.0f} | {r['peak_mib']:.0f} | "
              f"{r['sample_img_s']:.0f} | {_fmt(r.get('bpd_elbo_img_s'), '.0f')} | "
              f"{_fmt(iwae, '.1f')}{' (K={})'.format(r['iw_samples']) if iwae else ''} |")
    print(f"\nInception pool3 features: {_fmt(features, '.1f')} img/s"
          + ("" if features else " (no weights: --inception-weights or CQF_INCEPTION_WEIGHTS)"))
    cqf_row = next((r for r in rows if r["variant"] == "cq-f"), None)
    if cqf_row is not None and precision == "fp32":  # the targets are stated for float32
        if device.type == "cuda":
            target, value = 3 * GPU_BEFORE, cqf_row["train_img_s"]
            print(f"target: CQ-F >= {target:.0f} img/s (3x {GPU_BEFORE:.0f}): {value:.0f} "
                  f"({'met' if value >= target else 'not met'})")
        else:
            value = 100 * cqf_row["flop_s"] / peak
            print(f"target: CQ-F step >= 50% of the matmul peak: {value:.0f}% ({'met' if value >= 50 else 'not met'})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": where, "label": label, "batch": args.batch, "precision": precision,
                       "matmul_peak": peak, "features_img_s": features, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
