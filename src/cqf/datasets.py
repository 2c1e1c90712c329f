"""Data sets at the paper's sizes, read from the formats they are distributed in.

Registered in `cqf.data`'s registry (`load_dataset(name, root, val_size, image_size)`); `root` is `data.root`,
else $CQF_DATA, else ~/.cache/cqf. Every loader returns 8-bit images (levels 256) as uint8 (N, C, H, W) and
int64 labels (0-based; 0 where a split has none; -1 for STL-10's unlabelled images).

    name            expects under root                                             train / test        size
    stl10           stl10_binary/{unlabeled_X,train_X,train_y,test_X,test_y}.bin   unlabelled + train  48
                                                                                   / test
    celeba64        celeba/list_eval_partition.txt, celeba/img_align_celeba/*.jpg  partition 0 / 2     64
    imagenet64      Imagenet64_train_npz/train_data_batch_{1..10}.npz,             train / val         64
                    Imagenet64_val_npz/val_data.npz
    lsun-bedroom64  bedroom_train_lmdb/ (LMDB, needs `pip install cqf[lsun]`),     held-out slice      64
                    else bedroom_train/ (its images, any depth)
    folder:PATH     PATH/**/*.{jpg,jpeg,png,webp,bmp} (PATH, not under root)       held-out slice      image_size

Choices, the same for every data set:

- Geometry: the centre square of each image (side min(W, H), or 140 for CelebA's usual face crop; offsets
  floor((W - side) / 2), floor((H - side) / 2)) is resized to size x size with PIL's BOX filter: area averaging,
  antialiased, with no overshoot (a 2x reduction is the mean of each 2x2 block). This is "resize the shorter side,
  then centre-crop" without rounding the longer side. Chrabaszcz et al. (2017) chose box resizing for downsampled
  ImageNet.
- `image_size` (config `data.image_size`): 0 means the size in the table; any other size is resized from the
  source with the same geometry (folder:PATH requires it). STL-10 at 96 and ImageNet-64 at 64 are the source
  pixels, not resized.
- Held-out test slice where the data set has no test split (LSUN, folders): items sorted by key or path, then a
  permutation seeded with 0; its first min(10,000, max(1, N // 10)) items are the test split.
- Cache: decoded and resized images are written once to `<root>/cqf-cache/<name>-<size>.npz` (atomically; a
  folder's name there is `folder-<its name>-<hash of its path>`) and reused while the key stored in it matches: a
  hash of the relative path, size and mtime (ns) of every source file, the size and this module's cache format.
  Touching, adding or removing a source file rebuilds it. The raw formats read at their own size (STL-10 at 96,
  ImageNet-64 at 64) are not cached: reading them is a copy. The source must be present even when a cache exists
  (the key is made from it).
- Errors: a missing file is a one-line `DataError` with the data set, the exact expected path and where the
  files go; a broken file (truncated binary, npz without `data`, unreadable image, empty LMDB) names the file.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import os
import uuid
import zipfile
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .data import register_dataset
from .errors import DataError

__all__ = ["IMAGE_SUFFIXES", "decode_imagenet64_rows", "decode_stl10", "fit_square", "held_out_split"]

log = logging.getLogger("cqf")

CACHE_FORMAT = 1  # bump when the decoding or the geometry changes: every cache is rebuilt
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
TEST_CAP = 10_000  # largest held-out test slice (LSUN, folders)
STL10_SHAPE = (3, 96, 96)
IMAGENET64_SHAPE = (3, 64, 64)
CELEBA_CROP = 140  # the usual centre crop of the aligned 178x218 CelebA images
_WHERE = "data.root, $CQF_DATA or ~/.cache/cqf"


def _one_line(err: Exception) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).split())}"


def _where(root: Path) -> str:
    return f"put the files under {root} ({_WHERE})"


def _require(name: str, paths: list[Path], root: Path, how: str) -> None:
    """One-line DataError listing the first missing path (and how many more) and where the files go."""
    missing = [p for p in paths if not p.exists()]
    if missing:
        more = f" and {len(missing) - 1} more of its files" if len(missing) > 1 else ""
        raise DataError(f"{name}: {missing[0]} not found{more}; {how}; {_where(root)}")


# -- geometry --------------------------------------------------------------------------------------------------


def fit_square(image, size: int, side: int = 0) -> np.ndarray:
    """PIL image -> uint8 (C, size, size): its centre square of `side` (0 = min(W, H)), area-resized to `size`.

    C is 1 for grey images (modes 1, L, I, I;16, F) and 3 otherwise (alpha dropped, palettes expanded).
    """
    from PIL import Image

    image = image.convert("L" if image.mode in ("1", "L", "I", "I;16", "F") else "RGB")
    width, height = image.size
    side = side or min(width, height)
    if side > min(width, height):
        raise ValueError(f"image is {width}x{height}, smaller than its {side}x{side} crop")
    left, top = (width - side) // 2, (height - side) // 2
    box = (left, top, left + side, top + side)
    image = image.crop(box) if side == size else image.resize((size, size), Image.BOX, box=box)
    array = np.asarray(image)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def _resize_arrays(x: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N, C, H, W) -> (N, C, size, size) with `fit_square` (threaded: PIL releases the GIL)."""
    from PIL import Image

    def one(image: np.ndarray) -> np.ndarray:
        return fit_square(Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)), size)

    return _decode_all(x, len(x), one, (x.shape[1], size, size))[0]


