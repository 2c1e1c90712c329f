"""Training: run directory contents, exact resume, non-finite losses, checkpoint errors."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from cqf import checkpoint
from cqf.errors import CheckpointError, TrainingError
from cqf.files import read_safetensors, write_safetensors
from cqf.likelihood import bits_per_dim
from cqf.models import VAE
from cqf.train import train

from .conftest import tiny_config


def test_run_directory_has_everything(tmp_path, digits):
    train(tiny_config(), tmp_path, data=digits, progress=False)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"config.yaml", "metrics.jsonl", "tb", "model.safetensors", "results.json"} <= names
    assert {"ckpt-0000002.pt", "ckpt-0000004.pt", "samples-0000004.png", "recon-0000004.png"} <= names
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("val_bpd_elbo" in r for r in records) and any("loss_coverage" in r for r in records)
    # the decoder's sigma in grey levels, never below its floor (model.sigma_floor = 1: half a grey level)
    assert all(r["sigma_levels"] >= 0.5 for r in records if "loss_coverage" in r)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["bpd_iwae"] <= results["bpd_elbo"] + 0.05 and results["iw_samples"] == 4
    payload = torch.load(tmp_path / "ckpt-0000004.pt", weights_only=True)  # plain state dicts
    assert {"model", "opt_g", "step", "config", "format", "version", "levels", "image_shape"} <= set(payload)


ZOO = {  # the model options (cqf.resnets, cqf.iaf, cqf.nvp): (ModelConfig entries, TrainConfig entries)
    "cq-f": ({}, {}),
    "resnet": ({"arch": "resnet"}, {}),
    "iaf": ({"iaf_steps": 2, "iaf_context": 3, "iaf_hidden": 8}, {}),
    "flow-blocks": ({"flow_blocks": 1, "flow_scales": 2}, {}),
    "large-d": ({"disc_size": "large", "disc_channels": 0, "disc_blocks": 0}, {}),
    "gan-resnet": ({"arch": "resnet", "flow_couplings": 0}, {"coverage_weight": 0.0}),
    "nvp": ({"latent_dim": 0}, {"quality_weight": 0.0}),
}


@pytest.mark.parametrize("option", list(ZOO))
def test_resume_is_bitwise_identical_with_discriminator_and_ema(tmp_path, digits, option):
    """CQ-F with D, both optimizers, EMA and a warm-up that ends after the resume point; and each model option
    (the NVP baseline without D)."""
    model, extra = ZOO[option]
    settings = dict(quality_weight=1.0, warmup_steps=2, ema_halflife_kimg=0.1, eval_every=0, sample_every=0) | extra
    train(tiny_config(model, steps=6, ckpt_every=100, **settings), tmp_path / "a", data=digits, progress=False)
    train(tiny_config(model, steps=3, ckpt_every=3, **settings), tmp_path / "b", data=digits, progress=False)  # stop
    train(tiny_config(model, steps=6, ckpt_every=3, **settings), tmp_path / "b", data=digits, progress=False)  # resume
    straight = torch.load(tmp_path / "a" / "ckpt-0000006.pt", weights_only=True)
    resumed = torch.load(tmp_path / "b" / "ckpt-0000006.pt", weights_only=True)
    del straight["config"], resumed["config"]  # they differ in ckpt_every only
    states = ("model", "ema", "opt_g") + (("disc", "opt_d") if settings["quality_weight"] > 0 else ())
    assert all(straight[k] is not None for k in states)
    assert checkpoint.first_difference(straight, resumed) is None
    start = torch.load(tmp_path / "b" / "ckpt-0000003.pt", weights_only=True)
    assert checkpoint.first_difference(start["model"], straight["model"]) is not None  # it trained between the two


def test_ema_tracks_the_model_and_is_what_samples_and_evaluation_use(tmp_path, digits):
    """After one step from the init: ema = beta init + (1 - beta) model; model.safetensors and cqf.load hold it."""
    import cqf
    from cqf.schedule import ema_beta

    settings = dict(ema_halflife_kimg=0.05, ema_rampup=0.0, eval_every=0, sample_every=0, ckpt_every=1,
                    keep_checkpoints=5)
    train(tiny_config(steps=0, **settings), tmp_path, data=digits, progress=False)  # the initial weights
    returned = train(tiny_config(steps=1, **settings), tmp_path, data=digits, progress=False)
    start = torch.load(tmp_path / "ckpt-0000000.pt", weights_only=True)
    after = torch.load(tmp_path / "ckpt-0000001.pt", weights_only=True)
    beta = ema_beta(16, 0.05)
    params = {name for name, _ in returned.named_parameters()}
    moved = 0
    for name in params:
        expected = beta * start["ema"][name] + (1 - beta) * after["model"][name]
        torch.testing.assert_close(after["ema"][name], expected, rtol=1e-12, atol=1e-15)
        moved += not torch.equal(after["ema"][name], after["model"][name])
    assert moved  # the EMA differs from the raw weights...
    loaded = cqf.load(tmp_path / "model.safetensors")  # ...and it is what the exported model holds
    assert all(torch.equal(v, after["ema"][k]) for k, v in loaded.state_dict().items())
    assert checkpoint.load(tmp_path / "model.safetensors").weights == "ema"  # and it says so
    with pytest.raises(CheckpointError, match="holds no 'model' weights"):
        checkpoint.load(tmp_path / "model.safetensors", weights="model")
    tensors, metadata = read_safetensors(tmp_path / "model.safetensors", checkpoint.FORMAT, "a model")
    write_safetensors(tmp_path / "odd.safetensors", tensors, metadata | {"weights": "config"})
    with pytest.raises(CheckpointError, match="holds 'config' weights; a cqf model file holds 'ema' or 'model'"):
        checkpoint.load(tmp_path / "odd.safetensors")
    assert all(torch.equal(v, after["ema"][k]) for k, v in returned.state_dict().items())


def test_ema_rampup_limits_the_half_life_to_a_fraction_of_the_images_seen(tmp_path, digits):
    """With train.ema_rampup = r the EMA's half-life after step s is min(h, r (s+1) B) images."""
    from cqf.schedule import ema_beta

    assert ema_beta(64, 10, images_seen=640, rampup=0.05) == pytest.approx(0.5 ** (64 / 32))  # 5% of 640 images
    assert ema_beta(64, 10, images_seen=10**6, rampup=0.05) == pytest.approx(0.5 ** (64 / 10_000))  # the cap
    assert ema_beta(64, 10, images_seen=640, rampup=0.0) == pytest.approx(0.5 ** (64 / 10_000))
    settings = dict(ema_halflife_kimg=5.0, ema_rampup=0.5, eval_every=0, sample_every=0, ckpt_every=1,
                    keep_checkpoints=5)
    train(tiny_config(steps=1, **settings), tmp_path, data=digits, progress=False)
    model = train(tiny_config(steps=2, **settings), tmp_path, data=digits, progress=False)
    first = torch.load(tmp_path / "ckpt-0000001.pt", weights_only=True)
    second = torch.load(tmp_path / "ckpt-0000002.pt", weights_only=True)
    beta = 0.5 ** (16 / (0.5 * 32))  # step 1: 32 images seen, half-life 16 images (not 5,000)
    for name, _ in model.named_parameters():
        expected = beta * first["ema"][name] + (1 - beta) * second["model"][name]
        torch.testing.assert_close(second["ema"][name], expected, rtol=1e-12, atol=1e-15)


