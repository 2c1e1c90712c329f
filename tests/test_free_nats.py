"""`train.free_nats`: the KL term of L_C is max(batch-mean KL, free_nats) in training, bits/dim stay the ELBO's."""

import dataclasses

import pytest
import torch

from cqf import config as cqf_config
from cqf import distributed
from cqf.config import TrainConfig
from cqf.models import ElboTerms
from cqf.step import coverage_nats, training_step

from .conftest import tiny_config
from .test_adversarial import _gradients, build, variant_config


def _step(model, x, free_nats):
    """One likelihood-only generator step's gradients and stats (`_gradients`: lr 0, the same draws every call)."""
    return _gradients(model, None, TrainConfig(free_nats=free_nats, grad_clip=0.0), 0.0, x)


def _reconstruction_gradients(model, x):
    """The gradient of -E[ln p(x|z)] alone (the KL left out), with the same draws as `_step`."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)  # `_gradients`' seed
    (-model.elbo(x).log_px_z.mean()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["VAE", "VAE-F"])
def test_below_the_threshold_the_kl_has_no_gradient_and_above_it_the_elbo_is_unchanged(name):
    _, model, _ = build(name)
    x = torch.rand(8, *model.image_shape) * 2 - 1
    torch.manual_seed(3)
    kl = model.elbo(x).kl.mean().item()
    assert kl > 0
    plain, _ = _step(model, x, 0.0)
    clamped, _ = _step(model, x, 10 * kl)  # the batch's KL is below the threshold
    unclamped, _ = _step(model, x, 0.1 * kl)  # ... and above it
    reconstruction = _reconstruction_gradients(model, x)
    encoder_moved = False
    for n, grad in plain.items():
        torch.testing.assert_close(clamped[n], reconstruction[n], rtol=1e-10, atol=1e-12, msg=n)
        torch.testing.assert_close(unclamped[n], grad, rtol=1e-10, atol=1e-12, msg=n)
        if n.startswith("encoder."):
            encoder_moved |= (clamped[n] - grad).abs().max().item() > 1e-6 * grad.abs().max().item()
        else:  # the KL depends on the encoder alone
            torch.testing.assert_close(clamped[n], grad, rtol=1e-10, atol=1e-12, msg=n)
    assert encoder_moved


def test_bits_per_dim_stay_the_true_elbo_and_the_logged_loss_is_the_objective():
    _, model, _ = build("VAE-F")
    x = torch.rand(8, *model.image_shape) * 2 - 1
    _, plain = _step(model, x, 0.0)
    _, freed = _step(model, x, 1e3)
    torch.manual_seed(3)
    terms = model.elbo(x)
    assert freed["bpd"].item() == pytest.approx(plain["bpd"].item(), rel=1e-12)
    assert freed["kl"].item() == pytest.approx(terms.kl.mean().item(), rel=1e-12)
    assert freed["loss_coverage"].item() == pytest.approx(-terms.log_px_z.mean().item() + 1e3, rel=1e-12)
    assert coverage_nats(terms).item() == pytest.approx(-terms.elbo.mean().item(), rel=1e-12)


@pytest.mark.parametrize("other_rank_kl, kl_has_gradient", [(30.0, True), (5.0, False)])
def test_under_torchrun_the_global_batch_decides_the_clamp(monkeypatch, other_rank_kl, kl_has_gradient):
    """Two ranks, this one's KL (10) below the threshold (15): the global mean decides, as in one process."""
    monkeypatch.setattr(distributed, "_CONTEXT", distributed.Context(rank=0, world=2))
    monkeypatch.setattr(distributed, "sum_over_ranks", lambda v: v + other_rank_kl)
    kl = torch.full((4,), 10.0, requires_grad=True)
    terms = ElboTerms(torch.zeros(4), kl, torch.tensor(0.0))
    coverage_nats(terms, free_nats=15.0).backward()
    assert kl.grad.abs().sum().item() == (pytest.approx(1.0) if kl_has_gradient else 0.0)


def test_the_training_step_trains_with_free_nats(digits, tmp_path):
    """The run's own step (not only `generator_step` called alone) uses the configured threshold."""
    from cqf.run import build_run

    stats = {}
    for free_nats in (0.0, 1e4):
        cfg = tiny_config(steps=1, free_nats=free_nats)
        torch.manual_seed(0)
        stats[free_nats] = training_step(build_run(cfg, digits, tmp_path / str(free_nats)), digits)
    assert stats[1e4]["loss_coverage"].item() == pytest.approx(
        stats[0.0]["loss_coverage"].item() - stats[0.0]["kl"].item() + 1e4, rel=1e-9)


def test_free_nats_need_a_model_with_an_encoder_and_l_c():
    cfg = variant_config("GAN")
    with pytest.raises(cqf_config.ConfigError, match="free_nats.*this config is GAN"):
        dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, free_nats=64.0))
    nvp = tiny_config(model={"latent_dim": 0, "flow_couplings": 2}, quality_weight=0.0)
    with pytest.raises(cqf_config.ConfigError, match="free_nats.*this config is NVP"):
        dataclasses.replace(nvp, train=dataclasses.replace(nvp.train, free_nats=64.0))
    with pytest.raises(cqf_config.ConfigError, match="train.free_nats must be >= 0"):
        TrainConfig(free_nats=-1.0)
