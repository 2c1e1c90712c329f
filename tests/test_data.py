"""Data sets: loaders, splits, validation of shapes and files, deterministic batches."""

import numpy as np
import pytest
import torch

from cqf import data as cqf_data
from cqf.data import batch_indices, load_dataset
from cqf.errors import DataError


def test_digits_are_embedded_with_17_levels(digits):
    assert digits.levels == 17 and digits.image_shape == (1, 8, 8)
    assert len(digits.x_train) + len(digits.x_val) + len(digits.x_test) == 1797
    assert len(digits.x_val) == 40
    assert digits.x_train.dtype == torch.uint8 and int(digits.x_train.max()) == 16


def test_digits_splits_partition_the_data_set(digits):
    """train, val and test together are scikit-learn's 1,797 digits, each image exactly once (as a multiset of
    (image, label): the data set holds a few duplicate images), with the fixed 20% test split."""
    from collections import Counter

    from sklearn.datasets import load_digits

    def items(x, y):
        pairs = zip(x, y, strict=True)
        return Counter((image.numpy().astype(np.uint8).tobytes(), int(label)) for image, label in pairs)

    full = load_digits()
    expected = items(torch.from_numpy(full.images)[:, None], torch.from_numpy(full.target))
    ours = (items(digits.x_train, digits.y_train) + items(digits.x_val, digits.y_val)
            + items(digits.x_test, digits.y_test))
    assert ours == expected
    assert len(digits.x_test) == 1797 // 5 and len(digits.x_val) == 40


def _write_npz(path, x_train, x_test, **extra):
    np.savez(path, x_train=x_train, y_train=np.arange(len(x_train)) % 10,
             x_test=x_test, y_test=np.arange(len(x_test)) % 10, **extra)


@pytest.mark.parametrize("shape,expected", [((12, 6, 6), (1, 6, 6)), ((12, 6, 6, 3), (3, 6, 6))])
def test_npz_reads_nhw_and_nhwc(tmp_path, shape, expected):
    rng = np.random.default_rng(0)
    x_train = rng.integers(0, 256, shape, dtype=np.uint8)
    _write_npz(tmp_path / "d.npz", x_train, x_train[:4])
    ds = load_dataset(f"npz:{tmp_path / 'd.npz'}", val_size=2)
    assert ds.image_shape == expected and ds.levels == 256
    assert len(ds.x_train) == 10 and len(ds.x_val) == 2 and len(ds.x_test) == 4
    expected_test = x_train[:4].transpose(0, 3, 1, 2) if len(shape) == 4 else x_train[:4, None]
    assert torch.equal(ds.x_test, torch.from_numpy(np.ascontiguousarray(expected_test)))  # channels kept in order


def test_npz_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_dataset(f"npz:{tmp_path / 'missing.npz'}")
    np.savez(tmp_path / "partial.npz", x_train=np.zeros((4, 6, 6), np.uint8))
    with pytest.raises(DataError, match="lacks arrays y_train, x_test, y_test"):
        load_dataset(f"npz:{tmp_path / 'partial.npz'}")
    _write_npz(tmp_path / "float.npz", np.zeros((4, 6, 6), np.float32), np.zeros((2, 6, 6), np.float32))
    with pytest.raises(DataError, match="uint8"):
        load_dataset(f"npz:{tmp_path / 'float.npz'}")
    _write_npz(tmp_path / "shape.npz", np.zeros((4, 6), np.uint8), np.zeros((2, 6), np.uint8))
    with pytest.raises(DataError, match="NHW or NHWC"):
        load_dataset(f"npz:{tmp_path / 'shape.npz'}")
    with pytest.raises(DataError, match="unknown data set 'svhn'"):
        load_dataset("svhn")


def test_torchvision_offline_error_says_where_to_put_files(tmp_path, monkeypatch):
    import torchvision.datasets

    class Offline:
        def __init__(self, root, train, download):
            raise RuntimeError("Dataset not found") if not download else OSError("network unreachable")

    monkeypatch.setattr(torchvision.datasets, "MNIST", Offline)
    with pytest.raises(DataError) as err:
        load_dataset("mnist", root=tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message and "\n" not in message and "npz:PATH" in message


def test_batches_are_a_function_of_the_step():
    a = [batch_indices(s, 100, 32, seed=3) for s in range(9)]
    b = [batch_indices(s, 100, 32, seed=3) for s in range(9)]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    epoch0 = torch.cat(a[:3])
    assert len(set(epoch0.tolist())) == 96  # no repeats within an epoch (drop-last)
    assert not torch.equal(a[0], a[3])  # the next epoch is reshuffled


def test_to_unit_maps_levels_to_unit_interval():
    k = torch.arange(17)
    x = cqf_data.dequantize(k, 17)
    torch.testing.assert_close(cqf_data.to_unit(x, 17), k / 16)
