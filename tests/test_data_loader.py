"""BatchLoader and the augmentation it applies: shapes, normalisation, determinism from
(seed, epoch, rank), DDP sharding, crop/flip, policies, random erasing, Mixup/CutMix."""

from __future__ import annotations

import pytest
import torch

from vitlab.data import AugmentConfig, BatchLoader, ImageSet, augment_preset
from vitlab.data.augment import random_crop_flip


def make_set(n=40, size=8, classes=4):
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8)
    return ImageSet(images, torch.arange(n) % classes, [f"c{k}" for k in range(classes)])


def collect(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def test_eval_loader_keeps_order_and_last_partial_batch_and_normalises():
    data = make_set(10)
    loader = BatchLoader(data, 4, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), train=False,
                         augment=augment_preset("strong"))  # ignored when train=False
    batches = collect(loader)
    assert len(loader) == 3 and [len(y) for _, y in batches] == [4, 4, 2]
    images = torch.cat([x for x, _ in batches])
    expected = (data.images.float() / 255 - 0.5) / 0.25
    assert images.dtype == torch.float32 and torch.allclose(images, expected, atol=1e-5)
    assert torch.cat([y for _, y in batches]).tolist() == data.labels.tolist()


def test_train_order_is_a_pure_function_of_seed_and_epoch():
    data = make_set(40)
    kwargs = dict(mean=(0.5,) * 3, std=(0.5,) * 3, train=True, augment=augment_preset("light"), seed=3)
    a, b = BatchLoader(data, 8, **kwargs), BatchLoader(data, 8, **kwargs)
    a.set_epoch(2)
    b.set_epoch(2)
    first, again = collect(a), collect(b)
    assert len(first) == 5 and all(torch.equal(x, y) and torch.equal(l, m) for (x, l), (y, m) in zip(first, again))
    b.set_epoch(3)
    assert not torch.equal(first[0][1], collect(b)[0][1])
    other_seed = BatchLoader(data, 8, **{**kwargs, "seed": 4})
    other_seed.set_epoch(2)
    assert not torch.equal(first[0][0], collect(other_seed)[0][0])


def test_training_drops_the_partial_batch_and_covers_each_image_once():
    data = make_set(42)
    loader = BatchLoader(data, 8, mean=(0.5,) * 3, std=(0.5,) * 3, train=True)
    labels_seen = torch.cat([y for _, y in loader])
    assert len(loader) == 5 and labels_seen.numel() == 40
    images = torch.cat([x for x, _ in BatchLoader(data, 8, mean=(0.5,) * 3, std=(0.5,) * 3, train=True,
                                                  drop_last=False)])
    as_uint8 = (images * 0.5 + 0.5).mul(255).round().to(torch.uint8)
    assert sorted(map(bytes, as_uint8.flatten(1).numpy())) == sorted(map(bytes, data.images.flatten(1).numpy()))
    tiny = BatchLoader(make_set(5), 8, mean=(0.5,) * 3, std=(0.5,) * 3, train=True)
    assert len(tiny) == 1 and [len(y) for _, y in tiny] == [5]  # smaller than a batch: not an empty epoch


def test_ranks_split_an_epoch_into_disjoint_equal_shares():
    data = make_set(30)  # 30 images over 4 ranks: 8 each, 2 padded by wrapping
    shares = []
    for rank in range(4):
        loader = BatchLoader(data, 4, mean=(0.5,) * 3, std=(0.5,) * 3, train=True, rank=rank, world_size=4)
        loader.set_epoch(1)
        shares.append(torch.cat([x for x, _ in loader]))
        assert len(loader) == 2
    keys = [set(map(bytes, s.flatten(1).numpy())) for s in shares]
    assert len(set.union(*keys)) == 30
    eval_counts = [sum(len(y) for _, y in BatchLoader(data, 4, mean=(0.5,) * 3, std=(0.5,) * 3, train=False,
                                                      rank=r, world_size=4)) for r in range(4)]
    assert eval_counts == [8, 8, 7, 7]
    with pytest.raises(ValueError, match="rank must be in"):
        BatchLoader(data, 4, mean=(0.5,) * 3, std=(0.5,) * 3, train=True, rank=4, world_size=4)


def test_crop_with_padding_shifts_content_and_flip_mirrors():
    image = torch.arange(64, dtype=torch.uint8).view(1, 1, 8, 8).expand(64, 3, 8, 8).contiguous()
    generator = torch.Generator().manual_seed(0)
    cropped = random_crop_flip(image, 2, False, generator)
    reference = torch.nn.functional.pad(image.float(), (2, 2, 2, 2), mode="reflect")
    windows = {bytes(reference[0, 0, y:y + 8, x:x + 8].to(torch.uint8).flatten().numpy())
               for y in range(5) for x in range(5)}
    seen = {bytes(c[0].flatten().numpy()) for c in cropped}
    assert seen <= windows and len(seen) > 10  # every crop is a window of the reflect-padded image
    flipped = random_crop_flip(image, 0, True, torch.Generator().manual_seed(0))
    mirrored = (flipped == image.flip(3)).flatten(1).all(1)
    assert 10 < int(mirrored.sum()) < 54 and bool(((flipped == image).flatten(1).all(1) | mirrored).all())
    zeros = random_crop_flip(image, 3, False, torch.Generator().manual_seed(1), padding_mode="zeros")
    assert int((zeros == 0).sum()) > int((image == 0).sum())


