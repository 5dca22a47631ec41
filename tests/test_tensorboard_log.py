"""Logs people already open: metrics.csv beside metrics.jsonl in every run, and TensorBoard event
files with --log tensorboard (scalars per step and per epoch, the confusion matrix and predictions
as images at the end)."""

import builtins
import csv
import json

import pytest

import vitlab
from vitlab.cli import main
from tests.image_fixtures import make_image_folder, tiny_config, train_tiny_run


def test_every_run_writes_metrics_csv_with_the_jsonl_rows(tmp_path, monkeypatch):
    monkeypatch.setenv("VITLAB_CACHE", str(tmp_path / "cache"))
    run = train_tiny_run(tmp_path, epochs=2)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    with open(run / "metrics.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) == 2
    assert list(table[0]) == list(rows[0])  # the same columns, in the same order
    for row, line in zip(rows, table):
        assert int(line["epoch"]) == row["epoch"]
        assert float(line["val_top1"]) == pytest.approx(row["val_top1"])
        assert float(line["train_loss"]) == pytest.approx(row["train_loss"])


def _events(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return events


def test_log_tensorboard_writes_step_and_epoch_scalars_and_the_final_images(tmp_path, monkeypatch):
    monkeypatch.setenv("VITLAB_CACHE", str(tmp_path / "cache"))
    data = make_image_folder(tmp_path / "images")
    result = vitlab.train(tiny_config(data, tmp_path / "run", epochs=2, log="tensorboard"))
    state = json.loads((tmp_path / "run" / "config.json").read_text())
    steps = 2 * state["resolved"]["steps_per_epoch"]
    events = _events(result.run_dir)
    tags = events.Tags()
    assert {"train/loss", "train/lr", "train/img_per_s", "epoch/val_top1", "epoch/ema_val_top1",
            "epoch/val_top5", "epoch/train_loss"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, steps + 1))  # every step on a CPU
    logged = [e.value for e in events.Scalars("epoch/val_top1")]
    assert logged == pytest.approx([row["val_top1"] for row in result.metrics])
    assert {"confusion matrix (validation)", "predictions (validation)"} <= set(tags["images"])
    assert (result.run_dir / "confusion-val.png").stat().st_size > 0


def test_a_missing_tensorboard_package_is_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard") or name.startswith("tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    assert main(["train", "--data", str(tmp_path / "not-loaded"), "--log", "tensorboard",
                 "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--log tensorboard needs the tensorboard package" in err
    assert not (tmp_path / "run").exists()  # nothing was started
