"""Distillation's teacher: a small CNN that vitlab trains first, inside the ViT's time budget.

`vitlab train --time-budget 60m --distill 0.25` spends the first quarter of the budget training
`TeacherCNN` and labelling every training image with its prediction once (`teach`), then trains
the ViT on both labels: DeiT's hard distillation (Touvron et al., ICML 2021), half the loss
against the true label (label-smoothed) and half against the teacher's. A CNN's locality is what
a ViT lacks on 50,000 images, and the teacher passes some of it on through the images it labels
differently. DeiT adds a distillation token and head for the teacher's half; vitlab trains the
[CLS] head on both halves instead, so the ViT that is saved is the same plain ViT as without
distillation.

The teacher is airbench's shape (Jordan, 2024: groups of conv -> max-pool -> BN -> GELU -> conv ->
BN -> GELU, a max-pooled head), narrower, trained as the fast CIFAR ResNets are (Page's DAWNBench
ResNet-9): SGD with Nesterov momentum, batch 256, logits scaled by 1/8, label smoothing 0.2,
linear warmup and decay to zero over the seconds it is given, 2-pixel translations and
alternating flips.

The labels are computed once on the un-augmented images (the student's crops move an image by at
most 4 pixels, and its flips are the teacher's own augmentation): one forward pass over the
training set instead of one per student step.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .data import BatchLoader, ImageSet
from .data.augment import AugmentConfig
from .data.loader import derive_seed
from .optim import learning_rate, set_learning_rate

# Page's ResNet-9 settings (peak lr 0.4 at batch 512, weight decay 5e-4, Nesterov momentum 0.9,
# logits x 0.125) with batch and lr halved: a short run needs steps more than large batches, and a
# batch of 256 trained 10% more images per second than 512 on a 2-core CPU; label smoothing 0.2 as
# airbench; warmup a fifth of the run
BATCH_SIZE, PEAK_LR, MOMENTUM, WEIGHT_DECAY, LOGIT_SCALE = 256, 0.2, 0.9, 5e-4, 0.125
LABEL_SMOOTHING, WARMUP_FRACTION = 0.2, 0.2
# Steps [TIME_FROM, TIME_FROM + TIME_STEPS) are timed to fix the teacher's length (until then the
# warmup is taken as PROVISIONAL_WARMUP steps long); it is fitted again every TEACHER_REFIT_EVERY
# steps from the pace since, so a machine that slows down still ends on time.
TIME_FROM, TIME_STEPS, TEACHER_REFIT_EVERY, PROVISIONAL_WARMUP, MIN_STEPS = 2, 5, 10, 50, 10
# a forward pass costs about a third of a training step (forward + backward): what labelling the
# training and validation images will take, reserved out of the teacher's seconds
FORWARD_SHARE = 1 / 3
# the teacher draws its init and data order from its own seeds, apart from the ViT's (seed, ...)
INIT_STREAM, DATA_STREAM = 17, 18
# channels of the stem and the three groups, narrower than airbench's: 1.2 M parameters, which
# train about 3 epochs in 15 minutes on a 2-core CPU (docs/recipe.md); the teacher's file records them
WIDTHS = (32, 64, 128, 256)


class ConvGroup(nn.Module):
    """conv 3x3 -> max-pool 2 -> BN -> GELU -> conv 3x3 -> BN -> GELU: (B, C_in, H, W) -> (B, C_out, H/2, W/2)."""

    def __init__(self, channels_in: int, channels_out: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, padding=1, bias=False)
        self.norm1 = nn.BatchNorm2d(channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(channels_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.norm1(F.max_pool2d(self.conv1(x), 2)))
        return F.gelu(self.norm2(self.conv2(x)))


class TeacherCNN(nn.Module):
    """A stem conv and three ConvGroups (32 -> 16 -> 8 -> 4 pixels), global max-pool, linear head;
    `widths` (the stem's and each group's channels) defaults to the module's WIDTHS."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3,
                 widths: tuple[int, int, int, int] | None = None):
        super().__init__()
        widths = self.widths = tuple(widths or WIDTHS)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.GELU())
        self.groups = nn.Sequential(*(ConvGroup(a, b) for a, b in zip(widths[:-1], widths[1:])))
        self.head = nn.Linear(widths[-1], num_classes, bias=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.groups(self.stem(images))  # (B, C, H/8, W/8)
        return self.head(torch.amax(x, dim=(2, 3))) * LOGIT_SCALE  # (B, K)


@dataclass
class TeacherReport:
    steps: int
    epochs: float
    seconds: float  # training and labelling
    val_top1: float | None  # on the run's validation split; None without one
    agreement: float  # share of the training images whose teacher label is the true label

    def summary(self) -> str:
        val = f"validation top-1 {self.val_top1:.2%}, " if self.val_top1 is not None else ""
        return (f"teacher: {self.steps:,} steps ({self.epochs:.1f} epochs) in {self.seconds:.0f} s; {val}"
                f"its labels agree with {self.agreement:.1%} of the training labels")


def _channels_last(device: torch.device):
    # oneDNN's fast convolution layout on a CPU; a GPU's cuDNN picks its own
    return torch.channels_last if device.type == "cpu" else torch.contiguous_format


def train_teacher(train_set: ImageSet, *, mean, std, seconds: float, seed: int, device: torch.device,
                  bf16: bool = False, reserve_images: int = 0, log=print,
                  progress: bool = False) -> tuple[TeacherCNN, int]:
    """(A TeacherCNN, its optimizer steps) trained on `train_set` for about `seconds` of wall time,
    less the forward passes over `reserve_images` images that will label with it (at least
    MIN_STEPS steps): the first steps are timed, the length in steps is fitted to the time left
    and re-fitted as it goes, and the learning rate decays linearly to zero on the last step.
    Seeds the global RNG (the teacher's init). progress=True draws a bar on stderr."""
    from tqdm.auto import tqdm

    started = time.perf_counter()
    layout = _channels_last(device)
    torch.manual_seed(derive_seed(seed, INIT_STREAM))
    model = TeacherCNN(len(train_set.class_names), train_set.images.shape[1]).to(device, memory_format=layout)
    batch = min(BATCH_SIZE, len(train_set))
    loader = BatchLoader(train_set, batch, mean=mean, std=std, train=True, device=device,
                         augment=AugmentConfig(crop_padding=2, flip=True, flip_mode="alternate"),
                         seed=derive_seed(seed, DATA_STREAM))
    decay = [p for p in model.parameters() if p.ndim > 1]  # conv and head weights; not BN's
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": WEIGHT_DECAY},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=PEAK_LR, momentum=MOMENTUM, nesterov=True)
    model.train()
    bar = tqdm(total=None, unit="step", desc="teacher", leave=False, dynamic_ncols=True, mininterval=1.0,
               disable=not progress, file=sys.stderr)
    step, epoch, total = 0, 0, None
    timed_from = None  # (step, time) where the pace is measured from
    while total is None or step < total:
        loader.set_epoch(epoch)
        epoch += 1
        for images, labels in loader:
            warmup = max(1, round(WARMUP_FRACTION * total)) if total else PROVISIONAL_WARMUP
            set_learning_rate(optimizer, learning_rate(step, total or 2**62, warmup, PEAK_LR, 0.0, "linear"))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(images.contiguous(memory_format=layout))
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=LABEL_SMOOTHING)
            value = loss.item()  # the one host read of the step; it also waits for a GPU, so the timing is honest
            if not math.isfinite(value):
                raise RuntimeError(f"the distillation teacher's loss became {value} at step {step + 1} "
                                   f"(SGD at lr {PEAK_LR}); train without --distill")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            now = time.perf_counter()
            if step == TIME_FROM:
                timed_from = (step, now)
            elif timed_from is not None and step - timed_from[0] == (TIME_STEPS if total is None
                                                                     else TEACHER_REFIT_EVERY):
                pace = (now - timed_from[1]) / (step - timed_from[0])
                labelling = reserve_images / batch * pace * FORWARD_SHARE
                fitted = max(MIN_STEPS, step + 1, step + int((seconds - labelling - (now - started)) / pace))
                if total is None:
                    log(f"teacher: {1 / pace:.2f} steps/s -> {fitted:,} steps of batch {batch} "
                        f"({fitted * batch / len(train_set):.1f} epochs)")
                total, timed_from = fitted, (step, now)
                bar.total = total
            bar.update(1)
            bar.set_postfix_str(f"loss {value:.3f}", refresh=False)
            if total is not None and step >= total:
                break
    bar.close()
    model.eval()
    return model, step


