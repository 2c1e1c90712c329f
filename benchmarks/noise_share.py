"""What the decoder noise does to a VAE-family model's samples, and what the adversarial term does to it.

For each run directory: the decoder's sigma in feature space (grey levels) and the share of the samples' pixel
variance that the noise adds (`cqf.quality.decoder_noise_share`), from model.safetensors; FID with and without
the noise when `eval.json` and `eval-no-noise.json` are there (`cqf eval RUN/model.safetensors --no-noise
--json RUN/eval-no-noise.json ...`, the same protocol otherwise); and a plot of the logged sigma over training
(metrics.jsonl's `sigma_levels`), one line per run.

    python benchmarks/noise_share.py runs/c10/vae-f-s0 runs/c10/cq-f-s0 --out runs/c10/noise
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import cqf
from cqf.quality import decoder_noise_share


def _fid(path: Path) -> float | None:
    return json.loads(path.read_text())["metrics"].get("fid") if path.is_file() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--out", type=Path, required=True, help="folder for noise.md and sigma.png")
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    lines = ["| run | sigma (grey levels) | noise share of pixel variance | FID | FID without noise |",
             "|---|---|---|---|---|"]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for run in args.runs:
        share = decoder_noise_share(cqf.load(run / "model.safetensors"), args.num_samples)
        fids = [_fid(run / "eval.json"), _fid(run / "eval-no-noise.json")]
        cells = ["–" if f is None else f"{f:.1f}" for f in fids]
        lines.append(f"| {run.name} | {share['sigma_levels']:.2f} | {share['noise_share']:.3f} | {' | '.join(cells)} |")
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        points = [(r["step"], r["sigma_levels"]) for r in records if "sigma_levels" in r]
        ax.plot(*zip(*points, strict=True), label=run.name)
    ax.set(xlabel="step", ylabel="decoder sigma (grey levels)", yscale="log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out / "sigma.png", dpi=120)
    table = "\n".join(lines) + f"\n\n{args.num_samples} samples per model (seed 0), model.safetensors weights.\n"
    (args.out / "noise.md").write_text(table)
    print(table)
    print(f"written: {args.out / 'noise.md'}, {args.out / 'sigma.png'}")


if __name__ == "__main__":
    main()
