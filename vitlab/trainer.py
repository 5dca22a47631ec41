"""The training loop: AdamW with warmup + cosine, label smoothing, clipping, EMA, bf16 autocast,
DDP under torchrun, exact resume, and a run directory with everything needed to reproduce it.

    result = vitlab.train(vitlab.train_preset("nano", data="cifar10-jpeg-train.tar.gz"))
    result.run_dir / "best.safetensors"

Determinism: the loader's order and augmentation are a pure function of (seed, epoch, rank, batch),
and the global RNG (stochastic depth, dropout) is re-seeded from (seed, epoch, rank) at the start of
every epoch and saved with every checkpoint, so a run resumed from `last` takes exactly the steps
the uninterrupted run would have.
"""

from __future__ import annotations

import json
import math
import os
import platform
import signal
import subprocess
import threading
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint as ckpt
from .files import atomic_write_text
from .inference import bf16_supported
from .config import TrainConfig

METRICS_FILE = "metrics.jsonl"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    run_dir: Path
    status: str  # "completed" | "interrupted"
    epochs_completed: int
    best_val_top1: float | None
    metrics: list[dict] = field(default_factory=list)  # one dict per epoch, as in metrics.jsonl


# ---------------------------------------------------------------- environment
@dataclass
class Runtime:
    """Where this process runs: device, precision and its place among torchrun's processes."""

    device: torch.device
    bf16: bool
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_precision(precision: str, device: torch.device) -> bool:
    """True for bf16 autocast."""
    if precision == "fp32":
        return False
    supported = bf16_supported(device)
    if precision == "bf16" and not supported:
        print(f"vitlab train: note: bf16 requested but {device.type} has no native bf16; it will be slow",
              file=sys.stderr)
        return True
    return supported if precision == "auto" else True


def setup_runtime(config: TrainConfig) -> Runtime:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if config.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(config.device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if world_size > 1 else (device.index or 0))
        torch.cuda.set_device(device)
    if world_size > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return Runtime(device, resolve_precision(config.precision, device), rank, world_size)


def describe_environment(runtime: Runtime) -> dict:
    import numpy
    import torchvision

    from . import __version__

    env = {
        "vitlab": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "torchvision": torchvision.__version__, "numpy": numpy.__version__,
        "platform": platform.platform(), "machine": platform.machine(), "processor": _cpu_name(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "device": str(runtime.device),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
        "cuda": torch.version.cuda, "bf16_autocast": runtime.bf16, "world_size": runtime.world_size,
        "command": sys.argv, "git_commit": _git_commit(),
    }
    return env


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("+dirty" if dirty else "")) or None


