"""The model zoo: residual networks, IAF posterior, large D, NVP baseline, and sizing at 32, 48 and 64 pixels.

Training and exact resume of each option: tests/test_train.py (ZOO); the flows' residual conditioner:
tests/test_flows.py; the bundled configs: tests/test_adversarial.py.
"""

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cqf import checkpoint, iaf, losses, nets, resnets
from cqf.config import Config, DataConfig, ModelConfig, TrainConfig, check_new_training, from_dict, to_dict
from cqf.errors import ConfigError
from cqf.models import DECODERS, ENCODERS, Generator, build_encoder, build_model
from cqf.nvp import NVP
from cqf.run import build_discriminator

from .conftest import bits_per_dim_after_fitting, check_elbo_and_sample_match_two_calls, tiny_config

SHAPE = (1, 8, 8)
LEVELS = 17

OPTIONS = {  # ModelConfig entries on top of a tiny model
    "resnet": {"arch": "resnet"},
    "resnet_f_iaf": {"arch": "resnet", "flow_couplings": 1, "iaf_steps": 2, "iaf_context": 3, "iaf_hidden": 16},
    "iaf": {"iaf_steps": 3, "iaf_context": 3, "iaf_hidden": 16},
    "flow_blocks": {"flow_couplings": 1, "flow_blocks": 2},
    "nvp": {"latent_dim": 0, "flow_couplings": 1},
}


def model_config(**options) -> ModelConfig:
    return ModelConfig(**{"latent_dim": 4, "channels": 8, "flow_hidden": 8} | options)


def perturb(module: nn.Module, scale: float) -> None:
    """Move every parameter off its init: zero-initialised couplings are the identity, and tests pass vacuously."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))


def make(**options) -> nn.Module:
    model = build_model(model_config(**options), SHAPE, LEVELS)
    model.elbo(torch.rand(16, *SHAPE) * 2 - 1)  # data-dependent ActNorm init, as in training
    perturb(model, 0.05)
    return model


@pytest.fixture(params=list(OPTIONS), ids=list(OPTIONS))
def option(request):
    return request.param


# ---- every option: the model-level invariants of tests/test_models.py ------------------------------------------


def test_elbo_terms_are_per_sample_and_samples_have_image_shape(option):
    model = make(**OPTIONS[option])
    terms = model.elbo(torch.rand(5, *SHAPE) * 2 - 1)
    assert terms.log_px_z.shape == terms.kl.shape == terms.elbo.shape == (5,)
    assert torch.isfinite(terms.elbo).all()
    assert model.sample(3).shape == model.reconstruct(torch.rand(3, *SHAPE) * 2 - 1).shape == (3, *SHAPE)


def test_train_and_eval_mode_agree(option):
    """No BatchNorm or dropout anywhere: the same ELBO and IWAE bound in both modes under the same seed."""
    model = make(**OPTIONS[option])
    x = torch.rand(4, *SHAPE) * 2 - 1
    results = []
    for mode in (True, False):
        model.train(mode)
        torch.manual_seed(1)
        results.append((model.elbo(x).elbo, model.log_prob(x, 3)))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_elbo_and_sample_equal_elbo_then_sample(option):
    """One decoder call on the posterior and prior z together (with IAF too) gives the two calls' results."""
    check_elbo_and_sample_match_two_calls(make(**OPTIONS[option]), SHAPE)


