"""The tutorial's model, re-typed from its text with its own attribute names.

vitlab never trains this. It exists so that tests can check `from_seed_state_dict` against the
real thing and so that `vitlab bench` can time the tutorial's nn.MultiheadAttention implementation
beside vitlab's. Keep it as the seed wrote it: do not optimise it.
"""

import torch
from torch import nn


class SeedPatchEmbedding(nn.Module):
    def __init__(self, image_size, patch_size, in_channels, dim):
        super().__init__()
        if not (image_size % patch_size == 0):
            raise ValueError("Image dimensions must be divisible by the patch size.")
        self.num_patches = (image_size // patch_size) ** 2
        self.projection = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.projection(x).flatten(2).transpose(1, 2)


class SeedTransformerEncoderBlock(nn.Module):
    def __init__(self, dim, heads, mlp_dim, dropout=0.1):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(mlp_dim, dim),
            nn.Dropout(dropout),
        )

    def forward(self, x):
        attn_output, _ = self.attention(self.norm1(x), self.norm1(x), self.norm1(x))
        x = x + attn_output
        mlp_output = self.mlp(self.norm2(x))
        x = x + mlp_output
        return x


class SeedVisionTransformer(nn.Module):
    def __init__(
        self, image_size, patch_size, in_channels, num_classes, dim, depth, heads, mlp_dim, dropout=0.1
    ):
        super().__init__()
        self.patch_embedding = SeedPatchEmbedding(image_size, patch_size, in_channels, dim)
        num_patches = self.patch_embedding.num_patches
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embedding = nn.Parameter(torch.randn(1, num_patches + 1, dim))
        self.dropout = nn.Dropout(dropout)
        self.transformer_encoder = nn.Sequential(
            *[SeedTransformerEncoderBlock(dim, heads, mlp_dim, dropout) for _ in range(depth)]
        )
        self.mlp_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))

    def forward(self, img):
        x = self.patch_embedding(img)
        b, n, d = x.shape
        cls_tokens = self.cls_token.expand(b, -1, -1)
        x = torch.cat((cls_tokens, x), dim=1)
        x += self.pos_embedding
        x = self.dropout(x)
        x = self.transformer_encoder(x)
        return self.mlp_head(x[:, 0])


SEED_CIFAR10_ARGS = dict(
    image_size=32, patch_size=4, in_channels=3, num_classes=10, dim=512, depth=6, heads=8,
    mlp_dim=2048, dropout=0.1,
)