# ---------------------------------------------------------------- pieces of the recipe
def learning_rate(step: int, total_steps: int, warmup_steps: int, peak: float, floor: float) -> float:
    """Linear warmup from peak/warmup_steps to peak, then cosine down to floor at total_steps."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


class WeightEMA:
    """Exponential moving average of the weights, with the usual warmup of the decay
    (min(decay, (1 + t) / (10 + t))) so short runs are not dominated by the random init."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        current = model.state_dict()
        floats = [k for k, v in self.tensors.items() if v.is_floating_point()]
        torch._foreach_lerp_([self.tensors[k] for k in floats], [current[k].detach() for k in floats],
                             1.0 - decay)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "tensors": self.tensors}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.updates = state["decay"], state["updates"]
        for k, v in state["tensors"].items():
            self.tensors[k].copy_(v)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Cross-entropy against hard (B,) or soft (B, K) targets, with label smoothing either way."""
    logits = logits.float()  # (B, K): the loss in fp32 even under autocast
    if targets.ndim == 1:
        return F.cross_entropy(logits, targets, label_smoothing=smoothing)
    k = logits.shape[-1]
    targets = targets * (1 - smoothing) + smoothing / k
    return -(targets * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    from .data.loader import derive_seed

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


# ---------------------------------------------------------------- run directory
def prepare_run_dir(config: TrainConfig) -> Path:
    run_dir = Path(config.resume or config.out)
    if not config.resume and (run_dir / ckpt.STATE_FILE).exists():
        raise ValueError(
            f"{run_dir} already holds a run; continue it with --resume {run_dir} or choose another --out"
        )
    return run_dir


def append_metrics(run_dir: Path, row: dict) -> None:
    with open(run_dir / METRICS_FILE, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_metrics(run_dir: Path, up_to_epoch: int | None = None) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if up_to_epoch is None or r["epoch"] <= up_to_epoch]


# ---------------------------------------------------------------- the loop
def on_step_end(epoch: int, step_in_epoch: int) -> None:
    """Called after every optimizer step; a hook for tests that simulate Ctrl-C at a given step."""


class AbortTraining(KeyboardInterrupt):
    """A second Ctrl-C: leave at once, writing nothing (the last checkpoints stay as they are)."""


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

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def _all_reduce_sum(values: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    if runtime.distributed:
        values = values.clone()
        torch.distributed.all_reduce(values)
    return values


def train(config: TrainConfig | dict | None = None, **overrides) -> TrainResult:
    """Trains a model as `config` says and returns where the run lives.

    config: a TrainConfig, a dict of its fields, or None (the nano recipe); overrides replace
    fields (vitlab.train(data="my_images/", epochs=3)). With config.resume set to a run directory
    the run continues from its last checkpoint.
    """
    from .config import train_preset

    if config is None:
        config = train_preset("nano")
    elif isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    if overrides:
        config = TrainConfig.from_dict({**config.to_dict(), **overrides})
    runtime = setup_runtime(config)
    try:
        result = _train(config, runtime)
        if runtime.distributed:
            # rank 0 is still writing files; leaving before it does can tear down gloo under it
            torch.distributed.barrier()
        return result
    finally:
        if runtime.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _train(config: TrainConfig, runtime: Runtime) -> TrainResult:
    from .data import BatchLoader, augment_preset, load_data
    from .evaluate import evaluate
    from .finetune import InitialWeights, freeze_backbone, param_groups
    from .model import ViTConfig, VisionTransformer
    from .presets import preset_config

    log = (lambda message: print(message, flush=True)) if runtime.is_main else (lambda message: None)
    run_dir = prepare_run_dir(config)
    state = ckpt.load_training_state(run_dir / ckpt.STATE_FILE) if config.resume else None

    # ---- the architecture: the model preset, or the --init checkpoint's own, plus overrides
    # (a resumed run never rereads --init: its state file holds the weights it has trained since)
    init = InitialWeights(config.init) if config.init and state is None else None
    wanted = preset_config(config.model, **config.model_overrides)
    if init is not None:
        wanted = init.model_config(wanted, config.model_overrides)
    elif config.init and state is not None:
        wanted = ViTConfig.from_dict({**state["model_config"], "class_names": None})

    # ---- data: the model's input size and channels decide how images are converted
    if runtime.distributed and not runtime.is_main:
        torch.distributed.barrier()  # rank 0 decodes and fills the cache first; the others then read it
    data = load_data(config.data, val_size=config.val_size, split_seed=config.split_seed,
                     image_size=wanted.image_size, channels=wanted.in_channels)
    if runtime.distributed and runtime.is_main:
        torch.distributed.barrier()
    train_set = data.train
    if config.subset is not None:
        train_set = train_set.subset(balanced_subset_indices(train_set.labels, config.subset))
    log(f"data: {data.source}: {len(train_set)} train, {len(data.val) if data.val else 0} val images, "
        f"{data.num_classes} classes")

    # ---- model, optimizer, EMA
    torch.manual_seed(config.seed)
    model = VisionTransformer.from_config(
        {**wanted.to_dict(), "num_classes": data.num_classes, "class_names": data.class_names})
    if init is not None:
        for note in init.load_into(model, partial=config.init_partial):
            log(note)
    if config.freeze == "backbone":
        log(f"froze the backbone: {freeze_backbone(model):,} trainable parameters (the head)")
    if state is not None and state["model_config"] != model.config.to_dict():
        raise ValueError(f"cannot resume {run_dir}: its model config differs from this run's "
                         f"({config.model} with {config.model_overrides}); resume with the original settings")
    model.to(runtime.device)
    groups = param_groups(model, config.weight_decay, config.layer_decay)
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.999),
                                  fused=runtime.device.type == "cuda")
    ema = WeightEMA(model, config.ema_decay) if config.ema_decay else None

    if config.batch_size % runtime.world_size:
        raise ValueError(f"batch_size {config.batch_size} must divide evenly among "
                         f"{runtime.world_size} processes")
    augment = augment_preset(config.augment, **config.augment_overrides)
    per_process_batch = config.batch_size // runtime.world_size
    train_loader = BatchLoader(train_set, per_process_batch, mean=data.mean, std=data.std, train=True,
                               augment=augment, device=runtime.device, seed=config.seed,
                               rank=runtime.rank, world_size=runtime.world_size)
    val_loader = (BatchLoader(data.val, config.eval_batch_size, mean=data.mean, std=data.std, train=False,
                              device=runtime.device, rank=runtime.rank, world_size=runtime.world_size)
                  if data.val is not None and len(data.val) else None)
    steps_per_epoch = len(train_loader)
    sync_every = config.sync_every or (1 if runtime.device.type == "cpu" else 25)  # see the loop
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_set)} training images make no full batch of {config.batch_size}; "
                         f"lower --batch-size")
    total_steps = steps_per_epoch * config.epochs
    warmup_steps = max(1, round(config.warmup_epochs * steps_per_epoch))

    start_epoch, skip_steps, global_step, best = 0, 0, 0, None
    partial = {"loss": 0.0, "correct": 0.0, "seen": 0.0, "seconds": 0.0}
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        start_epoch, skip_steps = state["epoch"], state["step_in_epoch"]
        global_step, best = state["global_step"], state["best_val_top1"]
        partial = state["partial_epoch"]
        where = f"epoch {start_epoch}" + (f", step {skip_steps}" if skip_steps else "")
        log(f"resuming {run_dir} at {where} (global step {global_step})")

    train_model: nn.Module = model
    if runtime.distributed:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None)
    if config.compile:
        train_model = torch.compile(train_model)

    if runtime.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        resolved = {**config.to_dict(), "resume": None, "out": str(run_dir),
                    "resolved": {"precision": "bf16" if runtime.bf16 else "fp32",
                                 "model_config": model.config.to_dict(), "augment": augment.to_dict(),
                                 "mean": list(data.mean), "std": list(data.std),
                                 "train_images": len(train_set), "steps_per_epoch": steps_per_epoch}}
        atomic_write_text(run_dir / "config.json", json.dumps(resolved, indent=2) + "\n")
        atomic_write_text(run_dir / "environment.json",
                               json.dumps(describe_environment(runtime), indent=2) + "\n")
        log(f"model: {config.model}, {model.num_parameters():,} parameters; "
            f"{'bf16 autocast' if runtime.bf16 else 'fp32'} on {runtime.device}"
            f"{f' x {runtime.world_size} processes' if runtime.distributed else ''}; run dir {run_dir}")

    # eval rebuilds the same validation split from this
    metadata = {"data": {"source": str(config.data), "val_size": config.val_size,
                         "split_seed": config.split_seed}}

    def save(epoch: int, step_in_epoch: int, rng_state: torch.Tensor, scores: dict | None) -> None:
        """last.safetensors + last.state.pt, and best.safetensors when the epoch improved on it."""
        nonlocal best
        if not runtime.is_main:
            return
        weights = ckpt.weights_state_dict(model)
        use_ema = bool(scores and ema is not None and scores.get("ema_val_top1") is not None
                       and scores["ema_val_top1"] > scores["val_top1"])
        chosen = {k: v.to("cpu") for k, v in ema.tensors.items()} if use_ema else weights
        score = (scores or {}).get("ema_val_top1" if use_ema else "val_top1")
        extra = {**metadata, "epoch": epoch, "weights": "ema" if use_ema else "model", "val_top1": score}
        # order matters for a kill between writes: best, then last, then the state; a state file
        # that did not make it means the epoch is redone identically on resume
        if step_in_epoch == 0 and (best is None or score is None or score > best):
            best = score if score is not None else best
            ckpt.save_model(run_dir / "best.safetensors", model, mean=data.mean, std=data.std,
                            state_dict=chosen, extra=extra)
        if step_in_epoch == 0:  # mid-epoch (Ctrl-C) weights are only for resume, not for inference
            ckpt.save_model(run_dir / "last.safetensors", model, mean=data.mean, std=data.std,
                            state_dict=chosen, extra=extra)
        ckpt.save_training_state(run_dir / ckpt.STATE_FILE, {
            "format": ckpt.FORMAT, "epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": global_step,
            "model": weights, "model_digest": ckpt.tensor_digest(weights),
            "model_config": model.config.to_dict(),
            "optimizer": optimizer.state_dict(), "ema": ema.state_dict() if ema is not None else None,
            "rng": {"torch": rng_state}, "best_val_top1": best, "partial_epoch": dict(partial),
        })

    all_metrics = read_metrics(run_dir, up_to_epoch=start_epoch) if runtime.is_main else []
    if runtime.is_main and state is not None:  # drop rows of epochs the resumed run will redo
        atomic_write_text(run_dir / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in all_metrics))
    status = "completed"
    epoch = start_epoch
    with StopOnInterrupt(log) as stop:
        for epoch in range(start_epoch, config.epochs):
            train_loader.set_epoch(epoch)
            torch.manual_seed(epoch_seed(config.seed, epoch, runtime.rank))
            if state is not None and skip_steps:
                torch.set_rng_state(state["rng"]["torch"])
            model.train()
            sums = torch.tensor([partial["loss"], partial["correct"], partial["seen"]], dtype=torch.float64)
            start_time = time.perf_counter() - partial["seconds"]
            progress = _progress_bar(steps_per_epoch, epoch, config.epochs, skip_steps, runtime.is_main)
            step_in_epoch = skip_steps
            step_sums = torch.zeros(3, dtype=torch.float64, device=runtime.device)  # summed between host syncs
            try:
                for batch_number, (images, targets) in enumerate(train_loader):
                    if batch_number < skip_steps:
                        continue  # resumed mid-epoch: the loader regenerates these batches identically
                    lr = learning_rate(global_step, total_steps, warmup_steps, config.lr, config.min_lr)
                    for group in optimizer.param_groups:
                        group["lr"] = lr * group.get("lr_scale", 1.0)
                    with torch.autocast(runtime.device.type, dtype=torch.bfloat16, enabled=runtime.bf16):
                        logits = train_model(images)  # (B, K)
                    loss = soft_cross_entropy(logits, targets, config.label_smoothing)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    step_in_epoch = batch_number + 1
                    # Reading the loss on the host stalls a GPU until the step is done, so off the CPU
                    # the NaN / Ctrl-C check and the progress bar run every few steps, before the
                    # optimizer step: weights never take a non-finite update unseen for long, and
                    # a diverged run stops without writing anything.
                    if step_in_epoch % sync_every == 0 or step_in_epoch == steps_per_epoch:
                        # one reduction tells every rank about a bad loss or a Ctrl-C anywhere
                        stop_flag = torch.tensor(float(stop.requested), device=loss.device)
                        flags = _all_reduce_sum(torch.stack([loss.detach().float(), stop_flag]), runtime)
                        if not torch.isfinite(flags[0]):
                            raise TrainingDiverged(
                                f"loss became {loss.item()} at epoch {epoch + 1}, step {step_in_epoch}; "
                                f"stopped and kept the last good checkpoint in {run_dir}. Lower --lr, keep "
                                f"--clip-grad on, or try --precision fp32")
                    if config.clip_grad:
                        nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad)
                    optimizer.step()
                    if ema is not None:
                        ema.update(model)
                    global_step += 1
                    hard = targets if targets.ndim == 1 else targets.argmax(dim=1)
                    step_sums += torch.stack([loss.detach().double() * len(hard),
                                              (logits.argmax(1) == hard).sum().double(),
                                              torch.tensor(float(len(hard)), dtype=torch.float64,
                                                           device=loss.device)])
                    if step_in_epoch % sync_every == 0 or step_in_epoch == steps_per_epoch:
                        sums += step_sums.cpu()
                        step_sums.zero_()
                        elapsed = time.perf_counter() - start_time
                        if progress is not None:
                            progress.update(step_in_epoch - progress.n)
                            speed = sums[2] * runtime.world_size / elapsed
                            progress.set_postfix_str(
                                f"loss {sums[0] / sums[2]:.3f}  lr {lr:.2e}  {speed:.0f} img/s", refresh=False)
                        partial = {"loss": float(sums[0]), "correct": float(sums[1]), "seen": float(sums[2]),
                                   "seconds": elapsed}
                        on_step_end(epoch, step_in_epoch)
                        if flags[1] > 0:
                            raise KeyboardInterrupt
            except KeyboardInterrupt as interrupt:
                if progress is not None:
                    progress.close()
                if isinstance(interrupt, AbortTraining):
                    raise
                if step_in_epoch > 0:  # at step 0 the previous epoch's checkpoint already holds everything
                    save(epoch, step_in_epoch, torch.get_rng_state(), None)
                log(f"interrupted at epoch {epoch + 1}, step {step_in_epoch}; state saved. Continue with: "
                    f"vitlab train --resume {run_dir}")
                status = "interrupted"
                break
            if progress is not None:
                progress.close()
            skip_steps, state = 0, None
            epoch_seconds = time.perf_counter() - start_time
            partial = {"loss": 0.0, "correct": 0.0, "seen": 0.0, "seconds": 0.0}

            # ---- end of epoch: metrics from every rank, evaluation of the model and its EMA
            sums = _all_reduce_sum(sums, runtime)
            row = {"epoch": epoch + 1, "train_loss": float(sums[0] / sums[2]),
                   "train_top1": float(sums[1] / sums[2]),
                   "lr": learning_rate(global_step - 1, total_steps, warmup_steps, config.lr, config.min_lr)}
            scores = {}
            if val_loader is not None:
                result = evaluate(model, val_loader, data.num_classes, bf16=runtime.bf16, runtime=runtime)
                scores.update(val_loss=result.loss, val_top1=result.top1, val_top5=result.top5)
                if ema is not None:
                    ema_model = _ema_model(model, ema)
                    ema_result = evaluate(ema_model, val_loader, data.num_classes, bf16=runtime.bf16,
                                          runtime=runtime)
                    scores.update(ema_val_loss=ema_result.loss, ema_val_top1=ema_result.top1,
                                  ema_val_top5=ema_result.top5)
            row.update(scores)
            row.update(epoch_seconds=round(epoch_seconds, 2),
                       train_img_per_s=round(float(sums[2]) / epoch_seconds, 1))
            rng_state = torch.get_rng_state()
            save(epoch + 1, 0, rng_state, scores or None)
            row["best_val_top1"] = best
            if runtime.is_main:
                append_metrics(run_dir, row)
                all_metrics.append(row)
                log(json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()}))
        else:
            epoch = config.epochs

    if runtime.is_main and all_metrics:
        from .plots import plot_curves

        plot_curves(all_metrics, run_dir / "curves.png")
        if status == "completed":
            log(f"done: best val top-1 {best:.4f} in {run_dir}" if best is not None else f"done: {run_dir}")
    epochs_completed = len(all_metrics) if runtime.is_main else epoch
    return TrainResult(run_dir, status, epochs_completed, best, all_metrics)


def _ema_model(model: nn.Module, ema: WeightEMA) -> nn.Module:
    """A copy of the model holding the EMA weights, for evaluation."""
    import copy

    ema_model = copy.deepcopy(model)
    ema_model.load_state_dict(ema.tensors)
    return ema_model


def _progress_bar(total: int, epoch: int, epochs: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=f"epoch {epoch + 1}/{epochs}", unit="step",
                leave=False, dynamic_ncols=True, mininterval=1.0, file=sys.stderr)
