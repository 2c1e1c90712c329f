"""One training step: `train.d_steps` discriminator steps (when L_Q is on), then one generator step on

    coverage_weight * L_C + quality_weight * L_Q,   both in nats per image,

with L_C = -ELBO and L_Q = -mean logit D(x_gen) (DESIGN section 3), then the EMA update. The RNG is reseeded
from (seed, step) and every batch is a function of the step, so a resumed run continues exactly as an
uninterrupted one. Loss balancing, augmentation, mixed precision and gradient all-reduce belong here.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from . import losses
from .config import Config
from .data import ImageData, batch_indices, dequantize
from .errors import TrainingError
from .run import Run

__all__ = [
    "check_finite",
    "discriminator_step",
    "ema_beta",
    "ema_update",
    "frozen",
    "generator_step",
    "quality_active",
    "training_step",
]


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


def check_finite(step: int, **terms: Tensor) -> None:
    """A one-line TrainingError naming the step and the term when a loss is not finite."""
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
    check_finite(step, loss_d=loss)
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
        check_finite(step, loss_coverage=loss_coverage)
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
        check_finite(step, loss_quality=loss_quality)
        loss = loss + quality_weight * loss_quality
        stats["loss_quality"] = loss_quality.detach()
    loss.backward()
    if grad_clip > 0:
        stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip).detach()
    opt.step()
    return stats


def quality_active(cfg: Config, step: int) -> bool:
    """Whether L_Q (and D) train at `step`: after the warm-up in hybrid runs, from the first step in a GAN."""
    return cfg.train.quality_weight > 0 and (cfg.is_gan or step >= cfg.train.warmup_steps)


def training_step(run: Run, data: ImageData) -> dict:
    """Advance `run` by one step; returns the step's detached statistics."""
    cfg, tc, step = run.cfg, run.cfg.train, run.step
    # Reseed from (seed, step): dequantization, z and decoder noise are exact on resume.
    torch.manual_seed(cfg.seed * 1_000_003 + step)
    quality_on = run.disc is not None and quality_active(cfg, step)
    num_train, stats = len(data.x_train), {}
    if quality_on:
        for i in range(tc.d_steps):
            idx = batch_indices(step * tc.d_steps + i, num_train, tc.batch_size, cfg.seed + 1)
            x_real = dequantize(data.x_train[idx], data.levels).to(run.device)
            stats |= discriminator_step(run.model, run.disc, run.opt_d, x_real, step)
    idx = batch_indices(step, num_train, tc.batch_size, cfg.seed)
    x = dequantize(data.x_train[idx], data.levels).to(run.device)
    quality_weight = tc.quality_weight if quality_on else 0.0
    stats |= generator_step(run.model, run.disc, run.opt_g, x, tc.coverage_weight, quality_weight, tc.grad_clip, step)
    if run.ema is not None:
        ema_update(run.ema, run.model, ema_beta(tc.batch_size, tc.ema_halflife_kimg))
    run.step += 1
    return stats
