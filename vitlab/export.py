"""Ship a model without vitlab: ONNX (for ONNX Runtime and friends) or TorchScript (for libtorch).

The exported graph maps normalised float images (batch, C, H, W) to logits (batch, K), with a
dynamic batch dimension. Everything needed to use it travels inside the file as string metadata
(ONNX metadata_props, TorchScript _extra_files["vitlab.json"]): class names, per-channel mean/std,
input size and channels, and the model config. The file is serialised in memory, loaded back from
those bytes with its own runtime and its logits compared with PyTorch's on two batch sizes; only
once that check passes is it written, atomically (vitlab.files), so `out` holds the old file or
the new one, never a torn or unverified one.

ONNX goes through the torch.export-based exporter (dynamo=True, the default since PyTorch 2.9):
for this model it gives a clean opset-20 graph (SDPA lowered to MatMul/Softmax, one LayerNorm op
per norm) with the batch dimension symbolic. The legacy TorchScript-tracing exporter also works,
but is deprecated, warns about every Python shape check in the model, and emits a graph twice as
large. TorchScript uses torch.jit.trace: torch.jit.script cannot compile the model's Python config.
"""

from __future__ import annotations

import copy
import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .classifier import Classifier
from .files import atomic_write_bytes
from .model import VisionTransformer
from .version import __version__

FORMATS = ("onnx", "torchscript")
SUFFIX_FORMATS = {".onnx": "onnx", ".pt": "torchscript", ".ts": "torchscript", ".torchscript": "torchscript"}
TOLERANCE = 1e-4  # max |logit difference| accepted between the exported file and PyTorch, fp32
INPUT_NAME, OUTPUT_NAME = "images", "logits"
TORCHSCRIPT_METADATA = "vitlab.json"  # name of the _extra_files entry


class MissingDependencyError(ImportError):
    """An optional package that a format needs is not installed; the message names the extra."""


@dataclass
class ExportResult:
    path: Path
    format: str
    max_abs_diff: float  # exported runtime vs PyTorch, over all verification batches
    batch_sizes: tuple[int, ...]  # the batch sizes the check ran
    runtime: str  # what ran the exported file, with its version
    metadata: dict[str, str]

    @property
    def size_bytes(self) -> int:
        return self.path.stat().st_size


def resolve_format(format: str | None, out: str | Path) -> str:
    """The export format: `format` if given, else from the output file's suffix."""
    if format is None:
        suffix = Path(out).suffix.lower()
        if suffix not in SUFFIX_FORMATS:
            raise ValueError(f"cannot tell the export format from {str(out)!r}; "
                             f"pass --format {' or '.join(FORMATS)}")
        return SUFFIX_FORMATS[suffix]
    name = format.lower()
    if name not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose one of: {', '.join(FORMATS)}")
    return name


def require_packages(format: str) -> None:
    """Fails before any work when a package the format needs is missing."""
    if format != "onnx":
        return
    for package in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(package)
        except ImportError:
            raise MissingDependencyError(
                f"ONNX export needs the {package!r} package, which is not installed: "
                f'pip install "vitlab[onnx]"') from None


def check_writable(out: str | Path) -> Path:
    """The output path, or one clear error saying why it cannot be written."""
    out = Path(out)
    parent = out.parent if str(out.parent) else Path(".")
    if out.is_dir():
        raise ValueError(f"cannot write {out}: it is a directory; give a file name")
    if not parent.exists():
        raise FileNotFoundError(f"cannot write {out}: directory {parent} does not exist")
    if not parent.is_dir():
        raise ValueError(f"cannot write {out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write {out}: no write permission in {parent}")
    return out


def export_metadata(classifier) -> dict[str, str]:
    """String key/value pairs stored in the exported file; JSON for everything that is not text."""
    config = classifier.model.config
    channels = config.in_channels
    height, width = classifier.image_size
    return {
        "producer": f"vitlab {__version__}",
        "class_names": json.dumps(classifier.class_names),
        "mean": json.dumps(classifier.mean),
        "std": json.dumps(classifier.std),
        "image_size": json.dumps([height, width]),
        "in_channels": str(channels),
        "input": f"{INPUT_NAME}: float32 (batch, {channels}, {height}, {width}), pixel values / 255 "
                 f"normalised per channel as (x - mean) / std",
        "output": f"{OUTPUT_NAME}: float32 (batch, {config.num_classes}); softmax gives class probabilities",
        "model_config": json.dumps(config.to_dict()),
    }


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata `export_model` stored in an .onnx or TorchScript file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no exported model at {path}")
    if path.read_bytes()[:2] == b"PK":  # TorchScript files are zip archives; ONNX is protobuf
        extra = {TORCHSCRIPT_METADATA: ""}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.load is deprecated in favour of torch.export
            torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        return json.loads(extra[TORCHSCRIPT_METADATA])
    require_packages("onnx")
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def _verification_batches(model: VisionTransformer, sizes: tuple[int, ...]) -> list[torch.Tensor]:
    # Standard-normal inputs are what normalised images look like to the model, and a fixed seed
    # makes the reported difference reproducible.
    generator = torch.Generator().manual_seed(0)
    height, width = model.patch_embedding.image_size
    return [torch.randn(n, model.config.in_channels, height, width, generator=generator) for n in sizes]