def test_resume_applies_the_new_learning_rates_and_logs_them(tmp_path, digits):
    """Lowering train.lr after a divergence must take effect: the optimizer state must not restore the old lr."""
    settings = dict(quality_weight=1.0, eval_every=0, sample_every=0, ckpt_every=2)
    train(tiny_config(steps=2, lr=1e-3, **settings), tmp_path, data=digits, progress=False)
    train(tiny_config(steps=4, lr=1e-4, lr_d=5e-5, betas=(0.5, 0.99), **settings), tmp_path, data=digits,
          progress=False)
    payload = torch.load(tmp_path / "ckpt-0000004.pt", weights_only=True)
    group_g, group_d = payload["opt_g"]["param_groups"][0], payload["opt_d"]["param_groups"][0]
    assert group_g["lr"] == 1e-4 and tuple(group_g["betas"]) == (0.5, 0.99) and group_d["lr"] == 5e-5
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    changed = next(e["changed"] for e in events if e.get("event") == "resume")
    assert changed == ["train.betas: [0.9, 0.999] -> [0.5, 0.99]", "train.lr: 0.001 -> 0.0001",
                       "train.lr_d: 0.0002 -> 5e-05", "train.steps: 2 -> 4"]


def test_resume_with_other_data_or_seed_is_refused(tmp_path, digits):
    import dataclasses

    train(tiny_config(steps=2, eval_every=0, sample_every=0), tmp_path, data=digits, progress=False)
    cfg = tiny_config(steps=4, eval_every=0, sample_every=0)
    with pytest.raises(TrainingError, match="seed: 0 -> 1.*new --out"):
        train(dataclasses.replace(cfg, seed=1), tmp_path, data=digits, progress=False)
    other = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, val_size=41))
    with pytest.raises(TrainingError, match="data.val_size: 40 -> 41"):
        train(other, tmp_path, data=digits, progress=False)
    moved = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=str(tmp_path / "elsewhere")))
    train(moved, tmp_path, data=digits, progress=False)  # where the files are may change


