"""Training recipes: a TrainConfig dataclass and named presets, read from flags or a config file.

Precedence, lowest first: the recipe preset, the config file (YAML, TOML or JSON), then flags.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

DEFAULT_DATA = "../shared/datasets/cifar10-jpeg-train.tar.gz"


@dataclass
class TrainConfig:
    """Everything one training run needs; saved resolved as config.json in the run directory."""

    model: str = "nano"  # a model preset (vitlab models)
    model_overrides: dict[str, Any] = field(default_factory=dict)  # ViTConfig fields, e.g. drop_path
    data: str = DEFAULT_DATA  # any source vitlab.data.load_data accepts
    val_size: int | float | None = None  # None: the data's default (5,000 for CIFAR-10)
    split_seed: int = 0  # which images form the validation split; keep fixed across runs
    subset: int | None = None  # train on the first N images of the training split
    epochs: int = 10
    batch_size: int = 128  # global: divided among processes under torchrun
    eval_batch_size: int = 500
    lr: float = 1e-3  # peak, reached after warmup
    min_lr: float = 1e-5  # end of the cosine
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    clip_grad: float | None = 1.0  # max global gradient norm; None turns clipping off
    ema_decay: float | None = 0.999  # None turns the weight EMA off
    precision: str = "auto"  # "bf16" | "fp32" | "auto" (bf16 where the hardware has it)
    compile: bool = False
    sync_every: int | None = None  # steps between host reads of the loss; None: 1 on CPU, 25 on GPU
    augment: str = "light"  # a vitlab.data augment preset
    augment_overrides: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    out: str = "runs/vitlab"
    resume: str | None = None
    # fine-tuning: start from trained weights (vitlab checkpoint, or a timm / seed state_dict)
    init: str | None = None
    init_partial: bool = False  # skip (and list) weights that do not fit instead of failing
    freeze: str | None = None  # "backbone": train only the head (a linear probe)
    layer_decay: float = 1.0  # < 1: block i's lr is scaled by layer_decay ** (depth - i)

    def __post_init__(self) -> None:
        # 0 is how flags and files say "off" for these two
        self.clip_grad = self.clip_grad or None
        self.ema_decay = self.ema_decay or None
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be 'bf16', 'fp32' or 'auto', got {self.precision!r}")
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.subset is not None and self.subset < 1:
            raise ValueError(f"subset must be a positive number of images, got {self.subset}")
        if self.freeze not in (None, "backbone"):
            raise ValueError(f"freeze must be 'backbone' or None, got {self.freeze!r}")
        if not 0 < self.layer_decay <= 1:
            raise ValueError(f"layer_decay must be in (0, 1], got {self.layer_decay}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1) or None, got {self.ema_decay}")

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


# Recipes sized for where each model trains. The nano recipe is the README's main job: about ten
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
    # Fine-tuning from --init weights: a tenth of the from-scratch learning rate, a short warmup and
    # layer-wise decay, so the pretrained features move little while the new head settles.
    "finetune": dict(model="nano", epochs=10, batch_size=128, lr=2e-4, weight_decay=0.05, warmup_epochs=0.5,
                     label_smoothing=0.1, clip_grad=1.0, ema_decay=None, augment="light", layer_decay=0.75,
                     out="runs/finetune"),
}

DESCRIPTIONS = {
    "nano": "main job: ~10 min on an idle 2-core CPU",
    "tiny": "a few hours on a laptop CPU, minutes on a GPU",
    "small": "GPU recipe",
    "seed": "the seed document's model, GPU recipe",
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
