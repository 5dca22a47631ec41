"""Hostile and careless input (issue 16): every crafted or mistaken input ends in a one-line error
or a clean skip, with a non-zero exit status where nothing useful was done; no process is killed
for memory, nothing NaN is saved, no result is lost.

The memory bombs run in one child process whose address space is capped at what it already uses
plus MEMORY_HEADROOM, so a regression fails these tests (a MemoryError, a non-zero exit) instead
of killing pytest. Each bomb is small on disk and costs nothing to make: a zip member whose
8 GiB of zeros are one deflate block repeated, sparse files, a PNG of one 30,000,000-pixel row.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import vitlab
from tests.data_fixtures import folder_files, png_bytes, solid, write_cifar10, write_dir
from tests.image_fixtures import TINY_MODEL, make_image_folder, train_tiny_run
from vitlab import checkpoint as ckpt
from vitlab import rundir
from vitlab.cli import main

GiB = 2**30
MEMORY_HEADROOM = GiB // 2  # what the child may allocate beyond its baseline (torch and vitlab imported)
BIG = 3 * GiB // 4  # a file larger than the headroom: reading it whole fails
HAS_PROC = Path("/proc/self/status").exists()  # the child measures its baseline there (Linux)
TINY_FLAGS = [f"--model-arg={k}={v}" for k, v in TINY_MODEL.items()]


def cli(capsys, *argv) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `vitlab ARGV` run in this process."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit:  # argparse's usage errors
        code = exit.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(err: str, phrase: str) -> None:
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert "error:" in last and phrase in last, err


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images") / "images")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One finished epoch of the tiny model: copy it before changing it."""
    return train_tiny_run(tmp_path_factory.mktemp("tiny"), epochs=1)


def copy_run(run: Path, target: Path) -> Path:
    shutil.copytree(run, target)
    return target


# ---------------------------------------------------------------- crafted inputs
def zero_deflate(size: int) -> bytes:
    """A raw deflate stream of `size` zero bytes (a multiple of 1 MiB), ~1/1000 of that on disk,
    made in milliseconds: after a full flush every 1 MiB block of zeros compresses identically."""
    chunk = 1 << 20
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = compressor.compress(bytes(chunk)) + compressor.flush(zlib.Z_FULL_FLUSH)
    block = compressor.compress(bytes(chunk)) + compressor.flush(zlib.Z_FULL_FLUSH)
    return first + block * (size // chunk - 1) + compressor.flush()


def write_zip_with_bomb(path: Path, files: dict[str, bytes], bomb_name: str, bomb_size: int) -> Path:
    """A zip of `files` (stored) plus one deflated member of `bomb_size` zeros (zip64 sizes). Its
    CRC is left 0: a reader that decompresses the member runs out of memory long before checking it."""
    out, central = io.BytesIO(), []

    def add(name: str, data: bytes, method: int, crc: int, size: int) -> None:
        offset, encoded = out.tell(), name.encode()
        big = size >= 0xFFFFFFFF
        extra = struct.pack("<HHQQ", 1, 16, size, len(data)) if big else b""
        sizes = (0xFFFFFFFF, 0xFFFFFFFF) if big else (len(data), size)
        out.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 45, 0, method, 0, 0x21, crc, *sizes, len(encoded),
                              len(extra)) + encoded + extra + data)
        central.append(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 45, 45, 0, method, 0, 0x21, crc, *sizes,
                                   len(encoded), len(extra), 0, 0, 0, 0, offset) + encoded + extra)

    for name, data in files.items():
        add(name, data, 0, zlib.crc32(data), len(data))
    add(bomb_name, zero_deflate(bomb_size), 8, 0, bomb_size)
    start = out.tell()
    out.write(b"".join(central))
    out.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(central), len(central), out.tell() - start, start, 0))
    path.write_bytes(out.getvalue())
    return path


