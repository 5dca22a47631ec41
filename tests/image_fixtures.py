"""Generated image folders for the train/eval/predict tests: small, fast and learnable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("circle", "cross", "stripes")


def class_image(cls: int, rng: np.random.Generator, size: int = 16) -> np.ndarray:
    """uint8 (size, size, 3): a noisy shape with a class-specific colour cast, so a tiny ViT learns
    it in a few dozen steps but not trivially from one pixel."""
    yy, xx = np.mgrid[:size, :size] / (size - 1) * 2 - 1
    if cls == 0:
        mask = (xx**2 + yy**2) < 0.5
    elif cls == 1:
        mask = (np.abs(xx) < 0.25) | (np.abs(yy) < 0.25)
    else:
        mask = (np.floor((xx + 1) * 3) % 2) == 0
    base = rng.uniform(0, 90, (size, size, 3))
    colour = np.array([[220, 60, 60], [60, 220, 60], [60, 60, 220]][cls]) * rng.uniform(0.7, 1.0)
    image = np.where(mask[..., None], colour, base) + rng.normal(0, 20, (size, size, 3))
    return image.clip(0, 255).astype(np.uint8)


def make_image_folder(root: Path, per_class: int = 40, size: int = 16, seed: int = 0) -> Path:
    """root/train/<class>/<n>.png; returns root."""
    rng = np.random.default_rng(seed)
    for cls, name in enumerate(CLASSES):
        folder = root / "train" / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(class_image(cls, rng, size)).save(folder / f"{i:04d}.png")
    return root


TINY_MODEL = dict(dim=32, depth=2, heads=4, mlp_dim=64, image_size=16)


def tiny_config(data: Path, out: Path, **overrides):
    """A TrainConfig that trains a 2-block width-32 ViT on 16x16 images in about a second."""
    from vitlab.config import TrainConfig

    values = dict(model="nano", model_overrides=dict(TINY_MODEL), data=str(data), out=str(out), epochs=3,
                  batch_size=30, eval_batch_size=50, lr=2e-3, warmup_epochs=0.5, val_size=30,
                  ema_decay=0.9, augment="light", seed=0)
    values.update(overrides)
    return TrainConfig(**values)


def train_tiny_run(root: Path, **overrides) -> Path:
    """Generates a folder and trains a tiny model on it; returns the run directory."""
    import vitlab

    data = make_image_folder(root / "images")
    return vitlab.train(tiny_config(data, root / "run", **overrides)).run_dir
