"""The Vision Transformer, in one file.

With its default arguments this is exactly the model of the seed document (a CIFAR-10 ViT:
Conv2d patch embedding, learnable [CLS] token and position embedding, pre-norm encoder blocks,
LayerNorm + Linear head). Everything beyond the seed is an option that is off by default.

Shape legend used in comments: B batch, C channels, H/W image size, P patch size,
N patches, T = N + 1 tokens, D model width, M MLP width, K classes, h heads, d = D / h.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

Pooling = Literal["cls", "mean"]
Init = Literal["seed", "trunc_normal"]


def to_2tuple(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """32 -> (32, 32); (32, 48) or [32, 48] -> (32, 48). Sizes must be positive."""
    pair = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"image size must be a positive int or (height, width), got {size!r}")
    return pair


@dataclass
class ViTConfig:
    """Everything needed to rebuild a model; saved beside every checkpoint."""

    image_size: int | tuple[int, int] = 32
    patch_size: int = 4
    in_channels: int = 3
    num_classes: int = 10
    dim: int = 512
    depth: int = 6
    heads: int = 8
    mlp_dim: int = 2048
    dropout: float = 0.1
    # None means "same as dropout", which is what the seed's nn.MultiheadAttention does.
    attention_dropout: float | None = None
    drop_path: float = 0.0  # stochastic depth rate of the last block, linear from 0
    layer_scale: float | None = None  # LayerScale initial value (CaiT); None disables it
    qkv_bias: bool = True
    norm_eps: float = 1e-5
    pooling: Pooling = "cls"
    init: Init = "seed"
    dynamic_image_size: bool = False  # resample the position embedding for other input sizes
    class_names: list[str] | None = field(default=None)

    def __post_init__(self) -> None:
        if isinstance(self.image_size, list):
            self.image_size = tuple(self.image_size)
        if self.pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {self.pooling!r}")
        if self.init not in ("seed", "trunc_normal"):
            raise ValueError(f"init must be 'seed' or 'trunc_normal', got {self.init!r}")
        if self.dim % self.heads != 0:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(
                f"{len(self.class_names)} class names given for num_classes={self.num_classes}"
            )

    def to_dict(self) -> dict:
        d = asdict(self)
        if isinstance(d["image_size"], tuple):
            d["image_size"] = list(d["image_size"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ViTConfig":
        known = cls.__dataclass_fields__.keys()
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(unknown)}")
        return cls(**d)


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """F.dropout with a cheaper mask on CPU; the same distribution up to p rounded to 1/65536.

    On CPU, PyTorch draws the dropout mask one Bernoulli sample at a time; on this project's
    2-core AMD machine that cost ~25% of a training step of the `seed` preset (dropout 0.1).
    Here every 64-bit random word gives four 16-bit uniform integers u, and an element is kept
    when u >= round(p * 65536): 8x fewer random numbers, and the kept values are scaled by
    1 / P(keep) exactly, so the expectation is unchanged. CUDA keeps F.dropout (Philox, fast),
    and so does torch.compile, whose generated code draws its own vectorised random numbers.
    """
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or torch.compiler.is_compiling() or not 0.0 < p < 1.0:
        return F.dropout(x, p, training)
    threshold = round(p * 65536)
    keep_probability = 1.0 - threshold / 65536
    # random_(-2**63, None) draws all 64 bits of each word
    words = torch.empty((x.numel() + 3) // 4, dtype=torch.int64).random_(-(2**63), None)
    uniform16 = words.view(torch.int16)[: x.numel()].view(x.shape)  # uniform in [-32768, 32767]
    keep = uniform16 >= threshold - 32768  # P = (65536 - threshold) / 65536
    return torch.where(keep, x, 0.0) * (1.0 / keep_probability)


class Dropout(nn.Dropout):
    """nn.Dropout (same name, same repr, no parameters) running `dropout` above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


