"""Data sets at the paper's sizes (cqf.datasets): small files in the real on-disk formats, decoded pixel-exactly."""

import io
import os
import re
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from cqf import datasets
from cqf.config import DataConfig
from cqf.data import load_dataset
from cqf.errors import ConfigError, DataError

from .conftest import tiny_config


def _one_line_error(match: str, *args, **kwargs) -> str:
    with pytest.raises(DataError, match=re.escape(match)) as err:
        load_dataset(*args, **kwargs)
    assert "\n" not in str(err.value)
    return str(err.value)


def _pairs(x, y) -> list:
    """(image bytes, label) of each image, sorted: load_dataset shuffles train to hold out its val slice."""
    return sorted((np.asarray(image).tobytes(), int(label)) for image, label in zip(x, y, strict=True))


def _rgb(array_hwc: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(array_hwc, dtype=np.uint8))


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


# -- STL-10 ----------------------------------------------------------------------------------------------------


def _stl_file(images_nchw: np.ndarray) -> bytes:
    """The official layout, written independently of the decoder: each channel flattened column by column."""
    return b"".join(channel.flatten(order="F").tobytes() for image in images_nchw for channel in image)


def _write_stl(root, num_train=3, num_unlabelled=2, num_test=2, seed=0):
    rng = np.random.default_rng(seed)
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    images = {}
    for name, count in [("train", num_train), ("unlabeled", num_unlabelled), ("test", num_test)]:
        images[name] = rng.integers(0, 256, (count, 3, 96, 96), dtype=np.uint8)
        (folder / f"{name}_X.bin").write_bytes(_stl_file(images[name]))
    (folder / "train_y.bin").write_bytes(bytes([1, 10, 4][:num_train]))
    (folder / "test_y.bin").write_bytes(bytes([7, 2][:num_test]))
    return images


def test_stl10_decodes_the_column_major_layout(tmp_path):
    raw = np.zeros(3 * 96 * 96, np.uint8)
    raw[0 * 9216 + 5 * 96 + 2] = 11  # channel 0, column 5, row 2
    raw[2 * 9216 + 1 * 96 + 90] = 22  # channel 2, column 1, row 90
    image = datasets.decode_stl10(raw, tmp_path / "x.bin")[0]
    assert image.shape == (3, 96, 96) and image[0, 2, 5] == 11 and image[2, 90, 1] == 22 and image.sum() == 33

    images = _write_stl(tmp_path)
    ds = load_dataset("stl10", root=tmp_path, val_size=0, image_size=96)  # full size: no resize
    assert ds.levels == 256 and ds.x_train.dtype == torch.uint8 and ds.image_shape == (3, 96, 96)
    # train = the labelled train images and the unlabelled ones (label -1); labels 1..10 -> 0..9
    assert _pairs(ds.x_train, ds.y_train) == _pairs(np.concatenate([images["train"], images["unlabeled"]]),
                                                    [0, 9, 3, -1, -1])
    assert ds.y_train.dtype == torch.int64
    assert torch.equal(ds.x_test, torch.from_numpy(images["test"])) and ds.y_test.tolist() == [6, 1]


def test_stl10_is_48x48_by_default_by_area_averaging(tmp_path):
    images = _write_stl(tmp_path)
    ds = load_dataset("stl10", root=tmp_path, val_size=0)
    assert ds.image_shape == (3, 48, 48) and len(ds.x_train) == 5 and len(ds.x_test) == 2
    # A 2x box reduction is the mean of each 2x2 block (PIL rounds in fixed point: within 1 level).
    means = images["test"].reshape(2, 3, 48, 2, 48, 2).astype(float).mean(axis=(3, 5))
    assert np.abs(ds.x_test.numpy() - means).max() <= 1


def test_stl10_refuses_missing_and_broken_files(tmp_path):
    message = _one_line_error("stl10", "stl10", root=tmp_path)
    assert str(tmp_path / "stl10_binary" / "train_X.bin") in message and "$CQF_DATA" in message
    _write_stl(tmp_path)
    train_x = tmp_path / "stl10_binary" / "train_X.bin"
    train_x.write_bytes(train_x.read_bytes()[:-5])  # truncated
    _one_line_error(f"stl10: {train_x} is truncated", "stl10", root=tmp_path, image_size=96)
    train_x.write_bytes(_stl_file(np.zeros((2, 3, 96, 96), np.uint8)))  # 2 images, 3 labels
    _one_line_error(f"{tmp_path / 'stl10_binary' / 'train_y.bin'} holds 3 labels for 2 images", "stl10",
                    root=tmp_path, image_size=96)


