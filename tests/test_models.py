"""Models: shapes, gradients, IWAE vs ELBO, train/eval parity, overfitting, save/load."""

import pytest
import torch
from torch import nn
from torch.distributions import MultivariateNormal

from cqf import checkpoint, losses
from cqf.config import ModelConfig
from cqf.models import VAE, build_model

from .conftest import bits_per_dim_after_fitting, check_elbo_and_sample_match_two_calls

SHAPE = (1, 8, 8)


def make(flow: bool, levels: int = 17) -> VAE:
    cfg = ModelConfig(latent_dim=4, channels=8, flow_couplings=2 if flow else 0, flow_hidden=8)
    model = build_model(cfg, SHAPE, levels)
    model.elbo(torch.rand(16, *SHAPE) * 2 - 1)  # data-dependent ActNorm init, as in training
    return model


@pytest.fixture(params=[False, True], ids=["vae", "vae_f"])
def model(request):
    return make(request.param)


def test_elbo_terms_are_per_sample(model):
    terms = model.elbo(torch.rand(5, *SHAPE) * 2 - 1)
    assert terms.log_px_z.shape == terms.kl.shape == terms.elbo.shape == (5,)
    assert (terms.kl >= 0).all()


def test_sample_shape(model):
    assert model.sample(7).shape == (7, *SHAPE)


def test_flow_switch():
    assert make(flow=False).flow.__class__.__name__ == "Identity"
    assert len(list(make(flow=True).flow.parameters())) > 0


