"""Augmentation settings and the operations the BatchLoader applies to whole batches.

Order in a training batch: random crop with padding and horizontal flip (batched index arithmetic,
on the loader's device), the per-sample policy on uint8 images (torchvision.transforms.v2),
normalisation, random erasing (per-sample boxes, batched), then Mixup or CutMix with soft labels.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

import torch

POLICIES = ("none", "randaugment", "trivialaugment", "autoaugment")
_KIND_NAMES = {bool: "true or false", int: "a whole number", float: "a finite number", str: "text"}


@dataclass
class AugmentConfig:
    crop_padding: int = 0  # random crop of the original size from the image padded by this many pixels
    padding_mode: str = "reflect"  # "reflect" (as airbench) or "zeros"
    flip: bool = False  # horizontal flip with probability 1/2
    # "random": each image flips with probability 1/2 every epoch; "alternate": each image flips in
    # every other epoch, starting from a random half (airbench's derandomised flip: the model sees
    # both orientations of every image in any two consecutive epochs)
    flip_mode: str = "random"
    policy: str = "none"  # "none" | "randaugment" | "trivialaugment" | "autoaugment" (CIFAR-10 policy)
    randaugment_ops: int = 2
    randaugment_magnitude: int = 9
    policy_chunk: int = 1  # images that share one random draw of the policy (1 = every image its own)
    random_erasing: float = 0.0  # probability of erasing one box per image (filled with the dataset mean)
    mixup_alpha: float = 0.0  # Beta(alpha, alpha) mixing weight; 0 = off
    cutmix_alpha: float = 0.0  # 0 = off; with both on, each batch picks one at random
    mix_prob: float = 1.0  # probability that a batch is mixed at all

    def __post_init__(self):
        # the types first: a value from --augment-arg or a config file may be any YAML scalar
        for f in fields(self):
            value, kind = getattr(self, f.name), type(f.default)
            ok = isinstance(value, bool) if kind is bool else (
                isinstance(value, kind) and not isinstance(value, bool) if kind is not float else
                isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value))
            if not ok:
                raise ValueError(f"augmentation setting {f.name} must be {_KIND_NAMES[kind]}, got {value!r}")
        if self.policy not in POLICIES:
            raise ValueError(f"unknown augmentation policy {self.policy!r}; choose one of: {', '.join(POLICIES)}")
        if self.flip_mode not in ("random", "alternate"):
            raise ValueError(f"flip_mode must be 'random' or 'alternate', got {self.flip_mode!r}")
        if self.padding_mode not in ("reflect", "zeros"):
            raise ValueError(f"padding_mode must be 'reflect' or 'zeros', got {self.padding_mode!r}")
        if self.crop_padding < 0 or self.policy_chunk < 1:
            raise ValueError("crop_padding must be >= 0 and policy_chunk >= 1")
        # torchvision's RandAugment has 31 magnitude bins; a larger index fails at the first batch
        if self.randaugment_ops < 0 or not 0 <= self.randaugment_magnitude <= 30:
            raise ValueError(f"randaugment_ops must be >= 0 and randaugment_magnitude in [0, 30], got "
                             f"{self.randaugment_ops} and {self.randaugment_magnitude}")
        for name in ("random_erasing", "mix_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} is a probability in [0, 1], got {getattr(self, name)}")
        if self.mixup_alpha < 0 or self.cutmix_alpha < 0:
            raise ValueError("mixup_alpha and cutmix_alpha must be >= 0")

    @property
    def mixes(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def to_dict(self) -> dict:
        return asdict(self)


AUGMENT_PRESETS: dict[str, AugmentConfig] = {
    "none": AugmentConfig(),
    # the standard CIFAR recipe: enough for ResNets, too little for a ViT trained from scratch
    "light": AugmentConfig(crop_padding=4, flip=True),
    # DeiT-style regularisation that ViTs need on small data
    "strong": AugmentConfig(crop_padding=4, flip=True, policy="randaugment", random_erasing=0.25,
                            mixup_alpha=0.8, cutmix_alpha=1.0),
}


def augment_preset(name: str, **overrides) -> AugmentConfig:
    if name not in AUGMENT_PRESETS:
        raise ValueError(f"unknown augmentation preset {name!r}; choose one of: {', '.join(AUGMENT_PRESETS)}")
    known = [f.name for f in fields(AugmentConfig)]
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise ValueError(f"unknown augmentation setting(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return replace(AUGMENT_PRESETS[name], **overrides)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on `device` without making the host wait: a plain copy to a GPU waits for every
    kernel already queued there (the whole previous training step), a copy from pinned memory
    does not. PyTorch's pinned-memory cache keeps the buffer alive until the copy has run."""
    if device.type != "cuda" or tensor.device == device:
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def random_crop_flip(images: torch.Tensor, padding: int, flip: bool, generator: torch.Generator,
                     padding_mode: str = "reflect", flipped: torch.Tensor | None = None) -> torch.Tensor:
    """Pads, crops back to the original size at a random offset and flips, per image, in one gather.

    images: uint8 (B, C, H, W) on any device; the random draws come from a CPU generator so the
    result does not depend on the device. flipped: bool (B,) on the CPU says which images flip
    (alternating flips); None draws it with probability 1/2 when `flip` is on."""
    b, _, h, w = images.shape
    device = images.device
    rows = torch.arange(h).expand(b, h).clone()  # (B, H) source row of each output row
    cols = torch.arange(w).expand(b, w).clone()  # (B, W)
    if padding:
        rows += torch.randint(-padding, padding + 1, (b, 1), generator=generator)
        cols += torch.randint(-padding, padding + 1, (b, 1), generator=generator)
    if flip and flipped is None:
        flipped = torch.rand(b, generator=generator) < 0.5
    if flipped is not None:
        cols[flipped] = cols[flipped].flip(1)
    inside = None
    if padding and padding_mode == "zeros":
        inside = ((rows >= 0) & (rows < h)).unsqueeze(2) & ((cols >= 0) & (cols < w)).unsqueeze(1)  # (B, H, W)
    rows = _reflect(rows, h) if padding_mode == "reflect" else rows.clamp(0, h - 1)
    cols = _reflect(cols, w) if padding_mode == "reflect" else cols.clamp(0, w - 1)
    batch = torch.arange(b, device=device)[:, None, None]
    out = images[batch, :, to_device(rows, device)[:, :, None], to_device(cols, device)[:, None, :]]  # (B, H, W, C)
    if inside is not None:
        out = out * to_device(inside, device).unsqueeze(3)
    return out.permute(0, 3, 1, 2).contiguous()  # (B, C, H, W)


