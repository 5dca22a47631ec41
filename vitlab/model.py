"""The Vision Transformer, in one file.

With its default arguments this is exactly the model of a popular line-by-line PyTorch ViT
tutorial for CIFAR-10 (Conv2d patch embedding, learnable [CLS] token and position embedding,
pre-norm encoder blocks, LayerNorm + Linear head): the `seed` preset, 18,979,338 parameters.
Everything beyond the tutorial is an option that is off by default.

Shape legend used in comments: B batch, C channels, H/W image size, P patch size,
N patches, T = N + 1 tokens, D model width, M MLP width, K classes, h heads, d = D / h.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
import operator
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .init import INITS, init_weights


def _is_int(value) -> bool:
    """A whole number: int, a numpy integer, or an integer tensor (shapes traced by torch.jit/export)."""
    if isinstance(value, bool):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def to_2tuple(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """32 -> (32, 32); (32, 48) or [32, 48] -> (32, 48). Sizes must be positive whole numbers."""
    # the tuple test first: torch 2.11's dynamo turns _is_int's TypeError on a tuple into an internal
    # error, so `vitlab train --compile` failed at its first step there
    pair = tuple(size) if isinstance(size, (tuple, list)) else (size, size) if _is_int(size) else ()
    if len(pair) != 2 or not all(_is_int(s) and s >= 1 for s in pair):
        raise ValueError(f"image size must be a positive int or (height, width), got {size!r}")
    return int(pair[0]), int(pair[1])


def patch_grid(image_size, patch_size: int) -> tuple[int, int]:
    """(H, W) -> the (H/P, W/P) patch grid, or an error if P does not divide both sides."""
    h, w = to_2tuple(image_size)
    if h % patch_size or w % patch_size:
        raise ValueError(f"image size {h}x{w} is not divisible by patch size {patch_size}: "
                         f"choose a patch size that divides both sides")
    return h // patch_size, w // patch_size


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


# Upper bounds on a config, so that one read from an untrusted file (a checkpoint's metadata, a run's
# config.json) cannot ask for more memory than a machine has before any weight is checked. Far
# above any ViT trained (ViT-22B: dim 6144, depth 48, MLP 24576; ViT-g: ~1e9 parameters).
LIMITS = {"dim": 8192, "depth": 128, "heads": 256, "mlp_dim": 32768}
MAX_PARAMETERS = 2**31  # 8 GiB of fp32 weights
# The patch grid bounds the (T, T) attention weights the explicit attention path forms: at 4,096
# patches one head of one image takes 64 MiB in fp32 (a 256x256 image at patch 4, 1024x1024 at 16).
MAX_PATCHES = 4096


@dataclass(frozen=True)
class ViTConfig:
    """The architecture: everything needed to rebuild a model; saved beside every checkpoint."""

    image_size: int | tuple[int, int] = 32
    patch_size: int = 4
    in_channels: int = 3
    num_classes: int = 10
    dim: int = 512
    depth: int = 6
    heads: int = 8
    mlp_dim: int = 2048
    dropout: float = 0.1
    attention_dropout: float | None = None  # None: same as dropout, as the tutorial's nn.MultiheadAttention
    drop_path: float = 0.0  # stochastic depth rate of the last block, linear from 0
    layer_scale: float | None = None  # LayerScale initial value (CaiT); None disables it
    qkv_bias: bool = True
    norm_eps: float = 1e-5
    pooling: Literal["cls", "mean"] = "cls"
    init: Literal["seed", "trunc_normal", "mimetic"] = "seed"
    dynamic_image_size: bool = False  # resample the position embedding for other input sizes

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_size", self.image_size if _is_int(self.image_size) and self.image_size > 0
                           else to_2tuple(self.image_size))
        v = self.__dict__
        counts = ("patch_size", "in_channels", "num_classes", "dim", "depth", "heads", "mlp_dim")
        problems = [f"{k} must be a positive integer, got {v[k]!r}" for k in counts if not (_is_int(v[k]) and v[k] >= 1)]
        problems += [f"{k} must be at most {LIMITS[k]:,}, got {v[k]:,}" for k in LIMITS
                     if not problems and v[k] > LIMITS[k]]
        problems += [f"{k} must be in [0, 1), got {v[k]!r}" for k in ("dropout", "attention_dropout", "drop_path")
                     if v[k] is not None and not (_is_real(v[k]) and 0.0 <= v[k] < 1.0)]
        problems += [f"{k} must be positive, got {v[k]!r}" for k in ("layer_scale", "norm_eps")
                     if v[k] is not None and not (_is_real(v[k]) and v[k] > 0)]
        problems += [f"{k} must be true or false, got {v[k]!r}" for k in ("qkv_bias", "dynamic_image_size")
                     if not isinstance(v[k], bool)]
        problems += [f"{k} must be {' or '.join(map(repr, allowed))}, got {v[k]!r}"
                     for k, allowed in (("pooling", ("cls", "mean")), ("init", INITS)) if v[k] not in allowed]
        if not problems and self.dim % self.heads:
            problems.append(f"dim ({self.dim}) must be divisible by heads ({self.heads})")
        if not problems:
            h, w = to_2tuple(self.image_size)
            patches = (h // self.patch_size) * (w // self.patch_size)
            if patches > MAX_PATCHES:
                problems.append(f"image size {h}x{w} with patch size {self.patch_size} makes {patches:,} patches, "
                                f"more than {MAX_PATCHES:,}: use a larger patch size or a smaller image size")
            elif self.parameter_count() > MAX_PARAMETERS:
                problems.append(f"this config has {self.parameter_count():,} parameters, more than vitlab "
                                f"builds ({MAX_PARAMETERS:,}); lower dim, depth, mlp_dim or num_classes")
        if problems:
            raise ValueError(problems[0])

    def parameter_count(self) -> int:
        """The number of parameters VisionTransformer.from_config(self) has, without building it."""
        h, w = to_2tuple(self.image_size)
        d, m, k = self.dim, self.mlp_dim, self.num_classes
        block = (4 * d  # norm1, norm2
                 + 3 * d * d + (3 * d if self.qkv_bias else 0)  # qkv
                 + d * d + d  # proj
                 + d * m + m + m * d + d  # fc1, fc2
                 + (2 * d if self.layer_scale is not None else 0))
        tokens = (h // self.patch_size) * (w // self.patch_size) + 1
        return (self.in_channels * self.patch_size**2 * d + d  # patch projection
                + d + tokens * d  # [CLS] token, position embedding
                + self.depth * block
                + 2 * d + d * k + k)  # head norm, head

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if isinstance(d["image_size"], tuple):
            d["image_size"] = list(d["image_size"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ViTConfig":
        d = {k: v for k, v in d.items() if k != "class_names"}  # legacy key of old checkpoints
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(unknown)}")
        return cls(**d)


def prefers_explicit_attention(device: torch.device, dtype: torch.dtype, dropout_p: float) -> bool:
    """Whether softmax(Q K^T / sqrt(d)) V in two batched matmuls beats F.scaled_dot_product_attention.

    Only on CPU, in bf16 or with attention dropout. Measured at the seed preset's shapes (T = 65,
    d = 64, batch 64, 8 heads) on a 2-core AMD EPYC with AVX512-BF16 (BENCHMARKS.md, "What makes
    vitlab faster"): in bf16 SDPA's CPU flash kernel took 13.5 ms forward and 77 ms forward +
    backward, the matmuls 5.0 and 14.4 ms (~5x faster backward). In fp32 the two are even, so
    SDPA stays; with dropout SDPA on CPU falls back to its own unfused math path anyway. CUDA
    always takes SDPA (flash / memory-efficient kernels).
    """
    return device.type == "cpu" and (dtype == torch.bfloat16 or dropout_p > 0.0)


class PatchEmbedding(nn.Module):
    """Cuts the image into non-overlapping P x P patches and projects each to D dims.

    A Conv2d with kernel = stride = P is exactly a per-patch linear layer, and the fastest one.
    """

    def __init__(self, image_size, patch_size: int, in_channels: int, dim: int):
        super().__init__()
        self.grid_size = patch_grid(image_size, patch_size)
        self.image_size = to_2tuple(image_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.projection = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.projection(x)  # (B, D, H/P, W/P)
        return x.flatten(2).transpose(1, 2)  # (B, N, D)


class Attention(nn.Module):
    """Multi-head self-attention, one fused path and one explicit path (as timm's Attention).

    The fused path is F.scaled_dot_product_attention (flash / memory-efficient kernels). The
    explicit path forms the (B, h, Tq, T) softmax weights, so it can return them (attention maps,
    reference tests); `prefers_explicit_attention` says where it is also the faster one.
    """

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True, attention_dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attention_dropout)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cls_only: bool = False, return_weights: bool = False):
        """(B, T, D) -> (B, T, D). cls_only: (B, 1, D), the first token's output alone, still
        attending to every token. return_weights: also the weights (B, h, Tq, T), before dropout."""
        b, t, d = x.shape
        dropout_p = self.attn_drop.p if self.training else 0.0
        qkv = self.qkv(x).reshape(b, t, 3, self.heads, self.head_dim)  # (B, T, 3, h, d)
        qkv = qkv.permute(2, 0, 3, 1, 4)  # (3, B, h, T, d), a view
        explicit = return_weights or prefers_explicit_attention(x.device, qkv.dtype, dropout_p)
        if explicit:
            qkv = qkv.contiguous()  # one copy to head-major: every matmul reads contiguous (T, d) blocks
        q, k, v = qkv.unbind(0)  # each (B, h, T, d)
        if cls_only:
            q = q[:, :, :1]  # (B, h, 1, d)
        weights = None
        if explicit:
            weights = (q @ k.transpose(-2, -1)).mul_(self.scale).softmax(dim=-1)  # (B, h, Tq, T)
            x = self.attn_drop(weights) @ v  # (B, h, Tq, d)
        else:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)  # (B, h, Tq, d)
        x = self.proj(x.transpose(1, 2).reshape(b, q.shape[2], d))  # (B, Tq, D)
        return (x, weights) if return_weights else x


class MLP(nn.Module):
    """Linear, GELU, Dropout, Linear, Dropout, as in the tutorial."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop1(self.act(self.fc1(x)))  # (B, T, M)
        return self.drop2(self.fc2(x))  # (B, T, D)


class LayerScale(nn.Module):
    """Multiplies each channel by a learned gain that starts at `init_value` (CaiT)."""

    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.init_value = init_value
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gamma, self.init_value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth: in training, zeroes the whole residual branch of a random subset of
    samples (each with probability `rate`) and scales the rest by 1 / (1 - rate)."""

    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)  # (B, 1, 1)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


class TransformerEncoderBlock(nn.Module):
    """Pre-norm block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float = 0.1,
                 attention_dropout: float | None = None, qkv_bias: bool = True, drop_path: float = 0.0,
                 layer_scale: float | None = None, norm_eps: float = 1e-5):
        super().__init__()
        attention_dropout = dropout if attention_dropout is None else attention_dropout
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attention = Attention(dim, heads, qkv_bias, attention_dropout)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = MLP(dim, mlp_dim, dropout)
        self.scale1 = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()
        self.scale2 = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, cls_only: bool = False, return_weights: bool = False):
        """(B, T, D) -> (B, T, D); cls_only: (B, 1, D), the [CLS] token's output alone;
        return_weights: also the attention weights (B, h, Tq, T)."""
        attended = self.attention(self.norm1(x), cls_only, return_weights)
        attended, weights = attended if return_weights else (attended, None)
        if cls_only:
            x = x[:, :1]
        x = x + self.drop_path(self.scale1(attended))
        x = x + self.drop_path(self.scale2(self.mlp(self.norm2(x))))
        return (x, weights) if return_weights else x


