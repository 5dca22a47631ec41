"""The training loop: build -> loop over epochs (train_one_epoch) -> evaluate -> save.

    result = vitlab.train(vitlab.train_preset("nano", data="cifar10-jpeg-train.tar.gz"))
    result.run_dir / "best.safetensors"

The recipe: AdamW (or Muon for the blocks' matrices) with warmup and a cosine or linear decay,
label smoothing, gradient clipping, a weight EMA (vitlab.optim); a length fitted to a time budget
while it trains (vitlab.pacing, with vitlab.budget's arithmetic); the run's state in vitlab.job
(Job, Progress); optionally a half-size start and a CNN teacher's labels (vitlab.teacher); bf16
autocast where the hardware has it (vitlab.precision); DDP under torchrun (vitlab.runtime); a run
directory with everything needed to reproduce the run (vitlab.rundir).

Determinism: the loader's order and augmentation are a pure function of (seed, epoch, rank, batch),
and the global RNG (stochastic depth, dropout) is re-seeded from (seed, epoch, rank) at the start of
every epoch and saved with every checkpoint, so a run resumed from `last` takes exactly the steps
the uninterrupted run would have.

Stopping: Ctrl-C or SIGTERM (status "interrupted") and TrainConfig.max_steps (status "stopped")
both finish the current optimizer step and save the state, so `--resume` continues exactly; when
the stop falls on an epoch's last step the epoch is first evaluated and checkpointed as usual.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint as ckpt
from . import rundir
from .budget import REFIT_EVERY, REFIT_FRACTION, REFIT_MIN_STEPS, format_duration
from .config import TrainConfig, resume_config, train_preset
from .data import BatchLoader, augment_preset, load_data
from .data.loader import derive_seed
from .evaluate import evaluate
from .teacher import load_teacher_labels, save_teacher, teach
from .tensorboard_log import TensorBoardLog, require_tensorboard
from .model import ViTConfig, VisionTransformer
from .job import Job, Progress, write_config
from .optim import WeightEMA, freeze_backbone, make_optimizer, set_learning_rate
from .pacing import calibrate, refit_budget, refit_mid_epoch
from .presets import preset_config
from .runtime import (
    Runtime, all_gather_object, all_reduce_sum, barrier, describe_environment, setup_runtime, shutdown,
)
from .weights import InitialWeights


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class AbortTraining(KeyboardInterrupt):
    """A second Ctrl-C: leave at once, writing nothing (the last checkpoints stay as they are)."""


@dataclass
class TrainResult:
    run_dir: Path
    status: str  # "completed" | "interrupted" (Ctrl-C, SIGTERM) | "stopped" (max_steps reached)
    epochs_completed: int
    best_val_top1: float | None
    metrics: list[dict] = field(default_factory=list)  # one dict per epoch, as in metrics.jsonl


def train(config: TrainConfig | dict | None = None, **overrides) -> TrainResult:
    """Trains a model as `config` says and returns where the run lives.

    config: a TrainConfig, a dict of its fields, or None (the nano recipe); overrides replace
    fields (vitlab.train(data="my_images/", epochs=3)). vitlab.train(resume="runs/x", **overrides)
    continues the run in runs/x with its saved config plus the overrides, exactly as
    `vitlab train --resume runs/x` does; a full config with `resume` set is used as given.
    Raises rundir.RunExists when `out` already holds a run (see TrainConfig.overwrite).
    """
    if config is None and overrides.get("resume"):
        config = resume_config(overrides.pop("resume"), **overrides)
    else:
        if config is None:
            config = train_preset("nano")
        elif isinstance(config, dict):
            config = TrainConfig.from_dict(config)
        if overrides:
            config = TrainConfig.from_dict({**config.to_dict(), **overrides})
    started = time.perf_counter()  # a --time-budget counts from here: data loading included
    # Rank 0 alone writes the run directory, so it alone holds it (locked until the run ends);
    # the other processes of a torchrun only check it.
    opened = None
    if int(os.environ.get("RANK", "0")) == 0:
        opened = rundir.open_run_dir(config.resume or config.out, new=not config.resume,
                                     overwrite=config.overwrite)
    elif not config.resume:
        rundir.check_out_dir(config.out, overwrite=config.overwrite)
    failed = True
    try:
        runtime = setup_runtime(config.device, config.precision)
        try:
            result = _run(config, runtime, started)
            barrier(runtime)  # rank 0 is still writing files; leaving before it does can tear down gloo
            failed = False
            return result
        finally:
            shutdown(runtime)
    finally:
        if opened is not None:
            opened.close(failed=failed)


# ---------------------------------------------------------------- pieces of the recipe
def classification_loss(logits: torch.Tensor, targets: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Cross-entropy against hard (B,) labels or soft (B, K) probabilities (Mixup/CutMix), with label
    smoothing either way, or against int64 (B, 2) [label, teacher's label] pairs (--distill: DeiT's
    hard distillation, half the loss on each, the teacher's half unsmoothed as in DeiT); in fp32
    even under autocast."""
    logits = logits.float()
    if targets.ndim == 2 and not targets.is_floating_point():
        return 0.5 * (F.cross_entropy(logits, targets[:, 0], label_smoothing=smoothing)
                      + F.cross_entropy(logits, targets[:, 1]))
    return F.cross_entropy(logits, targets, label_smoothing=smoothing)


