import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import vitlab
import vitlab.model
from vitlab.presets import describe_models, preset_config

_BUILT: dict[str, vitlab.VisionTransformer] = {}


def built(name: str) -> vitlab.VisionTransformer:
    """Each preset is built once for this module (the largest has 86M parameters)."""
    if name not in _BUILT:
        _BUILT[name] = vitlab.create_model(name).eval()
    return _BUILT[name]


@pytest.fixture(scope="module", autouse=True)
def _free_the_models():
    yield
    _BUILT.clear()


def counted_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def expected_parameters(c: vitlab.ViTConfig) -> int:
    """The ViT's parameter count written out by hand from its architecture."""
    h, w = (c.image_size, c.image_size) if isinstance(c.image_size, int) else c.image_size
    d, m, tokens = c.dim, c.mlp_dim, (h // c.patch_size) * (w // c.patch_size) + 1
    block = (2 * 2 * d  # two LayerNorms
             + 3 * d * d + (3 * d if c.qkv_bias else 0) + d * d + d  # qkv, proj
             + d * m + m + m * d + d  # fc1, fc2
             + (2 * d if c.layer_scale is not None else 0))
    return (c.in_channels * c.patch_size**2 * d + d  # patch embedding
            + d + tokens * d  # [CLS], position embedding
            + c.depth * block + 2 * d + d * c.num_classes + c.num_classes)  # blocks, head norm, head


@pytest.mark.parametrize("name", vitlab.list_models())
def test_every_preset_builds_runs_and_has_the_parameters_its_table_says(name):
    model, config = built(name), preset_config(name)
    size = (config.image_size,) * 2 if isinstance(config.image_size, int) else config.image_size
    with torch.no_grad():
        logits = model(torch.randn(2, config.in_channels, *size))
    assert logits.shape == (2, config.num_classes) and torch.isfinite(logits).all()
    info = next(i for i in describe_models() if i.name == name)
    assert info.parameters == model.num_parameters() == expected_parameters(config)
    assert info.tokens == model.patch_embedding.num_patches + 1


@pytest.mark.parametrize("name", vitlab.list_models())
def test_every_presets_flops_match_torch_flop_counter(name, monkeypatch):
    model, config = built(name), preset_config(name)
    images = torch.randn(2, config.in_channels, 32, 32)
    # the explicit attention path: torch's counter does not see inside CPU's fused SDPA kernel
    monkeypatch.setattr(vitlab.model, "prefers_explicit_attention", lambda *args: True)
    with torch.no_grad():
        full = counted_flops(lambda: model.forward_head(model.forward_features(images)))
        executed = counted_flops(lambda: model(images))
    assert vitlab.forward_flops(config) == full // 2
    # forward() runs the last block for [CLS] alone where the model pools [CLS]
    assert vitlab.forward_flops(config, cls_only=config.pooling == "cls") == executed // 2
    info = next(i for i in describe_models() if i.name == name)
    assert info.gflops == pytest.approx(full / 2 / 1e9)


def test_seed_preset_is_exactly_the_seed():
    model = built("seed")
    c = model.config
    assert (c.image_size, c.patch_size, c.in_channels, c.num_classes) == (32, 4, 3, 10)
    assert (c.dim, c.depth, c.heads, c.mlp_dim, c.dropout) == (512, 6, 8, 2048, 0.1)
    assert model.num_parameters() == 18_979_338


def test_list_models_has_seed_and_a_32px_family_that_grows():
    names = vitlab.list_models()
    assert {"seed", "nano", "tiny", "small", "base"} <= set(names)
    sizes = [i.parameters for i in describe_models() if i.name in ("nano", "tiny", "small", "base")]
    assert sizes == sorted(sizes)


def test_create_model_overrides_and_unknown_names():
    model = vitlab.create_model("nano", num_classes=100, image_size=64)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 100)
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        vitlab.create_model("huge")
    with pytest.raises(ValueError, match="unknown model config keys: colour"):
        vitlab.create_model("nano", colour="red")


def test_cls_only_last_block_saves_an_eighth_of_the_seeds_flops():
    config = preset_config("seed")
    # the [CLS]-only last block saves 12.4% of the seed's 2.509 GFLOPs
    assert vitlab.forward_flops(config) / 1e9 == pytest.approx(2.509, abs=1e-3)
    assert 1 - vitlab.forward_flops(config, cls_only=True) / vitlab.forward_flops(config) == pytest.approx(
        0.124, abs=0.001)


def test_training_flops_match_the_counter_over_forward_and_backward(monkeypatch):
    config = preset_config("nano", depth=2)
    model = vitlab.VisionTransformer.from_config(config)
    monkeypatch.setattr(vitlab.model, "prefers_explicit_attention", lambda *args: True)
    # images that need a gradient, so the counter also sees the patch embedding's input gradient
    images = torch.randn(1, 3, 32, 32, requires_grad=True)
    counted = counted_flops(lambda: model(images).sum().backward())
    assert vitlab.training_flops(config, cls_only=True) == counted