def resample_position_embedding(pos: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int],
                                prefix_tokens: int = 1) -> torch.Tensor:
    """Bicubically resizes a (1, prefix + H*W, D) position embedding to another patch grid.

    The [CLS] entry is kept as is; the patch entries are treated as a D-channel image.
    """
    if tuple(old_grid) == tuple(new_grid):
        return pos
    prefix, patches = pos[:, :prefix_tokens], pos[:, prefix_tokens:]
    if patches.shape[1] != old_grid[0] * old_grid[1]:
        raise ValueError(f"position embedding has {patches.shape[1]} patch entries, "
                         f"which does not match a {old_grid[0]}x{old_grid[1]} grid")
    d = patches.shape[-1]
    grid = patches.reshape(1, old_grid[0], old_grid[1], d).permute(0, 3, 1, 2)  # (1, D, gh, gw)
    grid = F.interpolate(grid.float(), size=new_grid, mode="bicubic", align_corners=False)
    patches = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], d).to(pos.dtype)
    return torch.cat([prefix, patches], dim=1)


class ViTIntermediates(NamedTuple):
    logits: torch.Tensor  # (B, K)
    features: list[torch.Tensor]  # per block output, each (B, T, D)
    attentions: list[torch.Tensor]  # per block attention weights, each (B, h, T, T)


