import json

import pytest
import torch

from vitlab import checkpoint as ckpt
from vitlab import rundir
from vitlab.runtime import Runtime, describe_environment


def _fake_run(run_dir, epochs_planned, epochs_done):
    run_dir.mkdir(parents=True, exist_ok=True)
    rundir.write_config(run_dir, {"epochs": epochs_planned})
    for epoch in range(1, epochs_done + 1):
        rundir.append_metrics(run_dir, {"epoch": epoch, "train_loss": 1.0 / epoch, "train_top1": 0.5,
                                        "best_val_top1": 0.5 + epoch / 10})
    (run_dir / ckpt.STATE_FILE).write_bytes(b"state")


def test_an_empty_or_stateless_directory_is_free(tmp_path):
    assert rundir.check_out_dir(tmp_path / "new") == tmp_path / "new"
    (tmp_path / "crashed").mkdir()
    rundir.write_config(tmp_path / "crashed", {"epochs": 3})  # died before its first checkpoint
    assert rundir.check_out_dir(tmp_path / "crashed") == tmp_path / "crashed"


def test_a_finished_run_and_an_unfinished_one_are_told_apart(tmp_path):
    _fake_run(tmp_path / "done", 2, 2)
    phrase = r"already holds a completed run \(2 epochs, best val top-1 0.7000\)"
    with pytest.raises(rundir.RunExists, match=phrase) as error:
        rundir.check_out_dir(tmp_path / "done")
    assert error.value.complete and "--overwrite" in str(error.value)
    _fake_run(tmp_path / "half", 3, 1)
    with pytest.raises(rundir.RunExists, match="continue it with --resume") as error:
        rundir.check_out_dir(tmp_path / "half")
    assert not error.value.complete
    assert rundir.check_out_dir(tmp_path / "half", overwrite=True) == tmp_path / "half"


def test_clear_removes_only_the_run_files(tmp_path):
    _fake_run(tmp_path / "run", 2, 2)
    (tmp_path / "run" / "README.txt").write_text("keep me")
    rundir.clear(tmp_path / "run")
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["README.txt"]


def test_metrics_append_read_and_rewrite(tmp_path):
    assert rundir.read_metrics(tmp_path) == []
    for epoch in (1, 2, 3):
        rundir.append_metrics(tmp_path, {"epoch": epoch, "train_loss": 0.1})
    assert [r["epoch"] for r in rundir.read_metrics(tmp_path, up_to_epoch=2)] == [1, 2]
    rundir.rewrite_metrics(tmp_path, rundir.read_metrics(tmp_path, up_to_epoch=1))
    assert (tmp_path / rundir.METRICS_FILE).read_text() == '{"epoch": 1, "train_loss": 0.1}\n'


def test_read_config_names_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a run directory"):
        rundir.read_config(tmp_path)
    (tmp_path / rundir.CONFIG_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        rundir.read_config(tmp_path)


def test_environment_record(tmp_path):
    env = describe_environment(Runtime(torch.device("cpu"), "fp32"))
    rundir.write_environment(tmp_path, env)
    saved = json.loads((tmp_path / rundir.ENVIRONMENT_FILE).read_text())
    assert saved["torch"] == torch.__version__ and saved["world_size"] == 1 and saved["device"] == "cpu"
    assert saved["processor"] and saved["bf16_autocast"] is False and "vitlab" in saved


def test_a_torn_or_foreign_metrics_line_is_skipped(tmp_path):
    rundir.append_metrics(tmp_path, {"epoch": 1, "train_loss": 0.5})
    with open(tmp_path / rundir.METRICS_FILE, "a") as f:
        f.write('[1, 2]\n{"epoch": true}\n{"epoch": 2, "train_lo')  # not rows; then a killed append
    assert rundir.read_metrics(tmp_path) == [{"epoch": 1, "train_loss": 0.5}]


def test_open_run_dir_takes_a_crashed_run_but_not_someone_elses_folder(tmp_path):
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    rundir.write_config(crashed, {"epochs": 3, "resolved": {}})  # died before its first checkpoint
    (crashed / f".{ckpt.STATE_FILE}.k2j3.tmp").write_bytes(b"half")
    rundir.open_run_dir(crashed, new=True).close()
    assert [p.name for p in crashed.iterdir()] == [rundir.CONFIG_FILE]  # the stale temporary file is gone
    other = tmp_path / "other"
    other.mkdir()
    (other / rundir.CONFIG_FILE).write_text('{"epochs": 3}')  # another tool's config: no "resolved"
    with pytest.raises(rundir.NotARunDirectory, match="is not a vitlab run directory"):
        rundir.open_run_dir(other, new=True)
    with pytest.raises(rundir.NotARunDirectory, match="is a file"):
        rundir.open_run_dir(other / rundir.CONFIG_FILE, new=True)
    lock = rundir.open_run_dir(crashed, new=True)
    with pytest.raises(rundir.RunLocked, match="in use by another vitlab train"):
        rundir.open_run_dir(crashed, new=False)
    lock.close()
    rundir.open_run_dir(crashed, new=False).close()  # released with the first
