"""`vitlab export [CHECKPOINT] --format onnx|torchscript|folder|timm --out PATH`: a verified,
self-describing model for deployment without vitlab (ONNX, optionally int8; TorchScript), or a model
folder for vitlab.load or timm with a generated model card."""

from __future__ import annotations

from .model_source import add_preset_option


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="export a model to ONNX, TorchScript, a model folder or a timm folder, verified",
        description="onnx / torchscript: one file mapping normalised images (batch, C, H, W) to logits with a "
                    "dynamic batch dimension; class names and preprocessing go into its metadata. folder: "
                    "config.json, model.safetensors and a README.md model card, read back by vitlab.load(FOLDER). "
                    "timm: the same for timm.create_model. Every export is loaded back with its own runtime and "
                    "its logits compared with PyTorch's before it is kept; --quantize int8 is checked on "
                    "validation top-1 instead (within 1 point of fp32).")
    p.add_argument("checkpoint", nargs="?", metavar="CHECKPOINT",
                   help="a run directory, a .safetensors checkpoint, or a preset name (random weights); "
                        "default: the shipped CIFAR-10 model")
    p.add_argument("--format", metavar="onnx|torchscript|folder|timm",
                   help="output format (default: from the --out suffix, .onnx or .pt)")
    p.add_argument("--out", required=True, metavar="PATH",
                   help="the file to write, or the directory for --format folder and timm")
    p.add_argument("--quantize", metavar="int8",
                   help="ONNX only: int8 weights by ONNX Runtime's dynamic quantisation, about a quarter of the "
                        "size; needs --data to check the accuracy it costs")
    p.add_argument("--data", metavar="DATA",
                   help="labelled images for the --quantize check, as for vitlab eval: the checkpoint's "
                        "validation split of its training data, or every image of class folders")
    add_preset_option(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from ..export import (FOLDER_FORMATS, MissingDependencyError, check_quantize, check_writable, export_model,
                          require_packages, resolve_format)
    from ..runs import run_dir_of
    from .errors import CLIError
    from .model_source import load_model_source

    try:
        # the cheap checks first, so a typo does not wait for a checkpoint to load
        format = resolve_format(args.format, args.out)
        check_quantize(args.quantize, format, args.data)
        require_packages(format)
        check_writable(args.out, format)
        classifier, description = load_model_source(args.checkpoint, args.preset)
        # a checkpoint from a run directory: the folder formats' model card quotes the run
        from_checkpoint = args.preset is None and args.checkpoint is not None and Path(args.checkpoint).exists()
        run_dir = run_dir_of(args.checkpoint) if from_checkpoint else None
        result = export_model(classifier, args.out, format, quantize=args.quantize, data=args.data,
                              run_dir=run_dir, source=description, progress=True)
    except MissingDependencyError as error:
        raise CLIError(str(error)) from None
    sizes = " and ".join(str(n) for n in result.batch_sizes)
    kind = f"{result.format}, {result.quantize}" if result.quantize else result.format
    if result.format in FOLDER_FORMATS:
        kind += ": " + ", ".join(result.files)
    print(f"exported {description} to {result.path} ({kind}, {result.size_bytes / 1e6:.1f} MB)")
    if result.accuracy is None:
        print(f"verified with {result.runtime}: batches of {sizes}, max |logit difference| vs PyTorch "
              f"{result.max_abs_diff:.1e} <= 1e-4")
    else:
        a = result.accuracy
        images = (f"the {a['images']:,} held-out validation images" if a["split"] == "val"
                  else f"all {a['images']:,} images")
        drop = (a["fp32_top1"] - a["int8_top1"]) * 100
        change = f"{abs(drop):.2f} points {'below' if drop > 0 else 'above'} fp32" if drop else "the same as fp32"
        print(f"verified with {result.runtime}: batches of {sizes} run, max |logit difference| vs PyTorch "
              f"{result.max_abs_diff:.1e} (int8)")
        print(f"top-1 on {images} of {a['data']}: int8 {a['int8_top1']:.2%}, fp32 {a['fp32_top1']:.2%}, "
              f"{change} (at most 1 point below allowed)")
    return 0
