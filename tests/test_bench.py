"""vitlab bench, and the fast paths it measures: each must equal the plain path it replaces, and
each hardware-specific one must fall back to a portable path where the hardware lacks it."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import vitlab
import vitlab.inference
import vitlab.model
import vitlab.precision
from vitlab.bench import BenchConfig, build_models, run_benchmark
from vitlab.cli import main
from vitlab.inference import PackedLinear, inference_model
from vitlab.precision import packed_bf16_linear_supported
from vitlab.presets import preset_config

from .conftest import tiny_vit_kwargs

TINY = dict(image_size=16, dim=32, depth=1, heads=2, mlp_dim=64)
needs_packed_linear = pytest.mark.skipif(
    not packed_bf16_linear_supported(),
    reason="oneDNN's prepacked bf16 linear needs AVX512-BW/VL/DQ or AVX-NE-CONVERT; this CPU has neither")


@pytest.fixture
def bench_test_preset(monkeypatch):
    """A preset small enough to bench in a second: `nano` cut down to one narrow block."""
    monkeypatch.setitem(vitlab.presets.PRESETS, "bench-test", {**vitlab.presets.PRESETS["nano"], **TINY})
    return "bench-test"


@pytest.fixture
def no_packed_linear(monkeypatch):
    """Behave as on a CPU where oneDNN's prepacked bf16 linear does not run."""
    monkeypatch.setattr(vitlab.inference, "packed_bf16_linear_supported", lambda: False)


