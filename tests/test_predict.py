import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitlab
from vitlab.cli import main
from vitlab.predict import predict_files
from tests.conftest import tiny_vit_kwargs
from tests.image_fixtures import class_image, train_tiny_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VITLAB_CACHE", str(root / "cache"))
        yield train_tiny_run(root)


@pytest.fixture
def odd_images(tmp_path):
    """A folder of images in sizes and modes the model never saw, plus broken files."""
    rng = np.random.default_rng(1)
    folder = tmp_path / "odd"
    folder.mkdir()
    big = Image.fromarray(class_image(0, rng, 16)).resize((97, 61))  # other size and aspect
    big.save(folder / "a_big_circle.jpg")
    Image.fromarray(class_image(1, rng, 16)).convert("L").save(folder / "b_gray_cross.png")
    Image.fromarray(class_image(2, rng, 16)).convert("RGBA").save(folder / "c_rgba_stripes.png")
    Image.fromarray(class_image(0, rng, 16)).convert("P").save(folder / "d_palette.gif")
    Image.new("RGB", (1, 1), (200, 50, 50)).save(folder / "e_one_pixel.bmp")
    (folder / "f_corrupt.jpg").write_bytes(b"\xff\xd8\xff this is not a jpeg")
    png = (folder / "b_gray_cross.png").read_bytes()
    (folder / "g_truncated.png").write_bytes(png[: len(png) // 2])
    return folder


def test_predict_converts_odd_images_and_reports_broken_ones(run, odd_images):
    classifier = vitlab.load(run)
    results = {r.path.split("/")[-1]: r for r in predict_files(classifier, [odd_images], top_k=2, batch_size=3)}
    assert len(results) == 7
    assert "f_corrupt.jpg" in results["f_corrupt.jpg"].error
    assert "g_truncated.png" in results["g_truncated.png"].error
    good = [r for r in results.values() if r.error is None]
    assert len(good) == 5
    for r in good:
        assert len(r.top) == 2 and r.top[0][1] >= r.top[1][1] and 0 < r.top[0][1] <= 1
    assert results["a_big_circle.jpg"].top[0][0] == "circle"
    assert results["c_rgba_stripes.png"].top[0][0] == "stripes"


def test_cli_predict_json_table_globs_and_exit_status(run, odd_images, capsys):
    assert main(["predict", str(run), str(odd_images / "a_*.jpg"), str(odd_images / "c_rgba_stripes.png"),
                 "--json", "--top-k", "3"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [len(r["predictions"]) for r in rows] == [3, 3]
    assert sum(p["probability"] for p in rows[0]["predictions"]) == pytest.approx(1.0, abs=1e-5)
    assert main(["predict", str(run / "best.safetensors"), str(odd_images)]) == 1  # some files are broken
    captured = capsys.readouterr()
    assert "ERROR: cannot read image" in captured.out and "circle" in captured.out
    assert "2 of 7 inputs could not be read" in captured.err
    assert main(["predict", str(odd_images / "a_big_circle.jpg")]) == 2
    assert "no default weights ship" in capsys.readouterr().err


def test_python_api_predict_and_embed_on_pil_and_tensors(run):
    model = vitlab.load(run, precision="fp32")  # compared with the fp32 model below
    rng = np.random.default_rng(2)
    pil = Image.fromarray(class_image(2, rng, 16))
    [[(label, probability), *_]] = model.predict(pil)
    assert label == "stripes" and 0.3 < probability <= 1
    as_uint8 = torch.from_numpy(class_image(2, rng, 16)).permute(2, 0, 1)  # (3, 16, 16)
    as_float = as_uint8.float() / 255
    probs = model.probabilities([as_uint8, as_float])
    assert torch.allclose(probs[0], probs[1], atol=1e-6)
    big = torch.from_numpy(class_image(1, rng, 16)).permute(2, 0, 1).repeat(1, 2, 2)  # 32x32: resized
    assert model.predict(big, top_k=1)[0][0][0] == "cross"
    features = model.embed([pil, as_uint8])
    assert features.shape == (2, 32) and model.embed(pil, pooling="mean").shape == (1, 32)
    # the head's own input: the pooled, normalised [CLS] token of the full encoder
    tokens = model.model.forward_features(model.preprocess([pil, as_uint8]))
    torch.testing.assert_close(features, model.model.forward_head(tokens, pre_logits=True))
    with pytest.raises(ValueError, match="cannot classify a int"):
        model.predict(3)


def test_every_suffix_training_reads_is_predicted_in_a_folder(tmp_path):
    """A folder holding one image per suffix in IMAGE_EXTENSIONS (.pbm and .pgm included)."""
    from vitlab.data.image import IMAGE_EXTENSIONS

    formats = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".gif": "GIF", ".webp": "WEBP",
               ".tif": "TIFF", ".tiff": "TIFF", ".ppm": "PPM", ".pgm": "PPM", ".pbm": "PPM"}
    assert set(formats) == set(IMAGE_EXTENSIONS)  # a new suffix gets a line here
    rng = np.random.default_rng(3)
    picture = Image.fromarray(class_image(0, rng, 16))
    modes = {".pgm": "L", ".pbm": "1"}
    for suffix, fmt in formats.items():
        picture.convert(modes.get(suffix, "RGB")).save(tmp_path / f"image{suffix}", format=fmt)
    (tmp_path / "notes.txt").write_text("not an image")  # skipped: not an image suffix

    classifier = vitlab.Classifier(vitlab.VisionTransformer(**tiny_vit_kwargs(num_classes=3)))
    results = predict_files(classifier, [tmp_path], top_k=1)
    assert sorted(Path(r.path).suffix for r in results) == sorted(formats)
    assert all(r.error is None and len(r.top) == 1 for r in results), [r.error for r in results]


def test_cli_predict_precision_flag(run, odd_images, capsys):
    image = str(odd_images / "a_big_circle.jpg")
    rows = {}
    for precision in ("fp32", "bf16", "auto"):
        assert main(["predict", str(run), image, "--json", "--precision", precision]) == 0
        rows[precision] = json.loads(capsys.readouterr().out)["predictions"]
    assert rows["fp32"][0]["class"] == rows["bf16"][0]["class"] == "circle"
    assert rows["bf16"][0]["probability"] == pytest.approx(rows["fp32"][0]["probability"], abs=0.01)
    expected = rows["bf16"] if vitlab.load(run).inference_precision == "bf16" else rows["fp32"]
    assert rows["auto"] == expected
    with pytest.raises(SystemExit):
        main(["predict", str(run), image, "--precision", "fp16"])
    assert "invalid choice: 'fp16'" in capsys.readouterr().err
