import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vitlab
import vitlab.model
from vitlab import PatchEmbedding, TransformerEncoderBlock, ViTConfig, VisionTransformer
from vitlab.model import Attention, DropPath, prefers_explicit_attention
from vitlab.reference import SeedVisionTransformer

from .conftest import tiny_vit_kwargs

SEED_ARGS = dict(image_size=32, patch_size=4, in_channels=3, num_classes=10, dim=512, depth=6,
                 heads=8, mlp_dim=2048)


@pytest.fixture(params=["explicit", "fused"])
def attention_path(request, monkeypatch):
    """Runs a test once on each attention path, whatever this machine would prefer."""
    explicit = request.param == "explicit"
    monkeypatch.setattr(vitlab.model, "prefers_explicit_attention", lambda *args: explicit)
    return request.param


def test_seed_instance_has_the_seed_parameter_count_and_output_shape():
    model = VisionTransformer(**SEED_ARGS)
    assert model.num_parameters() == 18_979_338
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_state_dict_names_are_the_ones_checkpoints_use():
    model = VisionTransformer(**tiny_vit_kwargs(depth=1, layer_scale=0.1))
    assert list(model.state_dict()) == [
        "cls_token", "pos_embedding", "patch_embedding.projection.weight", "patch_embedding.projection.bias",
        "blocks.0.norm1.weight", "blocks.0.norm1.bias",
        "blocks.0.attention.qkv.weight", "blocks.0.attention.qkv.bias",
        "blocks.0.attention.proj.weight", "blocks.0.attention.proj.bias",
        "blocks.0.norm2.weight", "blocks.0.norm2.bias",
        "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc1.bias", "blocks.0.mlp.fc2.weight", "blocks.0.mlp.fc2.bias",
        "blocks.0.scale1.gamma", "blocks.0.scale2.gamma",
        "head_norm.weight", "head_norm.bias", "head.weight", "head.bias",
    ]


def test_patch_embedding_shapes_and_divisibility_error():
    embed = PatchEmbedding(32, 4, 3, 512)
    assert embed.num_patches == 64 and embed.grid_size == (8, 8)
    assert embed(torch.randn(2, 3, 32, 32)).shape == (2, 64, 512)
    with pytest.raises(ValueError, match="not divisible by patch size 4"):
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
    "shape, phrase",
    [
        ((3, 16, 16), r"expected a 4-D image batch"),
        ((2, 1, 16, 16), r"expected 3 input channels, got 1"),
        ((2, 3, 18, 18), r"18x18 is not divisible by patch size 4"),
        ((2, 3, 24, 24), r"expected 16x16 images, got 24x24"),
    ],
)
def test_bad_input_raises_value_error_naming_the_numbers(shape, phrase):
    model = VisionTransformer(**tiny_vit_kwargs())
    with pytest.raises(ValueError, match=phrase):
        model(torch.randn(*shape))


def test_every_parameter_gets_a_finite_gradient():
    model = VisionTransformer(**tiny_vit_kwargs(layer_scale=0.1, drop_path=0.1))
    model(torch.randn(3, 3, 16, 16)).logsumexp(-1).sum().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


