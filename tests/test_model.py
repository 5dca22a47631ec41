import pytest
import torch
from torch import nn

import vitlab
from vitlab import PatchEmbedding, TransformerEncoderBlock, VisionTransformer
from vitlab.model import Attention

from .conftest import tiny_vit_kwargs

SEED_ARGS = dict(image_size=32, patch_size=4, in_channels=3, num_classes=10, dim=512, depth=6,
                 heads=8, mlp_dim=2048)


def test_seed_instance_has_the_seed_parameter_count_and_output_shape():
    model = VisionTransformer(**SEED_ARGS)
    assert model.num_parameters() == 18_979_338
    assert model(torch.randn(4, 3, 32, 32)).shape == (4, 10)


def test_patch_embedding_shapes_and_divisibility_error():
    embed = PatchEmbedding(32, 4, 3, 512)
    assert embed.num_patches == 64
    assert embed(torch.randn(2, 3, 32, 32)).shape == (2, 64, 512)
    with pytest.raises(ValueError, match=r"30x30 is not divisible by patch size 4"):
        PatchEmbedding(30, 4, 3, 512)


def test_encoder_block_keeps_shape_and_is_pre_norm_residual():
    block = TransformerEncoderBlock(dim=32, heads=4, mlp_dim=64, dropout=0.0)
    x = torch.randn(2, 5, 32)
    assert block(x).shape == x.shape
    # zeroing both branches' output layers leaves only the residual path: output == input
    nn.init.zeros_(block.attention.proj.weight), nn.init.zeros_(block.attention.proj.bias)
    nn.init.zeros_(block.mlp.fc2.weight), nn.init.zeros_(block.mlp.fc2.bias)
    torch.testing.assert_close(block(x), x)


@pytest.mark.parametrize(
    "shape, message",
    [
        ((3, 16, 16), r"expected a 4-D image batch \(B, C, H, W\), got 3-D"),
        ((2, 1, 16, 16), r"expected 3 input channels, got 1"),
        ((2, 3, 18, 18), r"image size 18x18 is not divisible by patch size 4"),
        ((2, 3, 24, 24), r"expected 16x16 images, got 24x24"),
    ],
)
def test_bad_input_raises_value_error_naming_the_numbers(shape, message):
    model = VisionTransformer(**tiny_vit_kwargs())
    with pytest.raises(ValueError, match=message):
        model(torch.randn(*shape))


def test_every_parameter_gets_a_finite_gradient():
    model = VisionTransformer(**tiny_vit_kwargs(layer_scale=0.1, drop_path=0.1))
    model(torch.randn(3, 3, 16, 16)).logsumexp(-1).sum().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


def test_fused_attention_equals_the_plain_reference_path():
    attention = Attention(dim=64, heads=8).eval()
    x = torch.randn(3, 17, 64)
    fused = attention(x)
    reference, weights = attention.reference_forward(x)
    torch.testing.assert_close(fused, reference, atol=1e-5, rtol=1e-5)
    assert weights.shape == (3, 8, 17, 17)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 8, 17))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # SDPA and the CPU matmul path
def test_cls_only_attention_equals_the_first_row_of_full_attention(dtype):
    attention = Attention(dim=64, heads=8).eval().to(dtype)
    x = torch.randn(3, 17, 64, dtype=dtype)
    cls_row = attention(x, cls_only=True)
    assert cls_row.shape == (3, 1, 64)
    torch.testing.assert_close(cls_row, attention(x)[:, :1])


def test_forward_skips_all_but_cls_in_the_last_block_with_the_same_logits_and_gradients():
    torch.manual_seed(0)
    model = VisionTransformer(**tiny_vit_kwargs(depth=3))  # train mode, dropout 0
    x = torch.randn(4, 3, 16, 16)
    assert model.forward_features(x, cls_only=True).shape == (4, 1, 32)
    full = model.forward_head(model.forward_features(x))  # every token through every block
    full.square().sum().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(x)
    logits.square().sum().backward()
    torch.testing.assert_close(logits, full)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, want[name], msg=name)


def test_mean_pooled_forward_runs_every_token_through_every_block():
    model = VisionTransformer(**tiny_vit_kwargs(pooling="mean")).eval()
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(model(x), model.forward_head(model.forward_features(x)))


