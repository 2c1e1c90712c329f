"""Reproduce the paper's Table 1 at small scale: VAE, VAE-F, CQ, CQ-F and GAN with equal wall-clock budgets.

Every model is trained and evaluated through the `cqf` command line (the same code a user runs), so the table
is what the software gives. Runs go two at a time with one CPU thread each, so every run sees the same
conditions; results are written as a Markdown table (mean ± std over seeds), a BPD-FID plot and a
side-by-side sample grid. Runs that finished earlier in `--out` (a model.safetensors, an eval.json) are kept, so
raising `--seeds` trains and evaluates only the new seeds.

Example (this machine: 2 CPU cores):
    python benchmarks/table1.py --configs mnist --data npz:../shared/data/mnist.npz --minutes 12 --seeds 1 \\
        --features classifier:classifiers/mnist.safetensors --num-samples 10000 --out runs/table1-mnist
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ["vae", "vae-f", "cq", "cq-f", "gan"]
COLUMNS = [("bpd", "BPD (ELBO)"), ("bpd_iwae", "BPD (IWAE)"), ("fid", "FID"), ("kid", "KID"),
           ("precision", "precision"), ("recall", "recall"), ("density", "density"), ("coverage", "coverage")]


def run_parallel(commands: list[list[str]], logs: list[Path], parallel: int) -> None:
    """Run commands `parallel` at a time; stop everything if one fails."""
    pending = list(zip(commands, logs, strict=True))
    running = []
    while pending or running:
        while pending and len(running) < parallel:
            command, log = pending.pop(0)
            print("$", " ".join(command), f"> {log}", flush=True)
            running.append((subprocess.Popen(command, stdout=open(log, "w"), stderr=subprocess.STDOUT), log))
        time.sleep(2)
        for proc, log in list(running):
            if proc.poll() is not None:
                running.remove((proc, log))
                if proc.returncode != 0:
                    for other, _ in running:
                        other.kill()
                    sys.exit(f"failed ({proc.returncode}): see {log}")


def eval_command(run_dir: Path, seed: int, args, gan_bpd_steps: int = 0) -> list[str]:
    """`cqf eval` of a run's model.safetensors with every metric, the features and counts of `args`, into
    run_dir/eval.json; reference features cached in args.out/feature-cache."""
    command = [sys.executable, "-m", "cqf", "eval", str(run_dir / "model.safetensors"), "--metrics", "all", "--quiet",
               "--features", args.features, "--num-samples", str(args.num_samples),
               "--num-reference", str(args.num_reference), "-k", str(args.iw_samples),
               "--json", str(run_dir / "eval.json"), "--seed", str(seed),
               "--cache-dir", str(args.out / "feature-cache")]
    if args.inception_weights:
        command += ["--inception-weights", args.inception_weights]
    if gan_bpd_steps > 0:
        command += ["--gan-bpd", "--gan-bpd-steps", str(gan_bpd_steps)]
    return command


def collect(run_dir: Path) -> dict:
    e = json.loads((run_dir / "eval.json").read_text())
    bpd, m = e.get("bits_per_dim") or {}, e["metrics"]
    return {"bpd": bpd.get("bpd_elbo"), "bpd_iwae": bpd.get("bpd_iwae"), "approximate": bool(bpd.get("approximate")),
            "fid": m.get("fid"), "kid": m.get("kid_mean"), "precision": m.get("precision"), "recall": m.get("recall"),
            "density": m.get("density"), "coverage": m.get("coverage"), "protocol": e["protocol"]}


def fmt(values: list[float | None], digits: int) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def image_panel(out: Path, images: dict, num: int = 36) -> Path:
    """One figure: a 6x6 grid of the first `num` uint8 images (N, C, H, W) of each entry, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid

    fig, axes = plt.subplots(1, len(images), figsize=(3 * len(images), 3.3), dpi=120, squeeze=False)
    for ax, (title, x) in zip(axes[0], images.items(), strict=True):
        grid = make_grid(x[:num].float() / 255, nrow=6, padding=1, pad_value=1.0)
        ax.imshow(grid.permute(1, 2, 0).clamp(0, 1).numpy(), cmap="gray" if x.shape[1] == 1 else None)
        ax.set_title(title)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def sample_panel(out: Path, run_dirs: dict[str, Path], seed: int = 0, num: int = 36) -> Path:
    """Samples of each run from the same latent seed, side by side."""
    import cqf
    from cqf.quality import sample_images

    return image_panel(out, {variant.upper(): sample_images(cqf.load(run_dir / "model.safetensors"), num, seed=seed)
                             for variant, run_dir in run_dirs.items()}, num)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", required=True, help="bundled config prefix: digits, mnist or cifar10")
    parser.add_argument("--data", default=None, help="data.name override, e.g. npz:../shared/data/mnist.npz")
    parser.add_argument("--minutes", type=float, required=True, help="wall-clock training budget per run")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--features", default="inception", help="inception or classifier:PATH")
    parser.add_argument("--inception-weights", default=None)
    parser.add_argument("--num-samples", type=int, default=10000)
    parser.add_argument("--num-reference", type=int, default=10000)
    parser.add_argument("--iw-samples", type=int, default=100)
    parser.add_argument("--gan-bpd-steps", type=int, default=2000)
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time (one thread each)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra config override")
    parser.add_argument("--skip-train", action="store_true", help="only evaluate and tabulate existing runs")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    variants = args.variants.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    cqf_cmd = [sys.executable, "-m", "cqf"]
    runs = {(v, s): args.out / f"{v}-s{s}" for s in range(args.seeds) for v in variants}

    if not args.skip_train:
        commands, logs = [], []
        for (variant, seed), run_dir in runs.items():
            if (run_dir / "model.safetensors").exists():  # finished earlier (seed 0 before adding seeds): keep it
                continue
            command = cqf_cmd + ["train", f"{args.configs}-{variant}", "--out", str(run_dir), "--quiet",
                                 "--set", f"train.minutes={args.minutes}", "--set", "train.steps=10000000",
                                 "--set", f"seed={seed}", "--set", "train.num_threads=1",
                                 "--set", "train.eval_iw_samples=0"]
            if args.data:
                command += ["--set", f"data.name={args.data}"]
            for override in args.overrides:
                command += ["--set", override]
            commands.append(command)
            logs.append(args.out / f"{variant}-s{seed}.train.log")
        run_parallel(commands, logs, args.parallel)

    commands, logs = [], []
    for (variant, seed), run_dir in runs.items():
        if (run_dir / "eval.json").exists():
            continue
        commands.append(eval_command(run_dir, seed, args, args.gan_bpd_steps if variant == "gan" else 0))
        logs.append(run_dir.parent / f"{run_dir.name}.eval.log")
    # The first evaluation fills the reference-feature cache; the others then read it.
    run_parallel(commands[:1], logs[:1], 1)
    run_parallel(commands[1:], logs[1:], args.parallel)

    rows = {v: [collect(runs[(v, s)]) for s in range(args.seeds)] for v in variants}
    steps = {v: [json.loads((runs[(v, s)] / "metrics.jsonl").read_text().splitlines()[-1]).get("step")
                 for s in range(args.seeds)] for v in variants}
    protocol = rows[variants[0]][0]["protocol"]
    lines = [f"| variant | steps | {' | '.join(label for _, label in COLUMNS)} |", "|" + "---|" * (len(COLUMNS) + 2)]
    for v in variants:
        cells = []
        for key, _ in COLUMNS:
            digits = 4 if key == "kid" else 3
            cell = fmt([r[key] for r in rows[v]], digits)
            cells.append(cell + (" (*)" if key.startswith("bpd") and rows[v][0]["approximate"] else ""))
        lines.append(f"| {v.upper()} | {fmt(steps[v], 0)} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"{args.seeds} seed(s), {args.minutes} min of training each ({args.parallel} runs at a time, 1 CPU thread "
        f"each); {protocol['generated']['num_images']} samples vs {protocol['reference']['num_images']} "
        f"{protocol['reference']['data']} {protocol['reference']['split']} images; features "
        f"{protocol['extractor']['name']} (sha256 {protocol['extractor']['weights_sha256'][:12]}); BPD on the test "
        f"split, IWAE with K={args.iw_samples}. (*) GAN: approximate bound, frozen generator with a fitted encoder "
        "and isotropic sigma.",
    ]
    table = "\n".join(lines)
    (args.out / "table1.md").write_text(table + "\n")
    print(table)

    from cqf.report import write_report

    write_report([runs[(v, 0)] for v in variants], args.out)  # report.md + bpd_fid.png (seed 0)
    sample_panel(args.out / "samples.png", {v: runs[(v, 0)] for v in variants})
    print(f"written: {args.out / 'table1.md'}, {args.out / 'bpd_fid.png'}, {args.out / 'samples.png'}")


if __name__ == "__main__":
    main()
