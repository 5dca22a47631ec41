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
    os.environ["VITLAB_CACHE"] = str(tmp_path_factory.mktemp("vitlab-cache"))
    yield
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
