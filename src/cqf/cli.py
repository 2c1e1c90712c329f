"""`cqf train | sample | eval | classifier | report`: parse arguments, build a config, call one library function.

Errors a user can fix (`cqf.errors.CQFError`) are printed on one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .config import EVAL_METRICS as ALL_METRICS
from .config import EvalConfig
from .errors import CQFError

EVAL = EvalConfig()  # the defaults `cqf eval` shows and uses

DEFAULT_CONFIG = "digits-cq-f"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cqf", description="Coverage and quality driven generative models.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a model (resumes if RUN_DIR has a checkpoint)")
    train.add_argument("config", nargs="?", default=DEFAULT_CONFIG,
                       help=f"bundled name or YAML path [{DEFAULT_CONFIG}]")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override one config field, e.g. --set train.lr=3e-4 (repeatable)")
    train.add_argument("--out", type=Path, default=None, help="run directory [runs/CONFIG]")
    train.add_argument("--list", action="store_true", help="list the bundled configs and exit")
    train.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    train.add_argument("--quiet", action="store_true", help="no progress bar")

    sample = commands.add_parser("sample", help="draw samples: a PNG grid (--out X.png) or N PNG files (--out DIR)")
    sample.add_argument("checkpoint", type=Path)
    sample.add_argument("-n", "--num", type=int, default=64, help="number of samples [64]")
    sample.add_argument("--out", type=Path, default=Path("samples.png"), help="X.png for a grid, else a folder")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--device", default="cpu")
    sample.add_argument("--no-noise", action="store_true",
                        help="f^-1(mu(z)) without the decoder noise (a diagnostic; the model's samples keep it)")
    sample.add_argument("--temperature", type=float, default=1.0,
                        help="sample the model with its decoder sigma times T (NVP: base noise times T) [1]")

    ev = commands.add_parser("eval", help="evaluate a checkpoint, image folder or .npz: bits/dim and sample metrics")
    ev.add_argument("source", type=Path, help="ckpt-*.pt / model.safetensors, a folder of PNGs, or an .npz")
    ev.add_argument("--metrics", default="", help=f"comma list of {','.join(ALL_METRICS)}, or 'all' [bits/dim "
                    "for a checkpoint, and the feature metrics where the features fit the images]")
    ev.add_argument("--data", default=None, help="reference data set [the checkpoint's own; required for images]")
    ev.add_argument("--split", default=EVAL.bpd_split, choices=["train", "val", "test"],
                    help=f"bits/dim split [{EVAL.bpd_split}]")
    ev.add_argument("--reference", default=EVAL.reference, choices=["train", "test"],
                    help=f"reference images [{EVAL.reference}]")
    ev.add_argument("--num-samples", type=int, default=EVAL.num_samples,
                    help=f"generated images [{EVAL.num_samples}, the protocol]")
    ev.add_argument("--num-reference", type=int, default=EVAL.num_reference,
                    help="reference images, a fixed random subset [all]")
    ev.add_argument("--features", default=EVAL.features, help=f"inception or classifier:PATH [{EVAL.features}]")
    ev.add_argument("--inception-weights", default=None, help="local TF-Inception weights [$CQF_INCEPTION_WEIGHTS]")
    ev.add_argument("-k", "--iw-samples", type=int, default=EVAL.iw_samples,
                    help=f"K of the IWAE-K bound; 0 skips it [{EVAL.iw_samples}]")
    ev.add_argument("--max-images", type=int, default=0, help="bits/dim on the first N images only (quick check)")
    ev.add_argument("--gan-bpd", action="store_true",
                    help="GAN checkpoints: fit an encoder and one sigma to the frozen generator, report that bound")
    ev.add_argument("--gan-bpd-steps", type=int, default=2000, help="fitting steps for --gan-bpd [2000]")
    ev.add_argument("--no-noise", action="store_true",
                    help="sample f^-1(mu(z)) without the decoder noise: a diagnostic of what the noise costs, not "
                         "the protocol's samples")
    ev.add_argument("--temperature", type=float, default=1.0,
                    help="score the tempered model: decoder sigma times T (NVP: base N(0, T^2 I)), for bits/dim "
                         "and samples alike; a diagnostic, not the protocol [1]")
    ev.add_argument("--neighbours", type=Path, default=None, help="PNG: samples beside their nearest real images")
    ev.add_argument("--npz-key", default=None, help="array of an .npz source [x, samples, images, arr_0, x_test]")
    ev.add_argument("--seed", type=int, default=EVAL.seed)
    ev.add_argument("--batch-size", type=int, default=EVAL.batch_size)
    ev.add_argument("--cache-dir", type=Path, default=None, help="reference feature cache [$CQF_DATA/features]")
    ev.add_argument("--json", type=Path, default=None, help="results file [eval.json next to a checkpoint]")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")
    ev.add_argument("--device", default=EVAL.device)

    classifier = commands.add_parser("classifier", help="domain classifier for feature metrics on small images")
    classifier.add_argument("action", choices=["train"])
    classifier.add_argument("data", help="data set name (digits, mnist, cifar10, npz:PATH)")
    classifier.add_argument("--out", type=Path, default=None, help="weights file [classifiers/DATA.safetensors]")
    classifier.add_argument("--epochs", type=int, default=None,
                            help="passes over the training split [5, more for a small set: at least 1,000 steps]")
    classifier.add_argument("--device", default="cpu")

    report = commands.add_parser("report", help="one Markdown table and a BPD-vs-FID plot over several runs")
    report.add_argument("runs", nargs="+", type=Path, help="run directories (each with eval.json or results.json)")
    report.add_argument("--out", type=Path, default=Path("report"), help="folder for report.md and bpd_fid.png")
    return parser


def _train(args) -> None:
    from .config import bundled_configs, load_config, to_dict

    if args.list:
        configs = bundled_configs()
        width = max(map(len, configs))
        for name, description in configs.items():
            print(f"{name:{width}s} {description}")
        return
    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        print(json.dumps(to_dict(cfg), indent=2))
        return
    from .run import resolve_device
    from .train import train

    resolve_device(cfg.train.device)  # before any data is read or the run directory is made

    out = args.out or Path("runs") / Path(str(args.config)).stem
    main = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 speaks for all
    if not main:
        logging.getLogger("cqf").setLevel(logging.WARNING)
    else:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        on = f" on {world} processes" if world > 1 else ""
        print(f"training {cfg.variant} on {cfg.data.name}{on} -> {out}", file=sys.stderr)
    train(cfg, out, progress=not args.quiet)
    results = f", test bits/dim in {out}/results.json" if not cfg.is_gan else ""
    if main:
        print(f"done: {out}/model.safetensors, samples in {out}/samples-*.png{results}")


def _eval(args) -> None:
    from .data import default_root
    from .evaluate import evaluate
    from .report import format_table, write_json

    if args.metrics == "all":
        wanted = ALL_METRICS
    else:
        wanted = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
    config = EvalConfig(
        data=args.data or "", metrics=wanted, bpd_split=args.split, reference=args.reference,
        num_samples=args.num_samples, num_reference=args.num_reference, features=args.features,
        inception_weights=args.inception_weights or "", iw_samples=args.iw_samples,
        gan_bpd_steps=args.gan_bpd_steps if args.gan_bpd else 0, seed=args.seed, batch_size=args.batch_size,
        device=args.device, npz_key=args.npz_key or "", neighbours=str(args.neighbours or ""),
        cache_dir=str(args.cache_dir or default_root() / "features"), max_images=args.max_images,
        sample_noise=not args.no_noise, temperature=args.temperature,
        progress=not args.quiet,
    )
    result = evaluate(args.source, config)
    print(format_table(result))
    name = "eval.json" if args.temperature == 1.0 else f"eval-T{args.temperature:g}.json"  # not the run's own
    path = args.json or (args.source.with_name(name) if args.source.is_file() and
                         args.source.suffix in (".pt", ".safetensors") else Path(name))
    write_json(result, path)
    print(f"results written to {path}")
    if result.get("error"):  # e.g. no Inception weights offline: the other metrics were still written
        raise CQFError(result["error"])
    if result["unavailable"] and args.metrics not in ("", "all"):  # asked for by name: its absence is an error
        metric, why = next(iter(result["unavailable"].items()))
        raise CQFError(f"{metric} unavailable: {why}")


def _sample(args) -> None:
    from .checkpoint import load
    from .models import tempered
    from .quality import check_no_noise, save_samples
    from .run import resolve_device

    if args.num < 1:
        raise CQFError(f"-n must be >= 1, got {args.num}")
    if not 0 <= args.seed < 2**32:
        raise CQFError(f"--seed must be an integer in [0, 2**32), got {args.seed}")
    resolve_device(args.device, "--device")
    if args.no_noise and args.temperature != 1.0:
        raise CQFError("--no-noise and --temperature both set the decoder noise (--no-noise is temperature 0): use "
                       "one of them")
    loaded = load(args.checkpoint, args.device)
    if args.no_noise:
        check_no_noise(loaded.config.variant)
    with tempered(loaded.model, args.temperature):
        out = save_samples(loaded.model, args.num, args.out, args.seed, noise=not args.no_noise)
    print(f"{args.num} samples written to {out}")


def _classifier(args) -> None:
    from .data import load_dataset
    from .features import train_classifier
    from .run import resolve_device

    resolve_device(args.device, "--device")
    data = load_dataset(args.data)
    out = args.out or Path("classifiers") / f"{args.data.replace(':', '_').replace('/', '_')}.safetensors"
    info = train_classifier(data, out, epochs=args.epochs, device=args.device)
    print(f"classifier for {data.name}: test accuracy {info['test_accuracy']:.4f}, written to {out} "
          f"(sha256 {info['sha256'][:12]}); use it with: cqf eval ... --features classifier:{out}")


def _report(args) -> None:
    from .report import write_report

    table, plot = write_report(args.runs, args.out)
    print(table)
    print(f"written: {args.out / 'report.md'}, {plot}")


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        commands = {"train": _train, "eval": _eval, "sample": _sample, "classifier": _classifier, "report": _report}
        commands[args.command](args)
    except CQFError as err:
        print(f"cqf: error: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:  # a file the command had to read or write: full disk, permissions, a missing folder
        where = f" ({err.filename})" if err.filename else ""
        print(f"cqf: error: {err.strerror or err}{where}; nothing already written was removed: fix this and rerun "
              "the same command", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("cqf: interrupted; the last checkpoint in the run directory is intact", file=sys.stderr)
        sys.exit(130)
