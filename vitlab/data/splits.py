"""Deterministic, stratified validation split held out of a training set."""

from __future__ import annotations

import torch

CIFAR_TRAIN_SIZE = 50_000
CIFAR_VAL_SIZE = 5_000


def default_val_size(num_train: int) -> int:
    """5,000 for CIFAR-sized training sets (the usual 45k/5k), else 10%."""
    return CIFAR_VAL_SIZE if num_train == CIFAR_TRAIN_SIZE else round(0.1 * num_train)


def resolve_val_size(val_size: int | float | None, num_train: int) -> int:
    if val_size is None:
        return default_val_size(num_train)
    if isinstance(val_size, float):
        if 0 <= val_size < 1:
            return round(val_size * num_train)
        if not val_size.is_integer():
            raise ValueError(f"val_size must be a fraction in [0, 1) or a number of images, got {val_size}")
    count = int(val_size)
    if not 0 <= count < num_train:
        raise ValueError(f"val_size must be between 0 and {num_train - 1} images (the training set "
                         f"has {num_train}), got {val_size}")
    return count


def stratified_split(labels: torch.Tensor, val_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(train_indices, val_indices), both sorted. Each class gives val images in proportion to its
    size (largest remainders settle the rounding, so the total is exactly val_size); which images go
    is a pure function of (labels, val_size, seed)."""
    labels = labels.to(torch.int64)
    num = labels.numel()
    if val_size == 0:
        return torch.arange(num), torch.empty(0, dtype=torch.int64)
    counts = torch.bincount(labels)
    exact = counts.double() * val_size / num
    quota = exact.floor().long()
    remainder_order = torch.argsort(exact - quota, descending=True, stable=True)
    quota[remainder_order[: val_size - int(quota.sum())]] += 1
    generator = torch.Generator().manual_seed(seed)
    val_parts = []
    for cls in range(counts.numel()):
        members = torch.nonzero(labels == cls).squeeze(1)
        chosen = members[torch.randperm(members.numel(), generator=generator)[: quota[cls]]]
        val_parts.append(chosen)
    val = torch.sort(torch.cat(val_parts)).values
    keep = torch.ones(num, dtype=torch.bool)
    keep[val] = False
    return torch.nonzero(keep).squeeze(1), val
