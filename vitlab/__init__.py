"""vitlab: a readable, fast Vision Transformer for image classification."""

from .convert import from_seed_state_dict, from_timm_state_dict, timm_model_kwargs, to_timm_state_dict
from .flops import forward_flops, training_flops
from .model import (
    PatchEmbedding,
    TransformerEncoderBlock,
    ViTConfig,
    VisionTransformer,
    resample_position_embedding,
)
from .presets import create_model, list_models
from .inference import inference_model
from .checkpoint import load_checkpoint as load
from .classifier import Classifier
from .config import TrainConfig, train_preset
from .trainer import TrainResult, train
from .attention import attention_maps, plot_attention
from .export import export_model
from .summary import summarize

__version__ = "0.1.0"

__all__ = [
    "inference_model",
    "attention_maps",
    "export_model",
    "plot_attention",
    "summarize",
    "Classifier",
    "TrainConfig",
    "TrainResult",
    "load",
    "train",
    "train_preset",
    "PatchEmbedding",
    "TransformerEncoderBlock",
    "ViTConfig",
    "VisionTransformer",
    "create_model",
    "forward_flops",
    "from_seed_state_dict",
    "from_timm_state_dict",
    "list_models",
    "resample_position_embedding",
    "timm_model_kwargs",
    "to_timm_state_dict",
    "training_flops",
]
