"""`vitlab runs`: one table (or CSV) comparing run directories, read defensively."""

import csv
import io
import json

import pytest

from vitlab.checkpoint import save_model
from vitlab.classifier import Classifier
from vitlab.cli import main
from vitlab.model import VisionTransformer
from vitlab.runs import read_run

from .conftest import tiny_vit_kwargs

CPU_ENV = {"device": "cpu", "cpu_capability": "AVX2", "cpu_count": 2, "gpus": [], "world_size": 1,
           "processor": "AMD EPYC", "torch": "2.14.1",
           "command": ["/venv/bin/vitlab", "train", "--preset", "budget", "--time-budget", "10m"]}
GPU_ENV = {"device": "cuda", "cpu_capability": "AVX512", "cpu_count": 16, "gpus": ["NVIDIA H200"], "world_size": 1,
           "command": ["vitlab", "train", "--preset", "lite", "--time-budget", "5m"]}


def _write_run(folder, *, config=None, environment=None, rows=(), raw_metrics=None):
    folder.mkdir(parents=True)
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    if environment is not None:
        (folder / "environment.json").write_text(json.dumps(environment))
    if raw_metrics is not None:
        (folder / "metrics.jsonl").write_text(raw_metrics)
    elif rows:
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _config(**values):
    model_config = {**tiny_vit_kwargs(), "norm_eps": 1e-6}
    base = {"model": "nano", "data": "cifar10.tar.gz", "epochs": 5, "time_budget": None,
            "resolved": {"model_config": model_config, "steps_per_epoch": 10}}
    base.update(values)
    return base


@pytest.fixture
def runs(tmp_path):
    """A finished budget run on a CPU, a fixed-epoch GPU run, and one still training."""
    root = tmp_path / "runs"
    _write_run(root / "budget", environment=CPU_ENV,
               config=_config(time_budget=600.0, resolved={**_config()["resolved"], "total_steps": 25}),
               rows=[{"epoch": 1, "val_top1": 0.40, "ema_val_top1": 0.42, "epoch_seconds": 200.0},
                     {"epoch": 2, "val_top1": 0.55, "ema_val_top1": 0.61, "epoch_seconds": 200.5},
                     {"epoch": 3, "val_top1": 0.58, "ema_val_top1": 0.60, "epoch_seconds": 100.0}])
    _write_run(root / "lite", environment=GPU_ENV, config=_config(model="lite", epochs=2),
               rows=[{"epoch": 1, "val_top1": 0.80, "epoch_seconds": 30.0},
                     {"epoch": 2, "val_top1": 0.8788, "epoch_seconds": 30.0}])
    # killed mid-append: the torn last line is skipped, the epochs before it count
    _write_run(root / "running", environment=CPU_ENV, config=_config(epochs=5),
               raw_metrics=json.dumps({"epoch": 1, "val_top1": 0.3, "epoch_seconds": 61.0}) + '\n{"epoch": 2, "val_to')
    return root


def test_table_compares_runs_column_by_column(runs, capsys):
    assert main(["runs", str(runs / "budget"), str(runs / "lite"), str(runs / "running")]) == 0
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert lines[0].split() == ["run", "recipe", "model", "params", "length", "epochs", "best", "val", "top-1",
                                "train", "time", "machine"]
    rows = {line.split()[0].rsplit("/", 1)[-1]: line for line in lines[1:]}
    assert set(rows) == {"budget", "lite", "running"}
    # the better of model and EMA, and the epoch that first reached it
    assert "budget" in rows["budget"] and "10m00s budget" in rows["budget"] and "61.00% (ep 2)" in rows["budget"]
    assert "8m20s" in rows["budget"] and "2-core AVX2" in rows["budget"]
    assert "lite" in rows["lite"] and "2 epochs" in rows["lite"] and "87.88% (ep 2)" in rows["lite"]
    assert rows["lite"].rstrip().endswith("NVIDIA H200")
    assert " 1/5 " in rows["running"] and "30.00% (ep 1)" in rows["running"]
    assert out.err == ""


