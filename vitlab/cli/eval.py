"""`vitlab eval`: accuracy of a checkpoint on labelled images (a held-out split or a whole folder),
with a confusion-matrix PNG."""

from __future__ import annotations

from .model_source import add_precision_option, add_tta_option
from .arguments import positive_int


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="top-1/top-5/per-class accuracy of a checkpoint on labelled images")
    p.add_argument("checkpoint", nargs="?",
                   help="run directory (its best checkpoint) or .safetensors file (default: the shipped model)")
    p.add_argument("--data", required=True,
                   help="labelled images: a dataset as for vitlab train, or any folder/archive of "
                        "<class>/ or test/<class>/ folders (classes matched to the model's by name)")
    p.add_argument("--split", default="auto", choices=["auto", "val", "test", "train", "all"],
                   help="auto (default): the held-out val split for data with a train/ split, every image "
                        "for bare class folders or test/-only data; val, test, train, or all")
    p.add_argument("--val-size", type=float, help="override the validation size recorded in the checkpoint")
    p.add_argument("--batch-size", type=positive_int, default=500)
    add_precision_option(p)
    add_tta_option(p)
    p.add_argument("--confusion", metavar="PNG",
                   help="where to write the confusion matrix (default: beside a run's checkpoint; in the current "
                        "directory for the shipped model or an exported model folder)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=run)


def run(args) -> int:
    import json
    import sys
    from pathlib import Path

    from ..checkpoint import DEFAULT_WEIGHTS, MODEL_FILE, resolve_checkpoint
    from ..evaluate import evaluate_checkpoint
    from ..plots import plot_confusion_matrix

    path = resolve_checkpoint(args.checkpoint)
    val_size = args.val_size
    if val_size is not None and val_size >= 1:
        val_size = int(val_size)
    result = evaluate_checkpoint(path, args.data, split=args.split, val_size=val_size,
                                 batch_size=args.batch_size, precision=args.precision, tta=args.tta,
                                 progress=True)
    # beside a run's checkpoint; never into the package, nor into an exported model folder (it holds
    # only the export's files, and a later export into it would refuse a folder with others)
    if path == DEFAULT_WEIGHTS or path.name == MODEL_FILE:
        name = path.stem if path == DEFAULT_WEIGHTS else path.parent.resolve().name
        default_png = Path.cwd() / f"confusion-{name}-{result.split}.png"
    else:
        default_png = path.parent / f"confusion-{path.stem}-{result.split}.png"
    png = Path(args.confusion) if args.confusion else default_png

    # the figures first: a figure that cannot be written must not lose them
    if args.json:
        out = result.to_dict()
        out.update(checkpoint=str(path), split=result.split, tta=args.tta, confusion_png=str(png))
        print(json.dumps(out), flush=True)
    else:
        print(f"checkpoint  {path}")
        print(f"split       {result.split} ({result.n} images)")
        print(f"top-1       {result.top1:.4f}")
        print(f"top-5       {result.top5:.4f}")
        print(f"loss        {result.loss:.4f}")
        print("per class:")
        width = max(len(name) for name in result.per_class)
        counts = dict(zip(result.class_names, result.confusion.sum(dim=1).tolist()))
        for name, accuracy in result.per_class.items():
            print(f"  {name.ljust(width)}  {accuracy:.4f}  ({counts[name]} images)")
        sys.stdout.flush()
    try:
        plot_confusion_matrix(result, png, title=f"{path.name} on {result.split}: top-1 {result.top1:.2%} "
                                                  f"({result.n} images)")
    except OSError as error:
        print(f"vitlab eval: warning: could not write the confusion matrix to {png} ({error.strerror or error}); "
              f"the figures above are complete. Choose another place with --confusion", file=sys.stderr)
        return 0
    if not args.json:
        print(f"confusion matrix: {png}")
    return 0
