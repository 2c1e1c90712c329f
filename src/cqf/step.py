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

from . import distributed, losses
from .augment import augment
from .config import TrainConfig
from .data import ImageData, batch_indices, beyond_range, dequantize
from .models import ElboTerms
from .run import Run
from .schedule import ema_beta, quality_weight_at

__all__ = [
    "adaptive_reference",
    "adaptive_weight",
    "as_seen_by_discriminator",
    "autocast",
    "coverage_nats",
    "discriminator_step",
    "ema_update",
    "frozen",
    "generating_parameters",
    "generator_forward",
    "generator_step",
    "grad_norm",
    "losses_apart",
    "quality_parameters",
    "training_step",
]


ADAPTIVE_EPS = 1e-4  # in the adaptive weight's denominator


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, beta: float) -> None:
    for p_ema, p in zip(ema.parameters(), model.parameters(), strict=True):
        p_ema.lerp_(p, 1 - beta)
    for b_ema, b in zip(ema.buffers(), model.buffers(), strict=True):
        b_ema.copy_(b)


def coverage_nats(terms: ElboTerms, free_nats: float = 0.0) -> Tensor:
    """L_C in nats per image: -ELBO summed over dimensions and averaged over the batch. With `free_nats` > 0
    the KL term is max(batch-mean KL, free_nats) ("free bits", Kingma et al. 2016, on the whole latent): below
    the threshold the KL has no gradient, so the encoder may carry up to `free_nats` per image at no cost
    instead of collapsing onto the prior. Training objective only: bits/dim stay the true ELBO's. Under torchrun
    the clamp is decided on the global batch's KL (one scalar all-reduce), so the averaged gradient is the
    single-process run's."""
    if free_nats <= 0:
        return -terms.elbo.mean()
    kl = terms.kl.mean()
    global_kl = distributed.sum_over_ranks(kl.detach()) / distributed.context().world
    return -terms.log_px_z.mean() + torch.where(global_kl > free_nats, kl, kl.new_tensor(free_nats))


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


def autocast(device: torch.device, precision: str):
    """bf16 autocast of the networks for `train.precision=bf16` (a no-op for fp32). The networks hand their
    outputs back in their input's dtype, so log-dets, log-likelihood sums, the KL and the losses stay float32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def as_seen_by_discriminator(fake: Tensor, clip: bool) -> Tensor:
    """Generated images as D sees them: with `clip` (`train.quality_clip`), clipped to the data range [-1, 1] as a
    saved sample is (`data.to_levels`), so that D cannot tell them apart by values no saved image has and no
    gradient of L_Q reaches a pixel beyond the range; else as they are."""
    return fake.clamp(-1, 1) if clip else fake


def discriminator_step(disc: nn.Module, opt: torch.optim.Optimizer, real: Tensor, fake: Tensor,
                       augment_policy: tuple[str, ...] = (), r1_gamma: float = 0.0, precision: str = "fp32",
                       clip: bool = False) -> dict:
    """One BCE step of D on dequantized real images against model samples (real = 1, model = 0).

    Real and generated images go through the same differentiable augmentation and through D in one call (one
    spectral-norm power iteration per step). With `r1_gamma > 0` the R1 penalty gamma/2 E|grad_x D(x)|^2 on the
    real images is added (Mescheder et al. 2018). `fake` is detached here: D's step never reaches the model.
    `clip`: `as_seen_by_discriminator`; `fake_out_of_range` is the share of generated pixels beyond the data
    range, clipped or not.
    """
    opt.zero_grad(set_to_none=True)
    fake = fake.detach()
    out_of_range = beyond_range(fake).float().mean()
    fake = as_seen_by_discriminator(fake, clip)
    if r1_gamma > 0:
        real = real.detach().requires_grad_(True)
    with autocast(real.device, precision):  # augmented apart: the per-sample draws follow the batch's rows
        logits = disc(torch.cat([augment(real, augment_policy), augment(fake, augment_policy)]))
    real_logits, fake_logits = logits[: len(real)], logits[len(real) :]
    loss = losses.discriminator_bce(real_logits, fake_logits)
    stats = {}
    if r1_gamma > 0:
        (grad,) = torch.autograd.grad(real_logits.sum(), real, create_graph=True)
        penalty = grad.square().flatten(1).sum(1).mean()
        loss = loss + r1_gamma / 2 * penalty
        stats["r1_penalty"] = penalty.detach()
    loss.backward()
    distributed.average_parameter_gradients(disc.parameters())
    opt.step()
    return stats | {
        "loss_d": loss.detach(),
        "d_acc_real": (real_logits > 0).float().mean().detach(),
        "d_acc_fake": (fake_logits < 0).float().mean().detach(),
        "fake_out_of_range": out_of_range,
    }


def grad_norm(grads) -> Tensor:
    """The global norm sqrt(sum ||g||^2) of gradient tensors (None entries, parameters a loss does not reach, are
    skipped), detached."""
    return torch.sqrt(sum(g.square().sum() for g in grads if g is not None)).detach()


def adaptive_weight(norm_coverage: Tensor, norm_quality: Tensor, quality_weight: float, max_weight: float,
                    eps: float = ADAPTIVE_EPS) -> Tensor:
    """w = lambda ||grad_W L_C|| / (||grad_W L_Q|| + eps), clamped to [0, max_weight] and detached.

    `W` is the decoder's output layer, or the flow's parameters when L_Q reaches only the flow
    (`adaptive_reference`): with lambda = 1 the adversarial gradient there has the norm of the likelihood's
    (the adaptive weight of VQGAN and of latent-diffusion autoencoders). The training step gives the two norms
    from the losses' full gradients, which it needs anyway (`generator_step`).
    """
    return (quality_weight * norm_coverage / (norm_quality + eps)).clamp(0, max_weight).detach()


def adaptive_reference(model: nn.Module, tc: TrainConfig) -> list[nn.Parameter]:
    """The parameters whose gradient norms set the adaptive weight: the decoder's output layer, or, when L_Q
    reaches only the flow (`train.quality_decoder=false`), all of the flow's parameters."""
    if tc.quality_decoder:
        return [model.decoder.last.weight]
    return [p for p in model.likelihood.flow.parameters() if p.requires_grad]