def _write_npz(path, images, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (images, 8, 8, 3), dtype=np.uint8)  # NHWC: another shape than the digits
    np.savez(path, x_train=x[:-10], y_train=np.zeros(images - 10, np.int64), x_test=x[-10:], y_test=np.zeros(10))


def test_an_npz_run_resumes_after_the_file_moved_but_not_on_other_images(tmp_path, monkeypatch):
    """The data set's identity is the npz's content, not its path: a moved file (or another working directory)
    resumes; the same path holding other images, or a data.name with another image shape, is refused naming
    data.name (not a state-dict shape)."""
    import dataclasses

    _write_npz(tmp_path / "a.npz", 60)
    settings = dict(eval_every=0, sample_every=0, eval_iw_samples=0, ckpt_every=2)
    cfg = tiny_config(steps=2, **settings)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, name=f"npz:{tmp_path / 'a.npz'}", val_size=5))
    run = tmp_path / "run"
    train(cfg, run, progress=False)
    (tmp_path / "moved").mkdir()
    (tmp_path / "a.npz").rename(tmp_path / "moved" / "b.npz")
    monkeypatch.chdir(tmp_path / "moved")  # a relative path from another working directory
    moved = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, name="npz:b.npz"),
                                train=dataclasses.replace(cfg.train, steps=4))
    train(moved, run, progress=False)
    assert checkpoint.latest(run).name == "ckpt-0000004.pt"
    _write_npz(tmp_path / "moved" / "b.npz", 60, seed=1)  # the same path, other images
    longer = dataclasses.replace(moved, train=dataclasses.replace(moved.train, steps=6))
    with pytest.raises(TrainingError, match=r"data\.name: npz:b\.npz holds other images"):
        train(longer, run, progress=False)
    digits = dataclasses.replace(longer, data=dataclasses.replace(longer.data, name="digits"))
    with pytest.raises(TrainingError, match=r"other data or seed \(data\.name: npz:b\.npz -> digits\)"):
        train(digits, run, progress=False)


