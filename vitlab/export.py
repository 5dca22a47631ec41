"""Ship a model: ONNX (for ONNX Runtime and friends, optionally int8), TorchScript (for libtorch), a
model folder vitlab.load reads back, or a folder timm loads.

    format       writes                                             checked against PyTorch by
    onnx         one .onnx file                                     ONNX Runtime, logits within 1e-4
    onnx + int8  one .onnx file, weights int8 (dynamic quantisation) validation top-1 within 1 point
    torchscript  one .pt file                                       torch.jit.load, logits within 1e-4
    folder       config.json, model.safetensors, README.md          vitlab.load, logits within 1e-4
    timm         config.json, model.safetensors (timm names), README timm.create_model, logits within 1e-4

The ONNX and TorchScript graphs map normalised float images (batch, C, H, W) to logits (batch, K),
with a dynamic batch dimension. Everything needed to use a model travels with it (ONNX
metadata_props, TorchScript _extra_files["vitlab.json"], a folder's config.json): class names,
per-channel mean/std, input size and channels, the model config, and the image conversion rule
(vitlab.data.image.PREPROCESSING_RULE: alpha onto black, 16-bit rescale, cover-resize and centre
crop). A folder's README.md is a model card generated from the checkpoint's metadata and, when it
came from one, its run directory (vitlab.runs).

Nothing is kept before it is checked: a file is serialised in memory and a folder built under a
temporary name, loaded back with its own runtime and compared with PyTorch; only then is it moved
into place (vitlab.files), so `out` holds the old export or the new one, never a torn or unchecked one.

ONNX goes through the torch.export-based exporter (dynamo=True, the default since PyTorch 2.9):
for this model it gives a clean opset-20 graph (SDPA lowered to MatMul/Softmax, one LayerNorm op
per norm) with the batch dimension symbolic. The legacy TorchScript-tracing exporter also works,
but is deprecated, warns about every Python shape check in the model, and emits a graph twice as
large. TorchScript uses torch.jit.trace: torch.jit.script cannot compile the model's Python config.
int8 uses ONNX Runtime's dynamic quantisation (onnxruntime.quantization.quantize_dynamic, after its
quant_pre_process): weights stored as int8, activations quantised per batch at run time, so no
calibration data is needed. torch.ao.quantization is deprecated in this PyTorch and is not used.
"""

from __future__ import annotations

import copy
import datetime
import functools
import io
import json
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import MODEL_FILE
from .classifier import Classifier
from .data.image import PREPROCESSING_RULE
from .files import atomic_write_bytes
from .model import VisionTransformer
from .model_card import model_card
from .version import __version__

FORMATS = ("onnx", "torchscript", "folder", "timm")
FOLDER_FORMATS = ("folder", "timm")  # formats that write a directory, not a file
QUANTIZE = ("int8",)
SUFFIX_FORMATS = {".onnx": "onnx", ".pt": "torchscript", ".ts": "torchscript", ".torchscript": "torchscript"}
TOLERANCE = 1e-4  # max |logit difference| accepted between the exported model and PyTorch, fp32
INT8_MAX_DROP = 0.01  # validation top-1 an int8 file may lose against the fp32 one: 1 point
INPUT_NAME, OUTPUT_NAME = "images", "logits"
TORCHSCRIPT_METADATA = "vitlab.json"  # name of the _extra_files entry
FOLDER_CONFIG, FOLDER_CARD = "config.json", "README.md"
FOLDER_FILES = (FOLDER_CONFIG, MODEL_FILE, FOLDER_CARD)
FOLDER_FORMAT = "vitlab-model-folder-1"
# The timm entry point a timm folder names. Every size comes from the folder's model_args (they
# override the entry point's own), so the name only picks timm's VisionTransformer class.
TIMM_ARCHITECTURE = "vit_tiny_patch16_224"
TIMM_NORM_EPS = 1e-6  # the LayerNorm eps of timm's VisionTransformer when no norm_layer is given
PACKAGES = {"onnx": ("onnx", "onnxscript", "onnxruntime"), "timm": ("timm",)}