def generating_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters both losses reach: the decoder and the flow (not the encoder, which L_Q never sees)."""
    return [p for name, p in model.named_parameters() if not name.startswith("encoder.") and p.requires_grad]


def quality_parameters(model: nn.Module, tc: TrainConfig) -> list[nn.Parameter]:
    """The parameters L_Q's gradient is taken for: `generating_parameters`, less the flow's with
    `train.quality_flow=false` (the samples still pass through f^-1, whose parameters then get L_C's gradient
    only). With `train.quality_decoder=false` the decoder's are listed but get none: the samples' graph is cut."""
    if tc.quality_flow:
        return generating_parameters(model)
    flow = {id(p) for p in model.likelihood.flow.parameters()}
    return [p for p in generating_parameters(model) if id(p) not in flow]


def generator_forward(model: nn.Module, x: Tensor | None, num_samples: int, batched: bool = True,
                      sigma_grad: bool = True, decoder_grad: bool = True,
                      mean_grad: bool = True) -> tuple[ElboTerms | None, Tensor | None]:
    """The model's half of a step: ELBO terms of `x` (None: no L_C) and `num_samples` samples with their graph
    (0: no L_Q), with one decoder call for both unless `batched` is False (`VAE.elbo_and_sample`).
    `sigma_grad=False` (`train.quality_sigma`): the samples' graph does not reach the decoder's sigma;
    `mean_grad=False` (`train.quality_mean`): it does not reach the decoder's mu;
    `decoder_grad=False` (`train.quality_decoder`): it reaches neither mu nor sigma, only the flow."""
    switches = (("sigma_grad", sigma_grad), ("decoder_grad", decoder_grad), ("mean_grad", mean_grad))
    kwargs = {k: False for k, v in switches if not v}
    # (the GAN and NVP models have no decoder noise to detach: only non-default switches are passed)
    if x is not None and num_samples:
        return model.elbo_and_sample(x, num_samples, batched=batched, **kwargs)
    if x is not None:
        return model.elbo(x), None
    return None, model.sample(num_samples, **kwargs) if num_samples else None


def losses_apart(tc: TrainConfig, measure: bool) -> bool:
    """Whether L_C and L_Q are differentiated apart, one backward pass each: the adaptive weight, the logged
    gradient norms and `train.quality_flow=false` (L_Q's gradient for some parameters only) need them apart.
    The forward is then made with two decoder calls (`generator_forward(batched=False)`), so that neither
    backward runs through the other loss's half."""
    return tc.balance == "adaptive" or measure or not tc.quality_flow


def generator_step(model: nn.Module, disc: nn.Module | None, opt: torch.optim.Optimizer, x: Tensor,
                   tc: TrainConfig, quality_weight: float, measure: bool = False,
                   forward: tuple[ElboTerms | None, Tensor | None] | None = None) -> dict:
    """One step on the generator objective of `tc.balance` (DESIGN section 3); returns detached stats.

        fixed:     coverage_weight * L_C + lambda * L_Q            (nats per image; the paper's setting at lambda 1)
        per_dim:   coverage_weight * L_C / (D ln 2) + lambda * L_Q (L_C in bits/dim)
        adaptive:  coverage_weight * L_C + w * L_Q, w = `adaptive_weight` on `adaptive_reference`

    `quality_weight` is lambda at this step (0 during the warm-up). `forward` is `generator_forward`'s result
    when the step already made it (the training step shares its samples with the D step), made with
    `batched=not losses_apart(tc, measure)`; else it is made here, with as many samples as `x` has rows.
    With `measure`, the norms of the gradients of L_C and of L_Q (both in nats per image, unweighted) on the
    decoder and flow are returned too. `quality_weight_effective` is the weight of L_Q in units of L_C in nats;
    `grad_norm` is the norm of the whole gradient before clipping (the training step watches it: a finite loss
    can still have a non-finite gradient).
    """
    adversarial = quality_weight > 0 and disc is not None
    if forward is None:
        with autocast(x.device, tc.precision):
            forward = generator_forward(model, x if tc.coverage_weight > 0 else None,
                                        x.shape[0] if adversarial else 0, batched=not losses_apart(tc, measure),
                                        sigma_grad=tc.quality_sigma, decoder_grad=tc.quality_decoder,
                                        mean_grad=tc.quality_mean)
    terms, fake = forward
    stats, loss_coverage, loss_quality = {}, None, None
    coverage_scale = tc.coverage_weight / (math.prod(x.shape[1:]) * math.log(2) if tc.balance == "per_dim" else 1)
    if terms is not None:
        nats = coverage_nats(terms, tc.free_nats)
        loss_coverage = coverage_scale * nats
        stats |= {"loss_coverage": nats.detach(), "bpd": model.bits_per_dim(terms.elbo.detach()).mean(),
                  "kl": terms.kl.detach().mean(), "sigma_at_floor": terms.sigma_at_floor}
        if terms.sigma_mean is not None:  # in grey levels (one level is 2 / levels wide in model space)
            stats["sigma_levels"] = terms.sigma_mean * model.levels / 2
    if adversarial:
        with frozen(disc), autocast(x.device, tc.precision):  # gradients reach the decoder and flow, not D
            loss_quality = losses.quality_loss(disc(augment(as_seen_by_discriminator(fake, tc.quality_clip),
                                                            tc.augment_policy)))
        stats["loss_quality"] = loss_quality.detach()
    opt.zero_grad(set_to_none=True)
    if loss_coverage is not None and loss_quality is not None and losses_apart(tc, measure):
        stats |= _backward_apart(model, loss_coverage, loss_quality, tc, quality_weight, coverage_scale, measure)
    else:  # one backward pass of the weighted sum: the weight is known before it
        weighted = [loss for loss in (loss_coverage, None if loss_quality is None else quality_weight * loss_quality)
                    if loss is not None]
        sum(weighted).backward()
        distributed.average_parameter_gradients(model.parameters())
        if loss_quality is not None:
            stats["quality_weight_effective"] = torch.as_tensor(
                quality_weight / coverage_scale if loss_coverage is not None else quality_weight)
    max_norm = tc.grad_clip if tc.grad_clip > 0 else math.inf  # inf: the norm is measured, nothing clipped
    stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).detach()
    opt.step()
    return stats


