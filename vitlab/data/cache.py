"""Decoded-dataset cache: uint8 arrays plus a manifest keyed by the source's size, mtime and hash.

A second load of the same source with the same options reads the arrays back instead of decoding
50,000 JPEGs again. Size and mtime are checked first (cheap); only when they changed is the
content hash recomputed, so a `touch` keeps the cache while any change of content rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .folder import dataset_files

CACHE_VERSION = 2  # 2: the manifest records the folder layout (bare class folders or splits)


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The vitlab cache directory: the argument, else $VITLAB_CACHE, else ~/.cache/vitlab."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("VITLAB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vitlab"


def _stat(source: Path, wanted=lambda name: True) -> tuple[int, int]:
    """(total size, latest mtime) of what the loader reads: an archive, or a directory's files
    (vitlab.data.folder.dataset_files; the directories' own mtimes tell of removed files)."""
    if source.is_dir():
        size, mtime = 0, source.stat().st_mtime_ns
        for path in source.rglob("*"):
            if path.is_dir() and not path.is_symlink():
                mtime = max(mtime, path.stat().st_mtime_ns)
        for _, path in dataset_files(source, wanted):
            st = path.stat()
            size, mtime = size + st.st_size, max(mtime, st.st_mtime_ns)
        return size, mtime
    st = source.stat()
    return st.st_size, st.st_mtime_ns


def _hash_file(path: Path, digest) -> None:
    with open(path, "rb") as f:  # in blocks: a dataset file may be larger than memory
        while block := f.read(1 << 22):
            digest.update(block)


def content_hash(source: Path, wanted=lambda name: True, max_bytes=None) -> str:
    """sha256 of what the loader reads: an archive's bytes, or a directory's files (names and
    contents of those passing `wanted`; a file over max_bytes(name), which the loader skips
    unread, counts by its size alone)."""
    digest = hashlib.sha256()
    if source.is_dir():
        for name, path in dataset_files(source, wanted):
            digest.update(name.encode() + b"\0")
            size = path.stat().st_size
            if max_bytes is not None and size > max_bytes(name):
                digest.update(b"skipped, %d bytes" % size)
                continue
            file_digest = hashlib.sha256()
            _hash_file(path, file_digest)
            digest.update(file_digest.digest())
        return digest.hexdigest()
    _hash_file(source, digest)
    return digest.hexdigest()


def entry_dir(source: Path, options: dict, root: Path) -> Path:
    key = json.dumps({"source": str(source.resolve()), "options": options}, sort_keys=True)
    name = source.name.replace(".", "_")[:40]
    return root / "decoded" / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def load_cached(source: Path, options: dict, root: Path, wanted=lambda name: True,
                max_bytes=None) -> dict | None:
    """The decoded dataset stored for (source, options), or None when absent or stale. `wanted`
    and `max_bytes` say which files of a directory the loader reads (see content_hash)."""
    entry = entry_dir(source, options, root)
    try:
        manifest = json.loads((entry / "manifest.json").read_text())
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(manifest, dict) or manifest.get("version") != CACHE_VERSION \
            or manifest.get("options") != options:
        return None
    size, mtime = _stat(source, wanted)
    if (size, mtime) != (manifest.get("size"), manifest.get("mtime_ns")):
        if content_hash(source, wanted, max_bytes) != manifest.get("sha256"):
            return None
        manifest["size"], manifest["mtime_ns"] = size, mtime  # same bytes, newer timestamp
        _write_manifest(entry, manifest)
    try:
        splits = {split: (np.load(entry / f"{split}_images.npy"),
                          np.load(entry / f"{split}_labels.npy"))
                  for split in manifest["splits"]}
    except (OSError, ValueError, KeyError, TypeError):  # a damaged entry is decoded again
        return None
    return {"splits": splits, "class_names": manifest["class_names"], "skipped": manifest["skipped"],
            "kind": manifest.get("kind", ""), "layout": manifest.get("layout")}


def _write_manifest(entry: Path, manifest: dict) -> None:
    tmp = entry / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(entry / "manifest.json")


def store(source: Path, options: dict, root: Path, decoded: dict, wanted=lambda name: True,
          max_bytes=None) -> None:
    """Writes the decoded dataset next to its manifest; written to a temporary directory and renamed
    so an interrupted write never leaves a cache that looks complete."""
    entry = entry_dir(source, options, root)
    entry.parent.mkdir(parents=True, exist_ok=True)
    size, mtime = _stat(source, wanted)
    manifest = {"version": CACHE_VERSION, "source": str(source.resolve()), "size": size, "mtime_ns": mtime,
                "sha256": content_hash(source, wanted, max_bytes), "options": options, "kind": decoded.get("kind", ""),
                "class_names": decoded["class_names"], "splits": list(decoded["splits"]),
                "skipped": decoded["skipped"], "layout": decoded.get("layout")}
    tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=".tmp-"))
    try:
        for split, (images, labels) in decoded["splits"].items():
            np.save(tmp / f"{split}_images.npy", np.ascontiguousarray(images))
            np.save(tmp / f"{split}_labels.npy", np.asarray(labels, dtype=np.int64))
        _write_manifest(tmp, manifest)
        if entry.exists():
            shutil.rmtree(entry)
        tmp.rename(entry)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