@torch.no_grad()
def label_images(model: TeacherCNN, images: ImageSet, *, mean, std, device: torch.device, bf16: bool = False,
                 batch_size: int = 500) -> torch.Tensor:
    """The teacher's predicted class of every image of `images` (un-augmented): int64 (N,)."""
    model.eval()
    layout = _channels_last(device)
    loader = BatchLoader(images, batch_size, mean=mean, std=std, train=False, device=device)
    predictions = []
    for batch, _ in loader:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            predictions.append(model(batch.contiguous(memory_format=layout)).argmax(1))
    return torch.cat(predictions).to(torch.int64)


def teach(train_set: ImageSet, val_set: ImageSet | None, *, mean, std, seconds: float, seed: int,
          device: torch.device, bf16: bool = False, batch_size: int = 500, log=print,
          progress: bool = False) -> tuple[torch.Tensor, TeacherCNN, TeacherReport]:
    """Trains the teacher and labels `train_set` with it in about `seconds`, and scores it on
    `val_set`: (labels int64 (N,) on the CPU, the teacher, its report)."""
    started = time.perf_counter()
    val_size = len(val_set) if val_set is not None else 0
    teacher, steps = train_teacher(train_set, mean=mean, std=std, seconds=seconds, seed=seed, device=device,
                                   bf16=bf16, reserve_images=len(train_set) + val_size, log=log, progress=progress)
    labels = label_images(teacher, train_set, mean=mean, std=std, device=device, bf16=bf16, batch_size=batch_size)
    val_top1 = None
    if val_size:
        predicted = label_images(teacher, val_set, mean=mean, std=std, device=device, bf16=bf16,
                                 batch_size=batch_size)
        val_top1 = float((predicted == val_set.labels.to(predicted.device)).float().mean())
    agreement = float((labels == train_set.labels.to(labels.device)).float().mean())
    epochs = steps * min(BATCH_SIZE, len(train_set)) / len(train_set)
    report = TeacherReport(steps, round(epochs, 3), round(time.perf_counter() - started, 1), val_top1, agreement)
    return labels.cpu(), teacher, report


