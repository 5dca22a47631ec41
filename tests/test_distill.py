"""Distillation from a CNN teacher (--distill): the teacher trains inside the time budget, labels
every training image once, the ViT learns half from each label and is saved as a plain ViT, and
a resumed run trains on exactly the same teacher labels."""

import importlib
import json

import pytest
import torch
import torch.nn.functional as F

from safetensors import safe_open
from safetensors.torch import load_file, save_file

import vitlab
from vitlab import VisionTransformer
from vitlab import checkpoint as ckpt
from vitlab import rundir
from vitlab.data import BatchLoader, ImageSet, augment_preset, load_data
from vitlab.teacher import TeacherCNN, label_images, teach, train_teacher
from tests.image_fixtures import make_image_folder, tiny_config

from .conftest import fake_clock

train_module = importlib.import_module("vitlab.train")


@pytest.fixture
def images(tmp_path, monkeypatch):
    monkeypatch.setenv("VITLAB_CACHE", str(tmp_path / "cache"))
    return make_image_folder(tmp_path / "images")


@pytest.fixture
def narrow_teacher(monkeypatch):
    """A teacher with a sixteenth of the default's convolution work per image: these tests check
    what a run does around its teacher, and the default's width learns in the test above."""
    monkeypatch.setattr("vitlab.teacher.WIDTHS", (8, 16, 32, 64))


def test_the_distillation_loss_is_half_on_the_label_and_half_on_the_teachers():
    torch.manual_seed(1)
    logits, labels, teacher = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1]), torch.tensor([0, 1, 3, 3, 2, 1])
    pair = torch.stack([labels, teacher], dim=1)
    # label smoothing on the true label's half only, as DeiT
    expected = 0.5 * (F.cross_entropy(logits, labels, label_smoothing=0.1) + F.cross_entropy(logits, teacher))
    assert torch.allclose(train_module.classification_loss(logits, pair, 0.1), expected)
    # without smoothing, a teacher that agrees everywhere is plain training
    same = torch.stack([labels, labels], dim=1)
    assert torch.allclose(train_module.classification_loss(logits, same, 0.0), F.cross_entropy(logits, labels))
    # training accuracy counts the true label, not the teacher's
    assert torch.equal(train_module.true_labels(pair), labels)


def _set(n=60, size=16, classes=3):
    torch.manual_seed(0)
    return ImageSet(torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8), torch.arange(n) % classes,
                    [f"c{i}" for i in range(classes)])


def test_the_loader_pairs_every_image_with_its_own_teacher_label():
    data = _set()
    loader = BatchLoader(data, 16, mean=(0.5,) * 3, std=(0.25,) * 3, train=True, augment=augment_preset("light"))
    loader.set_teacher_labels((data.labels + 1) % 3)  # a teacher that is always one class off
    batches = 0
    for _, targets in loader:
        assert targets.shape == (16, 2) and targets.dtype == torch.int64
        assert torch.equal(targets[:, 1], (targets[:, 0] + 1) % 3)
        batches += 1
    assert batches == len(loader) == 3


def test_teacher_labels_that_cannot_be_used_are_refused():
    data = _set()
    mixing = BatchLoader(data, 16, mean=(0.5,) * 3, std=(0.25,) * 3, train=True, augment=augment_preset("strong"))
    with pytest.raises(ValueError, match="cannot be mixed by Mixup/CutMix"):
        mixing.set_teacher_labels(data.labels)
    loader = BatchLoader(data, 16, mean=(0.5,) * 3, std=(0.25,) * 3, train=True)
    with pytest.raises(ValueError, match="do not fit 60 images"):
        loader.set_teacher_labels(data.labels[:50])


