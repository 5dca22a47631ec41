"""Shared fixtures. Tests build small models and generate their own data; the one real dataset
(../shared/datasets/cifar10-jpeg-train.tar.gz) is used only where a test says so, and such tests
are skipped with the reason when it is absent."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_ARCHIVE = REPO.parent / "shared" / "datasets" / "cifar10-jpeg-train.tar.gz"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Tests never touch the user's ~/.cache/vitlab; one cache for the session, so the real
    archive is decoded once however many tests read it."""
    import os

    old = os.environ.get("VITLAB_CACHE")
    root = tmp_path_factory.mktemp("vitlab-cache")
    os.environ["VITLAB_CACHE"] = str(root)
    yield root
    if old is None:
        os.environ.pop("VITLAB_CACHE", None)
    else:
        os.environ["VITLAB_CACHE"] = old


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def shipped_model_held_out(archive: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The 5,000 validation images the shipped model was not trained on (uint8, sorted by class),
    and their labels in CIFAR10_CLASSES order."""
    from vitlab import checkpoint as ckpt
    from vitlab.data import load_data

    meta = ckpt.read_metadata(ckpt.DEFAULT_WEIGHTS)["data"]
    val = load_data(archive, val_size=meta["val_size"], split_seed=meta["split_seed"]).val
    return val.images, val.labels


@pytest.fixture
def cifar_jpeg_archive() -> Path:
    if not SHARED_ARCHIVE.exists():
        pytest.skip(f"the shared CIFAR-10 archive is not at {SHARED_ARCHIVE}")
    return SHARED_ARCHIVE


@pytest.fixture(scope="session")
def cifar_run(tmp_path_factory, _private_cache):
    """The run directory of a small ViT (8x8 patches, 3 blocks of width 64) trained for 3 epochs on
    4,000 images of the shared CIFAR-10 archive, 2,000 held out (about 8 s on 2 CPU cores, plus
    decoding the archive once per session): weights with the confidence margins of a real model,
    which random weights lack. Trained once per session for every test that needs one."""
    import vitlab
    from vitlab.config import train_preset

    if not SHARED_ARCHIVE.exists():
        pytest.skip(f"the shared CIFAR-10 archive is not at {SHARED_ARCHIVE}")
    config = train_preset("nano", data=str(SHARED_ARCHIVE), out=str(tmp_path_factory.mktemp("cifar") / "run"),
                          subset=4000, val_size=2000, epochs=3, batch_size=100, lr=3e-3, warmup_epochs=0.3,
                          ema_decay=None, precision="fp32", device="cpu",
                          model_overrides=dict(dim=64, depth=3, heads=4, mlp_dim=128, patch_size=8))
    with pytest.MonkeyPatch.context() as patch:  # the session's decode, whichever test asks first
        patch.setenv("VITLAB_CACHE", str(_private_cache))
        return vitlab.train(config).run_dir


def tiny_vit_kwargs(**overrides) -> dict:
    """A model small enough for any test: 2 blocks of width 32 on 16x16 images."""
    kwargs = dict(image_size=16, patch_size=4, in_channels=3, num_classes=5, dim=32, depth=2,
                  heads=4, mlp_dim=64, dropout=0.0)
    kwargs.update(overrides)
    return kwargs


def fake_clock(monkeypatch, seconds_per_call: float) -> dict:
    """time.perf_counter advancing by a fixed amount per call: calibration then sees a known speed,
    whatever this machine's load. Returns the clock ({"t": seconds}) so a test can move it."""
    clock = {"t": 0.0}

    def tick():
        clock["t"] += seconds_per_call
        return clock["t"]

    monkeypatch.setattr(importlib.import_module("vitlab.train").time, "perf_counter", tick)
    return clock
