"""Accuracy of a model on a labelled split: top-1, top-5, per class, and the confusion matrix.

The confusion matrix is the one statistic everything else is read from (top-1 is its trace, the
per-class accuracy its normalised diagonal), and it sums across torchrun processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .inference import tta_logits


@dataclass
class EvalResult:
    top1: float
    top5: float
    loss: float
    n: int
    confusion: torch.Tensor  # int64 (K, K): rows are true classes, columns predictions
    class_names: list[str]

    @property
    def per_class(self) -> dict[str, float]:
        counts = self.confusion.sum(dim=1).clamp(min=1)
        return {name: float(self.confusion[i, i] / counts[i]) for i, name in enumerate(self.class_names)}

    def to_dict(self) -> dict:
        return {"top1": self.top1, "top5": self.top5, "loss": self.loss, "n": self.n,
                "per_class": self.per_class, "confusion": self.confusion.tolist()}


@torch.no_grad()
def evaluate(model: nn.Module, loader, num_classes: int, *, bf16: bool = False, runtime=None,
             class_names: list[str] | None = None, tta: str = "none") -> EvalResult:
    """Runs `model` over a BatchLoader(train=False) and counts. With a multi-process runtime each
    process sees its shard and the counts are summed, so every process gets the full result.
    tta="flip" scores each image by the mean logits of it and its mirror image."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    top5_correct = torch.zeros((), dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    k = min(5, num_classes)
    for images, targets in loader:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = tta_logits(model, images, tta)  # (B, K) fp32
        loss_sum += F.cross_entropy(logits, targets, reduction="sum").double()
        predicted = logits.argmax(dim=1)  # (B,)
        confusion += torch.bincount(targets * num_classes + predicted,
                                    minlength=num_classes * num_classes).view(num_classes, num_classes)
        top5_correct += (logits.topk(k, dim=1).indices == targets[:, None]).any(dim=1).sum()
    if runtime is not None and runtime.distributed:
        for tensor in (confusion, top5_correct, loss_sum):
            torch.distributed.all_reduce(tensor)
    model.train(was_training)
    n = int(confusion.sum())
    if n == 0:
        raise ValueError("the evaluation split holds no images")
    confusion = confusion.cpu()
    names = class_names or getattr(model, "class_names", None) or [str(i) for i in range(num_classes)]
    return EvalResult(top1=float(confusion.trace()) / n, top5=float(top5_correct) / n,
                      loss=float(loss_sum) / n, n=n, confusion=confusion, class_names=list(names))


def evaluate_checkpoint(checkpoint: str | Path | None, data: str | Path, *, split: str = "val",
                        val_size: int | float | None = None, split_seed: int | None = None,
                        batch_size: int = 500, precision: str = "auto", device: str = "auto",
                        tta: str = "none") -> EvalResult:
    """Loads a checkpoint and evaluates it on a split of `data`.

    split "val" rebuilds the validation split the checkpoint was trained with: its val_size and
    split_seed are read from the checkpoint unless given, so the held-out images are the same ones.
    precision "auto" runs bf16 where the device computes it natively, else fp32 (vitlab.precision),
    with the network predict and embed use (Classifier.inference_network).
    """
    from .checkpoint import load_checkpoint
    from .data import BatchLoader, load_data
    from .runtime import resolve_device

    run_device = resolve_device(device)
    classifier = load_checkpoint(checkpoint, device=run_device, precision=precision)
    trained_on = classifier.metadata.get("data") or {}
    if val_size is None:
        val_size = trained_on.get("val_size")
    if split_seed is None:
        split_seed = trained_on.get("split_seed", 0)
    splits = load_data(data, val_size=val_size, split_seed=split_seed, image_size=classifier.image_size,
                       channels=classifier.in_channels)
    available = splits.splits()
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val or test, got {split!r}")
    if split not in available:
        raise ValueError(f"{data} has no {split} split (it has: {', '.join(available)})")
    if splits.class_names != classifier.class_names:
        raise ValueError(f"{data} has classes {splits.class_names[:5]}... but the checkpoint was trained "
                         f"on {classifier.class_names[:5]}...; evaluate on data with the same classes")
    loader = BatchLoader(available[split], batch_size, mean=classifier.mean, std=classifier.std, train=False,
                         device=run_device)
    return evaluate(classifier.inference_network(), loader, len(classifier.class_names),
                    class_names=classifier.class_names, tta=tta)
