"""`vitlab summary PRESET|CHECKPOINT`: parameters, FLOPs and activation size of every module."""

from __future__ import annotations

from .model_source import add_preset_option


def register(subparsers) -> None:
    p = subparsers.add_parser("summary", help="per-module parameters, FLOPs and activation size of a model")
    p.add_argument("model", nargs="?", metavar="PRESET|CHECKPOINT",
                   help="a preset name, a run directory or a .safetensors checkpoint")
    add_preset_option(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..summary import format_summary, summarize
    from .model_source import load_model_source

    classifier, description = load_model_source(args.model, args.preset)
    print(format_summary(summarize(classifier.model), description))
    return 0
