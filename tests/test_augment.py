"""DiffAugment transforms: what each does to an image, differentiability, and the R1 penalty."""

import pytest
import torch
from torch import nn

from cqf.augment import augment, color, cutout, translation


def test_translation_is_a_shift_with_zeros_shifted_in():
    x = torch.rand(16, 2, 8, 8) + 1  # strictly positive: zeros can only come from the border
    out = translation(x, ratio=0.25)
    for i in range(len(x)):
        matches = []
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                shifted = torch.zeros_like(x[i])
                src = x[i][:, max(0, -dy) : 8 - max(0, dy), max(0, -dx) : 8 - max(0, dx)]
                shifted[:, max(0, dy) : 8 - max(0, -dy), max(0, dx) : 8 - max(0, -dx)] = src
                matches.append(torch.equal(out[i], shifted))
        assert sum(matches) == 1, i
    assert not torch.equal(out, x)  # 16 images: some shift is non-zero


def test_cutout_zeros_one_square_and_keeps_the_rest():
    x = torch.rand(32, 3, 8, 8) + 1
    out = cutout(x, ratio=0.5)
    zeroed = out == 0
    assert torch.equal(out[~zeroed], x[~zeroed])
    for mask in zeroed[:, 0]:
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        if len(rows):  # a square of side 4, clipped by the border
            assert rows.max() - rows.min() + 1 == len(rows) <= 4 and cols.max() - cols.min() + 1 == len(cols) <= 4
            assert mask.sum() == len(rows) * len(cols)
    assert torch.equal(zeroed[:, 0], zeroed[:, 2])
    assert zeroed.sum() > 0


def test_color_is_an_affine_map_per_image_and_keeps_grey_grey():
    torch.manual_seed(0)
    grey = torch.rand(4, 1, 6, 6).expand(-1, 3, -1, -1)
    out = color(grey)
    assert torch.allclose(out[:, 0], out[:, 1]) and torch.allclose(out[:, 1], out[:, 2])  # saturation is moot
    x = torch.rand(4, 3, 6, 6)
    torch.manual_seed(1)
    a = color(x)
    torch.manual_seed(1)
    b = color(2 * x)  # affine in x with the same random factors: color(2x) - 2 color(x) is constant per image
    offset = b - 2 * a
    assert torch.allclose(offset, offset[:, :1, :1, :1].expand_as(offset), atol=1e-12)
    # one saturation and contrast factor per image, shared by the channels: deviations from the pixel's
    # channel mean are scaled by a single number per image
    ratio = (a - a.mean(1, keepdim=True)) / (x - x.mean(1, keepdim=True))
    assert torch.allclose(ratio, ratio[:, :1, :1, :1].expand_as(ratio), rtol=1e-6)


def test_every_policy_is_differentiable_and_empty_is_identity():
    x = torch.rand(4, 3, 8, 8, requires_grad=True)
    out = augment(x, ("color", "translation", "cutout"))
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert augment(x, ()) is x


def test_r1_penalty_of_a_linear_discriminator_is_the_squared_weight_norm():
    from cqf.step import discriminator_step

    disc = nn.Sequential(nn.Flatten(), nn.Linear(64, 1, bias=False), nn.Flatten(0))

    stats = discriminator_step(disc, torch.optim.SGD(disc.parameters(), lr=0.0), torch.rand(5, 1, 8, 8),
                               torch.zeros(5, 1, 8, 8), r1_gamma=2.0)
    assert stats["r1_penalty"].item() == pytest.approx(disc[1].weight.square().sum().item(), rel=1e-12)
