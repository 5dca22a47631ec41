"""`vitlab embed`: pre-logits features of images, saved as a .npy array (one row per image)."""

from __future__ import annotations

from .arguments import positive_int
from .model_source import add_precision_option


def register(subparsers) -> None:
    p = subparsers.add_parser("embed", help="pre-logits features of images, for retrieval or a linear probe")
    p.add_argument("inputs", nargs="+", metavar="[CHECKPOINT] IMAGES",
                   help="a run directory or .safetensors file (default: the shipped CIFAR-10 model), then "
                        "image files, folders or globs")
    p.add_argument("--out", required=True, metavar="FILE.npy", help="features (N, D), float32")
    p.add_argument("--pooling", choices=["cls", "mean"],
                   help="the [CLS] token or the mean of the patch tokens (default: the model's own)")
    p.add_argument("--batch-size", type=positive_int, default=64)
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
    # The row order goes beside the features under a name made from the whole output name
    # (features.npy -> features.npy.rows.txt), never X.txt, which may be the user's own file. One
    # that exists while the features file does not was not written by vitlab embed: left alone.
    rows = out.with_name(out.name + ".rows.txt")
    if rows.exists() and not out.exists():
        raise CLIError(f"{rows} exists but {out} does not, so it is not an earlier vitlab embed's row "
                       f"list; move it or choose another --out")
    classifier = load_checkpoint(checkpoint, precision=args.precision)
    paths, features, problems = embed_files(classifier, images, pooling=args.pooling,
                                            batch_size=args.batch_size, progress=True)
    for item, error in problems:
        print(f"vitlab embed: skipped {item}: {error}", file=sys.stderr)
    if not paths:
        raise CLIError("none of the inputs could be read; nothing written")
    atomic_write_text(rows, "\n".join(paths) + "\n")  # the row order: features matched back to files
    atomic_write(out, lambda f: np.save(f, features))
    print(f"wrote {features.shape[0]} x {features.shape[1]} features to {out} (rows in the order of {rows})")
    return 1 if problems else 0
