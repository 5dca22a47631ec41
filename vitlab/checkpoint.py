"""Checkpoints: model weights as safetensors, training state as a weights_only-safe torch file.

A run directory holds
  best.safetensors, last.safetensors   the weights, with metadata to rebuild the classifier
                                        (model config, class names, mean/std, image size)
  last.state.pt                         everything resume needs: model, EMA and optimizer
                                        tensors, scheduler, RNG, epoch/step counters

Every file is written atomically (vitlab.files), so a kill at any instant leaves either the old
or the new file, never a torn one. The state file carries its own copy of the weights, so
resume never depends on two files having been renamed together.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .files import atomic_write, atomic_write_bytes

FORMAT = "vitlab-checkpoint-1"
WEIGHT_FILES = ("best.safetensors", "last.safetensors")
STATE_FILE = "last.state.pt"


# ---------------------------------------------------------------- weights (safetensors)
def _unwrap(model: nn.Module) -> nn.Module:
    """The plain VisionTransformer inside a Classifier, DDP or torch.compile wrapper."""
    for attribute in ("model", "module", "_orig_mod"):
        inner = getattr(model, attribute, None)
        if isinstance(inner, nn.Module):
            return _unwrap(inner)
    return model


def weights_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in _unwrap(model).state_dict().items()}


def save_model(
    path: str | Path,
    model: nn.Module,
    *,
    class_names: list[str] | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    extra: dict | None = None,
) -> Path:
    """Writes the weights of a VisionTransformer or Classifier as safetensors, atomically.

    The metadata holds what load_checkpoint needs to rebuild a working classifier: the model
    config, class names and preprocessing. A Classifier supplies its own names and mean/std; for a
    bare VisionTransformer pass `class_names` (else they are "0", "1", ...), `mean` and `std`.
    `state_dict` saves other weights for this architecture (the EMA's); `extra` adds JSON fields
    (epoch, which weights, accuracy).
    """
    from safetensors.torch import save

    vit = _unwrap(model)
    num_classes = vit.config.num_classes
    class_names = class_names if class_names is not None else getattr(model, "class_names", None)
    class_names = [str(c) for c in class_names] if class_names is not None else \
        [str(i) for i in range(num_classes)]
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for a model with {num_classes} classes")
    mean = mean if mean is not None else getattr(model, "mean", None)
    std = std if std is not None else getattr(model, "std", None)
    if mean is None or std is None:
        raise ValueError("save_model needs the normalisation mean and std the model was trained with")
    # class names live beside the config, not in it (checkpoints before that kept a copy there)
    config = {k: v for k, v in vit.config.to_dict().items() if k != "class_names"}
    h, w = vit.patch_embedding.image_size
    preprocessing = {"mean": [float(m) for m in mean], "std": [float(s) for s in std],
                     "image_size": [h, w], "in_channels": vit.config.in_channels}
    metadata = {
        "format": FORMAT,
        "model_config": json.dumps(config),
        "class_names": json.dumps(class_names),
        "preprocessing": json.dumps(preprocessing),
    }
    for key, value in (extra or {}).items():
        metadata[key] = json.dumps(value)
    tensors = state_dict if state_dict is not None else weights_state_dict(vit)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return atomic_write_bytes(path, save(tensors, metadata=metadata))


def resolve_checkpoint(path: str | Path | None) -> Path:
    """A run directory (its best checkpoint, else its last) or a .safetensors file -> the file."""
    if path is None:
        raise ValueError(
            "no checkpoint given and no default weights ship with vitlab yet; pass a run "
            "directory (e.g. runs/nano) or a .safetensors file"
        )
    path = Path(path)
    if path.is_dir():
        for name in WEIGHT_FILES:
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(
            f"{path} holds no checkpoint ({' or '.join(WEIGHT_FILES)}); is it a vitlab train --out "
            f"directory whose first epoch finished?"
        )
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass a run directory or a "
                                f".safetensors file")
    if path.suffix != ".safetensors":
        raise ValueError(f"{path} is not a .safetensors checkpoint; pass a run directory or a "
                         f".safetensors file")
    return path


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The raw string metadata in a .safetensors file's header ({} when it has none), read without
    loading any tensor. The one reader of safetensors headers: vitlab checkpoints and --init files."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as error:  # SafetensorError, OSError, ...: a torn or foreign file
        raise ValueError(f"{path} is corrupt or truncated and cannot be read as safetensors "
                         f"({error})") from None


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON-decoded metadata of a vitlab checkpoint, with a one-line error for anything else."""
    path = resolve_checkpoint(path)
    raw = read_safetensors_metadata(path)
    if raw.get("format") != FORMAT or "model_config" not in raw:
        raise ValueError(
            f"{path} is a safetensors file without vitlab metadata (model config, class names); "
            f"save it with vitlab.checkpoint.save_model, or start from timm/seed weights with "
            f"vitlab.weights (vitlab train --init)"
        )
    return {k: (json.loads(v) if k != "format" else v) for k, v in raw.items()}


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", precision: str = "auto"):
    """Rebuilds the Classifier saved in `path` (a run directory or .safetensors file) on `device`
    ("cpu", "cuda", "auto": CUDA when there is one). `precision` ("auto", "bf16", "fp32") is the
    number format its predict/probabilities/embed run in; see Classifier.precision."""
    from safetensors.torch import load_file

    from .classifier import Classifier
    from .model import ViTConfig, VisionTransformer
    from .runtime import resolve_device

    device = resolve_device(device)
    path = resolve_checkpoint(path)
    meta = read_metadata(path)
    try:
        tensors = load_file(str(path), device=str(device))
    except Exception as error:
        raise ValueError(f"{path} is corrupt or truncated: its tensors cannot be read ({error})") from None
    config = ViTConfig.from_dict(meta["model_config"])
    with torch.device("meta"):
        model = VisionTransformer.from_config(config)
    check_weights_match(model, tensors, path)
    model.load_state_dict(tensors, strict=True, assign=True)
    pre = meta["preprocessing"]
    classifier = Classifier(model, class_names=meta["class_names"], mean=pre["mean"], std=pre["std"],
                            precision=precision)
    classifier.metadata = meta
    return classifier.eval()


def check_weights_match(model: nn.Module, tensors: dict[str, torch.Tensor], source: str | Path) -> None:
    """Raises one line naming the first differences between a checkpoint and the model it should fill."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [f"{k} {found[k]} vs {expected[k]}" for k in sorted(set(expected) & set(found))
             if found[k] != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    if unexpected:
        problems.append(f"unexpected {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}")
    if wrong:
        problems.append(f"shape {', '.join(wrong[:3])}{' ...' if len(wrong) > 3 else ''}")
    if problems:
        raise ValueError(f"{source} does not match its model config: {'; '.join(problems)}")


# ---------------------------------------------------------------- training state (torch.load)
def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names and bytes: ties a state file to the exact weights it was saved with."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        digest.update(name.encode())
        digest.update(str(t.dtype).encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def save_training_state(path: str | Path, state: dict) -> Path:
    """torch.save of plain containers of tensors and numbers, atomically; loadable with weights_only."""
    return atomic_write(path, lambda f: torch.save(state, f))


def load_training_state(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the run has no resumable state (did its first "
                                f"epoch finish?)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{path} is corrupt or truncated and cannot be resumed from "
                         f"({first_line})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a vitlab training state file")
    if tensor_digest(state["model"]) != state["model_digest"]:
        raise ValueError(f"{path} is corrupt: its model weights do not match the digest saved with them")
    return state