def test_attention_uses_sdpa_not_multihead_attention(monkeypatch):
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    model = VisionTransformer(**tiny_vit_kwargs(depth=3))
    model(torch.randn(1, 3, 16, 16))
    assert len(calls) == 3
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())


def test_intermediates_leave_the_output_unchanged():
    model = VisionTransformer(**tiny_vit_kwargs(depth=3)).eval()
    x = torch.randn(2, 3, 16, 16)
    out = model.forward_intermediates(x)
    torch.testing.assert_close(out.logits, model(x), atol=1e-5, rtol=1e-5)
    assert [f.shape for f in out.features] == [(2, 17, 32)] * 3
    assert [a.shape for a in out.attentions] == [(2, 4, 17, 17)] * 3
    torch.testing.assert_close(out.features[-1], model.forward_features(x), atol=1e-5, rtol=1e-5)


def test_forward_features_and_head_split():
    model = VisionTransformer(**tiny_vit_kwargs()).eval()
    x = torch.randn(2, 3, 16, 16)
    tokens = model.forward_features(x)
    assert tokens.shape == (2, 17, 32)
    assert model.forward_head(tokens, pre_logits=True).shape == (2, 32)
    torch.testing.assert_close(model.forward_head(tokens), model(x))


def test_mean_pooling_differs_from_cls_pooling():
    torch.manual_seed(0)
    cls_model = VisionTransformer(**tiny_vit_kwargs()).eval()
    mean_model = VisionTransformer(**tiny_vit_kwargs(pooling="mean")).eval()
    mean_model.load_state_dict(cls_model.state_dict())
    x = torch.randn(2, 3, 16, 16)
    tokens = cls_model.forward_features(x)
    torch.testing.assert_close(mean_model.pool(tokens), tokens[:, 1:].mean(1))
    assert not torch.allclose(mean_model(x), cls_model(x))


def test_non_square_images():
    model = VisionTransformer(**tiny_vit_kwargs(image_size=(16, 32)))
    assert model.patch_embedding.num_patches == 4 * 8
    assert model(torch.randn(2, 3, 16, 32)).shape == (2, 5)


def test_qkv_bias_option():
    assert VisionTransformer(**tiny_vit_kwargs()).blocks[0].attention.qkv.bias is not None
    no_bias = VisionTransformer(**tiny_vit_kwargs(qkv_bias=False))
    assert no_bias.blocks[0].attention.qkv.bias is None
    assert no_bias.num_parameters() == VisionTransformer(**tiny_vit_kwargs()).num_parameters() - 2 * 3 * 32


def test_attention_dropout_defaults_to_dropout_like_the_seed_and_can_be_set():
    assert VisionTransformer(**tiny_vit_kwargs(dropout=0.1)).blocks[0].attention.attention_dropout == 0.1
    model = VisionTransformer(**tiny_vit_kwargs(dropout=0.1, attention_dropout=0.3))
    assert model.blocks[0].attention.attention_dropout == 0.3


def test_dropout_is_active_in_training_and_off_in_eval():
    model = VisionTransformer(**tiny_vit_kwargs(dropout=0.5))
    x = torch.randn(2, 3, 16, 16)
    model.train()
    assert not torch.allclose(model(x), model(x))
    model.eval()
    torch.testing.assert_close(model(x), model(x))


def test_stochastic_depth_rates_rise_linearly_and_vanish_in_eval():
    model = VisionTransformer(**tiny_vit_kwargs(depth=3, drop_path=0.2))
    rates = [getattr(b.drop_path, "rate", 0.0) for b in model.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2])
    model.eval()
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(model(x), model(x))


def test_layer_scale_multiplies_each_branch():
    model = VisionTransformer(**tiny_vit_kwargs(layer_scale=1e-4))
    gammas = [m.gamma for m in model.modules() if hasattr(m, "gamma")]
    assert len(gammas) == 4 and all(torch.all(g == 1e-4) for g in gammas)
    model.eval()
    # with tiny branch scales each block is almost the identity
    x = torch.randn(2, 17, 32)
    assert (model.blocks[0](x) - x).abs().max() < 1e-2