class VisionTransformer(nn.Module):
    """Vision Transformer (Dosovitskiy et al., 2021), as the tutorial builds it by default.

    forward(images) -> logits. The pieces are exposed as in timm: embed, forward_features
    (tokens after the encoder), pool and forward_head (pool, norm, classify).
    """

    def __init__(self, image_size: int | tuple[int, int] = 32, patch_size: int = 4, in_channels: int = 3,
                 num_classes: int = 10, dim: int = 512, depth: int = 6, heads: int = 8, mlp_dim: int = 2048,
                 dropout: float = 0.1, **options):
        super().__init__()
        config = ViTConfig(image_size=image_size, patch_size=patch_size, in_channels=in_channels,
                           num_classes=num_classes, dim=dim, depth=depth, heads=heads, mlp_dim=mlp_dim,
                           dropout=dropout, **options)
        self.config = config
        self.grad_checkpointing = False
        self.patch_embedding = PatchEmbedding(config.image_size, patch_size, in_channels, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        num_tokens = self.patch_embedding.num_patches + 1
        self.pos_embedding = nn.Parameter(torch.zeros(1, num_tokens, dim))  # (1, T, D)
        self.dropout = nn.Dropout(dropout)
        drop_rates = [config.drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            TransformerEncoderBlock(dim, heads, mlp_dim, dropout, config.attention_dropout,
                                    config.qkv_bias, drop_path=rate, layer_scale=config.layer_scale,
                                    norm_eps=config.norm_eps)
            for rate in drop_rates)
        # The tutorial's head is LayerNorm + Linear on the pooled token. LayerNorm is per token, so
        # normalising after pooling equals normalising before for [CLS], and is what mean pooling
        # needs (timm calls it fc_norm).
        self.head_norm = nn.LayerNorm(dim, eps=config.norm_eps)
        self.head = nn.Linear(dim, num_classes)
        self.reset_parameters()

    @classmethod
    def from_config(cls, config: ViTConfig | dict) -> "VisionTransformer":
        """Builds a model from a ViTConfig or its dict (validated, legacy keys dropped)."""
        config = config if isinstance(config, ViTConfig) else ViTConfig.from_dict(config)
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(config)})

    def reset_parameters(self) -> None:
        """Draws every parameter afresh by the config's `init` scheme (table in vitlab.init)."""
        init_weights(self, self.config.init)

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.patch_embedding.grid_size

    def set_image_size(self, image_size: int | tuple[int, int]) -> None:
        """Permanently adapts the model to another input size by resampling the position embedding."""
        new_grid = patch_grid(image_size, self.config.patch_size)
        with torch.no_grad():
            resampled = resample_position_embedding(self.pos_embedding, self.grid_size, new_grid)
        self.pos_embedding = nn.Parameter(resampled.contiguous())
        h, w = to_2tuple(image_size)
        self.patch_embedding.image_size, self.patch_embedding.grid_size = (h, w), new_grid
        self.patch_embedding.num_patches = new_grid[0] * new_grid[1]
        self.config = dataclasses.replace(self.config, image_size=(h, w) if h != w else h)

    @contextlib.contextmanager
    def any_image_size(self):
        """Inside this block the model takes inputs of any size (a multiple of the patch), the
        position embedding resampled on each call, differentiably: how `vitlab train --low-res`
        trains on half-size images while the saved model stays fixed at its own size."""
        saved = self.config
        self.config = dataclasses.replace(saved, dynamic_image_size=True)
        try:
            yield self
        finally:
            self.config = saved

    def _check_input(self, x: torch.Tensor) -> tuple[int, int]:
        """The patch grid of an image batch, or an error that names the numbers and the fix."""
        if x.ndim != 4:
            raise ValueError(f"expected a 4-D image batch (B, C, H, W), got {x.ndim}-D input of shape "
                             f"{tuple(x.shape)}; add a batch dimension with x.unsqueeze(0)")
        c, h, w = x.shape[1:]
        if c != self.config.in_channels:
            raise ValueError(f"expected {self.config.in_channels} input channels, got {c} "
                             f"(input shape {tuple(x.shape)})")
        grid = patch_grid((h, w), self.config.patch_size)
        if grid != self.grid_size and not self.config.dynamic_image_size:
            eh, ew = self.patch_embedding.image_size
            raise ValueError(f"expected {eh}x{ew} images, got {h}x{w}; resize the input, call "
                             f"model.set_image_size({h if h == w else (h, w)}), or build the model with "
                             f"dynamic_image_size=True")
        return grid

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> tokens (B, T, D) with [CLS] and position embedding added."""
        grid = self._check_input(images)
        # a model cast to bf16 for inference (vitlab.inference) takes the usual fp32 images
        x = self.patch_embedding(images.to(self.patch_embedding.projection.weight.dtype))  # (B, N, D)
        pos = resample_position_embedding(self.pos_embedding, self.grid_size, grid)  # (1, T, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, D)
        return self.dropout(torch.cat([cls, x], dim=1) + pos)  # (B, T, D)

    def forward_features(self, images: torch.Tensor, cls_only: bool = False) -> torch.Tensor:
        """Images (B, C, H, W) -> encoder output tokens (B, T, D), [CLS] first.

        cls_only: the last block computes the [CLS] row alone -> (B, 1, D). Nothing else
        depends on the other rows, and skipping them saves 3/4 of that block's work.
        """
        x = self.embed(images)
        for i, block in enumerate(self.blocks):
            only_cls = cls_only and i == len(self.blocks) - 1
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, only_cls, use_reentrant=False)
            else:
                x = block(x, only_cls)
        return x

    def pool(self, tokens: torch.Tensor, pooling: str | None = None) -> torch.Tensor:
        """Tokens (B, T, D) -> one vector per image (B, D), by `pooling` ("cls" or "mean";
        None: the model's own)."""
        if (pooling or self.config.pooling) == "mean":
            return tokens[:, 1:].mean(dim=1)
        return tokens[:, 0]

    def forward_head(self, tokens: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens (B, T, D) -> logits (B, K), or the normalised pooled features (B, D)."""
        x = self.head_norm(self.pool(tokens))
        return x if pre_logits else self.head(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # with [CLS] pooling only that token reaches the head: the same logits as the full
        # forward_features for ~12% fewer FLOPs (seed preset), in training and inference
        cls_only = self.config.pooling == "cls"
        return self.forward_head(self.forward_features(images, cls_only=cls_only))

    def forward_intermediates(self, images: torch.Tensor) -> ViTIntermediates:
        """Logits plus every block's output tokens and attention weights.

        Attention runs its explicit path (the fused kernel never forms the weights), so the
        logits equal forward()'s up to float rounding.
        """
        x = self.embed(images)
        features, attentions = [], []
        for block in self.blocks:
            x, weights = block(x, return_weights=True)
            features.append(x)
            attentions.append(weights)
        return ViTIntermediates(self.forward_head(x), features, attentions)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in backward instead of storing its activations."""
        self.grad_checkpointing = enable

    def reset_classifier(self, num_classes: int) -> None:
        """Replaces the head with a freshly initialised one for another number of classes."""
        head = nn.Linear(self.config.dim, num_classes).to(self.head.weight.device)
        if self.config.init == "trunc_normal":
            nn.init.trunc_normal_(head.weight, std=0.02)
            nn.init.zeros_(head.bias)
        self.head = head
        self.config = dataclasses.replace(self.config, num_classes=num_classes)

    def no_weight_decay(self) -> set[str]:
        """Parameter names that AdamW should not decay: tokens, position embedding, norms, biases."""
        return {name for name, param in self.named_parameters()
                if param.ndim <= 1 or name in ("cls_token", "pos_embedding")}

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
