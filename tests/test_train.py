import importlib
import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

import vitlab
from vitlab import checkpoint as ckpt
from vitlab.cli import main
from vitlab.config import TrainConfig, resolve_config, resume_config, train_preset
from vitlab.rundir import RunExists
from vitlab.runs import read_run
from vitlab.train import (
    AbortTraining, StopOnInterrupt, TrainingDiverged, balanced_subset_indices, classification_loss,
)
from tests.image_fixtures import make_image_folder, tiny_config

# `vitlab.train` is the function (the package re-exports it); the module is reached through importlib
train_module = importlib.import_module("vitlab.train")


@pytest.fixture
def images(tmp_path, monkeypatch):
    monkeypatch.setenv("VITLAB_CACHE", str(tmp_path / "cache"))
    return make_image_folder(tmp_path / "images")


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """One uninterrupted 3-epoch fp32 run (9 steps), shared by the resume tests."""
    root = tmp_path_factory.mktemp("straight")
    data = make_image_folder(root / "images")
    return data, vitlab.train(tiny_config(data, root / "run", precision="fp32"))


def state_tensors(run_dir):
    state = ckpt.load_training_state(run_dir / ckpt.STATE_FILE)
    return state, {**state["model"], **{f"ema.{k}": v for k, v in state["ema"]["tensors"].items()}}


def assert_same_run(a, b):
    """Run directories a and b hold bit-identical training states and the same metrics."""
    state_a, tensors_a = state_tensors(a)
    state_b, tensors_b = state_tensors(b)
    assert state_a["global_step"] == state_b["global_step"]
    for name, tensor in tensors_a.items():
        assert torch.equal(tensor, tensors_b[name]), name
    for name, tensor in state_a["optimizer"]["state"].items():
        assert torch.equal(tensor["exp_avg"], state_b["optimizer"]["state"][name]["exp_avg"])
        assert torch.equal(tensor["exp_avg_sq"], state_b["optimizer"]["state"][name]["exp_avg_sq"])
    rows_a = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(line) for line in (b / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("val_loss") for r in rows_a] == [r.get("val_loss") for r in rows_b]
    assert [r["train_loss"] for r in rows_a] == pytest.approx([r["train_loss"] for r in rows_b], rel=1e-12)


def test_run_writes_config_metrics_curves_and_checkpoints_and_learns(straight):
    _, result = straight
    run = result.run_dir
    assert result.status == "completed" and result.epochs_completed == 3
    names = {p.name for p in run.iterdir()}
    assert {"config.json", "environment.json", "metrics.jsonl", "curves.png", "best.safetensors",
            "last.safetensors", "last.state.pt"} <= names
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3] and rows == result.metrics
    assert rows[-1]["val_top1"] >= 0.9 and rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert {"ema_val_top1", "lr", "train_img_per_s", "val_top5"} <= rows[0].keys()
    config = json.loads((run / "config.json").read_text())
    assert config["epochs"] == 3 and config["resolved"]["model_config"]["dim"] == 32
    assert config["resolved"]["train_images"] == 90 and config["resolved"]["precision"] == "fp32"
    assert config["resume"] is None and config["overwrite"] is False
    env = json.loads((run / "environment.json").read_text())
    assert env["torch"] == torch.__version__ and "git_commit" in env and env["world_size"] == 1
    assert env["processor"] and env["bf16_autocast"] is False
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    model = vitlab.load(run)
    assert model.class_names == ["circle", "cross", "stripes"]
    assert model.metadata["data"]["val_size"] == 30
    assert ckpt.read_metadata(run / "last.safetensors")["epoch"] == 3
    # the run's model card: its weights, data, recipe, machine and the figure they were saved with
    card = (run / "model-card.md").read_text()
    best = ckpt.read_metadata(run / "best.safetensors")
    assert card.startswith(f"# {run.name}\n") and "the weights are best.safetensors in this run directory" in card
    assert f"{best['val_top1']:.2%} (epoch {best['epoch']})" in card
    assert "3 classes: circle, cross, stripes" in card and "30 images held out" in card
    assert f"vitlab.load({str(run)!r})" in card and "## Limitations" in card
    assert f"Machine: {read_run(run).machine}" in card