def write_tar_with_sparse_member(path: Path, files: dict[str, bytes], name: str, size: int) -> Path:
    """An uncompressed tar of `files` plus a member of `size` bytes left as a hole in the file
    (sparse: no disk used), which a reader that reads members whole must allocate."""
    with open(path, "wb") as f:
        for member, data in files.items():
            info = tarfile.TarInfo(member)
            info.size = len(data)
            f.write(info.tobuf(format=tarfile.GNU_FORMAT) + data + bytes(-len(data) % 512))
        info = tarfile.TarInfo(name)
        info.size = size
        f.write(info.tobuf(format=tarfile.GNU_FORMAT))
        f.seek(size, os.SEEK_CUR)  # the member's data: a hole
        f.write(bytes(1024))  # the end-of-archive blocks
    return path


def sparse_file(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def png_header_only(width: int, height: int, pixels: bytes = b"") -> bytes:
    """A grayscale PNG whose header says width x height; `pixels` is the raw scanline data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(pixels or b"\0", 1))
            + chunk(b"IEND", b""))


def one_row_png(width: int) -> bytes:
    """A real width x 1 grayscale PNG (29 KB for 30,000,000 pixels)."""
    return png_header_only(width, 1, b"\0" + b"\x07" * width)


# ---------------------------------------------------------------- the memory-bomb child
CHILD = r"""
import contextlib, io, json, resource, sys
import torch, vitlab.cli, vitlab.data  # what every command imports: part of the baseline
baseline = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize"))
resource.setrlimit(resource.RLIMIT_AS, (baseline + int(sys.argv[1]), resource.RLIM_INFINITY))
try:  # the cap is real: more than the headroom cannot be had
    bytearray(int(sys.argv[1]) + 2**28)
    capped = False
except MemoryError:
    capped = True
results = {"capped": capped}
for name, argv in json.loads(sys.argv[2]).items():
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = vitlab.cli.main(argv)
        except SystemExit as exit:
            code = exit.code
        except BaseException as error:  # reported, so that one case cannot hide the others
            code = f"raised {type(error).__name__}: {error}"
    results[name] = {"code": code, "out": out.getvalue(), "err": err.getvalue()}
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def bombs(tmp_path_factory, tiny_run):
    """Runs every memory-bomb case in one child under the address-space cap; {case: result}."""
    if not HAS_PROC:
        pytest.skip("the memory cap measures the child's baseline in /proc/self/status (Linux)")
    root = tmp_path_factory.mktemp("bombs")
    good = folder_files(per_class=2)  # 3 classes x 2 images, 8x8
    zip_bomb = write_zip_with_bomb(root / "bomb.zip", good, "cat/huge.jpg", 8 * GiB)
    tar_bomb = write_tar_with_sparse_member(root / "bomb.tar", good, "dog/huge.png", BIG)
    # a folder: an image file too large to read, a video, a link to a file outside, a 60M x 1 PNG
    folder = write_dir(root / "folder", good)
    sparse_file(folder / "cat" / "huge.jpg", BIG)
    sparse_file(folder / "clip.mp4", BIG)
    (folder / "dog" / "linked.png").symlink_to(sparse_file(root / "outside.png", BIG))
    (folder / "frog" / "wide.png").write_bytes(one_row_png(30_000_000))
    (root / "wide.png").write_bytes(one_row_png(30_000_000))
    # a checkpoint whose metadata describes a 1.6-billion-parameter model around tiny tensors
    run = tiny_run
    crafted = root / "crafted.safetensors"
    raw = ckpt.read_safetensors_metadata(run / "best.safetensors")
    config = {**json.loads(raw["model_config"]), "dim": 4096, "depth": 8, "heads": 8, "mlp_dim": 16384}
    save_file(load_file(run / "best.safetensors"), crafted, metadata={**raw, "model_config": json.dumps(config)})
    cache = ["--cache-dir", str(root / "cache")]
    cases = {
        "zip": ["data", "inspect", str(zip_bomb), *cache],
        "tar": ["data", "inspect", str(tar_bomb), *cache],
        "folder": ["data", "inspect", str(folder), *cache],
        "predict_wide": ["predict", str(run), str(root / "wide.png")],
        "init": ["train", "--init", str(crafted), "--data", str(folder), "--out", str(root / "run"), "--epochs", "1"],
    }
    # one thread and two malloc arenas keep the baseline's address space small on any core count; the
    # bombs are about host memory, and CUDA's initialisation alone reserves more address space
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2", "CUDA_VISIBLE_DEVICES": "",
           "VITLAB_CACHE": str(root / "cache")}
    done = subprocess.run([sys.executable, "-c", CHILD, str(MEMORY_HEADROOM), json.dumps(cases)], env=env,
                          capture_output=True, text=True, timeout=600, cwd=root)
    assert done.returncode == 0, f"the child died ({done.returncode}): {done.stderr[-2000:]}"
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert results.pop("capped"), "the address-space cap did not hold: these tests would prove nothing"
    return results


