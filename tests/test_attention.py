import numpy as np
import pytest
import torch

import vitlab
from vitlab.attention import attention_maps, attention_rollout
from vitlab.plots import plot_attention
from vitlab.checkpoint import save_model
from vitlab.classifier import Classifier
from vitlab.cli import main

from .conftest import tiny_vit_kwargs


def _png(path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_maps_have_the_documented_shapes_and_rows_sum_to_one():
    model = vitlab.VisionTransformer(**tiny_vit_kwargs(image_size=(16, 24), depth=3))  # 4x6 grid, T=25
    maps = attention_maps(model, torch.randn(2, 3, 16, 24))
    assert maps.attentions.shape == (3, 2, 4, 25, 25)
    assert maps.rollout.shape == (2, 25, 25)
    assert maps.query_rollout.shape == (2, 4, 6) and maps.grid_size == (4, 6)
    assert maps.query_attention.shape == (3, 2, 4, 4, 6)
    assert maps.probabilities.shape == (2, 5)
    np.testing.assert_allclose(maps.attentions.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(maps.rollout.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(maps.query_rollout.sum((-2, -1)), 1.0, atol=1e-5)
    np.testing.assert_allclose(maps.query_attention.sum((-2, -1)), 1.0, atol=1e-5)
    assert maps.query == "[CLS]"


def test_maps_come_from_the_model_and_leave_its_mode_alone():
    model = vitlab.VisionTransformer(**tiny_vit_kwargs(dropout=0.3)).train()
    images = torch.randn(3, 3, 16, 16)
    maps = attention_maps(model, images)
    assert model.training  # restored
    model.eval()
    # eval mode inside: no dropout noise, so the probabilities are the model's own
    np.testing.assert_allclose(maps.probabilities, model(images).softmax(-1).detach().numpy(), atol=1e-5)
    block = model.blocks[0]
    _, weights = block.attention(block.norm1(model.embed(images)), return_weights=True)
    np.testing.assert_allclose(maps.attentions[0], weights.detach().numpy(), atol=1e-6)


def test_rollout_of_one_layer_is_the_head_average_mixed_with_the_residual():
    attentions = torch.rand(1, 2, 3, 5, 5).softmax(-1)  # (L=1, B, h, T, T)
    expected = (attentions[0].mean(1) + torch.eye(5)) / 2
    torch.testing.assert_close(attention_rollout(attentions), expected)


def test_rollout_of_a_model_forced_to_uniform_attention_is_uniform_over_the_patches():
    model = vitlab.VisionTransformer(**tiny_vit_kwargs(depth=3))
    dim = model.config.dim
    with torch.no_grad():
        for block in model.blocks:  # zero queries and keys: every score is 0, softmax is uniform
            block.attention.qkv.weight[: 2 * dim] = 0
            block.attention.qkv.bias[: 2 * dim] = 0
    maps = attention_maps(model, torch.randn(2, 3, 16, 16))
    tokens, patches = 17, 16
    np.testing.assert_allclose(maps.attentions, 1 / tokens, rtol=1e-5)
    np.testing.assert_allclose(maps.query_rollout, 1 / patches, rtol=1e-5)
    np.testing.assert_allclose(maps.query_attention, 1 / patches, rtol=1e-5)
    # (U/2 + I/2)^3 = I/8 + (7/8) U: the residual keeps 1/8 on each token itself
    expected = np.eye(tokens) / 8 + (7 / 8) / tokens
    np.testing.assert_allclose(maps.rollout, np.broadcast_to(expected, (2, tokens, tokens)), rtol=1e-5)


def test_mean_pooling_models_read_the_mean_of_the_patch_rows():
    model = vitlab.VisionTransformer(**tiny_vit_kwargs(pooling="mean"))
    maps = attention_maps(model, torch.randn(1, 3, 16, 16))
    assert maps.query == "mean of patches"
    patch_rows = maps.rollout[0, 1:, 1:].mean(0)
    np.testing.assert_allclose(maps.query_rollout[0].ravel(), patch_rows / patch_rows.sum(), rtol=1e-5)


def test_plot_writes_one_figure_file(tmp_path):
    model = vitlab.VisionTransformer(**tiny_vit_kwargs())
    maps = attention_maps(model, torch.randn(2, 3, 16, 16))
    image = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    out = plot_attention(image, maps, tmp_path / "attention.png", index=1, class_names=list("abcde"))
    assert out == tmp_path / "attention.png" and _png(out) and out.stat().st_size > 5_000


@pytest.fixture
def image_file(tmp_path):
    from PIL import Image

    path = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(path)
    return path


def test_cli_on_a_preset_with_random_weights(tmp_path, image_file, capsys):
    out = tmp_path / "figure.png"
    assert main(["attention", "nano", str(image_file), "--out", str(out)]) == 0
    assert _png(out)
    assert "6 layers x 4 heads on a 8x8 patch grid" in capsys.readouterr().out


def test_cli_on_a_checkpoint_names_the_predicted_class(tmp_path, image_file, capsys):
    model = vitlab.VisionTransformer(**tiny_vit_kwargs(image_size=32))
    checkpoint = save_model(tmp_path / "model.safetensors",
                            Classifier(model, ["ant", "bee", "cat", "dog", "eel"], (0.4,) * 3, (0.2,) * 3))
    out = tmp_path / "figure.png"
    assert main(["attention", str(checkpoint), str(image_file), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert _png(out) and printed.startswith("predicted ")
    assert printed.split()[1] in {"ant", "bee", "cat", "dog", "eel"}
    assert "2 layers x 4 heads on a 8x8 patch grid" in printed


@pytest.mark.parametrize("argv, message", [
    (["attention", "nano", "missing.png", "--out", "x.png"], "no image file at missing.png"),
    (["attention", "gone.png", "--out", "x.png"], "no image file at gone.png"),  # with the shipped model
    (["attention", "nano", "photo.png", "--out", "x.txt"], "give a .png"),
    (["attention", "nano", "photo.png", "--out", "nowhere/x.png"], "directory nowhere does not exist"),
])
def test_cli_errors_are_one_line(tmp_path, image_file, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
