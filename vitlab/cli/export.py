"""`vitlab export [CHECKPOINT] --format onnx|torchscript --out FILE`: a verified, self-describing
model file for deployment without vitlab."""

from __future__ import annotations

from .model_source import add_preset_option


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="export a model to ONNX or TorchScript and verify it against PyTorch",
        description="Exports normalised images (batch, C, H, W) -> logits with a dynamic batch "
                    "dimension; class names and preprocessing go into the file's metadata. The file "
                    "is loaded back and its logits compared with PyTorch's before it is kept.")
    p.add_argument("checkpoint", nargs="?", metavar="CHECKPOINT",
                   help="a run directory, a .safetensors checkpoint, or a preset name (random weights)")
    p.add_argument("--format", metavar="onnx|torchscript",
                   help="output format (default: from the --out suffix, .onnx or .pt)")
    p.add_argument("--out", required=True, metavar="FILE", help="the file to write")
    add_preset_option(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..export import MissingDependencyError, check_writable, export_model, require_packages, resolve_format
    from .errors import CLIError
    from .model_source import load_model_source

    try:
        # the cheap checks first, so a typo does not wait for a checkpoint to load
        require_packages(resolve_format(args.format, args.out))
        check_writable(args.out)
        classifier, description = load_model_source(args.checkpoint, args.preset)
        result = export_model(classifier, args.out, args.format)
    except MissingDependencyError as error:
        raise CLIError(str(error)) from None
    sizes = " and ".join(str(n) for n in result.batch_sizes)
    print(f"exported {description} to {result.path} ({result.format}, {result.size_bytes / 1e6:.1f} MB)")
    print(f"verified with {result.runtime}: batches of {sizes}, max |logit difference| vs PyTorch "
          f"{result.max_abs_diff:.1e} <= 1e-4")
    return 0
