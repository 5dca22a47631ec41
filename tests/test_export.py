import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import vitlab
import vitlab.export as export
from vitlab.checkpoint import save_model
from vitlab.classifier import Classifier
from vitlab.cli import main
from vitlab.export import MissingDependencyError, export_model, read_metadata

from .conftest import tiny_vit_kwargs

CLASSES = ["ant", "bee", "cat", "dog", "eel"]


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(0)
    model = vitlab.VisionTransformer(**tiny_vit_kwargs(image_size=(16, 24)))
    return Classifier(model, CLASSES, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3)).eval()


@pytest.fixture(scope="module")
def onnx_file(classifier, tmp_path_factory):
    return export_model(classifier, tmp_path_factory.mktemp("onnx") / "model.onnx")


@pytest.fixture(scope="module")
def torchscript_file(classifier, tmp_path_factory):
    return export_model(classifier, tmp_path_factory.mktemp("ts") / "model.pt")


def _check_metadata(metadata: dict):
    assert json.loads(metadata["class_names"]) == CLASSES
    assert json.loads(metadata["mean"]) == pytest.approx([0.4, 0.5, 0.6])
    assert json.loads(metadata["std"]) == pytest.approx([0.2, 0.25, 0.3])
    assert json.loads(metadata["image_size"]) == [16, 24]
    assert metadata["in_channels"] == "3"
    assert json.loads(metadata["model_config"])["dim"] == 32


