"""benchmarks/peers.py and benchmarks/dcgan.py: Glow's bits/dim against closed forms and against normflows'
own log_prob, the DCGAN's shapes, and the sample files `cqf eval` reads. The Glow tests need normflows (the
`peers` extra) and are skipped without it."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from cqf.data import dequantize
from cqf.images import load_npz_images

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import dcgan
import peers


def _glow(image_shape, levels, num_steps, hidden=8, num_levels=3):
    pytest.importorskip("normflows")
    return peers.FlowDensity(peers.build_glow(image_shape, num_levels, num_steps, hidden), image_shape, levels)


def _perturbed_glow(digits):
    """A Glow whose couplings, 1x1 convolutions, ActNorms and bases are all away from their initial values."""
    model = _glow(digits.image_shape, digits.levels, num_steps=1)
    model.log_prob(dequantize(digits.x_train[:64], digits.levels))  # ActNorm's data-dependent init
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_glow_bits_per_dim_is_the_closed_form_of_a_standard_normal(digits):
    # K = 0: squeezes and merges only, a permutation of N(0, I) on y = (x + 1) / 2 = (k + u) / levels.
    model = _glow(digits.image_shape, digits.levels, num_steps=0)
    x_int = digits.x_test
    x = dequantize(x_int, digits.levels, torch.Generator().manual_seed(0))  # cqf eval's noise: seed 0
    y = (x + 1) / 2
    num_dims = x[0].numel()
    log_px = (-0.5 * (math.log(2 * math.pi) + y**2)).flatten(1).sum(1) - num_dims * math.log(2)
    expected = (-(log_px + num_dims * math.log(2 / digits.levels)) / (num_dims * math.log(2))).mean().item()
    result = peers.glow_bits_per_dim(model, x_int, digits.levels)
    assert result["num_images"] == len(x_int) and result["dequantization_seed"] == 0
    assert result["bpd"] == pytest.approx(expected, abs=1e-10)


def test_glow_bits_per_dim_is_normflows_log_prob_converted_by_hand(digits):
    # normflows' CIFAR-10 example: bpd = nll(y) / (D ln 2) + log2(levels) for y = (k + u) / levels in [0, 1).
    model = _perturbed_glow(digits)
    x_int = digits.x_test[:100]
    y = (dequantize(x_int, digits.levels, torch.Generator().manual_seed(0)) + 1) / 2
    transform, model.flow.transform = model.flow.transform, None
    with torch.no_grad():
        log_py = model.flow.log_prob(y, None)
    model.flow.transform = transform
    num_dims = y[0].numel()
    by_hand = (-log_py / (num_dims * math.log(2)) + math.log2(digits.levels)).mean().item()
    assert peers.glow_bits_per_dim(model, x_int, digits.levels)["bpd"] == pytest.approx(by_hand, abs=1e-10)
    assert 0 < by_hand < 2 * math.log2(digits.levels)  # a density that was not left at its initial value


def test_glow_samples_are_model_space_images_whose_log_q_is_their_log_prob(digits):
    model = _perturbed_glow(digits)
    x, log_q = model.flow.sample(16)  # the generative direction, ToModelSpace.forward last
    assert x.shape == (16, *digits.image_shape)
    assert torch.allclose(model.log_prob(x), log_q, atol=1e-8)
    assert model.sample(4).shape == (4, *digits.image_shape) and model.nonfinite_samples == 0


@pytest.mark.parametrize("image_shape", [(1, 8, 8), (3, 32, 32), (3, 64, 64), (1, 28, 28)])
def test_dcgan_shapes(image_shape):
    generator, discriminator = dcgan.Generator(image_shape), dcgan.Discriminator(image_shape)
    x = generator(torch.randn(5, dcgan.LATENT_DIM))
    assert x.shape == (5, *image_shape) and x.abs().max() < 1  # tanh: cqf's model space (-1, 1)
    assert discriminator(x).shape == (5,)
    first = list(discriminator.net.children())[:3]  # no BatchNorm on D's first layer, BatchNorm after the second
    assert isinstance(first[0], torch.nn.Conv2d) and not isinstance(first[1], torch.nn.BatchNorm2d)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in discriminator.modules()) == dcgan.num_halvings(
        image_shape[1]) - 1


def test_dcgan_at_64x64_has_the_reference_parameter_counts():
    # PyTorch's reference DCGAN (examples/dcgan, nz=100, ngf=ndf=64, nc=3): 3,576,704 and 2,765,568 parameters.
    assert sum(p.numel() for p in dcgan.Generator((3, 64, 64)).parameters()) == 3_576_704
    assert sum(p.numel() for p in dcgan.Discriminator((3, 64, 64)).parameters()) == 2_765_568
    with pytest.raises(ValueError, match="at least 8"):
        dcgan.Generator((1, 6, 6))


def test_one_step_of_each_peer_and_samples_cqf_eval_reads(digits, tmp_path):
    from cqf.quality import sample_images

    generator, discriminator = dcgan.Generator(digits.image_shape), dcgan.Discriminator(digits.image_shape)
    before = [p.clone() for p in generator.parameters()]
    stats = peers.train_dcgan(generator, discriminator, digits, minutes=0, batch_size=16, seed=0)
    assert stats["steps"] == 1 and stats["images_seen"] == 16
    assert any(not torch.equal(a, b) for a, b in zip(before, generator.parameters(), strict=True))
    images = sample_images(peers.GeneratorSampler(generator, digits.levels), 10)
    assert images.dtype == torch.uint8 and images.shape == (10, *digits.image_shape)
    path = peers.save_samples_npz(images, tmp_path / "dcgan-samples.npz")
    assert torch.equal(load_npz_images(path), images)  # NHWC on disk, NCHW back: the images cqf eval scores
    rgb = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    assert torch.equal(load_npz_images(peers.save_samples_npz(rgb, tmp_path / "rgb.npz")), rgb)


def test_one_glow_step(digits):
    model = _glow(digits.image_shape, digits.levels, num_steps=1)
    stats = peers.train_glow(model, digits, minutes=0, batch_size=16, lr=1e-3, seed=0)
    assert stats["steps"] == 1 and stats["skipped_steps"] == 0 and math.isfinite(stats["last_train_bpd"])


def test_unsuitable_shapes_are_refused_before_training(capsys, tmp_path):
    pytest.importorskip("normflows")
    with pytest.raises(SystemExit) as exit_info:
        peers.main(["--data", "digits", "--minutes", "1", "--glow-levels", "4", "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and "divisible by 16" in capsys.readouterr().err
    assert not (tmp_path / "peers.json").exists()


def test_figure_shows_real_images_their_reconstructions_and_samples(digits, tmp_path):
    """benchmarks/figure.py: the real block is the spread test images themselves, the reconstructions are the
    model's, the samples its `sample` draws; the three tiles sit side by side in that order."""
    import figure

    from cqf.checkpoint import load
    from cqf.data import to_unit
    from cqf.train import train

    from .conftest import tiny_config

    run_dir = tmp_path / "run"
    train(tiny_config(steps=2), run_dir)
    loaded = load(run_dir / "model.safetensors")
    real, recon, samples = figure.blocks(loaded, digits.x_test, 4, noise=True, seed=0)
    spread = digits.x_test[torch.linspace(0, len(digits.x_test) - 1, 4).long()]
    assert torch.allclose(real, to_unit(dequantize(spread, digits.levels), digits.levels).float(), atol=1 / 17)
    torch.manual_seed(0)
    with torch.no_grad():
        expected = to_unit(loaded.model.sample(4), digits.levels).float().clamp(0, 1)
    assert torch.equal(samples, expected)
    assert not torch.equal(recon, samples)
    panel = figure.side_by_side([real, recon, samples], rows=2, cols=2, gap=3)
    tile = 2 * (8 + 1) + 1  # two 8-pixel images and three 1-pixel borders
    assert panel.shape == (1, tile, 3 * tile + 2 * 3)
    assert torch.equal(panel[:, 1:9, 1:9], real[0])
    assert torch.equal(panel[:, 1:9, tile + 3 + 1: tile + 3 + 9], recon[0])
    assert torch.equal(panel[:, 10:18, 2 * (tile + 3) + 10: 2 * (tile + 3) + 18], samples[3])


