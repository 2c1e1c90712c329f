"""`cqf train | sample | eval`: parse arguments, build a Config, call one library function.

Errors a user can fix (`cqf.errors.CQFError`) are printed on one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .errors import CQFError

DEFAULT_CONFIG = "digits-cq-f"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cqf", description="Coverage and quality driven generative models.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a model (resumes if RUN_DIR has a checkpoint)")
    train.add_argument("config", nargs="?", default=DEFAULT_CONFIG, help=f"bundled name or YAML path [{DEFAULT_CONFIG}]")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override one config field, e.g. --set train.lr=3e-4 (repeatable)")
    train.add_argument("--out", type=Path, default=None, help="run directory [runs/CONFIG]")
    train.add_argument("--list", action="store_true", help="list the bundled configs and exit")
    train.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    train.add_argument("--quiet", action="store_true", help="no progress bar")

    sample = commands.add_parser("sample", help="draw samples from a checkpoint into a PNG grid")
    sample.add_argument("checkpoint", type=Path)
    sample.add_argument("-n", "--num", type=int, default=64, help="number of samples [64]")
    sample.add_argument("--out", type=Path, default=Path("samples.png"))
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--device", default="cpu")

    ev = commands.add_parser("eval", help="bits/dim of a checkpoint on a data split (ELBO and IWAE-K)")
    ev.add_argument("checkpoint", type=Path)
    ev.add_argument("--split", default="test", choices=["train", "val", "test"])
    ev.add_argument("-k", "--iw-samples", type=int, default=100, help="K of the IWAE-K bound; 0 skips it [100]")
    ev.add_argument("--max-images", type=int, default=0, help="evaluate only the first N images (quick check)")
    ev.add_argument("--data", default=None, help="data set to evaluate on [the checkpoint's own]")
    ev.add_argument("--json", type=Path, default=None, help="results file [next to the checkpoint]")
    ev.add_argument("--gan-bpd", action="store_true",
                    help="GAN checkpoints: fit an encoder and one sigma to the frozen generator, report that bound")
    ev.add_argument("--gan-bpd-steps", type=int, default=2000, help="fitting steps for --gan-bpd [2000]")
    ev.add_argument("--device", default="cpu")
    return parser


def _train(args) -> None:
    from .config import bundled_configs, load_config, to_dict

    if args.list:
        for name, description in bundled_configs().items():
            print(f"{name:24s} {description}")
        return
    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        print(json.dumps(to_dict(cfg), indent=2))
        return
    from .train import train

    out = args.out or Path("runs") / Path(str(args.config)).stem
    print(f"training {cfg.variant} on {cfg.data.name} -> {out}", file=sys.stderr)
    train(cfg, out, progress=not args.quiet)
    print(f"done: {out}/model.safetensors, samples in {out}/samples-*.png, results in {out}/results.json")


def _eval(args) -> None:
    from .evaluate import evaluate_checkpoint, format_table, write_json

    gan_steps = args.gan_bpd_steps if args.gan_bpd else 0
    result = evaluate_checkpoint(args.checkpoint, args.split, args.iw_samples, args.device, args.data, args.max_images,
                                 gan_bpd_steps=gan_steps)
    print(format_table(result))
    path = args.json or args.checkpoint.with_name(f"eval-{args.split}.json")
    write_json(result, path)
    print(f"results written to {path}")


def _sample(args) -> None:
    from .evaluate import sample_grid

    if args.num < 1:
        raise CQFError(f"-n must be >= 1, got {args.num}")
    print(f"samples written to {sample_grid(args.checkpoint, args.num, args.out, args.seed, args.device)}")


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        {"train": _train, "eval": _eval, "sample": _sample}[args.command](args)
    except CQFError as err:
        print(f"cqf: error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("cqf: interrupted; the last checkpoint in the run directory is intact", file=sys.stderr)
        sys.exit(130)
