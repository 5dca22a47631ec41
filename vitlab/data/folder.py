"""Image-folder datasets from a directory, .tar, .tar.gz or .zip, read in memory, never extracted.

Layouts: `class/image` (one training split) or `split/class/image` with split names train, val
(or valid, validation) and test. A single wrapping directory (`mydata/cat/1.jpg`) is looked through.
Archive members whose names are absolute or climb out with `..`, links and devices are skipped: we
never write a member anywhere, and such names are not part of any layout a user means.
"""

from __future__ import annotations

import io
import posixpath
import tarfile
import warnings
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..model import to_2tuple
from .image import GRAYSCALE_MODES, IMAGE_EXTENSIONS, decode_opened, to_uint8_array

SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
SHOWN_PROBLEMS = 5  # how many unreadable files a warning names


@dataclass
class SourceFiles:
    files: dict[str, bytes]  # safe relative name -> content
    unsafe: list[str] = field(default_factory=list)  # member names refused (../, absolute, links)


def is_archive(path: Path) -> bool:
    return path.name.lower().endswith(ARCHIVE_SUFFIXES)


def _safe_name(name: str) -> str | None:
    name = name.replace("\\", "/")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return None
    normal = posixpath.normpath(name)
    if normal == ".." or normal.startswith("../"):
        return None
    return normal


def read_source_files(source: Path, wanted=lambda name: True) -> SourceFiles:
    """Every regular file under a directory or inside an archive whose name passes `wanted`."""
    out = SourceFiles({})
    if source.is_dir():
        for path in sorted(source.rglob("*")):
            if path.is_file() and not path.is_symlink():
                name = path.relative_to(source).as_posix()
                if wanted(name):
                    out.files[name] = path.read_bytes()
        return out
    lower = source.name.lower()
    if lower.endswith(".zip"):
        try:
            with zipfile.ZipFile(source) as archive:
                for info in archive.infolist():
                    if info.is_dir():
                        continue
                    name = _safe_name(info.filename)
                    if name is None:
                        out.unsafe.append(info.filename)
                    elif wanted(name):
                        out.files[name] = archive.read(info)
        except zipfile.BadZipFile as error:
            raise ValueError(f"{source} is not a readable zip archive ({error})") from None
        return out
    try:
        with tarfile.open(source, mode="r:*") as archive:
            for member in archive:
                if member.isdir():
                    continue
                name = _safe_name(member.name)
                if name is None or not member.isfile():
                    out.unsafe.append(member.name)
                elif wanted(name):
                    out.files[name] = archive.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as error:
        raise ValueError(f"{source} is not a readable tar archive ({error})") from None
    return out


def is_image_name(name: str) -> bool:
    return posixpath.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _layout(names: list[str], source: Path) -> list[tuple[str, str, str]]:
    """(split, class, name) for each image name, after looking through a single wrapping directory."""
    parts = [name.split("/") for name in names]
    while len({p[0] for p in parts}) == 1 and all(len(p) > 2 for p in parts) \
            and parts[0][0].lower() not in SPLIT_NAMES:
        parts = [p[1:] for p in parts]
    depth = {len(p) for p in parts}
    if depth == {2}:
        return [("train", p[0], n) for p, n in zip(parts, names)]
    if depth == {3} and all(p[0].lower() in SPLIT_NAMES for p in parts):
        return [(SPLIT_NAMES[p[0].lower()], p[1], n) for p, n in zip(parts, names)]
    example = next(n for n, p in zip(names, parts) if len(p) not in (2, 3)) if depth - {2, 3} else names[0]
    raise ValueError(f"{source}: images must be laid out as class/image or split/class/image "
                     f"(split = train, val or test), but found e.g. {example!r}")


def decode_image_folder(read: SourceFiles, source: Path, image_size=None, channels: int | None = None) -> dict:
    """Decodes an image folder into {'splits': {name: (uint8 (N,C,H,W), int64 (N,))}, 'class_names',
    'skipped'}. Unreadable images are counted, the first few named in a warning, and left out.

    Without image_size the most common size wins; without channels, 1 if every image is grayscale
    else 3 ('natural' records these, whatever was asked)."""
    if read.unsafe:
        warnings.warn(f"{source}: ignored {len(read.unsafe)} archive member(s) that are links or "
                      f"point outside the archive: {', '.join(read.unsafe[:SHOWN_PROBLEMS])}", stacklevel=3)
    if not read.files:
        raise ValueError(f"{source} holds no images (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    names = sorted(read.files)
    layout = _layout(names, source)

    # Opening parses only the header: sizes and modes decide the target before anything is decoded,
    # and the opened images are decoded next without parsing their headers again.
    opened, skipped = {}, []
    for name in names:
        try:
            opened[name] = Image.open(io.BytesIO(read.files[name]))
        except Exception:  # noqa: BLE001 - any header failure means the file is unreadable
            skipped.append(name)
    read.files.clear()  # the opened images hold what they need
    if not opened:
        raise ValueError(f"{source}: none of its {len(names)} images could be read")
    (w, h), _ = Counter(image.size for image in opened.values()).most_common(1)[0]
    natural_channels = 1 if all(image.mode in GRAYSCALE_MODES for image in opened.values()) else 3
    image_size = to_2tuple(image_size) if image_size is not None else (h, w)
    channels = channels or natural_channels

    class_names = sorted({cls for _, cls, name in layout if name in opened})
    class_index = {cls: k for k, cls in enumerate(class_names)}
    per_split: dict[str, tuple[list, list]] = {}
    for split, cls, name in layout:
        image = opened.pop(name, None)
        if image is None:
            continue
        try:
            array = to_uint8_array(decode_opened(image, name), image_size, channels)
        except ValueError:
            skipped.append(name)
            continue
        finally:
            image.close()
        arrays, labels = per_split.setdefault(split, ([], []))
        arrays.append(array)
        labels.append(class_index[cls])
    if skipped:
        warnings.warn(unreadable_message(source, sorted(skipped)), stacklevel=3)
    if "train" not in per_split:
        raise ValueError(f"{source} has no readable training images (a train/ split or class folders)")
    splits = {split: (np.stack(arrays), np.asarray(labels, dtype=np.int64))
              for split, (arrays, labels) in per_split.items()}
    return {"splits": splits, "class_names": class_names, "skipped": sorted(skipped),
            "natural": {"image_size": [h, w], "channels": natural_channels}}


def unreadable_message(source, skipped: list[str]) -> str:
    shown = ", ".join(skipped[:SHOWN_PROBLEMS]) + (", ..." if len(skipped) > SHOWN_PROBLEMS else "")
    return f"{source}: skipped {len(skipped)} unreadable image(s): {shown}"
