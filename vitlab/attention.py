"""What a ViT looks at: per-head attention maps and attention rollout, as arrays and as one figure.

`attention_maps(model, images)` runs the model's plain-attention path (forward_intermediates,
which forms the (B, h, T, T) weights that the fused SDPA kernel never materialises) and returns
every block's weights, the attention rollout of Abnar & Zuidema (2020, "Quantifying Attention Flow
in Transformers") and, for both, the row of the token the classifier reads laid out on the patch
grid. `vitlab.plots.plot_attention` draws them for one image.

Shape legend: B batch, L blocks, h heads, T = N + 1 tokens ([CLS] first), N = gh * gw patches,
K classes.
"""

from __future__ import annotations

from dataclasses import dataclass
import numpy as np
import torch

from .model import VisionTransformer


@dataclass
class AttentionMaps:
    attentions: np.ndarray  # (L, B, h, T, T) softmax weights of each head in each block; rows sum to 1
    rollout: np.ndarray  # (B, T, T) attention rollout through all blocks; rows sum to 1
    query_rollout: np.ndarray  # (B, gh, gw) rollout row of the classifier's query over the patches, sums to 1
    query_attention: np.ndarray  # (L, B, h, gh, gw) that row in each head of each block, sums to 1
    probabilities: np.ndarray  # (B, K) softmax of the logits
    query: str  # "[CLS]" for cls pooling, "mean of patches" for mean pooling

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.query_rollout.shape[1:])


def attention_rollout(attentions: torch.Tensor) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020) of (L, B, h, T, T) weights -> (B, T, T).

    Each block mixes tokens with its heads' average attention, but the residual connection also
    carries every token straight through; adding the identity and renormalising the rows models
    that, and multiplying the blocks' matrices (last block on the left) follows information from
    the input patches to the final tokens.
    """
    layers, batch, _, tokens, _ = attentions.shape
    identity = torch.eye(tokens, dtype=attentions.dtype, device=attentions.device)
    rollout = identity.expand(batch, tokens, tokens)
    for layer in range(layers):
        mixed = attentions[layer].mean(dim=1) + identity  # (B, T, T)
        mixed = mixed / mixed.sum(dim=-1, keepdim=True)
        rollout = mixed @ rollout
    return rollout


def _query_row(weights: torch.Tensor, pooling: str) -> torch.Tensor:
    """(..., T, T) -> (..., N): how much the token the head reads draws from each patch.

    With [CLS] pooling that is the [CLS] row; with mean pooling the head averages the patch tokens,
    so it reads the mean of the patch rows. The [CLS] column is dropped and the rest renormalised,
    so the map is a distribution over the image.
    """
    row = weights[..., 0, :] if pooling == "cls" else weights[..., 1:, :].mean(dim=-2)  # (..., T)
    patches = row[..., 1:]  # (..., N)
    return patches / patches.sum(dim=-1, keepdim=True)


def _vision_transformer(model) -> VisionTransformer:
    """Accepts a VisionTransformer or anything wrapping one as `.model` (vitlab.Classifier)."""
    inner = getattr(model, "model", model)
    if not isinstance(inner, VisionTransformer):
        raise ValueError(f"expected a vitlab VisionTransformer or Classifier, got {type(model).__name__}")
    return inner


@torch.no_grad()
def attention_maps(model, images: torch.Tensor) -> AttentionMaps:
    """Attention weights, rollout and the classifier's query maps for a batch of images.

    model: a VisionTransformer or a vitlab.Classifier; images: the model's normalised float input
    (B, C, H, W) (Classifier.preprocess gives it). Runs in eval mode so dropout does not perturb
    the weights, then restores the model's mode.
    """
    vit = _vision_transformer(model)
    was_training = vit.training
    vit.eval()
    try:
        param = next(vit.parameters())
        images = images.to(device=param.device, dtype=param.dtype)
        logits, _, weights = vit.forward_intermediates(images)
    finally:
        vit.train(was_training)
    attentions = torch.stack(weights).float()  # (L, B, h, T, T)
    batch = attentions.shape[1]
    gh, gw = images.shape[-2] // vit.config.patch_size, images.shape[-1] // vit.config.patch_size
    pooling = vit.config.pooling
    rollout = attention_rollout(attentions)  # (B, T, T)
    query_rollout = _query_row(rollout, pooling).reshape(batch, gh, gw)
    query_attention = _query_row(attentions, pooling).reshape(*attentions.shape[:3], gh, gw)
    return AttentionMaps(
        attentions=attentions.cpu().numpy(),
        rollout=rollout.cpu().numpy(),
        query_rollout=query_rollout.cpu().numpy(),
        query_attention=query_attention.cpu().numpy(),
        probabilities=logits.float().softmax(dim=-1).cpu().numpy(),
        query="[CLS]" if pooling == "cls" else "mean of patches",
    )