def test_zip_member_of_8_gib_is_skipped_from_its_header_unread(bombs):
    result = bombs["zip"]
    assert result["code"] == 0, result
    assert "skipped   1 unreadable: cat/huge.jpg" in result["out"]
    assert "larger than 64 MB (VITLAB_MAX_IMAGE_MB raises the limit): cat/huge.jpg" in result["out"]
    assert "images    6 in 3 classes" in result["out"]


def test_tar_member_larger_than_the_limit_is_skipped_from_its_header_unread(bombs):
    result = bombs["tar"]
    assert result["code"] == 0, result
    assert "skipped   1 unreadable: dog/huge.png" in result["out"]


def test_folder_reads_and_hashes_only_its_images_within_the_limit(bombs):
    """An image file, a video and a link to a file outside, each larger than the child's memory:
    none is read, for decoding or for the cache's hash; the 30,000,000 x 1 PNG is one unreadable
    image (scaled to cover 8x8 it would be 240,000,000 x 8 pixels)."""
    result = bombs["folder"]
    assert result["code"] == 0, result
    assert "images    6 in 3 classes" in result["out"]
    assert "skipped   2 unreadable: cat/huge.jpg, frog/wide.png" in result["out"]


def test_elongated_png_is_one_unreadable_file_for_predict(bombs):
    result = bombs["predict_wide"]
    assert result["code"] == 1, result
    assert "ERROR: cannot read image" in result["out"] and "too elongated to resize" in result["out"]
    assert "Traceback" not in result["err"]


def test_init_metadata_cannot_size_an_allocation(bombs):
    """--init with metadata describing 1.6e9 parameters around a tiny model's tensors: refused after
    a build on the meta device, before any memory is taken (before: a ~6 GB model, then the check)."""
    result = bombs["init"]
    assert result["code"] == 2, result
    assert_one_line_error(result["err"], "does not match its model config")


def test_decompression_bomb_header_is_one_unreadable_image(tiny_run, tmp_path, capsys):
    run = tiny_run
    (tmp_path / "bomb.png").write_bytes(png_header_only(100_000, 100_000))  # 10^10 pixels, 70 bytes
    (tmp_path / "big.png").write_bytes(png_header_only(10_000, 10_000))  # 10^8: PIL would only warn
    code, out, err = cli(capsys, "predict", run, tmp_path / "bomb.png", tmp_path / "big.png")
    assert code == 1 and "Traceback" not in err and "2 of 2 inputs could not be read" in err
    assert out.count("ERROR: cannot read image") == 2
    code, _, err = cli(capsys, "attention", run, tmp_path / "bomb.png", "--out", tmp_path / "a.png")
    assert code == 2 and not (tmp_path / "a.png").exists()
    assert_one_line_error(err, "could be decompression bomb")


