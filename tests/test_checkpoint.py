"""Checkpoint files: which one is the newest, and what pruning keeps."""

from cqf import checkpoint


def test_latest_and_prune_order_checkpoints_by_step_past_the_zero_padding(tmp_path):
    """Names are zero-padded to 7 digits: step 10,000,000 sorts before 9,999,999 by name, not by step."""
    for step in (9_999_998, 9_999_999, 10_000_000, 10_000_001):
        (tmp_path / f"ckpt-{step:07d}.pt").write_bytes(b"")
    (tmp_path / "ckpt-notes.pt").write_bytes(b"")  # not a step checkpoint: neither newest nor pruned
    assert checkpoint.latest(tmp_path).name == "ckpt-10000001.pt"
    checkpoint.prune(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.glob("ckpt-*.pt")) == ["ckpt-10000000.pt", "ckpt-10000001.pt",
                                                                 "ckpt-notes.pt"]
