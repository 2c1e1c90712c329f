"""Config: every impossible value is a one-line ConfigError naming the key; odd image sizes and the flow."""

import pytest
import torch

from cqf.config import EvalConfig, load_config
from cqf.errors import ConfigError
from cqf.models import build_model
from cqf.train import train

from .conftest import tiny_config


@pytest.mark.parametrize("override,key", [
    ("train.log_every=0", "train.log_every"),
    ("train.d_steps=0", "train.d_steps"),
    ("train.quality_batch_size=-1", "train.quality_batch_size"),
    ("train.ema_halflife_kimg=-1", "train.ema_halflife_kimg"),
    ("train.eval_every=-5", "train.eval_every"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints"),
    ("train.lr=0", "train.lr"),
    ("train.betas=[0.9, 1.0]", "train.betas"),
    ("train.balance=bogus", "train.balance"),
    ("train.augment=rotate", "train.augment"),
    ("train.quality_ramp_steps=-1", "train.quality_ramp_steps"),
    ("train.quality_every=0", "train.quality_every"),
    ("train.quality_every=3", "train.quality_every"),  # log_every 50 is no multiple of 3
    ("train.r1_gamma=-1", "train.r1_gamma"),
    ("train.warmup_steps=-1", "train.warmup_steps"),
    ("train.minutes=-2", "train.minutes"),
    ("train.batch_size=0", "train.batch_size"),
    ("model.latent_dim=0", "model.latent_dim"),
    ("model.flow_couplings=-1", "model.flow_couplings"),
    ("model.sigma_floor=0", "model.sigma_floor"),
    ("data.val_size=-1", "data.val_size"),
    ("train.device=gpu", "train.device"),
    ("train.device=cuda:x", "train.device"),
    ("train.lr=inf", "train.lr"),
    ("train.lr=.nan", "train.lr"),
    ("train.quality_weight=.inf", "train.quality_weight"),
    ("train.minutes=.inf", "train.minutes"),
    ("train.betas_d=[0.5, .nan]", "train.betas_d"),
    ("model.sigma_floor=.inf", "model.sigma_floor"),
    ("seed=-1", "seed"),
    ("seed=4294967296", "seed"),
    ("data.root=/dev/null", "data.root"),
])
def test_impossible_values_name_their_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
        load_config("digits-cq-f", [override])
    assert "\n" not in str(err.value)


def test_a_second_flow_scale_without_a_flow_is_refused_not_ignored():
    with pytest.raises(ConfigError, match="model.flow_scales=2 needs a flow"):
        load_config("digits-cq", ["model.flow_scales=2"])
    assert load_config("digits-cq-f", ["model.flow_scales=2"]).model.flow_scales == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("argv", [
    ["train", "digits-vae", "--set", "train.device=cuda", "--set", "train.steps=1"],
    ["sample", "missing.safetensors", "--device", "cuda:0"],
    ["eval", "missing.npz", "--data", "digits", "--device", "cuda"],
])
def test_a_gpu_that_is_not_there_is_one_line_not_a_traceback(argv, tmp_path, capsys, monkeypatch):
    from cqf.cli import main

    monkeypatch.chdir(tmp_path)  # eval of images writes ./eval.json when it gets that far

    with pytest.raises(SystemExit) as exit_:
        main([*argv, *(["--out", str(tmp_path / "run")] if argv[0] == "train" else [])])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith("cqf: error:") and "no CUDA device" in err.splitlines()[-1]


def test_a_gan_trains_l_q_on_every_step():
    with pytest.raises(ConfigError, match="train.quality_every=2 needs L_C"):
        load_config("digits-gan", ["train.quality_every=2"])
    assert load_config("digits-cq-f", ["train.quality_every=2"]).train.quality_every == 2
    assert load_config("digits-vae-f", ["train.quality_every=3"]).train.quality_every == 3  # no L_Q: no effect


def test_a_gan_has_one_batch():
    with pytest.raises(ConfigError, match="a GAN's batch is train.batch_size"):
        load_config("digits-gan", ["train.quality_batch_size=8"])
    assert load_config("digits-gan", ["train.quality_batch_size=0"]).train.quality_batch == 64


def test_d_steps_zero_with_a_quality_weight_says_how_to_train_without_d():
    with pytest.raises(ConfigError, match="train.quality_weight=0"):
        load_config("digits-cq-f", ["train.d_steps=0"])
    assert load_config("digits-vae-f", ["train.d_steps=0"]).train.d_steps == 0  # no D: nothing to refuse


@pytest.mark.parametrize("fields,match", [
    ({"metrics": ("fid", "bogus")}, "unknown metric 'bogus'"),
    ({"bpd_split": "dev"}, "--split"),
    ({"reference": "val"}, "--reference must be train or test"),
    ({"num_samples": 0}, "samples must be >= 1"),
    ({"device": "gpu"}, "--device must be auto, cpu, cuda or cuda:N"),
    ({"features": "classifier:"}, "--features must be inception or classifier:PATH"),
    ({"features": "vgg"}, "--features must be inception or classifier:PATH"),
    ({"seed": -3}, "--seed"),
])
def test_eval_config_rejects_impossible_values(fields, match):
    with pytest.raises(ConfigError, match=match):
        EvalConfig(**fields)


def _images(height, width, levels=17):
    from cqf.data import ImageData

    x = torch.randint(0, levels, (40, 1, height, width), dtype=torch.uint8)
    y = torch.zeros(40, dtype=torch.int64)
    return ImageData("odd", levels, x[:24], y[:24], x[24:32], y[24:32], x[32:], y[32:])


def test_a_flow_on_odd_sized_images_is_a_config_error(tmp_path):
    """The flow's squeeze needs even sizes: refused with the fix, never silently dropped."""
    cfg = tiny_config()
    with pytest.raises(ConfigError, match="even image height and width.*model.flow_couplings=0"):
        build_model(cfg.model, (1, 7, 8), 17)
    with pytest.raises(ConfigError, match="7x7"):
        train(cfg, tmp_path / "flow", data=_images(7, 7), progress=False)


def test_odd_sized_images_train_without_a_flow(tmp_path):
    import dataclasses

    cfg = tiny_config(quality_weight=1.0)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, flow_couplings=0))
    model = train(cfg, tmp_path, data=_images(7, 9), progress=False)
    assert model.sample(3).shape == (3, 1, 7, 9)
