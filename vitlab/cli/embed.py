"""`vitlab embed`: pre-logits features of images, saved as a .npy array (one row per image)."""

from __future__ import annotations

from .model_source import add_precision_option


def register(subparsers) -> None:
    p = subparsers.add_parser("embed", help="pre-logits features of images, for retrieval or a linear probe")
    p.add_argument("inputs", nargs="+", metavar="[CHECKPOINT] IMAGES",
                   help="a run directory or .safetensors file, then image files, folders or globs")
    p.add_argument("--out", required=True, metavar="FILE.npy", help="features (N, D), float32")
    p.add_argument("--pooling", choices=["cls", "mean"],
                   help="the [CLS] token or the mean of the patch tokens (default: the model's own)")
    p.add_argument("--batch-size", type=int, default=64)
    add_precision_option(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import sys
    from pathlib import Path

    import numpy as np

    from ..checkpoint import load_checkpoint
    from ..embed import embed_files
    from ..files import atomic_write, atomic_write_text
    from .errors import CLIError
    from .predict import _split_checkpoint

    checkpoint, images = _split_checkpoint(args.inputs)
    if not images:
        raise CLIError("no images given: vitlab embed [CHECKPOINT] IMAGES... --out FILE.npy")
    out = Path(args.out)
    if out.suffix != ".npy":
        raise CLIError(f"--out {out} must end in .npy")
    classifier = load_checkpoint(checkpoint, precision=args.precision)
    paths, features, problems = embed_files(classifier, images, pooling=args.pooling,
                                            batch_size=args.batch_size)
    for item, error in problems:
        print(f"vitlab embed: skipped {item}: {error}", file=sys.stderr)
    if not paths:
        raise CLIError("none of the inputs could be read; nothing written")
    atomic_write(out, lambda f: np.save(f, features))
    # the row order, so features can be matched back to files
    atomic_write_text(out.with_suffix(".txt"), "\n".join(paths) + "\n")
    print(f"wrote {features.shape[0]} x {features.shape[1]} features to {out} "
          f"(rows in the order of {out.with_suffix('.txt')})")
    return 1 if problems else 0
