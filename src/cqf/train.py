"""The one training loop. VAE, VAE-F, CQ, CQ-F and GAN differ only in config (DESIGN sections 2-3).

Each step: `train.d_steps` discriminator steps (when `quality_weight > 0`), then one generator step on

    coverage_weight * L_C + quality_weight * L_Q,   both in nats per image,

with L_C = -ELBO and L_Q = -mean logit D(x_gen). The RNG is reseeded from (seed, step) and the batch is a
function of the step, so a resumed run continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import time
from pathlib import Path

import torch
import yaml
from torch import Tensor, nn

from . import checkpoint, losses, nets
from .config import Config, to_dict
from .data import ImageData, batch_indices, dequantize, load_dataset, to_unit
from .errors import TrainingError
from .models import build_model

__all__ = ["build_discriminator", "discriminator_step", "ema_beta", "generator_step", "resolve_device", "train"]

log = logging.getLogger("cqf")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def ema_beta(batch_size: int, halflife_kimg: float) -> float:
    """Per-step EMA decay from a half-life in images, so that it does not change with batch size."""
    return 0.5 ** (batch_size / (halflife_kimg * 1000))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, beta: float) -> None:
    for p_ema, p in zip(ema.parameters(), model.parameters(), strict=True):
        p_ema.lerp_(p, 1 - beta)
    for b_ema, b in zip(ema.buffers(), model.buffers(), strict=True):
        b_ema.copy_(b)


@contextlib.contextmanager
def frozen(module: nn.Module | None):
    """No parameter gradients for `module` inside the block; gradients still flow through it."""
    if module is None:
        yield
        return
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags, strict=True):
            p.requires_grad_(flag)


def build_discriminator(cfg: Config, image_shape: tuple[int, int, int]) -> nn.Module | None:
    if cfg.train.quality_weight == 0:
        return None
    channels, blocks = nets.default_disc_size(image_shape)
    return nets.Discriminator(image_shape, cfg.model.disc_channels or channels, cfg.model.disc_blocks or blocks)


def _check_finite(step: int, **terms: Tensor) -> None:
    for name, value in terms.items():
        if not torch.isfinite(value).all():
            raise TrainingError(
                f"non-finite {name} ({value.item()}) at step {step}; the last checkpoint in the run directory "
                f"is intact: lower train.lr, raise model.sigma_floor or set train.grad_clip"
            )


def discriminator_step(model: nn.Module, disc: nn.Module, opt: torch.optim.Optimizer, x: Tensor, step: int) -> dict:
    """One BCE step of D on dequantized real images x against model samples (real = 1, model = 0)."""
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        fake = model.sample(x.shape[0])
    real_logits, fake_logits = disc(x), disc(fake)
    loss = losses.discriminator_bce(real_logits, fake_logits)
    _check_finite(step, loss_d=loss)
    loss.backward()
    opt.step()
    return {
        "loss_d": loss.detach(),
        "d_acc_real": (real_logits > 0).float().mean().detach(),
        "d_acc_fake": (fake_logits < 0).float().mean().detach(),
    }


def generator_step(
    model: nn.Module,
    disc: nn.Module | None,
    opt: torch.optim.Optimizer,
    x: Tensor,
    coverage_weight: float,
    quality_weight: float,
    grad_clip: float,
    step: int,
) -> dict:
    """One step on coverage_weight * L_C + quality_weight * L_Q (nats per image); returns detached stats."""
    opt.zero_grad(set_to_none=True)
    stats, loss = {}, x.new_zeros(())
    if coverage_weight > 0:
        terms = model.elbo(x)
        loss_coverage = -terms.elbo.mean()  # summed over dimensions, averaged over the batch
        _check_finite(step, loss_coverage=loss_coverage)
        loss = loss + coverage_weight * loss_coverage
        stats |= {
            "loss_coverage": loss_coverage.detach(),
            "bpd": model.bits_per_dim(terms.elbo.detach()).mean(),
            "kl": terms.kl.detach().mean(),
            "sigma_at_floor": terms.sigma_at_floor,
        }
    if quality_weight > 0 and disc is not None:
        with frozen(disc):  # gradients reach the decoder and the flow (through f^-1), not D
            loss_quality = losses.quality_loss(disc(model.sample(x.shape[0])))
        _check_finite(step, loss_quality=loss_quality)
        loss = loss + quality_weight * loss_quality
        stats["loss_quality"] = loss_quality.detach()
    loss.backward()
    if grad_clip > 0:
        stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip).detach()
    opt.step()
    return stats


class _Logger:
    """metrics.jsonl and TensorBoard, written together."""

    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.path = run_dir / "metrics.jsonl"
        self.writer = SummaryWriter(str(run_dir / "tb"))

    def write(self, step: int, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **record}) + "\n")
        for key, value in record.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def image(self, tag: str, path: Path, images: Tensor, step: int) -> None:
        from .evaluate import save_grid

        self.writer.add_image(tag, save_grid(images, path), step)

    def close(self) -> None:
        self.writer.close()


def _grids(model, data: ImageData, fixed_z: Tensor, x_show: Tensor, logger: _Logger, run_dir: Path, step: int):
    model.eval()
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the same decoder noise at every step: progress is watchable
        samples = to_unit(model.sample(len(fixed_z), z=fixed_z), data.levels)
        logger.image("samples", run_dir / f"samples-{step:07d}.png", samples.float().cpu(), step)
        if getattr(model, "has_density", False):
            x = dequantize(x_show, data.levels)
            recon = to_unit(model.reconstruct(x), data.levels)
            pairs = torch.stack([to_unit(x, data.levels), recon], 1).flatten(0, 1)  # original, reconstruction
            logger.image("reconstructions", run_dir / f"recon-{step:07d}.png", pairs.float().cpu(), step)
    model.train()


def train(cfg: Config, run_dir: str | Path, data: ImageData | None = None, progress: bool = True) -> nn.Module:
    """Train (or resume from the newest checkpoint in run_dir) and return the model used for evaluation.

    Writes into run_dir: config.yaml, metrics.jsonl, tb/ (TensorBoard), samples-*.png, recon-*.png,
    ckpt-*.pt (resumable), model.safetensors and results.json (test bits/dim) at the end.
    """
    from . import evaluate

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    device = resolve_device(cfg.train.device)
    data = data if data is not None else load_dataset(cfg.data.name, cfg.data.root, cfg.data.val_size)
    tc = cfg.train
    gan = tc.coverage_weight == 0

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.image_shape, data.levels, gan=gan).to(device)
    disc = build_discriminator(cfg, data.image_shape)
    disc = disc.to(device) if disc is not None else None
    opt_g = torch.optim.Adam(model.parameters(), lr=tc.lr, betas=tc.betas)
    opt_d = torch.optim.Adam(disc.parameters(), lr=tc.lr_d, betas=tc.betas_d) if disc is not None else None
    ema = copy.deepcopy(model).requires_grad_(False) if tc.ema_halflife_kimg > 0 else None
    state = {"model": model, "ema": ema, "disc": disc, "opt_g": opt_g, "opt_d": opt_d}
    meta = {"image_shape": list(data.image_shape), "levels": data.levels, "data_name": data.name}

    step = 0
    if (last := checkpoint.latest(run_dir)) is not None:
        payload = checkpoint.load_payload(last)
        for key, target in state.items():
            if target is not None:
                if payload.get(key) is None:
                    raise TrainingError(f"{last} has no '{key}' state: it was written by another config")
                try:
                    target.load_state_dict(payload[key])
                except (RuntimeError, ValueError, KeyError) as err:
                    raise TrainingError(
                        f"{last} does not fit this config ({type(err).__name__}); use a new --out directory"
                    ) from None
        step = int(payload["step"])
        log.info("resuming from %s at step %d", last, step)
    else:
        # Data-dependent ActNorm init on the first batch, before the EMA copy and the first step.
        x0 = dequantize(data.x_train[batch_indices(0, len(data.x_train), tc.batch_size, cfg.seed)], data.levels)
        if not gan:
            with torch.no_grad():
                model.elbo(x0.to(device))
            if ema is not None:
                ema.load_state_dict(model.state_dict())
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

    logger = _Logger(run_dir)
    eval_model = ema if ema is not None else model
    fixed_z = torch.randn(64, model.latent_dim, generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    x_show = data.x_val[:32].to(device) if len(data.x_val) >= 32 else data.x_train[:32].to(device)
    beta = ema_beta(tc.batch_size, tc.ema_halflife_kimg) if ema is not None else 0.0
    num_train = len(data.x_train)
    start_time, last_ckpt, stats = time.monotonic(), None, {}
    quality_announced = False

    def save_checkpoint():
        path = run_dir / f"ckpt-{step:07d}.pt"
        checkpoint.save(path, step=step, config=to_dict(cfg), **meta, **state)
        checkpoint.prune(run_dir, tc.keep_checkpoints)
        return path

    first_step, last_logged = step, step

    def log_stats():
        nonlocal last_logged
        record = {k: float(v) for k, v in stats.items()}
        record["images_per_s"] = (step - first_step) * tc.batch_size / max(time.monotonic() - start_time, 1e-9)
        logger.write(step, record)
        last_logged = step
        return record

    bar = _progress(tc.steps, step, progress)
    model.train()
    try:
        while step < tc.steps:
            if tc.minutes > 0 and time.monotonic() - start_time > tc.minutes * 60:
                log.info("wall-clock budget of %.1f minutes reached at step %d", tc.minutes, step)
                break
            # Reseed from (seed, step): dequantization, z and decoder noise are exact on resume.
            torch.manual_seed(cfg.seed * 1_000_003 + step)
            # The likelihood-only warm-up applies to hybrid runs; a GAN has only L_Q from its first step.
            quality_on = disc is not None and (step >= tc.warmup_steps or tc.coverage_weight == 0)
            if quality_on and not quality_announced and tc.warmup_steps > 0:
                log.info("step %d: warm-up over, L_Q switched on", step)
                quality_announced = True
            stats = {}
            if quality_on:
                for i in range(tc.d_steps):
                    idx = batch_indices(step * tc.d_steps + i, num_train, tc.batch_size, cfg.seed + 1)
                    x_real = dequantize(data.x_train[idx], data.levels).to(device)
                    stats |= discriminator_step(model, disc, opt_d, x_real, step)
            idx = batch_indices(step, num_train, tc.batch_size, cfg.seed)
            x = dequantize(data.x_train[idx], data.levels).to(device)
            stats |= generator_step(
                model,
                disc,
                opt_g,
                x,
                tc.coverage_weight,
                tc.quality_weight if quality_on else 0.0,
                tc.grad_clip,
                step,
            )
            if ema is not None:
                ema_update(ema, model, beta)
            step += 1
            bar.update(1)

            if step % tc.log_every == 0 or step == tc.steps:
                record = log_stats()
                shown = ("loss_coverage", "bpd", "loss_quality", "loss_d", "d_acc_real", "d_acc_fake")
                bar.set_postfix({k: f"{record[k]:.3g}" for k in shown if k in record})
            if not gan and tc.eval_every > 0 and step % tc.eval_every == 0 and len(data.x_val):
                val = evaluate.bits_per_dim(eval_model, data.x_val, data.levels, num_importance=0, device=device)
                logger.write(step, {"val_bpd_elbo": val["bpd_elbo"]})
                eval_model.train()
            if tc.sample_every > 0 and step % tc.sample_every == 0:
                _grids(eval_model, data, fixed_z, x_show, logger, run_dir, step)
            if tc.ckpt_every > 0 and step % tc.ckpt_every == 0:
                last_ckpt = save_checkpoint()
    finally:
        bar.close()
    if step != last_logged and stats:  # stopped by the time budget between two log steps
        log_stats()

    if last_ckpt is None or not last_ckpt.name.endswith(f"{step:07d}.pt"):
        save_checkpoint()
    _grids(eval_model, data, fixed_z, x_show, logger, run_dir, step)
    checkpoint.save_safetensors(run_dir / "model.safetensors", eval_model, cfg, **meta)
    if not gan:
        results = evaluate.bits_per_dim(eval_model, data.x_test, data.levels, tc.eval_iw_samples, device=device)
        results |= {"split": "test", "step": step, "variant": cfg.variant, "data": data.name}
        (run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        logger.write(step, {f"test_{k}": v for k, v in results.items() if isinstance(v, float)})
        log.info("test bits/dim: ELBO %.4f%s", results["bpd_elbo"],
                 f", IWAE-{tc.eval_iw_samples} {results['bpd_iwae']:.4f}" if tc.eval_iw_samples else "")
    logger.close()
    return eval_model.eval()


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step", dynamic_ncols=True)
