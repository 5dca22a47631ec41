"""How a VisionTransformer's parameters start: the three `init` schemes, in one table.

    parameter               | seed                             | trunc_normal (and mimetic)
    ------------------------|----------------------------------|-------------------------------------
    patch_embedding         | Conv2d default                   | trunc_normal(std=1/sqrt(C*P*P)), bias 0
    cls_token               | N(0, 1)                          | N(0, 1e-6)
    pos_embedding           | N(0, 1)                          | trunc_normal(std=0.02)
    attention.qkv           | xavier_uniform, bias 0           | trunc_normal(std=0.02), bias 0 (*)
    attention.proj          | Linear default weight, bias 0    | trunc_normal(std=0.02), bias 0 (*)
    mlp.fc1, mlp.fc2, head  | Linear default                   | trunc_normal(std=0.02), bias 0
    norm1, norm2, head_norm | weight 1, bias 0                 | weight 1, bias 0
    scale1, scale2 (gamma)  | layer_scale                      | layer_scale

"seed" is what the tutorial's code gets: PyTorch's defaults (kaiming_uniform(a=sqrt(5)) weights,
uniform biases), nn.MultiheadAttention's own init of qkv and proj, and torch.randn tokens.
"trunc_normal" is the ViT paper's and timm's. (*) "mimetic" is trunc_normal, then
`mimetic_attention_init` sets every block's qkv and proj weights.

Written against the model's attribute names only (blocks[i].attention.qkv ...), so vitlab.model
imports this module and not the other way round.
"""

from __future__ import annotations

import math

import torch
from torch import nn

INITS = ("seed", "trunc_normal", "mimetic")


def init_weights(model: nn.Module, scheme: str) -> None:
    """Re-draws every parameter of a vitlab VisionTransformer by `scheme` (see the table above)."""
    if scheme == "seed":
        for module in model.modules():
            if module is not model and hasattr(module, "reset_parameters"):
                module.reset_parameters()
        for block in model.blocks:  # what nn.MultiheadAttention._reset_parameters does
            nn.init.xavier_uniform_(block.attention.qkv.weight)
            if block.attention.qkv.bias is not None:
                nn.init.zeros_(block.attention.qkv.bias)
            nn.init.zeros_(block.attention.proj.bias)
        nn.init.normal_(model.cls_token, std=1.0)
        nn.init.normal_(model.pos_embedding, std=1.0)
        return
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):  # lecun normal on the flattened patch, as the ViT paper
            fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
            nn.init.trunc_normal_(module.weight, std=math.sqrt(1.0 / fan_in))
            nn.init.zeros_(module.bias)
        elif module is not model and hasattr(module, "reset_parameters"):
            module.reset_parameters()  # LayerNorm (1, 0) and LayerScale (layer_scale)
    nn.init.trunc_normal_(model.pos_embedding, std=0.02)
    nn.init.normal_(model.cls_token, std=1e-6)
    if scheme == "mimetic":
        for block in model.blocks:
            mimetic_attention_init(block.attention)


@torch.no_grad()
def mimetic_attention_init(attention: nn.Module, alpha1: float = 0.7, beta1: float = 0.7,
                           alpha2: float = 0.4, beta2: float = 0.4) -> None:
    """Mimetic initialisation (Trockman & Kolter, ICML 2023): per head, W_q^T W_k ~ a1 Z1 + b1 I
    and W_proj W_v ~ a2 Z2 - b2 I, with Z ~ N(0, 1/D), as the rank-d SVD of those D x D targets.

    Trained ViTs' attention looks like this: a query attends to tokens like itself (the +I makes
    each token's nearest key its own, a local, convolution-like start), and the value-projection
    product is close to -I. Starting there makes small-data ViTs learn faster; (0.7, 0.7, 0.4, 0.4)
    are the paper's values for CIFAR-10.
    """
    dim, d = attention.proj.weight.shape[0], attention.head_dim
    eye = torch.eye(dim)
    q, k, v = attention.qkv.weight.view(3, attention.heads, d, dim)  # each (h, d, D) views
    proj = attention.proj.weight.view(dim, attention.heads, d)  # (D, h, d)
    for h in range(attention.heads):
        for target, left, right in ((alpha1 * torch.randn(dim, dim) / dim**0.5 + beta1 * eye, q, k),
                                    (alpha2 * torch.randn(dim, dim) / dim**0.5 - beta2 * eye, None, v)):
            u, s, vh = torch.linalg.svd(target)
            root = s[:d].sqrt()
            if left is not None:  # W_q^T W_k = (U_d S_d^1/2)(S_d^1/2 V_d^T)
                left[h].copy_((u[:, :d] * root).T)
            else:  # W_proj[:, head] W_v[head] = (U_d S_d^1/2)(S_d^1/2 V_d^T)
                proj[:, h].copy_(u[:, :d] * root)
            right[h].copy_(root[:, None] * vh[:d])
