"""What the optimizer sees: parameter groups (no decay on norms, biases and tokens; layer-wise
learning-rate decay for fine-tuning), the learning-rate schedule, the weight EMA, and a frozen
backbone for linear probes.

    groups = param_groups(model, weight_decay=0.05, layer_decay=0.75)
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    set_learning_rate(optimizer, learning_rate(step, total_steps, warmup_steps, 1e-3, 1e-5))
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn


def freeze_backbone(model: nn.Module) -> int:
    """Only the classifier head stays trainable (a linear probe). Returns the trainable count."""
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith("head.")
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def layer_id(name: str, depth: int) -> int:
    """0 for the embeddings, i + 1 for block i, depth + 1 for the head."""
    if name.startswith(("patch_embedding.", "cls_token", "pos_embedding")):
        return 0
    match = re.match(r"blocks\.(\d+)\.", name)
    return int(match.group(1)) + 1 if match else depth + 1


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """AdamW parameter groups for a VisionTransformer.

    No weight decay on what `model.no_weight_decay()` names (norms, biases, class token, position
    embedding). With layer_decay < 1, block i's learning rate is scaled by
    layer_decay ** (depth - i), so early layers move least (BEiT / MAE fine-tuning). Each group
    carries its 'lr_scale' (see set_learning_rate) and its parameters' 'names'. Frozen
    parameters (requires_grad False) are left out.
    """
    depth = len(model.blocks)
    no_decay = model.no_weight_decay()
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer = layer_id(name, depth) if layer_decay != 1.0 else depth + 1
        decays = name not in no_decay
        group = groups.setdefault(
            (layer, decays),
            {"params": [], "weight_decay": weight_decay if decays else 0.0,
             "lr_scale": layer_decay ** (depth + 1 - layer), "names": []},
        )
        group["params"].append(param)
        group["names"].append(name)
    return [groups[key] for key in sorted(groups)]


def learning_rate(step: int, total_steps: int, warmup_steps: int, peak: float, floor: float,
                  schedule: str = "cosine") -> float:
    """Linear warmup from peak/warmup_steps to peak, then down to `floor` at the last step
    (total_steps - 1): along a half cosine, or linearly (Li et al. 2020, "Budgeted training":
    linear decay to zero is the robust choice when the run's length is fixed in advance)."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    span = total_steps - 1 - warmup_steps  # steps from the peak to the last one
    progress = 1.0 if span <= 0 else min(1.0, (step - warmup_steps) / span)
    if schedule == "linear":
        return floor + (peak - floor) * (1.0 - progress)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group trains at lr times its 'lr_scale' (1 where param_groups set none)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


class WeightEMA:
    """Exponential moving average of the weights, with the usual warmup of the decay
    (min(decay, (1 + t) / (10 + t))) so short runs are not dominated by the random init."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        current = model.state_dict()
        floats = [k for k, v in self.tensors.items() if v.is_floating_point()]
        torch._foreach_lerp_([self.tensors[k] for k in floats], [current[k].detach() for k in floats],
                             1.0 - decay)

    def copy_of(self, model: nn.Module) -> nn.Module:
        """A copy of `model` holding the averaged weights (for evaluation)."""
        import copy

        averaged = copy.deepcopy(model)
        averaged.load_state_dict(self.tensors)
        return averaged

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "tensors": self.tensors}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.updates = state["decay"], state["updates"]
        for k, v in state["tensors"].items():
            self.tensors[k].copy_(v)