class MissingDependencyError(ImportError):
    """An optional package that a format needs is not installed; the message names the extra."""


@dataclass
class ExportResult:
    path: Path
    format: str
    max_abs_diff: float  # exported runtime vs PyTorch, over all verification batches
    batch_sizes: tuple[int, ...]  # the batch sizes the check ran
    runtime: str  # what ran the exported model, with its version
    metadata: dict[str, str]
    quantize: str | None = None
    # int8 only: {"data", "split", "images", "fp32_top1", "int8_top1"}, the accuracy check's figures
    accuracy: dict | None = None
    files: list[str] = field(default_factory=list)  # a folder's files

    @property
    def size_bytes(self) -> int:
        if self.path.is_dir():
            return sum(p.stat().st_size for p in self.path.iterdir() if p.is_file())
        return self.path.stat().st_size


# ---------------------------------------------------------------- checks before any work
def resolve_format(format: str | None, out: str | Path) -> str:
    """The export format: `format` if given, else from the output file's suffix."""
    if format is None:
        suffix = Path(out).suffix.lower()
        if suffix not in SUFFIX_FORMATS:
            raise ValueError(f"cannot tell the export format from {str(out)!r}; "
                             f"pass --format {', '.join(FORMATS[:-1])} or {FORMATS[-1]}")
        return SUFFIX_FORMATS[suffix]
    name = format.lower()
    if name not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose one of: {', '.join(FORMATS)}")
    return name


def check_quantize(quantize: str | None, format: str, data) -> None:
    """--quantize is int8, for ONNX, with labelled data to check the accuracy it costs."""
    if quantize is None:
        return
    if quantize not in QUANTIZE:
        raise ValueError(f"unknown quantisation {quantize!r}; choose: {', '.join(QUANTIZE)}")
    if format != "onnx":
        raise ValueError(f"--quantize {quantize} is for --format onnx (ONNX Runtime's dynamic quantisation), "
                         f"not {format}")
    if data is None:
        raise ValueError(f"--quantize {quantize} needs --data (labelled images, e.g. the training data) to "
                         f"verify that validation top-1 stays within 1 point of fp32")


def require_packages(format: str) -> None:
    """Fails before any work when a package the format needs is missing."""
    for package in PACKAGES.get(format, ()):
        try:
            __import__(package)
        except ImportError:
            raise MissingDependencyError(
                f"{'ONNX' if format == 'onnx' else format} export needs the {package!r} package, which is not "
                f'installed: pip install "vitlab[{format}]"') from None


def check_writable(out: str | Path, format: str | None = None) -> Path:
    """The output path, or one clear error saying why it cannot be written. A folder format's `out`
    is a directory: missing, empty, or an earlier export's (it holds only the export's files)."""
    out = Path(out)
    parent = out.parent if str(out.parent) else Path(".")
    if format in FOLDER_FORMATS:
        if out.name in ("", ".", ".."):
            raise ValueError(f"cannot write {out}: --format {format} needs a directory name of its own, e.g. my-vit/")
        if out.exists() and not out.is_dir():
            raise ValueError(f"cannot write {out}: it is a file; --format {format} writes a directory")
        if out.is_dir():
            others = sorted(p.name for p in out.iterdir() if p.name not in FOLDER_FILES)
            if others:
                raise ValueError(f"cannot write {out}: it holds files an export did not write ({', '.join(others[:3])}); "
                                 f"give a new or empty directory")
    elif out.is_dir():
        raise ValueError(f"cannot write {out}: it is a directory; give a file name")
    if not parent.exists():
        raise FileNotFoundError(f"cannot write {out}: directory {parent} does not exist")
    if not parent.is_dir():
        raise ValueError(f"cannot write {out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write {out}: no write permission in {parent}")
    return out