def true_labels(targets: torch.Tensor) -> torch.Tensor:
    """The (B,) classes training accuracy is counted against: the labels, the larger share of a
    Mixup/CutMix pair, or the true one of a distillation pair."""
    if targets.ndim == 1:
        return targets
    return targets.argmax(dim=1) if targets.is_floating_point() else targets[:, 0]


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return derive_seed(seed, epoch, rank, 1)  # the trailing 1 keeps it apart from the loader's seeds


def balanced_subset_indices(labels: torch.Tensor, n: int) -> torch.Tensor:
    """The first n images taken round-robin over the classes (first of each class, then the second
    of each...), so a quick --subset run sees every class even when the data is sorted by class."""
    per_class_rank = torch.zeros_like(labels)
    for cls in labels.unique():
        members = labels == cls
        per_class_rank[members] = torch.arange(int(members.sum()))
    order = torch.argsort(per_class_rank * (int(labels.max()) + 1) + labels, stable=True)
    return order[:n]


class StopOnInterrupt:
    """Turns the first Ctrl-C (or SIGTERM, as schedulers send before preempting) into a request
    honoured between optimizer steps, so the saved state is never half-way through a step; a
    second one aborts at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, log):
        self.requested = False
        self.log = log
        self.previous: dict = {}

    def __enter__(self) -> "StopOnInterrupt":
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise AbortTraining
        self.requested = True
        self.log(f"\n{signal.Signals(signum).name}: saving after this step and stopping "
                 f"(press Ctrl-C again to abort without saving)")

    def anywhere(self, runtime: Runtime) -> bool:
        """Whether any process was asked to stop (every process must call this at the same point)."""
        flag = torch.tensor([float(self.requested)], device=runtime.device)
        return bool(all_reduce_sum(flag, runtime)[0] > 0)

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


# ---------------------------------------------------------------- build
def build(config: TrainConfig, runtime: Runtime, state: dict | None, started: float) -> Job:
    """Data, model (from --init weights or the state file when given), optimizer, EMA and loaders."""
    log = (lambda message: print(message, flush=True)) if runtime.is_main else (lambda message: None)
    run_dir = Path(config.resume or config.out)

    # the architecture: the model preset, or the --init checkpoint's own, plus overrides
    # (a resumed run never rereads --init: its state file holds the weights it has trained since)
    saved_config = None
    if state is not None:
        try:
            saved_config = ViTConfig.from_dict(state["model_config"])
        except (TypeError, ValueError) as error:
            raise ValueError(f"cannot resume {run_dir}: the model_config in {ckpt.STATE_FILE} is invalid "
                             f"({error}); start the run over with --overwrite") from None
    init = InitialWeights(config.init) if config.init and state is None else None
    wanted = preset_config(config.model, **config.model_overrides)
    if init is not None:
        wanted = init.model_config(wanted, config.model_overrides)
    elif config.init and state is not None:
        wanted = saved_config
    # every setting is checked before the data is decoded (minutes for a large dataset)
    augment = augment_preset(config.augment, **config.augment_overrides)
    if config.distill and runtime.distributed:
        raise ValueError("--distill trains its teacher in a single process: run it without torchrun")
    if config.distill and augment.mixes:
        raise ValueError("--distill's teacher labels cannot be mixed by Mixup/CutMix: use --augment light, or "
                         "--augment-arg mixup_alpha=0 --augment-arg cutmix_alpha=0")

    # data: the model's input size and channels decide how images are converted; rank 0 decodes
    # and fills the cache first, the other processes then read it
    if not runtime.is_main:
        barrier(runtime)
    data = load_data(config.data, val_size=config.val_size, split_seed=config.split_seed,
                     image_size=wanted.image_size, channels=wanted.in_channels)
    if runtime.is_main:
        barrier(runtime)
    train_set = data.train
    if train_set is None:
        raise ValueError(f"{config.data} has no training images, only {' and '.join(data.splits())} split(s): "
                         f"train on class folders or a train/ split (this data can be evaluated with vitlab eval)")
    if data.num_classes < 2:
        raise ValueError(f"{config.data} has a single class ({', '.join(data.class_names)}): a classifier needs "
                         f"at least two; put each class's images in a folder of its own")
    if config.subset is not None:
        train_set = train_set.subset(balanced_subset_indices(train_set.labels, config.subset))
    log(f"data: {data.source}: {len(train_set)} train, {len(data.val) if data.val else 0} val images, "
        f"{data.num_classes} classes")

    torch.manual_seed(config.seed)
    model = VisionTransformer.from_config({**wanted.to_dict(), "num_classes": data.num_classes})
    if init is not None:
        for note in init.load_into(model, partial=config.init_partial):
            log(note)
    if config.freeze == "backbone":
        log(f"froze the backbone: {freeze_backbone(model):,} trainable parameters (the head)")
    if state is not None and saved_config != model.config:
        raise ValueError(f"cannot resume {run_dir}: its model config differs from this run's "
                         f"({config.model} with {config.model_overrides}); resume with the original settings")
    model.to(runtime.device)
    if config.low_res:
        half = tuple(s // 2 for s in model.patch_embedding.image_size)
        if any(s % 2 or h % model.config.patch_size for s, h in zip(model.patch_embedding.image_size, half)):
            raise ValueError(f"--low-res needs half-size images made of whole patches: {model.config.image_size} "
                             f"/ 2 is not a multiple of patch {model.config.patch_size}; use --low-res 0")
    optimizer = make_optimizer(model, config.optimizer, config.lr, config.weight_decay, config.layer_decay,
                               fused=runtime.device.type == "cuda")
    ema = WeightEMA(model, config.ema_decay) if config.ema_decay else None
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            if ema is not None and state.get("ema") is not None:
                ema.load_state_dict(state["ema"])
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as error:
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise ValueError(f"cannot resume {run_dir}: {ckpt.STATE_FILE} does not fit this run's model and "
                             f"optimizer ({first}); start the run over with --overwrite") from None

    teacher_labels = None
    if config.distill and state is not None:  # a resumed run trains on the labels its teacher gave
        try:
            teacher_labels, teacher_report = load_teacher_labels(run_dir / rundir.TEACHER_FILE, train_set)
        except ValueError as error:
            raise ValueError(f"cannot resume {run_dir}: {error}; start the run over with --overwrite") from None
    if config.batch_size % runtime.world_size:
        raise ValueError(f"batch_size {config.batch_size} must divide evenly among "
                         f"{runtime.world_size} processes")
    per_process_batch = config.batch_size // runtime.world_size
    train_loader = BatchLoader(train_set, per_process_batch, mean=data.mean, std=data.std, train=True,
                               augment=augment, device=runtime.device, seed=config.seed,
                               rank=runtime.rank, world_size=runtime.world_size)
    val_loader = (BatchLoader(data.val, config.eval_batch_size, mean=data.mean, std=data.std, train=False,
                              device=runtime.device, rank=runtime.rank, world_size=runtime.world_size)
                  if data.val is not None and len(data.val) else None)
    if teacher_labels is not None:
        train_loader.set_teacher_labels(teacher_labels)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_set)} training images make no full batch of {config.batch_size}; "
                         f"lower --batch-size")

    train_model: nn.Module = model
    if runtime.distributed:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None)
    if config.compile:
        train_model = torch.compile(train_model)
    resolved = {"precision": runtime.precision, "model_config": model.config.to_dict(),
                "augment": augment.to_dict(), "mean": list(data.mean), "std": list(data.std),
                "train_images": len(train_set), "steps_per_epoch": steps_per_epoch}
    if teacher_labels is not None:
        resolved["teacher"] = teacher_report
    return Job(config, runtime, run_dir, data, train_set, model, train_model, optimizer, ema, train_loader,
               val_loader, resolved, steps_per_epoch,
               warmup_steps=max(1, round(config.warmup_epochs * steps_per_epoch)),
               sync_every=config.sync_every or (1 if runtime.device.type == "cpu" else 25), started=started,
               total_steps=((state or {}).get("total_steps") if config.time_budget
                            else steps_per_epoch * config.epochs))


# ---------------------------------------------------------------- the loop
def _run(config: TrainConfig, runtime: Runtime, started: float) -> TrainResult:
    """build -> for each epoch: train_one_epoch, evaluate, save -> curves."""
    if config.log == "tensorboard":
        require_tensorboard()  # a missing package fails now, not after the data has loaded
    state = ckpt.load_training_state(Path(config.resume) / ckpt.STATE_FILE) if config.resume else None
    job = build(config, runtime, state, started)
    run_dir, log = job.run_dir, job.log
    progress = Progress.from_state(state) if state is not None else Progress(total_steps=job.total_steps)
    if progress.total_steps is None and not config.time_budget:
        progress.total_steps = job.total_steps  # a state file from before total_steps was saved
    if state is not None:  # config.json is rewritten below: keep the length the run fixed
        job.resolved.update({k: v for k, v in (("total_steps", progress.total_steps),
                                               ("low_res_end", progress.low_res_end)) if v is not None})
    resume_rng = _saved_rng(state, runtime) if state is not None and progress.step_in_epoch else None

    metrics = job.metrics
    if runtime.is_main:
        if config.overwrite:
            rundir.clear(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        # A resumed run rebuilds metrics.jsonl from the rows its state file keeps (older state files
        # keep none: then from the file, a torn last line skipped), dropping the epochs it redoes;
        # a fresh run starts the file empty.
        if state is not None:
            kept = state.get("metrics")
            kept = kept if kept is not None else rundir.read_metrics(run_dir)
            metrics += [row for row in kept if row["epoch"] <= progress.epoch]
        rundir.rewrite_metrics(run_dir, metrics)
        rundir.write_metrics_csv(run_dir, metrics)
        if config.log == "tensorboard":
            job.tensorboard = TensorBoardLog(run_dir, resumed_step=progress.global_step if state else 0)
        write_config(job)
        rundir.write_environment(run_dir, describe_environment(runtime))
        if state is not None:
            where = f"epoch {progress.epoch + 1}" + (f", step {progress.step_in_epoch}"
                                                     if progress.step_in_epoch else "")
            log(f"resuming {run_dir} at {where} (global step {progress.global_step})")
        # --init with a vitlab checkpoint brings its own architecture: show the shape that runs
        arch = job.model.config
        name = f"--init {config.init}" if config.init else config.model
        log(f"model: {name} (dim {arch.dim}, depth {arch.depth}, {arch.heads} heads), "
            f"{job.model.num_parameters():,} parameters; "
            f"{'bf16 autocast' if runtime.bf16 else 'fp32'} on {runtime.device}"
            f"{f' x {runtime.world_size} processes' if runtime.distributed else ''}; run dir {run_dir}")

    if config.distill and state is None:
        train_the_teacher(job)
    elif config.distill and progress.total_steps is None:
        # stopped before its length was fixed: the budget is timed again from here, and the
        # teacher's seconds were spent out of it already
        job.started -= float(job.resolved["teacher"].get("seconds") or 0.0)

    status = "completed"
    with StopOnInterrupt(log) as stop:
        while not job.done(progress):
            reason = train_one_epoch(job, progress, stop, resume_rng)
            resume_rng = None
            if progress.step_in_epoch < job.steps_per_epoch and not job.done(progress):  # stopped mid-epoch
                save_checkpoint(job, progress)
                status = reason
                break
            reason = reason or ("interrupted" if stop.anywhere(runtime) else None)
            # --eval-every skips epochs, but never the last one nor one the run stops after
            checkpoint = (reason is not None or job.done(progress)
                          or (progress.epoch + 1) % job.config.eval_every == 0)
            row = finish_epoch(job, progress, checkpoint)
            if runtime.is_main:
                metrics.append(row)
                rundir.append_metrics(run_dir, row)
                rundir.write_metrics_csv(run_dir, metrics)
                if job.tensorboard is not None:
                    job.tensorboard.epoch(row)
                log(json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()}))
            if checkpoint and not reason:  # a Ctrl-C during the evaluation or save stops here, saved
                reason = "interrupted" if stop.anywhere(runtime) else None
            if reason and not job.done(progress):
                status = reason
                break

    if status != "completed":
        cause = f"max_steps {config.max_steps} reached" if status == "stopped" else "interrupted"
        where = (f"at epoch {progress.epoch + 1}, step {progress.step_in_epoch}" if progress.step_in_epoch
                 else f"after epoch {progress.epoch}")
        log(f"{cause} {where} (global step {progress.global_step}); state saved. Continue with: "
            f"vitlab train --resume {run_dir}")
    if runtime.is_main and metrics:
        rundir.write_curves(run_dir, metrics)
    if runtime.is_main and status == "completed" and metrics:
        write_run_card(run_dir, log)
    if job.tensorboard is not None:
        if status == "completed" and job.last_evaluation:
            tensorboard_figures(job, progress)
        job.tensorboard.close()
    if status == "completed":
        best = progress.best_val_top1
        log(f"done: best val top-1 {best:.4f} in {run_dir}" if best is not None else f"done: {run_dir}")
    return TrainResult(run_dir, status, progress.epoch, progress.best_val_top1, metrics)


def train_the_teacher(job: Job) -> None:
    """--distill, in a new run: trains the CNN teacher (vitlab.teacher) for its fraction of the
    budget, saves it with its labels in teacher.safetensors (where a resumed run reads them back)
    and gives the training loader the teacher's label for every training image."""
    config, data = job.config, job.data
    seconds = config.distill * config.time_budget
    job.log(f"distillation: training a CNN teacher for {format_duration(seconds)} ({config.distill:.0%} of the "
            f"budget)")
    labels, teacher, report = teach(job.train_set, data.val, mean=data.mean, std=data.std, seconds=seconds,
                                    seed=config.seed, device=job.runtime.device, bf16=job.runtime.bf16,
                                    batch_size=config.eval_batch_size, log=job.log, progress=job.runtime.is_main)
    job.log(report.summary())
    save_teacher(job.run_dir / rundir.TEACHER_FILE, teacher, labels, job.train_set, report)
    job.resolved["teacher"] = {**asdict(report), "widths": list(teacher.widths)}
    write_config(job)
    job.train_loader.set_teacher_labels(labels)