@pytest.mark.parametrize("device, problem", [("cuda", "no CUDA device"), ("cuda:7", "CUDA device"),
                                             ("tpu", "is not a device"), ("meta", "cpu or cuda only")])
def test_a_device_that_is_not_here_is_refused_in_one_line_before_training(device, problem, capsys, tmp_path):
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has that CUDA device")
    with pytest.raises(SystemExit) as exit_info:
        peers.main(["--data", "digits", "--minutes", "1", "--peers", "dcgan", "--device", device,
                    "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and problem in err and ("--device cpu" in err or "cuda:0" in err)
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "peers.json").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_both_peers_train_score_and_sample_on_the_gpu(digits, tmp_path):
    """`--device cuda`: the networks live on the GPU, Glow's bits/dim on the GPU equals the CPU's on the same
    weights, and the samples come back as the CPU's uint8 images."""
    from cqf.quality import sample_images

    cuda = torch.device("cuda")
    generator = dcgan.Generator(digits.image_shape).to(cuda)
    discriminator = dcgan.Discriminator(digits.image_shape).to(cuda)
    assert peers.train_dcgan(generator, discriminator, digits, 0, 16, 0, device=cuda)["steps"] == 1
    images = sample_images(peers.GeneratorSampler(generator, digits.levels), 10)
    assert images.device.type == "cpu" and images.dtype == torch.uint8 and images.shape == (10, *digits.image_shape)
    model = _glow(digits.image_shape, digits.levels, num_steps=1).to(cuda)
    assert peers.train_glow(model, digits, 0, 16, 1e-3, 0, device=cuda)["skipped_steps"] == 0
    model.eval()
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # fp32 convolutions, as on the CPU
        on_gpu = peers.glow_bits_per_dim(model, digits.x_test, digits.levels, device=cuda)["bpd"]
    on_cpu = peers.glow_bits_per_dim(model.cpu(), digits.x_test, digits.levels)["bpd"]
    assert on_gpu == pytest.approx(on_cpu, rel=1e-4)


def test_device_table_reads_the_peers_of_a_call(digits, tmp_path):
    """benchmarks/device_table.py --peers: a row per peer from the folder peers.py wrote, with Glow's exact
    bits/dim, none for the DCGAN, and the sample file that peers.py saved."""
    pytest.importorskip("normflows")
    import device_table

    out = tmp_path / "peers-s3"
    peers.main(["--data", "digits", "--minutes", "0.001", "--glow-steps", "1", "--glow-hidden", "8",
                "--num-samples", "8", "--max-test-images", "20", "--seed", "3", "--device", "cpu",
                "--out", str(out)])
    written = {e["peer"]: e for e in json.loads((out / "peers.json").read_text())}
    assert {e["device"] for e in written.values()} == {"cpu"}
    images = {peer: load_npz_images(Path(e["samples"]["path"])) for peer, e in written.items()}
    (tmp_path / "files_at").mkdir()
    back = out.rename(tmp_path / "files_at" / "peers-s3")  # as the files of a device call come back
    rows = {label: (run, samples) for label, run, samples in device_table.peer_runs(back)}
    assert set(rows) == {"Glow (peer)", "DCGAN (peer)"}
    glow, dcgan_run = rows["Glow (peer)"][0], rows["DCGAN (peer)"][0]
    assert glow["bpd"]["bpd_elbo"] == written["glow"]["test_bits_per_dim"]["bpd"]
    assert dcgan_run["bpd"]["bpd_elbo"] is None
    assert glow["seed"] == dcgan_run["seed"] == 3 and glow["steps"] == written["glow"]["steps"]
    for label, peer in (("Glow (peer)", "glow"), ("DCGAN (peer)", "dcgan")):
        samples = rows[label][1]
        assert samples == back / f"{peer}-samples.npz" and torch.equal(load_npz_images(samples), images[peer])
