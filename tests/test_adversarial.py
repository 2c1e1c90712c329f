"""The quality half: gradient routing of L_Q, one step of each variant, bundled configs, GAN bits/dim."""

import dataclasses
import json
import math

import pytest
import torch
from torch.distributions import Normal

from cqf import checkpoint, losses
from cqf import config as cqf_config
from cqf.config import Config, ModelConfig, TrainConfig
from cqf.data import ImageData, dequantize
from cqf.likelihood import gan_bits_per_dim
from cqf.models import Generator, build_model, gan_density_model
from cqf.run import build_discriminator
from cqf.step import discriminator_step, generator_step
from cqf.train import train

from .conftest import tiny_config

SHAPE = (1, 8, 8)
VARIANTS = {  # name: (coverage_weight, quality_weight, flow_couplings)
    "VAE": (1.0, 0.0, 0),
    "VAE-F": (1.0, 0.0, 2),
    "CQ": (1.0, 1.0, 0),
    "CQ-F": (1.0, 1.0, 2),
    "GAN": (0.0, 1.0, 0),
}


def variant_config(name: str) -> Config:
    coverage, quality, couplings = VARIANTS[name]
    return Config(
        model=ModelConfig(latent_dim=4, channels=8, flow_couplings=couplings, flow_hidden=8, disc_channels=8,
                          disc_blocks=2),
        train=TrainConfig(coverage_weight=coverage, quality_weight=quality),
    )


def build(name: str):
    cfg = variant_config(name)
    model = build_model(cfg.model, SHAPE, 17, gan=cfg.is_gan)
    if not isinstance(model, Generator):
        model.elbo(torch.rand(16, *SHAPE) * 2 - 1)  # ActNorm init
        with torch.no_grad():  # move the zero-initialised coupling outputs off zero: routing must be visible
            for p in model.flow.parameters():
                p.add_(0.1 * torch.randn_like(p))
    return cfg, model, build_discriminator(cfg, SHAPE)


def test_variant_names():
    assert [variant_config(n).variant for n in VARIANTS] == list(VARIANTS)


def _grad_norms(module):
    return {n: (0.0 if p.grad is None else p.grad.abs().sum().item()) for n, p in module.named_parameters()}


def test_quality_loss_reaches_decoder_and_flow_but_not_encoder_or_disc():
    """Both losses on, one backward pass: L_Q's part of each gradient (the step's gradient minus L_C's alone, on
    the same draws) is zero on the encoder and on D, and non-zero on every decoder and flow parameter, the
    decoder's sigma output included (the samples' noise is sigma * eps: L_Q must be able to shrink it)."""
    _, model, disc = build("CQ-F")
    x = torch.rand(6, *SHAPE) * 2 - 1
    tc = TrainConfig(quality_weight=1.0, balance="fixed", grad_clip=0.0)
    both, _ = _gradients(model, disc, tc, 1.0, x)
    coverage_only, _ = _gradients(model, disc, tc, 0.0, x)
    quality_part = {n: (both[n] - coverage_only[n]).abs() for n in both}
    for name, part in quality_part.items():
        scale = coverage_only[name].abs().max().item()
        if name.startswith("encoder."):
            assert part.max().item() <= 1e-12 * scale, name
        else:
            assert part.max().item() > 1e-6 * scale, name
    channels = SHAPE[0]  # the decoder's output layer: mean channels, then the raw scale of sigma
    last = _last(model)
    assert quality_part[last][channels:].max() > 1e-6 * coverage_only[last][channels:].abs().max()
    assert all(p.grad is None for p in disc.parameters())  # D frozen during the generator step
    assert all(p.requires_grad for p in disc.parameters())  # ... and unfrozen after it


@pytest.mark.parametrize("balance", ["fixed", "adaptive"])  # one decoder call for both losses, and two
@pytest.mark.parametrize("switch", ["quality_sigma", "quality_mean"])
def test_quality_sigma_or_mean_false_keeps_l_q_from_that_output_alone(balance, switch):
    """train.quality_sigma=false: L_Q's part of the output layer's gradient is zero on sigma's rows (weight and
    bias) and non-zero on the mean's; train.quality_mean=false: the other way round. The flow still gets it."""
    _, model, disc = build("CQ-F")
    x = torch.rand(6, *SHAPE) * 2 - 1
    tc = TrainConfig(quality_weight=1.0, balance=balance, grad_clip=0.0, **{switch: False})
    both, _ = _gradients(model, disc, tc, 1.0, x)
    coverage_only, _ = _gradients(model, disc, tc, 0.0, x)
    channels = SHAPE[0]  # the output layer's rows: the mean's channels, then sigma's
    cut, kept = (slice(channels, None), slice(None, channels))[:: 1 if switch == "quality_sigma" else -1]
    for name in (_last(model), _last(model).replace("weight", "bias")):
        part = (both[name] - coverage_only[name]).abs()
        assert part[cut].max() <= 1e-12 * coverage_only[name][cut].abs().max(), name
        assert part[kept].max() > 1e-6 * coverage_only[name][kept].abs().max(), name
    flow = [n for n in both if n.startswith("likelihood.flow.")]
    assert flow and all((both[n] - coverage_only[n]).abs().max() > 0 for n in flow)