class PatchEmbedding(nn.Module):
    """Cuts the image into non-overlapping P x P patches and projects each to D dims.

    A Conv2d with kernel = stride = P is exactly a per-patch linear layer, and the fastest one.
    """

    def __init__(self, image_size, patch_size: int, in_channels: int, dim: int):
        super().__init__()
        h, w = to_2tuple(image_size)
        if h % patch_size or w % patch_size:
            raise ValueError(
                f"image size {h}x{w} is not divisible by patch size {patch_size}: "
                f"choose a patch size that divides both sides"
            )
        self.image_size = (h, w)
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.grid_size = (h // patch_size, w // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.projection = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.projection(x)  # (B, D, H/P, W/P)
        return x.flatten(2).transpose(1, 2)  # (B, N, D)


class Attention(nn.Module):
    """Multi-head self-attention through F.scaled_dot_product_attention.

    SDPA dispatches to flash / memory-efficient kernels on GPU and a fused flash kernel on CPU;
    on CPU in bf16 or with attention dropout, two batched matmuls are faster (see forward).
    `reference_forward` is the textbook softmax(QK^T / sqrt(d)) V, kept for tests and for
    returning attention maps, which the fused kernels never materialise.
    """

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True, attention_dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim**-0.5
        self.attention_dropout = attention_dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def _split_heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, _ = qkv.shape
        qkv = qkv.reshape(b, t, 3, self.heads, self.head_dim)  # (B, T, 3, h, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, h, T, d)
        return q, k, v

    def forward(self, x: torch.Tensor, cls_only: bool = False) -> torch.Tensor:
        """(B, T, D) -> (B, T, D); with cls_only, (B, 1, D): only the first token's output,
        still attending to every token's key and value."""
        b, t, d = x.shape
        dropout_p = self.attention_dropout if self.training else 0.0
        qkv = self.qkv(x)  # (B, T, 3D); bf16 under autocast or for a bf16 model
        if x.device.type == "cpu" and (qkv.dtype == torch.bfloat16 or dropout_p > 0.0):
            # On CPU, SDPA's flash kernel is slow for ViT's short sequences in bf16 (at T=65 its
            # backward takes ~5x as long as two batched matmuls), and with dropout SDPA falls
            # back to a math path with the slow Bernoulli sampler. Measured in BENCHMARKS.md.
            out = self._attend_with_matmuls(qkv, dropout_p, cls_only)  # (B, Tq, D)
        else:
            q, k, v = self._split_heads(qkv)
            if cls_only:
                q = q[:, :, :1]
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)  # (B, h, Tq, d)
            out = out.transpose(1, 2).reshape(b, q.shape[2], d)
        return self.proj(out)

    def _attend_with_matmuls(self, qkv: torch.Tensor, dropout_p: float, cls_only: bool = False) -> torch.Tensor:
        """softmax(Q K^T / sqrt(d)) V with batched matmuls over (B*h) heads; (B, T, 3D) -> (B, Tq, D)."""
        b, t, _ = qkv.shape
        h, hd = self.heads, self.head_dim
        # one copy into head-major layout, then every matmul reads contiguous (T, d) blocks
        q, k, v = qkv.reshape(b, t, 3, h, hd).permute(2, 0, 3, 1, 4).reshape(3, b * h, t, hd).unbind(0)
        if cls_only:
            q = q[:, :1]
        tq = q.shape[1]
        scores = torch.bmm(q, k.transpose(1, 2)).mul_(self.scale)  # (B*h, Tq, T)
        weights = dropout(scores.softmax(dim=-1), dropout_p, self.training)
        out = torch.bmm(weights, v)  # (B*h, Tq, d)
        return out.reshape(b, h, tq, hd).transpose(1, 2).reshape(b, tq, h * hd)

    def reference_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (output, attention weights (B, h, T, T) before dropout)."""
        b, t, d = x.shape
        q, k, v = self._split_heads(self.qkv(x))
        weights = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, h, T, T)
        dropped = F.dropout(weights, self.attention_dropout, self.training)
        out = (dropped @ v).transpose(1, 2).reshape(b, t, d)
        return self.proj(out), weights


class MLP(nn.Sequential):
    """Linear, GELU, Dropout, Linear, Dropout, as in the seed."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.drop1 = Dropout(dropout)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop2 = Dropout(dropout)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch for a random subset of samples."""

    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


class TransformerEncoderBlock(nn.Module):
    """Pre-norm block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_dim: int,
        dropout: float = 0.1,
        attention_dropout: float | None = None,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        layer_scale: float | None = None,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        attention_dropout = dropout if attention_dropout is None else attention_dropout
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attention = Attention(dim, heads, qkv_bias, attention_dropout)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = MLP(dim, mlp_dim, dropout)
        self.scale1 = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()
        self.scale2 = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, cls_only: bool = False) -> torch.Tensor:
        """(B, T, D) -> (B, T, D); with cls_only, (B, 1, D): the [CLS] token's output alone."""
        attended = self.attention(self.norm1(x), cls_only)
        if cls_only:
            x = x[:, :1]
        x = x + self.drop_path(self.scale1(attended))
        return x + self.drop_path(self.scale2(self.mlp(self.norm2(x))))

    def forward_with_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attended, weights = self.attention.reference_forward(self.norm1(x))
        x = x + self.drop_path(self.scale1(attended))
        return x + self.drop_path(self.scale2(self.mlp(self.norm2(x)))), weights


