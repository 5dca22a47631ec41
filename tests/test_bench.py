"""vitlab bench, and the fast paths it measures: each must equal the plain path it replaces."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

import vitlab
from vitlab.bench import BenchConfig, build_models, run_benchmark
from vitlab.cli import main
from vitlab.inference import PackedLinear, bf16_supported, inference_model, onednn_linear_available
from vitlab.model import Attention, Dropout, dropout
from vitlab.presets import preset_config

from .conftest import tiny_vit_kwargs

TINY = dict(image_size=16, dim=32, depth=1, heads=2, mlp_dim=64)
needs_bf16 = pytest.mark.skipif(not bf16_supported("cpu"), reason="this CPU has no native bf16")
needs_onednn = pytest.mark.skipif(not onednn_linear_available(), reason="this PyTorch has no oneDNN linear")


@pytest.fixture
def bench_test_preset(monkeypatch):
    """A preset small enough to bench in a second: `nano` cut down to one narrow block."""
    monkeypatch.setitem(vitlab.presets.PRESETS, "bench-test", {**vitlab.presets.PRESETS["nano"], **TINY})
    return "bench-test"


def test_bench_prints_a_table_then_one_json_line_with_every_figure(capsys, bench_test_preset):
    assert main(["bench", "--preset", bench_test_preset, "--batch-size", "2", "--rounds", "1",
                 "--steps", "1", "--precision", "fp32", "--matmul-size", "64"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("vitlab bench: preset bench-test, batch 2, best of 1 round(s)")
    assert any(line.split()[:2] == ["fp32", "vitlab"] and "x" in line for line in out)
    report = json.loads(out[-1])
    assert {"preset", "batch_size", "device", "torch_version", "matmul_peak_tflops",
            "forward_gflops_per_image", "training_gflops_per_image", "results", "ratios"} <= set(report)
    assert [r["implementation"] for r in report["results"]] == ["vitlab", "timm", "seed"]
    for r in report["results"]:
        assert r["train_img_s"] > 0 and r["inference_img_s"] > 0
        assert r["train_peak_mib"] > 0 and 0 < r["train_utilisation"]
        # achieved FLOP rate is throughput times the FLOPs that implementation runs
        achieved = r["inference_img_s"] * r["forward_gflops_per_image"] / 1e3
        assert r["inference_tflops"] == pytest.approx(achieved)
        assert r["train_tflops"] == pytest.approx(3 * r["train_img_s"] * r["forward_gflops_per_image"] / 1e3)
    by_name = {r["implementation"]: r["forward_gflops_per_image"] for r in report["results"]}
    assert by_name["timm"] == by_name["seed"] == pytest.approx(report["forward_gflops_per_image"])
    assert by_name["vitlab"] < report["forward_gflops_per_image"]  # [CLS]-only last block
    assert "(vitlab runs " in out[1]
    assert report["ratios"]["timm/timm fp32 train"] == 1.0
    flops = vitlab.forward_flops(preset_config(bench_test_preset))
    assert report["forward_gflops_per_image"] == pytest.approx(flops / 1e9)


@needs_bf16
def test_bench_in_bf16_serves_vitlab_with_bf16_weights_and_the_others_under_autocast():
    report = run_benchmark(BenchConfig(preset="nano", batch_size=2, precisions=("fp32", "bf16"), rounds=1,
                                       train_steps=1, inference_steps=1, matmul_size=64,
                                       model_overrides=TINY), log=lambda line: None)
    modes = {(r.implementation, r.precision): (r.train_mode, r.inference_mode) for r in report.results}
    assert modes[("vitlab", "bf16")] == ("autocast", "bf16 weights")
    assert modes[("timm", "bf16")] == ("autocast", "autocast")
    assert set(report.matmul_peak_tflops) == {"fp32", "bf16"}
    assert "vitlab bf16 / timm fp32 inference" in report.ratios()
    assert "vitlab bf16 inference / timm fp32 inference:" in report.table()


def test_bench_rejects_bad_settings(capsys):
    with pytest.raises(ValueError, match="precision must be fp32, bf16 or both, got 'fp16'"):
        BenchConfig(precisions=("fp16",))
    assert main(["bench", "--batch-size", "0"]) == 2
    assert "vitlab bench: error: --batch-size, --rounds, --steps and --matmul-size must be positive" in \
        capsys.readouterr().err


def test_the_three_implementations_share_weights_and_agree():
    models = build_models(preset_config("nano", **TINY, dropout=0.0))
    x = torch.randn(3, 3, 16, 16)
    logits = {name: model.eval()(x) for name, model in models.items()}
    torch.testing.assert_close(logits["timm"], logits["vitlab"], atol=1e-5, rtol=1e-5)
    # the seed's LayerNorm eps is 1e-5 where the nano preset has timm's 1e-6
    torch.testing.assert_close(logits["seed"], logits["vitlab"], atol=1e-3, rtol=1e-3)


# ------------------------------------------------------------------ fast paths in vitlab.model
def test_attention_matmul_path_equals_sdpa():
    attention = Attention(dim=64, heads=8).eval()
    x = torch.randn(3, 17, 64)
    qkv = attention.qkv(x)
    q, k, v = attention._split_heads(qkv)
    sdpa = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(3, 17, 64)
    torch.testing.assert_close(attention._attend_with_matmuls(qkv, 0.0), sdpa, atol=1e-5, rtol=1e-5)


def test_attention_gradients_agree_between_the_two_paths():
    attention = Attention(dim=32, heads=4, attention_dropout=0.0)
    x = torch.randn(2, 9, 32, requires_grad=True)
    qkv = attention.qkv(x)
    q, k, v = attention._split_heads(qkv)
    sdpa = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 9, 32)
    grad_sdpa = torch.autograd.grad(sdpa.square().sum(), x, retain_graph=True)[0]
    grad_matmul = torch.autograd.grad(attention._attend_with_matmuls(qkv, 0.0).square().sum(), x)[0]
    torch.testing.assert_close(grad_matmul, grad_sdpa, atol=1e-5, rtol=1e-5)


def test_fast_dropout_keeps_the_expected_fraction_and_scales_exactly():
    x = torch.ones(1000, 1000)
    out = dropout(x, 0.1, training=True)
    kept = out != 0
    assert 0.898 < kept.float().mean().item() < 0.902  # 1e6 draws: 5 standard deviations
    keep_probability = 1 - round(0.1 * 65536) / 65536
    assert torch.all(out[kept] == 1 / keep_probability)
    assert abs(out.mean().item() - 1.0) < 0.003  # the expectation is preserved
    assert dropout(x, 0.1, training=False) is x and dropout(x, 0.0, training=True) is x


def test_fast_dropout_gradient_is_the_same_mask_and_scale():
    x = torch.randn(64, 33, requires_grad=True)
    out = dropout(x, 0.25, training=True)
    out.backward(torch.ones_like(out))
    torch.testing.assert_close(x.grad, (out != 0).float() / 0.75)


def test_fast_dropout_is_reproducible_and_a_drop_in_for_nn_dropout():
    torch.manual_seed(1)
    a = dropout(torch.ones(4, 50), 0.5)
    torch.manual_seed(1)
    assert torch.equal(a, dropout(torch.ones(4, 50), 0.5))
    module = Dropout(0.3)
    assert isinstance(module, torch.nn.Dropout) and repr(module) == "Dropout(p=0.3, inplace=False)"
    assert torch.equal(module.eval()(a), a)


def test_seed_model_trains_with_dropout_on_the_fast_paths():
    # dropout 0.1 everywhere, as the seed preset: attention takes the matmul path on CPU
    model = vitlab.VisionTransformer(**tiny_vit_kwargs(dropout=0.1))
    x, y = torch.randn(4, 3, 16, 16), torch.arange(4) % 5
    model.train()
    assert not torch.equal(model(x), model(x))
    F.cross_entropy(model(x), y).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@needs_bf16
def test_autocast_training_step_matches_timm_under_the_same_autocast():
    models = build_models(preset_config("nano", **TINY, dropout=0.0))
    x, y = torch.randn(4, 3, 16, 16), torch.arange(4) % 10
    grads = {}
    for name in ("vitlab", "timm"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(models[name].train()(x).float(), y)
        loss.backward()
        grads[name] = models[name].head.weight.grad
    torch.testing.assert_close(grads["vitlab"], grads["timm"], atol=2e-2, rtol=5e-2)


# ------------------------------------------------------------------ vitlab.inference
@needs_bf16
def test_bf16_inference_copy_agrees_with_fp32_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = vitlab.create_model("nano", **TINY)
    before = copy.deepcopy(model.state_dict())
    fast = inference_model(model, "bf16")
    x = torch.randn(64, 3, 16, 16)
    with torch.no_grad():
        reference, logits = model.eval()(x), fast(x)
    assert logits.dtype == torch.float32
    assert all(p.dtype == torch.bfloat16 for p in fast.parameters())
    assert (logits - reference).abs().max() < 0.05 * reference.abs().max()
    assert (logits.argmax(-1) == reference.argmax(-1)).float().mean() > 0.9
    for key, value in model.state_dict().items():
        assert value.dtype == torch.float32 and torch.equal(value, before[key])
    unpacked = inference_model(model, "bf16", pack=False)  # what --compile traces
    assert not any(isinstance(m, PackedLinear) for m in unpacked.modules())
    with torch.no_grad():
        torch.testing.assert_close(unpacked(x), logits, atol=0.05 * reference.abs().max().item(), rtol=0)


def test_fp32_inference_model_is_the_model_in_eval_mode():
    model = vitlab.VisionTransformer(**tiny_vit_kwargs()).train()
    assert inference_model(model, "fp32") is model and not model.training
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, got 'fp16'"):
        inference_model(model, "fp16")


@needs_onednn
@pytest.mark.parametrize("shape", [(1, 32), (3, 5, 32), (2, 65, 32)])
def test_packed_linear_equals_bf16_linear_with_and_without_gelu(shape):
    linear = torch.nn.Linear(32, 48)
    x = torch.randn(*shape)
    plain = F.linear(x.bfloat16(), linear.weight.bfloat16(), linear.bias.bfloat16()).float()
    torch.testing.assert_close(PackedLinear(linear)(x).float(), plain, atol=1e-2, rtol=1e-2)
    fused = PackedLinear(linear, activation="gelu")(x).float()
    torch.testing.assert_close(fused, F.gelu(plain), atol=2e-2, rtol=2e-2)
    assert PackedLinear(linear).state_dict().keys() == linear.state_dict().keys()


@needs_onednn
def test_bf16_inference_copy_fuses_gelu_into_the_first_mlp_layer():
    fast = inference_model(vitlab.create_model("nano", **TINY), "bf16").module
    mlp = fast.blocks[0].mlp
    assert isinstance(mlp.fc1, PackedLinear) and mlp.fc1.activation == "gelu"
    assert isinstance(mlp.act, torch.nn.Identity) and mlp.fc2.activation == "none"
    assert fast.state_dict().keys() == vitlab.create_model("nano", **TINY).state_dict().keys()


@pytest.mark.slow
def test_bench_compile_option_times_compiled_vitlab_and_timm_beside_eager(bench_test_preset):
    report = run_benchmark(BenchConfig(preset=bench_test_preset, batch_size=2, precisions=("fp32",),
                                       rounds=1, train_steps=1, inference_steps=1, matmul_size=64,
                                       compile=True), log=lambda line: None)
    assert [r.implementation for r in report.results] == ["vitlab", "vitlab+compile", "timm",
                                                          "timm+compile", "seed"]
    assert all(r.train_img_s > 0 and r.inference_img_s > 0 for r in report.results)


@pytest.mark.slow
def test_model_with_dropout_compiles_as_one_graph():
    # under torch.compile the CPU dropout path hands over to inductor's own random numbers
    model = vitlab.VisionTransformer(**tiny_vit_kwargs(dropout=0.1))
    compiled = torch.compile(model, fullgraph=True)  # a graph break would raise
    logits = compiled(torch.randn(2, 3, 16, 16))
    logits.sum().backward()
    assert torch.isfinite(model.head.weight.grad).all()
