import csv
import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitlab
from vitlab.cli import main
from vitlab.predict import predict_files
from tests.conftest import CIFAR10_CLASSES, tiny_vit_kwargs
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
    # no checkpoint: the shipped CIFAR-10 model answers
    assert main(["predict", str(odd_images / "a_big_circle.jpg"), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["predictions"][0]["class"] in vitlab.load().class_names == CIFAR10_CLASSES


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


# ---------------------------------------------------------------- --csv and the progress bar
class _Terminal(io.StringIO):
    """A stderr that says it is a terminal, as an interactive shell's is."""

    def isatty(self):
        return True


def test_cli_predict_csv_has_one_row_per_image_matching_json(run, odd_images, capsys):
    shutil.copy(odd_images / "a_big_circle.jpg", odd_images / "h, with comma.jpg")  # quoted, not split
    assert main(["predict", str(run), str(odd_images), "--csv", "--top-k", "2"]) == 1  # 2 files are broken
    captured = capsys.readouterr()
    table = list(csv.reader(io.StringIO(captured.out)))
    assert table[0] == ["path", "class_1", "probability_1", "class_2", "probability_2", "error"]
    rows = {Path(row[0]).name: row for row in table[1:]}
    assert len(rows) == 8 and all(len(row) == 6 for row in rows.values())
    assert rows["a_big_circle.jpg"][1] == "circle" and rows["h, with comma.jpg"][1] == "circle"
    assert rows["f_corrupt.jpg"][1:5] == ["", "", "", ""] and "cannot read image" in rows["f_corrupt.jpg"][5]
    assert "2 of 8 inputs could not be read" in captured.err

    assert main(["predict", str(run), str(odd_images), "--json", "--top-k", "2"]) == 1
    for line in capsys.readouterr().out.splitlines():
        entry = json.loads(line)
        row = rows[Path(entry["path"]).name]
        if "error" in entry:
            assert row[5] == entry["error"]
            continue
        assert row[1::2][:2] == [p["class"] for p in entry["predictions"]]
        assert [float(x) for x in row[2:5:2]] == pytest.approx([p["probability"] for p in entry["predictions"]],
                                                               abs=1e-6)
        assert float(row[2]) >= float(row[4]) and row[5] == ""


def test_cli_predict_csv_and_json_exclude_each_other(run, odd_images, capsys):
    with pytest.raises(SystemExit):
        main(["predict", str(run), str(odd_images), "--csv", "--json"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_progress_bar_goes_to_a_terminals_stderr_and_never_to_stdout(run, odd_images, capsys, monkeypatch):
    stderr = _Terminal()
    monkeypatch.setattr(sys, "stderr", stderr)
    # 7 inputs in batches of 1: more than a few batches, so the bar is drawn
    assert main(["predict", str(run), str(odd_images), "--csv", "--batch-size", "1"]) == 1
    out = capsys.readouterr().out
    assert "predict" in stderr.getvalue() and "img" in stderr.getvalue()
    assert len(list(csv.reader(io.StringIO(out)))) == 8 and "predict:" not in out  # header + 7 rows, clean

    # a few batches, or a stderr that is a file or pipe: no bar
    stderr.truncate(0)
    assert main(["predict", str(run), str(odd_images), "--csv", "--batch-size", "64"]) == 1
    assert "img" not in stderr.getvalue()
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert main(["predict", str(run), str(odd_images), "--batch-size", "1"]) == 1
    assert "img" not in sys.stderr.getvalue()


def test_eval_and_embed_draw_the_bar_only_when_asked(run, odd_images, monkeypatch, tmp_path, capsys):
    from vitlab.evaluate import evaluate

    classifier = vitlab.load(run, precision="fp32")
    batches = [(torch.randn(2, 3, 16, 16), torch.tensor([0, 1])) for _ in range(5)]
    stderr = _Terminal()
    monkeypatch.setattr(sys, "stderr", stderr)
    evaluate(classifier.model, batches, 3)  # training's per-epoch validation: never a bar
    assert stderr.getvalue() == ""
    result = evaluate(classifier.model, batches, 3, progress=True)
    # the bar's first frame names the task and the batch count (later frames depend on timing)
    assert "eval:" in stderr.getvalue() and "0/5" in stderr.getvalue() and result.n == 10

    stderr.truncate(0)
    assert main(["embed", str(run), str(odd_images), "--out", str(tmp_path / "f.npy"), "--batch-size", "1"]) == 1
    assert "embed" in stderr.getvalue() and "img" in stderr.getvalue()
    assert "img" not in capsys.readouterr().out


def test_a_mistyped_checkpoint_is_an_error_not_the_shipped_model(tmp_path, capsys):
    image = tmp_path / "ship.png"
    Image.new("RGB", (32, 32), (10, 20, 200)).save(image)
    assert main(["predict", str(tmp_path / "runs" / "nanoo"), str(image)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path / 'runs' / 'nanoo'} does not exist" in err
    assert main(["predict", str(image)]) == 0  # no checkpoint at all: the shipped model answers
    assert "ship.png" in capsys.readouterr().out
