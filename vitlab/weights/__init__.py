"""Weights from anywhere, fitted to a vitlab model: the one home of weight files.

    read        read_state_dict(path): tensors of a .safetensors or weights_only .pt/.pth/.bin file
    name        detect_format(sd) -> "vitlab" | "timm" | "seed"; from_seed_state_dict,
                from_timm_state_dict rename a peer's keys to vitlab's; to_timm_state_dict and
                timm_model_kwargs go the other way
    fit         adapt_state_dict: another class count (fresh head), patch grid (position embedding
                resampled) or channel count (patch filters adapted)
    start from  load_initial_weights(model, sd) and InitialWeights(path), which `vitlab train --init`
                uses (a vitlab checkpoint also fixes the architecture)

Each peer mapping is a list of (peer pattern, vitlab pattern) regexes applied to every key, so a
reader can check a conversion against both models' module names at a glance. vitlab's own
checkpoint files (metadata, run directories) are vitlab.checkpoint's; this module builds on it.
"""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import (DEFAULT, FORMAT, check_weights_match, read_metadata, read_safetensors_metadata,
                          resolve_checkpoint)
from ..model import ViTConfig, VisionTransformer, resample_position_embedding, to_2tuple

StateDict = dict[str, torch.Tensor]


# ---------------------------------------------------------------- reading a weights file
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


# ---------------------------------------------------------------- names: vitlab, timm, the seed
# seed attribute names -> vitlab names. The tutorial's nn.MultiheadAttention keeps q, k and v in one
# in_proj matrix in the same (3*D, D) layout as vitlab's qkv Linear, so no reshaping is needed.
_SEED_TO_VITLAB = [
    (r"^transformer_encoder\.(\d+)\.attention\.in_proj_weight$", r"blocks.\1.attention.qkv.weight"),
    (r"^transformer_encoder\.(\d+)\.attention\.in_proj_bias$", r"blocks.\1.attention.qkv.bias"),
    (r"^transformer_encoder\.(\d+)\.attention\.out_proj\.", r"blocks.\1.attention.proj."),
    (r"^transformer_encoder\.(\d+)\.mlp\.0\.", r"blocks.\1.mlp.fc1."),
    (r"^transformer_encoder\.(\d+)\.mlp\.3\.", r"blocks.\1.mlp.fc2."),
    (r"^transformer_encoder\.(\d+)\.(norm[12])\.", r"blocks.\1.\2."),
    (r"^mlp_head\.0\.", "head_norm."),
    (r"^mlp_head\.1\.", "head."),
    (r"^(patch_embedding\.projection\.(weight|bias)|cls_token|pos_embedding)$", r"\1"),
]

# timm names -> vitlab names ("norm" is timm's final norm for [CLS] pooling; "fc_norm" for mean)
_TIMM_TO_VITLAB = [
    (r"^patch_embed\.proj\.", "patch_embedding.projection."),
    (r"^pos_embed$", "pos_embedding"),
    (r"^cls_token$", "cls_token"),
    (r"^blocks\.(\d+)\.attn\.", r"blocks.\1.attention."),
    (r"^blocks\.(\d+)\.ls1\.gamma$", r"blocks.\1.scale1.gamma"),
    (r"^blocks\.(\d+)\.ls2\.gamma$", r"blocks.\1.scale2.gamma"),
    (r"^blocks\.(\d+)\.(norm1|norm2|mlp\.fc1|mlp\.fc2)\.", r"blocks.\1.\2."),
    (r"^(fc_)?norm\.", "head_norm."),
    (r"^head\.", "head."),
]


def _rename(sd: StateDict, rules: list[tuple[str, str]], source: str) -> StateDict:
    out: StateDict = {}
    unknown = []
    for key, value in sd.items():
        for pattern, replacement in rules:
            new_key, n = re.subn(pattern, replacement, key)
            if n:
                out[new_key] = value
                break
        else:
            unknown.append(key)
    if unknown:
        shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise ValueError(f"{len(unknown)} key(s) are not part of a {source} ViT: {shown}")
    return out


def detect_format(sd: StateDict) -> str:
    """'vitlab', 'timm' or 'seed', from the key names."""
    if "patch_embedding.projection.weight" in sd and any(k.startswith("blocks.") for k in sd):
        return "vitlab"
    if "patch_embed.proj.weight" in sd:
        return "timm"
    if any(k.startswith("transformer_encoder.") for k in sd):
        return "seed"
    shown = ", ".join(list(sd)[:4])
    raise ValueError(f"not a ViT state_dict from vitlab, timm or the tutorial's code (keys: {shown} ...)")


def to_vitlab_names(sd: StateDict) -> tuple[StateDict, str]:
    fmt = detect_format(sd)
    if fmt == "timm":
        sd = from_timm_state_dict(sd)
    elif fmt == "seed":
        sd = from_seed_state_dict(sd)
    return sd, fmt


def from_seed_state_dict(sd: StateDict) -> StateDict:
    """A state_dict saved from the tutorial's VisionTransformer -> one vitlab's model loads."""
    return _rename(sd, _SEED_TO_VITLAB, "seed")


