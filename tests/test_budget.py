"""--time-budget: the run's length comes from this machine's measured speed and the budget."""

import importlib
import json
import re

import pytest

import vitlab
from vitlab import checkpoint as ckpt
from vitlab.budget import ema_decay_for, evaluations, fit_total_steps, format_duration, parse_duration
from vitlab.config import TrainConfig
from vitlab.optim import learning_rate
from tests.image_fixtures import make_image_folder, tiny_config

from .conftest import fake_clock

budget_module = importlib.import_module("vitlab.budget")


@pytest.mark.parametrize("text, seconds", [("10m", 600), ("1h", 3600), ("150m", 9000), ("90s", 90),
                                           ("1h30m", 5400), ("2.5m", 150), ("10", 600), (10, 600)])
def test_durations_read_as_people_write_them(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["ten minutes", "10x", "0m", "-5m", "", "m"])
def test_unreadable_durations_say_how_to_write_one(text):
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_format_duration():
    assert [format_duration(s) for s in (45, 600, 5430)] == ["45s", "10m00s", "1h30m"]


def test_a_fit_never_oscillates_when_an_epochs_end_costs_more_than_its_steps():
    # 0.01 s per step, 11 steps per epoch, 1 s per evaluation + save: 8 s leave 7 epochs (77 steps
    # and 7 s of epoch ends = 7.77 s); a fixed-point iteration flipped between 0 and 800 steps here
    total = fit_total_steps(8.0 / (1 - 0.02), 0.0, 0, 0.01, 11, 1.0)
    assert total == 77


