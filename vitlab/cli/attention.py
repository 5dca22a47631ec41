"""`vitlab attention [CHECKPOINT] IMAGE --out FILE.png`: what the model looks at in one image."""

from __future__ import annotations

from .model_source import add_preset_option


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "attention", help="draw attention rollout and every head's attention for one image",
        description="Draws one figure: the image, the attention rollout over it, and the [CLS] "
                    "attention of every head in every layer, titled with the predicted class.")
    p.add_argument("checkpoint", nargs="?", metavar="CHECKPOINT",
                   help="a run directory, a .safetensors checkpoint, or a preset name (random weights); "
                        "default: the shipped CIFAR-10 model")
    p.add_argument("image", metavar="IMAGE", help="an image file (any size; resized as in training)")
    p.add_argument("--out", required=True, metavar="FILE.png", help="where to write the figure (.png, .pdf, .svg)")
    add_preset_option(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from ..attention import attention_maps
    from ..plots import plot_attention
    from ..data import load_image
    from .errors import CLIError
    from .model_source import load_model_source

    out = Path(args.out)
    if out.suffix.lower() not in (".png", ".pdf", ".svg", ".jpg", ".jpeg"):
        raise CLIError(f"--out {out}: give a .png, .pdf, .svg or .jpg file name")
    if not out.parent.is_dir():
        raise CLIError(f"cannot write {out}: directory {out.parent} does not exist")
    classifier, description = load_model_source(args.checkpoint, args.preset)
    pixels = load_image(args.image, classifier.image_size, classifier.in_channels)  # uint8 (C, H, W)
    maps = attention_maps(classifier, classifier.preprocess(pixels))
    plot_attention(pixels, maps, out, class_names=classifier.class_names,
                   title=f"{Path(args.image).name} - {description}")
    probabilities = maps.probabilities[0]
    best = int(probabilities.argmax())
    print(f"predicted {classifier.class_names[best]} ({probabilities[best]:.1%}); "
          f"{len(maps.attentions)} layers x {maps.attentions.shape[2]} heads on a "
          f"{maps.grid_size[0]}x{maps.grid_size[1]} patch grid; wrote {out}")
    return 0
