"""Fitting a run to its --time-budget while it trains (the arithmetic is vitlab.budget's).

calibrate() times the first optimizer steps and one validation batch and fixes the run's length;
refit_budget() (each epoch's end) and refit_mid_epoch() (every few steps) fit it again from the
recent pace, so a machine that speeds up or slows down still ends with the budget. Every process
calls them at the same points and they agree on the slowest one's figures.
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.nn.functional as F

from .budget import (CALIBRATION_MIN_STEPS, CALIBRATION_START, calibration_end, fit_total_steps, format_duration,
                     low_res_end)
from .job import Job, Progress, record_length
from .runtime import all_gather_object


def calibrate(job: Job, progress: Progress, full_size: torch.Tensor | None = None) -> None:
    """Under a time budget: times optimizer steps from CALIBRATION_START to the end of warmup
    (vitlab.budget.calibration_end) and one validation batch, then fixes the run's length
    (vitlab.budget.fit_total_steps) and the EMA's horizon. Every process calls it after every
    step until then; they agree on the slowest one's speed, so they stop at the same step.
    full_size: the step's batch at full size when it trained at half size (--low-res): what a
    full-size step costs more is then measured on it."""
    runtime, config = job.runtime, job.config
    if runtime.device.type == "cuda":
        torch.cuda.synchronize(runtime.device)
    now = time.perf_counter()
    if job.calibration_start is None:
        if progress.global_step >= CALIBRATION_START:
            job.calibration_start = (progress.global_step, now)
        return
    first_step, first_time = job.calibration_start
    timed = progress.global_step - first_step
    step_s = (now - first_time) / max(timed, 1)
    if job.calibration_end is None:
        if timed < CALIBRATION_MIN_STEPS:
            return
        # the slowest process sets the pace (all_reduce has no max on every backend: gather)
        step_s = max(all_gather_object(step_s, runtime))
        # the ViT's own share of the budget: a teacher (--distill) took its part before the first step
        job.calibration_end = calibration_end(job.warmup_steps, step_s, config.time_budget * (1 - config.distill))
    if progress.global_step < job.calibration_end:
        return
    evaluation = evaluation_seconds(job)
    saving = _low_res_saving(job, full_size) if full_size is not None else 0.0
    elapsed = time.perf_counter() - job.started  # the timed evaluation batch and passes included
    # every process fits from the same figures (the slowest's), so all stop at the same step
    step_s, evaluation, saving, elapsed = (max(values) for values in zip(*all_gather_object(
        (step_s, evaluation, saving, elapsed), runtime)))
    eval_s = evaluation + job.save_s  # each evaluation comes with a save
    # step_s timed half-size steps when --low-res is on: a full-size one costs `saving` more
    job.low_res_saving_s, job.eval_s, job.end_s = saving, evaluation, eval_s
    low_res = (config.low_res, step_s) if full_size is not None else None
    total = fit_total_steps(config.time_budget, elapsed, progress.global_step, step_s + saving,
                            job.steps_per_epoch, eval_s, low_res=low_res, eval_every=config.eval_every)
    job.total_steps = progress.total_steps = total
    if low_res is not None and low_res_end(total, config.low_res) <= progress.global_step:
        progress.low_res_end = progress.global_step  # the boundary passed while timing: full size from here
    job.resolved.update(seconds_per_step=round(step_s + saving, 5))
    if low_res is not None:
        job.resolved.update(seconds_per_half_size_step=round(step_s, 5), low_res_end=job.low_res_until(progress))
    record_length(job, total)  # sets the EMA's horizon too
    job.log(f"time budget {format_duration(config.time_budget)}: {1 / (step_s + saving):.1f} steps/s measured -> "
            f"{total:,} steps ({total / job.steps_per_epoch:.1f} epochs), {config.schedule} decay to "
            f"{config.min_lr:g} at the last step"
            + (f", EMA decay {job.ema.decay:.4f}" if job.ema is not None else "")
            + (f"; the first {job.low_res_until(progress):,} at half size ({1 / step_s:.1f} steps/s)"
               if low_res is not None else ""))


def _low_res_saving(job: Job, images: torch.Tensor) -> float:
    """Seconds a full-size step costs more than a half-size one (--low-res under a budget): forward
    and backward of the same batch at both sizes, timed three times each, the fastest kept (the
    optimizer step, clipping and EMA cost the same at both sizes). The random stream is restored
    and the gradients dropped, so the run goes on as if it had not been timed."""
    runtime, model = job.runtime, job.model

    def seconds(batch: torch.Tensor, half: bool) -> float:
        times = []
        for _ in range(3):
            if runtime.device.type == "cuda":
                torch.cuda.synchronize(runtime.device)
            start = time.perf_counter()
            with (torch.autocast(runtime.device.type, dtype=torch.bfloat16, enabled=runtime.bf16),
                  model.any_image_size() if half else contextlib.nullcontext()):
                logits = job.train_model(batch)
            logits.float().square().mean().backward()
            if runtime.device.type == "cuda":
                torch.cuda.synchronize(runtime.device)
            times.append(time.perf_counter() - start)
        return min(times)

    with torch.random.fork_rng(devices=[runtime.device] if runtime.device.type == "cuda" else []):
        saving = seconds(images, half=False) - seconds(F.avg_pool2d(images, 2), half=True)
    job.optimizer.zero_grad(set_to_none=True)
    return max(0.0, saving)


def refit_budget(job: Job, progress: Progress, eval_s: float | None) -> None:
    """Under a time budget, at the end of each epoch (evaluated, not yet saved; eval_s None when
    --eval-every skipped this one): this epoch's own pace (every step's share of batching, EMA
    updates and logging, which warmup's timing may not show), its evaluation's real cost and the
    last checkpoint's fix the run's length again, so the run still ends with the budget. On a fast
    machine an epoch's checkpoint can cost as much as its steps, so each evaluation is counted with
    one save, this epoch's save included."""
    evaluated, epochs = eval_s is not None, progress.epoch + 1
    if evaluated:
        job.eval_s = eval_s
    # the evaluations so far: every eval_every-th epoch, and this one when a stop made it evaluate
    done = epochs // job.config.eval_every + (1 if evaluated and epochs % job.config.eval_every else 0)
    # an epoch skipped by --eval-every still counts the last evaluation's and the last save's cost
    total, step_s = _fit_again(job, progress, progress.step_in_epoch, progress.partial["seconds"],
                               end_s=job.eval_s + job.save_s, evaluations_done=done,
                               pending_s=job.save_s if evaluated else 0.0)  # this epoch's save is to come
    if total != job.total_steps:
        job.log(f"time budget: {1 / step_s:.2f} steps/s this epoch -> {total:,} steps in all "
                f"(was {job.total_steps:,})")
        job.total_steps = progress.total_steps = total
        record_length(job, total)


