"""The model that ships with vitlab (vitlab/weights/, docs/model-card.md): what it is, that every
entry point uses it when no checkpoint is given, and that it classifies held-out CIFAR-10 images
as well as its model card says. Also `vitlab eval` on any labelled folder, which is how users
check it on their own images."""

import json

import pytest
import torch
from PIL import Image

import vitlab
from vitlab import checkpoint as ckpt
from vitlab.cli import main
from tests.conftest import CIFAR10_CLASSES, SHARED_ARCHIVE, shipped_model_held_out


def test_the_shipped_file_is_small_half_precision_and_says_where_it_came_from():
    path = ckpt.DEFAULT_WEIGHTS
    assert path.is_file() and path.stat().st_size <= 10 * 1024 * 1024
    meta = ckpt.read_metadata(path)
    assert meta["class_names"] == CIFAR10_CLASSES
    assert meta["preprocessing"]["image_size"] == [32, 32] and len(meta["preprocessing"]["mean"]) == 3
    assert meta["dtype"] == "float16"
    provenance = meta["provenance"]
    assert provenance["val_top1"] >= 0.90 and "vitlab train --preset lite" in provenance["commands"][0]
    assert provenance["training_minutes"] <= 150
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}


def test_load_without_a_checkpoint_gives_the_shipped_model_in_fp32():
    classifier = vitlab.load()
    assert classifier.class_names == CIFAR10_CLASSES
    assert classifier.model.config.dim == 256 and classifier.model.config.depth == 7
    assert {p.dtype for p in classifier.model.parameters()} == {torch.float32}


def test_init_default_starts_a_run_from_the_shipped_architecture():
    from vitlab.weights import InitialWeights

    init = InitialWeights("default")
    assert init.path == ckpt.DEFAULT_WEIGHTS
    assert init.config.dim == 256 and init.config.depth == 7
    model = vitlab.VisionTransformer.from_config(init.model_config(vitlab.presets.preset_config("nano"), {}))
    init.load_into(model)
    assert torch.equal(model.state_dict()["head.weight"],
                       vitlab.load().model.state_dict()["head.weight"])


@pytest.mark.slow
def test_the_shipped_model_classifies_held_out_cifar10_images(cifar_jpeg_archive):
    """Every fifth of the 5,000 validation images the model never trained on (100 per class): the
    model card says 90.3% on all 5,000; 1,000 images leave about +-1 point of sampling noise."""
    images, labels = shipped_model_held_out(cifar_jpeg_archive)
    images, labels = images[::5], labels[::5]
    classifier = vitlab.load()
    predicted = torch.cat([classifier.probabilities(images[i:i + 250]).argmax(1) for i in range(0, 1000, 250)])
    assert (predicted == labels).float().mean().item() >= 0.88


@pytest.fixture(scope="module")
def cifar_folders(tmp_path_factory):
    """Three layouts of the same 60 held-out images: class folders of only three classes,
    a test/-only folder, and class folders with one class the model does not know."""
    if not SHARED_ARCHIVE.exists():
        pytest.skip(f"the shared CIFAR-10 archive is not at {SHARED_ARCHIVE}")
    images, labels = shipped_model_held_out(SHARED_ARCHIVE)
    root = tmp_path_factory.mktemp("labelled")
    chosen = [3, 5, 8]  # cat, dog, ship
    for layout in ("classes", "test/", "unknown"):
        for k in chosen:
            cls = "zebra" if layout == "unknown" and k == 8 else CIFAR10_CLASSES[k]
            folder = root / layout.rstrip("/") / ("test" if layout == "test/" else "") / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in (labels == k).nonzero().flatten()[:20].tolist():
                Image.fromarray(images[i].permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["classes", "test"])
def test_eval_scores_every_image_of_a_labelled_folder_against_the_models_classes(cifar_folders, layout, capsys,
                                                                                 tmp_path):
    assert main(["eval", "--data", str(cifar_folders / layout), "--json",
                 "--confusion", str(tmp_path / "c.png")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["split"] == "all" and out["n"] == 60
    assert set(out["per_class"]) == {"cat", "dog", "ship"}  # only the classes that have images
    assert len(out["confusion"]) == 10  # against all ten of the model's classes
    assert out["top1"] >= 0.6
    assert (tmp_path / "c.png").stat().st_size > 0


@pytest.mark.slow
def test_eval_names_a_class_the_model_does_not_know(cifar_folders, capsys):
    assert main(["eval", "--data", str(cifar_folders / "unknown")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "class folder(s) 'zebra' that the model does not know" in err and "airplane" in err


@pytest.mark.slow
def test_eval_prints_its_figures_even_when_the_confusion_png_cannot_be_written(cifar_folders, capsys, tmp_path):
    (tmp_path / "taken").mkdir()  # a directory where the PNG should go
    assert main(["eval", "--data", str(cifar_folders / "classes"), "--confusion", str(tmp_path / "taken")]) == 0
    captured = capsys.readouterr()
    assert "top-1" in captured.out and "split       all (60 images)" in captured.out
    assert "warning: could not write the confusion matrix" in captured.err and captured.err.count("\n") == 1


def test_training_on_a_test_only_folder_is_a_one_line_error(tmp_path, capsys):
    for cls in ("a", "b"):
        (tmp_path / "data" / "test" / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / "data" / "test" / cls / f"{i}.png")
    assert main(["train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--max-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "has no training images, only test split(s)" in err and err.count("\n") == 1
