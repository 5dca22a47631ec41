"""A per-module account of a model: parameters, FLOPs per image and output activation size.

Parameters are counted from the model itself and FLOPs come from vitlab.flops.flops_breakdown, so
the totals are the numbers `vitlab models` prints. Output shapes are measured by running a copy of
the model on the meta device (shapes only, no memory, no arithmetic).

Shape legend: T tokens ([CLS] + patches), D width, K classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .flops import flops_breakdown
from .model import LayerScale, VisionTransformer


@dataclass
class ModuleRow:
    name: str  # dotted module path, "pos_embedding+cls_token" for the two loose parameters
    kind: str  # class name of the module
    output_shape: tuple[int, ...]  # per image (no batch dimension)
    parameters: int
    flops: int  # forward FLOPs per image, multiply-add = 2 (0 for parts flops.py does not count)

    @property
    def activations(self) -> int:
        """Elements of this module's output for one image."""
        n = 1
        for size in self.output_shape:
            n *= size
        return n


@dataclass
class ModelSummary:
    rows: list[ModuleRow]
    parameters: int  # every parameter of the model
    flops: int  # forward FLOPs per image, equal to vitlab.forward_flops(config)
    input_shape: tuple[int, int, int]  # (C, H, W)
    tokens: int

    @property
    def activations(self) -> int:
        """Sum of the listed modules' outputs per image: a lower bound on what training stores."""
        return sum(row.activations for row in self.rows)


def _listed_modules(model: VisionTransformer) -> list[tuple[str, torch.nn.Module]]:
    """The modules a reader thinks in: the stem, each block's norms, attention and MLP, the head."""
    listed = [("patch_embedding", model.patch_embedding)]
    for i, block in enumerate(model.blocks):
        for part in ("norm1", "attention", "norm2", "mlp"):
            listed.append((f"blocks.{i}.{part}", getattr(block, part)))
        for part in ("scale1", "scale2"):
            module = getattr(block, part)
            if isinstance(module, LayerScale):  # nn.Identity when the model has no LayerScale
                listed.append((f"blocks.{i}.{part}", module))
    listed += [("head_norm", model.head_norm), ("head", model.head)]
    return listed


def summarize(model: VisionTransformer) -> ModelSummary:
    """Per-module parameters, FLOPs and output shapes of `model` at its configured image size."""
    model = getattr(model, "model", model)  # a vitlab.Classifier wraps the VisionTransformer
    config = model.config
    height, width = model.patch_embedding.image_size
    flops = flops_breakdown(config, (height, width))

    # Shapes from a meta-device twin: costs nothing even for the largest preset.
    with torch.device("meta"):
        twin = VisionTransformer.from_config(config)
    if twin.patch_embedding.image_size != (height, width):  # the model was resized after building
        twin.set_image_size((height, width))
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [
        module.register_forward_hook(lambda _m, _i, out, name=name: shapes.__setitem__(name, tuple(out.shape[1:])))
        for name, module in _listed_modules(twin)
    ]
    try:
        # every token through every block: the architecture as papers count it, as the FLOPs
        # column does (model(x) skips all but [CLS] in the last block)
        images = torch.empty(1, config.in_channels, height, width, device="meta")
        twin.eval().forward_head(twin.forward_features(images))
    finally:
        for hook in hooks:
            hook.remove()

    tokens = model.patch_embedding.num_patches + 1
    dim = config.dim
    rows = [ModuleRow(name, type(module).__name__, shapes[name], sum(p.numel() for p in module.parameters()),
                      flops.get(name, 0))
            for name, module in _listed_modules(model)]
    loose = model.pos_embedding.numel() + model.cls_token.numel()
    rows.insert(1, ModuleRow("pos_embedding+cls_token", "Parameter", (tokens, dim), loose, 0))
    return ModelSummary(rows, model.num_parameters(), sum(flops.values()),
                        (config.in_channels, height, width), tokens)


def _human(n: float, units=("", "K", "M", "G", "T")) -> str:
    for unit in units:
        if abs(n) < 1000 or unit == units[-1]:
            return f"{n:.3g}{unit}" if unit else f"{n:,.0f}"
        n /= 1000


def format_summary(summary: ModelSummary, title: str) -> str:
    """The table `vitlab summary` prints."""
    header = ("module", "type", "output/img", "params", "MFLOPs/img", "activations/img")
    lines = [header]
    for row in summary.rows:
        lines.append((row.name, row.kind, "x".join(map(str, row.output_shape)),
                      f"{row.parameters:,}", f"{row.flops / 1e6:.3f}" if row.flops else "-",
                      f"{_human(row.activations)} ({row.activations * 4 / 1024:.0f} KiB)"))
    lines.append(("total", "", "", f"{summary.parameters:,}", f"{summary.flops / 1e6:.3f}",
                  f"{_human(summary.activations)} ({summary.activations * 4 / 1024 ** 2:.2f} MiB)"))
    widths = [max(len(line[k]) for line in lines) for k in range(len(header))]
    text = [title]
    for k, line in enumerate(lines):
        if k == len(lines) - 1:
            text.append("-" * (sum(widths) + 2 * (len(widths) - 1)))
        text.append("  ".join(cell.ljust(w) if c < 3 else cell.rjust(w)
                              for c, (cell, w) in enumerate(zip(line, widths))).rstrip())
    c, h, w = summary.input_shape
    text.append(f"total: {summary.parameters:,} parameters, {summary.flops / 1e9:.3f} GFLOPs per image "
                f"({h}x{w}x{c} input, {summary.tokens} tokens)")
    text.append("FLOPs: matrix products only, multiply-add = 2 (as `vitlab models`); activations: "
                "elements of each module's output per image, KiB in fp32")
    return "\n".join(text)
