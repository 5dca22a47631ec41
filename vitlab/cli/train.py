"""`vitlab train`: a training recipe preset plus overrides from a config file and flags."""

from __future__ import annotations

import argparse


def _key_value(text: str) -> tuple[str, object]:
    """KEY=VALUE with VALUE parsed as YAML (numbers, true/false, null, lists), else kept as text."""
    import yaml

    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError:
        return key.strip(), value


def register(subparsers) -> None:
    from ..config import DESCRIPTIONS

    presets = ", ".join(f"{name} ({text})" for name, text in DESCRIPTIONS.items())
    p = subparsers.add_parser(
        "train", help="train a model from a recipe preset",
        description=f"Train a Vision Transformer. Recipe presets: {presets}. Precedence: preset < "
                    f"--config file < flags. Runs under torchrun --nproc_per_node N as DDP.")
    p.add_argument("--preset", help="training recipe preset (default: nano, or the config file's)")
    p.add_argument("--config", help="YAML, TOML or JSON file of training options (see README)")
    p.add_argument("--data", help="dataset: CIFAR archive, image folder, .tar/.tar.gz/.zip, cifar10/cifar100")
    p.add_argument("--out", help="run directory to create (default runs/<preset>)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    p.add_argument("--model", help="model preset (see vitlab models), overriding the recipe's")
    p.add_argument("--model-arg", action="append", type=_key_value, default=[], metavar="KEY=VALUE",
                   help="override a model config field, e.g. drop_path=0.1 (repeatable)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="global batch size (split among torchrun processes)")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--min-lr", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--warmup-epochs", type=float)
    p.add_argument("--label-smoothing", type=float)
    p.add_argument("--clip-grad", type=float, help="max gradient norm; 0 turns clipping off")
    p.add_argument("--ema-decay", type=float, help="weight EMA decay; 0 turns the EMA off")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"],
                   help="bf16 autocast (default where the hardware has native bf16) or fp32")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    p.add_argument("--augment", help="augmentation preset: none, light, strong")
    p.add_argument("--augment-arg", action="append", type=_key_value, default=[], metavar="KEY=VALUE",
                   help="override an augmentation field, e.g. mixup_alpha=0.2 (repeatable)")
    p.add_argument("--val-size", type=float, help="validation images (count, or fraction < 1); 0 for none")
    p.add_argument("--subset", type=int, help="train on the first N training images (balanced over classes)")
    p.add_argument("--seed", type=int)
    tune = p.add_argument_group("fine-tuning (see README: Fine-tune on your own images)")
    tune.add_argument("--init", metavar="WEIGHTS",
                      help="start from these weights: a vitlab run directory or checkpoint (its "
                           "architecture is used), or a timm / seed state_dict (.safetensors, .pt, .pth)")
    tune.add_argument("--init-partial", action="store_true", default=None,
                      help="skip and list weights that do not fit instead of failing")
    tune.add_argument("--freeze", choices=["backbone"], help="train only the classifier head")
    tune.add_argument("--layer-decay", type=float,
                      help="layer-wise lr decay: block i trains at lr * decay ** (depth - i)")
    tune.add_argument("--image-size", type=int, metavar="N",
                      help="train at N x N: images are resized and the position embedding interpolated")
    tune.add_argument("--channels", type=int, metavar="C",
                      help="input channels (1 for grayscale); --init weights are adapted")
    p.add_argument("--device", help="auto, cpu or cuda")
    p.set_defaults(func=run)


FLAG_FIELDS = ("data", "out", "model", "epochs", "batch_size", "lr", "min_lr", "weight_decay",
               "warmup_epochs", "label_smoothing", "clip_grad", "ema_decay", "precision", "compile", "augment",
               "subset", "seed", "device", "init", "init_partial", "freeze", "layer_decay")


def run(args) -> int:
    import json
    from pathlib import Path

    from ..config import resolve_config
    from ..trainer import TrainingDiverged, train

    flags = {name: getattr(args, name) for name in FLAG_FIELDS}
    if args.val_size is not None:
        flags["val_size"] = int(args.val_size) if args.val_size >= 1 else args.val_size
    model_overrides = dict(args.model_arg)
    if args.image_size is not None:
        model_overrides["image_size"] = args.image_size
    if args.channels is not None:
        model_overrides["in_channels"] = args.channels
    if model_overrides:
        flags["model_overrides"] = model_overrides
    if args.augment_arg:
        flags["augment_overrides"] = dict(args.augment_arg)
    if args.resume:
        saved = Path(args.resume) / "config.json"
        if not saved.is_file():
            raise FileNotFoundError(f"{args.resume} is not a run directory (no config.json); "
                                    f"pass the --out directory of an earlier vitlab train")
        stored = json.loads(saved.read_text())
        stored.pop("resolved", None)
        given = {k: v for k, v in flags.items() if v is not None}
        config_values = {**stored, **given, "resume": args.resume, "out": args.resume}
        config = resolve_config(None, None, **config_values)
    else:
        config = resolve_config(args.preset, args.config, **flags)
    try:
        result = train(config)
    except TrainingDiverged as error:
        raise ValueError(str(error)) from None
    return 0 if result.status == "completed" else 130
