"""`models.tempered` and `--temperature`: the model with its decoder sigma times T (NVP: base N(0, T^2 I)) is one
density model, so its bits/dim and its samples must both be that model's."""

import json

import pytest
import torch
from torch.distributions import Normal

from cqf.cli import main
from cqf.errors import CQFError
from cqf.models import Generator, build_model, tempered

from .conftest import tiny_config

SHAPE = (1, 8, 8)


def _model(**model):
    """A tiny model in eval mode, its ActNorm layers initialised by one forward pass on data-like images."""
    model = build_model(tiny_config(model).model, SHAPE, 17)
    model.elbo(torch.rand(16, *SHAPE) * 2 - 1)
    return model.eval()


@pytest.mark.parametrize("flow", [True, False])
def test_tempered_density_is_the_gaussian_with_t_sigma(flow):
    """ln p_T(x | z) = ln N(f(x); mu, (T sigma)^2) + ln|det df/dx|, computed apart with torch.distributions."""
    model = _model(flow_couplings=1 if flow else 0)
    x = torch.rand(5, *SHAPE) * 2 - 1
    mean, raw_scale = model.decoder(torch.randn(5, model.latent_dim))
    features = model.likelihood.features(x)
    sigma = model.likelihood.log_scale(raw_scale).exp()
    y, logdet = features
    for t in (0.5, 1.7):
        with tempered(model, t):
            got = model.likelihood.log_prob(features, mean, raw_scale)
        expected = Normal(mean, t * sigma).log_prob(y).flatten(1).sum(1) + logdet
        torch.testing.assert_close(got, expected)
    torch.testing.assert_close(model.likelihood.log_prob(features, mean, raw_scale),  # restored on leaving
                               Normal(mean, sigma).log_prob(y).flatten(1).sum(1) + logdet)


def test_tempered_samples_scale_the_decoder_noise_in_feature_space():
    """At the same z and eps, f(x_T) - mu(z) = T (f(x_1) - mu(z)): the noise is scaled before f^-1, not after."""
    model = _model()
    z = torch.randn(6, model.latent_dim)
    torch.manual_seed(1)
    x1 = model.sample(6, z=z)
    with tempered(model, 0.4):
        torch.manual_seed(1)
        xt = model.sample(6, z=z)
    mean, _ = model.decoder(z)
    y1, yt = model.likelihood.flow(x1)[0], model.likelihood.flow(xt)[0]
    torch.testing.assert_close(yt - mean, 0.4 * (y1 - mean))
    assert not torch.allclose(xt, x1)


def test_tempered_nvp_has_base_n_0_t2():
    model = _model(latent_dim=0)
    x = torch.rand(4, *SHAPE) * 2 - 1
    y, logdet = model.flow(x)
    eps = torch.randn(4, *SHAPE)
    with tempered(model, 0.7):
        log_p = model.elbo(x).log_px_z
        xt = model.sample(4, z=eps)
    torch.testing.assert_close(log_p, Normal(0.0, 0.7).log_prob(y).flatten(1).sum(1) + logdet)
    torch.testing.assert_close(xt, model.flow.inverse(0.7 * eps))
    torch.testing.assert_close(model.elbo(x).log_px_z, Normal(0.0, 1.0).log_prob(y).flatten(1).sum(1) + logdet)


def test_tempered_restores_the_model_and_refuses_what_has_no_noise():
    model = _model()
    with pytest.raises(RuntimeError), tempered(model, 0.5):
        raise RuntimeError("inside the block")
    assert model.likelihood.temperature == 1.0
    with tempered(model, 0.5), tempered(model, 2.0):  # nested: the inner block restores the outer's T
        pass
        with tempered(model, 3.0):
            assert model.likelihood.temperature == 3.0
        with tempered(model, 1.0):  # T = 1 inside a tempered block is the model as trained
            assert model.likelihood.temperature == 1.0
        assert model.likelihood.temperature == 2.0
    assert model.likelihood.temperature == 1.0
    generator = Generator(model.decoder, model.latent_dim, SHAPE, 17)
    with tempered(generator, 1.0):  # the default changes nothing, for any model
        pass
    with pytest.raises(CQFError, match="^--temperature .*a GAN has none.*drop --temperature$"):
        with tempered(generator, 0.5):
            pass
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(CQFError, match="^--temperature must be a positive number"):
            with tempered(model, bad):
                pass