def test_onnx_round_trip_with_two_batch_sizes_and_metadata(classifier, onnx_file):
    import onnxruntime

    assert onnx_file.format == "onnx" and onnx_file.max_abs_diff <= 1e-4
    assert onnx_file.batch_sizes == (4, 1)
    session = onnxruntime.InferenceSession(str(onnx_file.path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == "batch"  # symbolic, not a fixed number
    for batch in (2, 7):
        images = torch.randn(batch, 3, 16, 24)
        logits = session.run(["logits"], {"images": images.numpy()})[0]
        with torch.no_grad():
            np.testing.assert_allclose(logits, classifier(images).numpy(), atol=1e-4, rtol=0)
    _check_metadata(session.get_modelmeta().custom_metadata_map)
    _check_metadata(read_metadata(onnx_file.path))


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_round_trip_with_two_batch_sizes_and_metadata(classifier, torchscript_file):
    assert torchscript_file.format == "torchscript" and torchscript_file.max_abs_diff <= 1e-4
    extra = {"vitlab.json": ""}
    loaded = torch.jit.load(str(torchscript_file.path), _extra_files=extra)
    for batch in (3, 6):
        images = torch.randn(batch, 3, 16, 24)
        with torch.no_grad():
            torch.testing.assert_close(loaded(images), classifier(images), atol=1e-4, rtol=0)
    _check_metadata(json.loads(extra["vitlab.json"]))
    _check_metadata(read_metadata(torchscript_file.path))


def test_exported_onnx_runs_in_a_process_without_vitlab_or_torch(classifier, onnx_file, tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (2, 3, 16, 24), dtype=np.uint8)
    np.save(tmp_path / "pixels.npy", pixels)
    script = textwrap.dedent(f"""
        import json, sys
        import numpy as np
        import onnxruntime
        session = onnxruntime.InferenceSession({str(onnx_file.path)!r}, providers=["CPUExecutionProvider"])
        meta = session.get_modelmeta().custom_metadata_map
        mean = np.array(json.loads(meta["mean"]), dtype=np.float32).reshape(1, -1, 1, 1)
        std = np.array(json.loads(meta["std"]), dtype=np.float32).reshape(1, -1, 1, 1)
        images = (np.load("pixels.npy").astype(np.float32) / 255 - mean) / std
        logits = session.run(["logits"], {{"images": images}})[0]
        names = json.loads(meta["class_names"])
        loaded = [m for m in sys.modules if m.split(".")[0] in ("torch", "vitlab")]
        print(json.dumps({{"logits": logits.tolist(), "predicted": [names[i] for i in logits.argmax(1)],
                          "loaded": loaded}}))
    """)
    # -I: isolated mode, so neither the working directory nor PYTHONPATH can bring vitlab in
    done = subprocess.run([sys.executable, "-I", "-c", script], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["loaded"] == []
    with torch.no_grad():
        expected = classifier(classifier.preprocess(torch.from_numpy(pixels)))
    np.testing.assert_allclose(result["logits"], expected.numpy(), atol=1e-4, rtol=0)
    assert result["predicted"] == [CLASSES[i] for i in expected.argmax(1)]


def test_cli_exports_a_checkpoint_and_reports_the_measured_difference(classifier, tmp_path, capsys):
    checkpoint = save_model(tmp_path / "run" / "best.safetensors", classifier)
    out = tmp_path / "model.pt"
    assert main(["export", str(tmp_path / "run"), "--format", "torchscript", "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith(f"exported {tmp_path / 'run'} to {out} (torchscript")
    assert printed[1].startswith("verified with torch.jit.load")
    measured = float(printed[1].split("PyTorch ")[1].split(" <= ")[0])
    assert 0 <= measured <= 1e-4
    _check_metadata(read_metadata(out))
    assert checkpoint.is_file()


def test_cli_exports_a_preset_with_random_weights_to_onnx(tmp_path, capsys):
    out = tmp_path / "nano.onnx"
    assert main(["export", "--preset", "nano", "--out", str(out)]) == 0  # format from the suffix
    printed = capsys.readouterr().out
    assert "exported preset nano (random weights)" in printed and "verified with onnxruntime" in printed
    assert json.loads(read_metadata(out)["image_size"]) == [32, 32]


@pytest.mark.parametrize("argv, message", [
    (["--format", "tflite", "--out", "m.tflite"], "unknown export format 'tflite'"),
    (["--out", "m.bin"], "cannot tell the export format from 'm.bin'"),
    (["--out", "missing/m.onnx"], "directory missing does not exist"),
    (["--out", "afile/m.onnx"], "afile is not a directory"),
    (["--out", "."], "cannot tell the export format from '.'"),
    (["--format", "onnx", "--out", "."], "it is a directory"),
])
def test_cli_errors_are_one_line(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("not a directory")
    assert main(["export", "nano", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_missing_onnx_runtime_names_the_extra_to_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    with pytest.raises(MissingDependencyError, match=r'pip install "vitlab\[onnx\]"'):
        export_model(vitlab.VisionTransformer(**tiny_vit_kwargs()), tmp_path / "m.onnx")
    assert main(["export", "nano", "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert "'onnxruntime' package, which is not installed" in err and 'pip install "vitlab[onnx]"' in err
    assert list(tmp_path.iterdir()) == []


def test_failed_verification_leaves_nothing_half_written(classifier, tmp_path, monkeypatch):
    out = tmp_path / "model.pt"
    out.write_bytes(b"the previous export")
    real_run = export._run_torchscript

    def off_by_a_bit(path, batches):
        outputs, runtime = real_run(path, batches)
        return [o + 1e-3 for o in outputs], runtime

    monkeypatch.setattr(export, "_run_torchscript", off_by_a_bit)
    with pytest.raises(ValueError, match=r"verification failed: .* differ from PyTorch by up to 1\.00e-03"):
        export_model(classifier, out)
    assert out.read_bytes() == b"the previous export"  # kept as it was
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temporary file left


def test_a_crash_while_writing_leaves_nothing_behind(classifier, tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch.jit, "save", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        export_model(classifier, tmp_path / "model.pt")
    assert list(tmp_path.iterdir()) == []


def test_exporting_leaves_the_callers_model_as_it_was(tmp_path):
    model = vitlab.VisionTransformer(**tiny_vit_kwargs()).train().double()
    export_model(model, tmp_path / "m.pt")
    assert model.training and model.head.weight.dtype == torch.float64
    assert json.loads(read_metadata(tmp_path / "m.pt")["class_names"]) == ["0", "1", "2", "3", "4"]


@pytest.mark.slow
def test_attention_summary_and_export_work_on_a_run_trained_by_vitlab_train(tmp_path, capsys):
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, colour in [("red", (200, 30, 30)), ("blue", (30, 30, 200))]:
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(24):
            pixels = rng.normal(colour, 40, (16, 16, 3)).clip(0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / "images" / name / f"{i}.png")
    run = tmp_path / "run"
    tiny = [arg for kv in ("dim=32", "depth=2", "heads=4", "mlp_dim=64", "image_size=16")
            for arg in ("--model-arg", kv)]
    assert main(["train", "--data", str(tmp_path / "images"), "--out", str(run), "--epochs", "1",
                 "--batch-size", "16", "--val-size", "8", "--device", "cpu", *tiny]) == 0
    capsys.readouterr()

    assert main(["summary", str(run)]) == 0
    assert "total: 19,362 parameters" in capsys.readouterr().out

    figure = tmp_path / "attention.png"
    assert main(["attention", str(run), str(tmp_path / "images" / "red" / "0.png"), "--out", str(figure)]) == 0
    printed = capsys.readouterr().out
    assert printed.split()[1] in ("red", "blue") and figure.read_bytes()[:4] == b"\x89PNG"

    for out in (tmp_path / "model.onnx", tmp_path / "model.pt"):
        assert main(["export", str(run), "--out", str(out)]) == 0
        assert "verified with" in capsys.readouterr().out
        metadata = read_metadata(out)
        assert sorted(json.loads(metadata["class_names"])) == ["blue", "red"]
        assert json.loads(metadata["image_size"]) == [16, 16]
