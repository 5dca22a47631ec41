"""Weight mapping between vitlab and its peers: the seed's code and timm's VisionTransformer.

Each mapping is a list of (peer pattern, vitlab pattern) regexes applied to every key, so a
reader can check a conversion against both models' module names at a glance.
"""

from __future__ import annotations

import re
from functools import partial

import torch
from torch import nn

from .model import ViTConfig

StateDict = dict[str, torch.Tensor]

# seed attribute names -> vitlab names. The seed's nn.MultiheadAttention keeps q, k and v in one
# in_proj matrix in the same (3*D, D) layout as vitlab's qkv Linear, so no reshaping is needed.
_SEED_TO_VITLAB = [
    (r"^transformer_encoder\.(\d+)\.attention\.in_proj_weight$", r"blocks.\1.attention.qkv.weight"),
    (r"^transformer_encoder\.(\d+)\.attention\.in_proj_bias$", r"blocks.\1.attention.qkv.bias"),
    (r"^transformer_encoder\.(\d+)\.attention\.out_proj\.", r"blocks.\1.attention.proj."),
    (r"^transformer_encoder\.(\d+)\.mlp\.0\.", r"blocks.\1.mlp.fc1."),
    (r"^transformer_encoder\.(\d+)\.mlp\.3\.", r"blocks.\1.mlp.fc2."),
    (r"^transformer_encoder\.(\d+)\.(norm[12])\.", r"blocks.\1.\2."),
    (r"^mlp_head\.0\.", "head_norm."),
    (r"^mlp_head\.1\.", "head."),
    (r"^(patch_embedding\.projection\.(weight|bias)|cls_token|pos_embedding)$", r"\1"),
]

# timm names -> vitlab names ("norm" is timm's final norm for [CLS] pooling; "fc_norm" for mean)
_TIMM_TO_VITLAB = [
    (r"^patch_embed\.proj\.", "patch_embedding.projection."),
    (r"^pos_embed$", "pos_embedding"),
    (r"^cls_token$", "cls_token"),
    (r"^blocks\.(\d+)\.attn\.", r"blocks.\1.attention."),
    (r"^blocks\.(\d+)\.ls1\.gamma$", r"blocks.\1.scale1.gamma"),
    (r"^blocks\.(\d+)\.ls2\.gamma$", r"blocks.\1.scale2.gamma"),
    (r"^blocks\.(\d+)\.(norm1|norm2|mlp\.fc1|mlp\.fc2)\.", r"blocks.\1.\2."),
    (r"^(fc_)?norm\.", "head_norm."),
    (r"^head\.", "head."),
]


def _rename(sd: StateDict, rules: list[tuple[str, str]], source: str) -> StateDict:
    out: StateDict = {}
    unknown = []
    for key, value in sd.items():
        for pattern, replacement in rules:
            new_key, n = re.subn(pattern, replacement, key)
            if n:
                out[new_key] = value
                break
        else:
            unknown.append(key)
    if unknown:
        shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise ValueError(f"{len(unknown)} key(s) are not part of a {source} ViT: {shown}")
    return out


def from_seed_state_dict(sd: StateDict) -> StateDict:
    """A state_dict saved from the seed's VisionTransformer -> one vitlab's model loads."""
    return _rename(sd, _SEED_TO_VITLAB, "seed")


def from_timm_state_dict(sd: StateDict) -> StateDict:
    """A timm VisionTransformer state_dict -> vitlab names.

    timm's models with [CLS] pooling normalise every token ("norm") and mean-pooling models
    normalise the pooled vector ("fc_norm"); vitlab's head_norm plays whichever role is present.
    """
    has_fc_norm = any(k.startswith("fc_norm.") for k in sd)
    if has_fc_norm and any(k.startswith("norm.") for k in sd):
        raise ValueError("state_dict has both 'norm' and 'fc_norm': vitlab has one head norm")
    return _rename(sd, _TIMM_TO_VITLAB, "timm")


def to_timm_state_dict(sd: StateDict, pooling: str = "cls") -> StateDict:
    """vitlab -> timm names, for timm.models.vision_transformer.VisionTransformer
    built with timm_model_kwargs(config)."""
    out: StateDict = {}
    for key, value in sd.items():
        new = key
        new = re.sub(r"^patch_embedding\.projection\.", "patch_embed.proj.", new)
        new = re.sub(r"^pos_embedding$", "pos_embed", new)
        new = re.sub(r"^blocks\.(\d+)\.attention\.", r"blocks.\1.attn.", new)
        new = re.sub(r"^blocks\.(\d+)\.scale([12])\.gamma$", r"blocks.\1.ls\2.gamma", new)
        new = re.sub(r"^head_norm\.", "fc_norm." if pooling == "mean" else "norm.", new)
        out[new] = value
    return out


def timm_model_kwargs(config: ViTConfig) -> dict:
    """Arguments for timm's VisionTransformer that build the same network as `config`."""
    attention_dropout = config.dropout if config.attention_dropout is None else config.attention_dropout
    if config.mlp_dim % config.dim:
        raise ValueError(f"timm needs mlp_dim ({config.mlp_dim}) to be a multiple of dim ({config.dim})")
    return dict(
        img_size=config.image_size,
        patch_size=config.patch_size,
        in_chans=config.in_channels,
        num_classes=config.num_classes,
        global_pool="avg" if config.pooling == "mean" else "token",
        embed_dim=config.dim,
        depth=config.depth,
        num_heads=config.heads,
        mlp_ratio=config.mlp_dim / config.dim,
        qkv_bias=config.qkv_bias,
        init_values=config.layer_scale,
        # timm also drops after the attention projection, which the seed does not: the two
        # networks are identical in eval mode and differ only in where training dropout falls.
        drop_rate=0.0,
        pos_drop_rate=config.dropout,
        proj_drop_rate=config.dropout,
        attn_drop_rate=attention_dropout,
        drop_path_rate=config.drop_path,
        norm_layer=partial(nn.LayerNorm, eps=config.norm_eps),
    )
