"""`vitlab train --log tensorboard`: the run's numbers as TensorBoard event files in DIR/tensorboard.

    train/loss, train/lr, train/img_per_s   every time the loop reads the loss on the host (every
                                            step on a CPU, every --sync-every steps on a GPU)
    epoch/<metric>                          each metrics.jsonl number, once per epoch
    confusion matrix, predictions           images at the end: the validation confusion matrix of
                                            the saved weights and 16 validation images with the
                                            predicted and the true class

Written through torch.utils.tensorboard; the tensorboard package is an optional extra
(`pip install 'vitlab[tensorboard]'`), and asking for it without the package is a one-line error
before any data loads. `tensorboard --logdir runs` then shows every run side by side.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .rundir import TENSORBOARD_DIR



def require_tensorboard() -> None:
    """Fails in one line, before any work, where the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (imports tensorboard)
    except ImportError:
        raise ValueError("--log tensorboard needs the tensorboard package: pip install 'vitlab[tensorboard]' "
                         "(or pip install tensorboard)") from None


class TensorBoardLog:
    def __init__(self, run_dir: str | Path, resumed_step: int = 0):
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a resumed run redoes the steps after its checkpoint; drop what the
        # interrupted run logged for them so the curves do not double back
        self.writer = SummaryWriter(str(Path(run_dir) / TENSORBOARD_DIR), purge_step=resumed_step or None)

    def step(self, global_step: int, loss: float, lr: float, images_per_second: float) -> None:
        self.writer.add_scalar("train/loss", loss, global_step)
        self.writer.add_scalar("train/lr", lr, global_step)
        self.writer.add_scalar("train/img_per_s", images_per_second, global_step)

    def epoch(self, row: dict) -> None:
        for key, value in row.items():
            if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"epoch/{key}", value, row["epoch"])
        self.writer.flush()

    def final_images(self, confusion_png: Path, images: torch.Tensor, predicted: list[int], true: list[int],
                     class_names: list[str], epoch: int) -> None:
        """confusion_png: the validation confusion matrix the run wrote; images: uint8 (N, C, H, W)."""
        from PIL import Image
        from torchvision.utils import make_grid

        with Image.open(confusion_png) as picture:
            self.writer.add_image("confusion matrix (validation)", np.asarray(picture.convert("RGB")), epoch,
                                  dataformats="HWC")
        grid = make_grid(images.float() / 255, nrow=8, padding=2)  # (C, H', W') in [0, 1]
        self.writer.add_image("predictions (validation)", grid, epoch)
        rows = [f"| {i} | {class_names[p]} | {class_names[t]} | {'yes' if p == t else 'no'} |"
                for i, (p, t) in enumerate(zip(predicted, true))]
        self.writer.add_text("predictions (validation)", "| image (left to right, top to bottom) | predicted | "
                             "true | right |\n|---|---|---|---|\n" + "\n".join(rows), epoch)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