@pytest.mark.parametrize("policy", ["randaugment", "trivialaugment", "autoaugment"])
def test_policies_change_images_per_sample_and_reproducibly(policy):
    data = make_set(16)
    config = AugmentConfig(policy=policy)
    loader = BatchLoader(data, 16, mean=(0.5,) * 3, std=(0.5,) * 3, train=True, augment=config)
    plain = BatchLoader(data, 16, mean=(0.5,) * 3, std=(0.5,) * 3, train=True)
    (x, _), (ref, _), (again, _) = collect(loader)[0], collect(plain)[0], collect(loader)[0]
    changed = (x != ref).flatten(1).any(1)
    assert int(changed.sum()) >= 4 and torch.equal(x, again) and x.shape == ref.shape


def test_random_erasing_fills_boxes_with_the_mean():
    data = ImageSet(torch.full((64, 3, 16, 16), 255, dtype=torch.uint8), torch.zeros(64, dtype=torch.long), ["a"])
    loader = BatchLoader(data, 64, mean=(0.5,) * 3, std=(0.5,) * 3, train=True,
                         augment=AugmentConfig(random_erasing=0.5))
    x, _ = collect(loader)[0]
    erased = (x == 0).all(1).flatten(1).any(1)  # an erased pixel is 0 in all channels
    assert 16 < int(erased.sum()) < 48 and bool(((x == 0) | (x == 1)).all())


@pytest.mark.parametrize("preset", ["strong"])
def test_mixup_cutmix_give_soft_labels_that_sum_to_one(preset):
    data = make_set(32, classes=4)
    loader = BatchLoader(data, 16, mean=(0.5,) * 3, std=(0.5,) * 3, train=True, augment=augment_preset(preset))
    for x, y in loader:
        assert x.shape == (16, 3, 8, 8) and y.shape == (16, 4) and y.dtype == torch.float32
        assert torch.allclose(y.sum(1), torch.ones(16)) and bool((y.max(1).values < 1).any())
    only_mixup = BatchLoader(data, 16, mean=(0.5,) * 3, std=(0.5,) * 3, train=True,
                             augment=AugmentConfig(mixup_alpha=0.4, mix_prob=0.0))
    _, y = collect(only_mixup)[0]
    assert bool(((y == 0) | (y == 1)).all())  # mix_prob 0: one-hot targets, still (B, K)


def test_presets_and_bad_config():
    assert augment_preset("none") == AugmentConfig()
    assert augment_preset("light").crop_padding == 4 and augment_preset("light").flip
    assert augment_preset("strong", mixup_alpha=0.0).mixup_alpha == 0.0
    with pytest.raises(ValueError, match="unknown augmentation preset 'heavy'"):
        augment_preset("heavy")
    with pytest.raises(ValueError, match="unknown augmentation policy"):
        AugmentConfig(policy="autoaug")
    with pytest.raises(ValueError, match="mean/std have 1/1 values but the images have 3"):
        BatchLoader(make_set(), 4, mean=(0.5,), std=(0.5,), train=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batches_on_cuda_match_the_cpu_batches():
    data = make_set(32)
    kwargs = dict(mean=(0.5,) * 3, std=(0.5,) * 3, train=True, augment=augment_preset("light"), seed=5)
    on_cpu = collect(BatchLoader(data, 8, **kwargs))
    on_gpu = collect(BatchLoader(data, 8, device="cuda", **kwargs))
    assert on_gpu[0][0].device.type == "cuda"
    assert all(torch.allclose(a.cpu(), x) and torch.equal(b.cpu(), y) for (a, b), (x, y) in zip(on_gpu, on_cpu))


def test_alternating_flips_show_every_image_both_ways_in_two_epochs():
    """flip_mode="alternate": an image flipped in one epoch is unflipped in the next, and about half
    the images flip in any epoch; "random" gives no such guarantee."""
    n = 64
    images = torch.arange(n * 3 * 4 * 4, dtype=torch.int64).remainder(251).to(torch.uint8).view(n, 3, 4, 4)
    data = ImageSet(images, torch.arange(n) % 2, ["a", "b"])
    loader = BatchLoader(data, n, mean=(0.5,) * 3, std=(0.5,) * 3, train=True,
                         augment=AugmentConfig(flip=True, flip_mode="alternate"), seed=3)

    def flipped_in(epoch: int) -> torch.Tensor:
        loader.set_epoch(epoch)
        index = torch.arange(n)
        out, _ = loader.make_batch(index, batch_seed=epoch)
        plain = (images.float() - 127.5) / 127.5
        return (out - plain.flip(3)).abs().flatten(1).amax(1) < 1e-6  # (N,) mirrored images

    epoch0, epoch1, epoch2 = flipped_in(0), flipped_in(1), flipped_in(2)
    assert bool((epoch0 ^ epoch1).all()) and torch.equal(epoch0, epoch2)
    assert 16 < int(epoch0.sum()) < 48
    with pytest.raises(ValueError, match="flip_mode"):
        AugmentConfig(flip=True, flip_mode="sometimes")
