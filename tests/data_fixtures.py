"""Generators for the data tests: small image folders and archives, official-format CIFAR
tarballs, written the way the real ones are so the readers are tested on the real formats."""

from __future__ import annotations

import io
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ["cat", "dog", "frog"]


def png_bytes(image: Image.Image, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


def solid(color, size=(8, 8), mode="RGB") -> Image.Image:
    return Image.new(mode, size, color)


def folder_files(per_class: int = 4, size=(8, 8), prefix: str = "") -> dict[str, bytes]:
    """class/image PNGs whose colour encodes (class, index): red = 40*class, green = 10*index."""
    files = {}
    for k, cls in enumerate(CLASSES):
        for i in range(per_class):
            files[f"{prefix}{cls}/{i:03d}.png"] = png_bytes(solid((40 * k, 10 * i, 200), size))
    return files


def write_dir(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def write_tar(path: Path, files: dict[str, bytes], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def write_zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return path


def cifar_images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)


def write_cifar10(path: Path, per_batch: int = 6, test: int = 5) -> dict:
    """An official-format cifar-10-python.tar.gz: cifar-10-batches-py/data_batch_1..5, test_batch
    and batches.meta, each a protocol-2 pickle of a dict with bytes keys (as the real files load)."""
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    files, expected = {}, {"train": [], "test": []}
    for b in range(1, 6):
        data, labels = cifar_images(per_batch, b), [(b + i) % 10 for i in range(per_batch)]
        files[f"cifar-10-batches-py/data_batch_{b}"] = pickle.dumps(
            {b"batch_label": b"training batch %d of 5" % b, b"labels": labels, b"data": data,
             b"filenames": [b"x.png"] * per_batch}, protocol=2)
        expected["train"].append((data, labels))
    data, labels = cifar_images(test, 99), [i % 10 for i in range(test)]
    files["cifar-10-batches-py/test_batch"] = pickle.dumps(
        {b"batch_label": b"testing batch 1 of 1", b"labels": labels, b"data": data}, protocol=2)
    expected["test"].append((data, labels))
    files["cifar-10-batches-py/batches.meta"] = pickle.dumps(
        {b"num_cases_per_batch": per_batch, b"label_names": names, b"num_vis": 3072}, protocol=2)
    write_tar(path, files)
    return expected


def write_cifar100(path: Path, train: int = 20, test: int = 7) -> dict:
    """An official-format cifar-100-python.tar.gz: cifar-100-python/train, test and meta."""
    fine = [f"class{k:02d}".encode() for k in range(100)]
    files, expected = {}, {}
    for split, n, seed in (("train", train, 1), ("test", test, 2)):
        data, labels = cifar_images(n, seed), [(7 * i) % 100 for i in range(n)]
        files[f"cifar-100-python/{split}"] = pickle.dumps(
            {b"filenames": [b"x.png"] * n, b"batch_label": split.encode(), b"fine_labels": labels,
             b"coarse_labels": [label // 5 for label in labels], b"data": data}, protocol=2)
        expected[split] = (data, labels)
    files["cifar-100-python/meta"] = pickle.dumps(
        {b"fine_label_names": fine, b"coarse_label_names": [b"super"] * 20}, protocol=2)
    write_tar(path, files)
    return expected