def write_run_card(run_dir: Path, log) -> None:
    """model-card.md for the run's best weights (vitlab.model_card). A card that cannot be
    written is a warning: the weights are saved, and the run succeeded."""
    import datetime

    from .files import atomic_write_text
    from .model_card import model_card
    from .runs import read_run
    from .version import __version__

    try:
        classifier = ckpt.load_checkpoint(run_dir)
        weights = ckpt.resolve_checkpoint(run_dir).name
        intro = (f"A Vision Transformer image classifier trained by vitlab {__version__}, card written "
                 f"{datetime.date.today().isoformat()} at the end of the run: the weights are {weights} in this "
                 f"run directory.")
        usage = ["```python", "import vitlab", "", f"classifier = vitlab.load({str(run_dir)!r})",
                 "classifier.predict([\"photo.jpg\"], top_k=3)  # [[(class, probability), ...]]", "```", "",
                 f"or `vitlab predict {run_dir} photo.jpg`; `vitlab export {run_dir} --format folder --out my-vit/` "
                 f"makes a folder to share (config.json, model.safetensors, this card as README.md).", ""]
        card = model_card(classifier, title=run_dir.name or str(run_dir), intro=intro, usage=usage,
                          location=str(run_dir), run=read_run(run_dir))
        atomic_write_text(run_dir / rundir.CARD_FILE, card)
    except Exception as error:  # noqa: BLE001 - the card is a convenience; the run's weights are saved
        log(f"warning: could not write {run_dir / rundir.CARD_FILE}: {error}")


