"""load_data on image folders (directory, .tar, .tar.gz, .zip), odd images, unsafe archives,
splits and the decoded cache."""

from __future__ import annotations

import os
import time
import warnings

import pytest
import torch
from PIL import Image

from tests.data_fixtures import CLASSES, folder_files, png_bytes, solid, write_dir, write_tar, write_zip
from vitlab.data import load_data, load_image


def _pixel(splits_set, i):
    return splits_set.images[i, :, 0, 0].tolist()


@pytest.mark.parametrize("kind", ["dir", "tar", "tar.gz", "zip"])
def test_every_container_gives_the_same_images(tmp_path, kind):
    files = folder_files(per_class=4)
    if kind == "dir":
        source = write_dir(tmp_path / "images", files)
    elif kind == "zip":
        source = write_zip(tmp_path / "images.zip", files)
    else:
        source = write_tar(tmp_path / f"images.{kind}", files, "w:gz" if kind == "tar.gz" else "w")
    splits = load_data(source, val_size=0, cache_dir=tmp_path / "cache")
    assert splits.class_names == CLASSES and splits.val is None and splits.test is None
    assert splits.train.images.shape == (12, 3, 8, 8) and splits.train.images.dtype == torch.uint8
    assert splits.train.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert _pixel(splits.train, 5) == [40, 10, 200]  # dog/001.png
    assert splits.image_size == (8, 8) and splits.in_channels == 3 and splits.num_classes == 3
    assert splits.mean[2] == pytest.approx(200 / 255)


def test_split_class_layout_under_a_wrapping_directory(tmp_path):
    files = {**folder_files(2, prefix="data/train/"), **folder_files(1, prefix="data/test/")}
    splits = load_data(write_tar(tmp_path / "d.tar.gz", files), val_size=0, cache_dir=tmp_path / "c")
    assert len(splits.train) == 6 and len(splits.test) == 3 and splits.test.class_names == CLASSES


def test_odd_modes_sizes_and_a_corrupt_file(tmp_path):
    files = folder_files(per_class=2)
    files["cat/gray.png"] = png_bytes(solid(100, mode="L"))
    palette = solid(0, mode="P")
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    palette.putpixel((0, 0), 1)
    files["cat/palette.png"] = png_bytes(palette)
    files["dog/rgba.png"] = png_bytes(solid((250, 250, 250, 0), mode="RGBA"))  # fully transparent
    files["dog/big.png"] = png_bytes(solid((1, 2, 3), size=(16, 8)))
    files["frog/broken.jpg"] = b"\xff\xd8\xff\xe0 not really a jpeg"
    files["frog/notes.txt"] = b"ignored: not an image"
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image\(s\): frog/broken.jpg"):
        splits = load_data(write_dir(tmp_path / "odd", files), val_size=0, cache_dir=tmp_path / "c")
    train = splits.train
    assert len(train) == 10 and train.images.shape[1:] == (3, 8, 8)
    assert splits.skipped == ["frog/broken.jpg"]
    names = sorted(n for n in files if not n.endswith((".txt", ".jpg")))
    at = {name: i for i, name in enumerate(names)}
    assert _pixel(train, at["cat/gray.png"]) == [100, 100, 100]
    assert _pixel(train, at["cat/palette.png"]) == [10, 20, 30]
    assert _pixel(train, at["dog/rgba.png"]) == [0, 0, 0]  # transparent -> black, not its hidden white
    assert _pixel(train, at["dog/big.png"]) == [1, 2, 3]  # 16x8 scaled to cover 8x8, centre-cropped


def test_grayscale_only_folder_gives_one_channel(tmp_path):
    files = {f"{c}/{i}.png": png_bytes(solid(50 * i, mode="L")) for c in CLASSES for i in range(2)}
    splits = load_data(write_dir(tmp_path / "g", files), val_size=0, cache_dir=tmp_path / "c")
    assert splits.in_channels == 1 and len(splits.mean) == 1


def test_explicit_size_and_channels_and_load_image_agree(tmp_path):
    image = Image.new("RGB", (20, 10))
    image.paste((255, 0, 0), (0, 0, 10, 10))
    files = {**folder_files(2), "cat/wide.png": png_bytes(image)}
    splits = load_data(write_dir(tmp_path / "w", files), val_size=0, image_size=6, channels=1,
                       cache_dir=tmp_path / "c")
    assert splits.train.images.shape[1:] == (1, 6, 6)
    direct = load_image(tmp_path / "w" / "cat" / "wide.png", 6, 1)
    assert torch.equal(direct, splits.train.images[2])  # cat/000, cat/001, cat/wide
    assert load_image(image, (6, 6), 3).shape == (3, 6, 6)


def test_load_image_names_an_unreadable_file(tmp_path):
    path = tmp_path / "bad.png"
    path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="bad.png"):
        load_image(path, 8, 3)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png", 8, 3)


def test_tar_with_parent_member_is_read_in_memory_and_writes_nothing(tmp_path):
    files = {**folder_files(2), "../escape.png": png_bytes(solid((9, 9, 9))), "/abs/evil.png": b"x"}
    work = tmp_path / "work"
    work.mkdir()
    source = write_tar(work / "bad.tar", files, "w")
    cwd = os.getcwd()
    os.chdir(work)
    try:
        with pytest.warns(UserWarning, match=r"ignored 2 archive member\(s\).*\.\./escape\.png"):
            splits = load_data(source, val_size=0, cache_dir=tmp_path / "c")
    finally:
        os.chdir(cwd)
    assert len(splits.train) == 6
    assert not (tmp_path / "escape.png").exists() and not (work / "escape.png").exists()
    assert sorted(p.name for p in work.iterdir()) == ["bad.tar"]


