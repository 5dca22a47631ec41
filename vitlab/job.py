"""One training run's state: Job, what vitlab.train's build() made (data, model, optimizer, EMA,
loaders) with the schedule it implies, and Progress, where the run is (saved in every state file,
and where a resumed run starts). Also how a run's config.json is written, and how a length fixed
or re-fitted under a time budget is recorded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import rundir
from .budget import ema_decay_for, low_res_end
from .config import TrainConfig
from .data import BatchLoader, DataSplits, ImageSet
from .model import VisionTransformer
from .optim import WeightEMA, learning_rate
from .runtime import Runtime


@dataclass
class Progress:
    """Where a run is: saved in every state file, and where a resumed run starts."""

    epoch: int = 0  # the epoch being trained, from 0
    step_in_epoch: int = 0  # optimizer steps done in it
    global_step: int = 0
    best_val_top1: float | None = None
    # the epoch's running sums so far (loss * images, correct, images, seconds)
    partial: dict = field(default_factory=lambda: {"loss": 0.0, "correct": 0.0, "seen": 0.0, "seconds": 0.0})
    total_steps: int | None = None  # the run's length; fixed after calibration under a time budget
    low_res_end: int | None = None  # --low-res: the first full-size step, fixed once it is reached

    @classmethod
    def from_state(cls, state: dict) -> "Progress":
        return cls(state["epoch"], state["step_in_epoch"], state["global_step"], state["best_val_top1"],
                   dict(state["partial_epoch"]), state.get("total_steps"), state.get("low_res_end"))

    def next_epoch(self) -> None:
        self.epoch, self.step_in_epoch = self.epoch + 1, 0
        self.partial = {"loss": 0.0, "correct": 0.0, "seen": 0.0, "seconds": 0.0}


@dataclass
class Job:
    """Everything a run builds before its first step."""

    config: TrainConfig
    runtime: Runtime
    run_dir: Path
    data: DataSplits
    train_set: ImageSet
    model: VisionTransformer
    train_model: nn.Module  # the model, wrapped in DDP and/or torch.compile when asked
    optimizer: torch.optim.Optimizer
    ema: WeightEMA | None
    train_loader: BatchLoader
    val_loader: BatchLoader | None
    resolved: dict  # what was derived from the config, saved in config.json
    steps_per_epoch: int
    warmup_steps: int
    sync_every: int  # optimizer steps between host reads of the loss
    started: float  # time.perf_counter() when train() was called
    total_steps: int | None = None  # None until a time-budget run has measured this machine's speed
    calibration_start: tuple[int, float] | None = None  # (global step, time) where timing began
    calibration_end: int | None = None  # the step that fixes the length, once the first 20 are timed
    save_s: float = 0.0  # seconds the last checkpoint took (a budget counts one per evaluation)
    low_res_saving_s: float = 0.0  # --low-res under a budget: a full-size step's extra seconds, measured
    eval_s: float = 0.0  # under a budget: seconds of the last evaluation (estimated until one has run)
    end_s: float = 0.0  # under a budget: the expected seconds of each evaluation and its save
    metrics: list[dict] = field(default_factory=list)  # the finished epochs' rows (rank 0), kept in the state
    tensorboard: Any = None  # vitlab.tensorboard_log.TensorBoardLog with --log tensorboard (rank 0)
    last_evaluation: dict = field(default_factory=dict)  # "" / "ema_" -> the last epoch's EvalResult

    def lr(self, step: int) -> float:
        # before a budget run knows its length, the schedule is warmup, then the peak
        total = self.total_steps or 2**62
        warmup = self.warmup_steps
        if self.config.time_budget and self.total_steps is not None:
            warmup = min(warmup, max(1, self.total_steps // 5))  # a short budget: warmup <= a fifth
        return learning_rate(step, total, warmup, self.config.lr, self.config.min_lr, self.config.schedule)

    @property
    def epochs(self) -> int | None:
        return None if self.total_steps is None else math.ceil(self.total_steps / self.steps_per_epoch)

    def done(self, progress: "Progress") -> bool:
        return self.total_steps is not None and progress.global_step >= self.total_steps

    def half_size_steps(self, progress: "Progress", since: int) -> int:
        """How many of the steps from global step `since` to now trained at half size: all of them
        until the first full-size step has run (the boundary is fixed then), whatever a re-fit of
        the length has since made round(low_res * total) say."""
        if not self.config.low_res:
            return 0
        until = progress.global_step if progress.low_res_end is None else progress.low_res_end
        return max(0, min(until, progress.global_step) - since)

    def low_res_until(self, progress: "Progress") -> int:
        """--low-res: steps before this one train on half-size images. Before a budget run knows
        its length every step does; once the first full-size step is reached, the boundary is fixed
        (a later re-fit of the budget changes the length of the full-size part only)."""
        if not self.config.low_res:
            return 0
        if progress.low_res_end is not None:
            return progress.low_res_end
        return 2**62 if self.total_steps is None else low_res_end(self.total_steps, self.config.low_res)

    def log(self, message: str) -> None:
        if self.runtime.is_main:
            print(message, flush=True)


def write_config(job: Job) -> None:
    """config.json: the config as run (resume with it), plus what was derived from it ("resolved")."""
    rundir.write_config(job.run_dir, {**job.config.to_dict(), "resume": None, "overwrite": False,
                                      "out": str(job.run_dir), "resolved": job.resolved})


def record_length(job: Job, total_steps: int) -> None:
    """A budget run's length, fixed or re-fitted, sets the EMA's horizon (a tenth of the run at
    most) and goes into config.json's "resolved" at once. A GPU's first steps can run at half the
    later pace, and a first fit that short left the EMA averaging over a third of what it should."""
    if job.ema is not None:
        job.ema.decay = ema_decay_for(total_steps, job.config.ema_decay)
    job.resolved["ema_decay"] = job.ema.decay if job.ema is not None else None
    job.resolved["total_steps"] = total_steps
    if job.runtime.is_main:
        write_config(job)