def train_one_epoch(job: Job, progress: Progress, stop: StopOnInterrupt,
                    resume_rng: torch.Tensor | None = None) -> str | None:
    """Trains epoch `progress.epoch` from step `progress.step_in_epoch` on (past 0 when resuming
    mid-epoch, with `resume_rng` the saved RNG state), updating `progress` as it goes.

    Returns why it stopped early: "interrupted" (Ctrl-C or SIGTERM on any process), "stopped"
    (max_steps reached), or None. The epoch ran to its end when progress.step_in_epoch equals
    job.steps_per_epoch, stop or not. Raises TrainingDiverged on a non-finite loss, before the
    optimizer step that would apply it.
    """
    config, runtime, model = job.config, job.runtime, job.model
    job.train_loader.set_epoch(progress.epoch)
    torch.manual_seed(epoch_seed(config.seed, progress.epoch, runtime.rank))
    if resume_rng is not None:
        torch.set_rng_state(resume_rng)
    model.train()
    sums = torch.tensor([progress.partial[k] for k in ("loss", "correct", "seen")], dtype=torch.float64)
    window = torch.zeros(3, dtype=torch.float64, device=runtime.device)  # summed on the device between syncs
    start_time = time.perf_counter() - progress.partial["seconds"]
    bar = _progress_bar(job, progress)
    skip = progress.step_in_epoch
    paced = (progress.global_step, start_time + progress.partial["seconds"])  # (step, time) of the last re-fit
    try:
        for batch_number, (images, targets) in enumerate(job.train_loader):
            if batch_number < skip:
                continue  # resumed mid-epoch: the loader regenerates these batches identically
            if config.max_steps is not None and progress.global_step >= config.max_steps:
                return "stopped"  # resumed with a max_steps this run has already reached
            lr = job.lr(progress.global_step)
            set_learning_rate(job.optimizer, lr)
            low_res = progress.global_step < job.low_res_until(progress)
            if config.low_res and not low_res and progress.low_res_end is None:
                progress.low_res_end = progress.global_step  # the first full-size step: fixed from here
                job.resolved["low_res_end"] = progress.global_step
                if runtime.is_main:
                    write_config(job)
            full_size = images
            if low_res:
                # EfficientTrain's low-frequency start: a 2x2 average keeps what a half-size image
                # can show, and a quarter of the tokens makes the step ~4x cheaper
                images = F.avg_pool2d(images, 2)  # (B, C, H/2, W/2)
            with (torch.autocast(runtime.device.type, dtype=torch.bfloat16, enabled=runtime.bf16),
                  model.any_image_size() if low_res else contextlib.nullcontext()):
                logits = job.train_model(images)  # (B, K)
            loss = classification_loss(logits, targets, config.label_smoothing)
            job.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            step = batch_number + 1
            last = config.max_steps is not None and progress.global_step + 1 >= config.max_steps
            # Reading the loss on the host stalls a GPU until the step is done, so off the CPU the
            # NaN / Ctrl-C check runs every few steps, before the optimizer step: weights never take
            # a non-finite update unseen for long, and a diverged run stops without writing anything.
            sync = step % job.sync_every == 0 or step == job.steps_per_epoch or last
            if sync:
                # one reduction tells every process about a bad loss or a Ctrl-C anywhere
                # ... and whether a budget's re-fit is due by time on any of them (all must re-fit together)
                due = (job.calibration_start is not None and progress.total_steps is not None
                       and time.perf_counter() - paced[1] >= REFIT_FRACTION * (config.time_budget or 0))
                flags = all_reduce_sum(torch.stack([loss.detach().float(),
                                                    torch.tensor(float(stop.requested), device=loss.device),
                                                    torch.tensor(float(due), device=loss.device)]),
                                       runtime)
                if not torch.isfinite(flags[0]):
                    raise TrainingDiverged(f"loss became {loss.item()} at epoch {progress.epoch + 1}, step {step}; "
                                           f"{_what_was_kept(job)}. {DIVERGED_ADVICE}")
            if config.clip_grad:
                nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad)
            job.optimizer.step()
            if job.ema is not None:
                job.ema.update(model)
            progress.global_step, progress.step_in_epoch = progress.global_step + 1, step
            if progress.total_steps is None:
                calibrate(job, progress, full_size if low_res else None)
                paced = (progress.global_step, time.perf_counter())
            elif sync and job.calibration_start is not None and not job.done(progress):
                steps = progress.global_step - paced[0]
                if steps >= REFIT_MIN_STEPS and (steps >= REFIT_EVERY or flags[2] > 0):
                    now = time.perf_counter()
                    refit_mid_epoch(job, progress, steps, now - paced[1])
                    paced = (progress.global_step, now)
            budget_end = job.done(progress)
            hard = true_labels(targets)
            window += torch.stack([loss.detach().double() * len(hard),
                                   (logits.argmax(1) == hard).sum().double(),
                                   loss.new_full((), len(hard), dtype=torch.float64)])  # no host copy
            if sync or budget_end:
                sums += window.cpu()
                window.zero_()
                elapsed = time.perf_counter() - start_time
                progress.partial = {"loss": float(sums[0]), "correct": float(sums[1]), "seen": float(sums[2]),
                                    "seconds": elapsed}
                if job.tensorboard is not None and sync:  # the loss is on the host here anyway
                    job.tensorboard.step(progress.global_step, float(flags[0]) / runtime.world_size, lr,
                                         float(sums[2]) * runtime.world_size / max(elapsed, 1e-9))
                if bar is not None:
                    bar.update(step - bar.n)
                    speed = sums[2] * runtime.world_size / elapsed
                    bar.set_postfix_str(f"loss {sums[0] / sums[2]:.3f}  lr {lr:.2e}  {speed:.0f} img/s",
                                        refresh=False)
                if sync and (flags[1] > 0 or last):
                    return "interrupted" if flags[1] > 0 else "stopped"
            if budget_end:
                return None  # the run's last step: finish_epoch evaluates and saves this partial epoch
    finally:
        if bar is not None:
            bar.close()
    return None