def test_evaluation_leaves_weights_untouched(tmp_path, digits):
    model = train(tiny_config(), tmp_path, data=digits, progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bits_per_dim(model.train(), digits.x_test[:20], digits.levels, num_importance=3)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training  # mode restored


def test_non_finite_loss_stops_with_step_and_term_and_keeps_checkpoint(tmp_path, digits, monkeypatch):
    original = VAE.elbo
    calls = {"n": 0}

    def poisoned(self, x):
        calls["n"] += 1
        terms = original(self, x)
        if calls["n"] > 4:  # 1 init call + 3 good steps, then NaN
            terms.log_px_z = terms.log_px_z * float("nan")
        return terms

    monkeypatch.setattr(VAE, "elbo", poisoned)
    with pytest.raises(TrainingError, match=r"non-finite loss_coverage .* at step 3"):
        train(tiny_config(steps=10, ckpt_every=2, eval_every=0), tmp_path, data=digits, progress=False)
    monkeypatch.setattr(VAE, "elbo", original)
    assert checkpoint.latest(tmp_path).name == "ckpt-0000002.pt"
    assert checkpoint.load(checkpoint.latest(tmp_path)) is not None
    assert not list(tmp_path.glob("*.tmp"))


class _NanGradient(torch.autograd.Function):
    """The identity with a NaN gradient: a finite loss whose gradient overflowed (as bf16 can)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


@pytest.mark.parametrize("network", ["generator", "discriminator"])
def test_a_finite_loss_with_a_non_finite_gradient_stops_before_any_checkpoint_holds_it(tmp_path, digits,
                                                                                       monkeypatch, network):
    """From step 3 on the loss is finite but its gradient is NaN: the clipped update writes NaN weights. The run
    must stop naming the gradient and the step, and every checkpoint left must hold finite weights only."""
    from cqf import losses, step

    calls = {"n": 0}
    if network == "generator":
        original, target, name = VAE.elbo, VAE, "elbo"

        def poisoned(self, x):
            calls["n"] += 1
            terms = original(self, x)
            if calls["n"] > 4:  # 1 init call + 3 good steps
                terms.log_px_z = _NanGradient.apply(terms.log_px_z)
            return terms
    else:
        original, target, name = losses.discriminator_bce, step.losses, "discriminator_bce"

        def poisoned(real_logits, fake_logits):
            calls["n"] += 1
            loss = original(real_logits, fake_logits)
            return _NanGradient.apply(loss) if calls["n"] > 3 else loss

    monkeypatch.setattr(target, name, poisoned)
    # D's NaN weights reach the generator in the same step, through L_Q
    term = "grad_norm" if network == "generator" else "loss_quality"
    settings = dict(steps=10, ckpt_every=1, keep_checkpoints=20, eval_every=0, sample_every=0, grad_clip=100.0)
    if network == "discriminator":
        settings |= dict(quality_weight=1.0, warmup_steps=0)
    with pytest.raises(TrainingError, match=rf"non-finite {term} \(nan\) at step 3"):
        train(tiny_config(**settings), tmp_path, data=digits, progress=False)
    assert checkpoint.latest(tmp_path).name == "ckpt-0000003.pt"  # the state before step 3's update
    for path in checkpoint.checkpoints(tmp_path):
        payload = torch.load(path, weights_only=True)
        for key in ("model", "disc"):
            assert all(torch.isfinite(v).all() for v in (payload[key] or {}).values() if v.is_floating_point()), key


def test_first_difference_finds_a_changed_bit_anywhere_in_a_payload():
    a = {"model": {"w": torch.zeros(3), "b": torch.ones(2)}, "step": 4, "opt": {"state": [torch.zeros(1)]}}
    same = {"model": {"w": torch.zeros(3), "b": torch.ones(2)}, "step": 4, "opt": {"state": [torch.zeros(1)]}}
    assert checkpoint.first_difference(a, same) is None
    changed = {**same, "opt": {"state": [torch.tensor([1e-300])]}}
    assert checkpoint.first_difference(a, changed) == "/opt/state[0]"
    assert checkpoint.first_difference(a, {**same, "step": 5}) == "/step"
    assert checkpoint.first_difference(a, {**same, "extra": 1}) == ": keys differ"


def test_corrupt_and_foreign_checkpoints_are_named(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"not a zip file at all")
    with pytest.raises(CheckpointError, match="corrupt"):
        checkpoint.load(tmp_path / "bad.pt")
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a cqf checkpoint"):
        checkpoint.load(tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not found"):
        checkpoint.load(tmp_path / "missing.pt")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError):
        checkpoint.load(tmp_path / "bad.safetensors")


def test_exported_files_get_the_permissions_of_a_plain_file(tmp_path, digits, monkeypatch):
    from cqf import files

    previous = os.umask(0o022)  # group and others may read: a file created 0600 would differ
    monkeypatch.setattr(files, "_UMASK", 0o022)  # as read at import
    try:
        train(tiny_config(steps=2, eval_every=0, sample_every=0), tmp_path, data=digits, progress=False)
        (tmp_path / "plain").write_text("")
    finally:
        os.umask(previous)
    for name in ("model.safetensors", "ckpt-0000002.pt", "results.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777 == 0o644, name


def test_a_damaged_newest_checkpoint_names_the_move_and_the_earlier_one(tmp_path, digits):
    settings = dict(eval_every=0, sample_every=0, ckpt_every=2, keep_checkpoints=5)
    train(tiny_config(steps=4, **settings), tmp_path, data=digits, progress=False)
    newest = tmp_path / "ckpt-0000004.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # damaged outside cqf
    with pytest.raises(TrainingError, match=r"cannot resume: checkpoint .*ckpt-0000004.pt is corrupt.*; move it aside "
                                            r"\(mv .*ckpt-0000004.pt .*\.bad\) .*resumes from ckpt-0000002.pt$"):
        train(tiny_config(steps=6, **settings), tmp_path, data=digits, progress=False)
    newest.rename(newest.with_name(newest.name + ".bad"))  # the advice works
    train(tiny_config(steps=6, **settings), tmp_path, data=digits, progress=False)
    assert torch.load(tmp_path / "ckpt-0000006.pt", weights_only=True)["step"] == 6


def test_resume_with_an_incompatible_config_is_refused(tmp_path, digits):
    train(tiny_config(steps=2), tmp_path, data=digits, progress=False)
    cfg = tiny_config(steps=4)
    bigger = cfg.__class__(cfg.data, cfg.model.__class__(latent_dim=6, channels=8, flow_couplings=1, flow_hidden=8),
                           cfg.train)
    with pytest.raises(TrainingError, match=r"does not fit this config \(.*model.latent_dim: 4 -> 6.*\); use a new"):
        train(bigger, tmp_path, data=digits, progress=False)


@pytest.mark.parametrize("mode", ["precision=bf16", "channels_last=true", "compile=true"])
def test_speed_modes_give_the_float32_step_to_tolerance(tmp_path, digits, mode):
    """One CQ-F training step on a fixed batch in each speed mode against float32: the same bits/dim and L_Q to
    the mode's tolerance, and under bf16 the likelihood terms are still float32 (only the networks run in bf16)."""
    import dataclasses

    from cqf.run import build_run
    from cqf.step import autocast, training_step

    torch.set_default_dtype(torch.float32)
    key, value = mode.split("=")
    value = {"true": True}.get(value, value)
    base = tiny_config(steps=1, warmup_steps=0, quality_weight=1.0, balance="adaptive", log_every=1)
    fast = dataclasses.replace(base, train=dataclasses.replace(base.train, **{key: value}))
    results = []
    for i, cfg in enumerate([base, fast]):
        run = build_run(cfg, digits, tmp_path / str(i))
        results.append(training_step(run, digits))
    tolerance = 2e-2 if key == "precision" else 1e-4
    for name in ("bpd", "loss_quality"):
        assert abs(results[1][name].item() - results[0][name].item()) <= tolerance * abs(results[0][name].item()), name
    if key == "precision":
        with autocast(run.device, "bf16"):
            terms = run.model.elbo(torch.rand(4, 1, 8, 8) * 2 - 1)
        assert terms.log_px_z.dtype == terms.kl.dtype == torch.float32
        with autocast(run.device, "bf16"):
            y, logdet = run.model.flow(torch.rand(4, 1, 8, 8))
        assert y.dtype == logdet.dtype == torch.float32


KILL_OVERRIDES = ["train.steps=200", "train.ckpt_every=25", "train.keep_checkpoints=2", "train.warmup_steps=20",
                  "train.quality_ramp_steps=20", "train.augment=color,translation,cutout", "train.r1_gamma=0.1",
                  "train.eval_every=0", "train.sample_every=0", "train.eval_iw_samples=0", "train.num_threads=1",
                  "train.device=cpu", "train.log_every=25"]


def _cqf(out, extra=()):
    command = [sys.executable, "-m", "cqf", "train", "digits-cq-f", "--out", str(out), "--quiet"]
    for item in [*KILL_OVERRIDES, *extra]:
        command += ["--set", item]
    return command


@pytest.mark.slow
def test_sigkill_in_the_middle_then_resume_is_bitwise_identical(tmp_path):
    """A CQ-F run (D, both optimizers, EMA, adaptive weight, ramp, augmentation, R1) killed with SIGKILL while
    it trains, then resumed by the same command, ends with exactly the weights of an uninterrupted run."""
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    subprocess.run(_cqf(tmp_path / "straight"), check=True, env=env, capture_output=True, timeout=600)
    proc = subprocess.Popen(_cqf(tmp_path / "killed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (tmp_path / "killed" / "ckpt-0000050.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "model.safetensors").exists(), "the run ended before the kill"
    assert checkpoint.latest(tmp_path / "killed").name != "ckpt-0000200.pt"
    resumed_run = subprocess.run(_cqf(tmp_path / "killed"), check=True, env=env, capture_output=True, text=True,
                                 timeout=600)
    match = re.search(r"resuming from \S+ckpt-(\d+)\.pt at step (\d+)", resumed_run.stderr)
    assert match and int(match.group(2)) >= 50, resumed_run.stderr[-2000:]  # a resume, not a fresh start
    straight = torch.load(tmp_path / "straight" / "ckpt-0000200.pt", weights_only=True)
    resumed = torch.load(tmp_path / "killed" / "ckpt-0000200.pt", weights_only=True)
    assert all(straight[k] is not None for k in ("model", "ema", "disc", "opt_g", "opt_d"))
    assert checkpoint.first_difference(straight, resumed) is None


def test_a_full_disk_during_a_save_keeps_the_last_checkpoint(tmp_path, digits, monkeypatch):
    """torch.save fails half-way (ENOSPC): one-line CheckpointError naming the intact checkpoint, no partial file,
    and the run resumes from that checkpoint once space is back."""
    import errno

    original = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if str(getattr(f, "name", f)).endswith("ckpt-0000004.pt.tmp"):
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match=r"No space left on device.*ckpt-0000002.pt is intact.*rerun"):
        train(tiny_config(steps=4, eval_every=0, sample_every=0), tmp_path, data=digits, progress=False)
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-0000002.pt"]
    assert checkpoint.load(tmp_path / "ckpt-0000002.pt") is not None
    monkeypatch.setattr(torch, "save", original)
    train(tiny_config(steps=4, eval_every=0, sample_every=0), tmp_path, data=digits, progress=False)
    assert (tmp_path / "model.safetensors").exists()


def test_a_read_only_run_directory_names_the_permission_and_its_fix(tmp_path, digits, monkeypatch):
    import builtins

    real_open = builtins.open

    def refuse(file, mode="r", *args, **kwargs):
        if str(file).endswith("ckpt-0000004.pt.tmp") and "w" in mode:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refuse)
    with pytest.raises(CheckpointError, match=r"Permission denied.*ckpt-0000002.pt is intact: make the run directory"):
        train(tiny_config(steps=4, eval_every=0, sample_every=0), tmp_path, data=digits, progress=False)


