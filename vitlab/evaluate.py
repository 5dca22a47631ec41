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
    split: str = ""  # which images were scored, when evaluate_checkpoint chose them

    @property
    def per_class(self) -> dict[str, float]:
        """Top-1 of each class that has images here (data of only some classes scores only those)."""
        counts = self.confusion.sum(dim=1)
        return {name: float(self.confusion[i, i] / counts[i]) for i, name in enumerate(self.class_names)
                if counts[i] > 0}

    def to_dict(self) -> dict:
        return {"top1": self.top1, "top5": self.top5, "loss": self.loss, "n": self.n,
                "per_class": self.per_class, "confusion": self.confusion.tolist()}


@torch.no_grad()
def evaluate(model: nn.Module, loader, num_classes: int, *, bf16: bool = False, runtime=None,
             class_names: list[str] | None = None, tta: str = "none", progress: bool = False) -> EvalResult:
    """Runs `model` over a BatchLoader(train=False) and counts. With a multi-process runtime each
    process sees its shard and the counts are summed, so every process gets the full result.
    tta="flip" scores each image by the mean logits of it and its mirror image. progress=True
    draws a bar on stderr for long runs (vitlab.predict.progress_bar says when); training's
    per-epoch validation leaves it off."""
    from .predict import progress_bar

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    top5_correct = torch.zeros((), dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    k = min(5, num_classes)
    batches = len(loader) if hasattr(loader, "__len__") else 0
    bar = progress_bar(batches, batches=batches, desc="eval", unit="batch", enabled=progress)
    for images, targets in loader:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = tta_logits(model, images, tta)  # (B, K) fp32
        loss_sum += F.cross_entropy(logits, targets, reduction="sum").double()
        predicted = logits.argmax(dim=1)  # (B,)
        confusion += torch.bincount(targets * num_classes + predicted,
                                    minlength=num_classes * num_classes).view(num_classes, num_classes)
        top5_correct += (logits.topk(k, dim=1).indices == targets[:, None]).any(dim=1).sum()
        bar.update(1)
    bar.close()
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


SPLITS = ("auto", "val", "test", "train", "all")


def evaluate_checkpoint(checkpoint: str | Path | None, data: str | Path, *, split: str = "auto",
                        val_size: int | float | None = None, split_seed: int | None = None,
                        batch_size: int = 500, precision: str = "auto", device: str = "auto",
                        tta: str = "none", progress: bool = False) -> EvalResult:
    """Loads a checkpoint (None: the shipped model) and evaluates it on `data`.

    split "val" rebuilds the validation split the checkpoint was trained with: its val_size and
    split_seed are read from the checkpoint unless given, so the held-out images are the same ones.
    "all" scores every image in `data`; "auto" (the default) is "val" for data with a train/ split
    (what training holds images out of) and "all" for bare class folders or a test/-only folder.
    The data's classes are matched to the model's by name, so a folder of only some classes (cat/,
    dog/) is scored against all ten; a class the model does not know is an error.
    precision "auto" runs bf16 where the device computes it natively, else fp32 (vitlab.precision),
    with the network predict and embed use (Classifier.inference_network). progress=True draws a
    bar on stderr while a long evaluation runs.
    """
    from .checkpoint import load_checkpoint
    from .data import BatchLoader
    from .runtime import resolve_device

    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    run_device = resolve_device(device)
    classifier = load_checkpoint(checkpoint, device=run_device, precision=precision)
    chosen, split = labelled_images(classifier, data, split, val_size=val_size, split_seed=split_seed)
    loader = BatchLoader(chosen, batch_size, mean=classifier.mean, std=classifier.std, train=False,
                         device=run_device)
    result = evaluate(classifier.inference_network(), loader, len(classifier.class_names),
                      class_names=classifier.class_names, tta=tta, progress=progress)
    result.split = split
    return result


def labelled_images(classifier, data: str | Path, split: str = "auto", *, val_size: int | float | None = None,
                    split_seed: int | None = None):
    """(ImageSet, split name): the images of `data` that `split` names (see evaluate_checkpoint),
    labelled with indices into `classifier`'s classes. val_size and split_seed default to the ones
    the checkpoint recorded, so "val" is the split it held out."""
    from .data import ImageSet, load_data

    trained_on = (getattr(classifier, "metadata", None) or {}).get("data") or {}
    if val_size is None:
        val_size = trained_on.get("val_size")
    if split_seed is None:
        split_seed = trained_on.get("split_seed", 0)
    splits = load_data(data, val_size=val_size, split_seed=split_seed, image_size=classifier.image_size,
                       channels=classifier.in_channels)
    available = splits.splits()
    if split == "auto":
        split = "val" if splits.layout == "splits" and splits.train is not None else "all"
    if split == "all":
        # the source's own images, whole: undo the held-out carve (train + val) and add test
        every = list(available.values())
        chosen = ImageSet(torch.cat([s.images for s in every]), torch.cat([s.labels for s in every]),
                          splits.class_names)
    elif split not in available:
        raise ValueError(f"{data} has no {split} split (it has: {', '.join(available)}); "
                         f"--split all scores every image in it")
    else:
        chosen = available[split]
    labels = _model_labels(chosen.labels, splits.class_names, classifier.class_names, data)
    return ImageSet(chosen.images, labels, list(classifier.class_names)), split


def _model_labels(labels: torch.Tensor, data_classes: list[str], model_classes: list[str], data) -> torch.Tensor:
    """The data's labels as indices into the model's classes, matched by name."""
    if list(data_classes) == list(model_classes):
        return labels
    index = {name: k for k, name in enumerate(model_classes)}
    unknown = [name for name in data_classes if name not in index]
    if unknown:
        shown = ", ".join(model_classes[:10]) + (", ..." if len(model_classes) > 10 else "")
        raise ValueError(f"{data} has class folder(s) {', '.join(map(repr, unknown[:5]))} that the model does "
                         f"not know (it knows: {shown}); rename or remove them")
    mapping = torch.tensor([index[name] for name in data_classes], dtype=torch.int64)
    return mapping[labels]