# ---------------------------------------------------------------- what travels with the model
def describe(classifier: Classifier) -> dict:
    """The model's self-description, as JSON values: what ONNX and TorchScript store as strings and
    a folder's config.json stores as they are."""
    config = classifier.model.config
    channels = config.in_channels
    height, width = classifier.image_size
    return {
        "producer": f"vitlab {__version__}",
        "class_names": list(classifier.class_names),
        "mean": list(classifier.mean),
        "std": list(classifier.std),
        "image_size": [height, width],
        "in_channels": channels,
        "preprocessing": PREPROCESSING_RULE,
        "input": f"{INPUT_NAME}: float32 (batch, {channels}, {height}, {width}), pixel values / 255 "
                 f"normalised per channel as (x - mean) / std",
        "output": f"{OUTPUT_NAME}: float32 (batch, {config.num_classes}); softmax gives class probabilities",
        "model_config": config.to_dict(),
    }


def export_metadata(classifier: Classifier) -> dict[str, str]:
    """String key/value pairs stored in the exported file; JSON for everything that is not text."""
    return {key: value if isinstance(value, str) else json.dumps(value) for key, value in describe(classifier).items()}


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata `export_model` stored in an .onnx or TorchScript file, or a folder's config.json
    (its values JSON-encoded as in the files, so one reader serves all)."""
    path = Path(path)
    if path.is_dir() and (path / FOLDER_CONFIG).is_file():
        values = json.loads((path / FOLDER_CONFIG).read_text())
        return {key: value if isinstance(value, str) else json.dumps(value) for key, value in values.items()}
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


# ---------------------------------------------------------------- ONNX and TorchScript
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


def _onnx_session(data: bytes):
    import onnxruntime

    return onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])


def _run_onnx(data: bytes, batches: list[torch.Tensor]) -> tuple[list[torch.Tensor], str]:
    import onnxruntime

    session = _onnx_session(data)
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


def _compare(batches, outputs, expected, runtime: str, out: Path, tolerance: float | None = TOLERANCE) -> float:
    """Max |logit difference|; raises when a shape differs or (tolerance given) the difference is larger."""
    for x, got, want in zip(batches, outputs, expected):
        if tuple(got.shape) != tuple(want.shape):
            raise ValueError(f"verification failed: the exported model gave logits of shape "
                             f"{tuple(got.shape)} for a batch of {x.shape[0]}, PyTorch {tuple(want.shape)}")
    diff = max(float((got.float() - want).abs().max()) for got, want in zip(outputs, expected))
    if tolerance is not None and not diff <= tolerance:
        raise ValueError(f"verification failed: {runtime} logits differ from PyTorch by up to "
                         f"{diff:.2e} (> {tolerance:g}); nothing was written to {out}")
    return diff


# ---------------------------------------------------------------- int8
def quantize_int8(data: bytes) -> bytes:
    """ONNX Runtime's dynamic int8 quantisation of an fp32 ONNX model (bytes in, bytes out).

    quant_pre_process first (symbolic shape inference and ONNX Runtime's graph optimisations), as
    ONNX Runtime recommends: it fuses the graph so more of it runs in integer kernels. Weights are
    signed int8 with one scale per output channel (per tensor cost the shipped model 0.30 points of
    validation top-1, per channel 0.06, at the same speed); activations are quantised per batch at
    run time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="vitlab-int8-") as tmp:
        fp32, prepared, int8 = (Path(tmp) / name for name in ("fp32.onnx", "prepared.onnx", "int8.onnx"))
        fp32.write_bytes(data)
        logger = logging.getLogger()  # the quantiser logs advice at WARNING on the root logger
        level = logger.level
        logger.setLevel(logging.ERROR)
        try:
            quant_pre_process(str(fp32), str(prepared))
            quantize_dynamic(str(prepared), str(int8), weight_type=QuantType.QInt8, per_channel=True)
        finally:
            logger.setLevel(level)
        return int8.read_bytes()


def validation_images(classifier: Classifier, data: str | Path):
    """(ImageSet, split name): the images `vitlab eval CHECKPOINT --data DATA` scores by default, with
    labels as indices into the model's classes. For data with a train/ split that is the held-out
    validation split the checkpoint recorded (val_size, split_seed); for bare class folders, every image."""
    from .evaluate import labelled_images

    try:
        return labelled_images(classifier, data, "auto")
    except ValueError as error:
        if "has no val split" not in str(error):
            raise
        raise ValueError(f"{data} has no validation split to check int8 accuracy on; pass labelled "
                         f"class folders instead") from None