def finish_epoch(job: Job, progress: Progress, checkpointed: bool = True) -> dict:
    """The end of an epoch: train metrics summed over processes and, when `checkpointed` (every
    --eval-every-th epoch, the run's last, one it stops after), evaluation of the model and its EMA
    and the checkpoints. Moves `progress` to the next epoch and returns the epoch's metrics row."""
    runtime, partial = job.runtime, progress.partial
    sums = all_reduce_sum(torch.tensor([partial["loss"], partial["correct"], partial["seen"]],
                                       dtype=torch.float64), runtime)
    row = {"epoch": progress.epoch + 1, "train_loss": float(sums[0] / sums[2]),
           "train_top1": float(sums[1] / sums[2]), "lr": job.lr(progress.global_step - 1)}
    scores = {}
    evaluation_start = time.perf_counter()
    if job.val_loader is not None and checkpointed:
        scores.update(validate(job, job.model, prefix=""))
        if job.ema is not None:
            scores.update(validate(job, job.ema.copy_of(job.model), prefix="ema_"))
    if job.calibration_start is not None and job.total_steps is not None and not job.done(progress):
        # a budget run that timed itself (not one resumed after that: it keeps the saved length)
        refit_budget(job, progress, time.perf_counter() - evaluation_start if checkpointed else None)
    row.update(scores)
    if job.config.low_res:
        row["half_size_steps"] = job.half_size_steps(progress, since=progress.global_step - progress.step_in_epoch)
    row.update(epoch_seconds=round(partial["seconds"], 2),
               train_img_per_s=round(float(sums[2]) / max(partial["seconds"], 1e-9), 1))
    # Nothing non-finite is saved as success: an epoch whose losses (training, validation, EMA)
    # are not finite stops the run before its checkpoint, as a NaN loss mid-epoch does.
    bad = [f"{key} {value}" for key, value in row.items() if key.endswith("loss") and not math.isfinite(value)]
    if bad:
        raise TrainingDiverged(f"{', '.join(bad)} at the end of epoch {row['epoch']}; {_what_was_kept(job)}. "
                               f"{DIVERGED_ADVICE}")
    progress.next_epoch()
    if not checkpointed:  # nothing saved: a resume goes back to the last checkpointed epoch
        row["best_val_top1"] = progress.best_val_top1
        return row
    save_start = time.perf_counter()
    save_checkpoint(job, progress, scores, row)
    job.save_s = time.perf_counter() - save_start
    return row


