"""BatchLoader: the dataset lives as uint8 on the training device and batches are assembled there.

As in KellerJordan/cifar10-airbench's CifarLoader, there is no per-sample Dataset/collate path:
each batch is one index into the resident uint8 tensor, then crop/flip/normalise run batched.
Order and augmentation are a pure function of (seed, epoch, rank, batch number), so a resumed run
sees exactly the batches the interrupted one would have.
"""

from __future__ import annotations

import hashlib
import math

import torch

from .augment import (AugmentConfig, alternating_flips, apply_policy, build_mix, build_policy, first_epoch_flips,
                      random_crop_flip, random_erasing, to_device)
from .cpu import one_cpu_thread
from .imageset import ImageSet


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers, well mixed so nearby (seed, epoch, rank) do not collide."""
    digest = hashlib.sha256("/".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class BatchLoader:
    def __init__(self, data: ImageSet, batch_size: int, *, mean, std, train: bool,
                 augment: AugmentConfig | None = None, device="cpu", seed: int = 0,
                 rank: int = 0, world_size: int = 1, drop_last: bool | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        channels = data.images.shape[1]
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"mean/std have {len(mean)}/{len(std)} values but the images have {channels} channels")
        self.device = torch.device(device)
        self.images = data.images.to(self.device)  # uint8 (N, C, H, W), resident for the whole run
        self.labels = data.labels.to(self.device)  # int64 (N,)
        self.num_classes = len(data.class_names)
        self.batch_size = batch_size
        self.train = train
        self.augment = (augment or AugmentConfig()) if train else AugmentConfig()
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.drop_last = train if drop_last is None else drop_last
        # normalising on the 0..255 scale saves a division per pixel
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1) * 255
        self.policy = build_policy(self.augment)
        self.mix = build_mix(self.augment, self.num_classes)
        self.teacher_labels = None  # set_teacher_labels
        self.first_flips = (first_epoch_flips(len(self.images), derive_seed(seed, -1))
                            if self.augment.flip and self.augment.flip_mode == "alternate" else None)
        self.epoch = 0

    def set_teacher_labels(self, labels: torch.Tensor) -> None:
        """Distillation (vitlab.teacher): a second label for every image, the teacher's; batches then
        carry int64 (B, 2) targets [label, teacher's label]."""
        if self.mix is not None:
            raise ValueError("distillation's teacher labels cannot be mixed by Mixup/CutMix: set mixup_alpha=0 "
                             "and cutmix_alpha=0 (--augment-arg), or train without --distill")
        if labels.shape != self.labels.shape:
            raise ValueError(f"teacher labels of shape {tuple(labels.shape)} do not fit {len(self.labels)} images")
        self.teacher_labels = labels.to(self.device, torch.int64)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rank_indices(self) -> torch.Tensor:
        """This rank's image indices for the current epoch. Training shuffles with a seed shared by
        all ranks and pads by wrapping so every rank gets the same count (DDP needs equal steps);
        evaluation keeps order and never pads, so the ranks' shares add up to the dataset exactly."""
        n = self.images.shape[0]
        if not self.train:
            return torch.arange(n)[self.rank::self.world_size]
        order = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(self.seed, self.epoch)))
        per_rank = math.ceil(n / self.world_size)
        if per_rank * self.world_size > n:
            order = torch.cat([order, order[: per_rank * self.world_size - n]])
        return order[self.rank::self.world_size]

    def _num_batches(self, count: int) -> int:
        # a set smaller than one batch still gives one (partial) batch rather than an empty epoch
        if self.drop_last and count >= self.batch_size:
            return count // self.batch_size
        return math.ceil(count / self.batch_size)

    def __len__(self) -> int:
        n = self.images.shape[0]
        count = len(range(self.rank, n, self.world_size)) if not self.train else math.ceil(n / self.world_size)
        return self._num_batches(count)

    def __iter__(self):
        indices = self._rank_indices()
        for batch_number in range(self._num_batches(len(indices))):
            index = indices[batch_number * self.batch_size:(batch_number + 1) * self.batch_size]
            with one_cpu_thread(self.device):
                batch = self.make_batch(index, derive_seed(self.seed, self.epoch, self.rank, batch_number))
            yield batch

    def make_batch(self, index: torch.Tensor, batch_seed: int):
        """The batch of these dataset indices, as iteration builds it for a batch with this seed
        (augmented when train=True): (images float (B, C, H, W), targets): int64 (B,) labels, float
        (B, K) with Mixup/CutMix, int64 (B, 2) [label, teacher's label] with set_teacher_labels."""
        # the flip bookkeeping reads the indices on the CPU: reading them back from a GPU would make
        # the host wait for every step already queued there
        cpu_index = index.cpu()
        index = to_device(cpu_index, self.device)
        images = self.images[index]  # uint8 (B, C, H, W)
        labels = self.labels[index]  # int64 (B,)
        if self.teacher_labels is not None:
            labels = torch.stack([labels, self.teacher_labels[index]], dim=1)  # int64 (B, 2)
        config = self.augment
        generator = torch.Generator().manual_seed(batch_seed)
        if config.crop_padding or config.flip:
            flipped = None
            if self.first_flips is not None:
                flipped = alternating_flips(cpu_index, self.epoch, self.first_flips)
            images = random_crop_flip(images, config.crop_padding, config.flip, generator, config.padding_mode,
                                      flipped)
        with torch.random.fork_rng(devices=[]):
            # torchvision's policies and Mixup/CutMix draw from the global RNG: seed it per batch
            # (inside fork_rng, so the caller's RNG stream is untouched)
            torch.default_generator.manual_seed(batch_seed)
            if self.policy is not None:
                images = apply_policy(images, self.policy, config.policy_chunk)
            images = (images.float() - self.mean) / self.std  # float32 (B, C, H, W)
            if config.random_erasing:
                images = random_erasing(images, config.random_erasing, generator)
            if self.mix is not None:
                images, labels = self.mix(images, labels)  # labels -> float (B, K)
        return images, labels
