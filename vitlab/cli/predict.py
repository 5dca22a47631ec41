"""`vitlab predict`: top-k classes for image files, folders and globs."""

from __future__ import annotations

from .model_source import add_precision_option, add_tta_option


def register(subparsers) -> None:
    p = subparsers.add_parser("predict", help="classify images with a trained checkpoint")
    p.add_argument("inputs", nargs="+", metavar="[CHECKPOINT] IMAGES",
                   help="a run directory or .safetensors file, then image files, folders or globs")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    add_tta_option(p)
    p.add_argument("--json", action="store_true", help="one JSON object per image instead of a table")
    add_precision_option(p)
    p.set_defaults(func=run)


def _split_checkpoint(inputs: list[str]) -> tuple[str | None, list[str]]:
    """The first input is the checkpoint when it is a run directory or a .safetensors file."""
    from pathlib import Path

    from ..checkpoint import WEIGHT_FILES

    first = Path(inputs[0])
    is_run_dir = first.is_dir() and any((first / name).is_file() for name in WEIGHT_FILES)
    if is_run_dir or first.suffix == ".safetensors":
        return inputs[0], inputs[1:]
    return None, inputs


def run(args) -> int:
    import json

    from ..checkpoint import load_checkpoint
    from ..predict import format_table, predict_files
    from .errors import CLIError

    checkpoint, images = _split_checkpoint(args.inputs)
    if not images:
        raise CLIError("no images given: vitlab predict [CHECKPOINT] IMAGES...")
    # checkpoint None -> the one-line "no default weights" error
    classifier = load_checkpoint(checkpoint, precision=args.precision)
    results = predict_files(classifier, images, top_k=args.top_k, batch_size=args.batch_size, tta=args.tta)
    if args.json:
        for r in results:
            print(json.dumps(r.to_dict()))
    else:
        print(format_table(results, args.top_k))
    failed = [r for r in results if r.error is not None]
    if failed:
        import sys

        print(f"vitlab predict: {len(failed)} of {len(results)} inputs could not be read", file=sys.stderr)
    return 1 if failed else 0
