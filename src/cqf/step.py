"""One training step: `train.d_steps` discriminator steps (when L_Q is on), then one generator step on

    coverage_weight * L_C + w * L_Q,   both in nats per image,

with L_C = -ELBO, L_Q = -mean logit D(x_gen) (DESIGN section 3) and w set by `train.balance` and the
warm-up/ramp schedule of lambda = `train.quality_weight`, then the EMA update. The RNG is reseeded
from (seed, step) and every batch is a function of the step, so a resumed run continues exactly as an
uninterrupted one. Loss balancing, augmentation, mixed precision and gradient all-reduce belong here.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor, nn

from . import losses
from .augment import augment
from .config import Config, TrainConfig
from .data import ImageData, batch_indices, dequantize
from .errors import TrainingError
from .run import Run

__all__ = [
    "adaptive_weight",
    "check_finite",
    "discriminator_step",
    "ema_beta",
    "ema_update",
    "frozen",
    "generating_parameters",
    "generator_step",
    "grad_norm",
    "quality_active",
    "quality_weight_at",
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


def discriminator_step(model: nn.Module, disc: nn.Module, opt: torch.optim.Optimizer, x: Tensor, step: int,
                       augment_policy: tuple[str, ...] = (), r1_gamma: float = 0.0) -> dict:
    """One BCE step of D on dequantized real images x against model samples (real = 1, model = 0).

    Both go through the same differentiable augmentation; with `r1_gamma > 0` the R1 penalty
    gamma/2 E|grad_x D(x)|^2 on the real images is added (Mescheder et al. 2018).
    """
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        fake = model.sample(x.shape[0])
    if r1_gamma > 0:
        x = x.detach().requires_grad_(True)
    real_logits, fake_logits = disc(augment(x, augment_policy)), disc(augment(fake, augment_policy))
    loss = losses.discriminator_bce(real_logits, fake_logits)
    stats = {}
    if r1_gamma > 0:
        (grad,) = torch.autograd.grad(real_logits.sum(), x, create_graph=True)
        penalty = grad.square().flatten(1).sum(1).mean()
        loss = loss + r1_gamma / 2 * penalty
        stats["r1_penalty"] = penalty.detach()
    check_finite(step, loss_d=loss)
    loss.backward()
    opt.step()
    return stats | {
        "loss_d": loss.detach(),
        "d_acc_real": (real_logits > 0).float().mean().detach(),
        "d_acc_fake": (fake_logits < 0).float().mean().detach(),
    }


def grad_norm(loss: Tensor, params: list[nn.Parameter]) -> Tensor:
    """||d loss / d params|| over all of `params`, without touching their .grad (the graph is kept)."""
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.sqrt(sum(g.square().sum() for g in grads if g is not None)).detach()


def adaptive_weight(loss_coverage: Tensor, loss_quality: Tensor, layer: nn.Parameter, quality_weight: float,
                    max_weight: float, eps: float = 1e-4) -> Tensor:
    """w = lambda ||grad_layer L_C|| / (||grad_layer L_Q|| + eps), clamped to [0, max_weight] and detached.

    With lambda = 1 the adversarial gradient at `layer` has the norm of the likelihood's (the adaptive weight
    of VQGAN and of latent-diffusion autoencoders, on the decoder's output layer).
    """
    ratio = grad_norm(loss_coverage, [layer]) / (grad_norm(loss_quality, [layer]) + eps)
    return (quality_weight * ratio).clamp(0, max_weight).detach()


def generating_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters both losses reach: the decoder and the flow (not the encoder, which L_Q never sees)."""
    return [p for name, p in model.named_parameters() if not name.startswith("encoder.") and p.requires_grad]