# -- CelebA ----------------------------------------------------------------------------------------------------


def _celeba_image(seed: int) -> np.ndarray:
    """178x218 (W x H): 255 outside the centre 140x140 crop (columns 19..158, rows 39..178); inside, channel 0 is
    10 + seed in the top half and 200 in the bottom half, channel 1 is 50 on the left and 150 on the right."""
    image = np.full((218, 178, 3), 255, np.uint8)
    crop = image[39:179, 19:159]
    crop[:70, :, 0], crop[70:, :, 0] = 10 + seed, 200
    crop[:, :70, 1], crop[:, 70:, 1] = 50, 150
    crop[:, :, 2] = 0
    return image


def _write_celeba(root, partitions=(0, 1, 2, 0, 2)):
    folder = root / "celeba" / "img_align_celeba"
    folder.mkdir(parents=True)
    lines = []
    for i, part in enumerate(partitions):
        name = f"{i + 1:06d}.jpg"
        _rgb(_celeba_image(i)).save(folder / name, quality=100, subsampling=0)
        lines.append(f"{name} {part}\n")
    (root / "celeba" / "list_eval_partition.txt").write_text("".join(lines))


def test_celeba64_centre_crop_and_partitions(tmp_path):
    _write_celeba(tmp_path)
    ds = load_dataset("celeba64", root=tmp_path, val_size=0)
    assert ds.image_shape == (3, 64, 64) and len(ds.x_train) == 2 and len(ds.x_test) == 2  # partition 1 dropped
    assert ds.y_train.tolist() == [0, 0] and ds.x_train.dtype == torch.uint8
    # The crop's halves map onto the output's halves exactly (70 px -> 32 px) and no border (255) leaks in;
    # JPEG at quality 100 moves values by a level or two.
    reds = []
    for image in torch.cat([ds.x_train, ds.x_test]).int():
        reds.append(int(image[0, 0, 0]))
        assert (image[0, :32] - reds[-1]).abs().max() <= 2 and (image[0, 32:] - 200).abs().max() <= 2
        assert (image[1, :, :32] - 50).abs().max() <= 2 and (image[1, :, 32:] - 150).abs().max() <= 2
        assert image[2].max() <= 2  # the border's 255 would show here
    # train = images 1 and 4 (partition 0: red 10 + 0, 10 + 3), test = 3 and 5 (partition 2: 12, 14)
    assert np.abs(np.array(sorted(reds[:2]) + reds[2:]) - [10, 13, 12, 14]).max() <= 2


def test_celeba64_refuses_missing_and_broken_files(tmp_path):
    message = _one_line_error("celeba64", "celeba64", root=tmp_path)
    assert str(tmp_path / "celeba" / "list_eval_partition.txt") in message
    _write_celeba(tmp_path)
    (tmp_path / "celeba" / "img_align_celeba" / "000004.jpg").unlink()
    _one_line_error(f"{tmp_path / 'celeba' / 'img_align_celeba' / '000004.jpg'} not found", "celeba64",
                    root=tmp_path)
    broken = tmp_path / "celeba" / "img_align_celeba" / "000004.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    _one_line_error(f"cannot read image {broken}", "celeba64", root=tmp_path)


# -- ImageNet 64x64 --------------------------------------------------------------------------------------------


def _write_imagenet(root, per_batch=2, seed=0):
    rng = np.random.default_rng(seed)
    written = {}
    for folder, name in [("Imagenet64_train_npz", f"train_data_batch_{i}") for i in range(1, 11)] + [
            ("Imagenet64_val_npz", "val_data")]:
        (root / folder).mkdir(exist_ok=True)
        data = rng.integers(0, 256, (per_batch, 3 * 64 * 64), dtype=np.uint8)
        labels = rng.integers(1, 1001, per_batch).tolist()  # a list, as in the official files
        np.savez(root / folder / f"{name}.npz", data=data, labels=labels, mean=np.zeros(3 * 64 * 64))
        written[name] = (data, labels)
    return written