# ---------------------------------------------------------------- the run directory's teacher.safetensors
def image_sums(images: ImageSet) -> torch.Tensor:
    """A fingerprint of every image, in order: int64 (N,) sums of its pixel values. Two splits of
    the same class folders have the same label sequence; they do not have the same images."""
    return images.images.flatten(1).sum(1, dtype=torch.int64).cpu()


def save_teacher(path: str | Path, teacher: TeacherCNN, labels: torch.Tensor, train_set: ImageSet,
                 report: TeacherReport) -> None:
    """The teacher's weights, its label for every training image, and the true labels and
    fingerprints of the images they were made for (a resumed run checks it trains on the same
    images), with the report as metadata."""
    from safetensors.torch import save

    from .files import atomic_write_bytes

    tensors = {"labels": labels.contiguous(), "true_labels": train_set.labels.cpu().contiguous(),
               "image_sums": image_sums(train_set),
               **{f"teacher.{k}": v.detach().cpu().contiguous() for k, v in teacher.state_dict().items()}}
    metadata = {"vitlab_teacher": json.dumps({**asdict(report), "widths": list(teacher.widths)})}
    atomic_write_bytes(path, save(tensors, metadata=metadata))


def load_teacher_labels(path: str | Path, train_set: ImageSet) -> tuple[torch.Tensor, dict]:
    """(the teacher's labels, its report) from save_teacher's file, for a run training on
    `train_set`; ValueError, saying why, when the file cannot be read or was made for other images."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as saved:
            labels, true_labels, sums = (saved.get_tensor(k) for k in ("labels", "true_labels", "image_sums"))
            report = json.loads((saved.metadata() or {})["vitlab_teacher"])
    except Exception as error:  # noqa: BLE001 - SafetensorError, OSError, KeyError, JSON: missing, torn or foreign
        raise ValueError(f"{path} cannot be read as the distillation teacher's labels ({error})") from None
    classes = len(train_set.class_names)
    if (labels.dtype != torch.int64 or labels.shape != true_labels.shape
            or (len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < classes)):
        raise ValueError(f"{path} holds no valid teacher labels for {classes} classes")
    if not (torch.equal(true_labels, train_set.labels.cpu()) and torch.equal(sums, image_sums(train_set))):
        raise ValueError(f"{path} labels other training images than this run has ({len(true_labels)} against "
                         f"{len(train_set)}): --data, --subset, --val-size and --split-seed must stay as the run "
                         f"was started")
    return labels, report