def test_a_stopped_run_gets_its_model_card_only_when_it_completes(straight, tmp_path):
    data, _ = straight
    stopped = vitlab.train(tiny_config(data, tmp_path / "run", precision="fp32", max_steps=4))
    assert stopped.status == "stopped" and not (tmp_path / "run" / "model-card.md").exists()
    vitlab.train(resume=str(tmp_path / "run"))
    assert "## Validation" in (tmp_path / "run" / "model-card.md").read_text()


@pytest.mark.parametrize("max_steps", [4, 6, 8], ids=["mid-epoch", "at-an-epoch-end", "on-the-last-epoch"])
def test_stopped_then_resumed_run_ends_bit_identical(straight, tmp_path, capsys, max_steps):
    """max_steps stops exactly like Ctrl-C: 4 is epoch 2's first step, 6 its last (the epoch is
    evaluated and checkpointed, then the run stops), 8 the next-to-last step of the run."""
    data, uninterrupted = straight
    broken = vitlab.train(tiny_config(data, tmp_path / "run", precision="fp32", max_steps=max_steps))
    assert broken.status == "stopped"
    where = {4: "at epoch 2, step 1", 6: "after epoch 2", 8: "at epoch 3, step 2"}[max_steps]
    assert f"max_steps {max_steps} reached {where} (global step {max_steps})" in capsys.readouterr().out
    state = ckpt.load_training_state(tmp_path / "run" / ckpt.STATE_FILE)
    assert state["global_step"] == max_steps
    assert (state["epoch"], state["step_in_epoch"]) == {4: (1, 1), 6: (2, 0), 8: (2, 2)}[max_steps]
    assert broken.epochs_completed == state["epoch"]
    resumed = vitlab.train(resume=str(tmp_path / "run"))  # max_steps is not carried into the resumed run
    assert resumed.status == "completed" and resumed.epochs_completed == 3
    assert_same_run(uninterrupted.run_dir, resumed.run_dir)
    assert [r["epoch"] for r in resumed.metrics] == [1, 2, 3]


