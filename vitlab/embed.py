"""Features without the head: pre-logits embeddings of image files for retrieval or a linear probe."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .classifier import Classifier
from .predict import iter_image_batches


def embed_files(classifier: Classifier, inputs: list[str | Path], *, pooling: str | None = None,
                batch_size: int = 64, progress: bool = False) -> tuple[list[str], np.ndarray, list[tuple[str, str]]]:
    """(paths embedded, float32 features (N, D) in that order, [(input, error)] for the rest).
    progress=True draws a bar on stderr for long runs (vitlab.predict.progress_bar)."""
    paths: list[str] = []
    chunks: list[np.ndarray] = []
    problems: list[tuple[str, str]] = []
    for good, batch, bad in iter_image_batches(classifier, inputs, batch_size, progress=progress, desc="embed"):
        problems += bad
        if good:
            paths += good
            chunks.append(classifier.embed(batch, pooling=pooling).cpu().numpy())  # (B, D)
    width = classifier.model.config.dim
    features = np.concatenate(chunks) if chunks else np.zeros((0, width), dtype=np.float32)
    return paths, features.astype(np.float32), problems
