import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import vitlab
from vitlab.presets import describe_models, preset_config


def test_seed_preset_is_exactly_the_seed():
    model = vitlab.create_model("seed")
    c = model.config
    assert (c.image_size, c.patch_size, c.in_channels, c.num_classes) == (32, 4, 3, 10)
    assert (c.dim, c.depth, c.heads, c.mlp_dim, c.dropout) == (512, 6, 8, 2048, 0.1)
    assert model.num_parameters() == 18_979_338


def test_list_models_has_seed_and_a_32px_family():
    names = vitlab.list_models()
    assert {"seed", "nano", "tiny", "small", "base"} <= set(names)
    sizes = [i.parameters for i in describe_models() if i.name in ("nano", "tiny", "small", "base")]
    assert sizes == sorted(sizes)


def test_create_model_overrides_and_unknown_names():
    model = vitlab.create_model("nano", num_classes=100, image_size=64)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 100)
    with pytest.raises(ValueError, match="unknown model preset 'huge'; choose one of: seed"):
        vitlab.create_model("huge")
    with pytest.raises(ValueError, match="unknown model config keys: colour"):
        vitlab.create_model("nano", colour="red")


@pytest.mark.parametrize("name", ["seed", "nano", "small"])
def test_flops_match_torch_flop_counter(name):
    config = preset_config(name)
    model = vitlab.VisionTransformer.from_config(config).eval()
    # the plain attention path: torch's counter does not see inside CPU's fused SDPA kernel
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.forward_intermediates(torch.randn(1, 3, 32, 32))
    assert vitlab.forward_flops(config) == counter.get_total_flops()


def test_executed_flops_count_what_forward_runs():
    config = preset_config("seed")
    # a bf16 model on CPU attends with plain matmuls, which the counter sees (fused SDPA it does not)
    model = vitlab.VisionTransformer.from_config(config).eval().to(torch.bfloat16)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    executed = vitlab.forward_flops(config, cls_only=True)
    assert executed == counter.get_total_flops()
    # the [CLS]-only last block saves 12.4% of the seed's 2.509 GFLOPs
    assert 1 - executed / vitlab.forward_flops(config) == pytest.approx(0.124, abs=0.001)
    mean_pooled = preset_config("seed", pooling="mean")
    model = vitlab.VisionTransformer.from_config(mean_pooled).eval().to(torch.bfloat16)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert counter.get_total_flops() == vitlab.forward_flops(mean_pooled)  # every token, every block


def test_preset_table_parameters_are_measured():
    infos = {i.name: i for i in describe_models()}
    assert infos["seed"].parameters == 18_979_338
    assert infos["seed"].tokens == 65
    assert infos["seed"].gflops == pytest.approx(vitlab.forward_flops(preset_config("seed")) / 1e9)
    assert infos["nano"].parameters == vitlab.create_model("nano").num_parameters()
