"""vitlab: a readable, fast Vision Transformer for image classification."""

from .attention import attention_maps
from .plots import plot_attention
from .checkpoint import load_checkpoint as load
from .classifier import Classifier
from .config import TrainConfig, train_preset
from .embed import embed_files
from .export import export_model
from .optim import freeze_backbone
from .flops import forward_flops, training_flops
from .inference import inference_model
from .model import (
    PatchEmbedding,
    TransformerEncoderBlock,
    ViTConfig,
    VisionTransformer,
    resample_position_embedding,
)
from .presets import create_model, list_models
from .summary import summarize
from .train import TrainResult, train
from .version import __version__
from .weights import (
    from_seed_state_dict,
    from_timm_state_dict,
    load_initial_weights,
    timm_model_kwargs,
    to_timm_state_dict,
)

__all__ = [
    # the model
    "PatchEmbedding", "TransformerEncoderBlock", "ViTConfig", "VisionTransformer",
    "create_model", "list_models", "resample_position_embedding", "forward_flops", "training_flops",
    # weights from peers
    "from_seed_state_dict", "from_timm_state_dict", "to_timm_state_dict", "timm_model_kwargs",
    "load_initial_weights", "freeze_backbone",
    # train, load, use
    "TrainConfig", "TrainResult", "train", "train_preset", "load", "Classifier", "embed_files",
    "inference_model",
    # look inside, ship out
    "attention_maps", "plot_attention", "summarize", "export_model",
]
