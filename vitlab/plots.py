"""Every figure vitlab draws: training curves, confusion matrix, attention maps, sample grids.

Each is drawn on a bare `matplotlib.figure.Figure`, which renders with the Agg canvas without
touching pyplot's global backend: it works headless and leaves a notebook's inline plotting
alone. Each is written atomically (vitlab.files), so a kill never leaves half a PNG.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .files import atomic_write


def save_figure(fig, path: str | Path, dpi: int = 100) -> Path:
    """Writes `fig` to `path` (format from the suffix: .png, .pdf, .svg) atomically."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    atomic_write(path, lambda f: fig.savefig(f, format=fmt, dpi=dpi))
    return path


def _figure(**kwargs):
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def plot_curves(metrics: list[dict], path: str | Path) -> Path:
    """Loss and top-1 per epoch (train, validation, validation of the EMA weights) side by side."""
    epochs = [m["epoch"] for m in metrics]
    fig = _figure(figsize=(10, 4), layout="tight")
    ax_loss, ax_acc = fig.subplots(1, 2)
    ax_loss.plot(epochs, [m["train_loss"] for m in metrics], "o-", label="train")

    def evaluated(ax, key: str, style: str, label: str) -> None:
        # validation figures exist only for the epochs that were evaluated (--eval-every)
        points = [(m["epoch"], m[key]) for m in metrics if m.get(key) is not None]
        if points:
            ax.plot(*zip(*points), style, label=label)

    evaluated(ax_loss, "val_loss", "o-", "val")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.plot(epochs, [m["train_top1"] for m in metrics], "o-", label="train (augmented)")
    evaluated(ax_acc, "val_top1", "o-", "val")
    evaluated(ax_acc, "ema_val_top1", "o--", "val, EMA weights")
    ax_acc.set(xlabel="epoch", ylabel="top-1 accuracy", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    return save_figure(fig, path)


def plot_confusion_matrix(result, path: str | Path, title: str = "") -> Path:
    """Row-normalised confusion matrix of a vitlab.evaluate.EvalResult as a PNG (counts written in
    each cell for up to 20 classes)."""
    k = len(result.class_names)
    rates = result.confusion.double() / result.confusion.sum(dim=1, keepdim=True).clamp(min=1)
    size = max(5.0, 0.45 * k + 2)
    fig = _figure(figsize=(size + 1, size), layout="tight")
    ax = fig.subplots()
    image = ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if k <= 40:
        ax.set_xticks(range(k), result.class_names, rotation=90 if k > 10 else 45, ha="right")
        ax.set_yticks(range(k), result.class_names)
    if k <= 20:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(int(result.confusion[i, j])), ha="center", va="center", fontsize=7,
                        color="white" if rates[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted", ylabel="true",
           title=title or f"top-1 {result.top1:.2%} on {result.n} images")
    return save_figure(fig, path)


def plot_image_grid(images: torch.Tensor, labels: list[int], row_names: list[str], path: str | Path,
                    per_row: int) -> Path:
    """float (B, C, H, W) images in [0, 1], one row per class: row r shows the images whose label is
    the r-th entry of `row_names`' order of appearance in `labels`, at most per_row of them."""
    rows = sorted(set(labels), key=labels.index)
    fig = _figure(figsize=(per_row * 0.9 + 1.2, len(rows) * 0.9), layout="tight")
    axes = fig.subplots(len(rows), per_row, squeeze=False)
    for row, label in enumerate(rows):
        members = [i for i, l in enumerate(labels) if l == label][:per_row]
        for col in range(per_row):
            ax = axes[row][col]
            ax.set_xticks([])
            ax.set_yticks([])
            if col >= len(members):
                ax.axis("off")
                continue
            image = images[members[col]].permute(1, 2, 0).numpy()  # (H, W, C)
            ax.imshow(image[:, :, 0] if image.shape[2] == 1 else image, cmap="gray", vmin=0, vmax=1,
                      interpolation="nearest")
        axes[row][0].set_ylabel(row_names[row], rotation=0, ha="right", va="center", fontsize=8)
        axes[row][0].axis("on")  # the row label lives on the first axes
    return save_figure(fig, path)


def _display_image(image) -> np.ndarray:
    """(C, H, W) or (H, W, C) uint8/float image -> (H, W, 3) or (H, W) floats in [0, 1] for imshow."""
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = array.transpose(1, 2, 0)
    array = array.astype(np.float32)
    if array.max() > 1.0:
        array = array / 255.0
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return array.clip(0.0, 1.0)


def plot_attention(
    image,
    maps: "AttentionMaps",
    out: str | Path,
    *,
    index: int = 0,
    class_names: list[str] | None = None,
    title: str | None = None,
) -> Path:
    """Writes one figure for image `index` of `maps`: the image, the rollout over it, and the
    query attention of every head (rows: layers, columns: heads), titled with the predicted class.

    image: that image as uint8 (C, H, W) / (H, W, C), or floats in [0, 1]; out: .png/.pdf/.svg path.
    Each head's map is scaled to its own maximum, so the grid shows where each head looks rather
    than which head is most peaked.
    """
    pixels = _display_image(image)
    height, width = pixels.shape[:2]
    layers, _, heads = maps.query_attention.shape[:3]
    probabilities = maps.probabilities[index]
    predicted = int(probabilities.argmax())
    name = class_names[predicted] if class_names else f"class {predicted}"
    headline = f"predicted: {name} ({probabilities[predicted]:.1%})"
    if title:
        headline = f"{title}\n{headline}"

    cell = 0.9  # inches per head map (width)
    aspect = height / width  # wide images get flatter panels instead of white space
    big = max(2.4, cell * layers / 2)
    fig = _figure(figsize=(big + 0.6 + cell * heads + 0.4, max(2 * big, cell * layers) * aspect + 1.2),
                 layout="constrained")
    outer = fig.add_gridspec(1, 2, width_ratios=[big, cell * heads])
    left = outer[0].subgridspec(2, 1)
    grey = "gray" if pixels.ndim == 2 else None
    extent = (0, width, height, 0)  # pixel coordinates, so the patch-grid maps stretch over the image

    ax = fig.add_subplot(left[0])
    ax.imshow(pixels, cmap=grey, extent=extent, interpolation="nearest")
    ax.set_title("input", fontsize=10)
    ax.set_axis_off()

    ax = fig.add_subplot(left[1])
    ax.imshow(pixels, cmap=grey, extent=extent, interpolation="nearest")
    ax.imshow(maps.query_rollout[index], cmap="inferno", alpha=0.6, extent=extent, interpolation="bilinear")
    ax.set_title(f"attention rollout ({maps.query})", fontsize=10)
    ax.set_axis_off()

    grid = outer[1].subgridspec(layers, heads)
    for layer in range(layers):
        for head in range(heads):
            ax = fig.add_subplot(grid[layer, head])
            ax.imshow(maps.query_attention[layer, index, head], cmap="viridis", interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if layer == 0:
                ax.set_title(f"head {head + 1}", fontsize=9)
            if head == 0:
                ax.set_ylabel(f"layer {layer + 1}", fontsize=9, rotation=0, ha="right", va="center")
    fig.suptitle(f"{headline}\nright: {maps.query} attention of each head (each map scaled to its max)",
                 fontsize=11)
    return save_figure(fig, out, dpi=80)