@pytest.mark.parametrize("balance", ["fixed", "adaptive"])
def test_quality_mean_and_flow_false_let_l_q_reach_sigma_alone(balance):
    """train.quality_mean=false with train.quality_flow=false: L_Q reaches the decoder through sigma only: zero on
    the mean's output rows, the flow and the encoder, non-zero on sigma's rows and the layers below them."""
    _, model, disc = build("CQ-F")
    x = torch.rand(6, *SHAPE) * 2 - 1
    tc = TrainConfig(quality_weight=1.0, balance=balance, grad_clip=0.0, quality_mean=False, quality_flow=False)
    both, _ = _gradients(model, disc, tc, 1.0, x)
    coverage_only, _ = _gradients(model, disc, tc, 0.0, x)
    channels, last = SHAPE[0], _last(model)
    for name in both:
        part, scale = (both[name] - coverage_only[name]).abs(), coverage_only[name].abs().max()
        if name in (last, last.replace("weight", "bias")):
            assert part[:channels].max() <= 1e-12 * scale and part[channels:].max() > 1e-6 * scale, name
        elif name.startswith("decoder."):
            assert part.max() > 1e-6 * scale, name
        else:
            assert part.max() <= 1e-12 * scale, name


@pytest.mark.parametrize("switch", ["quality_sigma", "quality_mean"])
def test_quality_sigma_or_mean_false_needs_a_hybrid(switch):
    with pytest.raises(cqf_config.ConfigError, match=f"{switch}=false keeps .* needs a hybrid"):
        Config(train=TrainConfig(quality_weight=0.0, **{switch: False}))


@pytest.mark.parametrize("balance", ["fixed", "adaptive"])
@pytest.mark.parametrize("switch, reached", [("quality_decoder", "likelihood.flow."), ("quality_flow", "decoder.")])
def test_the_routing_switches_let_l_q_reach_one_part_alone(balance, switch, reached):
    """train.quality_decoder=false: L_Q's part of the gradient is non-zero on every flow parameter and zero on
    every other (decoder, encoder); train.quality_flow=false: non-zero on every decoder parameter (sigma's output
    rows included) and zero on every other (flow, encoder), under `fixed` too, whose sum would otherwise be
    differentiated in one backward pass."""
    _, model, disc = build("CQ-F")
    x = torch.rand(6, *SHAPE) * 2 - 1
    tc = TrainConfig(quality_weight=1.0, balance=balance, grad_clip=0.0, **{switch: False})
    both, _ = _gradients(model, disc, tc, 1.0, x)
    coverage_only, _ = _gradients(model, disc, tc, 0.0, x)
    assert any(n.startswith(reached) for n in both)
    for name in both:
        part = (both[name] - coverage_only[name]).abs().max()
        scale = coverage_only[name].abs().max()
        assert part > 1e-6 * scale if name.startswith(reached) else part <= 1e-12 * scale, name


def test_quality_decoder_false_balances_the_adaptive_weight_on_the_flow():
    """With L_Q reaching only the flow the adaptive weight matches the two losses' gradient norms on all of the
    flow's parameters (the decoder's output layer gets no L_Q gradient to balance)."""
    _, model, disc = build("CQ-F")
    x = torch.rand(6, *SHAPE) * 2 - 1
    tc = TrainConfig(quality_weight=1.0, balance="adaptive", grad_clip=0.0, quality_decoder=False)
    _, stats = _gradients(model, disc, tc, 1.0, x)
    torch.manual_seed(3)
    loss_c = -model.elbo(x).elbo.mean()
    loss_q = -disc(model.sample(6)).mean()
    flow = list(model.likelihood.flow.parameters())
    weighted = stats["quality_weight_effective"] * _autograd_norm(loss_q, flow)
    torch.testing.assert_close(weighted, _autograd_norm(loss_c, flow), rtol=1e-3, atol=0)


@pytest.mark.parametrize("switch", ["quality_decoder", "quality_flow"])
@pytest.mark.parametrize("name", ["VAE-F", "CQ", "GAN"])
def test_the_routing_switches_need_a_hybrid_with_a_flow(name, switch):
    cfg = variant_config(name)
    with pytest.raises(cqf_config.ConfigError, match=f"{switch}.*this config is {name}"):
        dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **{switch: False}))