def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    # reflection without repeating the edge pixel, as torch.nn.functional.pad(mode="reflect")
    index = index.abs()
    return torch.where(index > size - 1, 2 * (size - 1) - index, index)


def first_epoch_flips(dataset_size: int, seed: int) -> torch.Tensor:
    """bool (N,): the seeded random half of the dataset that alternating flips mirror in even epochs
    (the other half in odd ones)."""
    return torch.rand(dataset_size, generator=torch.Generator().manual_seed(seed)) < 0.5


def alternating_flips(index: torch.Tensor, epoch: int, first_flips: torch.Tensor) -> torch.Tensor:
    """bool (B,): whether each dataset image `index` is flipped in `epoch` under alternating flips."""
    return first_flips[index.cpu()] ^ bool(epoch % 2)


def build_policy(config: AugmentConfig):
    """The torchvision.transforms.v2 policy for uint8 images, or None."""
    if config.policy == "none":
        return None
    from torchvision.transforms import v2

    if config.policy == "randaugment":
        return v2.RandAugment(num_ops=config.randaugment_ops, magnitude=config.randaugment_magnitude)
    if config.policy == "trivialaugment":
        return v2.TrivialAugmentWide()
    return v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)


def apply_policy(images: torch.Tensor, policy, chunk: int) -> torch.Tensor:
    """images: uint8 (B, C, H, W). A v2 policy given a batch draws one operation for all of it, so
    it is called per chunk of `chunk` images (1 = each image its own draw). Uses the global RNG:
    the loader seeds it per batch."""
    return torch.cat([policy(images[start:start + chunk]) for start in range(0, images.shape[0], chunk)])


def random_erasing(images: torch.Tensor, probability: float, generator: torch.Generator,
                   scale=(0.02, 0.33), ratio=(0.3, 3.3), attempts: int = 10) -> torch.Tensor:
    """Erases one box per image with `probability`, filling it with 0 (the dataset mean once
    normalised). Box sampling is torchvision's RandomErasing (area fraction in `scale`, log-uniform
    aspect `ratio`, first of `attempts` tries that fits), drawn for every image at once.

    images: float (B, C, H, W), normalised."""
    b, _, h, w = images.shape
    area = h * w * torch.empty(b, attempts).uniform_(*scale, generator=generator)
    aspect = torch.exp(torch.empty(b, attempts).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator))
    box_h = (area * aspect).sqrt().round().long()  # (B, attempts)
    box_w = (area / aspect).sqrt().round().long()
    fits = (box_h < h) & (box_w < w)
    first = fits.float().argmax(dim=1)  # the first attempt that fits (0 when none does)
    pick = lambda t: t.gather(1, first[:, None]).squeeze(1)  # noqa: E731
    box_h, box_w = pick(box_h), pick(box_w)
    erase = fits.any(dim=1) & (torch.rand(b, generator=generator) < probability)
    top = (torch.rand(b, generator=generator) * (h - box_h + 1).clamp_min(1)).long()
    left = (torch.rand(b, generator=generator) * (w - box_w + 1).clamp_min(1)).long()
    ys, xs = torch.arange(h), torch.arange(w)
    inside_rows = (ys >= top[:, None]) & (ys < (top + box_h)[:, None])  # (B, H)
    inside_cols = (xs >= left[:, None]) & (xs < (left + box_w)[:, None])  # (B, W)
    mask = (inside_rows[:, :, None] & inside_cols[:, None, :]) & erase[:, None, None]  # (B, H, W)
    return images.masked_fill(to_device(mask, images.device).unsqueeze(1), 0.0)


def build_mix(config: AugmentConfig, num_classes: int):
    """A function (images, labels) -> (images, soft targets (B, K)) for Mixup/CutMix, or None.

    Mixing weights come from v2.MixUp / v2.CutMix (one lambda per batch, as DeiT and timm)."""
    if not config.mixes:
        return None
    from torchvision.transforms import v2

    choices = []
    if config.mixup_alpha > 0:
        choices.append(v2.MixUp(alpha=config.mixup_alpha, num_classes=num_classes))
    if config.cutmix_alpha > 0:
        choices.append(v2.CutMix(alpha=config.cutmix_alpha, num_classes=num_classes))
    mixer = choices[0] if len(choices) == 1 else v2.RandomChoice(choices)

    def mix(images: torch.Tensor, labels: torch.Tensor):
        if config.mix_prob < 1 and float(torch.rand(())) >= config.mix_prob:
            return images, torch.nn.functional.one_hot(labels, num_classes).to(images.dtype)
        return mixer(images, labels)

    return mix
