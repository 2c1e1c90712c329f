"""Losses against closed forms and torch.distributions."""

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from cqf import losses
from cqf.data import dequantize


@pytest.mark.parametrize("levels", [256, 17, 2])
def test_uniform_model_gives_log2_levels_bits_per_dim(levels):
    num_dims = 3 * 8 * 8
    log_p_uniform = torch.full((5,), -num_dims * math.log(2.0))  # density 1/2 per dim on (-1, 1)
    bpd = losses.bits_per_dim(log_p_uniform, num_dims, levels)
    torch.testing.assert_close(bpd, torch.full((5,), math.log2(levels)), rtol=0, atol=1e-12)


def test_eight_bit_formula_of_design_doc():
    log_p, num_dims = torch.tensor([-1234.5]), 3072
    expected = (-log_p + num_dims * math.log(128)) / (num_dims * math.log(2))
    torch.testing.assert_close(losses.bits_per_dim(log_p, num_dims, 256), expected, rtol=0, atol=1e-12)


def test_gaussian_log_prob_matches_torch_distributions():
    x, mean, log_scale = torch.randn(3, 2, 4), torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    expected = Normal(mean, log_scale.exp()).log_prob(x)
    torch.testing.assert_close(losses.diag_gaussian_log_prob(x, mean, log_scale), expected, rtol=0, atol=1e-12)
    z = torch.randn(3, 5)
    torch.testing.assert_close(losses.standard_normal_log_prob(z), Normal(0.0, 1.0).log_prob(z).sum(1))


def test_kl_matches_torch_distributions():
    mean, log_scale = torch.randn(6, 10), 0.5 * torch.randn(6, 10)
    expected = kl_divergence(Normal(mean, log_scale.exp()), Normal(0.0, 1.0)).sum(1)
    torch.testing.assert_close(losses.kl_to_standard_normal(mean, log_scale), expected, rtol=0, atol=1e-12)


def test_discriminator_bce_and_quality_loss_closed_forms():
    real, fake = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0])
    sig = torch.sigmoid
    expected_d = -(torch.log(sig(real)).mean() + torch.log(1 - sig(fake)).mean())
    torch.testing.assert_close(losses.discriminator_bce(real, fake), expected_d)
    d = sig(fake)
    torch.testing.assert_close(losses.quality_loss(fake), -torch.log(d / (1 - d)).mean())


def test_dequantized_data_fill_the_open_interval_uniformly():
    levels = 17
    k = torch.arange(levels).repeat(2000)
    x = dequantize(k, levels)
    assert x.min() > -1 and x.max() < 1
    # each level k maps to [2k/levels - 1, 2(k+1)/levels - 1)
    lower = 2 * k / levels - 1
    assert ((x >= lower) & (x < lower + 2 / levels)).all()


def test_histogram_baseline_closed_forms():
    from cqf.likelihood import histogram_bits_per_dim

    levels, n = 17, 30
    constant = torch.full((n, 1, 2, 2), 3, dtype=torch.uint8)  # every pixel at level 3
    expected = -math.log2((n + 1) / (n + levels))  # add-one smoothing
    assert histogram_bits_per_dim(constant, constant[:5], levels) == pytest.approx(expected, abs=1e-12)
    unseen = torch.full((5, 1, 2, 2), 4, dtype=torch.uint8)  # a level never seen in training
    assert histogram_bits_per_dim(constant, unseen, levels) == pytest.approx(math.log2(n + levels), abs=1e-12)
    # per dimension: pixel 0 always 0, pixel 1 alternates 0/1 in training; test image (0, 1)
    train = torch.tensor([[0, 0], [0, 1]] * 10, dtype=torch.uint8).view(20, 1, 1, 2)
    test = torch.tensor([[0, 1]], dtype=torch.uint8).view(1, 1, 1, 2)
    p0, p1 = (20 + 1) / (20 + 2), (10 + 1) / (20 + 2)
    assert histogram_bits_per_dim(train, test, 2) == pytest.approx(-(math.log2(p0) + math.log2(p1)) / 2, abs=1e-12)
