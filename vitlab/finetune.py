"""Starting from trained weights: read them whatever produced them, fit them to a new model
(other classes, other resolution, other channel count), and set up fine-tuning (frozen backbone,
layer-wise learning-rate decay).

Everything here works on state_dicts and a target VisionTransformer, so the trainer only calls
`load_initial_weights(model, path)` and `param_groups(model, ...)`.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from torch import nn

from .convert import from_seed_state_dict, from_timm_state_dict
from .model import VisionTransformer, resample_position_embedding

StateDict = dict[str, torch.Tensor]


def read_state_dict(path: str | Path) -> StateDict:
    """Tensors from a .safetensors file or a weights_only-loadable .pt/.pth/.bin file.

    Common wrappers ({"state_dict": ...}, {"model": ...}) are unwrapped. Nothing is unpickled
    beyond tensors and plain containers.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{path} is not a readable safetensors file ({error})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle.UnpicklingError, RuntimeError (zip), EOFError, ...
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"{path} cannot be loaded as plain tensors with torch.load(weights_only=True): {first}; "
            f"save a state_dict (model.state_dict()) or a .safetensors file instead"
        ) from None
    for key in ("state_dict", "model", "model_state_dict", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state_dict (a dict of tensors)")
    return {re.sub(r"^(module\.|_orig_mod\.)", "", k): v for k, v in obj.items()}


def detect_format(sd: StateDict) -> str:
    """'vitlab', 'timm' or 'seed', from the key names."""
    if "patch_embedding.projection.weight" in sd and any(k.startswith("blocks.") for k in sd):
        return "vitlab"
    if "patch_embed.proj.weight" in sd:
        return "timm"
    if any(k.startswith("transformer_encoder.") for k in sd):
        return "seed"
    shown = ", ".join(list(sd)[:4])
    raise ValueError(f"not a ViT state_dict from vitlab, timm or the seed's code (keys: {shown} ...)")


def to_vitlab_names(sd: StateDict) -> tuple[StateDict, str]:
    fmt = detect_format(sd)
    if fmt == "timm":
        sd = from_timm_state_dict(sd)
    elif fmt == "seed":
        sd = from_seed_state_dict(sd)
    return sd, fmt


def _square_grid(num_patches: int, key: str) -> tuple[int, int]:
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(
            f"{key} has {num_patches} patch positions, not a square grid: pass weights from a "
            f"vitlab checkpoint (which records its image size) instead"
        )
    return (side, side)


def adapt_input_channels(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """Patch-embedding filters (D, C, P, P) for another number of input channels.

    RGB -> 1 channel sums the filters over channels, so a grey image (R = G = B) gives exactly
    the original response. Other counts repeat the filters cyclically, rescaled to keep the
    response's magnitude (timm's adapt_input_conv).
    """
    source = weight.shape[1]
    if channels == source:
        return weight
    if channels == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = math.ceil(channels / source)
    return weight.repeat(1, repeats, 1, 1)[:, :channels] * (source / channels)


def adapt_state_dict(
    sd: StateDict,
    model: VisionTransformer,
    *,
    source_grid: tuple[int, int] | None = None,
    partial: bool = False,
) -> tuple[StateDict, list[str]]:
    """Fits vitlab-named weights to `model`; returns (state_dict to load, notes for the user).

    Handled: another class count (the head is left freshly initialised), another patch grid
    (position embedding resampled), another channel count (patch filters adapted). Any other
    missing, extra or misshapen key is an error naming the keys, or with partial=True is skipped
    and listed.
    """
    target = model.state_dict()
    out: StateDict = {}
    notes: list[str] = []
    skipped: list[str] = []

    head_shape = sd.get("head.weight")
    if head_shape is not None and head_shape.shape != target["head.weight"].shape:
        notes.append(
            f"replaced the head: {head_shape.shape[0]} -> {target['head.weight'].shape[0]} classes "
            f"(new head initialised from scratch)"
        )
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}

    for key, value in sd.items():
        if key not in target:
            skipped.append(f"{key} (not in the model)")
            continue
        want = target[key].shape
        if key == "pos_embedding" and value.shape != want:
            if value.shape[-1] != want[-1]:
                skipped.append(f"{key} (width {value.shape[-1]} vs {want[-1]})")
                continue
            old = source_grid or _square_grid(value.shape[1] - 1, key)
            value = resample_position_embedding(value, old, model.grid_size)
            notes.append(
                f"resampled the position embedding from a {old[0]}x{old[1]} to a "
                f"{model.grid_size[0]}x{model.grid_size[1]} patch grid"
            )
        elif key == "patch_embedding.projection.weight" and value.shape != want:
            if value.shape[0] != want[0] or value.shape[2:] != want[2:]:
                skipped.append(f"{key} (shape {tuple(value.shape)} vs {tuple(want)})")
                continue
            how = "summed the RGB filters" if want[1] == 1 else "repeated and rescaled the filters"
            notes.append(f"adapted the patch embedding from {value.shape[1]} to {want[1]} input "
                         f"channel(s): {how}")
            value = adapt_input_channels(value, want[1])
        elif value.shape != want:
            skipped.append(f"{key} (shape {tuple(value.shape)} vs {tuple(want)})")
            continue
        out[key] = value.to(target[key].dtype)

    missing = [k for k in target if k not in sd and not k.startswith("head.")]
    skipped += [f"{k} (missing from the weights)" for k in missing]
    if skipped and not partial:
        shown = "; ".join(skipped[:6]) + (f"; and {len(skipped) - 6} more" if len(skipped) > 6 else "")
        raise ValueError(
            f"{len(skipped)} weight(s) do not fit the model: {shown}. Check that the model preset "
            f"matches the weights, or pass --init-partial to load the rest"
        )
    if skipped:
        notes.append(f"skipped {len(skipped)} weight(s) that do not fit: " + "; ".join(skipped))
    return out, notes


def load_initial_weights(
    model: VisionTransformer,
    weights: StateDict,
    *,
    source_grid: tuple[int, int] | None = None,
    partial: bool = False,
) -> list[str]:
    """Loads vitlab-, timm- or seed-named weights into `model` in place; returns the notes."""
    sd, fmt = to_vitlab_names(weights)
    adapted, notes = adapt_state_dict(sd, model, source_grid=source_grid, partial=partial)
    model.load_state_dict(adapted, strict=False)
    return [f"loaded {len(adapted)} tensors ({fmt} format)"] + notes


def freeze_backbone(model: VisionTransformer) -> int:
    """Only the classifier head stays trainable (a linear probe). Returns the trainable count."""
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith("head.")
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def layer_id(name: str, depth: int) -> int:
    """0 for the embeddings, i + 1 for block i, depth + 1 for the head."""
    if name.startswith(("patch_embedding.", "cls_token", "pos_embedding")):
        return 0
    match = re.match(r"blocks\.(\d+)\.", name)
    return int(match.group(1)) + 1 if match else depth + 1


def param_groups(
    model: nn.Module, weight_decay: float, layer_decay: float = 1.0
) -> list[dict]:
    """AdamW parameter groups: no decay on norms, biases, tokens and position embedding; with
    layer_decay < 1, block i's learning rate is scaled by layer_decay ** (depth + 1 - (i + 1)),
    so early layers move least (BEiT / MAE fine-tuning). Each group carries its 'lr_scale'."""
    depth = len(model.blocks)
    no_decay = model.no_weight_decay()
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer = layer_id(name, depth) if layer_decay != 1.0 else depth + 1
        decays = name not in no_decay
        group = groups.setdefault(
            (layer, decays),
            {"params": [], "weight_decay": weight_decay if decays else 0.0,
             "lr_scale": layer_decay ** (depth + 1 - layer), "names": []},
        )
        group["params"].append(param)
        group["names"].append(name)
    return [groups[key] for key in sorted(groups)]


class InitialWeights:
    """Weights to start a run from, read once: a vitlab checkpoint (run directory or .safetensors
    with vitlab metadata, which also fixes the architecture), or a timm / seed state_dict file
    (.safetensors, .pt, .pth, .bin), whose architecture is the run's model preset."""

    def __init__(self, path: str | Path):
        from .checkpoint import FORMAT, read_metadata, resolve_checkpoint
        from .model import ViTConfig

        path = Path(path)
        self.path = path
        self.config: ViTConfig | None = None
        self.source_grid: tuple[int, int] | None = None
        if path.is_dir() or (path.suffix == ".safetensors" and _safetensors_format(path) == FORMAT):
            file = resolve_checkpoint(path)
            meta = read_metadata(file)
            self.config = ViTConfig.from_dict(meta["model_config"])
            h, w = (self.config.image_size,) * 2 if isinstance(self.config.image_size, int) \
                else self.config.image_size
            self.source_grid = (h // self.config.patch_size, w // self.config.patch_size)
            self.tensors = read_state_dict(file)
        else:
            self.tensors = read_state_dict(path)
            detect_format(self.tensors)  # fail now, before any data is decoded

    def model_config(self, base: "ViTConfig", overrides: dict) -> "ViTConfig":
        """The run's architecture: the checkpoint's own for vitlab weights, else `base`; then the
        run's overrides (image size, channels, regularisation...)."""
        from .model import ViTConfig

        if self.config is None:
            return base
        return ViTConfig.from_dict({**self.config.to_dict(), "class_names": None, **overrides})

    def load_into(self, model: VisionTransformer, partial: bool = False) -> list[str]:
        notes = load_initial_weights(model, self.tensors, source_grid=self.source_grid, partial=partial)
        return [f"initialised from {self.path}: {notes[0]}"] + notes[1:]


def _safetensors_format(path: Path) -> str | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format")
    except Exception:
        return None  # read_state_dict reports unreadable files with a clear message