def test_every_parameter_gets_a_gradient_from_the_elbo(model):
    with torch.no_grad():  # move the zero-initialised last coupling layers off zero
        for p in model.flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
    (-model.elbo(torch.rand(4, *SHAPE) * 2 - 1).elbo.mean()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_iwae_bound_is_at_or_below_the_elbo_in_bits_per_dim(model):
    x = torch.rand(32, *SHAPE) * 2 - 1
    elbo_bpd = torch.stack([model.bits_per_dim(model.elbo(x).elbo) for _ in range(20)]).mean()
    iwae_bpd = model.bits_per_dim(model.log_prob(x, num_importance=50)).mean()
    assert iwae_bpd <= elbo_bpd
    # K = 1 is the ELBO in expectation
    one = torch.stack([model.bits_per_dim(model.log_prob(x, num_importance=1)) for _ in range(20)]).mean()
    torch.testing.assert_close(one, elbo_bpd, atol=0.05, rtol=0)


class _Linear(nn.Module):
    """v -> (v A^T + c reshaped to `shape`, a fixed second output): linear encoders and decoders."""

    def __init__(self, weight, bias, second, shape):
        super().__init__()
        self.weight, self.bias, self.second, self.shape = nn.Parameter(weight), nn.Parameter(bias), second, shape

    def forward(self, v):
        out = (v.flatten(1) @ self.weight.T + self.bias).view(-1, *self.shape)
        return out, self.second.expand_as(out)


def linear_gaussian_vae(encoder_error: float = 0.0):
    """z ~ N(0, I_4), x = W z + b + sigma eps on 1x8x8 images, W with orthogonal columns, so that
    p(x) = N(b, W W^T + sigma^2 I) in closed form and the exact posterior is a diagonal Gaussian."""
    from cqf import flows
    from cqf.models import FlowGaussian

    dims, latent, sigma, floor = 64, 4, 0.3, 0.01
    basis, _ = torch.linalg.qr(torch.randn(dims, latent))
    scales = torch.tensor([2.0, 1.0, 0.7, 0.4])
    weight, bias = basis * scales, 0.1 * torch.randn(dims)
    post_var = 1 / (1 + scales**2 / sigma**2)  # (I + W^T W / sigma^2)^-1, diagonal
    enc_weight = post_var[:, None] * weight.T / sigma**2
    enc_weight = enc_weight + encoder_error * torch.randn_like(enc_weight)
    raw = torch.log(torch.expm1(torch.tensor(sigma - floor)))  # sigma = floor + softplus(raw)
    model = VAE(_Linear(enc_weight, -enc_weight @ bias, 0.5 * post_var.log()[None], (latent,)),
                _Linear(weight, bias, raw, SHAPE), FlowGaussian(flows.Identity(), floor), latent, SHAPE, 17)
    marginal = MultivariateNormal(bias, weight @ weight.T + sigma**2 * torch.eye(dims))
    return model, marginal


@pytest.mark.parametrize("k", [1, 5, 30])
def test_iwae_with_the_exact_posterior_is_the_exact_log_likelihood(k):
    """With q(z|x) = p(z|x) every importance weight equals p(x): IWAE-K = ln p(x) exactly, for every K."""
    model, marginal = linear_gaussian_vae()
    x = marginal.sample((6,)).view(6, *SHAPE)
    torch.testing.assert_close(model.log_prob(x, num_importance=k), marginal.log_prob(x.flatten(1)),
                               rtol=0, atol=1e-9)


def test_iwae_tightens_towards_the_exact_log_likelihood():
    model, marginal = linear_gaussian_vae(encoder_error=0.05)
    x = marginal.sample((32,)).view(32, *SHAPE)
    exact = marginal.log_prob(x.flatten(1)).mean()
    gaps = [exact - model.log_prob(x, num_importance=k).mean() for k in (1, 10, 200)]
    assert gaps[0] > gaps[1] > gaps[2] > -0.01  # a lower bound that tightens with K
    assert gaps[2] < 0.1 * gaps[0]


def test_samples_keep_the_decoder_noise_in_feature_space():
    """x = f^-1(mu + sigma eps): mapped back through f, samples of one z are N(mu(z), sigma(z)^2) per dimension."""
    model = make(flow=True)
    with torch.no_grad():
        for p in model.flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
    z = torch.randn(1, model.latent_dim).expand(4000, -1)
    with torch.no_grad():
        y, _ = model.flow(model.sample(4000, z=z))
        mean, raw_scale = model.decoder(z[:1])
    standardized = (y - mean) / model.likelihood.log_scale(raw_scale).exp()
    assert standardized.mean().abs() < 0.02
    assert standardized.std().item() == pytest.approx(1.0, abs=0.02)


def test_train_and_eval_mode_agree(model):
    x = torch.rand(4, *SHAPE) * 2 - 1
    torch.manual_seed(1)
    train_elbo = model.train().elbo(x).elbo
    torch.manual_seed(1)
    eval_elbo = model.eval().elbo(x).elbo
    torch.testing.assert_close(train_elbo, eval_elbo, rtol=0, atol=0)


def test_decoder_sigma_respects_the_floor():
    model = make(flow=False, levels=17)
    raw = torch.full((2, *SHAPE), -50.0)
    sigma = model.likelihood.log_scale(raw).exp()
    torch.testing.assert_close(sigma, torch.full_like(sigma, 1 / 17))  # pinned at the floor, not below


def test_tiny_model_overfits_one_batch(model):
    start, end = bits_per_dim_after_fitting(model, SHAPE, 100)
    assert end < start - 1.0


def test_bits_per_dim_of_uniform_images_under_the_model_unit():
    model = make(flow=False, levels=256)
    log_p = torch.full((3,), -64 * torch.log(torch.tensor(2.0)).item())
    torch.testing.assert_close(model.bits_per_dim(log_p), losses.bits_per_dim(log_p, 64, 256))
    torch.testing.assert_close(model.bits_per_dim(log_p), torch.full((3,), 8.0))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_save_then_load_gives_identical_outputs(tmp_path, model, suffix):
    from cqf.config import Config, DataConfig, TrainConfig, to_dict

    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    flow = model.flow.__class__.__name__ != "Identity"
    cfg = Config(DataConfig(), ModelConfig(latent_dim=4, channels=8, flow_couplings=2 if flow else 0, flow_hidden=8),
                 TrainConfig())
    meta = {"image_shape": list(SHAPE), "levels": 17}
    path = tmp_path / f"model{suffix}"
    if suffix == ".pt":
        checkpoint.save(path, model=model, config=to_dict(cfg), step=0, **meta)
    else:
        checkpoint.save_safetensors(path, model, cfg, **meta)
    loaded = checkpoint.load(path).model
    assert not loaded.training
    model.eval()
    x = torch.rand(3, *SHAPE) * 2 - 1
    torch.manual_seed(5)
    expected = model.elbo(x).elbo, model.sample(2)
    torch.manual_seed(5)
    got = loaded.elbo(x).elbo, loaded.sample(2)
    for a, b in zip(expected, got, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_elbo_and_sample_equal_elbo_then_sample(model):
    """One decoder call on the posterior and prior z together gives what the two calls give, draw for draw."""
    check_elbo_and_sample_match_two_calls(model, SHAPE)


def test_decoder_noise_share_closed_forms():
    """Without a flow the noise adds E[sigma^2] around each mean image; with a constant decoder mean all of the
    samples' pixel variance is noise (share 1)."""
    from cqf.quality import decoder_noise_share

    torch.manual_seed(0)
    model = build_model(ModelConfig(latent_dim=4, channels=8, flow_couplings=0), (1, 8, 8), 17)
    with torch.no_grad():
        for p in model.decoder.parameters():
            p.add_(0.3 * torch.randn_like(p))  # sigma varies with z and over pixels
    share = decoder_noise_share(model, num=4000, seed=1)
    torch.manual_seed(2)
    _, raw_scale = model.decoder(torch.randn(4000, 4))
    expected = model.likelihood.log_scale(raw_scale).exp().square().mean().item()
    assert share["noise"] == pytest.approx(expected, rel=0.03)
    assert share["total"] == pytest.approx(share["means"] + share["noise"], rel=0.03)
    assert 0 < share["noise_share"] < 1
    with torch.no_grad():
        last = model.decoder.last
        last.weight[:1].zero_()  # the mean's output channel: mu(z) = bias, the same image for every z
    constant = decoder_noise_share(model, num=2000, seed=1)
    assert constant["means"] == pytest.approx(0.0, abs=1e-12)
    assert constant["noise_share"] == pytest.approx(1.0, rel=0.03)
