import pytest
import torch

import vitlab
from vitlab.checkpoint import save_model
from vitlab.classifier import Classifier
from vitlab.cli import main
from vitlab.presets import describe_models
from vitlab.summary import format_summary, summarize

from .conftest import tiny_vit_kwargs


@pytest.mark.parametrize("info", describe_models(), ids=lambda info: info.name)
def test_totals_equal_the_vitlab_models_numbers(info):
    with torch.device("meta"):  # the largest preset costs nothing here
        model = vitlab.create_model(info.name)
    summary = summarize(model)
    assert summary.parameters == info.parameters
    assert summary.flops / 1e9 == pytest.approx(info.gflops)
    assert summary.tokens == info.tokens
    # the rows account for every parameter and every counted FLOP exactly once
    assert sum(row.parameters for row in summary.rows) == summary.parameters
    assert sum(row.flops for row in summary.rows) == summary.flops


def test_rows_have_each_modules_output_shape_and_size():
    model = vitlab.VisionTransformer(**tiny_vit_kwargs(image_size=(16, 24), layer_scale=0.1))
    rows = {row.name: row for row in summarize(model).rows}
    assert rows["patch_embedding"].output_shape == (24, 32)  # 4x6 patches, width 32
    assert rows["blocks.1.attention"].output_shape == (25, 32)
    assert rows["blocks.1.mlp"].parameters == 32 * 64 + 64 + 64 * 32 + 32
    assert rows["blocks.0.scale1"].parameters == 32  # LayerScale rows appear when the model has it
    assert rows["head"].output_shape == (5,) and rows["head"].activations == 5
    assert rows["blocks.0.attention"].flops == vitlab.flops.flops_breakdown(model.config)["blocks.0.attention"]


def _models_row(capsys, name: str) -> list[str]:
    assert main(["models"]) == 0
    return next(line for line in capsys.readouterr().out.splitlines() if line.startswith(name)).split()


def test_cli_summary_prints_the_totals_that_vitlab_models_prints(capsys):
    _, _, params, gflops, *_ = _models_row(capsys, "tiny")
    assert main(["summary", "tiny"]) == 0
    out = capsys.readouterr().out
    assert f"total: {params} parameters, {gflops} GFLOPs per image" in out
    assert "blocks.8.mlp" in out and "head_norm" in out  # 9 blocks, every module listed


def test_cli_summary_of_a_checkpoint(tmp_path, capsys):
    model = vitlab.VisionTransformer(**tiny_vit_kwargs())
    path = save_model(tmp_path / "run" / "best.safetensors", Classifier(model))
    assert main(["summary", str(tmp_path / "run")]) == 0  # a run directory resolves to its checkpoint
    out = capsys.readouterr().out
    assert out.splitlines()[0] == str(tmp_path / "run")
    assert f"total: {model.num_parameters():,} parameters" in out
    assert format_summary(summarize(model), str(path)).splitlines()[1:] == out.splitlines()[1:]


def test_cli_summary_of_something_unknown_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["summary", "nanoo"]) == 2
    err = capsys.readouterr().err
    assert "nanoo is neither a checkpoint" in err and "nor a model preset" in err and err.count("\n") == 1
    (tmp_path / "notes.txt").write_text("hello")
    assert main(["summary", "notes.txt"]) == 2
    assert "notes.txt is not a .safetensors checkpoint" in capsys.readouterr().err
