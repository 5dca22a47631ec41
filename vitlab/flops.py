"""FLOPs of a forward pass, computed from the model's shapes.

A multiply-add counts as 2 FLOPs (the convention of most papers and of
torch.utils.flop_counter). Only matrix products are counted: LayerNorm, GELU, softmax and the
residual adds are a few percent of a ViT's arithmetic and are memory-bound anyway.
"""

from __future__ import annotations

from .model import ViTConfig, to_2tuple


def flops_breakdown(config: ViTConfig, image_size: int | tuple[int, int] | None = None,
                    cls_only: bool = False) -> dict[str, int]:
    """FLOPs per image of each part of the network: patch_embedding, each block's attention
    (qkv, scores, weighted sum, projection) and mlp, and the head.

    By default the full encoder, the figure papers and timm quote. cls_only=True counts what
    VisionTransformer.forward runs for a [CLS]-pooled model: the last block computes keys and
    values for every token but queries, projection and MLP for [CLS] alone.
    """
    h, w = to_2tuple(image_size if image_size is not None else config.image_size)
    p, d, m = config.patch_size, config.dim, config.mlp_dim
    n = (h // p) * (w // p)
    t = n + 1

    def attention(queries: int) -> int:
        return (2 * t * d * 3 * d  # qkv projection, for every token (keys and values need them)
                + 2 * queries * t * d  # Q K^T over all heads
                + 2 * queries * t * d  # weights @ V
                + 2 * queries * d * d)  # output projection

    out = {"patch_embedding": 2 * n * config.in_channels * p * p * d}
    for i in range(config.depth):
        rows = 1 if cls_only and i == config.depth - 1 else t
        out[f"blocks.{i}.attention"] = attention(rows)
        out[f"blocks.{i}.mlp"] = 2 * rows * d * m * 2
    out["head"] = 2 * d * config.num_classes
    return out


def forward_flops(config: ViTConfig, image_size: int | tuple[int, int] | None = None,
                  cls_only: bool = False) -> int:
    """FLOPs of one forward pass for one image (cls_only: see flops_breakdown)."""
    return sum(flops_breakdown(config, image_size, cls_only).values())


def training_flops(config: ViTConfig, image_size: int | tuple[int, int] | None = None,
                   cls_only: bool = False) -> int:
    """Forward + backward for one image: backward costs twice the forward (grad wrt inputs and
    weights), the standard 3x rule."""
    return 3 * forward_flops(config, image_size, cls_only)