def _backward_apart(model: nn.Module, loss_coverage: Tensor, loss_quality: Tensor, tc: TrainConfig,
                    quality_weight: float, coverage_scale: float, measure: bool) -> dict:
    """.grad = grad L_C + w grad L_Q from one backward pass per loss, with w = lambda or the adaptive weight of
    the global (rank-averaged) gradients; with `measure`, the two gradients' norms on the shared parameters
    (L_C's in nats per image: without `coverage_scale`, the per-dim scale and coverage_weight). The forward was
    made unbatched for this path, so nothing is retained between the passes (compiled networks require it)."""
    params = [p for p in model.parameters() if p.requires_grad]
    shared, reached = generating_parameters(model), quality_parameters(model, tc)
    grads_c = torch.autograd.grad(loss_coverage, params, allow_unused=True)
    grads_q = torch.autograd.grad(loss_quality, reached, allow_unused=True)
    averaged = distributed.average_gradients([*grads_c, *grads_q])
    grads_c, grads_q = averaged[: len(grads_c)], averaged[len(grads_c) :]
    by_param = dict(zip(params, grads_c, strict=True))
    stats = {}
    weight = torch.as_tensor(quality_weight, dtype=loss_quality.dtype, device=loss_quality.device)
    if tc.balance == "adaptive":
        reference = adaptive_reference(model, tc)
        weight = adaptive_weight(grad_norm([by_param[p] for p in reference]),
                                 grad_norm([grads_q[_index(reached, p)] for p in reference]),
                                 quality_weight, tc.quality_weight_max)
    if measure:  # before the sum below, which reuses L_C's gradient tensors
        stats["grad_norm_coverage"] = grad_norm([by_param[p] for p in shared]) / coverage_scale
        stats["grad_norm_quality"] = grad_norm(grads_q)
    for p, g in zip(params, grads_c, strict=True):
        p.grad = _layout_of(p, g)
    for p, g in zip(reached, grads_q, strict=True):
        if g is not None:
            p.grad = _layout_of(p, weight * g) if p.grad is None else p.grad.add_(weight * g)
    return stats | {"quality_weight_effective": weight / coverage_scale}