DIVERGED_ADVICE = "Lower --lr, keep --clip-grad on, or try --precision fp32"


def _what_was_kept(job: Job) -> str:
    """What a diverged run leaves behind, said truthfully: the checkpoint of the last finished epoch
    (or Ctrl-C), or nothing when none was saved yet."""
    if (job.run_dir / ckpt.STATE_FILE).is_file():
        return f"stopped, keeping the last good checkpoint in {job.run_dir} (nothing since was saved)"
    return f"stopped; no checkpoint had been saved yet in {job.run_dir}, so nothing was"


def check_finite_weights(job: Job) -> None:
    """Raises TrainingDiverged when a weight of the model or its EMA is NaN or infinite (a finite
    loss can still give an infinite gradient), so such weights are never written."""
    for name, tensors in (("model", job.model.state_dict()), ("EMA", job.ema.tensors if job.ema else {})):
        floats = [(key, t) for key, t in tensors.items() if t.is_floating_point()]
        if floats and not bool(torch.stack([torch.isfinite(t).all() for _, t in floats]).all()):
            first = next(key for key, t in floats if not bool(torch.isfinite(t).all()))
            raise TrainingDiverged(f"the {name}'s weights are no longer finite ({first}); {_what_was_kept(job)}. "
                                   f"{DIVERGED_ADVICE}")