def resample_position_embedding(
    pos: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int], prefix_tokens: int = 1
) -> torch.Tensor:
    """Bicubically resizes a (1, prefix + H*W, D) position embedding to another patch grid.

    The [CLS] entry is kept as is; the patch entries are treated as a D-channel image.
    """
    if tuple(old_grid) == tuple(new_grid):
        return pos
    prefix, patches = pos[:, :prefix_tokens], pos[:, prefix_tokens:]
    if patches.shape[1] != old_grid[0] * old_grid[1]:
        raise ValueError(
            f"position embedding has {patches.shape[1]} patch entries, "
            f"which does not match a {old_grid[0]}x{old_grid[1]} grid"
        )
    d = patches.shape[-1]
    grid = patches.reshape(1, old_grid[0], old_grid[1], d).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=new_grid, mode="bicubic", align_corners=False)
    patches = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], d).to(pos.dtype)
    return torch.cat([prefix, patches], dim=1)


class ViTIntermediates(NamedTuple):
    logits: torch.Tensor  # (B, K)
    features: list[torch.Tensor]  # per block output, each (B, T, D)
    attentions: list[torch.Tensor]  # per block attention weights, each (B, h, T, T)


class VisionTransformer(nn.Module):
    """Vision Transformer (Dosovitskiy et al., 2021) as specified by the seed document.

    forward(images) -> logits. The pieces are exposed as in timm:
    forward_features (tokens after the encoder) and forward_head (pool, norm, classify).
    """

    def __init__(
        self,
        image_size: int | tuple[int, int] = 32,
        patch_size: int = 4,
        in_channels: int = 3,
        num_classes: int = 10,
        dim: int = 512,
        depth: int = 6,
        heads: int = 8,
        mlp_dim: int = 2048,
        dropout: float = 0.1,
        **options,
    ):
        super().__init__()
        config = ViTConfig(
            image_size=image_size,
            patch_size=patch_size,
            in_channels=in_channels,
            num_classes=num_classes,
            dim=dim,
            depth=depth,
            heads=heads,
            mlp_dim=mlp_dim,
            dropout=dropout,
            **options,
        )
        self.config = config
        self.grad_checkpointing = False

        self.patch_embedding = PatchEmbedding(config.image_size, patch_size, in_channels, dim)
        num_patches = self.patch_embedding.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embedding = nn.Parameter(torch.zeros(1, num_patches + 1, dim))  # (1, T, D)
        self.dropout = Dropout(dropout)
        drop_rates = [config.drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            TransformerEncoderBlock(
                dim,
                heads,
                mlp_dim,
                dropout=dropout,
                attention_dropout=config.attention_dropout,
                qkv_bias=config.qkv_bias,
                drop_path=rate,
                layer_scale=config.layer_scale,
                norm_eps=config.norm_eps,
            )
            for rate in drop_rates
        )
        # The seed's head is LayerNorm + Linear on the pooled token. LayerNorm is per token, so
        # normalising after pooling equals normalising before for [CLS], and is what mean pooling
        # needs (timm calls it fc_norm).
        self.head_norm = nn.LayerNorm(dim, eps=config.norm_eps)
        self.head = nn.Linear(dim, num_classes)
        self.reset_parameters()

    @classmethod
    def from_config(cls, config: ViTConfig | dict) -> "VisionTransformer":
        d = config.to_dict() if isinstance(config, ViTConfig) else dict(config)
        ViTConfig.from_dict(d)  # validates keys
        return cls(**d)

    # ---------------------------------------------------------------- initialisation
    def reset_parameters(self) -> None:
        if self.config.init == "seed":
            # The seed keeps PyTorch's default init everywhere and draws both tokens from N(0, 1).
            for module in self.modules():
                if module is not self and hasattr(module, "reset_parameters"):
                    module.reset_parameters()
            for module in self.modules():
                if isinstance(module, Attention):
                    # what nn.MultiheadAttention._reset_parameters does to in_proj and out_proj
                    nn.init.xavier_uniform_(module.qkv.weight)
                    if module.qkv.bias is not None:
                        nn.init.zeros_(module.qkv.bias)
                    nn.init.zeros_(module.proj.bias)
            nn.init.normal_(self.cls_token, std=1.0)
            nn.init.normal_(self.pos_embedding, std=1.0)
        else:
            # ViT paper / timm: small truncated-normal weights, zero biases, tiny [CLS] token.
            for name, module in self.named_modules():
                if isinstance(module, nn.Linear):
                    nn.init.trunc_normal_(module.weight, std=0.02)
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)
                elif isinstance(module, nn.LayerNorm):
                    nn.init.ones_(module.weight)
                    nn.init.zeros_(module.bias)
                elif isinstance(module, nn.Conv2d):
                    # lecun normal on the flattened patch, as the ViT reference implementation
                    fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
                    nn.init.trunc_normal_(module.weight, std=math.sqrt(1.0 / fan_in))
                    nn.init.zeros_(module.bias)
            nn.init.trunc_normal_(self.pos_embedding, std=0.02)
            nn.init.normal_(self.cls_token, std=1e-6)
        if self.config.layer_scale is not None:
            for module in self.modules():
                if isinstance(module, LayerScale):
                    nn.init.constant_(module.gamma, self.config.layer_scale)

    # ---------------------------------------------------------------- resolution
    @property
    def grid_size(self) -> tuple[int, int]:
        return self.patch_embedding.grid_size

    def set_image_size(self, image_size: int | tuple[int, int]) -> None:
        """Permanently adapts the model to another input size by resampling the position embedding."""
        h, w = to_2tuple(image_size)
        p = self.config.patch_size
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not divisible by patch size {p}")
        new_grid = (h // p, w // p)
        with torch.no_grad():
            resampled = resample_position_embedding(self.pos_embedding, self.grid_size, new_grid)
        self.pos_embedding = nn.Parameter(resampled.contiguous())
        self.patch_embedding.image_size = (h, w)
        self.patch_embedding.grid_size = new_grid
        self.patch_embedding.num_patches = new_grid[0] * new_grid[1]
        self.config.image_size = (h, w) if h != w else h

    def _check_input(self, x: torch.Tensor) -> tuple[int, int]:
        if x.ndim != 4:
            raise ValueError(
                f"expected a 4-D image batch (B, C, H, W), got {x.ndim}-D input of shape "
                f"{tuple(x.shape)}; add a batch dimension with x.unsqueeze(0)"
            )
        c, h, w = x.shape[1:]
        if c != self.config.in_channels:
            raise ValueError(
                f"expected {self.config.in_channels} input channels, got {c} (input shape "
                f"{tuple(x.shape)})"
            )
        p = self.config.patch_size
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not divisible by patch size {p}")
        grid = (h // p, w // p)
        if grid != self.grid_size and not self.config.dynamic_image_size:
            eh, ew = self.patch_embedding.image_size
            raise ValueError(
                f"expected {eh}x{ew} images, got {h}x{w}; resize the input, call "
                f"model.set_image_size({h if h == w else (h, w)}), or build the model with "
                f"dynamic_image_size=True"
            )
        return grid

    # ---------------------------------------------------------------- forward
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> tokens (B, T, D) with [CLS] and position embedding added."""
        grid = self._check_input(images)
        # a model cast to bf16 for inference (vitlab.inference) takes the usual fp32 images
        images = images.to(self.patch_embedding.projection.weight.dtype)
        x = self.patch_embedding(images)  # (B, N, D)
        pos = self.pos_embedding
        if grid != self.grid_size:
            pos = resample_position_embedding(pos, self.grid_size, grid)
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1) + pos  # (B, T, D)
        return self.dropout(x)

    def forward_features(self, images: torch.Tensor, cls_only: bool = False) -> torch.Tensor:
        """Images (B, C, H, W) -> encoder output tokens (B, T, D), [CLS] first.

        cls_only: the last block computes the [CLS] row alone -> (B, 1, D). Nothing else
        depends on the other rows, and skipping them saves 3/4 of that block's work.
        """
        x = self.embed(images)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            only_cls = cls_only and i == last
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

        Runs attention through the plain reference path (the fused kernel never forms the
        weights), so the logits equal forward()'s up to float rounding.
        """
        x = self.embed(images)
        features, attentions = [], []
        for block in self.blocks:
            x, weights = block.forward_with_attention(x)
            features.append(x)
            attentions.append(weights)
        return ViTIntermediates(self.forward_head(x), features, attentions)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in backward instead of storing its activations."""
        self.grad_checkpointing = enable

    def reset_classifier(self, num_classes: int, class_names: list[str] | None = None) -> None:
        """Replaces the head with a freshly initialised one for another number of classes."""
        head = nn.Linear(self.config.dim, num_classes).to(self.head.weight.device)
        if self.config.init == "trunc_normal":
            nn.init.trunc_normal_(head.weight, std=0.02)
            nn.init.zeros_(head.bias)
        self.head = head
        self.config.num_classes = num_classes
        self.config.class_names = class_names

    def no_weight_decay(self) -> set[str]:
        """Parameter names that AdamW should not decay: tokens, position embedding, norms, biases."""
        names = set()
        for name, param in self.named_parameters():
            if param.ndim <= 1 or name in ("cls_token", "pos_embedding"):
                names.add(name)
        return names

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