def test_imagenet64_channel_major_rows_and_1_based_labels(tmp_path):
    row = np.zeros((1, 3 * 64 * 64), np.uint8)
    row[0, 0 * 4096 + 3 * 64 + 7] = 1  # red, row 3, column 7
    row[0, 1 * 4096 + 0 * 64 + 63] = 2  # green, row 0, column 63
    row[0, 2 * 4096 + 63 * 64 + 0] = 3  # blue, row 63, column 0
    image = datasets.decode_imagenet64_rows(row)[0]
    assert image[0, 3, 7] == 1 and image[1, 0, 63] == 2 and image[2, 63, 0] == 3 and image.sum() == 6

    written = _write_imagenet(tmp_path)
    ds = load_dataset("imagenet64", root=tmp_path, val_size=0)
    assert ds.image_shape == (3, 64, 64) and len(ds.x_train) == 20 and len(ds.x_test) == 2

    def official(name):  # the decoding of the data set's own reader: dstack the planes, reshape to NHWC
        data, labels = written[name]
        hwc = np.dstack([data[:, :4096], data[:, 4096:8192], data[:, 8192:]]).reshape(-1, 64, 64, 3)
        return hwc.transpose(0, 3, 1, 2).copy(), [label - 1 for label in labels]

    train = [official(f"train_data_batch_{i}") for i in range(1, 11)]
    labels = [label for _, y in train for label in y]
    assert _pairs(ds.x_train, ds.y_train) == _pairs(np.concatenate([x for x, _ in train]), labels)
    x_test, y_test = official("val_data")
    assert torch.equal(ds.x_test, torch.from_numpy(x_test)) and ds.y_test.tolist() == y_test


def test_imagenet64_refuses_missing_and_broken_files(tmp_path):
    message = _one_line_error("imagenet64", "imagenet64", root=tmp_path)
    assert str(tmp_path / "Imagenet64_train_npz" / "train_data_batch_1.npz") in message and "10 more" in message
    _write_imagenet(tmp_path)
    batch = tmp_path / "Imagenet64_train_npz" / "train_data_batch_7.npz"
    np.savez(batch, labels=[1, 2])
    _one_line_error(f"{batch} has no array data", "imagenet64", root=tmp_path)
    np.savez(batch, data=np.zeros((2, 3 * 64 * 64), np.uint8), labels=[0, 1])
    _one_line_error(f"{batch} has 2 labels for 2 images or labels outside 1..1000", "imagenet64", root=tmp_path)
    batch.write_bytes(b"PK\x03\x04 truncated")
    _one_line_error(f"cannot read {batch}", "imagenet64", root=tmp_path)


# -- LSUN bedrooms (LMDB) --------------------------------------------------------------------------------------


def _lsun_images() -> list[tuple[np.ndarray, str]]:
    """Three images of other aspect ratios whose centre square is uniform and whose edges are not."""
    wide = np.full((64, 80, 3), 250, np.uint8)  # 80x64: no resize, crop columns 8..71
    wide[:, 8:72] = (10, 20, 30)
    tall = np.full((144, 96, 3), 250, np.uint8)  # 96x144: centre rows 24..119, resized 96 -> 64
    tall[24:120] = (40, 50, 60)
    square = np.full((128, 128, 3), (70, 80, 90), np.uint8)  # JPEG: within a few levels
    return [(wide, "WEBP"), (tall, "WEBP"), (square, "JPEG")]


def _write_lmdb(path, values: list[bytes]):
    lmdb = pytest.importorskip("lmdb")
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i, value in enumerate(values):
            txn.put(f"{i:040x}".encode(), value)  # LSUN's keys are 40 hex digits
    env.close()


def test_lsun_bedroom64_from_lmdb(tmp_path):
    values = [_encode(_rgb(a), fmt, lossless=True) if fmt == "WEBP" else _encode(_rgb(a), fmt, quality=100)
              for a, fmt in _lsun_images()]
    _write_lmdb(tmp_path / "bedroom_train_lmdb", values)
    ds = load_dataset("lsun-bedroom64", root=tmp_path, val_size=0)
    assert ds.image_shape == (3, 64, 64) and len(ds.x_train) == 2 and len(ds.x_test) == 1
    assert ds.y_train.tolist() == [0, 0] and ds.y_test.tolist() == [0]
    colours = {tuple(int(v) for v in image[:, 0, 0]) for image in torch.cat([ds.x_train, ds.x_test])}
    for image in torch.cat([ds.x_train, ds.x_test]):  # each image is its uniform centre: no 250 edge
        assert (image - image[:, :1, :1]).abs().max() <= 2 and image.max() < 200
    assert {(10, 20, 30), (40, 50, 60)} <= colours  # lossless WebP: exact
    train, test = datasets.held_out_split(3)
    assert len(test) == 1 and sorted([*train, *test]) == [0, 1, 2]


