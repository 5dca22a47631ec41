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
    assert ckpt.resolve_checkpoint(None) == ckpt.resolve_checkpoint("default") == ckpt.DEFAULT_WEIGHTS
    (tmp_path / "images").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        ckpt.resolve_checkpoint(tmp_path / "images")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ckpt.resolve_checkpoint(tmp_path / "nope.safetensors")


def test_crash_while_writing_weights_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "last.safetensors"
    first = saved_classifier(path, seed=0)

    from vitlab import files

    real_atomic_write = files.atomic_write

    def crash_half_way(target, write):
        def half_then_die(f):
            buffer = io.BytesIO()
            write(buffer)
            f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])  # half the new file is on disk...
            raise KeyboardInterrupt  # ...when the process is killed
        return real_atomic_write(target, half_then_die)

    monkeypatch.setattr(files, "atomic_write", crash_half_way)  # every vitlab write goes through it
    with pytest.raises(KeyboardInterrupt):
        saved_classifier(path, seed=1)
    monkeypatch.undo()
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(vitlab.load(path)(x), first.eval()(x))  # the previous weights, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.safetensors"]


def training_state(weights: dict, **changes) -> dict:
    """A state file's dict with every key resume reads (vitlab.checkpoint.STATE_SCHEMA)."""
    state = {"format": ckpt.FORMAT, "epoch": 1, "step_in_epoch": 0, "global_step": 3, "best_val_top1": None,
             "total_steps": 9, "partial_epoch": {"loss": 0.0, "correct": 0.0, "seen": 0.0, "seconds": 0.0},
             "rng": {"torch": torch.get_rng_state(), "ranks": [torch.get_rng_state()]}, "model": weights,
             "model_digest": ckpt.tensor_digest(weights), "model_config": {}, "ema": None, "metrics": [],
             "optimizer": {"state": {}, "param_groups": []}}
    return {**state, **changes}


def test_crash_before_rename_keeps_previous_training_state(tmp_path, monkeypatch):
    path = tmp_path / ckpt.STATE_FILE
    weights = {"w": torch.arange(4.0)}
    state = training_state(weights)
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
    ckpt.save_training_state(path, training_state(weights, model_digest="0" * 64))
    with pytest.raises(ValueError, match="do not match the digest"):
        ckpt.load_training_state(path)


def test_cli_with_a_mistyped_checkpoint_says_it_does_not_exist(capsys, tmp_path):
    from vitlab.cli import main

    assert main(["eval", str(tmp_path / "runs" / "nnao"), "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"vitlab eval: error: checkpoint {tmp_path / 'runs' / 'nnao'} does not exist")
    assert len(err.splitlines()) == 1


def test_a_missing_shipped_file_is_a_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setattr(ckpt, "DEFAULT_WEIGHTS", tmp_path / "gone.safetensors")
    with pytest.raises(FileNotFoundError, match="the shipped weights are missing from this install"):
        ckpt.load_checkpoint()


# ---------------------------------------------------------------- class names and metadata
def test_class_names_come_from_the_argument_and_stay_out_of_the_model_config(tmp_path):
    model = vitlab.VisionTransformer(**tiny_vit_kwargs())
    ckpt.save_model(tmp_path / "named.safetensors", model, class_names=NAMES, mean=MEAN, std=STD)
    ckpt.save_model(tmp_path / "numbered.safetensors", model, mean=MEAN, std=STD)
    assert vitlab.load(tmp_path / "named.safetensors").class_names == NAMES
    assert vitlab.load(tmp_path / "numbered.safetensors").class_names == ["0", "1", "2", "3", "4"]
    assert "class_names" not in ckpt.read_metadata(tmp_path / "named.safetensors")["model_config"]
    with pytest.raises(ValueError, match="2 class names for a model with 5 classes"):
        ckpt.save_model(tmp_path / "bad.safetensors", model, class_names=["x", "y"], mean=MEAN, std=STD)


def test_checkpoint_with_class_names_in_its_model_config_still_loads(tmp_path):
    """Checkpoints written before class names left ViTConfig kept a copy in model_config."""
    path = tmp_path / "old.safetensors"
    model = saved_classifier(path).eval()
    raw = ckpt.read_safetensors_metadata(path)
    config = json.loads(raw["model_config"])
    raw["model_config"] = json.dumps({**config, "class_names": NAMES})
    save_file(load_file(path), path, metadata=raw)
    loaded = vitlab.load(path)
    x = torch.randn(2, 3, 16, 16)
    assert loaded.class_names == NAMES and torch.equal(loaded(x), model(x))


def test_one_safetensors_metadata_reader_for_checkpoints_and_foreign_files(tmp_path):
    path = tmp_path / "model.safetensors"
    saved_classifier(path)
    raw = ckpt.read_safetensors_metadata(path)
    assert raw["format"] == ckpt.FORMAT and json.loads(raw["class_names"]) == NAMES
    assert all(isinstance(v, str) for v in raw.values())
    save_file({"weight": torch.zeros(2)}, tmp_path / "plain.safetensors")
    assert ckpt.read_safetensors_metadata(tmp_path / "plain.safetensors") == {}
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="corrupt or truncated"):
        ckpt.read_safetensors_metadata(tmp_path / "junk.safetensors")


def test_load_takes_a_device_and_an_inference_precision(tmp_path):
    model = saved_classifier(tmp_path / "best.safetensors").eval()
    x = torch.rand(4, 3, 16, 16)
    from vitlab.runtime import resolve_device

    assert vitlab.load(tmp_path, device="auto").device.type == resolve_device("auto").type
    fp32 = vitlab.load(tmp_path, device="cpu", precision="fp32")
    assert fp32.precision == "fp32" and fp32.inference_precision == "fp32"
    with torch.no_grad():
        expected = model(fp32.preprocess(x)).softmax(-1)
    assert torch.equal(fp32.probabilities(x), expected)
    bf16 = vitlab.load(tmp_path, precision="bf16")
    assert bf16.inference_precision == "bf16"
    assert (bf16.probabilities(x) - expected).abs().max() < 0.01
    assert vitlab.load(tmp_path).precision == "auto"
    with pytest.raises(ValueError, match="precision must be one of"):
        vitlab.load(tmp_path, precision="fp16")
