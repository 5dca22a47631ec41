"""load_data: one entry point for every source (CIFAR archives, image folders, the cifar10/cifar100
names), with the decoded-array cache, the validation split and the normalisation statistics."""

from __future__ import annotations

import posixpath
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .cache import cache_root, load_cached, store
from .cifar import CIFAR, CIFAR_BATCH_NAMES, decode_cifar, fetch_cifar, is_cifar_names
from .cpu import one_cpu_thread
from .folder import (SourceFiles, check_decoded_size, decode_image_folder, is_archive, is_image_name,
                     read_source_files, unreadable_message)
from .limits import MAX_CIFAR_BATCH_BYTES, max_image_bytes
from ..model import to_2tuple
from .image import to_uint8_array
from .imageset import DataSplits, ImageSet, channel_stats
from .splits import resolve_val_size, stratified_split


NATURAL = {"image_size": None, "channels": None}  # the cache key of a source decoded as it is
MIN_STD = 1 / 255  # the least per-channel std training normalises by (see _make_splits)


def _asks_natural(options: dict, natural: dict) -> bool:
    return all(options[k] in (None, natural[k]) for k in NATURAL)


def _same_shape(decoded: dict, options: dict) -> bool:
    channels, h, w = next(iter(decoded["splits"].values()))[0].shape[1:]
    return _asks_natural(options, {"image_size": [h, w], "channels": channels})


def _wanted(name: str) -> bool:
    return is_image_name(name) or posixpath.basename(name) in CIFAR_BATCH_NAMES


def _size_limit(name: str, image_limit: int) -> int:
    return MAX_CIFAR_BATCH_BYTES if posixpath.basename(name) in CIFAR_BATCH_NAMES else image_limit


def decode_source(path: Path, image_size=None, channels: int | None = None) -> dict:
    """Reads and decodes a source without the cache: {'splits', 'class_names', 'skipped', 'kind'}."""
    image_limit = max_image_bytes()
    read = read_source_files(path, _wanted, lambda name: _size_limit(name, image_limit))
    if is_cifar_names([*read.files, *read.too_large]):
        decoded = decode_cifar(read, path)
        if (image_size is not None and to_2tuple(image_size) != (32, 32)) or channels not in (None, 3):
            count = sum(len(labels) for _, labels in decoded["splits"].values())
            check_decoded_size(path, count, to_2tuple(image_size or 32), channels or 3)
            decoded["splits"] = {split: (_convert_all(images, image_size or 32, channels or 3), labels)
                                 for split, (images, labels) in decoded["splits"].items()}
        return decoded
    images_only = SourceFiles({n: b for n, b in read.files.items() if is_image_name(n)}, read.unsafe,
                              [n for n in read.too_large if is_image_name(n)], read.limit)
    decoded = decode_image_folder(images_only, path, image_size, channels)
    decoded["kind"] = "image folder"
    return decoded


def _convert_all(images: np.ndarray, image_size, channels: int) -> np.ndarray:
    size = to_2tuple(image_size)
    return np.stack([to_uint8_array(Image.fromarray(image.transpose(1, 2, 0)), size, channels)
                     for image in images])


def resolve_source(source: str | Path, cache_dir=None) -> Path:
    name = str(source).lower().replace("-", "")
    if name in CIFAR and not Path(source).exists():
        return fetch_cifar(name, cache_root(cache_dir))
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no dataset at {path}: give an image folder, a .tar/.tar.gz/.zip of one, "
                                "an official CIFAR python archive, or the name cifar10 / cifar100")
    if path.is_file() and not is_archive(path):
        raise ValueError(f"{path} is neither a directory nor a .tar, .tar.gz or .zip archive")
    return path


def load_data(source: str | Path, *, val_size: int | float | None = None, split_seed: int = 0,
              image_size: int | tuple[int, int] | None = None, channels: int | None = None,
              cache_dir: str | Path | None = None) -> DataSplits:
    """Loads a dataset as uint8 splits with the train split's channel statistics.

    The validation split is held out of the training images (stratified, a pure function of
    split_seed) unless the source has its own val/ split; val_size None -> 5,000 for a 50,000-image
    training set, else 10%; 0 -> no validation split. Decoded images are cached under cache_dir
    ($VITLAB_CACHE, else ~/.cache/vitlab), so the second load skips decoding."""
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1 or 3 (images are read as grayscale or RGB), got {channels!r}")
    path = resolve_source(source, cache_dir)
    root = cache_root(cache_dir)
    options = {"image_size": list(to_2tuple(image_size)) if image_size is not None else None,
               "channels": channels}
    # the cache hashes just the files the loader reads (a folder's videos and notes are not data)
    image_limit = max_image_bytes()
    reads = dict(wanted=_wanted, max_bytes=lambda name: _size_limit(name, image_limit))
    decoded = load_cached(path, options, root, **reads)
    if decoded is None and options != NATURAL:
        # an explicit size/channels equal to the source's own reuse the entry stored for it
        natural = load_cached(path, NATURAL, root, **reads)
        decoded = natural if natural is not None and _same_shape(natural, options) else None
    if decoded is None:
        decoded = decode_source(path, image_size, channels)
        key = NATURAL if _asks_natural(options, decoded["natural"]) else options
        try:
            store(path, key, root, decoded, **reads)
        except OSError as error:
            warnings.warn(f"could not write the data cache under {root} ({error}); the next load "
                          "decodes again", stacklevel=2)
    elif decoded["skipped"]:
        warnings.warn(unreadable_message(path, decoded["skipped"]), stacklevel=2)

    with one_cpu_thread():
        return _make_splits(decoded, path, val_size, split_seed)


def _make_splits(decoded: dict, path: Path, val_size, split_seed: int) -> DataSplits:
    class_names = list(decoded["class_names"])

    def image_set(split: str) -> ImageSet | None:
        if split not in decoded["splits"]:
            return None
        images, labels = decoded["splits"][split]
        return ImageSet(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(np.asarray(labels)),
                        class_names)

    train, val, test = image_set("train"), image_set("val"), image_set("test")
    if val is None and train is not None:
        count = resolve_val_size(val_size, len(train))
        if count:
            train_index, val_index = stratified_split(train.labels, count, split_seed)
            train, val = train.subset(train_index), train.subset(val_index)
    # a source without training images (only test/<class>/) can still be evaluated
    mean, std = channel_stats((train or val or test).images)
    # A channel that is constant everywhere has std 0, and normalising by it gives NaN at the first
    # step; one grey level (1/255) as the least std maps such a channel to 0 and leaves real data
    # (std ~0.25) untouched.
    std = tuple(max(s, MIN_STD) for s in std)
    return DataSplits(train=train, val=val, test=test, mean=mean, std=std,
                      source=f"{path} ({decoded.get('kind') or 'dataset'})", skipped=list(decoded["skipped"]),
                      layout=decoded.get("layout") or "splits")