def from_timm_state_dict(sd: StateDict) -> StateDict:
    """A timm VisionTransformer state_dict -> vitlab names.

    timm's models with [CLS] pooling normalise every token ("norm") and mean-pooling models
    normalise the pooled vector ("fc_norm"); vitlab's head_norm plays whichever role is present.
    """
    has_fc_norm = any(k.startswith("fc_norm.") for k in sd)
    if has_fc_norm and any(k.startswith("norm.") for k in sd):
        raise ValueError("state_dict has both 'norm' and 'fc_norm': vitlab has one head norm")
    return _rename(sd, _TIMM_TO_VITLAB, "timm")


def to_timm_state_dict(sd: StateDict, pooling: str = "cls") -> StateDict:
    """vitlab -> timm names, for timm.models.vision_transformer.VisionTransformer
    built with timm_model_kwargs(config)."""
    out: StateDict = {}
    for key, value in sd.items():
        new = key
        new = re.sub(r"^patch_embedding\.projection\.", "patch_embed.proj.", new)
        new = re.sub(r"^pos_embedding$", "pos_embed", new)
        new = re.sub(r"^blocks\.(\d+)\.attention\.", r"blocks.\1.attn.", new)
        new = re.sub(r"^blocks\.(\d+)\.scale([12])\.gamma$", r"blocks.\1.ls\2.gamma", new)
        new = re.sub(r"^head_norm\.", "fc_norm." if pooling == "mean" else "norm.", new)
        out[new] = value
    return out


def timm_model_kwargs(config: ViTConfig) -> dict:
    """Arguments for timm's VisionTransformer that build the same network as `config`."""
    attention_dropout = config.dropout if config.attention_dropout is None else config.attention_dropout
    if config.mlp_dim % config.dim:
        raise ValueError(f"timm needs mlp_dim ({config.mlp_dim}) to be a multiple of dim ({config.dim})")
    return dict(
        img_size=config.image_size,
        patch_size=config.patch_size,
        in_chans=config.in_channels,
        num_classes=config.num_classes,
        global_pool="avg" if config.pooling == "mean" else "token",
        embed_dim=config.dim,
        depth=config.depth,
        num_heads=config.heads,
        mlp_ratio=config.mlp_dim / config.dim,
        qkv_bias=config.qkv_bias,
        init_values=config.layer_scale,
        # timm also drops after the attention projection, which the seed does not: the two
        # networks are identical in eval mode and differ only in where training dropout falls.
        drop_rate=0.0,
        pos_drop_rate=config.dropout,
        proj_drop_rate=config.dropout,
        attn_drop_rate=attention_dropout,
        drop_path_rate=config.drop_path,
        norm_layer=functools.partial(nn.LayerNorm, eps=config.norm_eps),
    )


# ---------------------------------------------------------------- fitting weights to a model
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


# ---------------------------------------------------------------- starting a run from weights
class InitialWeights:
    """Weights to start a run from, read once: a vitlab checkpoint (run directory or .safetensors
    with vitlab metadata, which also fixes the architecture), or a timm / seed state_dict file
    (.safetensors, .pt, .pth, .bin), whose architecture is the run's model preset.

        init = InitialWeights("runs/nano")
        model = VisionTransformer.from_config(init.model_config(preset, overrides))
        notes = init.load_into(model)
    """

    def __init__(self, path: str | Path):
        path = resolve_checkpoint(None) if str(path) == DEFAULT else Path(path)  # "default": the shipped model
        self.path = path
        self.config: ViTConfig | None = None  # the checkpoint's architecture (vitlab weights only)
        self.source_grid: tuple[int, int] | None = None
        if path.is_dir() or _is_vitlab_checkpoint(path):
            file = resolve_checkpoint(path)
            self.config = ViTConfig.from_dict(read_metadata(file)["model_config"])
            h, w = to_2tuple(self.config.image_size)
            self.source_grid = (h // self.config.patch_size, w // self.config.patch_size)
            self.tensors: StateDict = read_state_dict(file)
            # The metadata sizes nothing until the file's own tensors agree with it: a model built on
            # the meta device (no memory) is checked against them before any run builds a real one.
            with torch.device("meta"):
                described = VisionTransformer.from_config(self.config)
            check_weights_match(described, self.tensors, file)
        else:
            self.tensors = read_state_dict(path)
            detect_format(self.tensors)  # fail now, before any data is decoded

    def model_config(self, base: ViTConfig, overrides: dict) -> ViTConfig:
        """The run's architecture: the checkpoint's own for vitlab weights, else `base`; then the
        run's overrides (image size, channels, regularisation...)."""
        if self.config is None:
            return base
        # class names belong to the data, not the architecture (old checkpoints kept them here)
        own = {k: v for k, v in self.config.to_dict().items() if k != "class_names"}
        return ViTConfig.from_dict({**own, **overrides})

    def load_into(self, model: VisionTransformer, partial: bool = False) -> list[str]:
        """Loads the weights into `model` in place; returns the notes (first: what was loaded)."""
        notes = load_initial_weights(model, self.tensors, source_grid=self.source_grid, partial=partial)
        return [f"initialised from {self.path}: {notes[0]}"] + notes[1:]


def _is_vitlab_checkpoint(path: Path) -> bool:
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    try:
        return read_safetensors_metadata(path).get("format") == FORMAT
    except ValueError:
        return False  # read_state_dict reports an unreadable file with a clear message