def onnx_top1(session, images, classifier: Classifier, *, batch_size: int = 250, progress: bool = False,
              desc: str = "onnx") -> float:
    """Top-1 of an ONNX Runtime session on an ImageSet, normalised as `classifier` normalises."""
    from .data import BatchLoader
    from .predict import progress_bar

    loader = BatchLoader(images, batch_size, mean=classifier.mean, std=classifier.std, train=False)
    bar = progress_bar(len(loader), batches=len(loader), desc=desc, unit="batch", enabled=progress)
    correct = 0
    try:
        for x, targets in loader:
            logits = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
            correct += int((torch.from_numpy(logits).argmax(1) == targets).sum())
            bar.update(1)
    finally:
        bar.close()
    return correct / len(images.labels)


def _check_int8(fp32: bytes, int8: bytes, classifier: Classifier, data, out: Path, progress: bool) -> dict:
    images, split = validation_images(classifier, data)
    if len(images.labels) == 0:
        raise ValueError(f"{data} holds no images to check int8 accuracy on")
    fp32_top1 = onnx_top1(_onnx_session(fp32), images, classifier, progress=progress, desc="fp32 check")
    int8_top1 = onnx_top1(_onnx_session(int8), images, classifier, progress=progress, desc="int8 check")
    accuracy = {"data": str(data), "split": split, "images": len(images.labels), "fp32_top1": fp32_top1,
                "int8_top1": int8_top1}
    drop = fp32_top1 - int8_top1
    if drop > INT8_MAX_DROP:
        raise ValueError(f"int8 verification failed: validation top-1 {int8_top1:.2%} against {fp32_top1:.2%} "
                         f"for fp32 on {len(images.labels):,} {split} images of {data}, {drop * 100:.2f} points "
                         f"lower (more than 1); nothing was written to {out}. Export fp32 instead (no --quantize)")
    return accuracy


def _with_metadata(data: bytes, extra: dict[str, str]) -> bytes:
    import onnx

    proto = onnx.load_from_string(data)
    for key, value in extra.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return proto.SerializeToString()


# ---------------------------------------------------------------- folders: vitlab and timm
def _lossless_compact(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """float16 copies when every float tensor survives the round trip exactly (weights that were
    loaded from a float16 file, as the shipped model's), else float32: half the size, same logits."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    half = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
    exact = all(torch.equal(half[k].float(), v.float()) for k, v in tensors.items() if v.is_floating_point())
    if exact:
        return half, "float16"
    return {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}, "float32"


def timm_files(classifier: Classifier) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json, state_dict in timm names) of a timm model folder.

    config.json follows timm's Hugging Face hub layout (architecture, model_args, pretrained_cfg),
    so `timm.create_model("local-dir:FOLDER", pretrained=True)` reads it too. model_args hold
    vitlab.weights.timm_model_kwargs except norm_layer, which JSON cannot carry: timm's default
    LayerNorm eps is 1e-6, so a model with another eps needs it passed (timm_create_kwargs does)."""
    from .weights import timm_model_kwargs, to_timm_state_dict

    config = classifier.model.config
    model_args = timm_model_kwargs(config)
    norm_layer = model_args.pop("norm_layer")
    model_args["img_size"] = list(classifier.image_size)
    channels, (height, width) = config.in_channels, classifier.image_size
    pretrained_cfg = {
        "tag": "vitlab", "custom_load": False, "input_size": [channels, height, width], "fixed_input_size": True,
        # timm's eval transform at crop_pct 1: resize the short side, centre-crop, bicubic: vitlab's
        # cover-resize rule for RGB images (PREPROCESSING_RULE says what vitlab does besides)
        "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "center",
        "mean": list(classifier.mean), "std": list(classifier.std), "num_classes": config.num_classes,
        "pool_size": None, "first_conv": "patch_embed.proj", "classifier": "head",
        "label_names": list(classifier.class_names),
    }
    timm_config = {
        "architecture": TIMM_ARCHITECTURE, "num_classes": config.num_classes, "num_features": config.dim,
        "global_pool": model_args["global_pool"], "model_args": model_args, "pretrained_cfg": pretrained_cfg,
        # not read by timm: what model_args cannot say, and where the weights came from
        "vitlab": {"producer": f"vitlab {__version__}", "norm_eps": norm_layer.keywords["eps"],
                   "preprocessing": PREPROCESSING_RULE, "model_config": config.to_dict()},
    }
    state = to_timm_state_dict(dict(classifier.model.state_dict()), pooling=config.pooling)
    return timm_config, state


def timm_create_kwargs(timm_config: dict, weights_file: str | Path) -> dict:
    """Keyword arguments for timm.create_model(timm_config["architecture"], **them) that build the
    folder's network with its weights: pretrained=True with the file in pretrained_cfg_overlay
    (num_classes too, or timm drops a head whose size differs from the entry point's 1,000), the
    model_args, and the LayerNorm with the model's eps."""
    cfg = timm_config["pretrained_cfg"]
    overlay = dict(file=str(weights_file), num_classes=cfg["num_classes"], input_size=tuple(cfg["input_size"]),
                   mean=tuple(cfg["mean"]), std=tuple(cfg["std"]), interpolation=cfg["interpolation"],
                   crop_pct=cfg["crop_pct"], crop_mode=cfg["crop_mode"])
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in timm_config["model_args"].items()}
    return dict(pretrained=True, pretrained_cfg_overlay=overlay, **args,
                norm_layer=functools.partial(torch.nn.LayerNorm, eps=timm_config["vitlab"]["norm_eps"]))