def _layout_of(p: nn.Parameter, g: Tensor | None) -> Tensor | None:
    """`g` with the parameter's memory layout (as .backward() would store it; fused Adam requires it)."""
    if g is None or g.stride() == p.stride():
        return g
    return torch.empty_like(p).copy_(g)


def _index(params: list[nn.Parameter], target: nn.Parameter) -> int:
    return next(i for i, p in enumerate(params) if p is target)


def training_step(run: Run, data: ImageData) -> dict:
    """Advance `run` by one step; returns the step's detached statistics.

    One batch of samples, made with the ELBO's decoder call, serves the first D step (detached) and then the
    generator step, re-scored by the updated D (as in DCGAN's reference loop). It has
    `train.quality_batch_size` images (default: the batch size), as has each D step's real batch; L_C always
    uses the whole batch. Further D steps (`train.d_steps` > 1) draw their own samples. Non-finite losses are
    recorded on the device (`run.guard`) and raised at the next log step or checkpoint, so the step has no host
    sync. Under torchrun each rank runs its rows of the global batch and the gradients are averaged
    (`cqf.distributed`).
    """
    cfg, tc, step = run.cfg, run.cfg.train, run.step
    # Reseed from (seed, step): dequantization, z and decoder noise are exact on resume.
    torch.manual_seed(cfg.seed * 1_000_003 + step)
    quality_weight = quality_weight_at(cfg, step)
    with distributed.shard():
        stats = _sharded_step(run, data, quality_weight)
    run.guard.watch(step, **{k: stats[k] for k in ("loss_coverage", "loss_quality", "grad_norm") if k in stats})
    if quality_weight > 0 and not cfg.is_gan:
        stats["quality_weight"] = quality_weight
    if run.ema is not None:
        images = (step + 1) * tc.batch_size  # after this step
        ema_update(run.ema, run.model, ema_beta(tc.batch_size, tc.ema_halflife_kimg, images, tc.ema_rampup))
    run.step += 1
    return stats


def _to_device(x: Tensor, device: torch.device) -> Tensor:
    """A batch made on the host, to the device; to a GPU through pinned memory, so that the copy does not wait
    for the kernels already queued (a copy from pageable memory would: a host sync per step)."""
    if device.type != "cuda":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


def _sharded_step(run: Run, data: ImageData, quality_weight: float) -> dict:
    """The D and G steps on this rank's rows of the global batch (all of it in a single process)."""
    cfg, tc, step = run.cfg, run.cfg.train, run.step
    adversarial = quality_weight > 0 and run.disc is not None
    num_train, stats = len(data.x_train), {}
    idx = batch_indices(step, num_train, tc.batch_size, cfg.seed)
    x = _to_device(distributed.shard_rows(dequantize(data.x_train[idx], data.levels)), run.device)
    measure = (step + 1) % tc.log_every == 0 or step + 1 == tc.steps  # the balance is logged at the log interval
    num_fake = distributed.local_rows(min(tc.quality_batch, num_train))  # as many as the D step's real images
    with autocast(run.device, tc.precision):
        forward = generator_forward(run.model, x if tc.coverage_weight > 0 else None, num_fake if adversarial else 0,
                                    batched=not losses_apart(tc, measure), sigma_grad=tc.quality_sigma,
                                    decoder_grad=tc.quality_decoder, mean_grad=tc.quality_mean)
    if adversarial:
        for i in range(tc.d_steps):
            idx_d = batch_indices(step * tc.d_steps + i, num_train, tc.quality_batch, cfg.seed + 1)
            x_real = _to_device(distributed.shard_rows(dequantize(data.x_train[idx_d], data.levels)), run.device)
            if i == 0:
                fake = forward[1].detach()
            else:
                with torch.no_grad(), autocast(run.device, tc.precision):
                    fake = run.model.sample(num_fake)
            stats |= discriminator_step(run.disc, run.opt_d, x_real, fake, tc.augment_policy, tc.r1_gamma,
                                        tc.precision, tc.quality_clip)
            run.guard.watch(step, loss_d=stats["loss_d"])  # every D step; its weights reach L_Q in this step's G step
    return stats | generator_step(run.model, run.disc, run.opt_g, x, tc, quality_weight, measure,
                                  forward=forward)
