"""Sample-quality metrics: closed forms, known extremes, and agreement with torch-fidelity and prdc."""

import json
import math

import numpy as np
import pytest
import torch
from scipy.linalg import hadamard

from cqf import metrics
from cqf.data import levels_to_uint8
from cqf.evaluate import evaluate
from cqf.features import ClassifierExtractor, extract, make_extractor
from cqf.images import ImagesDataset
from cqf.report import format_table

from .conftest import tiny_config


def orthogonal_design(num: int, dims: int, mean: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Rows whose sample mean is `mean` and sample covariance exactly diag(scale^2) * num / (num - 1)."""
    walsh = torch.from_numpy(hadamard(num)[:, 1 : dims + 1]).double()  # orthogonal, zero-mean +-1 columns
    return mean + walsh * scale


def test_fid_of_a_set_with_itself_is_zero():
    f = torch.randn(500, 16)
    assert abs(metrics.fid(f, f)) < 1e-6


def test_fid_of_gaussian_feature_sets_matches_the_closed_form():
    num, dims = 256, 12
    mu1, mu2 = torch.randn(dims), torch.randn(dims)
    s1, s2 = torch.rand(dims) + 0.5, torch.rand(dims) + 0.5
    a, b = orthogonal_design(num, dims, mu1, s1), orthogonal_design(num, dims, mu2, s2)
    scale = num / (num - 1)  # unbiased covariance
    expected = (mu1 - mu2).square().sum() + scale * (s1 - s2).square().sum()
    assert metrics.fid(a, b) == pytest.approx(expected.item(), rel=1e-6)


def test_fid_needs_more_images_than_feature_dimensions():
    """At N = F images the F x F covariance has rank F - 1: singular, so FID is refused, and allowed at F + 1."""
    from cqf.quality import feature_metrics

    class Extractor:
        feature_key, logits_key = "f", None

    dims = 16
    at_limit = feature_metrics({"f": torch.randn(dims, dims)}, {"f": torch.randn(50, dims)}, Extractor, ("fid",))
    assert at_limit["metrics"] == {} and "more images than feature dimensions" in at_limit["unavailable"]["fid"]
    above = feature_metrics({"f": torch.randn(dims + 1, dims)}, {"f": torch.randn(50, dims)}, Extractor, ("fid",))
    assert "fid" in above["metrics"] and not above["unavailable"]


def test_precision_recall_density_coverage_extremes():
    real = torch.randn(400, 8)
    p, r = metrics.precision_recall(real, real)
    d, c = metrics.density_coverage(real, real)
    assert p == 1.0 and r == 1.0 and c == 1.0 and d == pytest.approx(1.0, abs=0.15)
    far = torch.randn(400, 8) + 100.0
    assert metrics.precision_recall(far, real) == (0.0, 0.0)
    assert metrics.density_coverage(far, real) == (0.0, 0.0)


def test_density_coverage_match_prdc():
    prdc = pytest.importorskip("prdc")
    real, fake = torch.randn(300, 6), 0.8 * torch.randn(250, 6) + 0.3
    reference = prdc.compute_prdc(real.numpy(), fake.numpy(), nearest_k=5)
    density, coverage = metrics.density_coverage(fake, real, k=5, chunk=64)  # chunked == whole
    assert density == pytest.approx(reference["density"], abs=1e-12)
    assert coverage == pytest.approx(reference["coverage"], abs=1e-12)


def test_inception_score_extremes():
    uniform = torch.zeros(1000, 10)
    assert metrics.inception_score(uniform)[0] == pytest.approx(1.0, abs=1e-6)
    confident = torch.full((1000, 10), -1e4)
    confident[torch.arange(1000), torch.arange(1000) % 10] = 1e4
    assert metrics.inception_score(confident, splits=1)[0] == pytest.approx(10.0, rel=1e-6)  # balanced classes


@pytest.fixture()
def random_classifier(tmp_path, digits):
    """An untrained (randomly initialised) classifier file: a feature extractor that needs no download."""
    from cqf.features import train_classifier

    path = tmp_path / "random.safetensors"
    train_classifier(digits, path, epochs=0, progress=False)  # 0 epochs: random weights, real file format
    return path


def test_feature_extraction_does_not_depend_on_batch_size(random_classifier, digits):
    torch.set_default_dtype(torch.float32)
    extractor = make_extractor(f"classifier:{random_classifier}")
    images = levels_to_uint8(digits.x_test[:40], digits.levels)
    one = extract(extractor, images, batch_size=1)["features"]
    many = extract(extractor, images, batch_size=40)["features"]
    torch.testing.assert_close(one, many, atol=1e-5, rtol=1e-5)


def test_fid_kid_precision_recall_equal_torch_fidelity(tmp_path, random_classifier, digits):
    """The whole `cqf eval` pipeline on an .npz of images vs torch_fidelity.calculate_metrics, same extractor."""
    import torch_fidelity

    torch.set_default_dtype(torch.float32)
    generated = 16 - digits.x_test[:300]  # inverted digits: clearly unlike the reference
    np.savez(tmp_path / "gen.npz", x=levels_to_uint8(generated, 17)[:, 0].numpy())  # NHW uint8 0..255
    ours = evaluate(tmp_path / "gen.npz", data="digits", metrics=("fid", "kid", "pr"),
                    features=f"classifier:{random_classifier}", num_samples=300, num_reference=500, progress=False)
    # image files are 0..255; the evaluator maps the reference's 17 levels to 0..255 the same way
    from cqf.config import DataConfig
    from cqf.data import load_dataset
    from cqf.quality import fixed_subset

    x_train = load_dataset("digits", val_size=DataConfig().val_size).x_train
    ref = levels_to_uint8(fixed_subset(x_train, 500), 17)
    theirs = torch_fidelity.calculate_metrics(
        input1=ImagesDataset(levels_to_uint8(generated, 17)), input2=ImagesDataset(ref), cuda=False, fid=True, kid=True,
        prc=True, feature_extractor="cqf-classifier", feature_extractor_weights_path=str(random_classifier),
        feature_layer_fid="features", feature_layer_kid="features", feature_layer_prc="features",
        kid_subset_size=300, save_cpu_ram=True, verbose=False, cache=False,
    )
    assert ours["metrics"]["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-4)
    assert ours["metrics"]["kid_mean"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-4)
    assert ours["metrics"]["precision"] == pytest.approx(theirs["precision"], abs=1e-6)
    assert ours["metrics"]["recall"] == pytest.approx(theirs["recall"], abs=1e-6)


def test_protocol_block_is_complete_and_cached(tmp_path, random_classifier, digits, monkeypatch):
    import cqf.checkpoint
    import cqf.evaluate
    from cqf.train import train

    torch.set_default_dtype(torch.float32)
    train(tiny_config(steps=2, eval_iw_samples=0), tmp_path / "run", data=digits, progress=False)
    kwargs = dict(metrics=("bpd", "fid", "kid", "is", "pr", "dc"), features=f"classifier:{random_classifier}",
                  num_samples=200, num_reference=300, iw_samples=3, max_images=50, cache_dir=str(tmp_path / "cache"),
                  neighbours=str(tmp_path / "nn.png"), progress=False)
    calls = []
    for module, name in [(cqf.evaluate, "load"), (cqf.evaluate, "load_dataset")]:
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    first = evaluate(tmp_path / "run" / "model.safetensors", **kwargs)
    assert sorted(calls) == ["load", "load_dataset"]  # the model and the data set are loaded once each
    bpd_only = evaluate(tmp_path / "run" / "model.safetensors", **(kwargs | {"metrics": ("bpd",)}))
    assert bpd_only["bits_per_dim"] == first["bits_per_dim"]
    protocol = first["protocol"]
    assert protocol["generated"]["num_images"] == 200 and len(protocol["generated"]["sha256"]) == 64
    assert protocol["generated"]["seed"] == 0 and protocol["generated"]["variant"] == "VAE-F"
    assert protocol["reference"] == {"data": "digits", "split": "train", "num_images": 300, "features_cached": False}
    assert protocol["extractor"]["name"] == "classifier" and len(protocol["extractor"]["weights_sha256"]) == 64
    assert "fewer than the protocol's 50000" in protocol["note"]
    assert first["bits_per_dim"]["iw_samples"] == 3 and first["bits_per_dim"]["num_images"] == 50
    assert set(first["metrics"]) == {"fid", "kid_mean", "kid_std", "is_mean", "is_std", "precision", "recall",
                                     "density", "coverage"}
    assert (tmp_path / "nn.png").stat().st_size > 0
    json.dumps(first)  # serialisable as the results file
    assert "FID" in format_table(first) and "bits/dim test, IWAE-3" in format_table(first)
    second = evaluate(tmp_path / "run" / "model.safetensors", **kwargs)
    assert second["protocol"]["reference"]["features_cached"] is True
    assert second["metrics"] == first["metrics"]  # same seed, same cache: same numbers


@pytest.mark.parametrize("shift", [0.0, 3.0])
def test_the_protocol_records_the_share_of_sample_pixels_beyond_the_data_range(tmp_path, random_classifier, digits,
                                                                               monkeypatch, shift):
    """`protocol.generated.out_of_range` and `far_out_of_range` are the shares of the scored samples' pixels with
    |x| > 1 (clipped in the images) and |x| > 2, counted by hand from the same draws; above 1% far beyond, the
    result says so in a note (a shift of the decoder's output by 3 puts most pixels there; none otherwise)."""
    import cqf.evaluate
    from cqf.train import train

    torch.set_default_dtype(torch.float32)
    train(tiny_config(steps=2, eval_iw_samples=0), tmp_path / "run", data=digits, progress=False)
    loaded = []

    def load_shifted(*args, _load=cqf.evaluate.load, **kwargs):
        result = _load(*args, **kwargs)
        with torch.no_grad():
            result.model.decoder.last.bias.add_(shift)
        loaded.append(result.model)
        return result

    monkeypatch.setattr(cqf.evaluate, "load", load_shifted)
    result = evaluate(tmp_path / "run" / "model.safetensors", metrics=("fid",),
                      features=f"classifier:{random_classifier}", num_samples=200, num_reference=300,
                      cache_dir=str(tmp_path / "cache"), progress=False)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        x = loaded[0].sample(200).double()
    generated = result["protocol"]["generated"]
    assert generated["out_of_range"] == pytest.approx((x.abs() > 1).double().mean().item(), abs=1e-12)
    assert generated["far_out_of_range"] == pytest.approx((x.abs() > 2).double().mean().item(), abs=1e-12)
    assert generated["out_of_range"] > 0.05  # an untrained model's noise crosses the edge; shift 3 goes far past
    assert (generated["far_out_of_range"] > 0.5) == (shift > 0)
    assert (generated["far_out_of_range"] < 0.01) == (shift == 0)
    noted = [n for n in result["notes"] if "beyond the data range" in n]
    assert bool(noted) == (shift > 0)
    assert all(f"note: {note}" in format_table(result) for note in noted)


def test_sample_images_counts_values_that_are_not_finite_as_far_beyond_the_range():
    from cqf.quality import sample_images

    class Fixed:
        levels = 256

        def sample(self, num, noise=True):
            return torch.tensor([0.5, 1.5, -2.5, float("nan"), float("inf"), 0.0]).view(1, 1, 2, 3).repeat(num, 1, 1, 1)

    stats = {}
    images = sample_images(Fixed(), 4, stats=stats)
    assert images.shape == (4, 1, 2, 3)
    assert stats == {"out_of_range": 4 / 6, "far_out_of_range": 3 / 6}


@pytest.fixture()
def offline(monkeypatch):
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    def no_network(*args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(fe, "FeatureExtractorInceptionV3", no_network)
    monkeypatch.delenv("CQF_INCEPTION_WEIGHTS", raising=False)


def test_offline_inception_fails_once_and_other_metrics_still_run(tmp_path, digits, offline, capsys):
    from cqf.cli import main
    from cqf.features import INCEPTION_HINT
    from cqf.train import train

    torch.set_default_dtype(torch.float32)
    train(tiny_config(steps=2, eval_iw_samples=0), tmp_path / "run", data=digits, progress=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(tmp_path / "run" / "model.safetensors"), "--metrics", "all", "--num-samples", "64",
              "-k", "2", "--max-images", "20", "--json", str(tmp_path / "e.json"), "--quiet"])
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert (out + err).count(INCEPTION_HINT) == 1  # one message, not one per metric
    assert err.strip().splitlines()[-1].startswith("cqf: error: ") and "--inception-weights" in err
    result = json.loads((tmp_path / "e.json").read_text())
    assert math.isfinite(result["bits_per_dim"]["bpd_elbo"]) and "fid" in result["unavailable"]


def test_default_metrics_fit_the_data(tmp_path, digits, offline, capsys):
    """On digits Inception features mean little: by default bits/dim only, and how to get domain features."""
    from cqf.cli import main
    from cqf.train import train

    torch.set_default_dtype(torch.float32)
    train(tiny_config(steps=2, eval_iw_samples=0), tmp_path / "run", data=digits, progress=False)
    main(["eval", str(tmp_path / "run" / "model.safetensors"), "-k", "2", "--max-images", "20", "--json",
          str(tmp_path / "e.json"), "--quiet"])  # exits normally: nothing asked for is missing
    out = capsys.readouterr().out
    assert out.count("cqf classifier train digits") == 1 and "--features classifier:" in out
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["protocol"]["metrics"] == ["bpd"] and result["metrics"] == {} and not result["unavailable"]
    assert math.isfinite(result["bits_per_dim"]["bpd_elbo"])


def test_default_metrics_by_image_and_features():
    from cqf.quality import FEATURE_METRICS, default_metrics

    assert default_metrics((3, 32, 32), "inception", True, True, "cifar10") == (("bpd", *FEATURE_METRICS), "")
    assert default_metrics((1, 28, 28), "classifier:c.safetensors", True, True, "mnist")[0] == ("bpd", *FEATURE_METRICS)
    assert default_metrics((1, 28, 28), "inception", True, True, "mnist")[0] == ("bpd",)
    assert default_metrics((1, 28, 28), "inception", False, False, "mnist")[0] == FEATURE_METRICS  # images: asked for
    assert default_metrics((3, 32, 32), "inception", True, False, "cifar10")[0] == FEATURE_METRICS  # a GAN
    nothing, note = default_metrics((1, 8, 8), "inception", True, False, "digits")  # a digits GAN
    assert nothing == () and "--gan-bpd" in note and "cqf classifier train digits" in note


def test_all_metrics_is_best_effort_and_named_metrics_are_required(tmp_path, random_classifier, digits, capsys):
    """--metrics all on a GAN without --gan-bpd: the rest is computed, exit 0; --metrics bpd: an error."""
    import dataclasses

    from cqf.cli import main
    from cqf.train import train

    torch.set_default_dtype(torch.float32)
    base = tiny_config(steps=1, quality_weight=1.0, eval_every=0, sample_every=0)
    gan = dataclasses.replace(base, model=dataclasses.replace(base.model, flow_couplings=0),
                              train=dataclasses.replace(base.train, coverage_weight=0.0))
    train(gan, tmp_path / "gan", data=digits, progress=False)
    args = ["eval", str(tmp_path / "gan" / "model.safetensors"), "--features", f"classifier:{random_classifier}",
            "--num-samples", "200", "--num-reference", "300", "--json", str(tmp_path / "e.json"), "--quiet"]
    main([*args, "--metrics", "all"])
    assert "unavailable: bpd" in capsys.readouterr().out
    assert "fid" in json.loads((tmp_path / "e.json").read_text())["metrics"]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--metrics", "bpd"])
    assert exit_info.value.code == 2 and "bpd unavailable" in capsys.readouterr().err


def test_classifier_learns_digits(tmp_path, digits):
    from cqf.features import train_classifier

    torch.set_default_dtype(torch.float32)
    info = train_classifier(digits, tmp_path / "c.safetensors", progress=False)  # the default epochs
    assert info["test_accuracy"] > 0.9  # 10 classes: chance is 0.1
    extractor = ClassifierExtractor("cqf-classifier", ["features"], str(tmp_path / "c.safetensors"))
    assert extractor.info["test_accuracy"] == info["test_accuracy"]