def timm_create_code(timm_config: dict, weights_file: str | Path) -> str:
    """timm_create_kwargs as Python source: the snippet a timm folder's README shows."""
    kwargs = timm_create_kwargs(timm_config, weights_file)
    overlay = kwargs.pop("pretrained_cfg_overlay")
    eps = kwargs.pop("norm_layer").keywords["eps"]
    kwargs.pop("pretrained")
    lines = ["import functools", "", "import timm", "import torch", "",
             "model = timm.create_model(",
             f"    {timm_config['architecture']!r},  # timm's VisionTransformer; the arguments below set every size",
             "    pretrained=True,",
             "    pretrained_cfg_overlay=dict("]
    lines += [f"        {key}={value!r}," for key, value in overlay.items()]
    lines += ["    ),"]
    lines += [f"    {key}={value!r}," for key, value in kwargs.items()]
    lines += [f"    norm_layer=functools.partial(torch.nn.LayerNorm, eps={eps!r}),", ").eval()"]
    return "\n".join(lines)


def _build_timm(timm_config: dict, weights_file: Path):
    import timm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = timm.create_model(timm_config["architecture"], **timm_create_kwargs(timm_config, weights_file))
    return model.eval()


def _folder_files(classifier: Classifier, format: str, card: str, timm: tuple | None) -> tuple[dict[str, bytes], str]:
    """The files of a folder export, by name, and what checks them. timm: timm_files(classifier)."""
    from safetensors.torch import save

    from .checkpoint import save_model

    if format == "timm":
        import timm as timm_package

        timm_config, state = timm
        tensors, _ = _lossless_compact(state)
        weights = save(tensors, metadata={"format": "pt", "producer": f"vitlab {__version__}"})
        config_text = json.dumps(timm_config, indent=2) + "\n"
        runtime = f"timm {timm_package.__version__} (timm.create_model, pretrained_cfg_overlay)"
    else:
        tensors, dtype = _lossless_compact(classifier.model.state_dict())
        keep = {k: v for k, v in (getattr(classifier, "metadata", None) or {}).items()
                if k not in ("format", "model_config", "class_names", "preprocessing")}
        keep.update(dtype=dtype, preprocessing_rule=PREPROCESSING_RULE)
        with tempfile.TemporaryDirectory(prefix="vitlab-folder-") as tmp:
            weights = save_model(Path(tmp) / MODEL_FILE, classifier, state_dict=tensors, extra=keep).read_bytes()
        info = describe(classifier)
        config = {
            "format": FOLDER_FORMAT, "producer": info["producer"], "weights": MODEL_FILE, "dtype": dtype,
            "architecture": info["model_config"], "class_names": info["class_names"],
            "preprocessing": {"mean": info["mean"], "std": info["std"], "image_size": info["image_size"],
                              "in_channels": info["in_channels"], "rule": PREPROCESSING_RULE},
            "input": info["input"], "output": info["output"],
            "validation": {k: keep[k] for k in ("val_top1", "epoch", "data") if k in keep},
        }
        config_text = json.dumps(config, indent=2) + "\n"
        runtime = "vitlab.load"
    return {FOLDER_CONFIG: config_text.encode(), MODEL_FILE: weights, FOLDER_CARD: card.encode()}, runtime