def test_the_routing_switches_refuse_empty_or_redundant_combinations():
    cq_f = variant_config("CQ-F")
    for switch in ("quality_sigma", "quality_mean"):
        with pytest.raises(cqf_config.ConfigError, match=f"{switch}=false has no effect"):
            dataclasses.replace(cq_f, train=dataclasses.replace(cq_f.train, quality_decoder=False, **{switch: False}))
    with pytest.raises(cqf_config.ConfigError, match="that is train.quality_decoder=false"):
        dataclasses.replace(cq_f, train=dataclasses.replace(cq_f.train, quality_mean=False, quality_sigma=False))
    cq = variant_config("CQ")  # no flow: nothing left for L_Q, and quality_decoder=false would be refused too
    with pytest.raises(cqf_config.ConfigError, match="nothing to train \\(there is no flow\\)"):
        dataclasses.replace(cq, train=dataclasses.replace(cq.train, quality_mean=False, quality_sigma=False))
    with pytest.raises(cqf_config.ConfigError, match="nothing to train"):
        dataclasses.replace(cq_f, train=dataclasses.replace(cq_f.train, quality_decoder=False, quality_flow=False))


@pytest.mark.parametrize("switch", ["quality_sigma", "quality_decoder", "quality_mean"])
def test_the_training_step_passes_the_routing_switches_on(monkeypatch, digits, tmp_path, switch):
    """The training step (which makes the forward it shares with the D step) hands `train.quality_sigma`,
    `train.quality_decoder` and `train.quality_mean` to the model's sampler, not only `generator_step` when called
    alone."""
    from cqf import step
    from cqf.run import build_run

    seen = []
    original = step.generator_forward
    monkeypatch.setattr(step, "generator_forward", lambda *a, **k: seen.append(k) or original(*a, **k))
    cfg = tiny_config(steps=1, warmup_steps=0, quality_weight=1.0, **{switch: False})
    step.training_step(build_run(cfg, digits, tmp_path), digits)
    key = {"quality_sigma": "sigma_grad", "quality_decoder": "decoder_grad", "quality_mean": "mean_grad"}[switch]
    assert seen and all(k.get(key, True) is False for k in seen)


def _last(model) -> str:
    """The parameter name of the decoder's output-layer weight."""
    return next(n for n, p in model.named_parameters() if p is model.decoder.last.weight)


def _gradients(model, disc, tc, quality_weight, x, measure=False):
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    torch.manual_seed(3)
    stats = generator_step(model, disc, opt, x, tc, quality_weight=quality_weight, measure=measure)
    return {n: p.grad.clone() for n, p in model.named_parameters()}, stats


@pytest.mark.parametrize("balance", ["fixed", "per_dim", "adaptive"])
def test_every_balance_routes_gradients_right(balance):
    """The encoder's gradient is L_C's alone; L_Q adds to the decoder's and the flow's; D gets none."""
    _, model, disc = build("CQ-F")
    x = torch.rand(6, *SHAPE) * 2 - 1
    tc = TrainConfig(quality_weight=1.0, balance=balance, grad_clip=0.0)
    with_quality, stats = _gradients(model, disc, tc, 1.0, x, measure=True)
    without_quality, _ = _gradients(model, disc, tc, 0.0, x)
    for name, grad in with_quality.items():  # the decoder runs on a batch with or without the samples: to rounding
        difference = (grad - without_quality[name]).abs().max().item()
        scale = without_quality[name].abs().max().item()
        assert difference <= 1e-12 * scale if name.startswith("encoder.") else difference > 1e-6 * scale, name
    assert all(p.grad is None for p in disc.parameters())
    assert {"grad_norm_coverage", "grad_norm_quality", "quality_weight_effective"} <= set(stats)
    assert stats["quality_weight_effective"] > 0


def _autograd_norm(loss, params):
    """||d loss / d params||, computed apart from the library (the graph is kept)."""
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.sqrt(sum(g.square().sum() for g in grads if g is not None))


def test_adaptive_weight_equals_a_hand_computation():
    """w = lambda ||dL_C/dW|| / (||dL_Q/dW|| + eps) on the decoder's output layer W, clamped and detached."""
    from cqf.step import adaptive_weight, grad_norm

    layer = torch.nn.Parameter(torch.tensor([[1.0, 2.0], [3.0, -1.0]]))
    v = torch.tensor([0.5, -2.0])
    loss_c = (layer @ v).square().sum()  # d/dW = 2 (W v) v^T
    loss_q = (layer * torch.tensor([[1.0, 0.0], [0.0, 2.0]])).sum()  # d/dW = [[1, 0], [0, 2]]
    grad_c = 2 * torch.outer(layer.detach() @ v, v)
    expected = 3.0 * grad_c.norm() / (torch.tensor(5.0).sqrt() + 1e-4)
    (g_c,), (g_q,) = torch.autograd.grad(loss_c, [layer], retain_graph=True), torch.autograd.grad(loss_q, [layer])
    norm_c, norm_q = grad_norm([g_c, None]), grad_norm([g_q])  # None: a parameter the loss does not reach
    torch.testing.assert_close(norm_q, torch.tensor(5.0).sqrt(), rtol=1e-12, atol=0)
    weight = adaptive_weight(norm_c, norm_q, quality_weight=3.0, max_weight=1e4)
    torch.testing.assert_close(weight, expected, rtol=1e-12, atol=0)
    assert not weight.requires_grad and layer.grad is None  # detached; nothing accumulated
    assert adaptive_weight(norm_c, norm_q, 3.0, max_weight=2.0) == 2.0  # clamped


