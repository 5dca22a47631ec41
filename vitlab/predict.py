"""Classifying image files: expand files/folders/globs, convert in batches, keep going past bad files;
the table and CSV views of the results, and the progress bar that predict, embed and eval share."""

from __future__ import annotations

import csv
import glob
import io
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .classifier import Classifier
from .data.image import IMAGE_EXTENSIONS


@dataclass
class FilePrediction:
    path: str
    top: list[tuple[str, float]] | None  # (class, probability), most likely first; None on error
    error: str | None = None

    def to_dict(self) -> dict:
        if self.error is not None:
            return {"path": self.path, "error": self.error}
        top = [{"class": c, "probability": round(p, 6)} for c, p in self.top]
        return {"path": self.path, "predictions": top}


# A run of this many batches or fewer finishes before a progress bar would tell anyone anything.
FEW_BATCHES = 3


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, *, batches: int, desc: str, unit: str = "img", enabled: bool = True):
    """A tqdm bar on stderr (call .update(n), then .close()), or a stand-in that draws nothing.

    Drawn only when `enabled`, there are more than FEW_BATCHES batches, and stderr is a terminal:
    stdout carries the table, JSON or CSV and stays clean for pipes, and a log file or CI output
    (stderr not a terminal) gets no carriage-return clutter. The bar erases itself when done."""
    if not (enabled and batches > FEW_BATCHES and sys.stderr.isatty()):
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True)


def expand_inputs(inputs: list[str | Path]) -> tuple[list[Path], list[FilePrediction]]:
    """Files as given (any suffix), folders searched recursively for image suffixes, globs expanded.

    Returns (paths, problems): an input that matches nothing becomes an error entry, not an abort.
    """
    paths: list[Path] = []
    problems: list[FilePrediction] = []
    for item in inputs:
        item = str(item)
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                problems.append(FilePrediction(item, None, f"folder {item} holds no images"))
            paths.extend(found)
        elif path.exists():
            paths.append(path)
        elif glob.has_magic(item):
            found = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
            if not found:
                problems.append(FilePrediction(item, None, f"no files match {item}"))
            paths.extend(found)
        else:
            problems.append(FilePrediction(item, None, f"no such file: {item}"))
    return paths, problems


def iter_image_batches(classifier: Classifier, inputs: list[str | Path], batch_size: int, *,
                       progress: bool = False, desc: str = "images"):
    """Expands `inputs` and yields (paths read, uint8 batch (B, C, H, W) or None, [(input, error)])
    per chunk of batch_size files, converting each image as at training time. progress=True draws
    a bar on stderr for long runs (progress_bar says when)."""
    from .data import load_image

    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
    paths, problems = expand_inputs(inputs)
    if problems:
        yield [], None, [(p.path, p.error) for p in problems]
    bar = progress_bar(len(paths), batches=-(-len(paths) // batch_size), desc=desc, enabled=progress)
    try:
        for start in range(0, len(paths), batch_size):
            good, tensors, bad = [], [], []
            chunk = paths[start:start + batch_size]
            for path in chunk:
                try:
                    tensors.append(load_image(path, classifier.image_size, classifier.in_channels))
                    good.append(str(path))
                except (ValueError, OSError) as error:
                    bad.append((str(path), str(error)))
            yield good, torch.stack(tensors) if tensors else None, bad
            bar.update(len(chunk))  # after the caller has used the batch: the bar counts finished images
    finally:
        bar.close()


def predict_files(classifier: Classifier, inputs: list[str | Path], *, top_k: int = 5,
                  batch_size: int = 64, tta: str = "none", progress: bool = False) -> list[FilePrediction]:
    """Top-k predictions for every image in `inputs`; unreadable files get an error entry instead.
    tta="flip" averages each image with its mirror image (Classifier.probabilities); progress=True
    draws a bar on stderr for long runs."""
    if not (isinstance(top_k, int) and top_k >= 1):
        raise ValueError(f"top_k must be a whole number >= 1, got {top_k!r}")
    results: list[FilePrediction] = []
    order: dict[str, int] = {}
    for good, batch, bad in iter_image_batches(classifier, inputs, batch_size, progress=progress,
                                               desc="predict"):
        for path, error in bad:
            order.setdefault(path, len(order))
            results.append(FilePrediction(path, None, error))
        if batch is not None:
            for path, top in zip(good, classifier.predict(batch, top_k=top_k, tta=tta)):
                order.setdefault(path, len(order))
                results.append(FilePrediction(path, top))
    return sorted(results, key=lambda r: order[r.path])


def format_table(results: list[FilePrediction], top_k: int) -> str:
    """One line per image: the path, then the top classes with probabilities."""
    width = max([len(r.path) for r in results] + [5])
    lines = [f"{'image'.ljust(width)}  top-{top_k} (probability)"]
    for r in results:
        if r.error is not None:
            lines.append(f"{r.path.ljust(width)}  ERROR: {r.error}")
        else:
            lines.append(f"{r.path.ljust(width)}  " + "  ".join(f"{c} {p:.3f}" for c, p in r.top))
    return "\n".join(lines)


def format_csv(results: list[FilePrediction], top_k: int) -> str:
    """One CSV row per image: path, class_1, probability_1, ... class_k, probability_k, error.

    k is top_k, or the number of classes when the model has fewer; an unreadable image has empty
    class and probability cells and its error in the last column."""
    k = max((len(r.top) for r in results if r.top is not None), default=top_k)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", *[f"{column}_{i}" for i in range(1, k + 1) for column in ("class", "probability")],
                     "error"])
    for r in results:
        cells = [value for c, p in (r.top or []) for value in (c, f"{p:.6f}")]
        writer.writerow([r.path, *cells, *[""] * (2 * k - len(cells)), r.error or ""])
    return buffer.getvalue()
