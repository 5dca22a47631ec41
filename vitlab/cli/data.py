"""`vitlab data inspect SOURCE`: what a dataset holds, before training on it."""

from __future__ import annotations

from .arguments import non_negative_int, positive_int
from .errors import CLIError


def register(subparsers) -> None:
    p = subparsers.add_parser("data", help="inspect a dataset: counts, image size, channel statistics")
    actions = p.add_subparsers(dest="data_command", metavar="ACTION")
    inspect = actions.add_parser("inspect", help="per-split and per-class counts, size, mean/std; sample grid")
    inspect.add_argument("source", help="image folder, .tar/.tar.gz/.zip, CIFAR python archive, cifar10 or cifar100")
    inspect.add_argument("--grid", metavar="FILE.png", help="write a grid of sample images (one row per class)")
    inspect.add_argument("--augment", metavar="PRESET", help="show the grid's samples augmented by this "
                         "preset (none, light, strong)")
    inspect.add_argument("--per-class", type=positive_int, default=8, help="grid columns: samples per class (default 8)")
    inspect.add_argument("--val-size", type=float, default=None,
                         help="validation images held out of train (a count, or a fraction < 1)")
    inspect.add_argument("--split-seed", type=non_negative_int, default=0)
    inspect.add_argument("--image-size", type=positive_int, default=None, help="resize every image to this size")
    inspect.add_argument("--channels", type=int, choices=(1, 3), default=None)
    inspect.add_argument("--cache-dir", default=None, help="decoded-data cache (default $VITLAB_CACHE or ~/.cache/vitlab)")
    inspect.set_defaults(func=run_inspect)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _val_size(value):
    if value is None or value < 1:
        return value
    if not float(value).is_integer():
        raise CLIError(f"--val-size must be a whole number of images or a fraction below 1, got {value}")
    return int(value)


def run_inspect(args) -> int:
    import warnings

    from ..data import augment_preset, load_data
    from ..data.imageset import channel_stats

    augment = augment_preset(args.augment) if args.augment else None
    if args.augment and not args.grid:
        raise CLIError("--augment shows augmented samples in the grid: add --grid FILE.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        splits = load_data(args.source, val_size=_val_size(args.val_size), split_seed=args.split_seed,
                           image_size=args.image_size, channels=args.channels, cache_dir=args.cache_dir)
    named = splits.splits()
    total = sum(len(s) for s in named.values())
    h, w = splits.image_size
    print(f"source    {splits.source}")
    print(f"images    {total:,} in {splits.num_classes} classes, {h}x{w}, {splits.in_channels} channel(s)")
    if splits.skipped:
        print(f"skipped   {len(splits.skipped)} unreadable: {', '.join(splits.skipped[:5])}"
              + (", ..." if len(splits.skipped) > 5 else ""))
    for warning in caught:
        if "archive member" in str(warning.message) or "larger than" in str(warning.message):
            print(f"warning   {warning.message}")
    print()

    rows = [["split", "images", "mean", "std"]]
    for name, subset in named.items():
        mean, std = (splits.mean, splits.std) if name == "train" else channel_stats(subset.images)
        rows.append([name, f"{len(subset):,}", " ".join(f"{m:.4f}" for m in mean), " ".join(f"{s:.4f}" for s in std)])
    _print_table(rows)
    print("mean/std: per channel, pixel/255; training normalises with the train split's")
    print()

    counts = {name: subset.class_counts() for name, subset in named.items()}
    rows = [["class", *named, "total"]]
    for k, cls in enumerate(splits.class_names):
        per = [counts[name][k] for name in named]
        rows.append([cls, *(f"{c:,}" for c in per), f"{sum(per):,}"])
    rows.append(["total", *(f"{len(s):,}" for s in named.values()), f"{total:,}"])
    _print_table(rows)

    if args.grid:
        write_grid(splits, args.grid, args.per_class, augment)
        print(f"\nwrote {args.grid}" + (f" ({args.augment} augmentation)" if augment else ""))
    return 0


def _print_table(rows: list[list[str]]) -> None:
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(wd) if k == 0 else c.rjust(wd) for k, (c, wd) in enumerate(zip(r, widths))).rstrip())


def write_grid(splits, path, per_class: int, augment=None, max_classes: int = 20) -> None:
    """One row per class (the first max_classes), per_class training samples each; with augment,
    the samples as the training loader would serve them (normalisation undone for display)."""
    import torch

    from ..data import BatchLoader
    from ..plots import plot_image_grid

    train = splits.train
    classes = list(range(min(splits.num_classes, max_classes)))
    picks = [torch.nonzero(train.labels == k).squeeze(1)[:per_class] for k in classes]
    index = torch.cat(picks)
    if augment is not None:
        loader = BatchLoader(train, len(index), mean=splits.mean, std=splits.std, train=True, augment=augment)
        images, _ = loader.make_batch(index, batch_seed=0)
        mean = torch.tensor(splits.mean).view(1, -1, 1, 1)
        std = torch.tensor(splits.std).view(1, -1, 1, 1)
        images = (images * std + mean).clamp(0, 1)  # float (B, C, H, W) in [0, 1]
    else:
        images = train.images[index].float() / 255
    labels = [k for k, pick in zip(classes, picks) for _ in range(len(pick))]
    names = [splits.class_names[k] for k in classes if len(picks[k])]
    plot_image_grid(images, labels, names, path, per_class)
