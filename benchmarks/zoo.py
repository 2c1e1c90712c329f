"""Parameter counts and training-step time of the model zoo's configs (and cifar10-cq-f for reference).

For each config: parameters of the encoder (with its IAF steps), the decoder, the flow and D (millions), and the
seconds of one training step at the config's batch (64) on synthetic RGB images of its data set's size (32x32
CIFAR-10, 48x48 STL-10, 64x64 CelebA / ImageNet / LSUN), L_Q on from the first step (no warm-up), after one
untimed step at batch 4 (allocations, ActNorm init). On a CPU the step runs on
`--threads` threads (default 1: the timings of a shared machine are then comparable config to config).

    python benchmarks/zoo.py                     # CPU, one thread, ~6 minutes
    python benchmarks/zoo.py --device cuda --steps 10
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time

import torch

CONFIGS = ["cifar10-cq-f", "cifar10-gan-res", "cifar10-cq-f-res", "cifar10-cq-f-res-iaf",
           "cifar10-cq-f-res-iaf-large-d", "cifar10-cq-f-res-2scale", "cifar10-nvp",
           "stl10-cq-f-res-iaf-large-d", "stl10-cq-f-res-2scale", "celeba64-cq-f", "imagenet64-cq-f",
           "lsun-bedroom64-cq-f"]
SIDES = {"stl10": 48, "celeba64": 64, "imagenet64": 64, "lsun-bedroom64": 64}  # their own sizes (cqf.datasets)


def _synthetic(num: int, side: int):
    from cqf.data import ImageData

    x = torch.randint(0, 256, (num, 3, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(num, dtype=torch.int64)
    return ImageData("synthetic-cifar10", 256, x, y, x[:64], y[:64], x[:64], y[:64])


def _millions(module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6 if module is not None else 0.0


def measure(name: str, device: str, steps: int) -> dict:
    from cqf.config import load_config
    from cqf.run import build_run
    from cqf.step import training_step

    cfg = load_config(name)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, warmup_steps=0, quality_ramp_steps=0,
                                                             device=device))
    side = cfg.data.image_size or SIDES.get(cfg.data.name, 32)
    data = _synthetic(max(cfg.train.batch_size, 64), side)
    with tempfile.TemporaryDirectory() as run_dir:
        small = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=4))
        run = build_run(small, data, run_dir)
        training_step(run, data)  # untimed: allocations, lazy init
        run.cfg = cfg  # the same networks, now at the config's batch
        sync = torch.cuda.synchronize if run.device.type == "cuda" else (lambda: None)
        if run.device.type == "cuda":
            training_step(run, data)  # a GPU warms up at the full batch too (kernel and algorithm choice)
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            training_step(run, data)
        sync()
        seconds = (time.perf_counter() - start) / steps
    model = run.model
    encoder, decoder = getattr(model, "encoder", None), getattr(model, "decoder", None)
    return {"config": name, "variant": cfg.variant, "encoder": _millions(encoder), "decoder": _millions(decoder),
            "flow": _millions(getattr(model, "flow", None)), "disc": _millions(run.disc), "s_per_step": seconds,
            "side": side}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=1, help="timed steps per config")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    where = f"{args.device}" + (f", {args.threads} thread(s)" if args.device == "cpu" else "")
    print(f"| config | variant | pixels | encoder M | decoder M | flow M | D M | s/step (batch 64, {where}) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name in args.configs.split(","):
        r = measure(name, args.device, args.steps)
        print(f"| {r['config']} | {r['variant']} | {r['side']} | {r['encoder']:.2f} | {r['decoder']:.2f} | "
              f"{r['flow']:.2f} | {r['disc']:.2f} | {r['s_per_step']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
