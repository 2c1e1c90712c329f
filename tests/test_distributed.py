"""torchrun: 2 gloo processes on the CPU train the single-process run (same global batch) to float rounding."""

import json
import os
import subprocess
import sys

import pytest
import torch

from cqf import distributed
from cqf.errors import ConfigError
from cqf.files import read_safetensors

OVERRIDES = ["train.steps=6", "train.batch_size=32", "train.warmup_steps=2", "train.quality_ramp_steps=2",
             "train.log_every=2", "train.eval_every=3", "train.ckpt_every=3", "train.sample_every=0",
             "train.eval_iw_samples=2", "train.num_threads=1", "train.augment=color,translation,cutout",
             "train.quality_batch_size=16",
             "train.device=cpu"]


def _cqf_train(out, processes: int) -> None:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] \
        if processes > 1 else [sys.executable]
    command = [*launcher, "-m", "cqf", "train", "digits-cq-f", "--out", str(out), "--quiet"]
    for item in OVERRIDES:
        command += ["--set", item]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_two_processes_train_the_single_process_run(tmp_path):
    _cqf_train(tmp_path / "one", 1)
    _cqf_train(tmp_path / "two", 2)  # finish() checks that the two replicas are identical
    one, _ = read_safetensors(tmp_path / "one" / "model.safetensors", "cqf-checkpoint-v1", "model", ValueError)
    two, _ = read_safetensors(tmp_path / "two" / "model.safetensors", "cqf-checkpoint-v1", "model", ValueError)
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-3, atol=1e-5, msg=name)
    records = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss_coverage" in r]
    assert steps == [2, 4, 6]  # one line per log step: only rank 0 writes
    assert "loss_quality" in [r for r in records if "loss_coverage" in r][-1]
    reference = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    for mine, theirs in zip(records, reference, strict=True):  # logged losses are means over the ranks
        if "loss_coverage" in mine:
            assert mine["loss_coverage"] == pytest.approx(theirs["loss_coverage"], rel=1e-3)
            assert ("loss_quality" in mine) == ("loss_quality" in theirs)
            if "loss_quality" in mine:
                assert mine["loss_quality"] == pytest.approx(theirs["loss_quality"], rel=1e-2, abs=1e-3)
    results_one = json.loads((tmp_path / "one" / "results.json").read_text())
    results_two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert results_two["bpd_elbo"] == pytest.approx(results_one["bpd_elbo"], abs=0.02)  # other dequantization noise
    assert results_one["dequantization_seed"] == 0
    assert results_two["dequantization_seed"] == [0, 1]  # what each rank used, in rank order
    assert sum(results_two["images_per_rank"]) == results_two["num_images"] == results_one["num_images"]
    assert sorted(p.name for p in (tmp_path / "two").glob("ckpt-*.pt")) == ["ckpt-0000003.pt", "ckpt-0000006.pt"]


def test_the_global_batches_must_divide_over_the_processes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match=r"train\.batch_size: a global batch of 32 images.*multiple of 3"):
        distributed.check_global_batches(batch_size=32, quality_batch_size=9)
    with pytest.raises(ConfigError, match=r"train\.quality_batch_size: a global batch of 16 images.*multiple of 3"):
        distributed.check_global_batches(batch_size=33, quality_batch_size=16)
    distributed.check_global_batches(batch_size=33, quality_batch_size=9)


def test_sharded_draws_are_the_rows_of_the_single_process_draw(monkeypatch):
    """Rank r's per-sample noise is rows [r B/N, (r+1) B/N) of the draw one process makes for the whole batch."""
    torch.manual_seed(5)
    whole = distributed.randn_rows(8, 3)
    parts = []
    for rank in range(2):
        monkeypatch.setattr(distributed, "_CONTEXT", distributed.Context(rank=rank, world=2))
        torch.manual_seed(5)
        with distributed.shard():
            parts.append(distributed.randn_rows(4, 3))
        assert torch.equal(distributed.shard_rows(torch.arange(8)), torch.arange(4 * rank, 4 * rank + 4))
    assert torch.equal(torch.cat(parts), whole)
