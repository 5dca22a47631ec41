"""`vitlab eval`: accuracy of a checkpoint on a split, with a confusion-matrix PNG."""

from __future__ import annotations

from .model_source import add_precision_option, add_tta_option


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="top-1/top-5/per-class accuracy of a checkpoint on a split")
    p.add_argument("checkpoint", nargs="?", help="run directory (its best checkpoint) or .safetensors file")
    p.add_argument("--data", required=True, help="dataset source, as for vitlab train")
    p.add_argument("--split", default="val", choices=["val", "test", "train"],
                   help="val: the split held out at training time (default)")
    p.add_argument("--val-size", type=float, help="override the validation size recorded in the checkpoint")
    p.add_argument("--batch-size", type=int, default=500)
    add_precision_option(p)
    add_tta_option(p)
    p.add_argument("--confusion", metavar="PNG",
                   help="where to write the confusion matrix (default: beside the checkpoint)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=run)


def run(args) -> int:
    import json
    from pathlib import Path

    from ..checkpoint import resolve_checkpoint
    from ..evaluate import evaluate_checkpoint
    from ..plots import plot_confusion_matrix

    path = resolve_checkpoint(args.checkpoint)
    val_size = args.val_size
    if val_size is not None and val_size >= 1:
        val_size = int(val_size)
    result = evaluate_checkpoint(path, args.data, split=args.split, val_size=val_size,
                                 batch_size=args.batch_size, precision=args.precision, tta=args.tta)
    png = Path(args.confusion) if args.confusion else path.parent / f"confusion-{path.stem}-{args.split}.png"
    plot_confusion_matrix(result, png, title=f"{path.name} on {args.split}: top-1 {result.top1:.2%} "
                                              f"({result.n} images)")
    if args.json:
        out = result.to_dict()
        out.update(checkpoint=str(path), split=args.split, confusion_png=str(png))
        print(json.dumps(out))
        return 0
    print(f"checkpoint  {path}")
    print(f"split       {args.split} ({result.n} images)")
    print(f"top-1       {result.top1:.4f}")
    print(f"top-5       {result.top5:.4f}")
    print(f"loss        {result.loss:.4f}")
    print("per class:")
    width = max(len(name) for name in result.class_names)
    counts = result.confusion.sum(dim=1).tolist()
    for (name, accuracy), count in zip(result.per_class.items(), counts):
        print(f"  {name.ljust(width)}  {accuracy:.4f}  ({count} images)")
    print(f"confusion matrix: {png}")
    return 0
