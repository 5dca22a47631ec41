"""The official CIFAR-10 and CIFAR-100 "python version" archives: local .tar.gz, extracted folder,
or downloaded into the cache directory with checksum verification.

The batches inside are pickles. They are read only through RestrictedUnpickler, which builds
dicts, lists, strings, bytes, ints and numpy arrays and refuses every other global, so a crafted
archive cannot run code: a `__reduce__` payload names a callable such as os.system, and naming it is
exactly what fails.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import pickle
import posixpath
import urllib.request
from pathlib import Path

import numpy as np

from .folder import SourceFiles
from .limits import MAX_CIFAR_BATCH_BYTES

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct

CIFAR = {
    "cifar10": dict(
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        filename="cifar-10-python.tar.gz", md5="c58f30108f718f92721af3b95e74349a",
        train=["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"],
        test=["test_batch"], meta="batches.meta", label_key="labels", names_key="label_names"),
    "cifar100": dict(
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        filename="cifar-100-python.tar.gz", md5="eb9058c3a382ffc7106e4002c42a8d85",
        train=["train"], test=["test"], meta="meta", label_key="fine_labels", names_key="fine_label_names"),
}
CIFAR_BATCH_NAMES = {name for spec in CIFAR.values() for name in spec["train"] + spec["test"] + [spec["meta"]]}


def _numpy_dtype(*args):
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise pickle.UnpicklingError("refusing a numpy array of Python objects")
    return dtype


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles plain data and numpy arrays of numbers; any other global is refused."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,  # numpy 1 pickles (the official ones)
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,  # numpy 2 pickles
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): _numpy_dtype,
        ("_codecs", "encode"): codecs.encode,  # how protocol-2 pickles written by Python 3 spell bytes
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")
        return self.ALLOWED[(module, name)]


def restricted_load(data: bytes, name: str):
    try:
        # latin1 turns Python 2 str (the official files) into str without guessing an encoding
        return RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except pickle.UnpicklingError as error:
        raise ValueError(f"refusing to load {name}: {error}; the file is not a plain CIFAR batch "
                         "(it may have been crafted to run code)") from None
    except Exception as error:  # noqa: BLE001 - truncated or garbled pickles raise many types
        raise ValueError(f"cannot read {name} as a CIFAR batch: {error}") from None


def _text(value) -> str:
    return value.decode("latin1") if isinstance(value, bytes) else str(value)


def _plain_keys(batch, name: str) -> dict:
    if not isinstance(batch, dict):
        raise ValueError(f"{name} is not a CIFAR batch (a dict), it holds a {type(batch).__name__}")
    return {_text(k): v for k, v in batch.items()}


def is_cifar_names(names) -> str | None:
    """'cifar10' or 'cifar100' when the file names are those of an official python archive."""
    base = {posixpath.basename(n) for n in names}
    for kind, spec in CIFAR.items():
        if set(spec["train"] + [spec["meta"]]) <= base:
            return kind
    return None


def _read_batch(files: dict[str, bytes], base: str, label_key: str):
    name = next(n for n in files if posixpath.basename(n) == base)
    batch = _plain_keys(restricted_load(files[name], name), name)
    data, labels = batch.get("data"), batch.get(label_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"{name}: 'data' must be a uint8 array of shape (N, 3072)")
    if isinstance(labels, np.ndarray) and labels.dtype.kind not in "iu":
        labels = None  # floats, strings, bytes: not class indices
    try:
        labels = np.asarray(labels, dtype=np.int64)  # 2**70 overflows, "x" or None fail: all refused
    except (OverflowError, TypeError, ValueError):
        labels = None
    if labels is None or labels.ndim != 1:
        raise ValueError(f"{name}: {label_key!r} must be a list of whole-number class indices")
    if labels.shape != (data.shape[0],):
        raise ValueError(f"{name}: {data.shape[0]} images but {labels.size} {label_key}")
    if labels.size and labels.min() < 0:
        raise ValueError(f"{name}: {label_key!r} holds {int(labels.min())}; class indices start at 0")
    return data.reshape(-1, 3, 32, 32), labels


def decode_cifar(read: SourceFiles, source: Path) -> dict:
    """Decodes an official archive or extracted folder into the same dict as decode_image_folder."""
    kind = is_cifar_names(read.files)
    if kind is None:
        raise ValueError(f"{source} is not an official CIFAR-10/100 python archive")
    spec = CIFAR[kind]
    oversized = [n for n in read.too_large if posixpath.basename(n) in CIFAR_BATCH_NAMES]
    if oversized:
        raise ValueError(f"{source}: {oversized[0]} is larger than any {kind} batch can be "
                         f"({MAX_CIFAR_BATCH_BYTES // 2**20} MB); the archive is damaged or not the official one")
    missing = [b for b in spec["train"] + spec["test"] + [spec["meta"]]
               if not any(posixpath.basename(n) == b for n in read.files)]
    if missing:
        raise ValueError(f"{source} lacks {', '.join(missing)} of the {kind} python archive")
    meta_name = next(n for n in read.files if posixpath.basename(n) == spec["meta"])
    meta = _plain_keys(restricted_load(read.files[meta_name], meta_name), meta_name)
    names = meta.get(spec["names_key"], [])
    if not isinstance(names, list) or not all(isinstance(n, (str, bytes)) for n in names):
        raise ValueError(f"{meta_name}: {spec['names_key']!r} must be a list of class names")
    class_names = [_text(n) for n in names]
    splits = {}
    for split in ("train", "test"):
        parts = [_read_batch(read.files, b, spec["label_key"]) for b in spec[split]]
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        splits[split] = (images, labels)
    top = max((int(s[1].max()) for s in splits.values() if s[1].size), default=-1)
    if not len(splits["train"][1]):
        raise ValueError(f"{source}: the {kind} training batches hold no images")
    if len(class_names) <= top:
        raise ValueError(f"{meta_name} names {len(class_names)} classes but labels go up to {top}")
    return {"splits": splits, "class_names": class_names, "skipped": [], "kind": kind,
            "natural": {"image_size": [32, 32], "channels": 3}}


def fetch_cifar(kind: str, root: Path) -> Path:
    """The official archive in the cache directory, downloaded (md5-checked) when missing."""
    spec = CIFAR[kind]
    target = root / spec["filename"]
    if target.exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    try:
        with urllib.request.urlopen(spec["url"], timeout=30) as response, open(partial, "wb") as out:
            while block := response.read(1 << 20):
                out.write(block)
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise FileNotFoundError(f"{kind} is not in the cache and could not be downloaded ({error}); fetch "
                                f"{spec['url']} and put it at {target}") from None
    md5 = hashlib.md5()
    with open(partial, "rb") as f:  # in blocks, as every file vitlab hashes
        while block := f.read(1 << 22):
            md5.update(block)
    digest = md5.hexdigest()
    if digest != spec["md5"]:
        partial.unlink()
        raise ValueError(f"downloaded {spec['filename']} has md5 {digest}, expected {spec['md5']}; "
                         f"fetch {spec['url']} again and put it at {target}")
    partial.rename(target)
    return target
