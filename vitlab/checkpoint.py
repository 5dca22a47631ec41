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
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .files import atomic_write, atomic_write_bytes

FORMAT = "vitlab-checkpoint-1"
WEIGHT_FILES = ("best.safetensors", "last.safetensors")
# the weights of a model folder (`vitlab export --format folder`), read when no run checkpoint is there
MODEL_FILE = "model.safetensors"
STATE_FILE = "last.state.pt"
# The model that ships with vitlab (docs/model-card.md): what every command and vitlab.load() use
# when no checkpoint is given, and what `--init default` names.
DEFAULT = "default"
DEFAULT_WEIGHTS = Path(__file__).parent / "weights" / "vit-lite-cifar10.safetensors"


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
    """A run directory (its best checkpoint, else its last), a model folder (its model.safetensors)
    or a .safetensors file -> the file; None or "default" -> the shipped model's weights."""
    if path is None or str(path) == DEFAULT:
        if not DEFAULT_WEIGHTS.is_file():
            raise FileNotFoundError(f"the shipped weights are missing from this install ({DEFAULT_WEIGHTS}); "
                                    f"reinstall vitlab, or pass a run directory or .safetensors file")
        return DEFAULT_WEIGHTS
    path = Path(path)
    if path.is_dir():
        for name in (*WEIGHT_FILES, MODEL_FILE):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(
            f"{path} holds no checkpoint ({', '.join(WEIGHT_FILES)} or {MODEL_FILE}); is it a vitlab train "
            f"--out directory whose first epoch finished, or a vitlab export --format folder directory?"
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
    meta = {k: (_json_value(path, k, v) if k != "format" else v) for k, v in raw.items()}
    _check_metadata(path, meta)
    return meta


def _json_value(path: Path, key: str, text: str):
    try:
        return json.loads(text)
    except RecursionError:  # "[[[[..." a million deep: the C parser recurses once per bracket
        raise ValueError(f"{path}: metadata {key!r} is nested too deeply to be vitlab's; the file is "
                         f"damaged or was not written by vitlab") from None
    except ValueError as error:
        raise ValueError(f"{path}: metadata {key!r} is not valid JSON ({error}); the file is damaged or "
                         f"was not written by vitlab") from None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_metadata(path: Path, meta: dict) -> None:
    """Every field a loader reads has the type and range it needs, so a crafted header is refused
    with the key it got wrong instead of failing (or predicting NaN) later."""
    from .model import ViTConfig

    def refuse(key: str, problem: str):
        raise ValueError(f"{path}: metadata {key!r} {problem}; the file is damaged or was not written by vitlab")

    config = meta.get("model_config")
    if not isinstance(config, dict):
        refuse("model_config", f"must be a JSON object, got {type(config).__name__}")
    try:
        vit = ViTConfig.from_dict(config)
    except (TypeError, ValueError) as error:
        refuse("model_config", f"is invalid: {error}")
    names = meta.get("class_names")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        refuse("class_names", "must be a list of strings")
    if len(names) != vit.num_classes:
        refuse("class_names", f"names {len(names)} classes but the model has {vit.num_classes}")
    pre = meta.get("preprocessing")
    if not isinstance(pre, dict):
        refuse("preprocessing", "is missing or not a JSON object")
    for key in ("mean", "std"):
        values = pre.get(key)
        if not isinstance(values, list) or len(values) != vit.in_channels or not all(map(_is_number, values)):
            refuse("preprocessing", f"needs {key!r}: {vit.in_channels} finite number(s), one per channel")
    if not all(s > 0 for s in pre["std"]):  # dividing by a zero std turns every prediction into NaN
        refuse("preprocessing", f"has std {pre['std']}; every channel's std must be positive")
    data = meta.get("data")
    if data is not None and not (isinstance(data, dict)
                                 and (data.get("val_size") is None or _is_number(data["val_size"]))
                                 and isinstance(data.get("split_seed", 0), int)):
        refuse("data", "must be an object with a numeric val_size and an integer split_seed")


def load_checkpoint(path: str | Path | None = None, device: str | torch.device = "cpu", precision: str = "auto"):
    """Rebuilds the Classifier saved in `path` (a run directory or .safetensors file; None: the
    shipped CIFAR-10 model) on `device` ("cpu", "cuda", "auto": CUDA when there is one). `precision` ("auto", "bf16", "fp32") is the
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
    # weights stored in half precision (the shipped file) compute in fp32 like any other; the
    # Classifier makes its own bf16 copy where that is faster
    tensors = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
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


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_tensors(value) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                           for k, v in value.items())


# what resume reads from a state file, and the check each value must pass
def _is_optimizer_state(v) -> bool:
    return isinstance(v, dict) and isinstance(v.get("state"), dict) and isinstance(v.get("param_groups"), list)


STATE_SCHEMA = {
    "epoch": ("a count", _is_count),
    "step_in_epoch": ("a count", _is_count),
    "global_step": ("a count", _is_count),
    "best_val_top1": ("a number or null", lambda v: v is None or _is_number(v)),
    "total_steps": ("a count or null", lambda v: v is None or _is_count(v)),
    "low_res_end": ("a count or null", lambda v: v is None or _is_count(v)),
    "partial_epoch": ("the epoch's running sums", lambda v: isinstance(v, dict) and all(
        _is_number(v.get(k)) for k in ("loss", "correct", "seen", "seconds"))),
    "rng": ("RNG states", lambda v: isinstance(v, dict) and isinstance(v.get("torch"), torch.Tensor)
            and (v.get("ranks") is None or (isinstance(v["ranks"], list)
                                             and all(isinstance(t, torch.Tensor) for t in v["ranks"])))),
    "model": ("a dict of tensors", _is_tensors),
    "model_digest": ("a sha256 hex digest", lambda v: isinstance(v, str)),
    "model_config": ("a model config object", lambda v: isinstance(v, dict)),
    "optimizer": ("an optimizer state", lambda v: _is_optimizer_state(v) or (  # AdamW, or Muon + AdamW
        isinstance(v, dict) and set(v) == {"muon", "adamw"} and _is_optimizer_state(v["adamw"])
        and (v["muon"] is None or _is_optimizer_state(v["muon"])))),
    "ema": ("an EMA state or null", lambda v: v is None or isinstance(v, dict)),
    "metrics": ("a list of metric rows", lambda v: v is None or (isinstance(v, list) and all(
        isinstance(r, dict) and _is_count(r.get("epoch")) for r in v))),
}
OPTIONAL_STATE_KEYS = ("total_steps", "low_res_end", "ema", "metrics")  # read with .get: absent from older files


def _check_state(path: Path, state: dict) -> None:
    for key, (what, ok) in STATE_SCHEMA.items():
        if key not in state and key in OPTIONAL_STATE_KEYS:
            continue
        if key not in state or not ok(state[key]):
            problem = "is missing" if key not in state else f"is not {what}"
            raise ValueError(f"{path}: key {key!r} {problem}; the state file is damaged or was not written "
                             f"by vitlab; start the run over with --overwrite")


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
    _check_state(path, state)
    if tensor_digest(state["model"]) != state["model_digest"]:
        raise ValueError(f"{path} is corrupt: its model weights do not match the digest saved with them")
    return state
