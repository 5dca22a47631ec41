import json
import math

import pytest
import torch

import vitlab
from vitlab import checkpoint as ckpt
from vitlab import trainer
from vitlab.cli import main
from vitlab.config import TrainConfig, resolve_config, train_preset
from tests.image_fixtures import make_image_folder, tiny_config


@pytest.fixture
def images(tmp_path, monkeypatch):
    monkeypatch.setenv("VITLAB_CACHE", str(tmp_path / "cache"))
    return make_image_folder(tmp_path / "images")


def state_tensors(run_dir):
    state = ckpt.load_training_state(run_dir / ckpt.STATE_FILE)
    return state, {**state["model"], **{f"ema.{k}": v for k, v in state["ema"]["tensors"].items()}}


def test_run_writes_config_metrics_curves_and_checkpoints_and_learns(images, tmp_path):
    result = vitlab.train(tiny_config(images, tmp_path / "run"))
    run = result.run_dir
    assert result.status == "completed" and result.epochs_completed == 3
    names = {p.name for p in run.iterdir()}
    assert {"config.json", "environment.json", "metrics.jsonl", "curves.png", "best.safetensors",
            "last.safetensors", "last.state.pt"} <= names
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[-1]["val_top1"] >= 0.9 and rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert {"ema_val_top1", "lr", "train_img_per_s", "val_top5"} <= rows[0].keys()
    config = json.loads((run / "config.json").read_text())
    assert config["epochs"] == 3 and config["resolved"]["model_config"]["dim"] == 32
    assert config["resolved"]["train_images"] == 90 and config["resolved"]["precision"] in ("bf16", "fp32")
    env = json.loads((run / "environment.json").read_text())
    assert env["torch"] == torch.__version__ and "git_commit" in env and env["world_size"] == 1
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    model = vitlab.load(run)
    assert model.class_names == ["circle", "cross", "stripes"]
    assert model.metadata["data"]["val_size"] == 30