def _counted_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_bench_prints_a_table_then_one_json_line_with_every_figure(capsys, bench_test_preset, monkeypatch):
    assert main(["bench", "--preset", bench_test_preset, "--batch-size", "2", "--rounds", "1",
                 "--steps", "1", "--precision", "fp32", "--matmul-size", "64"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("vitlab bench: preset bench-test, batch 2")
    report = json.loads(out[-1])
    assert [r["implementation"] for r in report["results"]] == ["vitlab", "timm", "seed"]
    for r in report["results"]:  # every row of the table, with its figures
        assert any(line.split()[:2] == ["fp32", r["implementation"]] for line in out)
        assert r["train_img_s"] > 0 and r["inference_img_s"] > 0 and r["train_peak_mib"] > 0

    # The FLOPs the report divides by are what torch's own counter sees the models run, per image
    # (the explicit attention path, so the counter sees the attention matmuls).
    config = preset_config(bench_test_preset)
    model = vitlab.VisionTransformer.from_config(config)
    monkeypatch.setattr(vitlab.model, "prefers_explicit_attention", lambda *args: True)
    images = torch.randn(1, 3, 16, 16, requires_grad=True)
    with torch.no_grad():
        full = _counted_flops(lambda: model.forward_head(model.forward_features(images)))
        executed = _counted_flops(lambda: model(images))  # the [CLS]-only last block
    trained = _counted_flops(lambda: model(images).sum().backward())
    assert report["forward_gflops_per_image"] * 1e9 == pytest.approx(full)
    by_name = {r["implementation"]: r for r in report["results"]}
    assert by_name["timm"]["forward_gflops_per_image"] * 1e9 == pytest.approx(full)
    assert by_name["seed"]["forward_gflops_per_image"] * 1e9 == pytest.approx(full)
    vitlab_row = by_name["vitlab"]
    assert vitlab_row["forward_gflops_per_image"] * 1e9 == pytest.approx(executed)
    # achieved TFLOP/s: counted FLOPs per image times the images per second the run measured
    assert vitlab_row["inference_tflops"] * 1e12 == pytest.approx(vitlab_row["inference_img_s"] * executed)
    assert vitlab_row["train_tflops"] * 1e12 == pytest.approx(vitlab_row["train_img_s"] * trained)


def test_bench_runs_bf16_on_any_cpu_and_says_when_it_is_emulated(capsys, bench_test_preset, monkeypatch,
                                                                 no_packed_linear):
    monkeypatch.setattr(vitlab.precision, "bf16_supported", lambda device: False)
    report = run_benchmark(BenchConfig(preset=bench_test_preset, batch_size=2, precisions=("fp32", "bf16"),
                                       rounds=1, train_steps=1, inference_steps=1, matmul_size=64),
                           log=lambda line: None)
    assert "bf16 requested but this cpu has no native bf16" in capsys.readouterr().err
    assert {(r.implementation, r.precision) for r in report.results} == {
        (name, precision) for name in ("vitlab", "timm", "seed") for precision in ("fp32", "bf16")}
    assert all(r.train_img_s > 0 and r.inference_img_s > 0 for r in report.results)
    # no peak is measured for emulated bf16, so no utilisation is claimed against one
    assert set(report.matmul_peak_tflops) == {"fp32"}
    assert all((r.train_utilisation is None) == (r.precision == "bf16") for r in report.results)
    table = report.table()
    assert "vitlab bf16 inference / timm fp32 inference:" in table
    assert all(line.count("n/a") == 2 for line in table.splitlines() if line.startswith("bf16"))


def test_bench_cli_auto_precision_times_fp32_only_where_bf16_is_emulated(capsys, bench_test_preset,
                                                                        monkeypatch):
    monkeypatch.setattr(vitlab.precision, "bf16_supported", lambda device: False)
    assert main(["bench", "--preset", bench_test_preset, "--batch-size", "1", "--rounds", "1",
                 "--steps", "1", "--matmul-size", "32"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {r["precision"] for r in report["results"]} == {"fp32"}


def test_bench_rejects_bad_settings_in_one_line(capsys):
    assert main(["bench", "--device", "nonsense"]) == 2
    err = capsys.readouterr().err
    assert "unknown device 'nonsense'" in err and err.count("\n") == 1


def test_bench_rejects_a_bad_count_before_any_work(capsys):
    with pytest.raises(SystemExit) as exit_info:  # argparse's usage error: the usage, then one line
        main(["bench", "--batch-size", "0"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith("argument --batch-size: must be at least 1, got 0")


def test_bench_config_rejects_an_unknown_precision():
    with pytest.raises(ValueError, match="precision must be fp32, bf16 or both"):
        BenchConfig(precisions=("fp16",))


def test_the_three_implementations_share_weights_and_agree():
    models = build_models(preset_config("nano", **TINY, dropout=0.0))
    x = torch.randn(3, 3, 16, 16)
    logits = {name: model.eval()(x) for name, model in models.items()}
    torch.testing.assert_close(logits["timm"], logits["vitlab"], atol=1e-5, rtol=1e-5)
    # the seed's LayerNorm eps is 1e-5 where the nano preset has timm's 1e-6
    torch.testing.assert_close(logits["seed"], logits["vitlab"], atol=1e-3, rtol=1e-3)


def test_seed_model_trains_with_dropout():
    # dropout 0.1 everywhere, as the seed preset: on CPU attention takes the explicit path
    model = vitlab.VisionTransformer(**tiny_vit_kwargs(dropout=0.1))
    x, y = torch.randn(4, 3, 16, 16), torch.arange(4) % 5
    model.train()
    assert not torch.equal(model(x), model(x))
    F.cross_entropy(model(x), y).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_autocast_training_step_matches_timm_under_the_same_autocast():
    # bf16 autocast runs on every CPU (emulated where it is not native): the model is tiny
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
def _check_bf16_copy(model, fast, x):
    """bf16 logits close to fp32 ones, returned as fp32 from bf16 weights."""
    with torch.no_grad():
        reference, logits = model.eval()(x), fast(x)
    assert logits.dtype == torch.float32
    assert all(p.dtype == torch.bfloat16 for p in fast.parameters())
    assert (logits - reference).abs().max() < 0.05 * reference.abs().max()
    assert (logits.argmax(-1) == reference.argmax(-1)).float().mean() > 0.9
    return logits


def test_bf16_inference_copy_agrees_with_fp32_and_leaves_the_model_alone():
    model = vitlab.create_model("nano", **TINY)
    before = copy.deepcopy(model.state_dict())
    fast = inference_model(model, "bf16")  # packed oneDNN weights where the probe says they run
    packed = any(isinstance(m, PackedLinear) for m in fast.modules())
    assert packed == packed_bf16_linear_supported()
    x = torch.randn(64, 3, 16, 16)
    logits = _check_bf16_copy(model, fast, x)
    for key, value in model.state_dict().items():
        assert value.dtype == torch.float32 and torch.equal(value, before[key])
    unpacked = inference_model(model, "bf16", pack=False)  # what --compile traces
    assert not any(isinstance(m, PackedLinear) for m in unpacked.modules())
    torch.testing.assert_close(_check_bf16_copy(model, unpacked, x), logits, atol=0.05 * logits.abs().max().item(),
                               rtol=0)


def test_bf16_inference_falls_back_to_plain_bf16_linear_without_the_packed_kernel(no_packed_linear):
    model = vitlab.create_model("nano", **TINY)
    fast = inference_model(model, "bf16")
    linears = [m for m in fast.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m.weight.dtype == torch.bfloat16 for m in linears)
    assert not any(isinstance(m, PackedLinear) for m in fast.modules())
    assert isinstance(fast.module.blocks[0].mlp.act, torch.nn.GELU)  # nothing fused
    _check_bf16_copy(model, fast, torch.randn(64, 3, 16, 16))
    with pytest.raises(RuntimeError, match="use a bf16 nn.Linear"):
        PackedLinear(torch.nn.Linear(8, 8))


def test_fp32_inference_model_is_the_model_in_eval_mode():
    model = vitlab.VisionTransformer(**tiny_vit_kwargs()).train()
    assert inference_model(model, "fp32") is model and not model.training
    with pytest.raises(ValueError, match="precision must be fp32 or bf16"):
        inference_model(model, "fp16")


@needs_packed_linear
@pytest.mark.parametrize("shape", [(1, 32), (3, 5, 32), (2, 65, 32)])
def test_packed_linear_equals_bf16_linear_with_and_without_gelu(shape):
    linear = torch.nn.Linear(32, 48)
    x = torch.randn(*shape)
    plain = F.linear(x.bfloat16(), linear.weight.bfloat16(), linear.bias.bfloat16()).float()
    torch.testing.assert_close(PackedLinear(linear)(x).float(), plain, atol=1e-2, rtol=1e-2)
    fused = PackedLinear(linear, activation="gelu")(x).float()
    torch.testing.assert_close(fused, F.gelu(plain), atol=2e-2, rtol=2e-2)
    assert PackedLinear(linear).state_dict().keys() == linear.state_dict().keys()


@needs_packed_linear
def test_bf16_inference_copy_fuses_gelu_into_the_first_mlp_layer():
    model = vitlab.create_model("nano", **TINY)
    fast = inference_model(model, "bf16").module
    mlp = fast.blocks[0].mlp
    assert isinstance(mlp.fc1, PackedLinear) and mlp.fc1.activation == "gelu"
    assert isinstance(mlp.act, torch.nn.Identity) and mlp.fc2.activation == "none"
    assert fast.state_dict().keys() == model.state_dict().keys()
    x = torch.randn(2, 17, 32)
    with torch.no_grad():  # the fused layer computes what fc1 then GELU did
        torch.testing.assert_close(mlp(x.bfloat16()).float(), model.blocks[0].mlp.eval()(x), atol=5e-2, rtol=5e-2)


def test_packing_replaces_every_linear_and_fuses_gelu_on_any_cpu(monkeypatch):
    """The wiring of the packed path, run everywhere: the two private oneDNN ops are replaced by
    what they compute (the weight as is; linear, then GELU if asked)."""
    def linear_pointwise(x, weight, bias, activation, scalars, algorithm):
        out = F.linear(x, weight, bias)
        return F.gelu(out) if activation == "gelu" else out

    monkeypatch.setattr(vitlab.inference, "packed_bf16_linear_supported", lambda: True)
    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", lambda weight: weight.detach().clone())
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", linear_pointwise)
    model = vitlab.create_model("nano", **TINY)
    fast = inference_model(model, "bf16")
    assert not any(type(m) is torch.nn.Linear for m in fast.modules())
    mlp = fast.module.blocks[0].mlp
    assert mlp.fc1.activation == "gelu" and isinstance(mlp.act, torch.nn.Identity)
    assert fast.module.state_dict().keys() == model.state_dict().keys()
    _check_bf16_copy(model, fast, torch.randn(64, 3, 16, 16))


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
    model = vitlab.VisionTransformer(**tiny_vit_kwargs(dropout=0.1))
    compiled = torch.compile(model, fullgraph=True)  # a graph break would raise
    logits = compiled(torch.randn(2, 3, 16, 16))
    logits.sum().backward()
    assert torch.isfinite(model.head.weight.grad).all()