def test_best_checkpoint_follows_validation_bits_per_dim_and_is_never_pruned(tmp_path, digits, monkeypatch):
    """Validation bits/dim 3.0, 2.0, 2.5, 2.8 at steps 2, 4, 6, 8: best.pt is step 4's state, kept while the
    step checkpoints are pruned to the newest one; a resumed run knows the best value so far."""
    from cqf import train as train_module

    real, scores = train_module.sharded_bits_per_dim, iter([3.0, 2.0, 2.5, 2.8])

    def scripted(model, x_int, levels, num_importance, device):
        if len(x_int) == len(digits.x_val):
            return {"bpd_elbo": next(scores)}
        return real(model, x_int, levels, num_importance, device)

    monkeypatch.setattr(train_module, "sharded_bits_per_dim", scripted)
    train(tiny_config(steps=8, eval_every=2, ckpt_every=2, keep_checkpoints=1, sample_every=0), tmp_path,
          data=digits, progress=False)
    payload = checkpoint.load_payload(tmp_path / checkpoint.BEST)
    assert payload["step"] == 4 and payload["val_bpd_elbo"] == 2.0
    assert checkpoint.best_bpd(tmp_path) == 2.0
    assert sorted(p.name for p in tmp_path.glob("ckpt-*.pt")) == ["ckpt-0000008.pt"]  # keep_checkpoints=1
    assert checkpoint.latest(tmp_path).name == "ckpt-0000008.pt"
    assert checkpoint.load(tmp_path / checkpoint.BEST).model is not None
    scores = iter([2.1])  # resumed to step 10: 2.1 is not better than the 2.0 of best.pt
    train(tiny_config(steps=10, eval_every=10, ckpt_every=2, keep_checkpoints=1, sample_every=0), tmp_path,
          data=digits, progress=False)
    assert checkpoint.load_payload(tmp_path / checkpoint.BEST)["step"] == 4


