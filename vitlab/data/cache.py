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

CACHE_VERSION = 1


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The vitlab cache directory: the argument, else $VITLAB_CACHE, else ~/.cache/vitlab."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("VITLAB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vitlab"


def _stat(source: Path) -> tuple[int, int]:
    if source.is_dir():
        size, mtime = 0, source.stat().st_mtime_ns
        for path in source.rglob("*"):
            st = path.stat()
            size += st.st_size if path.is_file() else 0
            mtime = max(mtime, st.st_mtime_ns)
        return size, mtime
    st = source.stat()
    return st.st_size, st.st_mtime_ns


def content_hash(source: Path) -> str:
    digest = hashlib.sha256()
    if source.is_dir():
        for path in sorted(p for p in source.rglob("*") if p.is_file()):
            digest.update(path.relative_to(source).as_posix().encode() + b"\0")
            digest.update(hashlib.sha256(path.read_bytes()).digest())
        return digest.hexdigest()
    with open(source, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def entry_dir(source: Path, options: dict, root: Path) -> Path:
    key = json.dumps({"source": str(source.resolve()), "options": options}, sort_keys=True)
    name = source.name.replace(".", "_")[:40]
    return root / "decoded" / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def load_cached(source: Path, options: dict, root: Path) -> dict | None:
    """The decoded dataset stored for (source, options), or None when absent or stale."""
    entry = entry_dir(source, options, root)
    try:
        manifest = json.loads((entry / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("version") != CACHE_VERSION or manifest.get("options") != options:
        return None
    size, mtime = _stat(source)
    if (size, mtime) != (manifest["size"], manifest["mtime_ns"]):
        if content_hash(source) != manifest["sha256"]:
            return None
        manifest["size"], manifest["mtime_ns"] = size, mtime  # same bytes, newer timestamp
        _write_manifest(entry, manifest)
    try:
        splits = {split: (np.load(entry / f"{split}_images.npy"),
                          np.load(entry / f"{split}_labels.npy"))
                  for split in manifest["splits"]}
    except (OSError, ValueError):
        return None
    return {"splits": splits, "class_names": manifest["class_names"], "skipped": manifest["skipped"],
            "kind": manifest.get("kind", "")}


def _write_manifest(entry: Path, manifest: dict) -> None:
    tmp = entry / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(entry / "manifest.json")


def store(source: Path, options: dict, root: Path, decoded: dict) -> None:
    """Writes the decoded dataset next to its manifest; written to a temporary directory and renamed
    so an interrupted write never leaves a cache that looks complete."""
    entry = entry_dir(source, options, root)
    entry.parent.mkdir(parents=True, exist_ok=True)
    size, mtime = _stat(source)
    manifest = {"version": CACHE_VERSION, "source": str(source.resolve()), "size": size, "mtime_ns": mtime,
                "sha256": content_hash(source), "options": options, "kind": decoded.get("kind", ""),
                "class_names": decoded["class_names"], "splits": list(decoded["splits"]),
                "skipped": decoded["skipped"]}
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
