"""`vitlab predict`: top-k classes for image files, folders and globs."""

from __future__ import annotations

from .arguments import positive_int
from .model_source import add_precision_option, add_tta_option


def register(subparsers) -> None:
    p = subparsers.add_parser("predict", help="classify images with a trained checkpoint")
    p.add_argument("inputs", nargs="+", metavar="[CHECKPOINT] IMAGES",
                   help="a run directory or .safetensors file (default: the shipped CIFAR-10 model), then image "
                        "files, folders or globs")
    p.add_argument("--top-k", type=positive_int, default=5)
    p.add_argument("--batch-size", type=positive_int, default=64)
    add_tta_option(p)
    output = p.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="one JSON object per image instead of a table")
    output.add_argument("--csv", action="store_true",
                        help="one CSV row per image (path, class_1, probability_1, ..., error) for a spreadsheet")
    add_precision_option(p)
    p.set_defaults(func=run)


def _split_checkpoint(inputs: list[str]) -> tuple[str | None, list[str]]:
    """The first input is the checkpoint when it is a run directory, an exported model folder or a
    .safetensors file."""
    from pathlib import Path

    from ..checkpoint import MODEL_FILE, WEIGHT_FILES

    from ..data.image import IMAGE_EXTENSIONS
    from .errors import CLIError

    first = Path(inputs[0])
    is_run_dir = first.is_dir() and any((first / name).is_file() for name in (*WEIGHT_FILES, MODEL_FILE))
    if is_run_dir or first.suffix == ".safetensors":
        return inputs[0], inputs[1:]
    # a mistyped checkpoint (runs/nanoo img.png) must not quietly become "the shipped model, and
    # one unreadable image": a missing first path that is no image and no glob, before more inputs
    if (len(inputs) > 1 and not first.exists() and first.suffix.lower() not in IMAGE_EXTENSIONS
            and not any(c in inputs[0] for c in "*?[")):
        raise CLIError(f"{first} does not exist: give a run directory or .safetensors file as the first "
                       f"input, or leave it out to use the shipped model")
    return None, inputs


def run(args) -> int:
    import json

    from ..checkpoint import load_checkpoint
    from ..predict import format_csv, format_table, predict_files
    from .errors import CLIError

    checkpoint, images = _split_checkpoint(args.inputs)
    if not images:
        raise CLIError("no images given: vitlab predict [CHECKPOINT] IMAGES...")
    # checkpoint None -> the shipped model
    classifier = load_checkpoint(checkpoint, precision=args.precision)
    results = predict_files(classifier, images, top_k=args.top_k, batch_size=args.batch_size, tta=args.tta,
                            progress=True)
    if args.json:
        for r in results:
            print(json.dumps(r.to_dict()))
    elif args.csv:
        print(format_csv(results, args.top_k), end="")
    else:
        print(format_table(results, args.top_k))
    failed = [r for r in results if r.error is not None]
    if failed:
        import sys

        print(f"vitlab predict: {len(failed)} of {len(results)} inputs could not be read", file=sys.stderr)
    return 1 if failed else 0