def test_deterministic_mode_is_on_while_training_and_restored_after(tmp_path, digits, monkeypatch):
    from cqf import train as train_module

    seen = []
    real_step = train_module.training_step
    monkeypatch.setattr(train_module, "training_step",
                        lambda run, data: seen.append(torch.are_deterministic_algorithms_enabled()) or
                        real_step(run, data))
    train(tiny_config(steps=2, deterministic=True, eval_every=0, sample_every=0), tmp_path, data=digits,
          progress=False)
    assert seen == [True, True] and not torch.are_deterministic_algorithms_enabled()


def test_a_checkpoint_carrying_code_is_refused_without_running_it(tmp_path):
    """Loading uses weights_only: a pickle that would run a command on load is a one-line error instead."""
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    torch.save({"format": checkpoint.FORMAT, "model": Payload()}, path)
    with pytest.raises(CheckpointError, match="corrupt, truncated or not a PyTorch file"):
        checkpoint.load(path)
    assert not marker.exists()


@pytest.mark.parametrize("clock", ["wall", "process"])
def test_the_time_budget_counts_the_chosen_clock(tmp_path, digits, monkeypatch, clock):
    """train.clock=process counts this process's CPU time (runs sharing a machine get equal budgets); the wall
    clock ignores it. A fake CPU clock that advances 25 s a reading spends a 1-minute budget in a few steps."""
    from cqf import train as train_module

    readings = iter(range(0, 10**6, 25))
    monkeypatch.setattr(train_module.time, "process_time", lambda: float(next(readings)))
    cfg = tiny_config(steps=10, minutes=1.0, clock=clock, eval_every=0, sample_every=0, ckpt_every=0)
    train(cfg, tmp_path, data=digits, progress=False)
    step = torch.load(checkpoint.latest(tmp_path), weights_only=True)["step"]
    assert step == 10 if clock == "wall" else 1 < step < 10


