"""Schedules: what a step's number decides, as pure functions of the config and the step.

The EMA's decay follows a half-life in images (with StyleGAN2-ADA's ramp-up); lambda follows the hybrid's
warm-up, ramp and `train.quality_every` (DESIGN section 3). Being functions of the step, they make a resumed
run continue exactly as an uninterrupted one.
"""

from __future__ import annotations

from .config import Config

__all__ = ["ema_beta", "quality_started", "quality_weight_at"]


def ema_beta(batch_size: int, halflife_kimg: float, images_seen: int | None = None, rampup: float = 0.0) -> float:
    """Per-step EMA decay from a half-life in images, so that it does not change with batch size.

    With `rampup > 0` the half-life is at most `rampup` times the images seen so far (StyleGAN2-ADA's EMA
    ramp-up): early in training, when the weights move fast, the average does not lag thousands of images.
    """
    halflife = halflife_kimg * 1000
    if rampup > 0 and images_seen is not None:
        halflife = min(halflife, rampup * images_seen)
    return 0.5 ** (batch_size / halflife) if halflife > 0 else 0.0


def quality_weight_at(cfg: Config, step: int) -> float:
    """lambda at `step`: 0 during a hybrid's warm-up, then rising linearly over `quality_ramp_steps`, then
    `quality_weight`; after the warm-up, 0 too on the steps between adversarial ones (`quality_every` k: L_Q
    and D train when k divides step + 1, so that the log steps, multiples of k, are adversarial). lambda is
    not rescaled by k: it weighs L_Q on the steps that have it. A GAN has no warm-up: lambda from its first
    step."""
    tc = cfg.train
    if cfg.is_gan or tc.quality_weight == 0:
        return tc.quality_weight
    if step < tc.warmup_steps or (step + 1) % tc.quality_every:
        return 0.0
    if tc.quality_ramp_steps > 0:
        return tc.quality_weight * min(1.0, (step - tc.warmup_steps + 1) / tc.quality_ramp_steps)
    return tc.quality_weight


def quality_started(cfg: Config, step: int) -> bool:
    """Whether the warm-up is over at `step` (a GAN has none): from here L_Q trains, on every
    `quality_every`-th step."""
    return cfg.has_discriminator and (cfg.is_gan or step >= cfg.train.warmup_steps)