def test_the_adaptive_weight_sits_on_the_decoders_output_layer_and_balances_it():
    """At lambda = 1 the weighted L_Q gradient on that layer has the norm of L_C's (up to eps)."""
    _, model, disc = build("CQ-F")
    x = torch.rand(6, *SHAPE) * 2 - 1
    tc = TrainConfig(quality_weight=1.0, balance="adaptive", grad_clip=0.0)
    _, stats = _gradients(model, disc, tc, 1.0, x)
    torch.manual_seed(3)
    loss_c = -model.elbo(x).elbo.mean()
    loss_q = -disc(model.sample(6)).mean()
    layer = model.decoder.last.weight
    weighted = stats["quality_weight_effective"] * _autograd_norm(loss_q, [layer])
    torch.testing.assert_close(weighted, _autograd_norm(loss_c, [layer]), rtol=1e-3, atol=0)


def test_per_dim_divides_the_coverage_term_by_d_ln2():
    _, model, disc = build("CQ-F")
    x = torch.rand(6, *SHAPE) * 2 - 1
    fixed, _ = _gradients(model, disc, TrainConfig(quality_weight=1.0, grad_clip=0.0), 0.0, x)
    per_dim, stats = _gradients(model, disc, TrainConfig(quality_weight=1.0, balance="per_dim", grad_clip=0.0), 1.0,
                                x, measure=True)
    scale = 64 * math.log(2)
    for name in fixed:
        if name.startswith("encoder."):
            torch.testing.assert_close(per_dim[name], fixed[name] / scale)
    assert stats["quality_weight_effective"].item() == pytest.approx(scale)  # in units of L_C in nats


def test_quality_weight_schedule_warmup_then_ramp():
    from cqf.schedule import quality_weight_at

    cfg = Config(train=TrainConfig(quality_weight=10.0, warmup_steps=3, quality_ramp_steps=4))
    assert [quality_weight_at(cfg, s) for s in range(9)] == [0, 0, 0, 2.5, 5.0, 7.5, 10.0, 10.0, 10.0]
    gan = Config(train=TrainConfig(coverage_weight=0.0, quality_weight=2.0, warmup_steps=3, quality_ramp_steps=4))
    assert quality_weight_at(gan, 0) == 2.0


def test_quality_every_k_steps_after_the_warm_up():
    """k = 2: L_Q on the steps with k | step + 1 (the log steps), the ramp keeps counting steps."""
    from cqf.schedule import quality_started, quality_weight_at

    cfg = Config(train=TrainConfig(quality_weight=10.0, warmup_steps=3, quality_ramp_steps=4, quality_every=2,
                                   log_every=2))
    assert [quality_weight_at(cfg, s) for s in range(10)] == [0, 0, 0, 2.5, 0, 7.5, 0, 10.0, 0, 10.0]
    assert [quality_started(cfg, s) for s in range(2, 7)] == [False, True, True, True, True]  # the warm-up only


@pytest.mark.parametrize("name", list(VARIANTS))
def test_one_step_updates_exactly_the_right_parameters(name):
    cfg, model, disc = build(name)
    x = dequantize(torch.randint(0, 17, (8, *SHAPE)), 17)
    before_g = {k: v.clone() for k, v in model.state_dict().items()}
    opt_g = torch.optim.Adam(model.parameters(), lr=1e-2)
    if disc is not None:
        before_d = {k: v.clone() for k, v in disc.state_dict().items()}
        opt_d = torch.optim.Adam(disc.parameters(), lr=1e-2)
        with torch.no_grad():
            fake = model.sample(len(x))
        stats = discriminator_step(disc, opt_d, x, fake, augment_policy=("color", "translation", "cutout"),
                                   r1_gamma=1.0)
        assert {"loss_d", "d_acc_real", "d_acc_fake", "r1_penalty"} <= set(stats)
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before_g.items())  # D step leaves G alone
        disc_changed = [k for k, v in disc.state_dict().items() if "orig" in k and not torch.equal(v, before_d[k])]
        assert disc_changed
        before_d = {k: v.clone() for k, v in disc.state_dict().items()}
    tc = cfg.train
    stats = generator_step(model, disc, opt_g, x, tc, tc.quality_weight)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before_g[k])}
    assert any(k.startswith("decoder.") for k in changed)
    if tc.coverage_weight > 0:
        assert any(k.startswith("encoder.") for k in changed) and "loss_coverage" in stats
    if VARIANTS[name][2]:
        assert any(k.startswith("likelihood.flow.") for k in changed)
    if disc is not None:
        assert "loss_quality" in stats
        assert all(torch.equal(v, before_d[k]) for k, v in disc.state_dict().items() if "orig" in k)
    else:
        assert "loss_quality" not in stats


