"""Image-folder datasets from a directory, .tar, .tar.gz or .zip, read in memory, never extracted.

Layouts: `class/image` (one training split) or `split/class/image` with split names train, val
(or valid, validation) and test. A single wrapping directory (`mydata/cat/1.jpg`) is looked through.
Archive members whose names are absolute or climb out with `..`, links and devices are skipped: we
never write a member anywhere, and such names are not part of any layout a user means.
"""

from __future__ import annotations

import posixpath
import tarfile
import warnings
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..model import to_2tuple
from .image import GRAYSCALE_MODES, IMAGE_EXTENSIONS, decode_opened, open_header, to_uint8_array
from .limits import describe_bytes, max_image_bytes, memory_budget, read_at_most

SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
SHOWN_PROBLEMS = 5  # how many unreadable files a warning names


@dataclass
class SourceFiles:
    files: dict[str, bytes]  # safe relative name -> content
    unsafe: list[str] = field(default_factory=list)  # member names refused (../, absolute, links)
    too_large: list[str] = field(default_factory=list)  # wanted files over their size limit, left unread
    limit: int = 0  # the size limit of images, for messages


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


def dataset_files(source: Path, wanted=lambda name: True) -> list[tuple[str, Path]]:
    """(name, path) of the files read_source_files reads from a directory: regular files, not
    symlinks (whose targets may lie anywhere), whose names pass `wanted`; the data cache hashes
    exactly these."""
    return [(path.relative_to(source).as_posix(), path) for path in sorted(source.rglob("*"))
            if path.is_file() and not path.is_symlink() and wanted(path.relative_to(source).as_posix())]


def read_source_files(source: Path, wanted=lambda name: True, max_bytes=None) -> SourceFiles:
    """Every regular file under a directory or inside an archive whose name passes `wanted`.

    Memory stays bounded whatever the input claims: a file larger than max_bytes(name) (default:
    the image limit, vitlab.data.limits) is listed in `too_large` and never read, judged first by
    its size on disk or in the archive header, then by a read that stops one byte past the limit;
    all files together may not exceed the memory budget (a one-line error)."""
    image_limit = max_image_bytes()
    max_bytes = max_bytes or (lambda name: image_limit)
    budget, held = memory_budget(), 0
    out = SourceFiles({}, limit=image_limit)

    def keep(name: str, size: int, open_stream) -> None:
        nonlocal held
        limit = max_bytes(name)
        data = None
        if size <= limit:
            with open_stream() as stream:
                data = read_at_most(stream, limit)
        if data is None:
            out.too_large.append(name)
            return
        held += len(data)
        if held > budget:
            raise ValueError(f"{source}: its files add up to more than {describe_bytes(budget)}, the most "
                             f"vitlab reads into memory on this machine; use a smaller dataset, or set "
                             f"VITLAB_MAX_DATA_MB to allow more")
        out.files[name] = data

    if source.is_dir():
        for name, path in dataset_files(source, wanted):
            keep(name, path.stat().st_size, lambda: open(path, "rb"))
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
                        try:
                            keep(name, info.file_size, lambda: archive.open(info))
                        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError):
                            # a damaged, encrypted or oddly compressed member: that file alone is
                            # unreadable (the decoder names it), as a corrupt JPEG is
                            out.files[name] = b""
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
                    keep(name, member.size, lambda: archive.extractfile(member))
    except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
        raise ValueError(f"{source} is not a readable tar archive ({error})") from None
    return out


def is_image_name(name: str) -> bool:
    return posixpath.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _layout(names: list[str], source: Path) -> tuple[str, list[tuple[str, str, str]]]:
    """("classes" or "splits", (split, class, name) for each image name), after looking through a
    single wrapping directory. Bare class folders go into the train split."""
    parts = [name.split("/") for name in names]
    while len({p[0] for p in parts}) == 1 and all(len(p) > 2 for p in parts) \
            and parts[0][0].lower() not in SPLIT_NAMES:
        parts = [p[1:] for p in parts]
    depth = {len(p) for p in parts}
    if depth == {2}:
        return "classes", [("train", p[0], n) for p, n in zip(parts, names)]
    if depth == {3} and all(p[0].lower() in SPLIT_NAMES for p in parts):
        return "splits", [(SPLIT_NAMES[p[0].lower()], p[1], n) for p, n in zip(parts, names)]
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
    if read.too_large:
        warnings.warn(f"{source}: skipped {len(read.too_large)} file(s) larger than {describe_bytes(read.limit)} "
                      f"(VITLAB_MAX_IMAGE_MB raises the limit): {', '.join(read.too_large[:SHOWN_PROBLEMS])}",
                      stacklevel=3)
        if not read.files:
            raise ValueError(f"{source}: none of its {len(read.too_large)} images could be read: each is larger "
                             f"than {describe_bytes(read.limit)} (VITLAB_MAX_IMAGE_MB raises the limit)")
    if not read.files:
        raise ValueError(f"{source} holds no images (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    names = sorted(read.files)
    layout_kind, layout = _layout(names, source)

    # Opening parses only the header: sizes and modes decide the target before anything is decoded,
    # and the opened images are decoded next without parsing their headers again.
    opened, skipped = {}, list(read.too_large)
    for name in names:
        try:
            opened[name] = open_header(read.files[name], name)
        except ValueError:  # any header failure (or a decompression bomb) means the file is unreadable
            skipped.append(name)
    read.files.clear()  # the opened images hold what they need
    if not opened:
        raise ValueError(f"{source}: none of its {len(names)} images could be read")
    (w, h), _ = Counter(image.size for image in opened.values()).most_common(1)[0]
    natural_channels = 1 if all(image.mode in GRAYSCALE_MODES for image in opened.values()) else 3
    image_size = to_2tuple(image_size) if image_size is not None else (h, w)
    channels = channels or natural_channels
    check_decoded_size(source, len(opened), image_size, channels)

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
    if not per_split:
        raise ValueError(f"{source}: none of its {len(names)} images could be read")
    splits = {split: (np.stack(arrays), np.asarray(labels, dtype=np.int64))
              for split, (arrays, labels) in per_split.items()}
    # "classes": bare class folders (every image is labelled data, held out or not, as the user
    # decides); "splits": train/val/test folders that say which images are for what
    return {"splits": splits, "class_names": class_names, "skipped": sorted(skipped), "layout": layout_kind,
            "natural": {"image_size": [h, w], "channels": natural_channels}}


def check_decoded_size(source, count: int, image_size: tuple[int, int], channels: int) -> None:
    """Refuses, before decoding, a dataset whose uint8 arrays would not fit the memory budget (the
    decoded list and the stacked array exist together for a moment: twice the array)."""
    needed = 2 * count * channels * image_size[0] * image_size[1]
    budget = memory_budget()
    if needed > budget:
        raise ValueError(f"{source}: {count:,} images at {image_size[0]}x{image_size[1]} would take "
                         f"{describe_bytes(needed)} to decode, more than the {describe_bytes(budget)} vitlab "
                         f"uses on this machine; pass a smaller --image-size (or set VITLAB_MAX_DATA_MB)")


def unreadable_message(source, skipped: list[str]) -> str:
    shown = ", ".join(skipped[:SHOWN_PROBLEMS]) + (", ..." if len(skipped) > SHOWN_PROBLEMS else "")
    return f"{source}: skipped {len(skipped)} unreadable image(s): {shown}"