def test_evaluating_every_other_epoch_trains_the_same_and_resumes_bit_identical(straight, tmp_path, capsys):
    """--eval-every 2 on the 3-epoch run: epoch 2 and the last are evaluated and checkpointed, epoch
    1 is not; the training itself is the same, and a stopped and resumed run ends bit-identical,
    also when it stopped after an epoch that was not evaluated."""
    data, uninterrupted = straight
    every = vitlab.train(tiny_config(data, tmp_path / "every", precision="fp32", eval_every=2))
    assert [r.get("val_top1") is not None for r in every.metrics] == [False, True, True]
    assert every.metrics[0]["best_val_top1"] is None
    assert [r["train_loss"] for r in every.metrics] == [r["train_loss"] for r in uninterrupted.metrics]
    assert every.metrics[-1]["val_top1"] == uninterrupted.metrics[-1]["val_top1"]
    assert (tmp_path / "every" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "| 1 |" not in (tmp_path / "every" / "model-card.md").read_text()  # only evaluated epochs listed
    # stopped at the end of epoch 1, which --eval-every 2 would skip: a stop is evaluated and saved
    broken = vitlab.train(tiny_config(data, tmp_path / "run", precision="fp32", eval_every=2, max_steps=3))
    assert broken.status == "stopped" and broken.metrics[0]["val_top1"] is not None
    resumed = vitlab.train(resume=str(tmp_path / "run"))
    assert resumed.status == "completed" and [r["epoch"] for r in resumed.metrics] == [1, 2, 3]
    assert_same_run(uninterrupted.run_dir, resumed.run_dir)
    # --eval-every 3: only the last epoch is evaluated; stopped mid-epoch 2, after an epoch with no
    # scores, the resumed run keeps that epoch's row and still ends as the uninterrupted one
    third = vitlab.train(tiny_config(data, tmp_path / "third", precision="fp32", eval_every=3))
    assert [r.get("val_top1") is not None for r in third.metrics] == [False, False, True]
    stopped = vitlab.train(tiny_config(data, tmp_path / "stopped", precision="fp32", eval_every=3, max_steps=4))
    assert stopped.status == "stopped" and "val_top1" not in stopped.metrics[0]
    again = vitlab.train(resume=str(tmp_path / "stopped"))
    assert [sorted(r) for r in again.metrics] == [sorted(r) for r in third.metrics]  # the same columns
    assert_same_run(third.run_dir, again.run_dir)


def test_max_steps_on_the_last_step_completes_the_run(images, tmp_path):
    result = vitlab.train(tiny_config(images, tmp_path / "run", epochs=1, max_steps=3))
    assert result.status == "completed" and result.epochs_completed == 1


def test_resuming_past_max_steps_stops_at_once(straight, tmp_path):
    data, _ = straight
    vitlab.train(tiny_config(data, tmp_path / "run", max_steps=4))
    again = vitlab.train(resume=str(tmp_path / "run"), max_steps=2)
    assert again.status == "stopped"
    assert ckpt.load_training_state(tmp_path / "run" / ckpt.STATE_FILE)["global_step"] == 4


def test_library_and_cli_resume_agree(straight, tmp_path, capsys):
    """vitlab.train(resume=DIR, epochs=...) and `vitlab train --resume DIR --epochs ...` take the
    saved config plus the same overrides, and so end bit-identical."""
    data, _ = straight
    first = vitlab.train(tiny_config(data, tmp_path / "a", precision="fp32", epochs=1))
    shutil.copytree(first.run_dir, tmp_path / "b")
    library = vitlab.train(resume=str(tmp_path / "a"), epochs=2)
    assert main(["train", "--resume", str(tmp_path / "b"), "--epochs", "2"]) == 0
    assert "resuming" in capsys.readouterr().out
    assert library.status == "completed" and library.epochs_completed == 2
    assert_same_run(tmp_path / "a", tmp_path / "b")
    saved_a = json.loads((tmp_path / "a" / "config.json").read_text())
    saved_b = json.loads((tmp_path / "b" / "config.json").read_text())
    assert {**saved_a, "out": None} == {**saved_b, "out": None} and saved_a["epochs"] == 2


def test_resume_merges_model_overrides_and_drops_the_one_off_fields(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    saved = TrainConfig(model_overrides={"dim": 32, "depth": 2}, max_steps=5, out=str(run)).to_dict()
    (run / "config.json").write_text(json.dumps({**saved, "resolved": {"precision": "fp32"}}))
    config = resume_config(run, model_overrides={"drop_path": 0.1}, epochs=None)
    assert config.model_overrides == {"dim": 32, "depth": 2, "drop_path": 0.1}
    assert config.max_steps is None and config.resume == str(run) and config.epochs == 10
    with pytest.raises(FileNotFoundError, match="is not a run directory"):
        resume_config(tmp_path / "nowhere")


def test_nan_loss_stops_with_clear_message_and_keeps_last_good_checkpoint(images, tmp_path, monkeypatch):
    real_loss = train_module.classification_loss
    calls = []

    def poisoned(logits, targets, smoothing):
        calls.append(1)
        loss = real_loss(logits, targets, smoothing)
        return loss * math.nan if len(calls) > 4 else loss  # epoch 2, step 2

    monkeypatch.setattr(train_module, "classification_loss", poisoned)
    with pytest.raises(TrainingDiverged, match=r"loss became nan at epoch 2, step 2; .*last good checkpoint"):
        vitlab.train(tiny_config(images, tmp_path / "run"))
    state = ckpt.load_training_state(tmp_path / "run" / ckpt.STATE_FILE)
    assert state["epoch"] == 1 and state["step_in_epoch"] == 0
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert vitlab.load(tmp_path / "run").metadata["epoch"] == 1


def test_loss_is_cross_entropy_with_soft_targets_and_smoothing_as_before():
    """classification_loss (F.cross_entropy with probability targets) against the hand-written
    formula it replaced: the same loss and gradients to fp32 rounding, and fp32 under autocast."""
    torch.manual_seed(0)
    logits = (torch.randn(16, 7) * 3).requires_grad_()
    soft = torch.softmax(torch.randn(16, 7) * 2, dim=1)
    for smoothing in (0.0, 0.1, 0.3):
        new = classification_loss(logits, soft, smoothing)
        (new_grad,) = torch.autograd.grad(new, logits)
        targets = soft * (1 - smoothing) + smoothing / 7
        old = -(targets * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()
        (old_grad,) = torch.autograd.grad(old, logits)
        assert new.item() == pytest.approx(old.item(), rel=1e-6)
        assert torch.allclose(new_grad, old_grad, rtol=1e-5, atol=1e-8)
    hard = torch.randint(0, 7, (16,))
    expected = F.cross_entropy(logits, hard, label_smoothing=0.1)
    assert torch.equal(classification_loss(logits, hard, 0.1), expected)
    assert classification_loss(logits.bfloat16(), hard, 0.1).dtype == torch.float32


def test_balanced_subset_takes_every_class_round_robin():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2])  # sorted by class, as folders often are
    chosen = balanced_subset_indices(labels, 5)
    assert labels[chosen].tolist() == [0, 1, 2, 0, 1]
    assert chosen.tolist() == [0, 4, 6, 1, 5]


def test_finished_runs_are_kept_unfinished_ones_resumed_and_overwrite_starts_over(images, tmp_path):
    vitlab.train(tiny_config(images, tmp_path / "done", epochs=1))
    with pytest.raises(RunExists, match="already holds a completed run") as error:
        vitlab.train(tiny_config(images, tmp_path / "done", epochs=1))
    assert error.value.complete and "--overwrite" in str(error.value)
    vitlab.train(tiny_config(images, tmp_path / "half", epochs=2, max_steps=2))
    with pytest.raises(RunExists, match="already holds a run; continue it with --resume") as error:
        vitlab.train(tiny_config(images, tmp_path / "half", epochs=2))
    assert not error.value.complete
    (tmp_path / "done" / "notes.txt").write_text("mine")
    again = vitlab.train(tiny_config(images, tmp_path / "done", epochs=2, overwrite=True))
    assert again.status == "completed" and [r["epoch"] for r in again.metrics] == [1, 2]
    assert len((tmp_path / "done" / "metrics.jsonl").read_text().splitlines()) == 2
    assert (tmp_path / "done" / "notes.txt").read_text() == "mine"  # only the run's own files go
    with pytest.raises(ValueError, match="overwrite and resume contradict"):
        TrainConfig(resume=str(tmp_path / "done"), overwrite=True)


def test_config_precedence_preset_then_file_then_flags(tmp_path):
    (tmp_path / "c.yaml").write_text(
        "preset: tiny\nepochs: 7\nlr: 0.0005\nmodel_overrides: {drop_path: 0.2}\n")
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


@pytest.mark.parametrize("field, value, phrase", [
    ("lr", 0.0, "lr must be positive"),
    ("lr", math.inf, "lr must be a finite number"),
    ("lr", "1e-3", "lr must be a finite number"),  # YAML reads 1e-3 (no dot) as text
    ("min_lr", 0.01, r"min_lr must be in \[0, lr"),
    ("min_lr", -1e-5, r"min_lr must be in \[0, lr"),
    ("clip_grad", -1.0, "clip_grad must be positive, or 0 for off"),
    ("label_smoothing", 1.0, r"label_smoothing must be in \[0, 1\)"),
    ("weight_decay", -0.1, "weight_decay must be >= 0"),
    ("warmup_epochs", -1, "warmup_epochs must be >= 0"),
    ("warmup_epochs", math.nan, "warmup_epochs must be a finite number"),
    ("max_steps", 0, "max_steps must be a whole number >= 1"),
    ("epochs", 0, "epochs must be a whole number >= 1"),
    ("eval_every", 0, "eval_every must be a whole number >= 1"),
    ("ema_decay", 1.0, r"ema_decay must be in \(0, 1\)"),
    ("layer_decay", 0.0, r"layer_decay must be in \(0, 1\]"),
    ("precision", "fp16", "precision must be"),
    ("lr", 1e30, "lr must be at most 1"),  # finite garbage weights after one AdamW step
    ("min_lr", math.nan, "min_lr must be a finite number"),
    ("weight_decay", 1000.0, r"weight_decay times lr \(0.001\) must be below 1"),
    ("seed", -1, "seed must be a whole number >= 0"),
    ("model_overrides", [["dim", 64]], "model_overrides must be a mapping"),
    ("augment", None, "augment must be text"),
    ("compile", "yes", "compile must be true or false"),
])
def test_hyperparameters_are_checked_with_one_line_errors_naming_the_field(field, value, phrase):
    with pytest.raises(ValueError, match=phrase) as error:
        TrainConfig(**{field: value})
    assert "\n" not in str(error.value)


def test_every_config_field_is_a_flag_with_help(tmp_path, capsys):
    import dataclasses

    from vitlab.cli import build_parser
    from vitlab.cli.train import config_flags

    for f in dataclasses.fields(TrainConfig):
        assert f.metadata.get("help"), f"TrainConfig.{f.name} has no help text"
    parser = build_parser()
    args = parser.parse_args(["train", "--val-size", "0.1", "--clip-grad", "0", "--model-arg",
                              "drop_path=0.1", "--model-arg", "dim=64", "--image-size", "48",
                              "--channels", "1",
                              "--augment-arg", "mixup_alpha=0.2", "--compile", "--max-steps", "5",
                              "--overwrite"])
    flags = config_flags(args)
    assert flags["val_size"] == 0.1 and flags["clip_grad"] == 0.0 and flags["compile"] and flags["overwrite"]
    assert flags["model_overrides"] == {"drop_path": 0.1, "dim": 64, "image_size": 48, "in_channels": 1}
    assert flags["augment_overrides"] == {"mixup_alpha": 0.2} and flags["max_steps"] == 5
    assert flags["epochs"] is None and flags["resume"] is None  # not given: the recipe's value stays
    config = resolve_config(None, None, **flags)
    assert config.clip_grad is None and config.val_size == 0.1 and config.model_overrides["dim"] == 64
    for text, count in (("5000", 5000), ("0", 0), ("1", 1)):
        assert config_flags(parser.parse_args(["train", "--val-size", text]))["val_size"] == count
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--val-size", "2.5"])
    assert "a whole count of images or a fraction below 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--model-arg", "drop_path"])
    assert "expected KEY=VALUE" in capsys.readouterr().err