def test_cli_scores_and_samples_the_tempered_model(tmp_path, digits, capsys):
    from cqf import load
    from cqf.images import load_image_folder
    from cqf.likelihood import bits_per_dim
    from cqf.quality import sample_images
    from cqf.train import train

    run = tmp_path / "run"
    train(tiny_config(steps=3, eval_every=0, sample_every=0, ckpt_every=0), run, data=digits, progress=False)
    weights = str(run / "model.safetensors")
    bpd = {}
    for t in (1.0, 0.5):
        main(["eval", weights, "--metrics", "bpd", "-k", "0", "--max-images", "20", "--temperature", str(t),
              "--json", str(tmp_path / f"t{t}.json")])
        bpd[t] = json.loads((tmp_path / f"t{t}.json").read_text())
    assert "temperature" not in bpd[1.0]["protocol"]
    assert bpd[0.5]["protocol"]["temperature"] == 0.5 and "tempered" in " ".join(bpd[0.5]["notes"])
    model = load(run / "model.safetensors")
    x_int = digits.split("test")[0][:20]
    with tempered(model, 0.5):
        torch.manual_seed(0)
        expected = bits_per_dim(model, x_int, 17)["bpd_elbo"]
    assert bpd[0.5]["bits_per_dim"]["bpd_elbo"] == pytest.approx(expected, rel=0.02)  # one-sample ELBO: its z
    assert bpd[0.5]["bits_per_dim"]["bpd_elbo"] > bpd[1.0]["bits_per_dim"]["bpd_elbo"] + 0.05

    # without --json a tempered evaluation goes beside the checkpoint under its own name, and the report labels it
    main(["eval", weights, "--metrics", "bpd", "-k", "0", "--max-images", "20", "--temperature", "0.5"])
    assert not (run / "eval.json").exists()
    assert json.loads((run / "eval-T0.5.json").read_text())["protocol"]["temperature"] == 0.5
    (run / "eval-T0.5.json").rename(run / "eval.json")
    main(["report", str(run), "--out", str(tmp_path / "rep")])
    assert "| VAE-F at T=0.5 |" in (tmp_path / "rep" / "report.md").read_text()

    main(["sample", weights, "-n", "5", "--out", str(tmp_path / "cold"), "--seed", "3", "--temperature", "0.5"])
    with tempered(model, 0.5):
        cold = sample_images(model, 5, seed=3)
    assert torch.equal(load_image_folder(tmp_path / "cold", channels=1), cold)
    assert not torch.equal(cold, sample_images(model, 5, seed=3))

    main(["sample", weights, "-n", "3", "--out", str(tmp_path / "files")])
    capsys.readouterr()
    for argv, what in (
        (["sample", weights, "--temperature", "0", "--out", str(tmp_path / "x.png")], "must be a positive number"),
        (["sample", weights, "--temperature", "0.5", "--no-noise", "--out", str(tmp_path / "x.png")], "use one"),
        (["eval", weights, "--metrics", "bpd", "--temperature", "0.5", "--no-noise"], "use one"),
        (["eval", weights, "--metrics", "bpd", "--temperature", "-2"], "must be a positive number"),
        (["eval", str(tmp_path / "files"), "--data", "digits", "--temperature", "0.5"], "images given as files"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code != 0 and err.startswith("cqf: error: ") and what in err, err
        assert "\n" not in err, err
    assert not (tmp_path / "x.png").exists()


def test_a_gan_checkpoint_refuses_a_temperature_and_writes_nothing(tmp_path, digits, capsys):
    from cqf.train import train

    run = tmp_path / "gan"
    cfg = tiny_config({"flow_couplings": 0}, coverage_weight=0.0, quality_weight=1.0, steps=2, eval_every=0,
                      sample_every=0, ckpt_every=0)
    train(cfg, run, data=digits, progress=False)
    weights = str(run / "model.safetensors")
    main(["sample", weights, "-n", "2", "--out", str(tmp_path / "ok.png")])  # T = 1: any model
    capsys.readouterr()
    for argv in (["eval", weights, "--metrics", "fid", "--temperature", "0.5"],
                 ["sample", weights, "--temperature", "0.5", "--out", str(tmp_path / "x.png")]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code != 0 and "a GAN has none" in err and "\n" not in err, err
    assert not (tmp_path / "x.png").exists() and not list(run.glob("eval*.json"))
