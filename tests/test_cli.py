"""The command line: one-line errors with non-zero exit, and train -> sample -> eval end to end."""

import json

import pytest
import torch

from cqf.cli import main


def _error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("cqf: error:") and "\n" not in err, err
    return err


def test_unknown_key_names_the_valid_keys(capsys):
    err = _error(capsys, ["train", "--set", "train.stepz=3"])
    assert "train.stepz" in err and "steps" in err


def test_wrong_type_and_bad_override(capsys):
    assert "expected int" in _error(capsys, ["train", "--set", "train.steps=many"])
    assert "KEY=VALUE" in _error(capsys, ["train", "--set", "train.steps"])


def test_unknown_config_lists_bundled_ones(capsys):
    err = _error(capsys, ["train", "no-such-config"])
    assert "digits-vae-f" in err


def test_impossible_combination(capsys):
    both_zero = ["--set", "train.coverage_weight=0", "--set", "train.quality_weight=0"]
    assert "nothing to train" in _error(capsys, ["train", *both_zero])
    assert "has no flow" in _error(capsys, ["train", "digits-cq-f", "--set", "train.coverage_weight=0"])


def test_list_and_dry_run(capsys):
    main(["train", "--list"])
    assert "mnist-vae-f" in capsys.readouterr().out
    main(["train", "mnist-vae", "--set", "train.lr=3e-4", "--dry-run"])
    resolved = json.loads(capsys.readouterr().out)
    assert resolved["train"]["lr"] == 3e-4 and resolved["data"]["name"] == "mnist"


def test_train_on_missing_data_leaves_no_run_folder(capsys, tmp_path):
    out, kept = tmp_path / "new" / "run", tmp_path / "kept"
    kept.mkdir()
    for folder in (out, kept):
        with pytest.raises(SystemExit) as exit_info:
            main(["train", "digits-vae", "--out", str(folder), "--set", f"data.name=npz:{tmp_path / 'absent.npz'}"])
        last = capsys.readouterr().err.strip().splitlines()[-1]  # after the "training ... -> folder" line
        assert exit_info.value.code != 0 and last.startswith("cqf: error:") and "absent.npz not found" in last
    assert not out.parent.exists() and kept.is_dir()  # nor its parent made with it; a folder the user made stays


def test_bad_checkpoints(capsys, tmp_path):
    assert "not found" in _error(capsys, ["eval", str(tmp_path / "none.pt")])
    (tmp_path / "junk.pt").write_bytes(b"junk")
    assert "corrupt" in _error(capsys, ["sample", str(tmp_path / "junk.pt")])


def test_train_sample_eval_end_to_end(capsys, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "data: {name: digits, val_size: 40}\n"
        "model: {latent_dim: 4, channels: 8, flow_couplings: 1, flow_hidden: 8}\n"
        "train: {steps: 3, batch_size: 16, eval_every: 0, sample_every: 0, ckpt_every: 0, eval_iw_samples: 2}\n"
    )
    run = tmp_path / "run"
    main(["train", str(config), "--out", str(run), "--quiet"])
    main(["sample", str(run / "ckpt-0000003.pt"), "-n", "9", "--out", str(tmp_path / "grid.png")])
    assert (tmp_path / "grid.png").stat().st_size > 0
    main(["eval", str(run / "model.safetensors"), "--metrics", "bpd", "-k", "3", "--max-images", "20",
          "--json", str(tmp_path / "e.json")])
    out = capsys.readouterr().out
    assert "IWAE-3" in out and "| bits/dim test, ELBO" in out
    bpd = json.loads((tmp_path / "e.json").read_text())["bits_per_dim"]
    assert bpd["num_images"] == 20 and bpd["variant"] == "VAE-F" and len(bpd["checkpoint_sha256"]) == 64
    assert torch.isfinite(torch.tensor(bpd["bpd_iwae"]))

    # N PNG files that other tools read, identical to the in-memory samples
    from cqf import load
    from cqf.images import load_image_folder
    from cqf.quality import sample_images

    main(["sample", str(run / "model.safetensors"), "-n", "5", "--out", str(tmp_path / "pngs"), "--seed", "3"])
    files = sorted((tmp_path / "pngs").glob("*.png"))
    assert len(files) == 5
    expected = sample_images(load(run / "model.safetensors"), 5, seed=3)
    assert torch.equal(load_image_folder(tmp_path / "pngs", channels=1), expected)

    # --no-noise's samples: f^-1(mu(z)) at the same z, without the decoder noise
    from cqf.data import levels_to_uint8, to_levels

    model = load(run / "model.safetensors")
    torch.manual_seed(3)
    means = levels_to_uint8(to_levels(model.sample(5, noise=False), 17), 17)
    assert torch.equal(sample_images(model, 5, seed=3, noise=False), means)
    assert not torch.equal(means, expected)
    main(["sample", str(run / "model.safetensors"), "-n", "5", "--out", str(tmp_path / "means"), "--seed", "3",
          "--no-noise"])
    assert torch.equal(load_image_folder(tmp_path / "means", channels=1), means)


def test_report_table_and_plot(tmp_path, capsys):
    for name, variant, bpd, fid in (("a", "VAE-F", 3.5, 112.0), ("b", "CQ-F", 3.9, 28.0)):
        run = tmp_path / name
        run.mkdir()
        (run / "eval.json").write_text(json.dumps({
            "protocol": {"generated": {"variant": variant}, "reference": {"split": "train"}},
            "bits_per_dim": {"bpd_elbo": bpd, "bpd_iwae": bpd - 0.1}, "metrics": {"fid": fid, "recall": 0.5},
            "unavailable": {}}))
    main(["report", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "rep")])
    table = (tmp_path / "rep" / "report.md").read_text()
    assert "| b | CQ-F | 3.900 | 3.800 | – | 28.000 |" in table
    assert (tmp_path / "rep" / "bpd_fid.png").stat().st_size > 1000
    assert "no-such" in _error(capsys, ["report", str(tmp_path / "no-such")])
