"""Flows: exact inverse, log-det equal to the autograd Jacobian's, per-sample independence."""

import pytest
import torch

from cqf import flows

C, H, W = 2, 4, 4  # D = 32: Jacobians are cheap

FACTORIES = {
    "coupling_checkerboard": lambda: flows.AffineCoupling(flows.checkerboard(C, H, W, parity=0), hidden=8),
    "coupling_checkerboard_odd": lambda: flows.AffineCoupling(flows.checkerboard(C, H, W, parity=1), hidden=8),
    "coupling_channel": lambda: flows.Sequential(
        flows.Squeeze(), flows.AffineCoupling(flows.channel_mask(4 * C, H // 2, W // 2, parity=1), hidden=8),
        flows.Unsqueeze(),
    ),
    "actnorm": lambda: flows.ActNorm(C),
    "squeeze_unsqueeze": lambda: flows.Sequential(flows.Squeeze(), flows.Unsqueeze()),
    "real_nvp": lambda: flows.real_nvp(C, H, W, num_couplings=2, hidden=8),
    "real_nvp_2_scales": lambda: flows.real_nvp(C, H, W, num_couplings=2, hidden=8, scales=2),
    "real_nvp_no_actnorm": lambda: flows.real_nvp(C, H, W, num_couplings=3, hidden=8, actnorm=False),
    "coupling_residual": lambda: flows.AffineCoupling(flows.checkerboard(C, H, W, parity=0), hidden=8, blocks=2),
    # one coupling per mask type: with 0.3 perturbations the 6 couplings of num_couplings=2 grow |y| to ~1e3,
    # and the float64 round trip loses ~1e-7 (conditioning, not a wrong inverse)
    "real_nvp_residual_2_scales": lambda: flows.real_nvp(C, H, W, num_couplings=1, hidden=8, scales=2, blocks=1),
}


@pytest.fixture(params=list(FACTORIES), ids=list(FACTORIES))
def flow(request):
    flow = FACTORIES[request.param]()
    flow(torch.randn(8, C, H, W))  # data-dependent init (ActNorm), as in training
    with torch.no_grad():  # zero-initialised couplings are the identity: perturb, or the tests are vacuous
        for p in flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return flow.eval()


def test_inverse_is_exact(flow):
    x = torch.randn(5, C, H, W)
    y, logdet = flow(x)
    assert y.shape == x.shape and logdet.shape == (5,)
    torch.testing.assert_close(flow.inverse(y), x, rtol=1e-9, atol=1e-9)


def test_logdet_matches_autograd_jacobian(flow):
    x = torch.randn(1, C, H, W)
    jac = torch.autograd.functional.jacobian(lambda v: flow(v.view_as(x))[0].flatten(), x.flatten())
    torch.testing.assert_close(flow(x)[1][0], torch.linalg.slogdet(jac).logabsdet)


def test_logdet_is_per_sample(flow):
    flow.train()  # train mode: catches layers that mix samples (BatchNorm-style statistics)
    x = torch.randn(4, C, H, W)
    batched = flow(x)[1]
    single = torch.cat([flow(x[i : i + 1])[1] for i in range(4)])
    torch.testing.assert_close(batched, single)


def test_not_identity_after_perturbation(flow):
    if not list(flow.parameters()):
        pytest.skip("parameter-free: a permutation")
    x = torch.randn(2, C, H, W)
    assert not torch.allclose(flow(x)[0], x)


@pytest.mark.parametrize("blocks", [0, 2], ids=["plain", "residual"])
def test_couplings_start_as_identity(blocks):
    flow = flows.real_nvp(C, H, W, num_couplings=2, hidden=8, actnorm=False, blocks=blocks)
    x = torch.randn(3, C, H, W)
    y, logdet = flow(x)
    torch.testing.assert_close(y, x)
    torch.testing.assert_close(logdet, torch.zeros(3))


def test_actnorm_initializes_from_first_batch_once():
    norm = flows.ActNorm(3)
    x = 5 + 3 * torch.randn(64, 3, 4, 4)
    y, _ = norm(x)
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(y.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-5, rtol=0)
    assert bool(norm.state_dict()["initialized"])
    before = norm.bias.detach().clone()
    norm(torch.randn(64, 3, 4, 4))  # a second batch does not re-initialise
    torch.testing.assert_close(norm.bias.detach(), before)


def test_coupling_log_scale_is_bounded():
    coupling = flows.AffineCoupling(flows.checkerboard(1, 4, 4, parity=0), hidden=8, max_log_scale=1.5)
    with torch.no_grad():
        for p in coupling.parameters():
            p.add_(10 * torch.randn_like(p))  # huge raw scales
    _, logdet = coupling(100 * torch.randn(2, 1, 4, 4))
    assert (logdet.abs() <= 1.5 * 8 + 1e-9).all()  # 8 free entries, |s| <= 1.5 each


def test_residual_conditioner_has_the_blocks_asked_for():
    from cqf.resnets import ResBlock

    def num_blocks(coupling):
        return sum(isinstance(m, ResBlock) for m in coupling.net.modules())

    assert num_blocks(flows.AffineCoupling(flows.checkerboard(C, H, W, parity=0), hidden=8, blocks=3)) == 3
    assert num_blocks(flows.AffineCoupling(flows.checkerboard(C, H, W, parity=0), hidden=8)) == 0
    flow = flows.real_nvp(C, H, W, num_couplings=2, hidden=8, scales=2, blocks=2)
    couplings = [m for m in flow.modules() if isinstance(m, flows.AffineCoupling)]
    assert len(couplings) == 6 and all(num_blocks(c) == 2 for c in couplings)


def test_checkerboard_and_channel_masks_partition():
    a, b = flows.checkerboard(3, 4, 4, 0), flows.checkerboard(3, 4, 4, 1)
    torch.testing.assert_close(a + b, torch.ones(3, 4, 4))
    assert a.sum() == 24
    c, d = flows.channel_mask(4, 2, 2, 0), flows.channel_mask(4, 2, 2, 1)
    torch.testing.assert_close(c + d, torch.ones(4, 2, 2))
    assert c[:2].all() and not c[2:].any()


def test_full_size_flow_float32_roundtrip():
    """The CIFAR-size flow in float32 inverts within a tight budget on random images."""
    torch.set_default_dtype(torch.float32)
    flow = flows.real_nvp(3, 32, 32, num_couplings=3, hidden=32, scales=2)
    flow(torch.rand(16, 3, 32, 32) * 2 - 1)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.05 * torch.randn_like(p))
    flow.eval()
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    assert (flow.inverse(flow(x)[0]) - x).abs().max() < 1e-3


def test_actnorm_loaded_uninitialised_state_initialises_again():
    """The host-side flag that spares a device sync per forward follows a loaded `initialized` buffer."""
    norm = flows.ActNorm(3)
    fresh = flows.ActNorm(3).state_dict()
    norm(torch.randn(64, 3, 4, 4))
    norm.load_state_dict(fresh)  # not initialised: the next training forward must initialise from its batch
    y, _ = norm(5 + 3 * torch.randn(64, 3, 4, 4))
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-6, rtol=0)
