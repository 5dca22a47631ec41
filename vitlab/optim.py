"""What the optimizer sees: parameter groups (no decay on norms, biases and tokens; layer-wise
learning-rate decay for fine-tuning), AdamW or Muon + AdamW (--optimizer), the learning-rate
schedule, the weight EMA, and a frozen backbone for linear probes.

    groups = param_groups(model, weight_decay=0.05, layer_decay=0.75)
    optimizer = torch.optim.AdamW(groups, lr=1e-3)   # or make_optimizer(model, "muon", 1e-3, 0.05)
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


def is_hidden_matrix(name: str, param: torch.Tensor) -> bool:
    """The weight matrices inside the encoder blocks (qkv, projection, MLP): what Muon trains.
    Embeddings, the head, norms and biases stay with AdamW, as in Muon's own recipe."""
    return param.ndim == 2 and name.startswith("blocks.")


def orthogonalize(update: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16,
                  eps: float = 1e-7) -> torch.Tensor:
    """Muon's Newton-Schulz iteration: a (A, B) matrix -> about U V^T of its SVD U S V^T, the
    singular values pushed into roughly [0.7, 1.2] by the quintic's coefficients (Keller Jordan's,
    as torch.optim.Muon). Runs in `dtype`."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = update.to(dtype)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T  # (min, max): the Gram matrix below is the smaller one
    x = x / x.norm().clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


class Muon(torch.optim.Optimizer):
    """torch.optim.Muon's update (Nesterov momentum 0.95, five Newton-Schulz steps, decoupled
    weight decay, the step scaled to AdamW's RMS by 0.2 * sqrt(max(A, B))), with the Newton-Schulz
    iteration in `ns_dtype`. torch's always runs it in bf16, which a CPU without native bf16
    emulates: it made a nano training step on a 2-core AVX2 EPYC 2.0 s instead of AdamW's 0.75 s,
    where fp32 iterations cost nothing measurable (0.69 s); `make_optimizer` picks bf16 only where
    the hardware has it."""

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 ns_dtype: torch.dtype = torch.bfloat16):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum))
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.ndim != 2:
                    raise ValueError(f"Muon trains matrices only, got a parameter of shape {tuple(param.shape)}")
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param)
                buffer = state["momentum_buffer"]
                buffer.lerp_(param.grad, 1 - group["momentum"])
                update = orthogonalize(param.grad.lerp(buffer, group["momentum"]), dtype=self.ns_dtype)
                param.mul_(1 - group["lr"] * group["weight_decay"])
                param.add_(update.to(param.dtype), alpha=-group["lr"] * 0.2 * math.sqrt(max(param.shape)))


class MuonWithAdamW:
    """torch.optim.Muon for the blocks' weight matrices and AdamW for every other parameter,
    stepped together: what `vitlab train --optimizer muon` uses.

    It exposes what the training loop needs of one optimizer: param_groups (both optimizers'
    groups, so set_learning_rate reaches all of them), zero_grad, step, state_dict and
    load_state_dict. Muon's update is scaled to the RMS of AdamW's ("match_rms_adamw", Liu et al.
    2025, "Muon is scalable for LLM training"), so both take the same --lr and --weight-decay.
    ns_dtype: the Newton-Schulz iteration's number format (bf16 where the hardware has it).
    """

    def __init__(self, groups: list[dict], lr: float, fused: bool = False, ns_dtype: torch.dtype = torch.bfloat16):
        muon_groups, adamw_groups = [], []
        for group in groups:
            settings = {k: v for k, v in group.items() if k not in ("params", "names")}
            muon = [(n, p) for n, p in zip(group["names"], group["params"]) if is_hidden_matrix(n, p)]
            other = [(n, p) for n, p in zip(group["names"], group["params"]) if not is_hidden_matrix(n, p)]
            for chosen, into in ((muon, muon_groups), (other, adamw_groups)):
                if chosen:
                    into.append({**settings, "params": [p for _, p in chosen], "names": [n for n, _ in chosen]})
        self.muon = Muon(muon_groups, lr=lr, ns_dtype=ns_dtype) if muon_groups else None
        self.adamw = torch.optim.AdamW(adamw_groups, lr=lr, betas=(0.9, 0.999), fused=fused)
        self.optimizers = [o for o in (self.muon, self.adamw) if o is not None]

    @property
    def param_groups(self) -> list[dict]:
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict() if self.muon is not None else None,
                "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"muon", "adamw"} or (state["muon"] is None) != (self.muon is None):
            raise ValueError("the saved optimizer state is not Muon + AdamW's")
        if self.muon is not None:
            self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


def make_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float, layer_decay: float = 1.0,
                   fused: bool = False) -> torch.optim.Optimizer | MuonWithAdamW:
    """The training optimizer: "adamw" (AdamW over param_groups), or "muon" (MuonWithAdamW)."""
    groups = param_groups(model, weight_decay, layer_decay)
    if name == "muon":
        from .precision import bf16_supported

        device = next(model.parameters()).device
        return MuonWithAdamW(groups, lr, fused=fused,
                             ns_dtype=torch.bfloat16 if bf16_supported(device) else torch.float32)
    if name != "adamw":
        raise ValueError(f"unknown optimizer {name!r}; choose adamw or muon")
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), fused=fused)


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
