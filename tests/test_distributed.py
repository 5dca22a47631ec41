import json
import os
import subprocess
import sys

import pytest

import vitlab
from tests.image_fixtures import TINY_MODEL, make_image_folder


@pytest.mark.slow
def test_torchrun_two_cpu_processes_train_with_gloo_and_write_once(tmp_path):
    images = make_image_folder(tmp_path / "images")
    run = tmp_path / "run"
    config = tmp_path / "ddp.json"
    config.write_text(json.dumps(dict(data=str(images), model_overrides=TINY_MODEL, epochs=2, batch_size=30,
                                      val_size=30, lr=0.002, warmup_epochs=0.5, out=str(run), device="cpu")))
    env = dict(os.environ, OMP_NUM_THREADS="1", VITLAB_CACHE=str(tmp_path / "cache"))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "vitlab", "train", "--config", str(config)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    # rank 0 alone prints and writes: one line per epoch, one set of files, no leftovers
    epoch_lines = [line for line in done.stdout.splitlines() if line.startswith('{"epoch"')]
    assert [json.loads(line)["epoch"] for line in epoch_lines] == [1, 2]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    assert sorted(p.name for p in run.iterdir()) == sorted(
        ["best.safetensors", "config.json", "curves.png", "environment.json", "last.safetensors",
         "last.state.pt", "metrics.jsonl"])
    env_info = json.loads((run / "environment.json").read_text())
    assert env_info["world_size"] == 2
    resolved = json.loads((run / "config.json").read_text())["resolved"]
    assert resolved["steps_per_epoch"] == 3  # 90 images, 15 per process per step
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["val_top1"] > 0.6  # the full val split, counted across both processes
    assert vitlab.load(run).class_names == ["circle", "cross", "stripes"]