def test_warmup_switches_quality_on_at_the_configured_step(tmp_path, digits):
    cfg = tiny_config(steps=4, warmup_steps=2, quality_weight=1.0, eval_every=0, sample_every=0)
    train(cfg, tmp_path, data=digits, progress=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    has_quality = {r["step"]: "loss_quality" in r for r in records if "loss_coverage" in r}
    assert has_quality == {1: False, 2: False, 3: True, 4: True}


def test_balance_is_logged_at_the_log_interval(tmp_path, digits):
    """grad_norm_coverage, grad_norm_quality, quality_weight_effective and lambda's ramp, in metrics.jsonl and
    TensorBoard, at every log step once L_Q is on."""
    cfg = tiny_config(steps=6, warmup_steps=2, quality_ramp_steps=4, quality_weight=4.0, balance="adaptive",
                      log_every=2, eval_every=0, sample_every=0)
    train(cfg, tmp_path, data=digits, progress=False)
    records = {r["step"]: r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
               if "loss_coverage" in r}
    keys = {"grad_norm_coverage", "grad_norm_quality", "quality_weight_effective", "quality_weight"}
    assert sorted(records) == [2, 4, 6] and not keys & set(records[2])
    assert keys <= set(records[4]) and keys <= set(records[6])
    assert (records[4]["quality_weight"], records[6]["quality_weight"]) == (2.0, 4.0)  # ramp steps 2 and 4 of 4
    assert records[6]["grad_norm_coverage"] > 0 and records[6]["grad_norm_quality"] > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert {"grad_norm_coverage", "grad_norm_quality", "quality_weight_effective"} <= set(events.Tags()["scalars"])


def _fake_data(shape, levels) -> ImageData:
    x = torch.randint(0, levels, (12, *shape), dtype=torch.uint8)
    y = torch.zeros(12, dtype=torch.int64)
    return ImageData("fake", levels, x[:8], y[:8], x[8:10], y[8:10], x[10:], y[10:])


BUNDLED_DATA = {"digits": ((1, 8, 8), 17), "mnist": ((1, 28, 28), 256), "cifar10": ((3, 32, 32), 256),
                "stl10": ((3, 48, 48), 256), "celeba64": ((3, 64, 64), 256), "imagenet64": ((3, 64, 64), 256),
                "lsun-bedroom64": ((3, 64, 64), 256)}  # (image shape, levels) of each bundled config's data


@pytest.mark.parametrize("name", sorted(cqf_config.bundled_configs()))
def test_every_bundled_config_trains_through_an_adversarial_step(tmp_path, name):
    """Each config's model, D and losses train through an adversarial step where it has one (with
    `quality_every` k the first k - 1 steps are plain ELBO steps, so a hybrid runs k steps and its last record
    must carry L_Q), and finish (grids, export, test bits/dim), on fake data of its image size, with the networks
    narrowed to 8 channels: the structure (arch, IAF, flow scales and blocks, D depth, variant) is the config's,
    and a step costs a second, not the ~minute of the widest configs on a CPU. Their full widths are built in the
    next test."""
    torch.set_default_dtype(torch.float32)  # as in real use
    cfg = cqf_config.load_config(name)
    narrow = dataclasses.replace(cfg.model, channels=min(cfg.model.channels, 8),
                                 flow_hidden=min(cfg.model.flow_hidden, 8), iaf_hidden=min(cfg.model.iaf_hidden, 16),
                                 iaf_context=min(cfg.model.iaf_context, 4), disc_channels=8)
    cfg = dataclasses.replace(cfg, model=narrow, train=dataclasses.replace(
        cfg.train, steps=cfg.train.quality_every, batch_size=4, warmup_steps=0, eval_every=0, sample_every=0,
        eval_iw_samples=2, device="cpu", quality_batch_size=min(cfg.train.quality_batch_size, 4)))
    shape, levels = BUNDLED_DATA[cfg.data.name]
    model = train(cfg, tmp_path, data=_fake_data(shape, levels), progress=False)
    assert model.sample(2).shape == (2, *shape)
    assert (tmp_path / f"ckpt-{cfg.train.steps:07d}.pt").exists()
    last = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
            if "loss_coverage" in line or "loss_quality" in line][-1]
    assert ("loss_quality" in last) == cfg.has_discriminator


