"""Ablation of the hybrid's settings: named jobs (a bundled config plus overrides), each with several seeds, at
equal steps (`--steps`) or at equal wall-clock time (`--minutes`), trained and scored through the `cqf` command
line. Writes ablation.md (mean ± std over seeds: steps, bits/dim ELBO/IWAE, FID, precision, recall, coverage,
the effective weight of L_Q and D's accuracy at the end) and samples.png (seed 0 of every job side by side).
Finished runs and evaluations in `--out` are kept, so adding seeds or jobs trains only the new ones.

Example (2 CPU cores; one thread per run, two runs at a time):
    cqf classifier train digits --epochs 30 --out classifiers/digits.safetensors
    python benchmarks/ablation.py --steps 1500 --seeds 2 --features classifier:classifiers/digits.safetensors \\
        --num-samples 1000 --job 'vae-f:digits-vae-f' --job 'fixed-1:digits-cq-f' \\
        --job 'adaptive-1:digits-cq-f:train.balance=adaptive' --out runs/ablation-digits
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from table1 import collect, eval_command, fmt, run_parallel, sample_panel  # noqa: E402

COLUMNS = [("steps", "steps", 0), ("bpd", "BPD (ELBO)", 3), ("bpd_iwae", "BPD (IWAE)", 3), ("fid", "FID", 2),
           ("precision", "precision", 3), ("recall", "recall", 3), ("coverage", "coverage", 3),
           ("weight", "w_eff (end)", 1), ("d_acc", "D acc (end)", 2)]


def parse_job(text: str) -> tuple[str, str, list[str]]:
    """'NAME:CONFIG:key=v;key=v' -> (name, config, overrides)."""
    name, config, *rest = text.split(":", 2)
    overrides = [o for o in rest[0].split(";") if o] if rest else []
    return name, config, overrides


def last_log(run_dir: Path) -> dict:
    """The last training record of metrics.jsonl, with the last logged effective weight and D accuracy."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "images_per_s" in r]
    weight = [r["quality_weight_effective"] for r in train if "quality_weight_effective" in r]
    acc = [(r["d_acc_real"] + r["d_acc_fake"]) / 2 for r in train if "d_acc_real" in r]
    return {"steps": train[-1]["step"], "weight": weight[-1] if weight else None, "d_acc": acc[-1] if acc else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", action="append", required=True, help="NAME:CONFIG[:key=v;key=v]")
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--steps", type=int, help="equal steps: every run trains this many")
    budget.add_argument("--minutes", type=float, help="equal time: every run trains this long")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--data", default=None, help="data.name override, e.g. npz:../shared/data/mnist.npz")
    parser.add_argument("--features", required=True, help="inception or classifier:PATH")
    parser.add_argument("--inception-weights", default=None)
    parser.add_argument("--num-samples", type=int, default=10000)
    parser.add_argument("--num-reference", type=int, default=10000)
    parser.add_argument("--iw-samples", type=int, default=100)
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time (one thread each)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="override for every job")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = [parse_job(j) for j in args.job]
    cqf_cmd = [sys.executable, "-m", "cqf"]
    runs = {(name, s): args.out / f"{name}-s{s}" for name, _, _ in jobs for s in range(args.seeds)}

    commands, logs = [], []
    budget = ([f"train.steps={args.steps}"] if args.steps else [f"train.minutes={args.minutes}",
                                                              "train.steps=100000000"])
    for name, config, overrides in jobs:
        for seed in range(args.seeds):
            run_dir = runs[(name, seed)]
            if (run_dir / "model.safetensors").exists():
                continue
            sets = [*budget, f"seed={seed}", "train.num_threads=1", "train.eval_iw_samples=0",
                    *([f"data.name={args.data}"] if args.data else []), *args.overrides, *overrides]
            commands.append(cqf_cmd + ["train", config, "--out", str(run_dir), "--quiet"]
                            + [a for s in sets for a in ("--set", s)])
            logs.append(run_dir.parent / f"{run_dir.name}.train.log")
    run_parallel(commands, logs, args.parallel)

    commands, logs = [], []
    for (_, seed), run_dir in runs.items():
        if (run_dir / "eval.json").exists():
            continue
        commands.append(eval_command(run_dir, seed, args))
        logs.append(run_dir.parent / f"{run_dir.name}.eval.log")
    run_parallel(commands[:1], logs[:1], 1)  # fills the reference-feature cache
    run_parallel(commands[1:], logs[1:], args.parallel)

    lines = ["| job | " + " | ".join(label for _, label, _ in COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    protocol = None
    for name, _, _ in jobs:
        rows = [collect(runs[(name, s)]) | last_log(runs[(name, s)]) for s in range(args.seeds)]
        protocol = rows[0]["protocol"]
        cells = [fmt([r[key] for r in rows], digits) for key, _, digits in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    budget_text = f"{args.steps} steps" if args.steps else f"{args.minutes} min"
    lines += ["", f"{args.seeds} seed(s), {budget_text} per run ({args.parallel} at a time, 1 CPU thread each); "
              f"{protocol['generated']['num_images']} samples vs {protocol['reference']['num_images']} "
              f"{protocol['reference']['data']} {protocol['reference']['split']} images, features "
              f"{protocol['extractor']['name']} (sha256 {protocol['extractor']['weights_sha256'][:12]}); bits/dim on "
              f"the test split, IWAE K={args.iw_samples}. w_eff: weight of L_Q in units of L_C (nats per image) "
              "at the last log step. Jobs: " + "; ".join(f"{n} = {c} {' '.join(o)}".strip() for n, c, o in jobs)]
    table = "\n".join(lines)
    (args.out / "ablation.md").write_text(table + "\n")
    print(table)

    sample_panel(args.out / "samples.png", {name: runs[(name, 0)] for name, _, _ in jobs})
    print(f"written: {args.out / 'ablation.md'}, {args.out / 'samples.png'}")


if __name__ == "__main__":
    main()