def generator_step(model: nn.Module, disc: nn.Module | None, opt: torch.optim.Optimizer, x: Tensor,
                   tc: TrainConfig, quality_weight: float, step: int, measure: bool = False) -> dict:
    """One step on the generator objective of `tc.balance` (DESIGN section 3); returns detached stats.

        fixed:     coverage_weight * L_C + lambda * L_Q            (nats per image; the paper's setting at lambda 1)
        per_dim:   coverage_weight * L_C / (D ln 2) + lambda * L_Q (L_C in bits/dim)
        adaptive:  coverage_weight * L_C + w * L_Q, w = `adaptive_weight` on the decoder's output layer

    `quality_weight` is lambda at this step (0 during the warm-up). With `measure`, the norms of the gradients
    of L_C and of L_Q (both in nats per image, unweighted) on the decoder and flow are returned too, as is
    `quality_weight_effective`: the weight of L_Q in units of L_C in nats, whatever the balance.
    """
    opt.zero_grad(set_to_none=True)
    stats, loss_coverage, loss_quality = {}, None, None
    coverage_scale = tc.coverage_weight
    if tc.coverage_weight > 0:
        terms = model.elbo(x)
        nats = -terms.elbo.mean()  # summed over dimensions, averaged over the batch
        check_finite(step, loss_coverage=nats)
        if tc.balance == "per_dim":
            coverage_scale /= math.prod(x.shape[1:]) * math.log(2)
        loss_coverage = coverage_scale * nats
        stats |= {
            "loss_coverage": nats.detach(),
            "bpd": model.bits_per_dim(terms.elbo.detach()).mean(),
            "kl": terms.kl.detach().mean(),
            "sigma_at_floor": terms.sigma_at_floor,
        }
    if quality_weight > 0 and disc is not None:
        with frozen(disc):  # gradients reach the decoder and the flow (through f^-1), not D
            loss_quality = losses.quality_loss(disc(augment(model.sample(x.shape[0]), tc.augment_policy)))
        check_finite(step, loss_quality=loss_quality)
        stats["loss_quality"] = loss_quality.detach()
    loss = x.new_zeros(()) if loss_coverage is None else loss_coverage
    if loss_quality is not None:
        weight = torch.as_tensor(quality_weight, dtype=x.dtype, device=x.device)
        if tc.balance == "adaptive" and loss_coverage is not None:
            weight = adaptive_weight(loss_coverage, loss_quality, model.decoder.last.weight, quality_weight,
                                     tc.quality_weight_max)
        loss = loss + weight * loss_quality
        stats["quality_weight_effective"] = (weight / coverage_scale if loss_coverage is not None else weight)
        if measure and loss_coverage is not None:
            shared = generating_parameters(model)
            stats["grad_norm_coverage"] = grad_norm(nats, shared)
            stats["grad_norm_quality"] = grad_norm(loss_quality, shared)
    loss.backward()
    if tc.grad_clip > 0:
        stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip).detach()
    opt.step()
    return stats


def quality_weight_at(cfg: Config, step: int) -> float:
    """lambda at `step`: 0 during a hybrid's warm-up, then rising linearly over `quality_ramp_steps`, then
    `quality_weight`. A GAN has no warm-up: lambda from its first step."""
    tc = cfg.train
    if cfg.is_gan or tc.quality_weight == 0:
        return tc.quality_weight
    if step < tc.warmup_steps:
        return 0.0
    if tc.quality_ramp_steps > 0:
        return tc.quality_weight * min(1.0, (step - tc.warmup_steps + 1) / tc.quality_ramp_steps)
    return tc.quality_weight


def quality_active(cfg: Config, step: int) -> bool:
    """Whether L_Q (and D) train at `step`: after the warm-up in hybrid runs, from the first step in a GAN."""
    return quality_weight_at(cfg, step) > 0


def training_step(run: Run, data: ImageData) -> dict:
    """Advance `run` by one step; returns the step's detached statistics."""
    cfg, tc, step = run.cfg, run.cfg.train, run.step
    # Reseed from (seed, step): dequantization, z and decoder noise are exact on resume.
    torch.manual_seed(cfg.seed * 1_000_003 + step)
    quality_weight = quality_weight_at(cfg, step)
    num_train, stats = len(data.x_train), {}
    if quality_weight > 0:
        for i in range(tc.d_steps):
            idx = batch_indices(step * tc.d_steps + i, num_train, tc.batch_size, cfg.seed + 1)
            x_real = dequantize(data.x_train[idx], data.levels).to(run.device)
            stats |= discriminator_step(run.model, run.disc, run.opt_d, x_real, step, tc.augment_policy, tc.r1_gamma)
    idx = batch_indices(step, num_train, tc.batch_size, cfg.seed)
    x = dequantize(data.x_train[idx], data.levels).to(run.device)
    measure = (step + 1) % tc.log_every == 0 or step + 1 == tc.steps  # the balance is logged at the log interval
    stats |= generator_step(run.model, run.disc, run.opt_g, x, tc, quality_weight, step, measure)
    if quality_weight > 0 and not cfg.is_gan:
        stats["quality_weight"] = quality_weight
    if run.ema is not None:
        ema_update(run.ema, run.model, ema_beta(tc.batch_size, tc.ema_halflife_kimg))
    run.step += 1
    return stats