def test_size_limits_are_configurable_and_named_in_the_message(tmp_path, monkeypatch):
    from vitlab.data import load_data

    source = write_dir(tmp_path / "images", folder_files(per_class=2))
    monkeypatch.setenv("VITLAB_MAX_IMAGE_MB", "0.00001")  # 10 bytes: every PNG is too large
    with pytest.warns(UserWarning, match="skipped 6 file"), \
            pytest.raises(ValueError, match=r"none of its 6 images could be read: each is larger than 0 MB"):
        load_data(source, val_size=0, cache_dir=tmp_path / "c")
    monkeypatch.setenv("VITLAB_MAX_IMAGE_MB", "lots")
    with pytest.raises(ValueError, match="VITLAB_MAX_IMAGE_MB must be a positive number of megabytes"):
        load_data(source, val_size=0, cache_dir=tmp_path / "c")
    monkeypatch.delenv("VITLAB_MAX_IMAGE_MB")
    monkeypatch.setenv("VITLAB_MAX_DATA_MB", "0.0001")  # ~100 bytes for the whole dataset
    with pytest.raises(ValueError, match="its files add up to more than .*VITLAB_MAX_DATA_MB"):
        load_data(source, val_size=0, cache_dir=tmp_path / "c")
    monkeypatch.setenv("VITLAB_MAX_DATA_MB", "1")  # the files fit; 6 images at 1024x1024 do not
    with pytest.raises(ValueError, match=r"6 images at 1024x1024 would take 36 MB to decode.*--image-size"):
        load_data(source, val_size=0, image_size=1024, cache_dir=tmp_path / "c")


def test_cache_hash_covers_the_images_read_and_nothing_else(tmp_path):
    from vitlab.data.cache import content_hash
    from vitlab.data.sources import _wanted

    folder = write_dir(tmp_path / "images", folder_files(per_class=1))
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"one")
    (folder / "cat" / "link.png").symlink_to(outside)
    (folder / "notes.txt").write_text("mine")
    before = content_hash(folder, _wanted)
    outside.write_bytes(b"two")  # a symlink's target is not read by the loader
    (folder / "notes.txt").write_text("changed")  # nor is a file that is not an image
    assert content_hash(folder, _wanted) == before
    (folder / "cat" / "000.png").write_bytes(png_bytes(solid((1, 2, 3))))
    assert content_hash(folder, _wanted) != before


# ---------------------------------------------------------------- never save garbage
@pytest.mark.parametrize("flags, phrase", [
    (["--min-lr", "nan"], "min_lr must be a finite number"),
    (["--lr", "1e30"], "lr must be at most 1"),
    (["--clip-grad", "-1"], "clip_grad must be positive, or 0 for off"),
    (["--label-smoothing", "2"], "label_smoothing must be in [0, 1)"),
    (["--weight-decay", "2000"], "weight_decay times lr"),
])
def test_out_of_range_hyperparameters_are_refused_before_anything_is_written(images, tmp_path, capsys, flags,
                                                                             phrase):
    code, _, err = cli(capsys, "train", "--data", images, "--out", tmp_path / "run", *TINY_FLAGS, *flags)
    assert code == 2
    assert_one_line_error(err, phrase)
    assert not (tmp_path / "run").exists()


def test_non_finite_validation_loss_saves_nothing_and_says_so(images, tmp_path, capsys, monkeypatch):
    train_module = sys.modules["vitlab.train"]
    monkeypatch.setattr(train_module, "validate", lambda job, model, prefix: {
        f"{prefix}val_loss": float("nan"), f"{prefix}val_top1": 0.3, f"{prefix}val_top5": 1.0})
    code, _, err = cli(capsys, "train", "--data", images, "--out", tmp_path / "run", "--epochs", "1",
                       "--batch-size", "30", "--val-size", "30", *TINY_FLAGS)
    assert code == 2
    assert_one_line_error(err, "val_loss nan, ema_val_loss nan at the end of epoch 1; stopped; no checkpoint "
                               "had been saved yet")
    assert not any((tmp_path / "run" / name).exists() for name in (*ckpt.WEIGHT_FILES, ckpt.STATE_FILE))