def test_layer_norm_eps_option():
    model = VisionTransformer(**tiny_vit_kwargs(norm_eps=1e-6))
    assert {m.eps for m in model.modules() if isinstance(m, nn.LayerNorm)} == {1e-6}
    assert {m.eps for m in VisionTransformer(**tiny_vit_kwargs()).modules()
            if isinstance(m, nn.LayerNorm)} == {1e-5}


def test_seed_init_draws_tokens_from_a_unit_normal_and_trunc_normal_is_small():
    seed = VisionTransformer(**SEED_ARGS)
    assert 0.9 < seed.pos_embedding.std().item() < 1.1
    trunc = VisionTransformer(**SEED_ARGS, init="trunc_normal")
    assert 0.015 < trunc.pos_embedding.std().item() < 0.025
    assert trunc.cls_token.abs().max() < 1e-4
    assert 0.015 < trunc.blocks[0].mlp.fc1.weight.std().item() < 0.025
    assert trunc.blocks[0].mlp.fc1.bias.abs().max() == 0


def test_set_image_size_resamples_the_position_embedding():
    model = VisionTransformer(**tiny_vit_kwargs()).eval()
    model.set_image_size(32)
    assert model.pos_embedding.shape == (1, 1 + 64, 32)
    assert model.config.image_size == 32
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_resampling_to_the_same_grid_changes_nothing_and_keeps_cls_entry():
    pos = torch.randn(1, 17, 8)
    assert vitlab.resample_position_embedding(pos, (4, 4), (4, 4)) is pos
    up = vitlab.resample_position_embedding(pos, (4, 4), (8, 8))
    assert up.shape == (1, 65, 8)
    torch.testing.assert_close(up[:, 0], pos[:, 0])
    # a constant embedding stays constant under bicubic resampling
    flat = torch.ones(1, 17, 8)
    torch.testing.assert_close(vitlab.resample_position_embedding(flat, (4, 4), (6, 6)), torch.ones(1, 37, 8))


def test_dynamic_image_size_runs_other_resolutions_without_changing_the_model():
    model = VisionTransformer(**tiny_vit_kwargs(dynamic_image_size=True)).eval()
    assert model(torch.randn(2, 3, 24, 24)).shape == (2, 5)
    assert model.pos_embedding.shape == (1, 17, 32)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = VisionTransformer(**tiny_vit_kwargs())
    x = torch.randn(2, 3, 16, 16)
    model(x).sum().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for a, p in zip(plain, model.parameters()):
        torch.testing.assert_close(a, p.grad)


def test_state_dict_round_trip_gives_identical_logits():
    model = VisionTransformer(**tiny_vit_kwargs()).eval()
    clone = VisionTransformer.from_config(model.config).eval()
    clone.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(model(x), clone(x))


def test_one_batch_can_be_overfit():
    torch.manual_seed(0)
    model = VisionTransformer(**tiny_vit_kwargs(init="trunc_normal"))
    x, y = torch.randn(8, 3, 16, 16), torch.arange(8) % 5
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05
    assert (model(x).argmax(-1) == y).all()


def test_no_weight_decay_names_norms_biases_and_tokens():
    model = VisionTransformer(**tiny_vit_kwargs(depth=1))
    names = model.no_weight_decay()
    assert {"cls_token", "pos_embedding", "head.bias", "head_norm.weight", "blocks.0.norm1.weight",
            "blocks.0.attention.qkv.bias"} <= names
    assert "blocks.0.attention.qkv.weight" not in names and "head.weight" not in names


def test_reset_classifier_changes_only_the_head():
    model = VisionTransformer(**tiny_vit_kwargs()).eval()
    x = torch.randn(2, 3, 16, 16)
    before = model.forward_features(x)
    model.reset_classifier(7, class_names=list("abcdefg"))
    assert model(x).shape == (2, 7)
    assert model.config.class_names == list("abcdefg")
    torch.testing.assert_close(model.forward_features(x), before)


def test_config_rejects_nonsense():
    with pytest.raises(ValueError, match=r"dim \(30\) must be divisible by heads \(4\)"):
        VisionTransformer(**tiny_vit_kwargs(dim=30))
    with pytest.raises(ValueError, match="pooling must be 'cls' or 'mean'"):
        VisionTransformer(**tiny_vit_kwargs(pooling="max"))
