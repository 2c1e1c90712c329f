"""Table 1 from the output of `device_cifar10.py`: sample metrics through `cqf eval`, mean ± std over seeds.

`device_cifar10.py` brings back, per variant (or named job), a samples-NAME.npz with one key per seed and a
summary.json with steps, throughput and bits/dim; `--peers` adds the folders `benchmarks/peers.py` wrote in the
same call (peers.json and PEER-samples.npz: Glow's exact bits/dim, the DCGAN's samples) as rows of their own.
This script scores every sample set with `cqf eval` (the same protocol as any other source: TF-Inception
features against a fixed subset of the training split; the reference features are computed once and cached),
then writes the Markdown table, a BPD-FID plot with one point per run and a side-by-side sample panel.

    python benchmarks/device_table.py DEVICE_OUT --data npz:../shared/data/cifar10.npz \\
        --inception-weights pt_inception-2015-12-05-pool3.pth --out runs/cifar10-gpu
    python benchmarks/device_table.py OUT/c10 --peers OUT/peers-* --data ... --out runs/natural-gpu
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from cqf.report import bpd_fid_plot

sys.path.insert(0, str(Path(__file__).parent))
from table1 import COLUMNS, fmt, image_panel

DIGITS = {"fid": 1, "kid": 4, "recall": 4, "coverage": 4}  # decimals shown per column (default 3)


def evaluate(samples: Path, key: str, out: Path, args) -> dict:
    """`cqf eval` of one sample set (skipped when its JSON exists: the evaluation is resumable)."""
    if not out.exists():
        command = [sys.executable, "-m", "cqf", "eval", str(samples), "--npz-key", key, "--data", args.data,
                   "--num-samples", str(args.num_samples), "--num-reference", str(args.num_reference),
                   "--metrics", args.metrics, "--json", str(out), "--cache-dir", str(args.out / "feature-cache")]
        if args.inception_weights:
            command += ["--inception-weights", args.inception_weights]
        print("$", " ".join(command), flush=True)
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def locate_samples(folder: Path, run_name: str, run: dict) -> tuple[str, str]:
    """(group, key): samples-GROUP.npz holds this run's samples under KEY (s<seed>)."""
    key = f"s{run['seed']}"
    if (folder / f"samples-{run_name}.npz").exists():  # a named job
        return run_name, key
    return run_name.rsplit("-s", 1)[0], key  # variant-s<seed>: one file per variant


PEER_LABELS = {"glow": "Glow (peer)", "dcgan": "DCGAN (peer)"}


