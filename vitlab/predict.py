"""Classifying image files: expand files/folders/globs, convert in batches, keep going past bad files."""

from __future__ import annotations

import glob
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


def iter_image_batches(classifier: Classifier, inputs: list[str | Path], batch_size: int):
    """Expands `inputs` and yields (paths read, uint8 batch (B, C, H, W) or None, [(input, error)])
    per chunk of batch_size files, converting each image as at training time."""
    from .data import load_image

    paths, problems = expand_inputs(inputs)
    if problems:
        yield [], None, [(p.path, p.error) for p in problems]
    for start in range(0, len(paths), batch_size):
        good, tensors, bad = [], [], []
        for path in paths[start:start + batch_size]:
            try:
                tensors.append(load_image(path, classifier.image_size, classifier.in_channels))
                good.append(str(path))
            except (ValueError, OSError) as error:
                bad.append((str(path), str(error)))
        yield good, torch.stack(tensors) if tensors else None, bad


def predict_files(classifier: Classifier, inputs: list[str | Path], *, top_k: int = 5,
                  batch_size: int = 64, tta: str = "none") -> list[FilePrediction]:
    """Top-k predictions for every image in `inputs`; unreadable files get an error entry instead.
    tta="flip" averages each image with its mirror image (Classifier.probabilities)."""
    results: list[FilePrediction] = []
    order: dict[str, int] = {}
    for good, batch, bad in iter_image_batches(classifier, inputs, batch_size):
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
