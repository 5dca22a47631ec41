import numpy as np
import pytest
import torch

import vitlab
from vitlab.cli import main
from vitlab.embed import embed_files


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from tests.image_fixtures import train_tiny_run

    return train_tiny_run(tmp_path_factory.mktemp("embed"), epochs=1)


def test_embed_files_returns_pre_logits_features_in_file_order(run_dir, tmp_path):
    classifier = vitlab.load(run_dir, precision="fp32")  # the head below runs in fp32 too
    files = sorted((run_dir.parent / "images" / "train" / "circle").glob("*.png"))[:3]
    (tmp_path / "bad.png").write_bytes(b"not an image")
    paths, features, problems = embed_files(classifier, [*map(str, files), str(tmp_path / "bad.png")])
    assert paths == [str(f) for f in files]
    assert features.shape == (3, 32) and features.dtype == np.float32
    assert problems and problems[0][0].endswith("bad.png")
    # the features are what the head classifies: head(features) gives predict()'s probabilities
    with torch.no_grad():
        probabilities = classifier.model.head(torch.from_numpy(features)).softmax(-1)
    np.testing.assert_allclose(probabilities.numpy(), classifier.probabilities(files).numpy(), atol=1e-5)


def test_cls_and_mean_pooling_differ(run_dir):
    classifier = vitlab.load(run_dir)
    files = sorted((run_dir.parent / "images" / "train" / "cross").glob("*.png"))[:2]
    cls = embed_files(classifier, files, pooling="cls")[1]
    mean = embed_files(classifier, files, pooling="mean")[1]
    assert cls.shape == mean.shape == (2, 32) and not np.allclose(cls, mean)


def test_embed_cli_writes_npy_and_row_order(run_dir, tmp_path, capsys):
    folder = run_dir.parent / "images" / "train" / "stripes"
    assert main(["embed", str(run_dir), str(folder), "--out", str(tmp_path / "f.npy")]) == 0
    features = np.load(tmp_path / "f.npy")
    rows = (tmp_path / "f.npy.rows.txt").read_text().split()
    assert features.shape == (len(list(folder.glob("*.png"))), 32) and len(rows) == features.shape[0]
    assert "features to" in capsys.readouterr().out
    assert main(["embed", str(run_dir), str(folder), "--out", str(tmp_path / "f.csv")]) == 2
    assert "must end in .npy" in capsys.readouterr().err


def test_embed_cli_precision_flag_gives_close_features(run_dir, tmp_path, capsys):
    folder = run_dir.parent / "images" / "train" / "circle"
    for precision in ("fp32", "bf16"):
        assert main(["embed", str(run_dir), str(folder), "--out", str(tmp_path / f"{precision}.npy"),
                     "--precision", precision]) == 0
    fp32, bf16 = np.load(tmp_path / "fp32.npy"), np.load(tmp_path / "bf16.npy")
    assert fp32.shape == bf16.shape and bf16.dtype == np.float32
    relative = np.linalg.norm(bf16 - fp32, axis=1) / np.linalg.norm(fp32, axis=1)
    assert relative.max() < 0.05 and not np.array_equal(bf16, fp32)