@pytest.mark.parametrize("name", sorted(cqf_config.bundled_configs()))
def test_every_bundled_config_builds_at_full_size(name):
    """The config's own widths at its image size: ELBO (or samples, for a GAN) and D logits of two images."""
    torch.set_default_dtype(torch.float32)
    cfg = cqf_config.load_config(name)
    shape, levels = BUNDLED_DATA[cfg.data.name]
    model, disc = build_model(cfg.model, shape, levels, gan=cfg.is_gan), build_discriminator(cfg, shape)
    x = torch.rand(2, *shape) * 2 - 1
    with torch.no_grad():
        assert model.sample(2).shape == (2, *shape)
        if not cfg.is_gan:
            assert torch.isfinite(model.elbo(x).elbo).all()
        if disc is not None:
            assert disc(x).shape == (2,)


def test_gan_bound_finds_the_closed_form_sigma_and_leaves_the_generator_alone(digits):
    """G(z) = 0 for every z: then p(x|z) = N(x; 0, sigma^2 I) does not depend on z, the best sigma is the RMS
    of the training images, and the best bound is ln N(x; 0, sigma^2 I) itself (the encoder can match the prior)."""
    cfg = ModelConfig(latent_dim=4, channels=8)
    generator = build_model(cfg, SHAPE, 17, gan=True)
    with torch.no_grad():
        for p in generator.parameters():
            p.zero_()
    before = {k: v.clone() for k, v in generator.state_dict().items()}
    result = gan_bits_per_dim(generator, cfg, digits.x_train, digits.x_test, steps=400, batch_size=64, lr=1e-2,
                              num_importance=50)
    assert all(torch.equal(v, generator.state_dict()[k]) for k, v in before.items())
    assert result["approximate"]
    rms = dequantize(digits.x_train, 17).square().mean().sqrt().item()
    assert result["sigma"] == pytest.approx(rms, rel=0.01)
    x_test = dequantize(digits.x_test, 17)
    closed_form = losses.bits_per_dim(Normal(0.0, rms).log_prob(x_test).flatten(1).sum(1), 64, 17).mean().item()
    assert result["bpd_iwae"] == pytest.approx(closed_form, abs=0.005)
    assert result["bpd_iwae"] <= result["bpd_elbo"] + 1e-9


def test_gan_bound_uses_the_encoder_of_the_density_models():
    """The approximate bound must not be loosened by a smaller encoder than the hybrids' of the same config."""
    cfg = ModelConfig(latent_dim=4, channels=8)
    fitted = gan_density_model(build_model(cfg, SHAPE, 17, gan=True), cfg).encoder.state_dict()
    density = build_model(cfg, SHAPE, 17).encoder.state_dict()
    assert {k: v.shape for k, v in fitted.items()} == {k: v.shape for k, v in density.items()}