def test_lsun_bedroom64_refuses_missing_lmdb_package_and_empty_database(tmp_path, monkeypatch):
    message = _one_line_error("lsun-bedroom64", "lsun-bedroom64", root=tmp_path)
    assert str(tmp_path / "bedroom_train_lmdb" / "data.mdb") in message and "bedroom_train/" in message
    _write_lmdb(tmp_path / "bedroom_train_lmdb", [])
    _one_line_error(f"the LMDB {tmp_path / 'bedroom_train_lmdb'} has no entries", "lsun-bedroom64", root=tmp_path)
    _write_lmdb(tmp_path / "bedroom_train_lmdb", [b"one"])
    _one_line_error(f"lsun-bedroom64: {tmp_path / 'bedroom_train_lmdb'}: 1 image(s); at least 2", "lsun-bedroom64",
                    root=tmp_path)
    _write_lmdb(tmp_path / "bedroom_train_lmdb", [b"not an image"] * 2)
    _one_line_error(f"{'0' * 39}1 in {tmp_path / 'bedroom_train_lmdb'} (UnidentifiedImageError", "lsun-bedroom64",
                    root=tmp_path)  # key 1: the first training image
    monkeypatch.setitem(sys.modules, "lmdb", None)  # as if not installed
    _one_line_error("needs the lmdb package: pip install cqf[lsun]", "lsun-bedroom64", root=tmp_path)


# -- Image folders, and the cache ------------------------------------------------------------------------------


def _write_folder(folder, num=12):
    """`num` uniform 20x24 images of distinct colours in nested folders, in every format (lossless where
    possible), plus a file that is not an image."""
    formats = [("png", "PNG", {}), ("webp", "WEBP", {"lossless": True}), ("bmp", "BMP", {}),
               ("JPG", "JPEG", {"quality": 100}), ("jpeg", "JPEG", {"quality": 100})]
    colours = []
    for i in range(num):
        colour = (10 * i + 5, 255 - 10 * i, 100)
        suffix, fmt, options = formats[i % len(formats)]
        path = folder / f"d{i % 3}" / ("sub" if i % 2 else "") / f"img{i:02d}.{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        _rgb(np.full((24, 20, 3), colour, np.uint8)).save(path, format=fmt, **options)
        colours.append(colour)
    (folder / "d0" / "notes.txt").write_text("not an image")
    return colours


def test_folder_reads_nested_mixed_formats_with_a_fixed_held_out_slice(tmp_path):
    colours = _write_folder(tmp_path / "images")
    name = f"folder:{tmp_path / 'images'}"
    ds = load_dataset(name, root=tmp_path / "data", val_size=0, image_size=16)
    assert ds.image_shape == (3, 16, 16) and len(ds.x_train) == 11 and len(ds.x_test) == 1
    assert ds.y_train.tolist() == [0] * 11
    found = [tuple(int(v) for v in image[:, 8, 8]) for image in torch.cat([ds.x_train, ds.x_test])]
    matched = sorted(min(range(12), key=lambda i: sum(abs(a - b) for a, b in zip(c, colours[i], strict=True)))
                     for c in found)
    assert matched == list(range(12))  # every image exactly once, across train and test
    again = load_dataset(name, root=tmp_path / "other-root", val_size=0, image_size=16)  # not from the cache
    assert torch.equal(again.x_test, ds.x_test)  # the same held-out image every time
    _one_line_error("set data.image_size > 0", name, root=tmp_path)
    _one_line_error("is not a folder", f"folder:{tmp_path / 'nowhere'}", root=tmp_path, image_size=8)


