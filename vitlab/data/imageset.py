"""The in-memory dataset types every other module passes around: decoded uint8 images with labels."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ImageSet:
    images: torch.Tensor  # uint8 (N, C, H, W), CPU, contiguous
    labels: torch.Tensor  # int64 (N,)
    class_names: list[str]

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"ImageSet images must be uint8 (N, C, H, W), got {self.images.dtype} "
                             f"{tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"ImageSet has {self.images.shape[0]} images but labels of shape "
                             f"{tuple(self.labels.shape)}")
        self.labels = self.labels.to(torch.int64)

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, indices_or_n) -> "ImageSet":
        """An int n keeps the first n images; a sequence or tensor of indices keeps those, in that order."""
        if isinstance(indices_or_n, int):
            index = slice(0, indices_or_n)
        else:
            index = torch.as_tensor(indices_or_n, dtype=torch.int64)
        return ImageSet(self.images[index].contiguous(), self.labels[index].contiguous(), self.class_names)

    def class_counts(self) -> list[int]:
        return torch.bincount(self.labels, minlength=len(self.class_names)).tolist()

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.images.shape[2:])


@dataclass
class DataSplits:
    train: ImageSet | None  # None for a source that holds only a test/ (or val/) split
    val: ImageSet | None  # held out of train (deterministic, stratified) or None if val_size=0
    test: ImageSet | None  # the source's official test split, when it has one
    mean: tuple[float, ...]  # per-channel mean of the train split (else of the first split), pixel/255
    std: tuple[float, ...]
    source: str  # what was loaded, for logs
    skipped: list[str] = field(default_factory=list)  # unreadable files that were left out
    # "classes": bare class folders; "splits": train/val/test folders, or a dataset with official splits
    layout: str = "splits"

    @property
    def _first(self) -> ImageSet:
        return next(iter(self.splits().values()))

    @property
    def class_names(self) -> list[str]:
        return self._first.class_names

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_size(self) -> tuple[int, int]:
        return self._first.image_size

    @property
    def in_channels(self) -> int:
        return self._first.images.shape[1]

    def splits(self) -> dict[str, ImageSet]:
        """The splits that exist, by name, in the order train, val, test."""
        named = {"train": self.train, "val": self.val, "test": self.test}
        return {name: s for name, s in named.items() if s is not None}


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 (N, C, H, W) images, on the pixel/255 scale.

    From a 256-bin histogram per channel (bincount reads uint8 directly): exact, and neither a
    float copy of the dataset nor overflow."""
    values = torch.arange(256, dtype=torch.float64)
    means, stds = [], []
    for c in range(images.shape[1]):
        counts = torch.bincount(images[:, c].reshape(-1), minlength=256).double()
        total = counts.sum()
        mean = (counts * values).sum() / total
        var = (counts * (values - mean).square()).sum() / total
        means.append(float(mean) / 255)
        stds.append(float(var.sqrt()) / 255)
    return tuple(means), tuple(stds)