def test_a_folder_run_resumes_from_another_path_but_not_on_other_images(tmp_path, monkeypatch):
    """folder:PATH is known by its images too: the same folder named by an absolute path resumes; the same
    path holding other images is refused."""
    import dataclasses

    import numpy as np
    from PIL import Image

    def write_images(seed):
        rng = np.random.default_rng(seed)
        for i in range(40):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "imgs" / f"{i}.png")

    (tmp_path / "imgs").mkdir()
    write_images(0)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CQF_DATA", str(tmp_path / "cache"))
    cfg = tiny_config(steps=2, eval_every=0, sample_every=0, eval_iw_samples=0, ckpt_every=2)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, name="folder:imgs", val_size=5, image_size=8))
    train(cfg, tmp_path / "run", progress=False)
    absolute = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, name=f"folder:{tmp_path / 'imgs'}"),
                                   train=dataclasses.replace(cfg.train, steps=4))
    train(absolute, tmp_path / "run", progress=False)
    assert checkpoint.latest(tmp_path / "run").name == "ckpt-0000004.pt"
    write_images(1)
    longer = dataclasses.replace(absolute, train=dataclasses.replace(absolute.train, steps=6))
    with pytest.raises(TrainingError, match=r"holds other images"):
        train(longer, tmp_path / "run", progress=False)