def refit_mid_epoch(job: Job, progress: Progress, steps: int, seconds: float) -> None:
    """Under a time budget, every REFIT_EVERY steps or REFIT_FRACTION of the budget inside an epoch
    (at a host sync, at least REFIT_MIN_STEPS steps apart): the pace of those steps fixes the run's
    length again. An epoch on a 2-core CPU lasts minutes, and a machine that slows down
    in the last one (another program starts, the CPU throttles) would otherwise overrun."""
    total, _ = _fit_again(job, progress, steps, seconds, end_s=job.end_s,
                          evaluations_done=progress.epoch // job.config.eval_every)
    if total != job.total_steps:
        job.total_steps = progress.total_steps = total
        record_length(job, total)


def _fit_again(job: Job, progress: Progress, steps: int, seconds: float, end_s: float, evaluations_done: int,
               pending_s: float = 0.0) -> tuple[int, float]:
    """The run's length from the pace of the last `steps` steps (`seconds` of them), `end_s` per
    evaluation (with its save) and the time spent so far plus `pending_s`; every process gets the same answer from
    the slowest one's figures. Returns (total steps, seconds per full-size step); sets job.end_s."""
    # --low-res: the half-size steps among them were cheaper by the saving measured at calibration
    half_size = job.half_size_steps(progress, since=progress.global_step - steps)
    step_s = (seconds + half_size * job.low_res_saving_s) / max(steps, 1)  # a full-size step's
    elapsed = time.perf_counter() - job.started + pending_s
    step_s, end_s, elapsed = (max(values) for values in zip(*all_gather_object((step_s, end_s, elapsed),
                                                                               job.runtime)))
    job.end_s = end_s
    low_res = ((job.config.low_res, step_s - job.low_res_saving_s)
               if job.config.low_res and progress.low_res_end is None else None)
    total = fit_total_steps(job.config.time_budget, elapsed, progress.global_step, step_s, job.steps_per_epoch,
                            end_s, evaluations_done=evaluations_done, low_res=low_res,
                            eval_every=job.config.eval_every)
    return total, step_s


def evaluation_seconds(job: Job) -> float:
    """Seconds one end-of-epoch evaluation (the model, and its EMA) will take, from one timed batch."""
    if job.val_loader is None:
        return 0.0
    images, _ = next(iter(job.val_loader))
    model = job.model
    model.eval()
    with torch.no_grad(), torch.autocast(job.runtime.device.type, dtype=torch.bfloat16,
                                         enabled=job.runtime.bf16):
        # twice, the second timed: the first call at this batch size picks kernels (cuDNN,
        # oneDNN). On an H200 a cold call made the first fit count about 10 s per evaluation
        # where one took about 0.3 s, and plan a third of the steps the budget had room for.
        for _ in range(2):
            start = time.perf_counter()
            model(images)
            if job.runtime.device.type == "cuda":
                torch.cuda.synchronize(job.runtime.device)
            seconds = time.perf_counter() - start
    model.train()
    return seconds * len(job.val_loader) * (2 if job.ema is not None else 1)
