import pytest
import torch
from safetensors.torch import save_file

import vitlab
from vitlab import VisionTransformer
from vitlab.finetune import (
    adapt_input_channels,
    detect_format,
    freeze_backbone,
    load_initial_weights,
    param_groups,
    read_state_dict,
)
from vitlab.reference import SeedVisionTransformer

from .conftest import tiny_vit_kwargs


def _eval(model):
    return model.eval()


def test_head_replacement_keeps_the_backbone_outputs_unchanged():
    source = _eval(VisionTransformer(**tiny_vit_kwargs(num_classes=5)))
    target = _eval(VisionTransformer(**tiny_vit_kwargs(num_classes=2)))
    notes = load_initial_weights(target, source.state_dict())
    assert any("replaced the head: 5 -> 2 classes" in n for n in notes)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(target.forward_features(x), source.forward_features(x))
    assert target(x).shape == (2, 2)


def test_position_interpolation_keeps_the_original_size_outputs():
    source = _eval(VisionTransformer(**tiny_vit_kwargs()))
    # a smooth position embedding, as training produces, survives resampling up and back down
    rows, cols = torch.meshgrid(torch.linspace(0, 1, 4), torch.linspace(0, 1, 4), indexing="ij")
    smooth = torch.stack([torch.sin(rows * k / 16 + cols * (2 - k / 16)) for k in range(32)], dim=-1)
    smooth = smooth.reshape(1, 16, 32)
    with torch.no_grad():
        source.pos_embedding[:, 1:] = smooth
    target = _eval(VisionTransformer(**tiny_vit_kwargs(num_classes=2, image_size=32)))
    notes = load_initial_weights(target, source.state_dict())
    assert any("from a 4x4 to a 8x8 patch grid" in n for n in notes)
    assert target(torch.randn(2, 3, 32, 32)).shape == (2, 2)
    target.set_image_size(16)
    x = torch.randn(2, 3, 16, 16)
    got, want = target.forward_features(x), source.forward_features(x)
    assert (got - want).abs().mean() < 0.01 * want.abs().mean()


def test_rgb_to_grey_sums_the_patch_filters_so_grey_images_match():
    source = _eval(VisionTransformer(**tiny_vit_kwargs()))
    target = _eval(VisionTransformer(**tiny_vit_kwargs(in_channels=1)))
    notes = load_initial_weights(target, source.state_dict())
    assert any("from 3 to 1 input channel(s): summed the RGB filters" in n for n in notes)
    grey = torch.rand(2, 1, 16, 16)
    torch.testing.assert_close(target(grey), source(grey.expand(-1, 3, -1, -1)), atol=1e-5, rtol=1e-5)


def test_other_channel_counts_repeat_and_rescale():
    w = torch.randn(8, 3, 4, 4)
    out = adapt_input_channels(w, 4)
    assert out.shape == (8, 4, 4, 4)
    torch.testing.assert_close(out[:, 3], w[:, 0] * 0.75)


def test_misfitting_weights_are_named_or_skipped_with_partial():
    source = VisionTransformer(**tiny_vit_kwargs(mlp_dim=128)).state_dict()
    target = VisionTransformer(**tiny_vit_kwargs())
    with pytest.raises(ValueError, match=r"6 weight\(s\) do not fit the model: blocks.0.mlp.fc1.weight "
                                         r"\(shape \(128, 32\) vs \(64, 32\)\)"):
        load_initial_weights(target, source)
    notes = load_initial_weights(target, source, partial=True)
    assert any(n.startswith("skipped 6 weight(s)") for n in notes)


def test_timm_and_seed_weights_load_and_give_the_same_logits(tmp_path):
    pytest.importorskip("timm")
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    model = _eval(VisionTransformer(**tiny_vit_kwargs(init="trunc_normal")))
    timm_model = _eval(TimmViT(**vitlab.timm_model_kwargs(model.config)))
    save_file(timm_model.state_dict(), tmp_path / "timm.safetensors")
    sd = read_state_dict(tmp_path / "timm.safetensors")
    assert detect_format(sd) == "timm"
    load_initial_weights(model, sd)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(model(x), timm_model(x), atol=1e-5, rtol=1e-5)

    seed = _eval(SeedVisionTransformer(16, 4, 3, 5, 32, 2, 4, 64, 0.0))
    torch.save({"state_dict": seed.state_dict()}, tmp_path / "seed.pt")
    sd = read_state_dict(tmp_path / "seed.pt")
    assert detect_format(sd) == "seed"
    load_initial_weights(model, sd)
    torch.testing.assert_close(model(x), seed(x), atol=1e-5, rtol=1e-5)


def test_read_state_dict_refuses_pickled_objects_and_garbage(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"weights": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match=r"evil.pt cannot be loaded as plain tensors"):
        read_state_dict(tmp_path / "evil.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="is not a readable safetensors file"):
        read_state_dict(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError, match="no weights file at"):
        read_state_dict(tmp_path / "missing.pt")


def test_freeze_backbone_leaves_only_the_head_trainable():
    model = VisionTransformer(**tiny_vit_kwargs())
    assert freeze_backbone(model) == 32 * 5 + 5
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    assert model.head.weight.grad is not None and model.blocks[0].mlp.fc1.weight.grad is None


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