def test_divergence_after_a_saved_epoch_keeps_that_epoch_and_says_so(images, tmp_path, monkeypatch):
    from tests.image_fixtures import tiny_config

    train_module = sys.modules["vitlab.train"]
    real_validate = train_module.validate

    def nan_in_epoch_two(job, model, prefix):
        scores = real_validate(job, model, prefix)
        return {**scores, f"{prefix}val_loss": float("nan")} if job.metrics else scores

    monkeypatch.setattr(train_module, "validate", nan_in_epoch_two)
    with pytest.raises(train_module.TrainingDiverged, match="end of epoch 2; stopped, keeping the last good "
                                                            "checkpoint"):
        vitlab.train(tiny_config(images, tmp_path / "run", epochs=2))
    state = ckpt.load_training_state(tmp_path / "run" / ckpt.STATE_FILE)
    assert state["epoch"] == 1
    for name in ckpt.WEIGHT_FILES:
        assert all(torch.isfinite(t).all() for t in load_file(tmp_path / "run" / name).values())


def test_non_finite_weights_are_never_written(tmp_path):
    from types import SimpleNamespace

    train_module = sys.modules["vitlab.train"]
    model = vitlab.VisionTransformer(**{**TINY_MODEL, "num_classes": 3})
    job = SimpleNamespace(model=model, ema=None, run_dir=tmp_path)
    train_module.check_finite_weights(job)  # finite: nothing to say
    with torch.no_grad():
        model.head.bias[0] = float("inf")
    with pytest.raises(train_module.TrainingDiverged, match=r"model's weights are no longer finite \(head.bias\); "
                                                            r"stopped; no checkpoint had been saved yet"):
        train_module.check_finite_weights(job)


def test_constant_channel_normalises_to_zero_not_nan(tmp_path):
    """folder_files' images are all blue=200: that channel's std is 0."""
    from tests.image_fixtures import tiny_config
    from vitlab.data import load_data

    source = write_dir(tmp_path / "images", folder_files(per_class=8))
    splits = load_data(source, val_size=0, cache_dir=tmp_path / "c")
    assert splits.std[2] == pytest.approx(1 / 255)
    config = tiny_config(source, tmp_path / "run", model_overrides={**TINY_MODEL, "image_size": 8},
                         val_size=6, batch_size=6, epochs=1)
    result = vitlab.train(config)  # a NaN loss would raise TrainingDiverged
    assert all(np.isfinite(row["train_loss"]) for row in result.metrics)


# ---------------------------------------------------------------- never lose a result
def test_torn_metrics_line_does_not_block_resume(tiny_run, tmp_path, capsys):
    run = copy_run(tiny_run, tmp_path / "run")
    with open(run / rundir.METRICS_FILE, "a") as f:
        f.write('{"epoch": 2, "train_lo')  # a kill in the middle of an append
    code, _, err = cli(capsys, "train", "--resume", run, "--epochs", "2")
    assert code == 0, err
    rows = [json.loads(line) for line in (run / rundir.METRICS_FILE).read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]


def test_row_lost_between_state_write_and_append_is_rebuilt_from_the_state(tiny_run, tmp_path, capsys):
    run = copy_run(tiny_run, tmp_path / "run")
    first_row = json.loads((run / rundir.METRICS_FILE).read_text())
    (run / rundir.METRICS_FILE).write_text("")  # killed after the state write, before the append
    assert cli(capsys, "train", "--resume", run, "--epochs", "2")[0] == 0
    rows = [json.loads(line) for line in (run / rundir.METRICS_FILE).read_text().splitlines()]
    assert rows[0] == first_row and [r["epoch"] for r in rows] == [1, 2]


