"""Training recipes: a TrainConfig dataclass and named presets, read from flags or a config file.

Precedence, lowest first: the recipe preset, the config file (YAML, TOML or JSON), then flags.
A resumed run (`resume_config`) starts from the config.json its run directory saved instead.
Each TrainConfig field carries its flag's help text (`option`), from which `vitlab train` builds
its flags.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .budget import parse_duration

DEFAULT_DATA = "../shared/datasets/cifar10-jpeg-train.tar.gz"
PRECISIONS = ("auto", "bf16", "fp32")  # as vitlab.precision (not imported: `vitlab --help` stays torch-free)
SCHEDULES = ("cosine", "linear")
OPTIMIZERS = ("adamw", "muon")


def option(default: Any = None, help: str = "", **flag) -> Any:
    """A TrainConfig field: its default, the help text of its `vitlab train` flag, and how the flag
    reads its value (flag=..., metavar=..., choices=..., parse=..., group=...; see vitlab.cli.train)."""
    metadata = {"help": help, **flag}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def parse_key_value(text: str) -> tuple[str, Any]:
    """KEY=VALUE with VALUE parsed as YAML (numbers, true/false, null, lists), else kept as text."""
    import yaml

    if "=" not in text:
        raise ValueError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError:
        return key.strip(), value


def parse_count_or_fraction(text: str) -> int | float:
    """"5000" -> 5000 images, "0.1" -> a tenth of them, "0" -> none."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected a count of images or a fraction below 1, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"expected a count of images (>= 0) or a fraction below 1, got {text!r}")
    if value >= 1 or value == 0:
        if value != int(value):
            raise ValueError(f"expected a whole count of images or a fraction below 1, got {text!r}")
        return int(value)
    return value