def _run_folder(format: str, folder: Path, timm_config: dict | None, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    from .checkpoint import load_checkpoint

    with torch.no_grad():
        if format == "timm":
            model = _build_timm(timm_config, folder / MODEL_FILE)
            return [model(x) for x in batches]
        model = load_checkpoint(folder).model  # the fp32 network: Classifier.precision plays no part
        return [model(x) for x in batches]


def _replace_directory(built: Path, out: Path) -> None:
    """Moves the checked folder `built` to `out`; an earlier export there is swapped out first."""
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
        os.replace(built, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(built, out)


# ---------------------------------------------------------------- the model card's "Use" section
def usage_lines(format: str, out: Path, timm_config: dict | None = None) -> list[str]:
    """How to load an exported folder: with timm (format "timm") or with vitlab."""
    if format == "timm":
        eps = timm_config["vitlab"]["norm_eps"]
        local = (f'`timm.create_model("local-dir:{out}", pretrained=True)` loads the same model from config.json, '
                 f'which follows timm\'s layout.' if eps == TIMM_NORM_EPS else
                 f'`timm.create_model("local-dir:{out}", pretrained=True)` reads config.json too, but builds '
                 f'LayerNorms with timm\'s eps {TIMM_NORM_EPS:g} instead of this model\'s {eps:g}, which JSON cannot '
                 f'carry: pass the norm_layer below with it.')
        return [f"With timm (vitlab not needed). {local}", "",
                "```python", timm_create_code(timm_config, out / MODEL_FILE), "```", "",
                "Inputs: float32 (batch, C, H, W), normalised as above; `timm.data.resolve_data_config(model=model)` "
                "gives the size, mean and std. Its transform resizes the shorter side and centre-crops, as vitlab "
                "does for RGB images; vitlab's own conversion (alpha onto black, 16-bit rescale) is in config.json "
                "under vitlab.preprocessing.", ""]
    return ["```python", "import vitlab", "", f"classifier = vitlab.load({str(out)!r})",
            "classifier.predict([\"photo.jpg\"], top_k=3)  # [[(class, probability), ...]]", "```", "",
            f"or `vitlab predict {out} photo.jpg`. config.json states the architecture, class names and "
            "preprocessing for other tools.", ""]


# ---------------------------------------------------------------- export_model
def export_model(
    model,
    out: str | Path,
    format: str | None = None,
    *,
    class_names: list[str] | None = None,
    mean=None,
    std=None,
    verify_batch_sizes: tuple[int, ...] = (4, 1),
    quantize: str | None = None,
    data: str | Path | None = None,
    run_dir: str | Path | None = None,
    source: str | None = None,
    progress: bool = False,
) -> ExportResult:
    """Exports `model` (a VisionTransformer or vitlab.Classifier) to `out` and verifies it.

    format: "onnx", "torchscript", "folder" or "timm" (None: from the suffix, .onnx / .pt). class_names,
    mean, std default to the Classifier's; a bare model gets vitlab.Classifier's defaults (class names
    "0", "1", ...; mean = std = 0.5). quantize="int8" (ONNX only) stores int8 weights and needs `data`,
    labelled images whose validation split (vitlab eval's) the int8 file's top-1 is checked on.
    run_dir (the checkpoint's run directory) and source (how to name where it came from) feed a
    folder's model card.
    Raises ValueError if the exported logits differ from PyTorch's by more than 1e-4, or int8 loses
    more than 1 point of top-1; in that case, and on any other failure, nothing is left at `out` (an
    existing export there is kept as it was).
    """
    format = resolve_format(format, out)
    check_quantize(quantize, format, data)
    require_packages(format)
    out = check_writable(out, format)
    vit = getattr(model, "model", model)
    if not isinstance(vit, VisionTransformer):
        raise ValueError(f"expected a vitlab VisionTransformer or Classifier, got {type(model).__name__}")
    wrapped = model if isinstance(model, Classifier) else Classifier(vit)
    # Export a float32 CPU copy in eval mode: the caller's model keeps its device, dtype and mode.
    vit = copy.deepcopy(vit).float().cpu().eval()
    classifier = Classifier(vit, class_names if class_names is not None else wrapped.class_names,
                            mean if mean is not None else wrapped.mean, std if std is not None else wrapped.std)
    classifier.metadata = dict(getattr(wrapped, "metadata", None) or {})
    batches = _verification_batches(vit, tuple(verify_batch_sizes))
    with torch.no_grad():
        expected = [vit(x) for x in batches]
    if format in FOLDER_FORMATS:
        return _export_folder(classifier, out, format, batches, expected, tuple(verify_batch_sizes),
                              run_dir=run_dir, source=source)

    metadata = export_metadata(classifier)
    # Batch 2 as the example: torch.export specialises a dimension whose example size is 1.
    example = _verification_batches(vit, (2,))[0]
    serialise, run = (_onnx_bytes, _run_onnx) if format == "onnx" else (_torchscript_bytes, _run_torchscript)
    data_bytes = serialise(vit, example, metadata)
    outputs, runtime = run(data_bytes, batches)
    diff = _compare(batches, outputs, expected, runtime, out)
    accuracy = None
    if quantize == "int8":
        fp32 = data_bytes
        int8 = quantize_int8(fp32)
        outputs, runtime = run(int8, batches)
        diff = _compare(batches, outputs, expected, runtime, out, tolerance=None)  # int8: accuracy decides
        accuracy = _check_int8(fp32, int8, classifier, data, out, progress)
        extra = {"quantization": "int8: ONNX Runtime dynamic quantisation (quantize_dynamic, QInt8 weights per "
                                 "output channel, activations quantised per batch at run time)",
                 "validation": json.dumps(accuracy)}
        data_bytes = _with_metadata(int8, extra)
        metadata = {**metadata, **extra}
    atomic_write_bytes(out, data_bytes)
    return ExportResult(out, format, diff, tuple(verify_batch_sizes), runtime, metadata, quantize, accuracy)


def _export_folder(classifier: Classifier, out: Path, format: str, batches, expected, sizes,
                   *, run_dir=None, source=None) -> ExportResult:
    from .runs import NotARun, read_run

    run = None
    if run_dir is not None:
        try:
            run = read_run(run_dir)
        except (NotARun, OSError):
            run = None  # the card says "not recorded" where the run would have spoken
    timm = timm_files(classifier) if format == "timm" else None
    timm_config = timm[0] if timm else None
    intro = (f"A Vision Transformer image classifier exported by vitlab {__version__} from {source or 'a model'} on "
             f"{datetime.date.today().isoformat()} (`vitlab export --format {format}`).")
    card = model_card(classifier, title=out.name or "model", intro=intro, usage=usage_lines(format, out, timm_config),
                      location=str(out), run=run)
    files, runtime = _folder_files(classifier, format, card, timm)
    built = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent if str(out.parent) else "."))
    try:
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(built, 0o777 & ~mask)  # mkdtemp makes 0700; give the folder the usual permissions
        for name, content in files.items():
            atomic_write_bytes(built / name, content)
        outputs = _run_folder(format, built, timm_config, batches)
        diff = _compare(batches, outputs, expected, runtime, out)
        _replace_directory(built, out)
    except BaseException:
        shutil.rmtree(built, ignore_errors=True)
        raise
    metadata = export_metadata(classifier)
    return ExportResult(out, format, diff, sizes, runtime, metadata, files=list(files))