def test_every_parameter_gets_a_gradient_from_the_elbo(option):
    model = make(**OPTIONS[option])
    (-model.elbo(torch.rand(4, *SHAPE) * 2 - 1).elbo.mean()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_save_then_load_gives_identical_outputs(tmp_path, option):
    model = make(**OPTIONS[option]).eval()
    cfg = Config(DataConfig(), model_config(**OPTIONS[option]), TrainConfig())
    checkpoint.save(tmp_path / "m.pt", model=model, config=to_dict(cfg), step=0, image_shape=list(SHAPE),
                    levels=LEVELS)
    loaded = checkpoint.load(tmp_path / "m.pt").model
    x = torch.rand(3, *SHAPE) * 2 - 1
    outputs = []
    for m in (model, loaded):
        torch.manual_seed(5)
        outputs.append((m.elbo(x).elbo, m.log_prob(x, 2), m.sample(2)))
    for a, b in zip(*outputs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_tiny_model_overfits_one_batch(option):
    """Bits/dim drops by > 1 in 200 steps (the residual nets leave the tiny model's first plateau after ~120
    steps at this learning rate, the conv nets after ~75: tests/test_models.py's 100 steps would not do).
    In float32, as in training: 200 steps of float64 convolutions take tens of seconds on a shared CPU."""
    torch.set_default_dtype(torch.float32)
    start, end = bits_per_dim_after_fitting(make(**OPTIONS[option]), SHAPE, 200)
    assert end < start - 1.0


# ---- residual encoder and decoder ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", list(ENCODERS))
def test_networks_are_per_sample_in_training_mode(arch):
    """An image's outputs do not depend on the rest of its batch in train mode (BatchNorm would break this)."""
    encoder = ENCODERS[arch]((3, 16, 16), 4, 8, context_dim=2).train()
    decoder = DECODERS[arch]((3, 16, 16), 4, 8).train()
    perturb(encoder, 0.05)
    x, z = torch.randn(5, 3, 16, 16), torch.randn(5, 4)
    for net, inputs in ((encoder.encode, x), (decoder, z)):
        batched = torch.cat([out.flatten(1) for out in net(inputs)], 1)
        single = torch.cat([torch.cat([out.flatten(1) for out in net(inputs[i : i + 1])], 1) for i in range(5)])
        torch.testing.assert_close(batched, single)


def test_arch_switch_builds_residual_networks_for_every_variant():
    model = build_model(model_config(arch="resnet", flow_couplings=1), SHAPE, LEVELS)
    assert isinstance(model.encoder, resnets.ResEncoder) and isinstance(model.decoder, resnets.ResDecoder)
    generator = build_model(model_config(arch="resnet"), SHAPE, LEVELS, gan=True)
    assert isinstance(generator, Generator) and isinstance(generator.decoder, resnets.ResDecoder)
    posterior = build_encoder(model_config(arch="resnet", iaf_steps=1), SHAPE)
    assert isinstance(posterior, iaf.IAFPosterior) and isinstance(posterior.gaussian, resnets.ResEncoder)
    conv = build_model(model_config(), SHAPE, LEVELS)
    assert isinstance(conv.encoder, nets.ConvEncoder) and isinstance(conv.decoder, nets.ConvDecoder)


def test_residual_decoder_last_is_the_layer_that_outputs_mean_and_scale():
    """The adaptive loss weight reads `decoder.last.weight`: it must be the layer every output comes from."""
    decoder = resnets.ResDecoder((3, 16, 16), 4, 8)
    with torch.no_grad():
        decoder.last.weight.zero_()
        decoder.last.bias.copy_(torch.arange(6.0))
    mean, raw_scale = decoder(torch.randn(2, 4))
    torch.testing.assert_close(mean, torch.arange(3.0)[None, :, None, None].expand(2, 3, 16, 16))
    torch.testing.assert_close(raw_scale, torch.arange(3.0, 6.0)[None, :, None, None].expand(2, 3, 16, 16))


@pytest.mark.parametrize("resample", ["up", "down"])
def test_residual_blocks_resample_by_nearest_neighbour_and_average_pooling(resample):
    """With the residual branch off and an identity shortcut, a block is its resampling alone."""
    block = resnets.ResBlock(2, 2, resample)
    with torch.no_grad():
        for conv in (block.conv1, block.conv2):
            conv.weight.zero_()
            conv.bias.zero_()
        block.shortcut.weight.copy_(torch.eye(2)[:, :, None, None])
        block.shortcut.bias.zero_()
    x = torch.randn(3, 2, 8, 8)
    expected = F.interpolate(x, scale_factor=2, mode="nearest") if resample == "up" else F.avg_pool2d(x, 2)
    torch.testing.assert_close(block(x), expected)


# ---- IAF posterior --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", [[0, 1, 2, 3, 4], [4, 3, 2, 1, 0], [2, 0, 4, 1, 3]], ids=["fwd", "rev", "perm"])
def test_iaf_step_jacobian_is_triangular_in_its_ordering_with_the_tracked_log_det(order):
    step = iaf.IAFStep(5, 3, 16, torch.tensor(order))
    perturb(step, 0.3)
    z, context = torch.randn(5), torch.randn(1, 3)
    jac = torch.autograd.functional.jacobian(lambda v: step(v[None], context)[0][0], z)
    by_position = torch.argsort(torch.tensor(order))  # variables in their autoregressive order
    permuted = jac[by_position][:, by_position]
    assert torch.equal(permuted.triu(1), torch.zeros(5, 5))  # z'_i depends on no later z_j
    assert permuted.tril(-1).abs().sum() > 0  # ... but on earlier ones
    _, logdet = step(z[None], context)
    torch.testing.assert_close(logdet[0], torch.linalg.slogdet(jac).logabsdet)
    assert ((jac.diagonal() > 0) & (jac.diagonal() < 1)).all()  # sigma in (0, 1): the stable update


def test_iaf_posterior_log_q_is_the_change_of_variables():
    """ln q(z|x) = ln N(eps; 0, I) - ln|det dz/deps| with the Jacobian of the whole posterior by autograd."""
    posterior = build_encoder(model_config(iaf_steps=3, iaf_context=3, iaf_hidden=16), SHAPE)
    perturb(posterior, 0.3)
    x, eps = torch.rand(1, *SHAPE) * 2 - 1, torch.randn(1, 4)
    jac = torch.autograd.functional.jacobian(lambda e: posterior(x, e[None])[0][0], eps[0])
    expected = losses.standard_normal_log_prob(eps) - torch.linalg.slogdet(jac).logabsdet
    torch.testing.assert_close(posterior(x, eps)[1], expected)
    gaussian, _ = iaf.gaussian_sample(eps, *posterior.encode(x)[:2])
    assert not torch.allclose(posterior(x, eps)[0], gaussian)  # the steps do something


def test_iaf_orderings_alternate_so_two_steps_mix_every_variable():
    posterior = build_encoder(model_config(iaf_steps=2, iaf_context=3, iaf_hidden=16), SHAPE)
    perturb(posterior, 0.3)
    context = torch.randn(1, 3)

    def two_steps(z):
        for step in posterior.steps:
            z = step(z[None], context)[0][0]
        return z

    jac = torch.autograd.functional.jacobian(two_steps, torch.randn(4))
    assert (jac.abs() > 0).all()  # one ordering twice would leave the Jacobian triangular


def test_iwae_with_iaf_tightens_with_k_and_has_the_elbo_expectation_at_k1():
    model = make(**OPTIONS["iaf"])
    perturb(model.encoder.steps, 0.5)  # a posterior that the IAF steps move far from the Gaussian
    x = torch.rand(64, *SHAPE) * 2 - 1

    def mean_of(estimate, repeats):
        values = torch.stack([estimate().mean() for _ in range(repeats)])
        return values.mean(), values.std() / math.sqrt(repeats)

    elbo, elbo_error = mean_of(lambda: model.elbo(x).elbo.detach(), 40)
    bounds = {k: mean_of(lambda k=k: model.log_prob(x, num_importance=k), repeats)
              for k, repeats in ((1, 40), (10, 8), (100, 2))}
    assert bounds[1][0] < bounds[10][0] < bounds[100][0]
    assert bounds[10][0] - bounds[1][0] > 4 * (bounds[1][1] + bounds[10][1])  # by far more than the noise
    assert abs(bounds[1][0] - elbo) < 4 * math.hypot(bounds[1][1], elbo_error)  # the same q in both


def test_gaussian_posterior_keeps_the_analytic_kl():
    model = make()
    x = torch.rand(3, *SHAPE) * 2 - 1
    torch.testing.assert_close(model.elbo(x).kl, losses.kl_to_standard_normal(*model.encoder(x)))


# ---- large discriminator and sizing ---------------------------------------------------------------------------


def _disc_size(disc: nets.Discriminator) -> tuple[int, int]:
    return disc.logit.in_features, len(disc.blocks)


def test_large_discriminator_is_wider_and_deeper():
    def disc(**options):
        return build_discriminator(Config(model=ModelConfig(**options), train=TrainConfig(quality_weight=1.0)),
                                   (3, 32, 32))

    assert _disc_size(disc()) == (128, 4)  # SNGAN's CIFAR-10 D
    assert _disc_size(disc(disc_size="large")) == (256, 6)
    assert _disc_size(disc(disc_size="large", disc_channels=64)) == (64, 6)  # explicit sizes win
    assert _disc_size(build_discriminator(Config(model=ModelConfig(disc_size="large"),
                                                 train=TrainConfig(quality_weight=1.0)), (1, 8, 8))) == (64, 4)


def _train_config(**model) -> Config:
    return Config(model=ModelConfig(**model), train=TrainConfig(quality_weight=1.0))


def test_large_discriminator_preset_is_refused_where_both_sizes_override_it():
    """`--set model.disc_size=large` on a config that fixes D's width and depth would build the base D."""
    ignored = _train_config(disc_size="large", disc_channels=128, disc_blocks=4)
    with pytest.raises(ConfigError, match="disc_size=large has no effect .* --set model.disc_channels=0 .* "
                                          "--set model.disc_size=base"):
        check_new_training(ignored)
    check_new_training(_train_config(disc_size="large", disc_channels=64))  # the preset still sets the depth
    check_new_training(_train_config(disc_size="base", disc_channels=128, disc_blocks=4))
    check_new_training(dataclasses.replace(ignored, train=TrainConfig(quality_weight=0.0)))  # no D at all
    assert from_dict(Config, to_dict(ignored)) == ignored  # a checkpoint made with it still loads


def test_residual_conditioner_without_a_flow_is_refused():
    ignored = _train_config(flow_couplings=0, flow_blocks=2)
    with pytest.raises(ConfigError, match="flow_blocks=2 shapes the flow's couplings, and there is no flow"):
        check_new_training(ignored)
    check_new_training(_train_config(flow_couplings=1, flow_blocks=2))
    assert from_dict(Config, to_dict(ignored)) == ignored


def test_training_refuses_ignored_options_before_making_the_run_folder(tmp_path, digits):
    from cqf.train import train

    cfg = tiny_config({"flow_couplings": 0, "flow_blocks": 1}, steps=1)
    with pytest.raises(ConfigError, match="no flow"):
        train(cfg, tmp_path / "run", data=digits, progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("size", [32, 48, 64])
@pytest.mark.parametrize("arch", list(ENCODERS))
def test_each_arch_builds_and_runs_at_32_48_and_64_pixels(arch, size):
    torch.set_default_dtype(torch.float32)
    shape = (3, size, size)
    cfg = Config(model=ModelConfig(latent_dim=4, channels=4, arch=arch, flow_couplings=1, flow_hidden=4,
                                   flow_scales=2, flow_blocks=1, iaf_steps=1, iaf_context=2, iaf_hidden=8,
                                   disc_channels=4, disc_size="large"),
                 train=TrainConfig(quality_weight=1.0))
    model, disc = build_model(cfg.model, shape, 256), build_discriminator(cfg, shape)
    x = torch.rand(2, *shape) * 2 - 1
    terms, samples = model.elbo_and_sample(x, 2)
    assert terms.elbo.shape == (2,) and torch.isfinite(terms.elbo).all() and samples.shape == (2, *shape)
    assert disc(x).shape == (2,)
    assert disc.blocks(x).shape[-1] <= 8  # the last D blocks see SNGAN's 8x8 or less
    widest = max(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)
                 and m is not model.decoder.last)
    assert widest <= nets.MAX_WIDTH * 4  # a stage more at 48 and 64 pixels, not a wider one


# ---- NVP baseline ---------------------------------------------------------------------------------------------


def test_nvp_bits_per_dim_at_the_identity_init_is_the_standard_normal_density():
    """Zero-initialised couplings and an uninitialised ActNorm (eval mode) make f the identity: bits/dim of x is
    that of N(x; 0, I), computed here by hand, with every estimator the CLI reports (exact, not a bound)."""
    from cqf.data import dequantize
    from cqf.likelihood import bits_per_dim

    model = build_model(model_config(latent_dim=0, flow_couplings=2), SHAPE, 256).eval()
    assert isinstance(model, NVP)
    x_int = torch.randint(0, 256, (3, *SHAPE), dtype=torch.uint8)
    x = dequantize(x_int, 256, torch.Generator().manual_seed(0))  # the noise bits_per_dim draws with seed 0
    dims = math.prod(SHAPE)
    by_hand = [-(sum(-0.5 * math.log(2 * math.pi) - 0.5 * v**2 for v in image.flatten().tolist())
                 + dims * math.log(2 / 256)) / (dims * math.log(2)) for image in x]
    torch.testing.assert_close(model.bits_per_dim(model.log_prob(x, 7)), torch.tensor(by_hand))
    torch.testing.assert_close(model.elbo(x).kl, torch.zeros(3))
    result = bits_per_dim(model, x_int, 256, num_importance=5)
    assert result["bpd_elbo"] == pytest.approx(sum(by_hand) / 3, abs=1e-10)
    assert result["bpd_iwae"] == pytest.approx(sum(by_hand) / 3, abs=1e-10)


def test_nvp_log_prob_is_the_change_of_variables():
    model = build_model(model_config(latent_dim=0, flow_couplings=2, flow_blocks=1), (1, 4, 4), 256)
    model.elbo(torch.randn(8, 1, 4, 4))  # ActNorm init
    perturb(model, 0.3)
    model.eval()
    x = torch.randn(1, 1, 4, 4)
    jac = torch.autograd.functional.jacobian(lambda v: model.flow(v.view_as(x))[0].flatten(), x.flatten())
    expected = losses.standard_normal_log_prob(model.flow(x)[0]) + torch.linalg.slogdet(jac).logabsdet
    torch.testing.assert_close(model.log_prob(x, 3), expected)
    torch.testing.assert_close(model.elbo(x).elbo, expected)


def test_nvp_samples_are_the_inverse_flow_of_base_points():
    model = make(**OPTIONS["nvp"]).eval()
    z = torch.randn(3, model.latent_dim)
    assert model.latent_dim == math.prod(SHAPE)
    torch.testing.assert_close(model.flow(model.sample(3, z=z))[0].flatten(1), z)
    x = torch.rand(3, *SHAPE) * 2 - 1
    torch.testing.assert_close(model.reconstruct(x), x)


def test_nvp_trains_samples_and_evaluates_through_the_cli(tmp_path, digits, capsys, caplog):
    from cqf.cli import main
    from cqf.train import train

    run = tmp_path / "run"
    with caplog.at_level("INFO", logger="cqf"):
        train(tiny_config({"latent_dim": 0}, steps=3, eval_every=0, sample_every=0, ckpt_every=0), run,
              data=digits, progress=False)
    assert "test bits/dim: exact" in caplog.text and "ELBO" not in caplog.text  # not labelled a bound
    results = json.loads((run / "results.json").read_text())
    assert results["variant"] == "NVP" and results["bpd_iwae"] == pytest.approx(results["bpd_elbo"], abs=1e-12)
    main(["sample", str(run / "ckpt-0000003.pt"), "-n", "4", "--out", str(tmp_path / "grid.png")])
    assert (tmp_path / "grid.png").stat().st_size > 0
    main(["eval", str(run / "model.safetensors"), "--metrics", "bpd", "-k", "3", "--max-images", "20",
          "--json", str(tmp_path / "e.json")])
    bpd = json.loads((tmp_path / "e.json").read_text())["bits_per_dim"]
    assert bpd["variant"] == "NVP" and bpd["bpd_iwae"] == pytest.approx(bpd["bpd_elbo"], abs=1e-12)
    assert "exact" in bpd["estimators"]
    table = capsys.readouterr().out
    assert "bits/dim test, exact" in table and "IWAE" not in table and "ELBO" not in table
    main(["sample", str(run / "model.safetensors"), "-n", "4", "--out", str(tmp_path / "files")])
    capsys.readouterr()
    for argv in (["sample", str(run / "model.safetensors"), "--no-noise", "--out", str(tmp_path / "x.png")],
                 ["eval", str(run / "model.safetensors"), "--metrics", "bpd", "--no-noise"],
                 ["eval", str(tmp_path / "files"), "--data", "digits", "--no-noise"]):
        with pytest.raises(SystemExit) as exit_info:  # NVP samples (and image files) have no decoder noise
            main(argv)
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code != 0 and err.startswith("cqf: error: --no-noise") and "\n" not in err, err
    assert not (tmp_path / "x.png").exists()


def test_no_noise_is_refused_only_where_there_is_no_decoder_noise():
    from cqf.errors import CQFError
    from cqf.quality import check_no_noise

    for variant in ("VAE", "VAE-F", "CQ", "CQ-F"):
        check_no_noise(variant)
    for variant, why in (("GAN", "generator is deterministic"), ("NVP", "f\\^-1\\(eps\\)"),
                         (None, "images given as files")):
        with pytest.raises(CQFError, match=f"^--no-noise .*{why}.*drop --no-noise$"):
            check_no_noise(variant)


def test_nvp_refuses_what_makes_no_sense():
    with pytest.raises(ConfigError, match="likelihood only"):
        tiny_config({"latent_dim": 0}, quality_weight=1.0)
    with pytest.raises(ConfigError, match="flow_couplings > 0"):
        ModelConfig(latent_dim=0, flow_couplings=0)
    with pytest.raises(ConfigError, match="iaf_steps=0"):
        ModelConfig(latent_dim=0, flow_couplings=1, iaf_steps=1)
    assert tiny_config({"latent_dim": 0}).variant == "NVP"