def test_the_teacher_learns_within_its_seconds_and_labels_every_image(images, monkeypatch):
    clock = fake_clock(monkeypatch, 0.01)  # every perf_counter call is 10 ms: the teacher's steps are paced
    data = load_data(str(images), val_size=30)
    labels, teacher, report = teach(data.train, data.val, mean=data.mean, std=data.std, seconds=0.4, seed=0,
                                    device=torch.device("cpu"))
    assert labels.shape == (len(data.train),) and labels.dtype == torch.int64
    assert isinstance(teacher, TeacherCNN) and not teacher.training
    assert 25 <= report.steps <= 50  # about 0.4 s of 10 ms steps
    assert clock["t"] < 0.8
    # the generated shapes are easy: a trained teacher labels them as the data does
    assert report.agreement > 0.9 and report.val_top1 > 0.9
    assert report.agreement == pytest.approx(float((labels == data.train.labels).float().mean()))
    assert torch.equal(labels, label_images(teacher, data.train, mean=data.mean, std=data.std,
                                            device=torch.device("cpu")))
    assert "validation top-1" in report.summary() and "agree with" in report.summary()


def test_the_teacher_trains_and_labels_under_bf16_autocast(images, narrow_teacher, monkeypatch):
    """What a CPU with native bf16 (or a GPU) runs under --precision auto; emulated, and slower,
    where the hardware has none, so this test runs the same path on either kind of machine."""
    fake_clock(monkeypatch, 0.01)
    data = load_data(str(images), val_size=30)
    labels, _, report = teach(data.train, data.val, mean=data.mean, std=data.std, seconds=0.15, seed=0,
                              device=torch.device("cpu"), bf16=True)
    assert labels.shape == (len(data.train),) and labels.dtype == torch.int64
    assert report.steps >= 10 and 0 <= labels.min() and labels.max() < 3


def test_the_teacher_leaves_time_for_labelling_the_images(images, narrow_teacher, monkeypatch):
    data = load_data(str(images), val_size=30)
    steps = {}
    for reserve in (0, 2700):  # forward passes over 2,700 images: a third of 30 steps of 90 images
        fake_clock(monkeypatch, 0.01)
        _, steps[reserve] = train_teacher(data.train, mean=data.mean, std=data.std, seconds=0.4, seed=0,
                                          device=torch.device("cpu"), reserve_images=reserve)
    assert 27 <= steps[2700] <= steps[0] - 8


def _distilled(images, out, **overrides):
    return tiny_config(images, out, precision="fp32", distill=0.25, time_budget=4.0, batch_size=10,
                       warmup_epochs=0.5, ema_decay=None, **overrides)


def test_a_distilled_run_saves_its_teacher_and_a_plain_vit_within_its_budget(images, narrow_teacher, tmp_path,
                                                                             monkeypatch):
    clock = fake_clock(monkeypatch, 0.01)
    result = vitlab.train(_distilled(images, tmp_path / "run"))
    assert result.status == "completed"
    assert clock["t"] <= 4.0 * 1.05  # the teacher's second came out of the budget
    teacher = json.loads((result.run_dir / "config.json").read_text())["resolved"]["teacher"]
    assert teacher["steps"] >= 10 and teacher["val_top1"] is not None and teacher["seconds"] <= 1.0 * 1.1
    tensors = load_file(result.run_dir / rundir.TEACHER_FILE)
    assert tensors["labels"].shape == tensors["true_labels"].shape == (90,)  # 3 x 40 images, 30 held out
    assert any(k.startswith("teacher.stem") for k in tensors)
    with safe_open(str(result.run_dir / rundir.TEACHER_FILE), "pt") as saved:
        assert json.loads(saved.metadata()["vitlab_teacher"])["widths"] == [8, 16, 32, 64]
    # what was trained and saved is the ordinary ViT of its config
    model = vitlab.load(result.run_dir).model
    assert type(model) is VisionTransformer
    assert model.state_dict().keys() == VisionTransformer.from_config(model.config).state_dict().keys()
    card = (result.run_dir / "model-card.md").read_text()
    assert "Distilled (`--distill 0.25`)" in card and f"{teacher['steps']:,} steps" in card
    # a run that starts over in the same directory without --distill leaves no stale teacher behind
    vitlab.train(tiny_config(images, tmp_path / "run", precision="fp32", epochs=1, overwrite=True))
    assert not (tmp_path / "run" / rundir.TEACHER_FILE).exists()


