"""cqf's competitors measured in the same run instead of quoted: Glow (the `normflows` package) and a standard
DCGAN (`benchmarks/dcgan.py`), each trained for the same minutes (wall clock or CPU time, `--clock`) on the same
images as `cqf train` (`cqf.data.load_dataset`: its training split minus the same held-out validation slice,
`data.val_size` of the cqf config named by `--config`: 1,000 images for the bundled CIFAR-10 and MNIST configs),
on the CPU or a GPU (`--device`; `benchmarks/device_natural.sh` runs them beside cqf on a lent one).

Glow is normflows' CIFAR-10 example ("glow" notebook): a multi-scale `MultiscaleFlow` of L levels, K GlowBlocks
per level (affine coupling with split mode 'channel' and sigmoid scale, invertible 1x1 convolution with LU,
ActNorm), a squeeze per level, and Adamax lr 1e-3 with weight decay 1e-5. Two changes: the base of each level is
an unconditional learned diagonal Gaussian (`DiagGaussian`) where the example has a class-conditional one, and K
and the hidden width are flags whose defaults (K=8, hidden 128) are smaller than the example's (K=16, 256) so that
a CPU run of minutes takes thousands of steps rather than hundreds; `--glow-steps 16 --glow-hidden 256` is the
example's size (7.9 M parameters on CIFAR-10).

Glow's test bits/dim are exact and comparable with `cqf eval` by construction: the flow's input map is a flow
layer, so normflows' own `log_prob` returns ln p(x) in cqf's model space x = 2 (k + u) / levels - 1, and the
number comes from cqf's own `cqf.likelihood.bits_per_dim` (the same test split, the dequantization noise u from
seed 0 in batches of 250, and `cqf.losses.bits_per_dim`). The example feeds y = (k + u) / levels in [0, 1);
here y = (x + 1) / 2, so ln p_x(x) = ln p_y(y) - D ln 2 and

    bpd = -(ln p_x(x) + D ln(2 / levels)) / (D ln 2) = -ln p_y(y) / (D ln 2) + log2(levels),

which for 8-bit images is the example's own `nll / (D ln 2) + 8`.

The DCGAN has no density, hence no bits/dim. Both peers save `--num-samples` samples (Glow at temperature 1.0,
the untempered model, as bits/dim measures it) as uint8 NHWC arrays, key `samples`, which `cqf eval` reads;
the command that scores them is printed and recorded, and `--eval` runs that scoring in-process with cqf's own
`cqf.evaluate.evaluate` (the same protocol as the command line).

Threads: `--threads 0` (the default) is torch's default, as for `cqf train` (`train.num_threads=0`) and
`benchmarks/likelihood_time.py`, whose runs these peers are compared with; pass the thread count the cqf runs had.

Example (the CPU machine, alone; 2 x 20 minutes of training, then test bits/dim and 2 x 2,500 samples):
    PYTHONPATH=src python benchmarks/peers.py --config cifar10-vae-f --data npz:../shared/data/cifar10.npz \\
        --minutes 20 --out runs/peers-c10-20min

Writes OUT/peers.json (one entry per peer), OUT/peers.md (the table), OUT/glow-samples.npz, OUT/dcgan-samples.npz.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from cqf.config import DataConfig, EvalConfig, load_config
from cqf.data import ImageData, batch_indices, dequantize, load_dataset
from cqf.errors import CQFError, TrainingError
from cqf.losses import bits_per_dim as bits_per_dim_from_log_p
from cqf.losses import discriminator_bce
from cqf.models import ElboTerms

sys.path.insert(0, str(Path(__file__).parent))
import dcgan

log = logging.getLogger("peers")

PEERS = ("glow", "dcgan")
SAMPLES_KEY = "samples"  # the first array name `cqf eval` looks for after "x"


# ---------------------------------------------------------------------------------------------------------------
# Glow (normflows)


class ToModelSpace(nn.Module):
    """The affine map between normflows' input space and cqf's model space, as a normflows flow layer.

    normflows' flows run in the generative direction: `forward(y) -> (x, ln|det dx/dy|)` and `inverse(x) ->
    (y, ln|det dy/dx|)`. Here x = 2y - 1, so y = (x + 1) / 2 = (k + u) / levels in [0, 1) (the input space of
    normflows' CIFAR-10 example) and the log-det is +D ln 2 forward, -D ln 2 inverse, per image (B,).
    """

    def forward(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return 2 * y - 1, y.new_full((len(y),), y[0].numel() * math.log(2))

    def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return (x + 1) / 2, x.new_full((len(x),), -x[0].numel() * math.log(2))


def build_glow(image_shape: tuple[int, int, int], num_levels: int = 3, num_steps: int = 8, hidden: int = 128):
    """normflows' multi-scale Glow (its CIFAR-10 example's architecture) on cqf's model space.

    Level i (0 = coarsest) runs K = `num_steps` GlowBlocks on C * 2^(L+1-i) channels, then a squeeze; each level
    has an unconditional learned diagonal Gaussian base (zero-initialised: N(0, I)). `num_steps=0` leaves
    squeezes and merges only, a permutation of a standard normal: the test's closed form.

    Args:
        image_shape: (C, H, W); H and W must be divisible by 2^num_levels.
    Returns:
        a `normflows.MultiscaleFlow` whose `log_prob(x, None)` is ln p(x) in nats (B,) for model-space x and
        whose `sample(n)` returns model-space images.
    """
    import normflows as nf

    c, h, w = image_shape
    if h % 2**num_levels or w % 2**num_levels:
        raise CQFError(f"Glow with {num_levels} levels needs image sides divisible by {2 ** num_levels}, got "
                       f"{h}x{w}: lower --glow-levels")
    q0, flows, merges = [], [], []
    for i in range(num_levels):
        channels = c * 2 ** (num_levels + 1 - i)
        with warnings.catch_warnings():  # normflows' LU 1x1 convolution calls the deprecated torch.lu
            warnings.filterwarnings("ignore", message="torch.lu is deprecated")
            level = [nf.flows.GlowBlock(channels, hidden, split_mode="channel", scale=True)
                     for _ in range(num_steps)]
        flows.append(level + [nf.flows.Squeeze()])
        if i == 0:  # the coarsest latent: everything that was not factored out before
            shape = (c * 2 ** (num_levels + 1), h // 2**num_levels, w // 2**num_levels)
        else:  # the half factored out at level i
            merges.append(nf.flows.Merge())
            shape = (c * 2 ** (num_levels - i), h // 2 ** (num_levels - i), w // 2 ** (num_levels - i))
        q0.append(nf.distributions.DiagGaussian(shape))
    return nf.MultiscaleFlow(q0, flows, merges, transform=ToModelSpace(), class_cond=False)


class FlowDensity(nn.Module):
    """A normflows flow over model space seen as a cqf density model, so cqf's own evaluation code scores it.

    Its "ELBO" is the exact log-likelihood (a KL term of zero): `cqf.likelihood.bits_per_dim` then reports exact
    bits/dim with the dequantization and formula of `cqf eval`.
    """

    def __init__(self, flow: nn.Module, image_shape: tuple[int, int, int], levels: int):
        super().__init__()
        self.flow, self.image_shape, self.levels = flow, tuple(image_shape), levels
        self.latent_dim = math.prod(self.image_shape)
        self.nonfinite_samples = 0  # images with a non-finite pixel among those drawn by `sample`

    def log_prob(self, x: Tensor, num_importance: int = 0) -> Tensor:
        """ln p(x), (B,) nats, of model-space images x (B, C, H, W); exact, so `num_importance` is unused."""
        return self.flow.log_prob(x, None)

    def elbo(self, x: Tensor) -> ElboTerms:
        log_p = self.log_prob(x)
        return ElboTerms(log_px_z=log_p, kl=torch.zeros_like(log_p), sigma_at_floor=log_p.new_zeros(()))

    def bits_per_dim(self, log_p: Tensor) -> Tensor:
        return bits_per_dim_from_log_p(log_p, self.latent_dim, self.levels)

    @torch.no_grad()
    def sample(self, num_samples: int, noise: bool = True, z: Tensor | None = None) -> Tensor:
        """Model-space images at temperature 1.0. A Glow sample can overflow (the sigmoid scale is divided by in
        this direction); such images are counted in `nonfinite_samples` and their bad pixels set to 0 (grey)."""
        x, _ = self.flow.sample(num_samples)
        bad = ~torch.isfinite(x.flatten(1)).all(1)
        self.nonfinite_samples += int(bad.sum())
        return torch.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0)


def glow_bits_per_dim(model: FlowDensity, x_int: Tensor, levels: int, max_images: int = 0,
                      device: torch.device | str = "cpu") -> dict:
    """Exact test bits/dim of a flow, through `cqf.likelihood.bits_per_dim` (what `cqf eval` runs): seed 0 for
    the dequantization noise, batches of 250, `cqf.losses.bits_per_dim`.

    Args:
        x_int: (N, C, H, W) integer images of the test split; the first `max_images` if > 0.
    Returns:
        {"bpd", "num_images", "dequantization_seed", "estimator"}.
    """
    from cqf.likelihood import bits_per_dim

    if max_images > 0:
        x_int = x_int[:max_images]
    result = bits_per_dim(model, x_int, levels, num_importance=0, device=device)
    return {"bpd": result["bpd_elbo"], "num_images": result["num_images"],
            "dequantization_seed": result["dequantization_seed"],
            "estimator": "exact: the flow's ln p(x) in cqf's model space, scored by cqf.likelihood.bits_per_dim"}


def train_glow(model: FlowDensity, data: ImageData, minutes: float, batch_size: int, lr: float, seed: int,
               clock=time.monotonic, device: torch.device | str = "cpu") -> dict:
    """Maximum likelihood for `minutes` of `clock` (wall clock, or `time.process_time`; at least one step): the
    example's Adamax, fresh uniform dequantization every batch, cqf's step-indexed batches moved to `device` (the
    model's). A non-finite batch loss skips the update, as in normflows' example; such steps are counted."""
    opt = torch.optim.Adamax(model.parameters(), lr=lr, weight_decay=1e-5)
    model.train()
    x_train = data.x_train.to(device)  # once: a step then copies nothing from the host
    step = skipped = 0
    last_bpd = float("nan")
    start, last_log = clock(), time.monotonic()
    while step == 0 or clock() - start < minutes * 60:
        x = dequantize(x_train[batch_indices(step, len(x_train), batch_size, seed).to(device)], data.levels)
        log_p = model.log_prob(x)  # (B,) nats; the first call also runs ActNorm's data-dependent init
        loss = -log_p.mean()  # nats per image
        if torch.isfinite(loss):
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            last_bpd = model.bits_per_dim(log_p.detach()).mean().item()
        else:
            skipped += 1
        step += 1
        if time.monotonic() - last_log > 30:
            log.info("glow step %d, train bits/dim %.3f, %.0f s", step, last_bpd, clock() - start)
            last_log = time.monotonic()
    return {"steps": step, "images_seen": step * batch_size, "train_seconds": clock() - start,
            "skipped_steps": skipped, "last_train_bpd": last_bpd}


# ---------------------------------------------------------------------------------------------------------------
# DCGAN


class GeneratorSampler(nn.Module):
    """A DCGAN generator as a cqf image model (`sample(n)` -> model-space images), with BatchNorm in eval mode
    (running statistics): a sample does not depend on the others in its batch."""

    def __init__(self, generator: dcgan.Generator, levels: int):
        super().__init__()
        self.generator, self.levels = generator, levels
        self.image_shape, self.latent_dim = generator.image_shape, generator.latent_dim

    @torch.no_grad()
    def sample(self, num_samples: int, noise: bool = True, z: Tensor | None = None) -> Tensor:
        self.generator.eval()
        device = next(self.generator.parameters()).device
        z = torch.randn(num_samples, self.latent_dim, device=device) if z is None else z
        return self.generator(z)


def train_dcgan(generator: dcgan.Generator, discriminator: dcgan.Discriminator, data: ImageData, minutes: float,
                batch_size: int, seed: int, clock=time.monotonic, device: torch.device | str = "cpu") -> dict:
    """One D step and one G step per step for `minutes` of `clock` (wall clock, or `time.process_time`; at least
    one step): Adam (2e-4, 0.5), D's BCE and G's non-saturating loss, on `device` (the networks'). Real images are
    dequantized to model space as every cqf model sees them; a non-finite loss stops the run."""
    opt_g, opt_d = dcgan.adam(generator.parameters()), dcgan.adam(discriminator.parameters())
    generator.train(), discriminator.train()
    x_train = data.x_train.to(device)  # once: a step then copies nothing from the host
    step = 0
    start, last_log = clock(), time.monotonic()
    while step == 0 or clock() - start < minutes * 60:
        real = dequantize(x_train[batch_indices(step, len(x_train), batch_size, seed).to(device)], data.levels)
        fake = generator(torch.randn(len(real), generator.latent_dim, device=device))
        # Real and generated images go through D in separate batches, so each BatchNorm batch is of one kind.
        loss_d = discriminator_bce(discriminator(real), discriminator(fake.detach()))
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        loss_g = dcgan.generator_loss(discriminator(fake))
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        if not (torch.isfinite(loss_d) and torch.isfinite(loss_g)):
            raise TrainingError(f"DCGAN: non-finite loss at step {step} (D {loss_d.item()}, G {loss_g.item()})")
        step += 1
        if time.monotonic() - last_log > 30:
            log.info("dcgan step %d, loss D %.3f G %.3f, %.0f s", step, loss_d.item(), loss_g.item(),
                     clock() - start)
            last_log = time.monotonic()
    return {"steps": step, "images_seen": step * batch_size, "train_seconds": clock() - start,
            "last_loss_d": loss_d.item(), "last_loss_g": loss_g.item()}


# ---------------------------------------------------------------------------------------------------------------
# Samples and their scoring


def save_samples_npz(images: Tensor, path: Path) -> Path:
    """uint8 images (N, C, H, W) -> `path` as one uint8 NHWC array named `samples`, which `cqf eval` reads."""
    if images.dtype != torch.uint8:
        raise ValueError(f"samples must be uint8, got {images.dtype}")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{SAMPLES_KEY: images.permute(0, 2, 3, 1).contiguous().numpy()})
    return path


def eval_command(samples: Path, data: str, metrics: str, num_samples: int, features: str, weights: str,
                 out_json: Path) -> str:
    """The `cqf eval` command line that scores a sample file (what `--eval` runs in-process)."""
    parts = ["cqf", "eval", str(samples), "--data", data, "--metrics", metrics, "--num-samples", str(num_samples)]
    if features != "inception":
        parts += ["--features", features]
    else:
        parts += ["--inception-weights", weights or "W"]  # W: TF-Inception weights ($CQF_INCEPTION_WEIGHTS)
    return " ".join(parts + ["--json", str(out_json)])


def score_samples(samples: Path, args, out_json: Path) -> dict:
    """`cqf eval` of a sample file, in-process: cqf.evaluate.evaluate with the command line's settings."""
    from cqf.data import default_root
    from cqf.evaluate import evaluate
    from cqf.report import format_table, write_json

    config = EvalConfig(data=args.data, metrics=tuple(m for m in args.metrics.split(",") if m),
                        num_samples=args.num_samples, features=args.features,
                        inception_weights=args.inception_weights, cache_dir=str(default_root() / "features"),
                        seed=args.seed, progress=False)
    result = evaluate(samples, config)
    write_json(result, out_json)
    print(format_table(result))
    return {"metrics": result["metrics"], "unavailable": result["unavailable"], "json": str(out_json),
            **({"error": result["error"]} if result.get("error") else {})}


# ---------------------------------------------------------------------------------------------------------------


def run_peer(name: str, data: ImageData, args) -> dict:
    """Train one peer alone for `args.minutes`, score its test bits/dim (Glow), save and optionally score samples."""
    from cqf.quality import sample_images

    torch.manual_seed(args.seed)
    clock = time.process_time if args.clock == "process" else time.monotonic
    entry: dict = {"peer": name, "data": args.data, "config": args.config, "image_shape": list(data.image_shape),
                   "levels": data.levels, "train_images": len(data.x_train), "val_size": args.val_size,
                   "minutes": args.minutes, "clock": args.clock, "batch_size": args.batch_size,
                   "threads": torch.get_num_threads(), "device": str(args.device),
                   "seed": args.seed, "torch": torch.__version__}
    if name == "glow":
        import normflows

        flow = build_glow(data.image_shape, args.glow_levels, args.glow_steps, args.glow_hidden)
        model = FlowDensity(flow, data.image_shape, data.levels).to(args.device)
        entry |= {"library": f"normflows {getattr(normflows, '__version__', '?')}",
                  "architecture": f"Glow (normflows MultiscaleFlow): L={args.glow_levels} levels, "
                                  f"K={args.glow_steps} GlowBlocks per level, hidden {args.glow_hidden}, split "
                                  "'channel', sigmoid scale, LU 1x1 conv, ActNorm; unconditional DiagGaussian bases",
                  "optimizer": f"Adamax lr {args.glow_lr:g}, weight decay 1e-5",
                  "parameters": sum(p.numel() for p in model.parameters())}
        entry |= train_glow(model, data, args.minutes, args.batch_size, args.glow_lr, args.seed, clock, args.device)
        model.eval()
        x_test, _ = data.split("test")
        entry["test_bits_per_dim"] = glow_bits_per_dim(model, x_test, data.levels, args.max_test_images,
                                                   args.device) | {
            "split": "test", "levels": data.levels}
        sampler, temperature = model, 1.0
    else:
        generator = dcgan.Generator(data.image_shape, width=args.dcgan_width).to(args.device)
        discriminator = dcgan.Discriminator(data.image_shape, width=args.dcgan_width).to(args.device)
        entry |= {"library": "benchmarks/dcgan.py",
                  "architecture": f"DCGAN (Radford et al. 2016): latent {generator.latent_dim}, width "
                                  f"{args.dcgan_width}, BatchNorm, ReLU/LeakyReLU(0.2), tanh",
                  "optimizer": "Adam lr 2e-4, betas (0.5, 0.999), non-saturating loss",
                  "parameters": {"generator": sum(p.numel() for p in generator.parameters()),
                                 "discriminator": sum(p.numel() for p in discriminator.parameters())}}
        entry |= train_dcgan(generator, discriminator, data, args.minutes, args.batch_size, args.seed, clock,
                             args.device)
        entry["test_bits_per_dim"] = None  # no density
        sampler, temperature = GeneratorSampler(generator, data.levels), None
    started = time.monotonic()
    images = sample_images(sampler, args.num_samples, seed=args.seed)  # uint8 (N, C, H, W), cqf's quantization
    path = save_samples_npz(images, args.out / f"{name}-samples.npz")
    entry["samples"] = {"path": str(path), "num": len(images), "seed": args.seed, "format": "uint8 NHWC, key "
                        f"'{SAMPLES_KEY}'", "seconds": time.monotonic() - started}
    if temperature is not None:
        entry["samples"] |= {"temperature": temperature, "nonfinite_images": sampler.nonfinite_samples}
    out_json = args.out / f"{name}-eval.json"
    entry["eval_command"] = eval_command(path, args.data, args.metrics, args.num_samples, args.features,
                                         args.inception_weights, out_json)
    entry["eval"] = score_samples(path, args, out_json) if args.eval else None
    return entry


def parse_device(name: str) -> torch.device | str:
    """`--device` as a torch device that exists here, or the one-line reason it cannot be used."""
    try:
        device = torch.device(name)
    except RuntimeError:
        return f"--device {name!r} is not a device: use --device cpu, cuda or cuda:N"
    if device.type not in ("cpu", "cuda"):
        return f"--device {name}: the peers run on cpu or cuda only; use --device cpu or cuda"
    if device.type == "cuda" and not torch.cuda.is_available():
        return f"--device {name}: torch sees no CUDA device on this machine; use --device cpu"
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        return (f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), cuda:0 to "
                f"cuda:{torch.cuda.device_count() - 1}")
    return device


def markdown_table(entries: list[dict], baseline: float) -> str:
    metric_keys = [("fid", "FID"), ("precision", "precision"), ("recall", "recall"), ("density", "density"),
                   ("coverage", "coverage")]
    scored = [k for k, _ in metric_keys if any(e.get("eval") and k in e["eval"]["metrics"] for e in entries)]
    head = ["peer", "parameters", "minutes", "steps", "images seen", "threads", "test bits/dim (exact)", "samples"]
    head += [label for k, label in metric_keys if k in scored]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in entries:
        params = e["parameters"]
        params = f"{params:,}" if isinstance(params, int) else " + ".join(f"{v:,}" for v in params.values())
        bpd = e["test_bits_per_dim"]
        bpd = f"{bpd['bpd']:.3f} ({bpd['num_images']:,} images)" if bpd else "— (no density)"
        row = [e["peer"], params, f"{e['minutes']:g}", f"{e['steps']:,}", f"{e['images_seen']:,}",
               str(e["threads"]), bpd, f"{e['samples']['num']:,}"]
        metrics = (e.get("eval") or {}).get("metrics", {})
        row += [f"{metrics[k]:.4f}" if k in metrics else "" for k in scored]
        lines.append("| " + " | ".join(row) + " |")
    lines.append(f"| per-pixel histogram baseline | | | | | | {baseline:.3f} | | " + "| " * len(scored))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="cqf config (bundled name or YAML) of the runs compared "
                        "with: the peers take its data.name, data.root and data.val_size [cqf's DataConfig defaults]")
    parser.add_argument("--data", default=None, help="cqf data set: digits, mnist, cifar10 or npz:PATH [the config's]")
    parser.add_argument("--data-root", default=None, help="torchvision files [the config's data.root]")
    parser.add_argument("--val-size", type=int, default=None, help="validation slice held out of train [the "
                        f"config's data.val_size; {DataConfig().val_size} without --config]")
    parser.add_argument("--minutes", type=float, required=True, help="training minutes per peer (of --clock)")
    parser.add_argument("--clock", choices=["wall", "process"], default="wall",
                        help="what --minutes counts: wall clock, or this process's CPU time (as cqf's train.clock) "
                             "[wall]")
    parser.add_argument("--peers", default=",".join(PEERS), help=f"comma list of {', '.join(PEERS)} [both]")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default, as cqf "
                        "train.num_threads [0]")
    parser.add_argument("--batch-size", type=int, default=64, help="both peers [64, cqf's CIFAR-10 batch]")
    parser.add_argument("--glow-levels", type=int, default=3, help="Glow's L [3, the example's]")
    parser.add_argument("--glow-steps", type=int, default=8, help="Glow's K per level [8; the example has 16]")
    parser.add_argument("--glow-hidden", type=int, default=128, help="Glow's coupling width [128; example 256]")
    parser.add_argument("--glow-lr", type=float, default=1e-3, help="Adamax learning rate [1e-3, the example's]")
    parser.add_argument("--dcgan-width", type=int, default=64, help="DCGAN base width [64, the paper's]")
    parser.add_argument("--max-test-images", type=int, default=0, help="Glow bits/dim on the first N test "
                        "images only, as cqf eval --max-images [0 = all]")
    parser.add_argument("--num-samples", type=int, default=2500, help="samples per peer [2500: > 2048 for FID]")
    parser.add_argument("--metrics", default="fid,pr,dc", help="cqf eval metrics of the samples [fid,pr,dc]")
    parser.add_argument("--features", default="inception", help="cqf eval --features [inception]")
    parser.add_argument("--inception-weights", default="", help="TF-Inception weights for cqf eval "
                        "[$CQF_INCEPTION_WEIGHTS]")
    parser.add_argument("--eval", action="store_true", help="score the samples in-process (cqf.evaluate)")
    parser.add_argument("--device", default="cpu", help="where the peers train, score bits/dim and sample: cpu, "
                        "cuda or cuda:N [cpu]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    if not peers or set(peers) - set(PEERS):
        parser.error(f"--peers takes a comma list of {', '.join(PEERS)}")
    if args.minutes <= 0 or args.num_samples < 1 or args.batch_size < 1:
        parser.error("--minutes, --num-samples and --batch-size must be positive")
    if args.config is None and args.data is None:
        parser.error("name the data: --data NAME, or --config CONFIG of the cqf runs compared with")
    device = parse_device(args.device)
    if isinstance(device, str):
        parser.exit(2, f"peers.py: error: {device}\n")
    args.device = device
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        data_cfg = load_config(args.config).data if args.config else DataConfig()
        args.data = args.data or data_cfg.name
        args.data_root = data_cfg.root if args.data_root is None else args.data_root
        args.val_size = data_cfg.val_size if args.val_size is None else args.val_size
        data = load_dataset(args.data, args.data_root, args.val_size)
        if "glow" in peers:
            build_glow(data.image_shape, args.glow_levels, 0)  # refuses unsuitable shapes before any training
        if "dcgan" in peers:
            dcgan.check_image_shape(data.image_shape)
    except ImportError:
        parser.exit(2, "peers.py: error: Glow needs normflows: pip install -e \".[peers]\" (or --peers dcgan)\n")
    except (CQFError, ValueError) as err:
        parser.exit(2, f"peers.py: error: {err}\n")

    from cqf.likelihood import histogram_bits_per_dim

    args.out.mkdir(parents=True, exist_ok=True)
    entries = []
    for name in peers:
        log.info("%s: training %g minutes on %s (%d images, %d thread(s))", name, args.minutes, data.name,
                 len(data.x_train), torch.get_num_threads())
        entries.append(run_peer(name, data, args))
        (args.out / "peers.json").write_text(json.dumps(entries, indent=1) + "\n")  # each peer as soon as it ends
    baseline = histogram_bits_per_dim(data.x_train, data.x_test, data.levels)
    table = markdown_table(entries, baseline)
    notes = [(f"{data.name}: {len(data.x_train):,} training images (validation slice of {args.val_size} held "
              f"out), {data.image_shape}, {data.levels} levels; each peer trained for {args.minutes:g} minutes of "
              f"{'CPU time' if args.clock == 'process' else 'wall clock'}, "
              f"batch {args.batch_size}, {torch.get_num_threads()} thread(s), seed {args.seed}, on {args.device}."),
             ("Glow's bits/dim are exact, on the test split, with cqf eval's dequantization (seed 0) and formula; "
              "its samples are at temperature 1.0. The DCGAN has no density."),
             "Score the samples with:", *[f"    {e['eval_command']}" for e in entries]]
    text = table + "\n\n" + "\n".join(notes)
    (args.out / "peers.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
