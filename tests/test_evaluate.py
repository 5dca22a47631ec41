import json

import pytest
import torch
from torch import nn

from vitlab.cli import main
from vitlab.evaluate import evaluate
from vitlab.plots import plot_confusion_matrix
from tests.image_fixtures import train_tiny_run


class FixedLogits(nn.Module):
    """Returns preset logits batch by batch, to check the counting exactly."""

    def __init__(self, logits):
        super().__init__()
        self.logits = list(logits)
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, images):
        return self.logits.pop(0)


def test_top1_top5_per_class_and_confusion_are_counted_exactly():
    # 3 classes, 4 images: true [0, 0, 1, 2]; predictions [0, 1, 1, 1]
    logits = torch.tensor([[3.0, 1, 0], [1, 3, 0], [0, 3, 1], [0, 3, 1]])
    targets = torch.tensor([0, 0, 1, 2])
    loader = [(torch.zeros(2, 3, 4, 4), targets[:2]), (torch.zeros(2, 3, 4, 4), targets[2:])]
    result = evaluate(FixedLogits([logits[:2], logits[2:]]), loader, 3, class_names=["a", "b", "c"])
    assert result.n == 4 and result.top1 == 0.5 and result.top5 == 1.0
    assert result.per_class == {"a": 0.5, "b": 1.0, "c": 0.0}
    assert result.confusion.tolist() == [[1, 1, 0], [0, 1, 0], [0, 1, 0]]
    expected_loss = nn.functional.cross_entropy(logits, targets).item()
    assert result.loss == pytest.approx(expected_loss, rel=1e-6)


def test_confusion_png_is_written(tmp_path):
    logits = torch.eye(3) * 5
    result = evaluate(FixedLogits([logits]), [(torch.zeros(3, 3, 4, 4), torch.arange(3))], 3)
    path = plot_confusion_matrix(result, tmp_path / "confusion.png")
    assert path.read_bytes()[:4] == b"\x89PNG" and path.stat().st_size > 5000


@pytest.fixture(scope="module")
def run_and_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VITLAB_CACHE", str(root / "cache"))
        run = train_tiny_run(root)
        yield run, root / "images"


def test_cli_eval_json_uses_the_training_validation_split(run_and_data, capsys):
    run, images = run_and_data
    assert main(["eval", str(run), "--data", str(images), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 30  # the 30 images held out at training time, read from the checkpoint
    assert out["top1"] >= 0.9 and out["top5"] == 1.0
    assert set(out["per_class"]) == {"circle", "cross", "stripes"}
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    best = max(max(m["val_top1"], m["ema_val_top1"]) for m in metrics)
    assert out["top1"] == pytest.approx(best)  # best.safetensors scores what training recorded
    assert (run / "confusion-best-val.png").exists()


def test_cli_eval_table_and_missing_split(run_and_data, capsys):
    run, images = run_and_data
    assert main(["eval", str(run / "last.safetensors"), "--data", str(images), "--split", "val"]) == 0
    out = capsys.readouterr().out
    assert "top-1" in out and "circle" in out and "(10 images)" in out
    assert main(["eval", str(run), "--data", str(images), "--split", "test"]) == 2
    assert "has no test split" in capsys.readouterr().err
