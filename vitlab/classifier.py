"""A trained model that knows its classes and preprocessing: what vitlab.load returns.

Inference (predict, probabilities, embed) runs in the fastest number format the machine computes
natively, unless told otherwise: `precision` "auto" is bf16 where the hardware has it (AVX512-BF16
or AMX CPUs, Ampere+ GPUs) and fp32 elsewhere (vitlab.precision decides, as for training and
`vitlab bench`). For bf16 the classifier builds a bf16 copy of its network once
(vitlab.inference.inference_model) and keeps it until the weights change; `.model` and forward()
stay the fp32 VisionTransformer, for training, export and state_dict.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .inference import inference_model, tta_logits
from .model import VisionTransformer
from .precision import PRECISIONS, resolve_precision


class Classifier(nn.Module):
    """A VisionTransformer plus class names and the normalisation it was trained with.

    forward() takes normalised float images; preprocess() turns PIL images, paths, or uint8 /
    float [0, 1] tensors of any size and mode into that batch with the training-time conversion
    (vitlab.data.load_image), so predict() and embed() accept raw images directly.
    """

    def __init__(self, model: VisionTransformer, class_names: Sequence[str] | None = None,
                 mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5),
                 *, precision: str = "auto"):
        super().__init__()
        self.model = model
        k = model.config.num_classes
        self.class_names = [str(c) for c in class_names] if class_names is not None else \
            [str(i) for i in range(k)]
        if len(self.class_names) != k:
            raise ValueError(f"{len(self.class_names)} class names for a model with {k} classes")
        c = model.config.in_channels
        if len(mean) != c or len(std) != c:
            raise ValueError(f"mean/std need {c} values (one per input channel), got {len(mean)}/{len(std)}")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.metadata: dict[str, Any] = {}
        self.precision = precision
        # (weights' identity and version, device) -> the bf16 copy; a plain dict, so the copy is
        # not a submodule and never enters state_dict(), parameters() or .to()
        self._bf16_copy: dict[tuple, nn.Module] = {}

    # ---------------------------------------------------------------- precision
    @property
    def precision(self) -> str:
        """The requested inference precision: "auto", "bf16" or "fp32" (see the module docstring)."""
        return self._precision

    @precision.setter
    def precision(self, precision: str) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self._precision = precision
        self._resolved: dict[str, str] = {}  # device -> "bf16" | "fp32", resolved once per device

    def set_precision(self, precision: str) -> "Classifier":
        """Sets `precision` and returns the classifier: vitlab.load(path).set_precision("fp32")."""
        self.precision = precision
        return self

    @property
    def inference_precision(self) -> str:
        """What `precision` means on the current device: "bf16" or "fp32"."""
        device = str(self.device)
        if device not in self._resolved:
            self._resolved[device] = resolve_precision(self.precision, device, command="vitlab")
        return self._resolved[device]

    def inference_network(self) -> nn.Module:
        """The network predict/probabilities/embed run: `.model` itself for fp32, else its bf16
        copy (fp32 images in, fp32 logits out), built on first use and rebuilt when a weight of
        `.model` changes (an optimizer step, load_state_dict, .to())."""
        if self.inference_precision == "fp32":
            return self.model.eval()
        # a tensor's _version counts its in-place changes: any new weight gives a new key
        key = tuple((p.data_ptr(), p._version, str(p.device)) for p in self.model.parameters())
        if key not in self._bf16_copy:
            self._bf16_copy.clear()
            # normal tensors even when first asked inside torch.inference_mode()
            with torch.inference_mode(False), torch.no_grad():
                copy = inference_model(self.model, "bf16")
            self._bf16_copy[key] = copy.requires_grad_(False)
        return self._bf16_copy[key]

    @property
    def image_size(self) -> tuple[int, int]:
        return self.model.patch_embedding.image_size

    @property
    def in_channels(self) -> int:
        return self.model.config.in_channels

    @property
    def device(self) -> torch.device:
        return self.model.head.weight.device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)  # (B, C, H, W) normalised -> (B, K)

    # ---------------------------------------------------------------- preprocessing
    def _to_uint8(self, image) -> torch.Tensor:
        """One image of any kind -> uint8 (C, H, W) at the model's size and channel count."""
        from PIL import Image

        from .data import load_image

        if isinstance(image, torch.Tensor):
            if image.ndim != 3:
                raise ValueError(f"expected an image tensor (C, H, W), got shape {tuple(image.shape)}")
            if image.dtype.is_floating_point:
                image = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
            if tuple(image.shape) == (self.in_channels, *self.image_size):
                return image.cpu()
            # other sizes/channel counts go through the same PIL conversion as training data
            array = image.cpu().permute(1, 2, 0).numpy()
            image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
        elif not isinstance(image, (Image.Image, str, Path)):
            raise ValueError(f"cannot classify a {type(image).__name__}: pass PIL images, paths or tensors")
        return load_image(image, self.image_size, self.in_channels)

    def preprocess(self, images) -> torch.Tensor:
        """PIL image(s), path(s), a uint8/float tensor (C, H, W) or batch (B, C, H, W) -> normalised
        float batch (B, C, H, W) on the model's device. Float tensors are taken as [0, 1] pixels."""
        if isinstance(images, torch.Tensor) and images.ndim == 4:
            images = list(images)
        elif not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            raise ValueError("no images given")
        batch = torch.stack([self._to_uint8(i) for i in images]).to(self.device)  # uint8 (B, C, H, W)
        mean = torch.tensor(self.mean, device=self.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=self.device).view(1, -1, 1, 1)
        return (batch.float() / 255 - mean) / std

    # ---------------------------------------------------------------- inference
    @torch.inference_mode()
    def probabilities(self, images, tta: str = "none") -> torch.Tensor:
        """Softmax class probabilities (B, K), fp32, computed at `inference_precision`; tta="flip"
        averages the logits of each image and its mirror image (vitlab.inference.tta_logits)."""
        self.eval()
        return F.softmax(tta_logits(self.inference_network(), self.preprocess(images), tta), dim=-1)

    def predict(self, images, top_k: int = 5, tta: str = "none") -> list[list[tuple[str, float]]]:
        """For each image, the top_k (class name, probability) pairs, most likely first."""
        probs = self.probabilities(images, tta)
        values, indices = probs.topk(min(top_k, probs.shape[1]), dim=1)  # (B, k)
        return [[(self.class_names[i], float(p)) for p, i in zip(vs.tolist(), ix.tolist())]
                for vs, ix in zip(values, indices)]

    @torch.inference_mode()
    def embed(self, images, pooling: str | None = None) -> torch.Tensor:
        """Pre-logits features (B, D), fp32: the pooled, normalised token the head classifies.

        pooling=None uses the model's own ("cls" or "mean"); pass the other to compare.
        """
        pooling = self.model.config.pooling if pooling is None else pooling
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be None, 'cls' or 'mean', got {pooling!r}")
        self.eval()
        # the VisionTransformer inside the bf16 wrapper, whose embed() casts the fp32 images itself
        network = self.inference_network()
        vit = getattr(network, "module", network)
        # [CLS] alone needs only its own row from the last block
        tokens = vit.forward_features(self.preprocess(images), cls_only=pooling == "cls")  # (B, T or 1, D)
        return vit.head_norm(vit.pool(tokens, pooling)).float()  # (B, D)
