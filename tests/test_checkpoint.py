import io
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import vitlab
from vitlab import checkpoint as ckpt
from vitlab.classifier import Classifier
from tests.conftest import tiny_vit_kwargs

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
NAMES = ["ant", "bee", "cat", "dog", "eel"]


def saved_classifier(path, seed=0):
    torch.manual_seed(seed)
    model = vitlab.VisionTransformer(**tiny_vit_kwargs())
    ckpt.save_model(path, Classifier(model, NAMES, MEAN, STD), extra={"epoch": 3})
    return model


def test_save_and_load_round_trip_keeps_logits_names_and_preprocessing(tmp_path):
    model = saved_classifier(tmp_path / "best.safetensors").eval()
    loaded = vitlab.load(tmp_path)  # a run directory resolves to its best checkpoint
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(loaded(x), model(x))
    assert loaded.class_names == NAMES
    assert loaded.mean == MEAN and loaded.std == STD and loaded.image_size == (16, 16)
    assert loaded.metadata["epoch"] == 3
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "best.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_resolve_checkpoint_prefers_best_then_last_and_explains_missing(tmp_path):
    saved_classifier(tmp_path / "last.safetensors")
    assert ckpt.resolve_checkpoint(tmp_path) == tmp_path / "last.safetensors"
    saved_classifier(tmp_path / "best.safetensors")
    assert ckpt.resolve_checkpoint(tmp_path) == tmp_path / "best.safetensors"
    with pytest.raises(ValueError, match="no default weights ship"):
        ckpt.resolve_checkpoint(None)
    (tmp_path / "images").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        ckpt.resolve_checkpoint(tmp_path / "images")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ckpt.resolve_checkpoint(tmp_path / "nope.safetensors")


def test_crash_while_writing_weights_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "last.safetensors"
    first = saved_classifier(path, seed=0)

    real_atomic_write = ckpt.atomic_write

    def crash_half_way(target, write):
        def half_then_die(f):
            buffer = io.BytesIO()
            write(buffer)
            f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])  # half the new file is on disk...
            raise KeyboardInterrupt  # ...when the process is killed
        return real_atomic_write(target, half_then_die)

    monkeypatch.setattr(ckpt, "atomic_write", crash_half_way)
    with pytest.raises(KeyboardInterrupt):
        saved_classifier(path, seed=1)
    monkeypatch.undo()
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(vitlab.load(path)(x), first.eval()(x))  # the previous weights, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.safetensors"]


def test_crash_before_rename_keeps_previous_training_state(tmp_path, monkeypatch):
    path = tmp_path / ckpt.STATE_FILE
    weights = {"w": torch.arange(4.0)}
    state = {"format": ckpt.FORMAT, "epoch": 1, "model": weights, "model_digest": ckpt.tensor_digest(weights)}
    ckpt.save_training_state(path, state)

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_training_state(path, {**state, "epoch": 2})
    monkeypatch.undo()
    assert ckpt.load_training_state(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == [ckpt.STATE_FILE]


def test_truncated_and_garbage_checkpoints_give_one_line_errors(tmp_path):
    path = tmp_path / "model.safetensors"
    saved_classifier(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated") as error:
        vitlab.load(path)
    assert "\n" not in str(error.value)
    path.write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="corrupt or truncated"):
        vitlab.load(path)


def test_foreign_and_mismatched_safetensors_are_refused_clearly(tmp_path):
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(2)}, foreign)
    with pytest.raises(ValueError, match="without vitlab metadata"):
        vitlab.load(foreign)

    path = tmp_path / "model.safetensors"
    saved_classifier(path)
    tensors = load_file(path)
    meta = ckpt.read_metadata(path)
    config = dict(meta["model_config"], dim=64)  # metadata now describes a wider model
    raw = {k: json.dumps(v) for k, v in meta.items() if k != "format"}
    raw.update(format=ckpt.FORMAT, model_config=json.dumps(config))
    save_file(tensors, path, metadata=raw)
    with pytest.raises(ValueError, match="does not match its model config: .*shape"):
        vitlab.load(path)


def test_corrupt_training_state_and_digest_mismatch_are_detected(tmp_path):
    path = tmp_path / ckpt.STATE_FILE
    path.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match="corrupt or truncated and cannot be resumed"):
        ckpt.load_training_state(path)
    weights = {"w": torch.arange(4.0)}
    ckpt.save_training_state(path, {"format": ckpt.FORMAT, "model": weights, "model_digest": "0" * 64})
    with pytest.raises(ValueError, match="do not match the digest"):
        ckpt.load_training_state(path)


def test_cli_without_checkpoint_says_no_default_weights(capsys, tmp_path):
    from vitlab.cli import main

    assert main(["eval", "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vitlab eval: error: no checkpoint given and no default weights ship")
    assert len(err.splitlines()) == 1