def test_gan_ignores_the_hybrid_warmup(tmp_path, digits):
    """A GAN has no L_C to warm up with: L_Q is on from its first step whatever warmup_steps says."""
    base = tiny_config(steps=2, warmup_steps=5, quality_weight=1.0, eval_every=0, sample_every=0)
    cfg = dataclasses.replace(base, model=dataclasses.replace(base.model, flow_couplings=0),
                              train=dataclasses.replace(base.train, coverage_weight=0.0))
    train(cfg, tmp_path, data=digits, progress=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss_quality" in r] == [1, 2]


def test_step_measure_path_gives_the_gradient_of_the_single_backward():
    """With `measure` (or the adaptive balance) L_C and L_Q are differentiated apart and summed into .grad: the
    result must be the gradient of coverage_weight * L_C + lambda * L_Q that one backward gives."""
    _, model, disc = build("CQ-F")
    disc.eval()  # no spectral-norm power iteration: D is the same function in every call
    x = torch.rand(6, *SHAPE) * 2 - 1
    for balance in ("fixed", "per_dim"):
        tc = TrainConfig(quality_weight=3.0, coverage_weight=0.5, balance=balance, grad_clip=0.0)
        single, _ = _gradients(model, disc, tc, 3.0, x)
        apart, stats = _gradients(model, disc, tc, 3.0, x, measure=True)
        for name, grad in single.items():
            torch.testing.assert_close(apart[name], grad, rtol=1e-10, atol=1e-12, msg=name)
        torch.manual_seed(3)  # the same draws as the step: the logged norms are those of L_C and L_Q in nats
        terms, fake = model.elbo_and_sample(x, 6)
        shared = [p for n, p in model.named_parameters() if not n.startswith("encoder.")]
        torch.testing.assert_close(stats["grad_norm_coverage"], _autograd_norm(-terms.elbo.mean(), shared))
        torch.testing.assert_close(stats["grad_norm_quality"], _autograd_norm(-disc(fake).mean(), shared))
    # adaptive: the summed gradients are those of one backward of coverage_weight * L_C + w * L_Q at the same w
    adaptive = TrainConfig(quality_weight=3.0, coverage_weight=0.5, balance="adaptive", grad_clip=0.0)
    apart, stats = _gradients(model, disc, adaptive, 3.0, x)
    weight = (stats["quality_weight_effective"] * 0.5).item()  # effective weight is in units of L_C in nats
    single, _ = _gradients(model, disc, TrainConfig(quality_weight=weight, coverage_weight=0.5, grad_clip=0.0),
                           weight, x)
    for name, grad in single.items():
        torch.testing.assert_close(apart[name], grad, rtol=1e-8, atol=1e-10, msg=name)


@pytest.mark.parametrize("quality_batch_size,settings", [
    (0, {}),
    (4, {}),  # two backward passes (log_every=1: the balance is measured)
    (4, {"log_every": 100}),  # one backward pass, posterior and prior z in one decoder call
    (4, {"d_steps": 2}),
])
def test_the_training_step_shares_its_samples_between_the_d_and_g_steps(tmp_path, digits, quality_batch_size,
                                                                         settings):
    """The first D step sees the generator step's samples (detached), and the G step re-scores the same images
    with the updated D: L_Q = -mean D_{t+1}(x_gen). With train.quality_batch_size every D step and L_Q use that
    many real and generated images, while the ELBO keeps the whole batch."""
    from cqf.run import build_run
    from cqf.step import training_step

    cfg = tiny_config(steps=2, warmup_steps=0, quality_weight=1.0, quality_batch_size=quality_batch_size,
                      **settings)
    run = build_run(cfg, digits, tmp_path)
    seen, encoded = [], []
    run.disc.register_forward_hook(lambda module, args, out: seen.append((args[0].detach().clone(), out.detach())))
    run.model.encoder.register_forward_hook(lambda module, args, out: encoded.append(args[0].shape[0]))
    stats = training_step(run, digits)
    (d_input, _), *more_d, (g_input, g_logits) = seen
    batch = quality_batch_size or cfg.train.batch_size
    assert [len(d) for d, _ in [(d_input, None), *more_d]] == [2 * batch] * cfg.train.d_steps  # real + generated
    assert encoded == [cfg.train.batch_size]  # L_C: the whole batch
    torch.testing.assert_close(g_input, d_input[batch:], rtol=0, atol=0)
    with torch.no_grad():  # eval: the spectral norm of the G step's forward, without another power iteration
        torch.testing.assert_close(run.disc.eval()(g_input), g_logits)  # scored by D after its step
    torch.testing.assert_close(stats["loss_quality"], -g_logits.mean())


def test_finite_guard_names_the_first_bad_step_and_term_and_save_refuses(tmp_path, digits):
    from cqf.errors import TrainingError
    from cqf.run import FiniteGuard, build_run

    guard = FiniteGuard()
    for step, (c, q) in enumerate([(1.0, 2.0), (1.0, float("inf")), (float("nan"), float("nan")), (1.0, 1.0)]):
        guard.watch(step, loss_coverage=torch.tensor(c), loss_quality=torch.tensor(q))
    with pytest.raises(TrainingError, match=r"non-finite loss_quality \(inf\) at step 1"):
        guard.check()
    run = build_run(tiny_config(), digits, tmp_path)
    run.guard = guard
    with pytest.raises(TrainingError, match="at step 1"):
        run.save(tmp_path)
    assert not list(tmp_path.glob("ckpt-*"))


def test_between_adversarial_steps_d_rests_and_g_takes_a_plain_elbo_step(tmp_path, digits):
    """quality_every = 2, no warm-up: steps 0, 2 are ELBO-only (D untouched, no L_Q); steps 1, 3 train D and
    add L_Q. The ELBO-only step is the VAE-F step: it equals the step of the same run with quality_weight 0."""
    from cqf.run import build_run
    from cqf.step import training_step

    cfg = tiny_config(steps=4, warmup_steps=0, quality_weight=1.0, balance="adaptive", quality_every=2, log_every=2)
    run = build_run(cfg, digits, tmp_path / "k2")
    plain = build_run(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, quality_weight=0.0)), digits,
                      tmp_path / "plain")
    plain.model.load_state_dict(run.model.state_dict())
    for step in range(4):
        disc_before = {k: v.clone() for k, v in run.disc.state_dict().items()}
        stats = training_step(run, digits)
        disc_moved = any(not torch.equal(v, disc_before[k]) for k, v in run.disc.state_dict().items())
        adversarial = step % 2 == 1
        assert disc_moved == adversarial, step
        assert ("loss_quality" in stats) == ("loss_d" in stats) == adversarial, step
        if step == 0:
            training_step(plain, digits)
            for (name, p), q in zip(run.model.named_parameters(), plain.model.parameters(), strict=True):
                torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