def test_fitted_run_spends_the_budget_on_steps_and_evaluations():
    budget, elapsed, done, step_s, per_epoch, eval_s = 600.0, 40.0, 25, 0.2, 351, 15.0
    total = fit_total_steps(budget, elapsed, done, step_s, per_epoch, eval_s)
    evaluations = -(-total // per_epoch)
    spent = elapsed + (total - done) * step_s + evaluations * eval_s
    assert budget * 0.95 < spent <= budget  # uses (nearly) all of it, never more
    # a slower machine gets fewer steps; evaluations that cost more leave fewer too
    assert fit_total_steps(budget, elapsed, done, 2 * step_s, per_epoch, eval_s) < total
    assert fit_total_steps(budget, elapsed, done, step_s, per_epoch, 4 * eval_s) < total
    # re-fitted after the first epoch: its evaluation is in the elapsed time, not counted again
    after_one = fit_total_steps(budget, 300.0, per_epoch, step_s, per_epoch, eval_s, evaluations_done=1)
    assert 300.0 + (after_one - per_epoch) * step_s + (-(-after_one // per_epoch) - 1) * eval_s <= budget
    assert after_one > fit_total_steps(budget, 300.0, per_epoch, step_s, per_epoch, eval_s)
    # a budget already spent still finishes the step in hand
    assert fit_total_steps(10.0, 40.0, done, step_s, per_epoch, eval_s) == done + 1


def test_evaluating_every_few_epochs_buys_steps_where_evaluations_are_dear():
    # epochs 3, 6 and the last one (7) are evaluated; a run of 6 epochs ends on an evaluated one
    assert [evaluations(e, 3) for e in (1, 2, 3, 6, 7)] == [1, 1, 1, 2, 3]
    assert [evaluations(e, 1) for e in (1, 7)] == [1, 7]
    # a GPU-like run: 0.01 s a step, 44 steps (0.44 s) an epoch, 0.15 s per evaluation and save
    budget, step_s, per_epoch, eval_s = 60.0 / (1 - 0.02), 0.01, 44, 0.15
    every = {n: fit_total_steps(budget, 0.0, 0, step_s, per_epoch, eval_s, eval_every=n) for n in (1, 4)}
    for n, total in every.items():
        spent = total * step_s + evaluations(-(-total // per_epoch), n) * eval_s
        assert 59.5 < spent <= 60.0  # all of the budget, never more
    assert every[4] / every[1] > 1.2  # a quarter of each epoch went to its evaluation
    # re-fitted after epoch 8 (two evaluations done, inside the elapsed time): counted once
    later = fit_total_steps(budget, 8 * 0.44 + 2 * eval_s, 8 * per_epoch, step_s, per_epoch, eval_s,
                            evaluations_done=2, eval_every=4)
    assert abs(later - every[4]) <= 1


def test_ema_horizon_shrinks_to_a_tenth_of_a_short_run():
    assert ema_decay_for(100_000, 0.998) == 0.998
    assert ema_decay_for(1000, 0.998) == pytest.approx(0.99)


def test_linear_schedule_reaches_the_floor_on_the_last_step():
    lrs = [learning_rate(s, 100, 10, 1.0, 0.0, "linear") for s in range(100)]
    assert lrs[9] == pytest.approx(1.0) and lrs[99] == 0.0
    assert lrs[10] == 1.0 and lrs[54] == pytest.approx(1.0 - 44 / 89)  # a straight line, steps 10 to 99
    cosine = [learning_rate(s, 100, 10, 1.0, 0.0) for s in range(100)]
    assert cosine[99] == pytest.approx(0.0, abs=1e-12) and cosine[54] == pytest.approx(0.5, abs=0.02)


def test_time_budget_in_config_files_and_flags():
    assert TrainConfig(time_budget="10m").time_budget == 600
    assert TrainConfig(time_budget=0).time_budget is None
    with pytest.raises(ValueError, match="duration"):
        TrainConfig(time_budget="soon")
    with pytest.raises(ValueError, match="schedule must be"):
        TrainConfig(schedule="step")


def test_budget_run_fits_its_length_to_the_measured_speed_and_resumes_on_that_schedule(
        tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VITLAB_CACHE", str(tmp_path / "cache"))
    data = make_image_folder(tmp_path / "images", per_class=40)
    fake_clock(monkeypatch, 0.05)
    config = tiny_config(data, tmp_path / "run", precision="fp32", epochs=1, time_budget=6.0, batch_size=8,
                         min_lr=0.0, schedule="linear", max_steps=30)
    result = vitlab.train(config)
    assert result.status == "stopped"  # max_steps 30 comes before the budget's end
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["resolved"]
    total = saved["total_steps"]
    assert total > 30 and total != config.epochs * saved["steps_per_epoch"]  # the budget decides, not epochs
    assert "steps/s measured" in capsys.readouterr().out
    state = ckpt.load_training_state(tmp_path / "run" / ckpt.STATE_FILE)
    assert state["total_steps"] == total

    # resumed on a "faster machine": the saved length holds, and the run ends on its last step
    fake_clock(monkeypatch, 0.001)
    resumed = vitlab.train(resume=str(tmp_path / "run"))
    assert resumed.status == "completed"
    final = ckpt.load_training_state(tmp_path / "run" / ckpt.STATE_FILE)
    assert final["global_step"] == total
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # linear decay ends at min_lr on the last step
    assert rows[-1]["val_top1"] is not None  # the last, partial epoch was evaluated


def test_a_budget_run_counts_each_epochs_checkpoint_and_ends_within_the_budget(tmp_path, monkeypatch):
    """On a fast machine an epoch's checkpoint can cost as much as its steps (a GPU trains an
    epoch of the lite model in 2 s): a run that projected only steps and evaluations overran."""
    monkeypatch.setenv("VITLAB_CACHE", str(tmp_path / "cache"))
    data = make_image_folder(tmp_path / "images", per_class=40)
    clock = fake_clock(monkeypatch, 0.01)
    train_module = importlib.import_module("vitlab.train")
    save = train_module.save_checkpoint

    def slow_save(*args, **kwargs):
        clock["t"] += 1.0  # a checkpoint costs a second of (fake) time
        return save(*args, **kwargs)

    monkeypatch.setattr(train_module, "save_checkpoint", slow_save)
    budget = 12.0
    result = vitlab.train(tiny_config(data, tmp_path / "run", precision="fp32", time_budget=budget, batch_size=8,
                                      warmup_epochs=0.2, ema_decay=None))
    assert result.status == "completed" and result.epochs_completed >= 3  # several epochs, several saves
    # the whole run, started at 0 (it overran by 20% when saves were not counted); the fake clock
    # also ticks for bookkeeping outside any timed window, worth a fraction of a percent here
    assert clock["t"] <= budget * 1.01


def test_a_budget_run_that_evaluates_every_few_epochs_trains_more_and_still_ends_in_time(tmp_path, monkeypatch):
    """--eval-every 3 under a budget where each evaluation and checkpoint costs a (fake) second:
    the saved seconds go into more epochs, and only epochs 3, 6, ... and the last are evaluated."""
    monkeypatch.setenv("VITLAB_CACHE", str(tmp_path / "cache"))
    data = make_image_folder(tmp_path / "images", per_class=40)
    train_module = importlib.import_module("vitlab.train")
    save = train_module.save_checkpoint
    epochs = {}
    for every in (1, 3):
        clock = fake_clock(monkeypatch, 0.01)

        def slow_save(*args, **kwargs):
            clock["t"] += 1.0
            return save(*args, **kwargs)

        monkeypatch.setattr(train_module, "save_checkpoint", slow_save)
        budget = 12.0
        result = vitlab.train(tiny_config(data, tmp_path / f"run{every}", precision="fp32", time_budget=budget,
                                          batch_size=8, warmup_epochs=0.2, ema_decay=None, eval_every=every))
        assert result.status == "completed" and clock["t"] <= budget * 1.01
        epochs[every] = result.epochs_completed
        evaluated = [row["epoch"] for row in result.metrics if row.get("val_top1") is not None]
        last = result.epochs_completed
        assert evaluated == sorted({e for e in range(1, last + 1) if e % every == 0} | {last})
        assert ckpt.read_metadata(tmp_path / f"run{every}" / "last.safetensors")["epoch"] == last
    assert epochs[3] > epochs[1]


def test_the_evaluation_estimate_times_a_warm_call_not_the_first(monkeypatch):
    """The first forward at the validation batch size picks kernels; timing that call made a GPU
    budget run plan a third of its steps until the first evaluated epoch corrected it."""
    import types

    import torch

    pacing = importlib.import_module("vitlab.pacing")
    clock = fake_clock(monkeypatch, 0.0)
    calls = []

    class Model(torch.nn.Module):
        def forward(self, x):
            calls.append(x.shape[0])
            clock["t"] += 5.0 if len(calls) == 1 else 0.1  # a cold first call, then warm ones
            return x

    batches = [(torch.zeros(50, 3, 8, 8), torch.zeros(50))] * 4  # a loader of 4 batches
    job = types.SimpleNamespace(val_loader=batches, model=Model(), ema=object(),
                                runtime=types.SimpleNamespace(device=torch.device("cpu"), bf16=False))
    # 4 batches, the model and its EMA: 8 warm calls of 0.1 s
    assert pacing.evaluation_seconds(job) == pytest.approx(0.8)
    assert len(calls) == 2


def test_timing_runs_to_the_end_of_warmup_within_a_quarter_of_the_budget():
    from vitlab.budget import calibration_end

    assert calibration_end(warmup_steps=176, step_s=0.9, budget_s=600) == 166  # a quarter of 10 min
    assert calibration_end(warmup_steps=176, step_s=0.1, budget_s=600) == 176  # the end of warmup
    assert calibration_end(warmup_steps=3, step_s=0.1, budget_s=600) == 25  # never under 20 timed steps


def test_a_run_too_short_for_its_warmup_still_ends_at_the_floor():
    assert learning_rate(1, 2, 1, 1.0, 0.0, "linear") == 0.0
    assert learning_rate(1, 2, 1, 1.0, 0.0) == pytest.approx(0.0, abs=1e-12)


def test_a_re_fitted_length_also_re_fits_the_ema_horizon(tmp_path, monkeypatch, capsys):
    """A machine that speeds up after the first fit (a GPU's first steps are slower) trains more
    steps than first planned: the EMA's horizon follows the length, not the first estimate."""
    monkeypatch.setenv("VITLAB_CACHE", str(tmp_path / "cache"))
    data = make_image_folder(tmp_path / "images", per_class=60)
    clock = {"t": 0.0}

    def tick():  # 0.04 s a call, then four times faster from t = 3 s on
        clock["t"] += 0.04 if clock["t"] < 3.0 else 0.01
        return clock["t"]

    monkeypatch.setattr(importlib.import_module("vitlab.train").time, "perf_counter", tick)
    result = vitlab.train(tiny_config(data, tmp_path / "run", precision="fp32", time_budget=12.0, batch_size=1,
                                      eval_batch_size=30, warmup_epochs=0.1, ema_decay=0.9999))
    assert result.status == "completed"
    first = int(re.search(r"-> ([\d,]+) steps", capsys.readouterr().out)[1].replace(",", ""))
    resolved = json.loads((tmp_path / "run" / "config.json").read_text())["resolved"]
    assert resolved["total_steps"] > 1.5 * first  # the faster pace bought more steps
    assert resolved["ema_decay"] == ema_decay_for(resolved["total_steps"], 0.9999) > ema_decay_for(first, 0.9999)
    state = ckpt.load_training_state(tmp_path / "run" / ckpt.STATE_FILE)
    assert state["ema"]["decay"] == resolved["ema_decay"]


def test_a_machine_that_slows_down_mid_epoch_still_ends_within_the_budget(tmp_path, monkeypatch):
    """An epoch on a 2-core CPU lasts minutes: a run that re-fitted its length only at epoch ends
    overran by 13% when another program took the cores in its last epoch (measured, AVX2 EPYC)."""
    monkeypatch.setenv("VITLAB_CACHE", str(tmp_path / "cache"))
    data = make_image_folder(tmp_path / "images", per_class=60)  # 150 training images: 150 steps an epoch
    clock = {"t": 0.0}

    def tick():  # 0.01 s a call, then four times slower from t = 6 s on
        clock["t"] += 0.01 if clock["t"] < 6.0 else 0.04
        return clock["t"]

    monkeypatch.setattr(importlib.import_module("vitlab.train").time, "perf_counter", tick)
    budget = 15.0
    result = vitlab.train(tiny_config(data, tmp_path / "run", precision="fp32", time_budget=budget, batch_size=1,
                                      eval_batch_size=30, warmup_epochs=0.1, ema_decay=None))
    assert result.status == "completed"
    # re-fitted only at epoch ends it ended at 1.2x the budget; now about one re-fit window late,
    # plus the last evaluation and save, which run 4x slower than when they were timed
    assert clock["t"] <= budget * 1.05
    assert result.epochs_completed >= 1