# ------------------------------------------------------------------ attention: two paths, one result
def test_fused_and_explicit_attention_agree_in_values_and_gradients(monkeypatch):
    attention = Attention(dim=64, heads=8)
    x = torch.randn(3, 17, 64, requires_grad=True)
    results = {}
    for explicit in (True, False):
        monkeypatch.setattr(vitlab.model, "prefers_explicit_attention", lambda *args: explicit)
        out = attention(x)
        results[explicit] = (out, *torch.autograd.grad(out.square().sum(), [x, attention.qkv.weight]))
    for a, b in zip(results[True], results[False]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_returned_weights_are_the_textbook_softmax_and_give_the_same_output():
    attention = Attention(dim=64, heads=8).eval()
    x = torch.randn(3, 17, 64)
    out, weights = attention(x, return_weights=True)
    q, k, _ = attention.qkv(x).reshape(3, 17, 3, 8, 8).permute(2, 0, 3, 1, 4)  # (B, h, T, d)
    torch.testing.assert_close(weights, (q @ k.transpose(-2, -1) / 8**0.5).softmax(-1))
    torch.testing.assert_close(out, attention(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cls_only_attention_equals_the_first_row_of_full_attention(dtype, attention_path):
    attention = Attention(dim=64, heads=8).eval().to(dtype)
    x = torch.randn(3, 17, 64, dtype=dtype)
    cls_row = attention(x, cls_only=True)
    assert cls_row.shape == (3, 1, 64)
    torch.testing.assert_close(cls_row, attention(x)[:, :1])


def test_forward_skips_all_but_cls_in_the_last_block_with_the_same_logits_and_gradients(attention_path):
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


def _sdpa_calls(monkeypatch) -> list:
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_fp32_attention_without_dropout_runs_sdpa_not_multihead_attention(monkeypatch):
    calls = _sdpa_calls(monkeypatch)
    model = VisionTransformer(**tiny_vit_kwargs(depth=3))
    model(torch.randn(1, 3, 16, 16))
    assert len(calls) == 3
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())


@pytest.mark.parametrize("dtype, dropout", [(torch.bfloat16, 0.0), (torch.float32, 0.1)])
def test_on_cpu_bf16_or_attention_dropout_takes_the_explicit_path(monkeypatch, dtype, dropout):
    assert prefers_explicit_attention(torch.device("cpu"), dtype, dropout)
    assert not prefers_explicit_attention(torch.device("cuda"), dtype, dropout)  # flash kernels there
    calls = _sdpa_calls(monkeypatch)
    model = VisionTransformer(**tiny_vit_kwargs(attention_dropout=dropout)).to(dtype)
    assert torch.isfinite(model(torch.randn(2, 3, 16, 16))).all()
    assert calls == []


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
    cls_model = VisionTransformer(**tiny_vit_kwargs()).eval()
    mean_model = VisionTransformer(**tiny_vit_kwargs(pooling="mean")).eval()
    mean_model.load_state_dict(cls_model.state_dict())
    x = torch.randn(2, 3, 16, 16)
    tokens = cls_model.forward_features(x)
    torch.testing.assert_close(mean_model.pool(tokens), tokens[:, 1:].mean(1))
    torch.testing.assert_close(cls_model.pool(tokens, "mean"), tokens[:, 1:].mean(1))
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


# ------------------------------------------------------------------ regularisation
def _manual_attention(attention: Attention, x: torch.Tensor, p: float) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) with dropout p on the weights, then V and the projection."""
    b, t, d = x.shape
    q, k, v = attention.qkv(x).reshape(b, t, 3, attention.heads, -1).permute(2, 0, 3, 1, 4)
    weights = (q @ k.transpose(-2, -1) * attention.scale).softmax(-1)
    out = F.dropout(weights, p, training=True) @ v
    return attention.proj(out.transpose(1, 2).reshape(b, t, d))


@pytest.mark.parametrize("options, p", [({"dropout": 0.3}, 0.3),  # the seed: attention dropout = dropout
                                        ({"dropout": 0.0, "attention_dropout": 0.5}, 0.5)])
def test_attention_dropout_drops_attention_weights_in_training(options, p):
    attention = VisionTransformer(**tiny_vit_kwargs(**options)).blocks[0].attention.train()
    x = torch.randn(2, 17, 32)
    assert not torch.allclose(attention(x), attention(x))  # a fresh mask each call
    torch.manual_seed(7)
    out = attention(x)
    torch.manual_seed(7)
    torch.testing.assert_close(out, _manual_attention(attention, x, p))
    attention.eval()
    torch.testing.assert_close(attention(x), _manual_attention(attention, x, 0.0))


def test_attention_dropout_zero_keeps_attention_deterministic_while_other_dropout_is_on():
    model = VisionTransformer(**tiny_vit_kwargs(dropout=0.5, attention_dropout=0.0)).train()
    x = torch.randn(2, 17, 32)
    attention = model.blocks[0].attention
    torch.testing.assert_close(attention(x), attention(x))
    assert not torch.allclose(model.blocks[0].mlp(x), model.blocks[0].mlp(x))


def test_fused_path_applies_attention_dropout_too(monkeypatch):
    monkeypatch.setattr(vitlab.model, "prefers_explicit_attention", lambda *args: False)
    attention = Attention(dim=32, heads=4, attention_dropout=0.5).train()
    x = torch.randn(2, 17, 32)
    assert not torch.allclose(attention(x), attention(x))
    attention.eval()
    torch.testing.assert_close(attention(x), _manual_attention(attention, x, 0.0), atol=1e-5, rtol=1e-5)


def test_dropout_is_active_in_training_and_off_in_eval():
    model = VisionTransformer(**tiny_vit_kwargs(dropout=0.5))
    x = torch.randn(2, 3, 16, 16)
    model.train()
    assert not torch.allclose(model(x), model(x))
    model.eval()
    torch.testing.assert_close(model(x), model(x))


def test_drop_path_zeroes_whole_samples_and_scales_the_rest():
    drop = DropPath(0.5).train()
    branch = torch.randn(64, 5, 8, requires_grad=True)
    out = drop(branch)
    dropped = (out == 0).flatten(1).all(1)
    kept = torch.isclose(out, branch * 2).flatten(1).all(1)
    assert torch.all(dropped ^ kept)  # every sample is either all zero or the branch / (1 - rate)
    assert 10 < dropped.sum() < 54  # both happen (64 fair coins)
    out.sum().backward()
    expected = torch.where(kept[:, None, None], 2.0, 0.0).expand_as(branch)
    torch.testing.assert_close(branch.grad, expected)  # the gradient takes the same mask and scale
    assert drop.eval()(branch) is branch


def test_stochastic_depth_drops_residual_branches_per_sample_in_training_only():
    block = TransformerEncoderBlock(dim=32, heads=4, mlp_dim=64, dropout=0.0, drop_path=0.5)
    x = torch.randn(64, 9, 32)
    block.eval()
    full = block(x)
    assert not (full == x).flatten(1).all(1).any()  # in eval every branch contributes
    block.train()
    torch.manual_seed(3)
    out = block(x)
    # the same step by hand: one Bernoulli(1/2) keep mask per sample and branch, scaled by 2
    torch.manual_seed(3)
    keep1 = torch.empty(64, 1, 1).bernoulli_(0.5)
    y = x + block.attention(block.norm1(x)) * keep1 / 0.5
    keep2 = torch.empty(64, 1, 1).bernoulli_(0.5)
    y = y + block.mlp(block.norm2(y)) * keep2 / 0.5
    torch.testing.assert_close(out, y)
    both_dropped = (keep1 + keep2).flatten() == 0
    assert 0 < both_dropped.sum() < 64
    assert torch.equal(out[both_dropped], x[both_dropped])  # nothing but the residual path
    assert not torch.allclose(out[~both_dropped], full[~both_dropped])


def test_stochastic_depth_rates_rise_linearly_over_the_blocks():
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


# ------------------------------------------------------------------ initialisation
def test_seed_init_draws_every_tensor_as_the_seed_reference_model_does():
    args = dict(SEED_ARGS, depth=1)
    mine = VisionTransformer(**args).state_dict()
    theirs = vitlab.from_seed_state_dict(SeedVisionTransformer(**args).state_dict())
    assert mine.keys() == theirs.keys()
    for name, value in mine.items():
        reference = theirs[name]
        if torch.all(reference == reference.flatten()[0]):  # LayerNorm ones, zero biases
            assert torch.equal(value, reference), name
        else:  # the same distribution: the same spread, up to sampling noise
            tolerance = 0.05 + 3 / value.numel() ** 0.5
            assert value.std().item() / reference.std().item() == pytest.approx(1, abs=tolerance), name


def test_seed_init_draws_tokens_from_a_unit_normal_and_trunc_normal_is_small():
    seed = VisionTransformer(**SEED_ARGS)
    assert 0.9 < seed.pos_embedding.std().item() < 1.1
    trunc = VisionTransformer(**SEED_ARGS, init="trunc_normal")
    assert 0.015 < trunc.pos_embedding.std().item() < 0.025
    assert trunc.cls_token.abs().max() < 1e-4
    assert 0.015 < trunc.blocks[0].mlp.fc1.weight.std().item() < 0.025
    assert trunc.blocks[0].mlp.fc1.bias.abs().max() == 0


def test_reset_parameters_is_reproducible_under_a_seed():
    model = VisionTransformer(**tiny_vit_kwargs(layer_scale=0.1, init="trunc_normal"))
    torch.manual_seed(5)
    model.reset_parameters()
    first = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(5)
    model.reset_parameters()
    assert all(torch.equal(first[k], v) for k, v in model.state_dict().items())
    assert torch.all(model.blocks[0].scale1.gamma == 0.1)


# ------------------------------------------------------------------ resolution
def test_set_image_size_resamples_the_position_embedding():
    model = VisionTransformer(**tiny_vit_kwargs()).eval()
    config = model.config
    model.set_image_size(32)
    assert model.pos_embedding.shape == (1, 1 + 64, 32)
    assert model.config.image_size == 32 and config.image_size == 16  # replaced, not mutated
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    with pytest.raises(ValueError, match="not divisible by patch size"):
        model.set_image_size(30)


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


# ------------------------------------------------------------------ training utilities
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
    config = model.config
    x = torch.randn(2, 3, 16, 16)
    before = model.forward_features(x)
    model.reset_classifier(7)
    assert model(x).shape == (2, 7)
    assert model.config.num_classes == 7 and config.num_classes == 5  # replaced, not mutated
    torch.testing.assert_close(model.forward_features(x), before)


# ------------------------------------------------------------------ the config
@pytest.mark.parametrize("override, phrase", [
    ({"dim": 30}, r"dim \(30\) must be divisible by heads \(4\)"),
    ({"heads": 0}, "heads must be a positive integer"),
    ({"depth": 0}, "depth must be a positive integer"),
    ({"patch_size": 0}, "patch_size must be a positive integer"),
    ({"mlp_dim": -1}, "mlp_dim must be a positive integer"),
    ({"num_classes": 0}, "num_classes must be a positive integer"),
    ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ({"attention_dropout": -0.1}, r"attention_dropout must be in \[0, 1\)"),
    ({"drop_path": 1.5}, r"drop_path must be in \[0, 1\)"),
    ({"norm_eps": 0.0}, "norm_eps must be positive"),
    ({"layer_scale": 0.0}, "layer_scale must be positive"),
    ({"pooling": "max"}, "pooling must be 'cls' or 'mean'"),
    ({"init": "xavier"}, "init must be 'seed' or 'trunc_normal' or 'mimetic'"),
    ({"image_size": 0}, "image size must be a positive int"),
    # values a crafted checkpoint or config file can hold: each refused before any allocation
    ({"image_size": "abc"}, "image size must be a positive int or \\(height, width\\), got 'abc'"),
    ({"image_size": 32.5}, "image size must be a positive int"),
    ({"dim": "abc"}, "dim must be a positive integer, got 'abc'"),
    ({"depth": True}, "depth must be a positive integer, got True"),
    ({"dropout": "x"}, r"dropout must be in \[0, 1\)"),
    ({"qkv_bias": "yes"}, "qkv_bias must be true or false"),
    ({"dim": 16384, "heads": 8}, "dim must be at most 8,192, got 16,384"),
    ({"depth": 1000}, "depth must be at most 128"),
    ({"mlp_dim": 10**6}, "mlp_dim must be at most 32,768"),
    ({"dim": 8192, "heads": 8, "depth": 32}, r"parameters, more than vitlab builds \(2,147,483,648\)"),
    ({"image_size": 4096, "patch_size": 4}, r"makes 1,048,576 patches, more than 4,096"),
])
def test_config_rejects_nonsense_in_one_line(override, phrase):
    with pytest.raises(ValueError, match=phrase) as error:
        VisionTransformer(**tiny_vit_kwargs(**override))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("override", [{}, {"qkv_bias": False, "layer_scale": 0.1}, {"image_size": (16, 24)},
                                      {"in_channels": 1, "num_classes": 100, "patch_size": 8}])
def test_parameter_count_is_known_before_building(override):
    """The bound on untrusted configs counts parameters without allocating them: exactly."""
    from vitlab.presets import preset_config

    config = ViTConfig(**tiny_vit_kwargs(**override))
    assert config.parameter_count() == VisionTransformer.from_config(config).num_parameters()
    for name in ("seed", "lite", "base"):
        preset = preset_config(name)
        with torch.device("meta"):
            assert preset.parameter_count() == VisionTransformer.from_config(preset).num_parameters()


def test_config_is_frozen_and_round_trips_through_a_dict():
    config = VisionTransformer(**tiny_vit_kwargs(image_size=(16, 24))).config
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.dim = 64
    d = config.to_dict()
    assert d["image_size"] == [16, 24]  # JSON has lists
    assert ViTConfig.from_dict(d) == config


def test_old_checkpoint_configs_with_class_names_still_load():
    config = ViTConfig(**tiny_vit_kwargs())
    d = {**config.to_dict(), "class_names": ["plane", "car", "bird", "cat", "deer"]}  # legacy key
    assert ViTConfig.from_dict(d) == config
    assert VisionTransformer.from_config(d).config == config
    with pytest.raises(ValueError, match="unknown model config keys: colour"):
        ViTConfig.from_dict({"colour": "red"})


def test_mimetic_init_makes_tokens_attend_to_themselves_at_the_start():
    """init="mimetic": each head's W_q^T W_k is close to a positive multiple of I and W_proj W_v to a
    negative one, so at step 0 a token attends to itself far more than under trunc_normal."""
    kwargs = dict(image_size=32, patch_size=4, dim=64, depth=2, heads=4, mlp_dim=128, dropout=0.0)
    torch.manual_seed(0)
    mimetic = VisionTransformer(**kwargs, init="mimetic").eval()
    torch.manual_seed(0)
    plain = VisionTransformer(**kwargs, init="trunc_normal").eval()
    attention = mimetic.blocks[0].attention
    d, dim = attention.head_dim, 64
    q, k, v = attention.qkv.weight.view(3, 4, d, dim)
    proj = attention.proj.weight.view(dim, 4, d)
    for h in range(4):
        assert torch.trace(q[h].T @ k[h]) > 0
        assert torch.trace(proj[:, h] @ v[h]) < 0
    images = torch.randn(8, 3, 32, 32)

    def self_attention(model):
        weights = model.forward_intermediates(images).attentions[0]  # (B, h, T, T)
        return torch.diagonal(weights, dim1=-2, dim2=-1).mean()

    assert self_attention(mimetic) > 3 * self_attention(plain)
    # everything else is trunc_normal's: same patch embedding draw, same logits shape
    assert torch.equal(mimetic.patch_embedding.projection.weight, plain.patch_embedding.projection.weight)