def test_csv_has_one_row_per_run_with_raw_numbers(runs, capsys):
    assert main(["runs", str(runs), "--csv"]) == 0  # a folder of runs stands for the runs in it
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [row["run"].rsplit("/", 1)[-1] for row in table] == ["budget", "lite", "running"]
    budget = table[0]
    assert budget["recipe"] == "budget" and budget["model"] == "nano"
    assert float(budget["time_budget_s"]) == 600 and budget["epochs_planned"] == "3" and budget["epochs_done"] == "3"
    assert float(budget["best_val_top1"]) == pytest.approx(0.61) and budget["best_epoch"] == "2"
    assert float(budget["train_seconds"]) == pytest.approx(500.5)
    assert int(budget["parameters"]) > 0 and budget["machine"] == "2-core AVX2"
    assert table[1]["time_budget_s"] == "" and table[1]["epochs_planned"] == "2"
    assert table[2]["epochs_done"] == "1" and table[2]["notes"] == ""


def test_foreign_and_half_written_folders_are_notes_not_tracebacks(runs, tmp_path, capsys):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"jpeg")
    _write_run(tmp_path / "broken", config=None, environment=None, rows=[{"epoch": 1, "val_top1": 0.5}])
    (tmp_path / "broken" / "config.json").write_text('{"model": "nano", "epo')  # cut short
    (tmp_path / "notes.txt").write_text("hello")
    assert main(["runs", str(runs / "lite"), str(tmp_path / "photos"), str(tmp_path / "broken"),
                 str(tmp_path / "notes.txt"), str(tmp_path / "missing")]) == 0
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert len(lines) == 3  # header, lite, broken
    broken = next(line for line in lines if "broken" in line)
    assert "50.00% (ep 1)" in broken and broken.split()[1:4] == ["-", "-", "-"]
    err = out.err.splitlines()
    assert any("skipped" in e and "photos: not a vitlab run directory" in e for e in err)
    assert any("notes.txt: not a directory" in e for e in err)
    assert any("missing: not a directory" in e for e in err)
    assert any("broken: config.json unreadable (not valid JSON)" in e for e in err)
    assert all("Traceback" not in e for e in err)


def test_nothing_to_compare_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["runs", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "is a vitlab run directory" in err and err.strip().splitlines()[-1].startswith("vitlab runs: error:")


def test_a_run_with_only_a_checkpoint_shows_its_recorded_top1(tmp_path):
    model = VisionTransformer(**tiny_vit_kwargs())
    save_model(tmp_path / "run" / "best.safetensors", Classifier(model), extra={"val_top1": 0.75, "epoch": 4})
    summary = read_run(tmp_path / "run")
    assert summary.best_val_top1 == 0.75 and summary.best_epoch == 4
    assert summary.cells()[1:3] == ["-", "-"]


def test_recipe_of_a_resumed_run_comes_from_its_config(tmp_path):
    from vitlab.config import TRAIN_PRESETS

    resumed = {**CPU_ENV, "command": ["vitlab", "train", "--resume", "runs/x"]}
    config = {**TRAIN_PRESETS["lite"], "resolved": {}, "epochs": 600}
    _write_run(tmp_path / "x", config=config, environment=resumed)
    assert read_run(tmp_path / "x").recipe == "lite"


@pytest.mark.slow
def test_runs_reads_what_vitlab_train_writes(tmp_path, capsys):
    from tests.image_fixtures import train_tiny_run

    run = train_tiny_run(tmp_path)
    capsys.readouterr()
    assert main(["runs", str(run)]) == 0
    row = capsys.readouterr().out.splitlines()[1].split()
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    best = max(max(r["val_top1"], r["ema_val_top1"]) for r in metrics)
    # vitlab.train called from Python records pytest's command line and a config no preset matches
    assert row[1:3] == ["-", "nano"]
    assert "3 epochs" in " ".join(row) and f"{best:.2%}" in " ".join(row)
