import pytest
import torch

from vitlab import VisionTransformer
from vitlab.optim import WeightEMA, freeze_backbone, layer_id, learning_rate, param_groups, set_learning_rate

from .conftest import tiny_vit_kwargs


def test_schedule_warms_up_then_decays_to_the_floor():
    lrs = [learning_rate(s, 100, 10, 1.0, 0.01) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[100] == pytest.approx(0.01)
    assert learning_rate(500, 100, 10, 1.0, 0.01) == pytest.approx(0.01)  # past the end: the floor


def test_optimizer_decays_weights_but_not_norms_biases_tokens():
    model = VisionTransformer(**tiny_vit_kwargs())
    groups = param_groups(model, weight_decay=0.05)
    decayed = {n for g in groups if g["weight_decay"] > 0 for n in g["names"]}
    plain = {n for g in groups if g["weight_decay"] == 0 for n in g["names"]}
    assert {"cls_token", "pos_embedding", "head.bias", "head_norm.weight", "blocks.0.norm1.weight"} <= plain
    assert {"head.weight", "blocks.0.attention.qkv.weight"} <= decayed
    assert all(g["lr_scale"] == 1.0 for g in groups) and len(groups) == 2


def test_layer_wise_decay_scales_early_layers_down():
    model = VisionTransformer(**tiny_vit_kwargs(depth=2))
    groups = param_groups(model, weight_decay=0.05, layer_decay=0.5)
    scale = {name: g["lr_scale"] for g in groups for name in g["names"]}
    assert scale["head.weight"] == 1.0
    assert scale["blocks.1.mlp.fc1.weight"] == 0.5
    assert scale["blocks.0.mlp.fc1.weight"] == 0.25
    assert scale["patch_embedding.projection.weight"] == 0.125
    decay = {name: g["weight_decay"] for g in groups for name in g["names"]}
    assert decay["pos_embedding"] == 0.0 and decay["blocks.0.norm1.weight"] == 0.0
    assert decay["blocks.0.attention.qkv.weight"] == 0.05
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert [layer_id(n, 2) for n in ("cls_token", "blocks.0.norm1.weight", "blocks.1.mlp.fc2.bias",
                                     "head_norm.weight")] == [0, 1, 2, 3]

    optimizer = torch.optim.AdamW(groups, lr=1.0)
    set_learning_rate(optimizer, 0.01)
    assert sorted({g["lr"] for g in optimizer.param_groups}) == [0.00125, 0.0025, 0.005, 0.01]


def test_freeze_backbone_leaves_only_the_head_trainable():
    model = VisionTransformer(**tiny_vit_kwargs())
    assert freeze_backbone(model) == 32 * 5 + 5
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    assert model.head.weight.grad is not None and model.blocks[0].mlp.fc1.weight.grad is None
    names = {n for g in param_groups(model, 0.05) for n in g["names"]}
    assert names == {"head.weight", "head.bias"}  # frozen parameters stay out of the optimizer


def test_weight_ema_warms_up_its_decay_and_round_trips():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    ema = WeightEMA(model, decay=0.99)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)  # first update: decay min(0.99, 2/11), so the average moves 9/11 of the way
    assert ema.tensors["weight"] == pytest.approx(torch.full((1, 2), 9 / 11))
    copy = ema.copy_of(model)
    assert torch.equal(copy.weight, ema.tensors["weight"]) and torch.equal(model.weight, torch.ones(1, 2))
    other = WeightEMA(model, decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert other.decay == 0.99 and other.updates == 1
    assert torch.equal(other.tensors["weight"], ema.tensors["weight"])