def test_cli_train_file_plus_flags_then_resume_then_again(images, tmp_path, capsys):
    (tmp_path / "tiny.yaml").write_text(
        f"data: {images}\nmodel_overrides: {{dim: 32, depth: 2, heads: 4, mlp_dim: 64, image_size: 16}}\n"
        "epochs: 5\nbatch_size: 30\nval_size: 30\nlr: 0.002\n")
    run = tmp_path / "run"
    command = ["train", "--config", str(tmp_path / "tiny.yaml"), "--epochs", "1", "--out", str(run)]
    assert main(command) == 0
    out = capsys.readouterr().out
    assert json.loads(out.splitlines()[-2])["epoch"] == 1
    assert json.loads((run / "config.json").read_text())["epochs"] == 1
    # the same command again: the run is complete, so it says so and succeeds (a chained eval runs)
    assert main(command) == 0
    assert "already holds a completed run" in capsys.readouterr().out
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 0
    assert "resuming" in capsys.readouterr().out
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    assert main(command + ["--overwrite"]) == 0
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "nowhere")]) == 2
    assert "is not a run directory" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--preset", "tiny"]) == 2
    assert "give changes as flags" in capsys.readouterr().err
    assert main(command[:-2] + ["--out", str(tmp_path / "short"), "--max-steps", "1"]) == 0
    assert "max_steps 1 reached at epoch 1, step 1" in capsys.readouterr().out
    assert main(["train", "--out", str(tmp_path / "x"), "--lr", "-1"]) == 2
    assert "lr must be positive" in capsys.readouterr().err


def test_stop_on_interrupt_turns_sigint_and_sigterm_into_a_request_and_a_second_one_aborts():
    import os
    import signal

    messages = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        before = signal.getsignal(signum)
        with StopOnInterrupt(messages.append) as stop:
            os.kill(os.getpid(), signum)
            assert stop.requested
            with pytest.raises(AbortTraining):
                os.kill(os.getpid(), signum)
        assert signal.getsignal(signum) is before
    assert "SIGTERM: saving after this step" in messages[-1]


@pytest.mark.slow
def test_small_vit_learns_cifar10_slice_well_above_chance(cifar_run):
    # conftest's cifar_run: patch 8 (17 tokens) keeps the real 32x32 images while making each step
    # ~4x cheaper than nano; 3 epochs of 4,000 images, scored on 2,000 held-out ones
    rows = [json.loads(line) for line in (cifar_run / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    assert max(row["val_top1"] for row in rows) > 0.25  # chance is 0.10; measured 0.287
    assert vitlab.load(cifar_run).metadata["data"]["val_size"] == 2000


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
    assert "interrupted" in out and "state saved. Continue with: vitlab train --resume" in out
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