def test_schedule_warms_up_then_decays_to_the_floor():
    lrs = [trainer.learning_rate(s, 100, 10, 1.0, 0.01) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[100] == pytest.approx(0.01)


def test_optimizer_decays_weights_but_not_norms_biases_tokens(images, tmp_path, monkeypatch):
    seen = {}
    real = torch.optim.AdamW

    def spy(groups, **kwargs):
        seen["groups"] = groups
        return real(groups, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", spy)
    vitlab.train(tiny_config(images, tmp_path / "run", epochs=1))
    decayed = {n for g in seen["groups"] if g["weight_decay"] > 0 for n in g["names"]}
    plain = {n for g in seen["groups"] if g["weight_decay"] == 0 for n in g["names"]}
    assert {"cls_token", "pos_embedding", "head.bias", "head_norm.weight", "blocks.0.norm1.weight"} <= plain
    assert {"head.weight", "blocks.0.attention.qkv.weight"} <= decayed


@pytest.mark.parametrize("stop_at", [(1, 1), (1, 3)], ids=["mid-epoch", "end-of-epoch"])
def test_interrupted_then_resumed_run_ends_bit_identical(images, tmp_path, monkeypatch, stop_at):
    straight = vitlab.train(tiny_config(images, tmp_path / "straight", precision="fp32"))

    def ctrl_c(epoch, step):
        if (epoch, step) == stop_at:
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "on_step_end", ctrl_c)
    broken = vitlab.train(tiny_config(images, tmp_path / "resumed", precision="fp32"))
    assert broken.status == "interrupted"
    monkeypatch.undo()
    resumed = vitlab.train(tiny_config(images, tmp_path / "resumed", precision="fp32",
                                       resume=str(tmp_path / "resumed")))
    assert resumed.status == "completed"
    state_a, tensors_a = state_tensors(straight.run_dir)
    state_b, tensors_b = state_tensors(resumed.run_dir)
    assert state_a["global_step"] == state_b["global_step"] == 9
    for name, tensor in tensors_a.items():
        assert torch.equal(tensor, tensors_b[name]), name
    for name, tensor in state_a["optimizer"]["state"].items():
        assert torch.equal(tensor["exp_avg"], state_b["optimizer"]["state"][name]["exp_avg"])
    rows = [json.loads(line) for line in (resumed.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_loss"] for r in rows] == [r["val_loss"] for r in straight.metrics]


def test_nan_loss_stops_with_clear_message_and_keeps_last_good_checkpoint(images, tmp_path, monkeypatch):
    real_loss = trainer.soft_cross_entropy
    calls = []

    def poisoned(logits, targets, smoothing):
        calls.append(1)
        loss = real_loss(logits, targets, smoothing)
        return loss * math.nan if len(calls) > 4 else loss  # epoch 2, step 2

    monkeypatch.setattr(trainer, "soft_cross_entropy", poisoned)
    with pytest.raises(trainer.TrainingDiverged, match=r"loss became nan at epoch 2, step 2; .*last good checkpoint"):
        vitlab.train(tiny_config(images, tmp_path / "run"))
    state = ckpt.load_training_state(tmp_path / "run" / ckpt.STATE_FILE)
    assert state["epoch"] == 1 and state["step_in_epoch"] == 0
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert vitlab.load(tmp_path / "run").metadata["epoch"] == 1


def test_existing_run_is_not_overwritten(images, tmp_path):
    vitlab.train(tiny_config(images, tmp_path / "run", epochs=1))
    with pytest.raises(ValueError, match="already holds a run; continue it with --resume"):
        vitlab.train(tiny_config(images, tmp_path / "run", epochs=1))


def test_config_precedence_preset_then_file_then_flags(tmp_path):
    (tmp_path / "c.yaml").write_text("preset: tiny\nepochs: 7\nlr: 0.0005\nmodel_overrides: {drop_path: 0.2}\n")
    (tmp_path / "c.toml").write_text('epochs = 4\naugment = "none"\n')
    (tmp_path / "c.json").write_text('{"batch_size": 64}')
    config = resolve_config(None, tmp_path / "c.yaml", epochs=9)
    assert (config.model, config.epochs, config.lr, config.augment) == ("tiny", 9, 0.0005, "strong")
    assert config.model_overrides == {"drop_path": 0.2}
    assert resolve_config("small", tmp_path / "c.toml").epochs == 4
    assert resolve_config(None, tmp_path / "c.json").batch_size == 64
    assert resolve_config(None, None).model == "nano"
    (tmp_path / "bad.yaml").write_text("epoch: 3\n")
    with pytest.raises(ValueError, match="unknown training config keys: epoch"):
        resolve_config(None, tmp_path / "bad.yaml")
    with pytest.raises(ValueError, match="unknown training preset 'huge'"):
        train_preset("huge")
    assert TrainConfig(ema_decay=0, clip_grad=0).ema_decay is None


def test_cli_train_file_plus_flags_then_resume_extends_the_run(images, tmp_path, capsys, monkeypatch):
    (tmp_path / "tiny.yaml").write_text(
        f"data: {images}\nmodel_overrides: {{dim: 32, depth: 2, heads: 4, mlp_dim: 64, image_size: 16}}\n"
        "epochs: 5\nbatch_size: 30\nval_size: 30\nlr: 0.002\n")
    run = tmp_path / "run"
    assert main(["train", "--config", str(tmp_path / "tiny.yaml"), "--epochs", "1", "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert json.loads(out.splitlines()[-2])["epoch"] == 1
    assert json.loads((run / "config.json").read_text())["epochs"] == 1
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 0
    assert "resuming" in capsys.readouterr().out
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    assert main(["train", "--resume", str(tmp_path / "nowhere")]) == 2
    assert "is not a run directory" in capsys.readouterr().err


@pytest.mark.slow
def test_small_vit_learns_cifar10_slice_well_above_chance(cifar_jpeg_archive, tmp_path):
    # patch 8 (17 tokens) keeps the real 32x32 images while making each step ~4x cheaper than nano
    config = train_preset("nano", data=str(cifar_jpeg_archive), out=str(tmp_path / "run"), subset=4000,
                          val_size=1000, epochs=3, batch_size=64, lr=3e-3, warmup_epochs=0.3,
                          model_overrides=dict(dim=64, depth=3, heads=4, mlp_dim=128, patch_size=8))
    result = vitlab.train(config)
    assert result.epochs_completed == 3
    assert result.best_val_top1 > 0.25  # chance is 0.10; measured 0.30
    assert vitlab.load(result.run_dir).metadata["data"]["val_size"] == 1000


def test_real_ctrl_c_saves_and_exits_cleanly(images, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from tests.image_fixtures import TINY_MODEL

    config = tmp_path / "long.json"
    config.write_text(json.dumps(dict(data=str(images), model_overrides=TINY_MODEL, epochs=200, batch_size=30,
                                      val_size=30, out=str(tmp_path / "run"))))
    process = subprocess.Popen([sys.executable, "-m", "vitlab", "train", "--config", str(config)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, OMP_NUM_THREADS="1"))
    for line in process.stdout:
        if line.startswith('{"epoch": 2'):
            process.send_signal(signal.SIGINT)
            break
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, err[-2000:]
    assert "interrupted at epoch" in out and "vitlab train --resume" in out
    assert "Traceback" not in err
    state = ckpt.load_training_state(tmp_path / "run" / ckpt.STATE_FILE)
    assert state["epoch"] >= 2 and state["global_step"] == 3 * state["epoch"] + state["step_in_epoch"]


def test_syncing_the_host_every_few_steps_trains_identically(images, tmp_path):
    """The GPU path reads the loss every 25 steps instead of every step; on CPU it must give the
    same weights and the same epoch metrics as reading it every step."""
    every_step = vitlab.train(tiny_config(images, tmp_path / "a", epochs=2, sync_every=1))
    windowed = vitlab.train(tiny_config(images, tmp_path / "b", epochs=2, sync_every=2))
    a, b = vitlab.load(every_step.run_dir).model, vitlab.load(windowed.run_dir).model
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    for row_a, row_b in zip(every_step.metrics, windowed.metrics):
        assert row_a["train_loss"] == pytest.approx(row_b["train_loss"], rel=1e-9)
        assert row_a["val_top1"] == row_b["val_top1"]
