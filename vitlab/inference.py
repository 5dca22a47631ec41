"""Fast inference: a copy of a model whose weights are bf16, cast once.

Under torch.autocast every Linear casts its fp32 weight to bf16 on every call and every
LayerNorm output is cast again before the next matmul. With nothing to train, the weights can
be bf16 once and for all. Precision stays where it matters: the CPU and GPU kernels for matmul,
LayerNorm and softmax accumulate bf16 inputs in fp32, and the logits are returned in fp32.
Buffers (such as a Classifier's normalisation mean and std) stay fp32.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .model import MLP
from .precision import bf16_supported, packed_bf16_linear_supported

__all__ = ["PackedLinear", "bf16_supported", "inference_model", "pack_linears"]


TTA_MODES = ("none", "flip")


def tta_logits(network: nn.Module, images: torch.Tensor, tta: str = "none") -> torch.Tensor:
    """fp32 logits (B, K) of normalised images (B, C, H, W), with test-time augmentation:
    "flip" averages the logits of each image and its mirror image (training flips images too, so
    the model has learnt both; two views of the same image err less than one)."""
    if tta not in TTA_MODES:
        raise ValueError(f"tta must be one of {', '.join(TTA_MODES)}, got {tta!r}")
    logits = network(images).float()
    if tta == "flip":
        logits = (logits + network(images.flip(-1)).float()) / 2
    return logits


class PackedLinear(nn.Module):
    """A bf16 nn.Linear for CPU inference, optionally followed by GELU, in one oneDNN call.

    Uses private oneDNN ops (torch.ops.mkldnn) that only run on some CPUs (AVX512-BW/VL/DQ or
    AVX-NE-CONVERT): build it only where vitlab.precision.packed_bf16_linear_supported() is True,
    as inference_model does; everywhere else a plain bf16 nn.Linear does the same job.

    The weight is reordered once into oneDNN's blocked layout (nn.Linear reorders it on every
    call), the bias add and GELU run inside the matmul while its output is still in cache, and
    the GELU is applied before rounding to bf16. This is what torch.compile's freezing pass does
    for CPU inference, done eagerly with no compilation. Keeps `weight` and `bias` under their
    nn.Linear names, so the state_dict is unchanged.
    """

    def __init__(self, linear: nn.Linear, activation: str = "none"):
        super().__init__()
        if activation not in ("none", "gelu"):
            raise ValueError(f"activation must be 'none' or 'gelu', got {activation!r}")
        if not packed_bf16_linear_supported():
            raise RuntimeError("PackedLinear needs oneDNN's prepacked bf16 linear, which this CPU or "
                               "PyTorch build cannot run; use a bf16 nn.Linear (inference_model does)")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.activation = activation
        self.weight = nn.Parameter(linear.weight.detach().to(torch.bfloat16), requires_grad=False)
        bias = linear.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(torch.bfloat16),
                                                           requires_grad=False)
        # an opaque oneDNN tensor: not a buffer, so it never enters state_dict or .to()
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # "none" is oneDNN's exact (erf) GELU, as nn.GELU()
        algorithm = "none" if self.activation == "gelu" else ""
        return torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16).contiguous(), self.packed_weight,
                                                  self.bias, self.activation, [], algorithm)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, activation={self.activation}"


def pack_linears(module: nn.Module) -> None:
    """Swaps every nn.Linear in `module` for a PackedLinear, and fuses an exact nn.GELU into the
    layer before it where a module applies them back to back: vitlab's MLP (fc1, act) and
    nn.Sequential (children in order)."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, PackedLinear(child))
        else:
            pack_linears(child)
    if isinstance(module, MLP):
        pairs = [("fc1", "act")]
    elif isinstance(module, nn.Sequential):
        names = [name for name, _ in module.named_children()]
        pairs = list(zip(names, names[1:]))
    else:
        return
    for name, next_name in pairs:
        linear, following = getattr(module, name), getattr(module, next_name)
        if (isinstance(linear, PackedLinear) and linear.activation == "none"
                and isinstance(following, nn.GELU) and following.approximate == "none"):
            linear.activation = "gelu"
            setattr(module, next_name, nn.Identity())


class LowPrecisionModel(nn.Module):
    """Runs `module` (already cast) and hands back fp32 outputs; `.module` is the cast copy."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs) -> torch.Tensor:
        out = self.module(*args, **kwargs)
        return out.float() if torch.is_tensor(out) and out.is_floating_point() else out


def inference_model(model: nn.Module, precision: str = "bf16", pack: bool = True) -> nn.Module:
    """An eval-mode model for `precision`: for "fp32" `model` itself (put in eval mode), for
    "bf16" a copy with bf16 parameters wrapped so that it takes and returns fp32 tensors.

    On a CPU where vitlab.precision.packed_bf16_linear_supported() says oneDNN's prepacked bf16
    linear runs, the copy's Linear layers become PackedLinear unless `pack` is False (torch.compile
    cannot trace the packed oneDNN weights: compile the unpacked copy); anywhere else, and on
    CUDA, they stay plain bf16 nn.Linear. bf16 runs on any CPU, emulated (and slower than fp32)
    where bf16_supported() is False. The copy costs one model's worth of bf16 memory; `model` is
    left untouched.
    """
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
    if precision == "fp32":
        return model.eval()
    cast = copy.deepcopy(model).eval()
    for param in cast.parameters():
        if param.is_floating_point():
            param.data = param.data.to(torch.bfloat16)
    on_cpu = all(p.device.type == "cpu" for p in cast.parameters())
    if pack and on_cpu and packed_bf16_linear_supported():
        pack_linears(cast)
    return LowPrecisionModel(cast).eval()