def _decode_all(items: Iterable, count: int, decode: Callable, shape: tuple) -> tuple[np.ndarray, int]:
    """decode(item) -> (C, H, W) for each item, into one preallocated uint8 array (count, *shape).

    Items are consumed in this thread (an LMDB cursor stays in its own thread); decoding runs on a thread pool.
    Grey results fill every channel of `shape`. Returns the array and the largest channel count decoded.
    """
    out = np.empty((count, *shape), np.uint8)
    channels, index, items = 0, 0, iter(items)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        while chunk := list(itertools.islice(items, 256)):
            for array in pool.map(decode, chunk):
                out[index] = array  # (1, H, W) broadcasts over the channels
                channels = max(channels, array.shape[0])
                index += 1
    assert index == count, (index, count)
    return out, channels


def held_out_split(count: int, where: str = "data set") -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices of `count` items (sorted): the test split is the first min(10,000, max(1, count // 10))
    items of a permutation seeded with 0, the same for every run."""
    if count < 2:
        raise DataError(f"{where}: {count} image(s); at least 2 are needed to hold out a test image")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(0)).numpy()
    num_test = min(TEST_CAP, max(1, count // 10))
    return np.sort(order[num_test:]), np.sort(order[:num_test])


# -- cache -----------------------------------------------------------------------------------------------------


def _fingerprint(files: Iterable[Path], base: Path, extra: dict) -> str:
    """sha256 over the relative path, size and mtime of every source file, plus `extra`."""
    digest = hashlib.sha256(json.dumps({"format": CACHE_FORMAT, **extra}, sort_keys=True).encode())
    for f in files:
        stat = f.stat()
        digest.update(f"\n{f.relative_to(base).as_posix()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def _cached(root: Path, stem: str, size: int, key: str, build: Callable[[], tuple]) -> tuple:
    """`build()`'s (levels, x_train, y_train, x_test, y_test), from `<root>/cqf-cache/<stem>-<size>.npz` when its
    key matches; else built and written there (a cache that cannot be read or written is only a warning)."""
    path = root / "cqf-cache" / f"{stem}-{size}.npz"
    names = ("x_train", "y_train", "x_test", "y_test")
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as arrays:
                if str(arrays["key"]) == key:
                    return (int(arrays["levels"]), *(torch.from_numpy(arrays[n]) for n in names))
        except Exception as err:  # a broken cache is rebuilt, never trusted
            log.warning("rebuilding the unreadable cache %s (%s)", path, _one_line(err))
    log.info("decoding %s at %dx%d once; cached in %s", stem, size, size, path)
    levels, *splits = build()
    try:
        _atomic_savez(path, key=np.array(key), levels=np.array(levels),
                      **{n: s.numpy() for n, s in zip(names, splits, strict=True)})
    except OSError as err:
        log.warning("cannot write the cache %s (%s); the images will be decoded again next time", path,
                    _one_line(err))
    return (levels, *splits)


def _atomic_savez(path: Path, **arrays) -> None:
    """np.savez to a unique temporary name beside `path`, fsync, then rename: readers see the old file or the new
    one, never a partial one. (Not `files.atomic_write`: its fixed temporary name would be shared by the
    torchrun ranks that build the same cache at the same time.)"""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _size(name: str, image_size: int, default: int) -> int:
    if image_size < 0:
        raise DataError(f"{name}: data.image_size must be >= 0, got {image_size}")
    return image_size or default


# -- STL-10 ----------------------------------------------------------------------------------------------------


def decode_stl10(raw: np.ndarray, path: Path) -> np.ndarray:
    """Bytes of an STL-10 `*_X.bin` -> uint8 (N, 3, 96, 96).

    Each image is 3 x 96 x 96 bytes, channel after channel, and each channel is stored column by column (the
    MATLAB order of the official files): byte c * 9216 + column * 96 + row is pixel (c, row, column).
    """
    per_image = int(np.prod(STL10_SHAPE))
    if raw.size == 0 or raw.size % per_image:
        raise DataError(f"stl10: {path} is truncated or not an STL-10 image file ({raw.size} bytes, not a "
                        f"multiple of 3x96x96 = {per_image})")
    return raw.reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2)


def _stl10_labels(path: Path, count: int) -> np.ndarray:
    labels = np.fromfile(path, dtype=np.uint8)
    if len(labels) != count:
        raise DataError(f"stl10: {path} holds {len(labels)} labels for {count} images; the file is truncated or "
                        "belongs to other images")
    if len(labels) and not (labels.min() >= 1 and labels.max() <= 10):
        raise DataError(f"stl10: {path} has labels outside 1..10; it is not an STL-10 label file")
    return labels.astype(np.int64) - 1  # the files count from 1


@register_dataset("stl10")
def _stl10(root: Path, argument: str, image_size: int) -> tuple:
    """STL-10 (Coates et al. 2011) as in the paper: train = the 100,000 unlabelled + 5,000 train images (labels -1
    and 0..9), test = the 8,000 test images; 48x48 by default.

    Read with numpy, not torchvision's `datasets.STL10`: that checks the md5 of every file against the official
    archive, so it refuses any other copy of the format (and the small files of the tests).
    """
    folder = root / "stl10_binary"
    names = ["train_X.bin", "train_y.bin", "unlabeled_X.bin", "test_X.bin", "test_y.bin"]
    files = [folder / n for n in names]
    _require("stl10", files, root, "unpack stl10_binary.tar.gz from https://cs.stanford.edu/~acoates/stl10/")
    size = _size("stl10", image_size, 48)

    def read() -> tuple:
        x_train, x_unlabelled, x_test = (decode_stl10(np.fromfile(folder / n, dtype=np.uint8), folder / n)
                                         for n in ("train_X.bin", "unlabeled_X.bin", "test_X.bin"))
        y_train = _stl10_labels(folder / "train_y.bin", len(x_train))
        y_test = _stl10_labels(folder / "test_y.bin", len(x_test))
        x_train = np.concatenate([x_train, x_unlabelled])
        y_train = np.concatenate([y_train, np.full(len(x_unlabelled), -1, np.int64)])  # -1: no class
        if size != 96:
            x_train, x_test = _resize_arrays(x_train, size), _resize_arrays(x_test, size)
        return 256, *(torch.from_numpy(np.ascontiguousarray(a)) for a in (x_train, y_train, x_test, y_test))

    if size == 96:
        return read()
    return _cached(root, "stl10", size, _fingerprint(files, root, {"name": "stl10", "size": size}), read)


# -- CelebA ----------------------------------------------------------------------------------------------------


def _celeba_partition(path: Path) -> dict[int, list[str]]:
    parts: dict[int, list[str]] = {0: [], 1: [], 2: []}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
                raise DataError(f"celeba64: {path} line {number} is {line.strip()!r}, not 'FILE.jpg 0|1|2'; "
                                "it is not CelebA's list_eval_partition.txt")
            parts[int(fields[1])].append(fields[0])
    return parts


def _image_decoder(name: str, size: int, side: int = 0) -> Callable:
    """path or encoded bytes -> (C, size, size) uint8 by `fit_square`; an unreadable image is a DataError."""
    from PIL import Image

    def decode(item) -> np.ndarray:
        where, source = item if isinstance(item, tuple) else (item, item)
        try:
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
                return fit_square(image, size, side)
        except Exception as err:  # PIL raises OSError, ValueError, SyntaxError, ... for a broken file
            raise DataError(f"{name}: cannot read image {where} ({_one_line(err)})") from None

    return decode


@register_dataset("celeba64")
def _celeba64(root: Path, argument: str, image_size: int) -> tuple:
    """CelebA (Liu et al. 2015), aligned images: the centre 140x140 crop resized to 64x64. Train = partition 0
    (162,770 images), test = partition 2 (19,962); partition 1 (the official validation images) is not loaded:
    cqf's validation slice comes out of train (data.val_size). Labels are 0 (attributes are not read).

    Read from torchvision's layout, but not with `datasets.CelebA(download=False)`: it checks the md5 of the
    attribute, identity, bounding-box and landmark files too and refuses to load without them, while only the
    partition file and the images are needed.
    """
    folder = root / "celeba"
    partition, images = folder / "list_eval_partition.txt", folder / "img_align_celeba"
    _require("celeba64", [partition, images], root,
             "download img_align_celeba.zip (unzipped) and list_eval_partition.txt into celeba/, torchvision's layout")
    size = _size("celeba64", image_size, 64)
    parts = _celeba_partition(partition)
    if not parts[0] or not parts[2]:
        raise DataError(f"celeba64: {partition} lists no training (0) or no test (2) images")
    files = [images / n for n in parts[0] + parts[2]]
    missing = next((f for f in files if not f.is_file()), None)
    if missing is not None:
        raise DataError(f"celeba64: {missing} not found, but {partition.name} lists it; unzip all of "
                        f"img_align_celeba.zip into {images}")

    def read() -> tuple:
        decode = _image_decoder("celeba64", size, CELEBA_CROP)
        x_train, _ = _decode_all(files[: len(parts[0])], len(parts[0]), decode, (3, size, size))
        x_test, _ = _decode_all(files[len(parts[0]) :], len(parts[2]), decode, (3, size, size))
        zeros = [torch.zeros(len(x), dtype=torch.int64) for x in (x_train, x_test)]
        return 256, torch.from_numpy(x_train), zeros[0], torch.from_numpy(x_test), zeros[1]

    key = _fingerprint([partition, *files], root, {"name": "celeba64", "size": size})
    return _cached(root, "celeba64", size, key, read)


# -- ImageNet 64x64 --------------------------------------------------------------------------------------------


def decode_imagenet64_rows(data: np.ndarray) -> np.ndarray:
    """Rows of downsampled ImageNet (Chrabaszcz et al. 2017) -> uint8 (N, 3, 64, 64).

    A row is 3 x 64 x 64 bytes: the whole red plane, then green, then blue, each plane row by row.
    """
    return data.reshape(-1, *IMAGENET64_SHAPE)


def _npz_rows(path: Path) -> int:
    """Number of images in a downsampled-ImageNet .npz, from the array header (without reading the data)."""
    try:
        with zipfile.ZipFile(path) as archive:
            found = archive.namelist()
            absent = [k for k in ("data", "labels") if f"{k}.npy" not in found]
            if absent:
                raise DataError(f"imagenet64: {path} has no array {' or '.join(absent)} (it has "
                                f"{', '.join(n.removesuffix('.npy') for n in found) or 'none'}); it is not a "
                                "downsampled-ImageNet batch")
            with archive.open("data.npy") as f:
                version = np.lib.format.read_magic(f)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                shape, _, dtype = read_header(f)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
        raise DataError(f"imagenet64: cannot read {path} ({_one_line(err)}); the file is truncated or not an "
                        ".npz") from None
    per_image = int(np.prod(IMAGENET64_SHAPE))
    if dtype != np.uint8 or len(shape) != 2 or shape[1] != per_image:
        raise DataError(f"imagenet64: {path} has data of {dtype} {shape}, not uint8 rows of 3x64x64 = {per_image} "
                        "bytes; is it the 64x64 version?")
    return shape[0]


def _imagenet64_into(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    try:
        with np.load(path, allow_pickle=False) as arrays:
            x[:] = decode_imagenet64_rows(arrays["data"])
            labels = np.asarray(arrays["labels"]).reshape(-1)
    except Exception as err:  # truncated member, bad CRC, ...
        raise DataError(f"imagenet64: cannot read {path} ({_one_line(err)}); the file is truncated") from None
    if len(labels) != len(x) or (len(labels) and not (labels.min() >= 1 and labels.max() <= 1000)):
        raise DataError(f"imagenet64: {path} has {len(labels)} labels for {len(x)} images or labels outside "
                        "1..1000")
    y[:] = labels - 1  # the files count from 1


@register_dataset("imagenet64")
def _imagenet64(root: Path, argument: str, image_size: int) -> tuple:
    """Downsampled ImageNet 64x64 (Chrabaszcz et al. 2017; Oord et al. 2016's data set): train = the 10 train
    batches (1,281,167 images), test = the validation batch (50,000), labels 0..999. About 16 GB in memory.

    The two folders are what the official Imagenet64_train_part{1,2}_npz.zip and Imagenet64_val_npz.zip hold;
    unzip both train parts into one Imagenet64_train_npz/.
    """
    train = [root / "Imagenet64_train_npz" / f"train_data_batch_{i}.npz" for i in range(1, 11)]
    test = [root / "Imagenet64_val_npz" / "val_data.npz"]
    _require("imagenet64", train + test, root,
             "download the 64x64 npz batches from https://image-net.org/download-images (Downsampled ImageNet) and "
             "unzip them into Imagenet64_train_npz/ and Imagenet64_val_npz/")
    size = _size("imagenet64", image_size, 64)

    def read(paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
        counts = [_npz_rows(p) for p in paths]  # first, so the images go straight into one array
        x = np.empty((sum(counts), *IMAGENET64_SHAPE), np.uint8)
        y = np.empty(sum(counts), np.int64)
        for path, start, count in zip(paths, np.cumsum([0, *counts[:-1]]), counts, strict=True):
            _imagenet64_into(path, x[start : start + count], y[start : start + count])
        return x, y

    def read_all() -> tuple:
        (x_train, y_train), (x_test, y_test) = read(train), read(test)
        if size != 64:
            x_train, x_test = _resize_arrays(x_train, size), _resize_arrays(x_test, size)
        return 256, *(torch.from_numpy(a) for a in (x_train, y_train, x_test, y_test))

    if size == 64:
        return read_all()
    return _cached(root, "imagenet64", size, _fingerprint(train + test, root, {"size": size}), read_all)


# -- LSUN bedrooms and image folders ---------------------------------------------------------------------------


def _image_files(folder: Path) -> list[Path]:
    return sorted((p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
                  key=lambda p: p.relative_to(folder).as_posix())


def _held_out_images(where: str, items: list, decode: Callable, size: int,
                     fetch: Callable = lambda item: item) -> tuple:
    """Decode `items` (sorted) into a train split and the fixed held-out test slice; labels 0.

    `fetch(item)` runs in this thread (an LMDB read) and gives what `decode` takes. Grey images stay 1-channel
    only if every image is grey."""
    train, test = held_out_split(len(items), where)
    splits, channels = [], 0
    for indices in (train, test):
        x, c = _decode_all((fetch(items[i]) for i in indices), len(indices), decode, (3, size, size))
        splits.append(x)
        channels = max(channels, c)
    x_train, x_test = (torch.from_numpy(x[:, :channels] if channels == 1 else x) for x in splits)
    return 256, x_train, torch.zeros(len(train), dtype=torch.int64), x_test, torch.zeros(len(test), dtype=torch.int64)


def _lmdb_images(name: str, path: Path, size: int) -> tuple:
    try:
        import lmdb
    except ImportError:
        raise DataError(f"{name}: reading {path} needs the lmdb package: pip install cqf[lsun]") from None
    try:
        env = lmdb.open(str(path), readonly=True, lock=False, readahead=False, meminit=False, max_readers=1)
    except lmdb.Error as err:
        raise DataError(f"{name}: cannot open the LMDB {path} ({_one_line(err)})") from None
    with env, env.begin(buffers=False) as txn:
        keys = list(txn.cursor().iternext(keys=True, values=False))  # sorted: LMDB keeps keys in order
        if not keys:
            raise DataError(f"{name}: the LMDB {path} has no entries; it is empty or not LSUN's export")

        def fetch(key: bytes) -> tuple:
            value = txn.get(key)
            return f"{key.decode(errors='replace')} in {path}", value if value is not None else b""

        return _held_out_images(f"{name}: {path}", keys, _image_decoder(name, size), size, fetch)


@register_dataset("lsun-bedroom64")
def _lsun_bedroom64(root: Path, argument: str, image_size: int) -> tuple:
    """LSUN bedrooms (Yu et al. 2015), 3,033,042 images: centre square resized to 64x64. LSUN has no test split
    (its validation set is 300 images): the test split is the fixed held-out slice (10,000 images), labels 0.
    About 37 GB in memory at 64x64.

    Read from `bedroom_train_lmdb/` (LSUN's LMDB export, values are encoded WebP/JPEG images, keys sorted), else
    from `bedroom_train/`, a folder of its images (LSUN's `data.py export`), sorted by relative path.
    Not through torchvision's `LSUN`: it pickles the key list into a `_cache_*` file in the current working
    directory and loads any such file it finds there, stale or not; the LMDB is read here with the same `lmdb`
    calls, and the decoded images are cached in the data root like every other data set.
    """
    size = _size("lsun-bedroom64", image_size, 64)
    database, images = root / "bedroom_train_lmdb", root / "bedroom_train"
    if database.is_dir() or not images.is_dir():
        _require("lsun-bedroom64", [database / "data.mdb"], root,
                 "download bedroom_train_lmdb.zip from LSUN and unzip it there (or its images into bedroom_train/)")
        key = _fingerprint([database / "data.mdb"], root, {"name": "lsun-bedroom64", "size": size})
        return _cached(root, "lsun-bedroom64", size, key, lambda: _lmdb_images("lsun-bedroom64", database, size))
    files = _image_files(images)
    if not files:
        raise DataError(f"lsun-bedroom64: no {'/'.join(IMAGE_SUFFIXES)} images in {images}")
    key = _fingerprint(files, root, {"name": "lsun-bedroom64", "size": size})
    return _cached(root, "lsun-bedroom64", size, key,
                   lambda: _held_out_images(f"lsun-bedroom64: {images}", files,
                                            _image_decoder("lsun-bedroom64", size), size))


@register_dataset("folder:")
def _folder(root: Path, argument: str, image_size: int) -> tuple:
    """Every .jpg/.jpeg/.png/.webp/.bmp under PATH (any depth, sorted by relative path), centre square resized to
    data.image_size; RGB, or grey if every image is grey. Test = the fixed held-out slice; labels 0. Cached under
    the data root, named after PATH."""
    folder = Path(argument).expanduser()
    name = f"folder:{argument}"
    if not folder.is_dir():
        raise DataError(f"{name}: {folder} is not a folder; give data.name=folder:PATH to a folder of images")
    if image_size <= 0:
        raise DataError(f"{name}: set data.image_size > 0, the size its images are resized and centre-cropped to")
    files = _image_files(folder)
    if len(files) < 2:
        raise DataError(f"{name}: {len(files)} {'/'.join(IMAGE_SUFFIXES)} image(s) in {folder} (at any depth); "
                        "at least 2 are needed")
    resolved = str(folder.resolve())
    stem = f"folder-{folder.resolve().name or 'root'}-{hashlib.sha256(resolved.encode()).hexdigest()[:8]}"
    key = _fingerprint(files, folder, {"folder": resolved, "size": image_size})
    return _cached(root, stem, image_size, key,
                   lambda: _held_out_images(name, files, _image_decoder(name, image_size), image_size))