@dataclass
class TrainConfig:
    """Everything one training run needs; saved resolved as config.json in the run directory.

    Each field is also a `vitlab train` flag (--field-name) with the help text given here; a
    recipe preset (TRAIN_PRESETS) sets most of them.
    """

    model: str = option("nano", "model preset (see vitlab models), overriding the recipe's")
    model_overrides: dict[str, Any] = option(
        {}, "override a model config field, e.g. drop_path=0.1 (repeatable)",
        flag="--model-arg", metavar="KEY=VALUE", parse=parse_key_value)
    data: str = option(DEFAULT_DATA, "dataset: CIFAR archive, image folder, .tar/.tar.gz/.zip, "
                                     "cifar10/cifar100 (see vitlab data)", metavar="SOURCE")
    val_size: int | float | None = option(
        None, "validation images: a count, or a fraction < 1; 0 for none (default: the data's, "
              "5,000 for CIFAR-10)", parse=parse_count_or_fraction)
    split_seed: int = option(0, "which images form the validation split; keep it fixed across runs")
    subset: int | None = option(None, "train on the first N training images, taken round-robin over "
                                      "the classes", metavar="N")
    epochs: int = option(10, "epochs to train (the schedule's length); ignored with --time-budget")
    time_budget: float | None = option(
        None, "train for this long instead of --epochs (10m, 1h, 90s, 1h30m): the first steps measure "
              "this machine's speed and the schedule (warmup, decay to --min-lr, EMA, evaluations) is "
              "fitted to end with the budget", parse=parse_duration, metavar="DURATION")
    batch_size: int = option(128, "global batch size (split among torchrun processes)")
    eval_batch_size: int = option(500, "batch size for the validation pass")
    eval_every: int = option(1, "evaluate and checkpoint every N epochs and after the last one (on a fast GPU "
                                "an epoch lasts seconds and its evaluation and checkpoint a quarter of that; "
                                "a killed run redoes at most N epochs on resume)", metavar="N")
    lr: float = option(1e-3, "peak learning rate, reached after warmup")
    min_lr: float = option(1e-5, "learning rate at the last step")
    schedule: str = option("cosine", "decay from the peak to --min-lr after warmup: cosine or linear",
                           choices=SCHEDULES)
    weight_decay: float = option(0.05, "AdamW weight decay (none on norms, biases, tokens)")
    optimizer: str = option("adamw", "adamw, or muon: torch.optim.Muon (orthogonalised momentum) for the "
                                     "blocks' weight matrices and AdamW for the rest, both at --lr and "
                                     "--weight-decay (Muon's update scaled to AdamW's size)", choices=OPTIMIZERS)
    low_res: float = option(0.0, "fraction of the run's optimizer steps, from the first, that train on "
                                 "half-size images (2x2 average-pooled; the position embedding resampled): each "
                                 "costs about a quarter of a full-size step; 0 = off", metavar="FRACTION")
    distill: float = option(0.0, "fraction of --time-budget spent first training a small CNN teacher; the ViT "
                                 "then learns half from the labels and half from the teacher's predictions "
                                 "(DeiT's hard distillation) and is saved as the same plain ViT; 0 = off",
                            metavar="FRACTION")
    warmup_epochs: float = option(1.0, "epochs of linear warmup (fractions allowed)")
    label_smoothing: float = option(0.1, "label smoothing, in [0, 1)")
    clip_grad: float | None = option(1.0, "max global gradient norm; 0 turns clipping off")
    ema_decay: float | None = option(0.999, "weight EMA decay, in (0, 1); 0 turns the EMA off")
    precision: str = option("auto", "bf16 autocast where the hardware has native bf16 (auto), or "
                                    "always (bf16), or never (fp32)", choices=PRECISIONS)
    compile: bool = option(False, "torch.compile the model")
    sync_every: int | None = option(None, "optimizer steps between host reads of the loss (NaN and "
                                          "Ctrl-C checks); default 1 on CPU, 25 on GPU", metavar="N")
    augment: str = option("light", "augmentation preset: none, light, strong")
    augment_overrides: dict[str, Any] = option(
        {}, "override an augmentation field, e.g. mixup_alpha=0.2 (repeatable)",
        flag="--augment-arg", metavar="KEY=VALUE", parse=parse_key_value)
    seed: int = option(0, "seed for initialisation, data order and augmentation")
    device: str = option("auto", "auto (CUDA when there is one), cpu, cuda or cuda:N")
    out: str = option("runs/vitlab", "run directory to create (default runs/<preset>)", metavar="DIR")
    resume: str | None = option(None, "continue the run in DIR from its last checkpoint, with its "
                                      "saved config (later flags override it)", metavar="DIR")
    overwrite: bool = option(False, "start the --out directory afresh even if it holds a run")
    max_steps: int | None = option(
        None, "stop after optimizer step N of the run (counted from its start), saving the state as "
              "Ctrl-C does (status 'stopped', exit 0); --resume then continues without this limit",
        metavar="N")
    # fine-tuning: start from trained weights (vitlab checkpoint, or a timm / seed state_dict)
    init: str | None = option(
        None, "start from these weights: 'default' (the shipped CIFAR-10 model), a vitlab run directory "
              "or checkpoint (its architecture is used), or a timm / seed state_dict (.safetensors, .pt, .pth)",
        metavar="WEIGHTS", group="fine-tuning")
    init_partial: bool = option(False, "skip and list weights that do not fit instead of failing",
                                group="fine-tuning")
    log: str | None = option(None, "also write TensorBoard event files into DIR/tensorboard: --log tensorboard "
                                   "(needs the tensorboard package)", choices=("tensorboard",))
    freeze: str | None = option(None, "train only the classifier head", choices=("backbone",),
                                group="fine-tuning")
    layer_decay: float = option(1.0, "layer-wise lr decay: block i trains at lr * decay ** (depth - i)",
                                group="fine-tuning")

    def __post_init__(self) -> None:
        # the types a config file could get wrong, before any arithmetic on them
        for name in ("model_overrides", "augment_overrides"):
            value = getattr(self, name)
            if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                raise ValueError(f"{name} must be a mapping of setting names to values, got {value!r}")
        for name in ("model", "data", "out", "augment", "device"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be text, got {getattr(self, name)!r}")
        for name in ("init", "resume"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a path, got {getattr(self, name)!r}")
        for name in ("compile", "overwrite", "init_partial"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        # 0 is how flags and files say "off" for these two
        self.clip_grad = self.clip_grad or None
        self.ema_decay = self.ema_decay or None
        if isinstance(self.time_budget, str) or self.time_budget == 0:  # "10m" from a file; 0 = off
            self.time_budget = parse_duration(self.time_budget) if self.time_budget else None
        elif self.time_budget is not None and not (isinstance(self.time_budget, (int, float))
                                                   and math.isfinite(self.time_budget) and self.time_budget > 0):
            raise ValueError(f"time_budget must be a positive number of seconds, got {self.time_budget!r}")
        for name in ("lr", "min_lr", "weight_decay", "warmup_epochs", "label_smoothing", "clip_grad",
                     "ema_decay", "layer_decay", "val_size", "low_res", "distill"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        for name in ("epochs", "batch_size", "eval_batch_size", "eval_every", "subset", "sync_every", "max_steps"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
        for name in ("seed", "split_seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a whole number >= 0, got {value!r}")
        for name, ok, rule in [
            ("lr", self.lr > 0, "must be positive"),
            # AdamW moves every weight by about lr per step, and weights start near 0.02: far above
            # 1 the first step leaves garbage that is still finite, so no loss check would notice
            ("lr", self.lr <= 1, "must be at most 1"),
            ("min_lr", 0 <= self.min_lr <= self.lr, f"must be in [0, lr={self.lr}]"),
            ("weight_decay", self.weight_decay >= 0, "must be >= 0"),
            ("warmup_epochs", self.warmup_epochs >= 0, "must be >= 0"),
            ("label_smoothing", 0 <= self.label_smoothing < 1, "must be in [0, 1)"),
            ("clip_grad", self.clip_grad is None or self.clip_grad > 0, "must be positive, or 0 for off"),
            ("ema_decay", self.ema_decay is None or 0 < self.ema_decay < 1,
             "must be in (0, 1), or 0 for off"),
            ("layer_decay", 0 < self.layer_decay <= 1, "must be in (0, 1]"),
            ("low_res", 0 <= self.low_res < 1, "must be in [0, 1): the run has to end at full size"),
            ("distill", 0 <= self.distill <= 0.5, "must be in [0, 0.5]: the teacher gets that fraction of "
                                                  "the time budget, the ViT the rest"),
            ("distill", not self.distill or self.time_budget is not None,
             "needs --time-budget (the teacher trains for that fraction of it)"),
            # AdamW multiplies every weight by 1 - lr * weight_decay each step: at 1 or more it
            # zeroes or flips them
            ("weight_decay", self.lr * self.weight_decay < 1, f"times lr ({self.lr:g}) must be below 1"),
            ("val_size", self.val_size is None or self.val_size >= 0, "must be >= 0"),
        ]:
            if not ok:
                raise ValueError(f"{name} {rule}, got {getattr(self, name)!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be 'cosine' or 'linear', got {self.schedule!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be 'adamw' or 'muon', got {self.optimizer!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be 'auto', 'bf16' or 'fp32', got {self.precision!r}")
        if self.log not in (None, "tensorboard"):
            raise ValueError(f"log must be 'tensorboard' or None, got {self.log!r}")
        if self.freeze not in (None, "backbone"):
            raise ValueError(f"freeze must be 'backbone' or None, got {self.freeze!r}")
        if self.resume and self.overwrite:
            raise ValueError("overwrite and resume contradict each other: --resume continues a run, "
                             "--overwrite starts it over")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training config keys: {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(known))}")
        return cls(**d)


# Recipes sized for where each model trains. The nano recipe is the README's first command: about ten
# minutes on an idle 2-core AVX512-BF16 CPU (measured in the README), so few epochs, a short
# warmup, a high peak lr and a fast EMA; larger models get the DeiT-style long schedule and
# stronger augmentation that ViTs need from scratch on small data.
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "nano": dict(model="nano", epochs=5, batch_size=128, lr=2e-3, weight_decay=0.05, warmup_epochs=0.5,
                 label_smoothing=0.1, clip_grad=1.0, ema_decay=0.998, augment="light", out="runs/nano"),
    "tiny": dict(model="tiny", epochs=50, batch_size=128, lr=1e-3, weight_decay=0.05, warmup_epochs=5,
                 label_smoothing=0.1, clip_grad=1.0, ema_decay=0.9995, augment="strong", out="runs/tiny"),
    "small": dict(model="small", epochs=200, batch_size=256, lr=1e-3, weight_decay=0.05, warmup_epochs=10,
                  label_smoothing=0.1, clip_grad=1.0, ema_decay=0.9998, augment="strong", out="runs/small"),
    "seed": dict(model="seed", epochs=100, batch_size=128, lr=5e-4, weight_decay=0.05, warmup_epochs=5,
                 label_smoothing=0.1, clip_grad=1.0, ema_decay=0.9998, augment="strong", out="runs/seed"),
    # Accuracy per CPU-minute, meant with --time-budget (the README's first command): the nano model
    # with mimetic attention init, Muon for the blocks' matrices, the first half of the steps on
    # half-size images, a short warmup, linear decay to zero on the budget's last step and
    # alternating flips. Each ingredient's measured effect: docs/recipe.md.
    "budget": dict(model="nano", model_overrides={"init": "mimetic"}, epochs=5, batch_size=128, lr=2e-3,
                   optimizer="muon", low_res=0.5,
                   min_lr=0.0, schedule="linear", weight_decay=0.05, warmup_epochs=0.2, label_smoothing=0.1,
                   clip_grad=1.0, ema_decay=0.998, augment="light", augment_overrides={"flip_mode": "alternate"},
                   out="runs/budget"),
    # The shipped model's recipe (docs/model-card.md), meant for a GPU with --time-budget: the
    # CCT paper's regularisation for ViT-Lite on CIFAR (heavy augmentation, Mixup/CutMix, label
    # smoothing, stochastic depth) with batch 512, linear decay to zero and alternating flips.
    # The augmentation policy draws one operation per 32 images: per-image draws cost a kernel
    # launch each and would leave a GPU idle.
    "lite": dict(model="lite", epochs=300, batch_size=512, lr=1e-3, min_lr=0.0, schedule="linear",
                 weight_decay=0.05, warmup_epochs=5, label_smoothing=0.1, clip_grad=1.0, ema_decay=0.9998,
                 augment="strong", augment_overrides={"flip_mode": "alternate", "policy_chunk": 32},
                 eval_batch_size=1000, out="runs/lite"),
    # Fine-tuning from --init weights: a tenth of the from-scratch learning rate, a short warmup and
    # layer-wise decay, so the pretrained features move little while the new head settles.
    "finetune": dict(model="nano", epochs=10, batch_size=128, lr=2e-4, weight_decay=0.05, warmup_epochs=0.5,
                     label_smoothing=0.1, clip_grad=1.0, ema_decay=None, augment="light", layer_decay=0.75,
                     out="runs/finetune"),
}

DESCRIPTIONS = {
    "budget": "nano tuned for accuracy per CPU-minute (Muon, half-size start); use with --time-budget 10m",
    "nano": "5 epochs: ~9 min on a 2-core CPU with native bf16",
    "tiny": "a few hours on a laptop CPU, minutes on a GPU",
    "lite": "the shipped model's recipe; on a GPU with --time-budget",
    "small": "GPU recipe",
    "seed": "the tutorial's model, GPU recipe",
    "finetune": "from --init weights: lr 2e-4, warmup 0.5 epoch, layer decay 0.75",
}


def train_preset(name: str, **overrides) -> TrainConfig:
    """The recipe `name` with any TrainConfig field overridden."""
    if name not in TRAIN_PRESETS:
        raise ValueError(f"unknown training preset {name!r}; choose one of: {', '.join(TRAIN_PRESETS)}")
    return TrainConfig.from_dict({**TRAIN_PRESETS[name], **overrides})


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML, TOML or JSON file of TrainConfig fields (plus an optional `preset`) -> dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = path.read_text()
    suffix = path.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text) or {}
        elif suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                import tomli as tomllib

            values = tomllib.loads(text)
        elif suffix == ".json":
            values = json.loads(text)
        else:
            raise ValueError(f"config file {path} must end in .yaml, .yml, .toml or .json")
    except (ValueError, ImportError) as error:
        if str(error).startswith("config file"):
            raise
        raise ValueError(f"config file {path} cannot be parsed: {error}") from None
    except Exception as error:  # yaml.YAMLError and friends
        raise ValueError(f"config file {path} cannot be parsed: {str(error).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a mapping of option names to values")
    return values


def resolve_config(preset: str | None = None, file: str | Path | None = None, **flags) -> TrainConfig:
    """preset < file < flags. Flags set to None are 'not given'. The file may name a preset."""
    from_file = read_config_file(file) if file else {}
    preset = preset or from_file.pop("preset", None) or "nano"
    from_file.pop("preset", None)
    given = {k: v for k, v in flags.items() if v is not None}
    merged = {**from_file, **given}
    for key in ("model_overrides", "augment_overrides"):  # merge dicts rather than replace them
        merged[key] = {**TRAIN_PRESETS.get(preset, {}).get(key, {}), **from_file.get(key, {}),
                       **given.get(key, {})}
    return train_preset(preset, **merged)


# Fields a run directory's config.json does not carry into a resumed run: where the run is, and
# what only one invocation asked for (start over; stop after N steps).
NOT_RESUMED = ("resume", "out", "overwrite", "max_steps")


def resume_config(run_dir: str | Path, **overrides) -> TrainConfig:
    """The config to continue the run in `run_dir`: its saved config.json, then `overrides` (None
    means "not given"; model_overrides / augment_overrides are merged key by key). This is what
    `vitlab train --resume DIR [flags]` and `vitlab.train(resume=DIR, **overrides)` both run."""
    from .rundir import read_config

    stored = {k: v for k, v in read_config(run_dir).items() if k != "resolved" and k not in NOT_RESUMED}
    given = {k: v for k, v in overrides.items() if v is not None and k not in ("resume", "out")}
    merged = {**stored, **given}
    if "distill" in given and given["distill"] != (stored.get("distill") or 0.0):
        raise ValueError(f"cannot resume {run_dir} with --distill {given['distill']}: it was started with --distill "
                         f"{stored.get('distill') or 0} and has trained on those targets; leave --distill out")
    for key in ("model_overrides", "augment_overrides"):
        if not isinstance(stored.get(key, {}), dict):
            raise ValueError(f"{Path(run_dir) / 'config.json'}: {key} must be a mapping, got {stored[key]!r}")
        merged[key] = {**stored.get(key, {}), **given.get(key, {})}
    return TrainConfig.from_dict({**merged, "resume": str(run_dir), "out": str(run_dir)})