def peer_runs(folder: Path) -> list[tuple[str, dict, Path]]:
    """(row label, run, samples file) for each peer in a `peers.py` output folder, the run shaped as a
    `device_cifar10.py` run (seed, steps, images/s, bits/dim: Glow's exact, none for the DCGAN)."""
    runs = []
    for entry in json.loads((folder / "peers.json").read_text()):
        bpd = entry["test_bits_per_dim"]
        run = {"seed": entry["seed"], "steps": entry["steps"],
               "images_per_s": entry["images_seen"] / max(entry["train_seconds"], 1e-9),
               "bpd": {"bpd_elbo": bpd["bpd"] if bpd else None}}
        runs.append((PEER_LABELS[entry["peer"]], run, folder / f"{entry['peer']}-samples.npz"))
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("device_out", type=Path, nargs="+", help="folders written by device_cifar10.py")
    parser.add_argument("--peers", type=Path, nargs="*", default=[], help="folders written by peers.py in the same "
                        "call (benchmarks/device_natural.sh): a row per peer")
    parser.add_argument("--data", required=True, help="reference data set, e.g. npz:../shared/data/cifar10.npz")
    parser.add_argument("--inception-weights", default=None)
    parser.add_argument("--num-samples", type=int, default=2048)
    parser.add_argument("--num-reference", type=int, default=5000)
    parser.add_argument("--metrics", default="fid,kid,pr,dc", help="cqf eval --metrics [fid,kid,pr,dc]; a rehearsal "
                        "with fewer than 2,049 samples per set: kid,pr,dc (no FID, no plot)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    rows, first_samples, points, protocol = {}, {}, [], None
    for folder in args.device_out:
        summary = json.loads((folder / "summary.json").read_text())
        for run_name, run in summary["runs"].items():
            group, key = locate_samples(folder, run_name, run)
            samples = folder / f"samples-{group}.npz"
            e = evaluate(samples, key, args.out / f"eval-{folder.name}-{group}-{key}.json", args)
            protocol = protocol or e["protocol"]
            m, bpd = e["metrics"], run["bpd"]
            label = run["variant"] if group.upper() == run["variant"] else f"{run['variant']} ({group})"
            row = rows.setdefault(label, {column: [] for column, _ in COLUMNS} | {"steps": [], "images_per_s": []})
            for column, value in [("bpd", bpd["bpd_elbo"]), ("bpd_iwae", bpd.get("bpd_iwae")), ("fid", m.get("fid")),
                               ("kid", m.get("kid_mean")), ("precision", m.get("precision")),
                               ("recall", m.get("recall")), ("density", m.get("density")),
                               ("coverage", m.get("coverage")), ("steps", run["steps"]),
                               ("images_per_s", run["images_per_s"])]:
                row[column].append(value)
            row["approximate"] = bool(bpd.get("approximate"))
            if "fid" in m:
                points.append((f"{label} {key}", bpd["bpd_elbo"], m["fid"], row["approximate"]))
            if label not in first_samples:
                first_samples[label] = torch.from_numpy(np.load(samples)[key]).permute(0, 3, 1, 2)
    for folder in args.peers:
        if not (folder / "peers.json").is_file():
            parser.error(f"--peers {folder}: not a folder written by peers.py (it has no peers.json)")
        for label, run, samples in peer_runs(folder):
            key = "samples"
            e = evaluate(samples, key, args.out / f"eval-{folder.name}-{samples.stem}.json", args)
            protocol = protocol or e["protocol"]
            m, bpd = e["metrics"], run["bpd"]["bpd_elbo"]
            row = rows.setdefault(label, {column: [] for column, _ in COLUMNS} | {"steps": [], "images_per_s": []})
            for column, value in [("bpd", bpd), ("bpd_iwae", None), ("fid", m.get("fid")), ("kid", m.get("kid_mean")),
                                  ("precision", m.get("precision")), ("recall", m.get("recall")),
                                  ("density", m.get("density")), ("coverage", m.get("coverage")),
                                  ("steps", run["steps"]), ("images_per_s", run["images_per_s"])]:
                row[column].append(value)
            row["approximate"] = False
            if bpd is not None and "fid" in m:
                points.append((f"{label} s{run['seed']}", bpd, m["fid"], False))
            if label not in first_samples:
                first_samples[label] = torch.from_numpy(np.load(samples)[key]).permute(0, 3, 1, 2)

    lines = [f"| run | seeds | steps | images/s | {' | '.join(label for _, label in COLUMNS)} |",
             "|" + "---|" * (len(COLUMNS) + 4)]
    for label, row in rows.items():
        cells = [fmt(row[key], DIGITS.get(key, 3)) + (" (*)" if key.startswith("bpd") and row["approximate"] else "")
                 for key, _ in COLUMNS]
        lines.append(f"| {label} | {len(row['steps'])} | {fmt(row['steps'], 0)} | {fmt(row['images_per_s'], 0)} | "
                     + " | ".join(cells) + " |")
    reference, extractor = protocol["reference"], protocol["extractor"]
    lines += ["", (f"{protocol['generated']['num_images']} samples per run vs {reference['num_images']} "
                   f"{reference['data']} {reference['split']} images, features {extractor['name']} "
                   f"(sha256 {extractor['weights_sha256'][:12]}); mean ± std over seeds. (*) GAN: approximate bound. "
                   "Peers: Glow's bits/dim exact (no IWAE), the DCGAN has none.")]
    table = "\n".join(lines)
    (args.out / "table.md").write_text(table + "\n")
    if points:
        bpd_fid_plot(args.out / "bpd_fid.png", points)
    image_panel(args.out / "samples.png", first_samples)
    print(table)


if __name__ == "__main__":
    main()
