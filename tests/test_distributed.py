import json
import os
import subprocess
import sys

import pytest
import torch

import vitlab
from vitlab import checkpoint as ckpt
from tests.image_fixtures import TINY_MODEL, make_image_folder


def _torchrun(*args, env):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "vitlab", "train", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)


@pytest.mark.slow
def test_torchrun_two_cpu_processes_train_with_gloo_write_once_and_resume_exactly(tmp_path):
    images = make_image_folder(tmp_path / "images")
    run = tmp_path / "run"
    config = tmp_path / "ddp.json"
    # drop_path draws from each process's own RNG, so an exact resume needs every rank's RNG state
    config.write_text(json.dumps(dict(data=str(images), model_overrides={**TINY_MODEL, "drop_path": 0.2},
                                      epochs=2, batch_size=30, val_size=30, lr=0.002, warmup_epochs=0.5,
                                      out=str(run), device="cpu", precision="fp32")))
    env = dict(os.environ, OMP_NUM_THREADS="1", VITLAB_CACHE=str(tmp_path / "cache"))
    done = _torchrun("--config", str(config), env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    # rank 0 alone prints and writes: one line per epoch, one set of files, no leftovers
    epoch_lines = [line for line in done.stdout.splitlines() if line.startswith('{"epoch"')]
    assert [json.loads(line)["epoch"] for line in epoch_lines] == [1, 2]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    assert sorted(p.name for p in run.iterdir()) == sorted(
        ["best.safetensors", "config.json", "curves.png", "environment.json", "last.safetensors",
         "last.state.pt", "metrics.csv", "metrics.jsonl", "model-card.md"])
    env_info = json.loads((run / "environment.json").read_text())
    assert env_info["world_size"] == 2
    resolved = json.loads((run / "config.json").read_text())["resolved"]
    assert resolved["steps_per_epoch"] == 3  # 90 images, 15 per process per step
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["val_top1"] > 0.6  # the full val split, counted across both processes
    assert vitlab.load(run).class_names == ["circle", "cross", "stripes"]

    # stopped mid-epoch (epoch 2, step 1) and resumed: the same weights as the uninterrupted run
    stopped = tmp_path / "stopped"
    done = _torchrun("--config", str(config), "--out", str(stopped), "--max-steps", "4", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "max_steps 4 reached at epoch 2, step 1" in done.stdout
    assert len(ckpt.load_training_state(stopped / ckpt.STATE_FILE)["rng"]["ranks"]) == 2
    done = _torchrun("--resume", str(stopped), env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    straight, resumed = (ckpt.load_training_state(d / ckpt.STATE_FILE) for d in (run, stopped))
    assert straight["global_step"] == resumed["global_step"] == 6
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name


@pytest.mark.slow
def test_torchrun_budget_run_refits_together_and_ends_on_one_step(tmp_path):
    """Under a time budget every process re-fits the run's length inside epochs (every 2% of the
    budget here, decided by all of them together) from the slowest one's figures: with Muon and a
    half-size start, two processes finish on the same step instead of hanging in a collective."""
    images = make_image_folder(tmp_path / "images")
    run = tmp_path / "run"
    config = tmp_path / "ddp.json"
    config.write_text(json.dumps(dict(data=str(images), model_overrides=TINY_MODEL, time_budget=10, batch_size=2,
                                      val_size=30, lr=0.002, warmup_epochs=0.5, optimizer="muon", low_res=0.5,
                                      out=str(run), device="cpu", precision="fp32")))
    env = dict(os.environ, OMP_NUM_THREADS="1", VITLAB_CACHE=str(tmp_path / "cache"))
    done = _torchrun("--config", str(config), env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    state = ckpt.load_training_state(run / ckpt.STATE_FILE)
    resolved = json.loads((run / "config.json").read_text())["resolved"]
    assert state["global_step"] == state["total_steps"] == resolved["total_steps"] > 45  # past one epoch
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["half_size_steps"] for r in rows) == state["low_res_end"] == resolved["low_res_end"] > 0