def tensorboard_figures(job: Job, progress: Progress) -> None:
    """The end of a completed run under --log tensorboard: the last epoch's validation confusion
    matrix of the weights last.safetensors holds (the EMA's where they scored higher), written as
    confusion-val.png too, and 16 validation images with their predictions. Reuses the last
    evaluation, so it costs one forward pass of 16 images."""
    from .plots import plot_confusion_matrix

    ema = "ema_" in job.last_evaluation and (job.last_evaluation["ema_"].top1 > job.last_evaluation[""].top1)
    result = job.last_evaluation["ema_" if ema else ""]
    png = plot_confusion_matrix(result, job.run_dir / rundir.CONFUSION_FILE,
                                title=f"epoch {progress.epoch}{' (EMA weights)' if ema else ''}: validation top-1 "
                                      f"{result.top1:.2%} ({result.n} images)")
    model = job.ema.copy_of(job.model) if ema else job.model
    model.eval()
    index = torch.arange(min(16, len(job.data.val)))
    images, labels = job.val_loader.make_batch(index, batch_seed=0)
    with torch.no_grad(), torch.autocast(job.runtime.device.type, dtype=torch.bfloat16, enabled=job.runtime.bf16):
        predicted = model(images).argmax(1).tolist()
    job.tensorboard.final_images(png, job.data.val.images[index], predicted, labels.tolist(), job.data.class_names,
                                 progress.epoch)