def test_stale_temporary_files_are_removed_when_the_run_is_opened(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    stale = [run / f".{ckpt.STATE_FILE}.x1y2z3.tmp", run / f".{rundir.CONFIG_FILE}.abc.tmp"]
    for path in stale:
        path.write_bytes(b"half of a file")
    (run / ".mine.tmp").write_text("not vitlab's")
    rundir.open_run_dir(run, new=False).close()
    assert not any(path.exists() for path in stale) and (run / ".mine.tmp").exists()


def test_embed_writes_the_row_order_where_no_file_of_the_user_is(tiny_run, tmp_path, capsys):
    images = sorted((tiny_run.parent / "images" / "train" / "circle").glob("*.png"))[:2]
    (tmp_path / "X.txt").write_text("my own notes")
    code, out, _ = cli(capsys, "embed", tiny_run, *images, "--out", tmp_path / "X.npy")
    assert code == 0 and "X.npy.rows.txt" in out
    assert (tmp_path / "X.txt").read_text() == "my own notes"
    assert (tmp_path / "X.npy.rows.txt").read_text().split() == [str(p) for p in images]
    (tmp_path / "Y.npy.rows.txt").write_text("someone else's")  # no Y.npy: not an earlier embed's
    code, _, err = cli(capsys, "embed", tiny_run, *images, "--out", tmp_path / "Y.npy")
    assert code == 2 and not (tmp_path / "Y.npy").exists()
    assert_one_line_error(err, "is not an earlier vitlab embed's row list")


def test_export_to_a_full_disk_fails_in_one_line_and_leaves_no_file(tiny_run, tmp_path):
    """RLIMIT_FSIZE stands in for a full disk: the write fails (EFBIG) as it would with ENOSPC, after
    the model was serialised in memory and verified."""
    limit = "import resource, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); " \
            "resource.setrlimit(resource.RLIMIT_FSIZE, (10_000, 10_000)); "
    run = "import sys; from vitlab.cli import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", limit + run, "export", str(tiny_run), "--format",
                           "torchscript", "--out", str(tmp_path / "model.pt")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert_one_line_error(done.stderr, "File too large")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- one run directory, one writer
def test_a_second_writer_is_refused_while_the_first_holds_the_run(images, tmp_path, capsys):
    held = rundir.open_run_dir(tmp_path / "dup", new=True)  # the first `vitlab train`
    try:
        code, _, err = cli(capsys, "train", "--data", images, "--out", tmp_path / "dup", *TINY_FLAGS)
    finally:
        held.close()
    assert code == 2
    assert_one_line_error(err, "is in use by another vitlab train")
    assert list((tmp_path / "dup").iterdir()) == []


def test_a_folder_that_is_not_a_run_is_refused_and_left_as_it_was(images, tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "config.json").write_text('{"my": "settings"}')
    code, _, err = cli(capsys, "train", "--data", images, "--out", folder, *TINY_FLAGS)
    assert code == 2
    assert_one_line_error(err, "is not empty and is not a vitlab run directory (it holds config.json)")
    assert (folder / "config.json").read_text() == '{"my": "settings"}'
    rundir.open_run_dir(folder, new=True, overwrite=True).close()  # --overwrite: the user said so
    (tmp_path / "afile").write_text("x")
    code, _, err = cli(capsys, "train", "--data", images, "--out", tmp_path / "afile", *TINY_FLAGS)
    assert code == 2
    assert_one_line_error(err, "is a file, not a directory")


def test_a_run_that_fails_before_writing_leaves_no_directory(tmp_path, capsys):
    code, _, err = cli(capsys, "train", "--data", tmp_path / "no-such-data", "--out", tmp_path / "run",
                       *TINY_FLAGS)
    assert code == 2 and "no dataset at" in err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- one-line errors
@pytest.mark.parametrize("argv, phrase", [
    (["--model-arg", "patch_size=0"], "patch_size must be a positive integer, got 0"),
    (["--model-arg", "heads=0"], "heads must be a positive integer, got 0"),
    (["--model-arg", "dim=abc"], "dim must be a positive integer, got 'abc'"),
    (["--model-arg", "dim=16384"], "dim must be at most 8,192"),
    (["--model-arg", "image_size=abc"], "image size must be a positive int or (height, width)"),
    (["--model-arg", "dropout=x"], "dropout must be in [0, 1)"),
    (["--augment-arg", "bogus=1"], "unknown augmentation setting(s) bogus"),
    (["--augment-arg", "crop_padding=abc"], "augmentation setting crop_padding must be a whole number"),
    (["--val-size", "inf"], "expected a count of images (>= 0) or a fraction below 1, got 'inf'"),
    (["--channels", "2"], "invalid choice: 2 (choose from 1, 3)"),
    (["--model-arg", "in_channels=2"], "channels must be 1 or 3"),
    (["--image-size", "0"], "must be at least 1"),
])
def test_bad_training_flags_are_one_line_errors(images, tmp_path, capsys, argv, phrase):
    code, _, err = cli(capsys, "train", "--data", images, "--out", tmp_path / "run", *TINY_FLAGS, *argv)
    assert code == 2
    assert_one_line_error(err, phrase)


def test_device_cuda_without_a_gpu_is_one_line(images, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    code, _, err = cli(capsys, "train", "--data", images, "--out", tmp_path / "run", "--device", "cuda")
    assert code == 2
    assert_one_line_error(err, "this machine has no CUDA GPU")


@pytest.mark.parametrize("flags, phrase", [
    (["--top-k", "-1"], "argument --top-k: must be at least 1, got -1"),
    (["--batch-size", "-1"], "argument --batch-size: must be at least 1, got -1"),
    (["--batch-size", "x"], "argument --batch-size: expected a whole number >= 1, got 'x'"),
])
def test_predict_counts_are_checked_before_any_work(tiny_run, capsys, flags, phrase):
    image = next((tiny_run.parent / "images" / "train" / "circle").glob("*.png"))
    code, out, err = cli(capsys, "predict", tiny_run, image, *flags)
    assert code == 2 and out == ""
    assert_one_line_error(err, phrase)


def crafted_checkpoint(run: Path, target: Path, **changes) -> Path:
    raw = ckpt.read_safetensors_metadata(run / "best.safetensors")
    for key, value in changes.items():
        if value is None:
            raw.pop(key)
        else:
            raw[key] = value
    save_file(load_file(run / "best.safetensors"), target, metadata=raw)
    return target


@pytest.mark.parametrize("changes, phrase", [
    (dict(model_config="[1, 2]"), "metadata 'model_config' must be a JSON object, got list"),
    (dict(model_config='"vit"'), "metadata 'model_config' must be a JSON object, got str"),
    (dict(model_config="[" * 100_000 + "]" * 100_000), "metadata 'model_config' is nested too deeply"),
    (dict(model_config="{not json"), "metadata 'model_config' is not valid JSON"),
    (dict(class_names="5"), "metadata 'class_names' must be a list of strings"),
    (dict(class_names='["a"]'), "metadata 'class_names' names 1 classes but the model has 3"),
    (dict(preprocessing=None), "metadata 'preprocessing' is missing or not a JSON object"),
    (dict(preprocessing='{"mean": [0, 0, 0], "std": [0, 0, 0]}'), "every channel's std must be positive"),
    (dict(preprocessing='{"mean": [0], "std": [1]}'), "needs 'mean': 3 finite number(s)"),
    (dict(data='{"val_size": "all"}'), "metadata 'data' must be an object"),
])
def test_crafted_checkpoint_metadata_is_refused_naming_the_file_and_key(tiny_run, tmp_path, capsys, changes,
                                                                          phrase):
    path = crafted_checkpoint(tiny_run, tmp_path / "crafted.safetensors", **changes)
    image = next((tiny_run.parent / "images" / "train" / "circle").glob("*.png"))
    code, out, err = cli(capsys, "predict", path, image)
    assert code == 2 and out == ""
    assert_one_line_error(err, f"{path}: {phrase}" if phrase.startswith("metadata") else phrase)


@pytest.mark.parametrize("key, damage, phrase", [
    ("optimizer", None, "key 'optimizer' is missing"),
    ("epoch", "three", "key 'epoch' is not a count"),
    ("partial_epoch", {"loss": 0.0}, "key 'partial_epoch' is not the epoch's running sums"),
    ("metrics", [{"epoch": "1"}], "key 'metrics' is not a list of metric rows"),
])
def test_forged_training_state_is_refused_naming_the_key(tiny_run, tmp_path, capsys, key, damage, phrase):
    run = copy_run(tiny_run, tmp_path / "run")
    state = torch.load(run / ckpt.STATE_FILE, weights_only=True)
    if damage is None:
        del state[key]
    else:
        state[key] = damage
    torch.save(state, run / ckpt.STATE_FILE)
    code, _, err = cli(capsys, "train", "--resume", run, "--epochs", "2")
    assert code == 2
    assert_one_line_error(err, f"{run / ckpt.STATE_FILE}: {phrase}")


@pytest.mark.parametrize("labels, phrase", [
    ([-1, 0, 1, 2, 3, 4], "'labels' holds -1; class indices start at 0"),
    ([2**70, 0, 1, 2, 3, 4], "'labels' must be a list of whole-number class indices"),
    (["cat", 0, 1, 2, 3, 4], "'labels' must be a list of whole-number class indices"),
])
def test_cifar_batch_with_impossible_labels_is_refused(tmp_path, capsys, labels, phrase):
    archive = tmp_path / "cifar-10-python.tar.gz"
    write_cifar10(archive)
    with tarfile.open(archive) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
    name = "cifar-10-batches-py/data_batch_1"
    batch = pickle.loads(files[name])
    files[name] = pickle.dumps({**batch, b"labels": labels}, protocol=2)
    from tests.data_fixtures import write_tar

    write_tar(archive, files)
    code, _, err = cli(capsys, "data", "inspect", archive, "--cache-dir", tmp_path / "c")
    assert code == 2
    assert_one_line_error(err, f"{name}: {phrase}")


def test_single_class_dataset_is_refused_for_training(tmp_path, capsys):
    source = tmp_path / "images"
    for i in range(12):
        path = source / "cat" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((16, 16, 3), 10 * i, dtype=np.uint8)).save(path)
    code, _, err = cli(capsys, "train", "--data", source, "--out", tmp_path / "run", *TINY_FLAGS)
    assert code == 2
    assert_one_line_error(err, "has a single class (cat): a classifier needs at least two")


def test_unexpected_failures_are_one_line_unless_debugging(capsys, monkeypatch):
    import vitlab.cli.models as models

    def broken(args):
        raise RuntimeError("internal state went wrong\nwith a second line")

    monkeypatch.setattr(models, "run", broken)
    code, _, err = cli(capsys, "models")
    assert code == 1 and err.count("\n") == 1
    assert_one_line_error(err, "RuntimeError: internal state went wrong (unexpected: rerun with VITLAB_DEBUG=1")
    monkeypatch.setenv("VITLAB_DEBUG", "1")
    with pytest.raises(RuntimeError, match="internal state went wrong"):
        main(["models"])
    monkeypatch.delenv("VITLAB_DEBUG")
    monkeypatch.setattr(models, "run", lambda args: bytearray(2**62))  # more than any machine has
    code, _, err = cli(capsys, "models")
    assert code == 1
    assert_one_line_error(err, "out of memory")
