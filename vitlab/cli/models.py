"""`vitlab models`: the table of model presets."""

from __future__ import annotations

import json


def register(subparsers) -> None:
    p = subparsers.add_parser("models", help="list the model presets with their size and cost")
    p.add_argument("--json", action="store_true", help="one JSON object per preset instead of a table")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..presets import describe_models

    infos = describe_models()
    if args.json:
        for i in infos:
            print(json.dumps({"name": i.name, "tokens": i.tokens, "parameters": i.parameters,
                              "gflops": round(i.gflops, 4), "config": i.config.to_dict()}))
        return 0
    rows = [("preset", "tokens", "params", "GFLOPs/img", "dim", "depth", "heads", "mlp", "patch", "")]
    for i in infos:
        c = i.config
        rows.append((i.name, str(i.tokens), f"{i.parameters:,}", f"{i.gflops:.3f}", str(c.dim),
                     str(c.depth), str(c.heads), str(c.mlp_dim), str(c.patch_size), i.description))
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) if k in (0, len(r) - 1) else cell.rjust(w)
                        for k, (cell, w) in enumerate(zip(r, widths))).rstrip())
    print("GFLOPs: forward pass per image at the preset's image size, multiply-add = 2 FLOPs")
    return 0