def test_folder_of_grey_images_stays_grey_and_broken_images_are_named(tmp_path):
    for i in range(3):
        Image.fromarray(np.full((10, 10), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    ds = load_dataset(f"folder:{tmp_path}", root=tmp_path / "data", val_size=0, image_size=8)
    assert ds.image_shape == (1, 8, 8)
    (tmp_path / "3.png").write_bytes(b"\x89PNG broken")
    _one_line_error(f"cannot read image {tmp_path / '3.png'}", f"folder:{tmp_path}", root=tmp_path / "data",
                    image_size=8)


def test_cache_is_written_once_reused_and_rebuilt_when_a_source_changes(tmp_path, monkeypatch):
    _write_folder(tmp_path / "images", num=4)
    name, root = f"folder:{tmp_path / 'images'}", tmp_path / "data"
    first = load_dataset(name, root=root, val_size=0, image_size=8)
    caches = list((root / "cqf-cache").iterdir())
    assert len(caches) == 1 and caches[0].name.startswith("folder-images-") and caches[0].name.endswith("-8.npz")
    written = caches[0].stat().st_mtime_ns

    opened = []
    original_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(a) or original_open(*a, **k))
    second = load_dataset(name, root=root, val_size=0, image_size=8)
    assert opened == [] and caches[0].stat().st_mtime_ns == written  # read from the cache, not rewritten
    assert torch.equal(first.x_train, second.x_train) and torch.equal(first.x_test, second.x_test)

    source = min((tmp_path / "images").rglob("*.png"))
    os.utime(source, ns=(written + 10**9, written + 10**9))  # touched only: same size and content, new mtime
    third = load_dataset(name, root=root, val_size=0, image_size=8)
    assert len(opened) == 4 and caches[0].stat().st_mtime_ns != written  # every image decoded again, rewritten
    assert torch.equal(first.x_train, third.x_train)
    assert [p.name for p in (root / "cqf-cache").iterdir()] == [caches[0].name]  # no temporary files left
    load_dataset(name, root=root, val_size=0, image_size=8)
    assert len(opened) == 4  # the rebuilt cache is used again


# -- image_size in the config and the other data sets ----------------------------------------------------------


def test_image_size_is_validated_and_refused_by_data_sets_that_do_not_resize():
    with pytest.raises(ConfigError, match="data.image_size must be >= 0"):
        DataConfig(image_size=-1)
    assert load_dataset("digits", val_size=0, image_size=8).image_shape == (1, 8, 8)  # its own size is fine
    _one_line_error("data.image_size=16, but digits has 8x8 images and is not resized", "digits", image_size=16)


def test_training_on_a_folder_uses_data_image_size(tmp_path):
    """`cqf train --set data.name=folder:... --set data.image_size=8`: the size reaches the loader."""
    import dataclasses

    from cqf.checkpoint import load
    from cqf.train import train

    _write_folder(tmp_path / "images", num=12)
    cfg = tiny_config(steps=1, eval_every=0, sample_every=0, eval_iw_samples=0, batch_size=4)
    cfg = dataclasses.replace(cfg, data=DataConfig(name=f"folder:{tmp_path / 'images'}", root=str(tmp_path / "data"),
                                                   val_size=2, image_size=8))
    train(cfg, tmp_path / "run", progress=False)
    loaded = load(tmp_path / "run" / "ckpt-0000001.pt")
    assert loaded.image_shape == (3, 8, 8) and loaded.config.data.image_size == 8


def test_reference_feature_cache_tells_image_sizes_apart(tmp_path, monkeypatch):
    """Two sizes of one folder share a name: the cached Inception features of one must not serve the other."""
    from types import SimpleNamespace

    import cqf.features
    from cqf.quality import reference_features

    monkeypatch.setattr(cqf.features, "extract", lambda extractor, x, *a: {"f": x.flatten(1)[:, :4].double()})
    _write_folder(tmp_path / "images", num=12)
    extractor = SimpleNamespace(name="stub", sha256="0")
    cached = []
    for size in (8, 16, 8):
        data = load_dataset(f"folder:{tmp_path / 'images'}", root=tmp_path, val_size=0, image_size=size)
        cached.append(reference_features(extractor, data, "train", 0, tmp_path / "features", 11, "cpu", False)[1])
    assert cached == [False, False, True]


def test_domain_classifier_leaves_out_unlabelled_images(tmp_path):
    """STL-10's unlabelled images carry label -1: `cqf classifier train stl10` learns from the labelled ones."""
    from cqf.features import train_classifier

    _write_stl(tmp_path, num_train=3, num_unlabelled=8)
    data = load_dataset("stl10", root=tmp_path, val_size=0, image_size=8)
    assert (data.y_train == -1).sum() == 8
    info = train_classifier(data, tmp_path / "c.safetensors", epochs=2, batch_size=3, width=2, progress=False)
    assert info["num_classes"] == 10