def test_a_hybrid_and_its_likelihood_only_twin_are_one_run_until_l_q_switches_on(tmp_path, digits):
    """CQ-F during its warm-up is VAE-F, bit for bit: building D draws nothing from the model's random stream,
    so any later difference is the adversarial term's."""
    settings = dict(steps=3, eval_every=0, sample_every=0, ckpt_every=3, ema_halflife_kimg=0.1)
    train(tiny_config(quality_weight=1.0, warmup_steps=5, **settings), tmp_path / "cq-f", data=digits, progress=False)
    train(tiny_config(**settings), tmp_path / "vae-f", data=digits, progress=False)
    hybrid, twin = (torch.load(tmp_path / run / "ckpt-0000003.pt", weights_only=True) for run in ("cq-f", "vae-f"))
    for key in ("model", "ema", "opt_g"):
        assert checkpoint.first_difference(hybrid[key], twin[key]) is None, key


def _recording_disc(disc, seen):
    disc.register_forward_hook(lambda module, args, out: seen.append(args[0].detach().clone()))
    return disc


@pytest.mark.parametrize("clip", [False, True])
def test_quality_clip_shows_d_the_generated_images_as_a_saved_sample_is(clip):
    """With `train.quality_clip` D's step sees the generated images clipped to [-1, 1] (real ones as they are);
    `fake_out_of_range` is the share of generated pixels beyond the range either way."""
    cfg, _, disc = build("CQ-F")
    seen = []
    _recording_disc(disc, seen)
    real, fake = torch.rand(6, *SHAPE) * 2 - 1, torch.randn(6, *SHAPE) * 2
    opt = torch.optim.SGD(disc.parameters(), lr=0.0)
    stats = discriminator_step(disc, opt, real, fake, clip=clip)
    (d_input,) = seen
    torch.testing.assert_close(d_input[:6], real, rtol=0, atol=0)
    torch.testing.assert_close(d_input[6:], fake.clamp(-1, 1) if clip else fake, rtol=0, atol=0)
    assert stats["fake_out_of_range"].item() == pytest.approx((fake.abs() > 1).float().mean().item())
    assert 0.3 < stats["fake_out_of_range"].item() < 0.9


def test_fake_out_of_range_counts_values_that_are_not_finite():
    cfg, _, disc = build("CQ-F")
    fake = torch.zeros(2, *SHAPE)
    fake[0, 0, 0, :3] = torch.tensor([float("nan"), float("inf"), 1.5])
    stats = discriminator_step(disc, torch.optim.SGD(disc.parameters(), lr=0.0), torch.zeros(2, *SHAPE), fake)
    assert stats["fake_out_of_range"].item() == pytest.approx(3 / fake.numel())


@pytest.mark.parametrize("clip", [False, True])
def test_quality_clip_keeps_l_q_from_pixels_beyond_the_data_range(clip):
    """L_Q's gradient on a generated pixel beyond [-1, 1] is zero with `train.quality_clip` (D sees it clipped)
    and not without; within the range it is L_Q's gradient either way."""
    _, model, disc = build("CQ-F")
    x = torch.rand(6, *SHAPE) * 2 - 1
    fake = (torch.randn(6, *SHAPE) * 2).requires_grad_(True)
    tc = TrainConfig(quality_weight=1.0, balance="fixed", grad_clip=0.0, quality_clip=clip)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    generator_step(model, disc, opt, x, tc, quality_weight=1.0, forward=(None, fake))
    beyond = fake.detach().abs() > 1
    assert (fake.grad[~beyond] != 0).float().mean() > 0.9
    assert ((fake.grad[beyond] == 0).all() if clip else (fake.grad[beyond] != 0).float().mean() > 0.9)


def test_the_training_step_passes_quality_clip_on(tmp_path, digits):
    """Every image of the generated half that D sees in a training step (its step and L_Q's) is within [-1, 1]
    with `train.quality_clip`, while the model's samples are not."""
    from cqf.run import build_run
    from cqf.step import training_step

    cfg = tiny_config(steps=1, warmup_steps=0, quality_weight=1.0, quality_clip=True, d_steps=2)
    run = build_run(cfg, digits, tmp_path)
    with torch.no_grad():  # push the decoder's mean beyond the range: most generated pixels are out of it
        run.model.decoder.last.bias.add_(3.0)
    seen = []
    _recording_disc(run.disc, seen)
    stats = training_step(run, digits)
    batch = cfg.train.quality_batch
    assert len(seen) == 3 and stats["fake_out_of_range"] > 0.5
    assert all(d[batch:].abs().max() <= 1 for d in seen[:2]) and seen[2].abs().max() <= 1


def test_quality_clip_needs_a_discriminator():
    with pytest.raises(cqf_config.ConfigError, match="train.quality_clip=true clips .* this config is VAE-F"):
        dataclasses.replace(variant_config("VAE-F"), train=TrainConfig(quality_clip=True))
    for name in ("CQ", "CQ-F", "GAN"):
        cfg = variant_config(name)
        dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, quality_clip=True))
