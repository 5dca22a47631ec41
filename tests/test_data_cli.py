"""`vitlab data inspect`: the report a person reads before training, and the sample grid."""

from __future__ import annotations

from PIL import Image

from tests.data_fixtures import folder_files, png_bytes, solid, write_tar
from vitlab.cli import main


def test_inspect_prints_counts_size_and_stats_and_writes_grids(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("VITLAB_CACHE", str(tmp_path / "cache"))
    files = {**folder_files(per_class=10, prefix="train/"), **folder_files(per_class=2, prefix="test/")}
    files["train/cat/broken.png"] = b"not a png"
    source = write_tar(tmp_path / "pets.tar.gz", files)
    grid = tmp_path / "grid.png"
    assert main(["data", "inspect", str(source), "--val-size", "6", "--grid", str(grid), "--per-class", "4"]) == 0
    out = capsys.readouterr().out
    assert "images    36 in 3 classes, 8x8, 3 channel(s)" in out
    assert "skipped   1 unreadable: train/cat/broken.png" in out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    assert lines["train"][:2] == ["train", "24"] and lines["val"][:2] == ["val", "6"]
    assert lines["test"][:2] == ["test", "6"] and lines["test"][4] == f"{200 / 255:.4f}"  # blue mean
    assert lines["dog"] == ["dog", "8", "2", "2", "12"] and lines["total"][-1] == "36"
    with Image.open(grid) as image:
        assert image.size[0] > 200 and image.size[1] > 150

    augmented = tmp_path / "strong.png"
    assert main(["data", "inspect", str(source), "--grid", str(augmented), "--augment", "strong"]) == 0
    assert "(strong augmentation)" in capsys.readouterr().out and augmented.stat().st_size > 1000


def test_inspect_reports_bad_input_in_one_line(tmp_path, capsys):
    assert main(["data", "inspect", str(tmp_path / "missing.tar.gz"), "--cache-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("vitlab data: error: no dataset at")
    folder = tmp_path / "one"
    (folder / "cls").mkdir(parents=True)
    (folder / "cls" / "a.png").write_bytes(png_bytes(solid((1, 2, 3))))
    assert main(["data", "inspect", str(folder), "--augment", "light", "--cache-dir", str(tmp_path)]) == 2
    assert "add --grid FILE.png" in capsys.readouterr().err
    assert main(["data", "inspect", str(folder), "--grid", str(tmp_path / "g.png"), "--augment", "wild",
                 "--cache-dir", str(tmp_path)]) == 2
    assert "unknown augmentation preset 'wild'" in capsys.readouterr().err
