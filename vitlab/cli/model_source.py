"""Model options shared by the commands: the model argument of `vitlab attention`, `summary` and
`export` (a checkpoint, run directory or .safetensors file, a preset name, which builds that
preset with random weights, or nothing: the shipped model), and the --precision of `predict`, `eval` and `embed`."""

from __future__ import annotations

from pathlib import Path


def add_preset_option(parser) -> None:
    parser.add_argument("--preset", metavar="NAME",
                        help="use this model preset with random weights instead of a checkpoint")


def add_precision_option(parser) -> None:
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                        help="number format of inference: auto (default) is bf16 where this machine "
                             "computes it natively, else fp32; bf16 elsewhere runs emulated (slower)")


def add_tta_option(parser) -> None:
    parser.add_argument("--tta", choices=["none", "flip"], default="none",
                        help="test-time augmentation: flip averages each image with its mirror image "
                             "(twice the compute)")


def load_model_source(source: str | None, preset: str | None = None):
    """(vitlab.Classifier, one-line description of where it came from)."""
    from ..checkpoint import load_checkpoint
    from ..classifier import Classifier
    from ..presets import PRESETS, create_model
    from .errors import CLIError

    if source is not None and preset is not None:
        raise CLIError(f"give either a checkpoint ({source}) or --preset {preset}, not both")
    if preset is None and source in PRESETS and not Path(source).exists():
        preset = source
    if preset is not None:
        return Classifier(create_model(preset)).eval(), f"preset {preset} (random weights)"
    if source is None:
        return load_checkpoint(None), "the shipped CIFAR-10 model (docs/model-card.md)"
    if not Path(source).exists():
        raise CLIError(f"{source} is neither a checkpoint (no such file or directory) nor a model preset "
                       f"({', '.join(PRESETS)})")
    return load_checkpoint(source), str(source)
