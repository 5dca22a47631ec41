"""`vitlab train`: a training recipe preset plus overrides from a config file and flags.

Every TrainConfig field is a flag (--field-name), built here from the field's metadata (its help
text and how it reads its value, see vitlab.config.option); --preset, --config, --image-size and
--channels are the only hand-written ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing

from .arguments import positive_int

# flags that are sugar for one model_overrides entry: flag dest -> ViTConfig field
MODEL_SHORTCUTS = {"image_size": "image_size", "channels": "in_channels"}


def _argparse_type(parse):
    """An argparse `type` that reports parse's ValueError as a one-line usage error."""
    def convert(text: str):
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    convert.__name__ = parse.__name__
    return convert


def _value_type(annotation) -> type:
    """int | None -> int; float -> float; dict[str, Any] -> dict; bool -> bool."""
    if isinstance(annotation, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return typing.get_origin(annotation) or annotation


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, defaulting to None ("not given": the recipe's value stays)."""
    from ..config import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(TrainConfig):
        meta = dict(f.metadata)
        group_name = meta.pop("group", None)
        target = parser if group_name is None else groups.setdefault(
            group_name, parser.add_argument_group(f"{group_name} (see docs/fine-tuning.md)"))
        flag = meta.pop("flag", "--" + f.name.replace("_", "-"))
        options = {"dest": f.name, "help": meta.pop("help"), "default": None, **meta}
        parse = options.pop("parse", None)
        kind = _value_type(hints[f.name])
        if kind is bool:
            options["action"] = "store_true"
        elif kind is dict:
            options.update(action="append", type=_argparse_type(parse))
        else:
            options["type"] = _argparse_type(parse) if parse else kind
        target.add_argument(flag, **options)
    tune = groups["fine-tuning"]
    tune.add_argument("--image-size", type=positive_int, metavar="N",
                      help="train at N x N: images are resized and the position embedding interpolated")
    tune.add_argument("--channels", type=int, choices=(1, 3), metavar="C",
                      help="input channels: 1 (grayscale) or 3; --init weights are adapted")


def register(subparsers) -> None:
    from ..config import DESCRIPTIONS

    presets = ", ".join(f"{name} ({text})" for name, text in DESCRIPTIONS.items())
    p = subparsers.add_parser(
        "train", help="train a model from a recipe preset",
        description=f"Train a Vision Transformer. Recipe presets: {presets}. Precedence: preset < "
                    f"--config file < flags; a flag not given keeps the recipe's value. With --resume "
                    f"the run's saved config takes the place of preset and file. Runs under torchrun "
                    f"--nproc_per_node N as DDP. Exit status: 0 when the run completed, was already "
                    f"complete or stopped at --max-steps; 130 when interrupted (Ctrl-C, SIGTERM).")
    p.add_argument("--preset", help="training recipe preset (default: nano, or the config file's)")
    p.add_argument("--config", help="YAML, TOML or JSON file of training options (the flags' names "
                                    "with underscores, plus an optional preset)")
    add_config_flags(p)
    p.set_defaults(func=run)


def config_flags(args: argparse.Namespace) -> dict:
    """The TrainConfig fields given on the command line (None for the rest)."""
    from ..config import TrainConfig

    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    for name in ("model_overrides", "augment_overrides"):
        flags[name] = dict(flags[name]) if flags[name] else None
    shortcuts = {field: getattr(args, flag) for flag, field in MODEL_SHORTCUTS.items()
                 if getattr(args, flag) is not None}
    if shortcuts:
        flags["model_overrides"] = {**(flags["model_overrides"] or {}), **shortcuts}
    return flags


def run(args) -> int:
    from pathlib import Path

    from ..config import resolve_config, resume_config
    from ..rundir import RunExists
    from ..train import AbortTraining, TrainingDiverged, train

    flags = config_flags(args)
    resume = flags.pop("resume")
    if resume:
        if args.preset or args.config:
            raise ValueError("--resume continues with the run's saved config; give changes as flags, "
                             "not --preset or --config")
        config = resume_config(resume, **flags)
    else:
        config = resolve_config(args.preset, args.config, **flags)
    try:
        result = train(config)
    except RunExists as error:
        if not error.complete:
            raise
        print(f"vitlab train: {error}")  # a finished run: nothing to do, and not an error
        return 0
    except TrainingDiverged as error:
        raise ValueError(str(error)) from None
    except AbortTraining:
        from ..checkpoint import STATE_FILE

        run_dir = Path(config.resume or config.out)
        kept = (f"the last saved checkpoint in {run_dir} is kept" if (run_dir / STATE_FILE).is_file()
                else "no checkpoint had been saved yet")
        print(f"vitlab train: aborted; {kept}", flush=True)
        return 130
    return 130 if result.status == "interrupted" else 0
