"""Named model configurations: the tutorial's CIFAR-10 instance and a family sized for 32x32 images.

`create_model("small", num_classes=100)` builds a preset with overrides. Parameter counts and
FLOPs shown by `list_models()` are computed from the built model, never typed in.
"""

from __future__ import annotations

from dataclasses import dataclass

from .flops import forward_flops
from .model import ViTConfig, VisionTransformer

# The 32x32 family keeps patch 4 (64 tokens + [CLS]) and the ViT/DeiT width ratios, with the
# initialisation and regularisation that train well from scratch on small images
# (trunc-normal init, stochastic depth instead of dropout, LayerNorm eps 1e-6 as timm).
_FAMILY = dict(
    image_size=32, patch_size=4, in_channels=3, num_classes=10, dropout=0.0,
    attention_dropout=0.0, init="trunc_normal", norm_eps=1e-6,
)

PRESETS: dict[str, dict] = {
    # The tutorial's model, exactly: 18,979,338 parameters.
    "seed": dict(image_size=32, patch_size=4, in_channels=3, num_classes=10, dim=512, depth=6,
                 heads=8, mlp_dim=2048, dropout=0.1),
    "nano": dict(_FAMILY, dim=128, depth=6, heads=4, mlp_dim=512, drop_path=0.0),
    "tiny": dict(_FAMILY, dim=192, depth=9, heads=3, mlp_dim=768, drop_path=0.05),
    # ViT-Lite-7/4's shape (Hassani et al., 2021, "Escaping the Big Data Paradigm with Compact
    # Transformers"): a plain ViT that reaches ~91% on CIFAR-10 from scratch with heavy augmentation;
    # 3.7M parameters, 7.5 MB in bf16. The model vitlab ships.
    "lite": dict(_FAMILY, dim=256, depth=7, heads=4, mlp_dim=512, drop_path=0.1, init="mimetic"),
    "small": dict(_FAMILY, dim=384, depth=9, heads=6, mlp_dim=1536, drop_path=0.1),
    "base": dict(_FAMILY, dim=768, depth=12, heads=12, mlp_dim=3072, drop_path=0.2),
}

DESCRIPTIONS = {
    "seed": "the tutorial's CIFAR-10 ViT, exactly",
    "nano": "quick CPU runs and tests",
    "tiny": "laptop-CPU training",
    "lite": "ViT-Lite-7/4 shape: the shipped model",
    "small": "the default for a GPU",
    "base": "ViT-Base width on 32x32 images",
}


def preset_config(name: str, **overrides) -> ViTConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return ViTConfig.from_dict({**PRESETS[name], **overrides})


def create_model(name: str, **overrides) -> VisionTransformer:
    """Builds preset `name`, with any ViTConfig field overridden (num_classes=100, drop_path=0.2...)."""
    return VisionTransformer.from_config(preset_config(name, **overrides))


@dataclass
class PresetInfo:
    name: str
    tokens: int
    parameters: int
    gflops: float  # forward, per image
    config: ViTConfig
    description: str


def list_models() -> list[str]:
    return list(PRESETS)


def describe_models() -> list[PresetInfo]:
    """Builds every preset on the meta device (no memory, no init) and measures it."""
    import torch

    infos = []
    for name in PRESETS:
        config = preset_config(name)
        with torch.device("meta"):
            model = VisionTransformer.from_config(config)
        tokens = model.patch_embedding.num_patches + 1
        infos.append(PresetInfo(name, tokens, model.num_parameters(), forward_flops(config) / 1e9,
                                config, DESCRIPTIONS[name]))
    return infos