def _onnx_bytes(model: VisionTransformer, example: torch.Tensor, metadata: dict[str, str]) -> bytes:
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (example,), dynamo=True, input_names=[INPUT_NAME],
                                    output_names=[OUTPUT_NAME], dynamic_shapes={"images": {0: batch}},
                                    verbose=False)
    proto = program.model_proto
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return proto.SerializeToString()


def _run_onnx(data: bytes, batches: list[torch.Tensor]) -> tuple[list[torch.Tensor], str]:
    import onnxruntime

    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    outputs = [torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]) for x in batches]
    return outputs, f"onnxruntime {onnxruntime.__version__}"


def _torchscript_bytes(model: VisionTransformer, example: torch.Tensor, metadata: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # trace warns about the model's Python shape checks; they only guard bad input and the
        # batch size flows through as a traced size, which verification checks at two sizes.
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(traced, buffer, _extra_files={TORCHSCRIPT_METADATA: json.dumps(metadata)})
    return buffer.getvalue()


def _run_torchscript(data: bytes, batches: list[torch.Tensor]) -> tuple[list[torch.Tensor], str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = torch.jit.load(io.BytesIO(data), map_location="cpu")
        with torch.no_grad():
            outputs = [loaded(x) for x in batches]
    return outputs, f"torch.jit.load (torch {torch.__version__})"


def export_model(
    model,
    out: str | Path,
    format: str | None = None,
    *,
    class_names: list[str] | None = None,
    mean=None,
    std=None,
    verify_batch_sizes: tuple[int, ...] = (4, 1),
) -> ExportResult:
    """Exports `model` (a VisionTransformer or vitlab.Classifier) to `out` and verifies the file.

    format: "onnx" or "torchscript" (None: from the suffix, .onnx / .pt). class_names, mean, std
    default to the Classifier's; a bare model gets vitlab.Classifier's defaults (class names
    "0", "1", ...; mean = std = 0.5).
    Raises ValueError if the file's logits differ from PyTorch's by more than 1e-4; in that case,
    and on any other failure, nothing is left at `out` (an existing file there is kept as it was).
    """
    format = resolve_format(format, out)
    require_packages(format)
    out = check_writable(out)
    vit = getattr(model, "model", model)
    if not isinstance(vit, VisionTransformer):
        raise ValueError(f"expected a vitlab VisionTransformer or Classifier, got {type(model).__name__}")
    wrapped = model if isinstance(model, Classifier) else Classifier(vit)
    metadata = export_metadata(Classifier(
        vit,
        class_names if class_names is not None else wrapped.class_names,
        mean if mean is not None else wrapped.mean,
        std if std is not None else wrapped.std,
    ))
    # Export a float32 CPU copy in eval mode: the caller's model keeps its device, dtype and mode.
    vit = copy.deepcopy(vit).float().cpu().eval()
    batches = _verification_batches(vit, tuple(verify_batch_sizes))
    # Batch 2 as the example: torch.export specialises a dimension whose example size is 1.
    example = _verification_batches(vit, (2,))[0]
    serialise, run = (_onnx_bytes, _run_onnx) if format == "onnx" else (_torchscript_bytes, _run_torchscript)
    data = serialise(vit, example, metadata)
    outputs, runtime = run(data, batches)
    with torch.no_grad():
        expected = [vit(x) for x in batches]
    for x, got, want in zip(batches, outputs, expected):
        if tuple(got.shape) != tuple(want.shape):
            raise ValueError(f"verification failed: the exported model gave logits of shape "
                             f"{tuple(got.shape)} for a batch of {x.shape[0]}, PyTorch {tuple(want.shape)}")
    diff = max(float((got - want).abs().max()) for got, want in zip(outputs, expected))
    if not diff <= TOLERANCE:
        raise ValueError(f"verification failed: {runtime} logits differ from PyTorch by up to "
                         f"{diff:.2e} (> {TOLERANCE:g}); nothing was written to {out}")
    atomic_write_bytes(out, data)
    return ExportResult(out, format, diff, tuple(verify_batch_sizes), runtime, metadata)