def test_stratified_validation_split_is_deterministic(tmp_path):
    files = folder_files(per_class=10)
    source = write_dir(tmp_path / "s", files)
    a = load_data(source, val_size=6, split_seed=1, cache_dir=tmp_path / "c")
    b = load_data(source, val_size=6, split_seed=1, cache_dir=tmp_path / "c")
    c = load_data(source, val_size=6, split_seed=2, cache_dir=tmp_path / "c")
    assert a.val.class_counts() == [2, 2, 2] and a.train.class_counts() == [8, 8, 8]
    assert torch.equal(a.val.images, b.val.images) and not torch.equal(a.val.images, c.val.images)
    assert len(load_data(source, cache_dir=tmp_path / "c").val) == 3  # default: 10%
    assert len(load_data(source, val_size=0.2, cache_dir=tmp_path / "c").val) == 6
    with pytest.raises(ValueError, match="val_size must be between 0 and 29"):
        load_data(source, val_size=30, cache_dir=tmp_path / "c")


def test_cache_is_reused_and_a_changed_source_invalidates_it(tmp_path, monkeypatch):
    monkeypatch.setenv("VITLAB_CACHE", str(tmp_path / "envcache"))
    source = write_tar(tmp_path / "s.tar.gz", folder_files(per_class=3))
    first = load_data(source, val_size=0)
    manifests = list((tmp_path / "envcache" / "decoded").glob("*/manifest.json"))
    assert len(manifests) == 1

    import vitlab.data.sources as sources
    monkeypatch.setattr(sources, "decode_source", lambda *a, **k: pytest.fail("decoded despite a cache"))
    again = load_data(source, val_size=0)
    assert torch.equal(first.train.images, again.train.images)
    os.utime(source, ns=(time.time_ns(), time.time_ns() + 10**9))  # touched, same bytes: still valid
    load_data(source, val_size=0)
    monkeypatch.undo()

    monkeypatch.setenv("VITLAB_CACHE", str(tmp_path / "envcache"))
    files = folder_files(per_class=3)
    files["cat/000.png"] = png_bytes(solid((255, 255, 255)))
    write_tar(source, files)  # stale cache: same name, new content
    changed = load_data(source, val_size=0)
    assert _pixel(changed.train, 0) == [255, 255, 255] and _pixel(first.train, 0) == [0, 0, 200]


def test_asking_for_the_sources_own_size_shares_one_cache_entry(tmp_path, monkeypatch):
    import vitlab.data.sources as sources

    source = write_tar(tmp_path / "s.tar.gz", folder_files(per_class=3))  # 8x8 RGB
    explicit = load_data(source, val_size=0, image_size=8, channels=3, cache_dir=tmp_path / "c")
    decode = sources.decode_source
    monkeypatch.setattr(sources, "decode_source", lambda *a, **k: pytest.fail("decoded despite a cache"))
    natural = load_data(source, val_size=0, cache_dir=tmp_path / "c")
    assert torch.equal(explicit.train.images, natural.train.images)
    assert len(list((tmp_path / "c" / "decoded").iterdir())) == 1
    monkeypatch.setattr(sources, "decode_source", decode)
    assert load_data(source, val_size=0, image_size=4, cache_dir=tmp_path / "c").image_size == (4, 4)
    assert len(list((tmp_path / "c" / "decoded").iterdir())) == 2


def test_bad_sources_give_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no dataset at"):
        load_data(tmp_path / "nowhere", cache_dir=tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="neither a directory nor"):
        load_data(tmp_path / "notes.txt", cache_dir=tmp_path)
    write_dir(tmp_path / "flat", {"a.png": png_bytes(solid((1, 1, 1)))})
    with pytest.raises(ValueError, match="class/image or split/class/image"):
        load_data(tmp_path / "flat", cache_dir=tmp_path / "c")
    (tmp_path / "broken.tar.gz").write_bytes(b"not gzip")
    with pytest.raises(ValueError, match="not a readable tar archive"):
        load_data(tmp_path / "broken.tar.gz", cache_dir=tmp_path / "c")


@pytest.mark.slow
def test_real_shared_archive(cifar_jpeg_archive, tmp_path):
    from vitlab.data.cache import cache_root, entry_dir
    from vitlab.data.sources import NATURAL

    # decoded into the session's cache (conftest), where the later tests that read the archive
    # find it: the suite decodes the 50,000 JPEGs once. Where a test that ran first (another order,
    # -k) has decoded it already, a cache of its own: this test's first load must decode.
    cache = None if not entry_dir(cifar_jpeg_archive, NATURAL, cache_root()).exists() else tmp_path
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        splits = load_data(cifar_jpeg_archive, cache_dir=cache)
    assert entry_dir(cifar_jpeg_archive, NATURAL, cache_root(cache)).exists()
    assert len(splits.train) == 45_000 and len(splits.val) == 5_000 and splits.test is None
    assert splits.class_names[:3] == ["airplane", "automobile", "bird"] and splits.num_classes == 10
    assert splits.val.class_counts() == [500] * 10 and splits.image_size == (32, 32)
    assert splits.mean == pytest.approx((0.4914, 0.4822, 0.4465), abs=2e-3)  # the known CIFAR-10 stats
    start = time.perf_counter()
    cached = load_data(cifar_jpeg_archive, cache_dir=cache)
    assert time.perf_counter() - start < 5
    assert torch.equal(cached.val.images, splits.val.images)