def validate(job: Job, model: nn.Module, prefix: str) -> dict:
    """Loss, top-1 and top-5 of `model` on the validation split, summed over processes."""
    result = evaluate(model, job.val_loader, job.data.num_classes, bf16=job.runtime.bf16, runtime=job.runtime,
                      class_names=job.data.class_names)
    job.last_evaluation[prefix] = result
    return {f"{prefix}val_loss": result.loss, f"{prefix}val_top1": result.top1,
            f"{prefix}val_top5": result.top5}


def save_checkpoint(job: Job, progress: Progress, scores: dict | None = None, row: dict | None = None) -> None:
    """At an epoch's end (scores given, progress at the next epoch's step 0): best.safetensors when
    the epoch improved on it, then last.safetensors, with the EMA's weights where they scored
    higher. Always: last.state.pt, everything resume needs, with every process's RNG state and
    the metrics rows so far (`row`, the finished epoch's, gets its best_val_top1 here).
    Every process calls it; only rank 0 writes. Non-finite weights raise TrainingDiverged first."""
    check_finite_weights(job)
    rng_states = all_gather_object(torch.get_rng_state(), job.runtime)
    end_of_epoch = scores is not None
    use_ema = bool(scores and job.ema is not None and scores.get("ema_val_top1") is not None
                   and scores["ema_val_top1"] > scores["val_top1"])
    score = (scores or {}).get("ema_val_top1" if use_ema else "val_top1")
    best = progress.best_val_top1
    improved = end_of_epoch and (best is None or score is None or score > best)
    if improved and score is not None:
        progress.best_val_top1 = score
    if row is not None:
        row["best_val_top1"] = progress.best_val_top1
    if not job.runtime.is_main:
        return
    weights = ckpt.weights_state_dict(job.model)
    chosen = {k: v.to("cpu") for k, v in job.ema.tensors.items()} if use_ema else weights
    metadata = {"data": {"source": str(job.config.data), "val_size": job.config.val_size,
                         "split_seed": job.config.split_seed},  # eval rebuilds the same validation split
                "epoch": progress.epoch, "weights": "ema" if use_ema else "model", "val_top1": score}
    saved = dict(class_names=job.data.class_names, mean=job.data.mean, std=job.data.std, state_dict=chosen,
                 extra=metadata)
    # order matters for a kill between writes: best, then last, then the state; a state file that
    # did not make it means the epoch is redone identically on resume. Mid-epoch weights are only
    # for resume, not for inference, so they go into the state file alone.
    if improved:
        ckpt.save_model(job.run_dir / "best.safetensors", job.model, **saved)
    if end_of_epoch:
        ckpt.save_model(job.run_dir / "last.safetensors", job.model, **saved)
    ckpt.save_training_state(job.run_dir / ckpt.STATE_FILE, {
        "format": ckpt.FORMAT, "epoch": progress.epoch, "step_in_epoch": progress.step_in_epoch,
        "global_step": progress.global_step, "best_val_top1": progress.best_val_top1,
        "total_steps": progress.total_steps, "low_res_end": progress.low_res_end,
        "partial_epoch": dict(progress.partial), "rng": {"torch": rng_states[0], "ranks": rng_states},
        "model": weights, "model_digest": ckpt.tensor_digest(weights),
        "model_config": job.model.config.to_dict(), "optimizer": job.optimizer.state_dict(),
        "ema": job.ema.state_dict() if job.ema is not None else None,
        # the rows of metrics.jsonl up to here: a resumed run rebuilds the file from them
        "metrics": job.metrics + ([row] if row is not None else []),
    })


def _saved_rng(state: dict, runtime: Runtime) -> torch.Tensor:
    """This process's RNG state from a state file (files from before per-rank states, or from
    another process count, hold rank 0's only)."""
    per_rank = state["rng"].get("ranks")
    if per_rank is not None and len(per_rank) == runtime.world_size:
        return per_rank[runtime.rank]
    return state["rng"]["torch"]


def _progress_bar(job: Job, progress: Progress):
    if not job.runtime.is_main:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=job.steps_per_epoch, initial=progress.step_in_epoch, unit="step",
                desc=f"epoch {progress.epoch + 1}/{job.epochs or '?'}", leave=False, dynamic_ncols=True,
                mininterval=1.0, file=sys.stderr)
