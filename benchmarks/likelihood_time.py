"""Test bits/dim over wall-clock training time: each job (the config plus overrides) trains alone, in resumed
phases that end at the given minutes, and `cqf eval` scores its test bits/dim after each phase. Resume is exact,
so the phases are one run with pauses for evaluation. Writes likelihood_time.md: steps and bits/dim at each
time, with the per-pixel histogram baseline that every density model must beat.

Example (the CPU machine, alone; about 45 minutes per job at 5, 10 and 20 minutes plus evaluation):
    python benchmarks/likelihood_time.py --config cifar10-vae-f --data npz:../shared/data/cifar10.npz \\
        --minutes 5 10 20 --job base --job 'flow128:model.channels=32;model.flow_hidden=128' \\
        --out runs/likelihood-time

Finished phases (a `NAME-Mmin.json` in `--out`) are kept, so adding jobs or a later time trains only what is new.
Bits/dim are the ELBO (an upper bound) unless `--iw-samples` > 0 asks for the IWAE-K bound as well.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cqf import checkpoint
from cqf.config import load_config
from cqf.data import load_dataset
from cqf.likelihood import histogram_bits_per_dim

sys.path.insert(0, str(Path(__file__).parent))
from table1 import run_parallel


def parse_job(text: str) -> tuple[str, list[str]]:
    """'NAME[:key=v;key=v]' -> (name, overrides)."""
    name, _, rest = text.partition(":")
    return name, [o for o in rest.split(";") if o]


def last_step(run_dir: Path) -> int:
    """The step of the run's newest checkpoint (every `cqf train` invocation ends with one)."""
    return int(checkpoint.latest(run_dir).stem.split("-")[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="bundled config or YAML path, e.g. cifar10-vae-f")
    parser.add_argument("--job", action="append", required=True, help="NAME[:key=v;key=v]")
    parser.add_argument("--minutes", type=float, nargs="+", required=True, help="times of the evaluations")
    parser.add_argument("--data", default=None, help="data.name override, e.g. npz:../shared/data/cifar10.npz")
    parser.add_argument("--iw-samples", type=int, default=0, help="K of the IWAE-K bound; 0 = ELBO only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="override for every job")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    times = sorted(args.minutes)
    if times[0] <= 0:
        parser.error("--minutes must be positive")
    jobs = [parse_job(j) for j in args.job]
    if len({name for name, _ in jobs}) < len(jobs):
        parser.error("job names must differ")
    args.out.mkdir(parents=True, exist_ok=True)
    cqf = [sys.executable, "-m", "cqf"]

    results: dict[str, dict[float, dict]] = {}
    for name, overrides in jobs:
        run_dir, done = args.out / name, 0.0
        for minutes in times:
            result = args.out / f"{name}-{minutes:g}min.json"
            if not result.exists():
                sets = [f"train.minutes={minutes - done}", "train.steps=100000000", "train.eval_iw_samples=0",
                        "train.sample_every=0", "train.eval_every=0", f"seed={args.seed}",
                        *([f"data.name={args.data}"] if args.data else []), *args.overrides, *overrides]
                train = cqf + ["train", args.config, "--out", str(run_dir), "--quiet"]
                run_parallel([train + [a for s in sets for a in ("--set", s)]],
                             [args.out / f"{name}-{minutes:g}min.train.log"], 1)
                evaluate = cqf + ["eval", str(run_dir / "model.safetensors"), "--metrics", "bpd", "--quiet",
                                  "-k", str(args.iw_samples), "--json", str(result.with_suffix(".tmp"))]
                run_parallel([evaluate], [args.out / f"{name}-{minutes:g}min.eval.log"], 1)
                bpd = json.loads(result.with_suffix(".tmp").read_text())["bits_per_dim"]
                result.write_text(json.dumps(bpd | {"step": last_step(run_dir)}, indent=1) + "\n")
                result.with_suffix(".tmp").unlink()
            results.setdefault(name, {})[minutes] = json.loads(result.read_text())
            done = minutes

    cfg = load_config(args.config, [*([f"data.name={args.data}"] if args.data else []), *args.overrides])
    data = load_dataset(cfg.data.name, root=cfg.data.root, val_size=0)
    baseline = histogram_bits_per_dim(data.x_train, data.x_test, data.levels)
    head = " | ".join(f"{m:g} min" for m in times)
    lines = [f"| job | steps at {' / '.join(f'{m:g}' for m in times)} min | {head} |",
             "|---|---|" + "---|" * len(times)]
    for name, _ in jobs:
        steps = " / ".join(f"{results[name][m]['step']:,}" for m in times)
        cells = []
        for m in times:
            r = results[name][m]
            iwae = f" ({r['bpd_iwae']:.3f})" if r.get("bpd_iwae") is not None else ""
            cells.append(f"{r['bpd_elbo']:.3f}{iwae}")
        lines.append(f"| {name} | {steps} | " + " | ".join(cells) + " |")
    lines.append("| per-pixel histogram baseline (exact) | | " + " | ".join(f"{baseline:.3f}" for _ in times) + " |")
    bound = f"ELBO (IWAE-{args.iw_samples} in brackets)" if args.iw_samples else "ELBO"
    lines += ["", f"{args.config}, seed {args.seed}, one job at a time, test bits/dim ({bound}) of the exported "
              "weights after each phase. Jobs: " + "; ".join(f"{n} = {' '.join(o) or 'the config'}"
                                                              for n, o in jobs)]
    table = "\n".join(lines)
    (args.out / "likelihood_time.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