def test_a_distilled_run_resumes_bit_identical_on_the_saved_teacher_labels(images, narrow_teacher, tmp_path,
                                                                           monkeypatch):
    # the length stays as calibration fixed it (a resumed budget run keeps its saved length, while
    # an uninterrupted one may still re-fit it by a step): then both runs take the same steps
    monkeypatch.setattr(train_module, "refit_budget", lambda *a, **k: None)
    monkeypatch.setattr(train_module, "refit_mid_epoch", lambda *a, **k: None)
    fake_clock(monkeypatch, 0.01)
    straight = vitlab.train(_distilled(images, tmp_path / "straight"))
    fake_clock(monkeypatch, 0.01)  # the same clock from 0: the same teacher and length
    broken = vitlab.train(_distilled(images, tmp_path / "run", max_steps=30))
    assert broken.status == "stopped"
    assert ckpt.load_training_state(tmp_path / "run" / ckpt.STATE_FILE)["total_steps"] is not None  # fixed
    # a resumed run never retrains its teacher: it reads the labels back
    monkeypatch.setattr("vitlab.teacher.train_teacher", lambda *a, **k: pytest.fail("the teacher was retrained"))
    resumed = vitlab.train(resume=str(tmp_path / "run"))
    assert resumed.status == "completed"
    a = ckpt.load_training_state(straight.run_dir / ckpt.STATE_FILE)
    b = ckpt.load_training_state(resumed.run_dir / ckpt.STATE_FILE)
    assert a["global_step"] == b["global_step"] > 30
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    config = json.loads((resumed.run_dir / "config.json").read_text())
    assert config["resolved"]["teacher"]["steps"] >= 10  # still says how its teacher was trained


def test_a_run_whose_teacher_labels_are_gone_or_for_other_images_says_how_to_go_on(images, narrow_teacher, tmp_path,
                                                                                   monkeypatch):
    fake_clock(monkeypatch, 0.01)
    vitlab.train(_distilled(images, tmp_path / "run", max_steps=30))
    with pytest.raises(ValueError, match="cannot resume .*--subset, --val-size and --split-seed must stay"):
        vitlab.train(resume=str(tmp_path / "run"), subset=60)
    # the same count of images with the same labels in the same order, but other images
    with pytest.raises(ValueError, match="cannot resume .*labels other training images"):
        vitlab.train(resume=str(tmp_path / "run"), split_seed=1)
    with pytest.raises(ValueError, match="cannot resume .* with --distill 0.4: it was started with --distill 0.25"):
        vitlab.train(resume=str(tmp_path / "run"), distill=0.4)
    teacher_file = tmp_path / "run" / rundir.TEACHER_FILE
    tensors = load_file(teacher_file)
    with safe_open(str(teacher_file), "pt") as saved:
        metadata = saved.metadata()
    save_file({**tensors, "labels": tensors["labels"] + 3}, teacher_file, metadata=metadata)  # classes 3-5 of 3
    with pytest.raises(ValueError, match="holds no valid teacher labels for 3 classes"):
        vitlab.train(resume=str(tmp_path / "run"))
    teacher_file.write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="cannot resume .*cannot be read as the distillation teacher's labels.*"
                                         "--overwrite"):
        vitlab.train(resume=str(tmp_path / "run"))


@pytest.mark.parametrize("overrides, phrase", [
    (dict(distill=0.25), "distill needs --time-budget"),
    (dict(distill=0.6, time_budget=60.0), "distill must be in \\[0, 0.5\\]"),
    (dict(distill=-0.1, time_budget=60.0), "distill must be in \\[0, 0.5\\]"),
])
def test_bad_distillation_settings_are_named(overrides, phrase):
    from vitlab.config import TrainConfig

    with pytest.raises(ValueError, match=phrase):
        TrainConfig(**overrides)


def test_distillation_with_mixup_is_refused_before_the_teacher_trains(images, tmp_path, monkeypatch):
    monkeypatch.setattr("vitlab.teacher.train_teacher", lambda *a, **k: pytest.fail("the teacher trained"))
    with pytest.raises(ValueError, match="cannot be mixed by Mixup/CutMix.*--augment light"):
        vitlab.train(tiny_config(images, tmp_path / "run", distill=0.25, time_budget=60.0, augment="strong"))
