"""Side-by-side speed of vitlab, timm's VisionTransformer and the tutorial's reference model.

Everything runs in one process on one device with the same weights, and the implementations
take turns round by round: a neighbour that steals the CPU for a few seconds slows whichever
model is running, so each figure is the best round of its implementation and every round also
re-measures the matmul peak that utilisation is computed against.

What is timed, per implementation and precision:
- a training step: forward, cross-entropy, backward and AdamW (fused where PyTorch has it, the
  same optimizer for every implementation) on a fixed random batch, model in train mode;
- inference: a forward pass under torch.no_grad in eval mode;
- peak memory of one extra step: CUDA's max_memory_allocated, or on CPU the high-water mark of
  the allocator's own allocation events recorded by torch.profiler; both counted above what was
  allocated before the step (so: activations, gradients, temporaries; not the weights).

bf16 means: training under torch.autocast for everyone; inference under the same autocast for
timm and the tutorial's model, and through vitlab.inference.inference_model (weights cast to bf16
once) for vitlab, which is how vitlab serves bf16. The table says which mode each row used.
bf16 runs on any device; where vitlab.precision says it is not native (a CPU without
AVX512-BF16 or AMX) it is emulated and slower than fp32, and the command says so.
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .flops import forward_flops, training_flops
from .inference import inference_model
from .model import ViTConfig, VisionTransformer
from .precision import resolve_precision
from .presets import preset_config
from .runtime import cpu_name, resolve_device
from .weights import from_seed_state_dict, timm_model_kwargs, to_timm_state_dict

IMPLEMENTATIONS = ("vitlab", "timm", "seed")


@dataclass
class BenchConfig:
    preset: str = "seed"
    batch_size: int = 64
    precisions: tuple[str, ...] = ("fp32", "bf16")
    rounds: int = 3
    train_steps: int = 2  # timed training steps per implementation per round
    inference_steps: int = 2  # timed forward passes per implementation per round
    compile: bool = False  # also time torch.compile'd vitlab and timm
    device: str = "auto"
    matmul_size: int = 2048  # side of the square matmul that measures the peak
    model_overrides: dict = field(default_factory=dict)  # ViTConfig fields, e.g. for tests

    def __post_init__(self) -> None:
        for precision in self.precisions:
            if precision not in ("fp32", "bf16"):
                raise ValueError(f"precision must be fp32, bf16 or both, got {precision!r}")
        if self.batch_size < 1 or self.rounds < 1 or self.train_steps < 1 or self.inference_steps < 1:
            raise ValueError("batch size, rounds and steps must be at least 1")


@dataclass
class Contender:
    """One implementation at one precision: how it trains and how it serves."""

    name: str  # "vitlab", "timm", "seed", "vitlab+compile", ...
    precision: str
    train_mode: str  # "fp32" | "autocast"
    inference_mode: str  # "fp32" | "autocast" | "bf16 weights"
    model: nn.Module  # trained in place (fp32 master weights)
    train_forward: nn.Module  # model, or a compiled view of it
    inference_forward: nn.Module
    optimizer: torch.optim.Optimizer


def seed_compatible(config: ViTConfig) -> bool:
    """The tutorial's code only builds square, [CLS]-pooled models without the later options."""
    return (isinstance(config.image_size, int) and config.pooling == "cls" and config.qkv_bias
            and config.layer_scale is None and config.drop_path == 0.0
            and config.attention_dropout in (None, config.dropout))


def build_models(config: ViTConfig) -> dict[str, nn.Module]:
    """vitlab, timm and (where it can express the config) the tutorial's model, all with one set of
    weights: the tutorial's init when the seed model exists, else vitlab's."""
    from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer

    from .reference import SeedVisionTransformer

    vitlab_model = VisionTransformer.from_config(config)
    models: dict[str, nn.Module] = {"vitlab": vitlab_model}
    if seed_compatible(config):
        seed = SeedVisionTransformer(config.image_size, config.patch_size, config.in_channels,
                                     config.num_classes, config.dim, config.depth, config.heads,
                                     config.mlp_dim, config.dropout)
        vitlab_model.load_state_dict(from_seed_state_dict(seed.state_dict()))
        models["seed"] = seed
    timm_model = TimmVisionTransformer(**timm_model_kwargs(config))
    timm_model.load_state_dict(to_timm_state_dict(vitlab_model.state_dict(), config.pooling))
    models["timm"] = timm_model
    return {name: models[name] for name in IMPLEMENTATIONS if name in models}


def make_optimizer(model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    # fused AdamW runs the whole update in one kernel per dtype/device group (CPU and CUDA)
    return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=True)


def build_contenders(models: dict[str, nn.Module], config: BenchConfig,
                     device: torch.device) -> list[Contender]:
    contenders = []
    for precision in config.precisions:
        for name, model in models.items():
            model = model.to(device)
            if precision == "bf16" and name == "vitlab":
                inference_forward, inference_mode = inference_model(model, "bf16"), "bf16 weights"
            else:
                inference_forward, inference_mode = model, "autocast" if precision == "bf16" else "fp32"
            train_mode = "autocast" if precision == "bf16" else "fp32"
            contenders.append(Contender(name, precision, train_mode, inference_mode, model, model,
                                        inference_forward, make_optimizer(model, device)))
            if config.compile and name in ("vitlab", "timm"):
                if inference_mode == "bf16 weights":
                    inference_forward = inference_model(model, "bf16", pack=False)
                contenders.append(Contender(
                    f"{name}+compile", precision, train_mode, inference_mode, model,
                    torch.compile(model), torch.compile(inference_forward),
                    make_optimizer(model, device)))
    return contenders


def _autocast(contender: Contender, device: torch.device, for_training: bool):
    mode = contender.train_mode if for_training else contender.inference_mode
    if mode == "autocast":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def train_step(contender: Contender, images: torch.Tensor, targets: torch.Tensor,
               device: torch.device) -> None:
    contender.model.train()
    contender.optimizer.zero_grad(set_to_none=True)
    with _autocast(contender, device, for_training=True):
        logits = contender.train_forward(images)  # (B, K)
    loss = F.cross_entropy(logits.float(), targets)
    loss.backward()
    contender.optimizer.step()


def inference_step(contender: Contender, images: torch.Tensor, device: torch.device) -> None:
    contender.model.eval()
    contender.inference_forward.eval()
    with torch.no_grad(), _autocast(contender, device, for_training=False):
        contender.inference_forward(images)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(fn, steps: int, device: torch.device) -> float:
    """Seconds per call of fn, over `steps` calls."""
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    _synchronize(device)
    return (time.perf_counter() - start) / steps


@contextmanager
def _stderr_silenced():
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _percent(fraction: float | None) -> str:
    return "n/a" if fraction is None else f"{100 * fraction:.0f}%"


def peak_memory_bytes(fn, device: torch.device) -> int:
    """Bytes allocated at the high-water mark of one call of fn, above what was live before."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    # CPU has no allocator statistics; the profiler records every allocation and free in order
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _stderr_silenced():  # libkineto logs every start and stop straight to file descriptor 2
        prof.start()
    fn()
    with _stderr_silenced():
        prof.stop()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()  # negative for a free
        peak = max(peak, live)
    return peak


def matmul_tflops(size: int, dtype: torch.dtype, device: torch.device, repeats: int = 4) -> float:
    """Best of `repeats` square (size x size) matmuls, in TFLOP/s."""
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    a @ b  # warm-up: oneDNN / cuBLAS pick and JIT their kernels on first use
    seconds = min(time_steps(lambda: a @ b, 1, device) for _ in range(repeats))
    return 2 * size**3 / seconds / 1e12


@dataclass
class Result:
    implementation: str
    precision: str
    train_mode: str
    inference_mode: str
    train_img_s: float
    inference_img_s: float
    forward_gflops_per_image: float  # what this implementation runs (vitlab: [CLS]-only last block)
    train_tflops: float
    inference_tflops: float
    train_utilisation: float | None  # of the measured matmul peak; None where bf16 is emulated
    inference_utilisation: float | None
    train_peak_mib: float
    inference_peak_mib: float
    train_img_s_rounds: list[float]
    inference_img_s_rounds: list[float]


@dataclass
class BenchReport:
    preset: str
    batch_size: int
    rounds: int
    device: str
    device_name: str
    threads: int
    torch_version: str
    timm_version: str
    forward_gflops_per_image: float  # the full encoder, as papers and timm count it
    training_gflops_per_image: float
    matmul_peak_tflops: dict[str, float]
    results: list[Result]

    def ratio(self, implementation: str, precision: str, what: str, baseline: str = "timm",
              baseline_precision: str | None = None) -> float | None:
        """img/s of `implementation` over `baseline`'s; what is "train" or "inference"."""
        mine = self.find(implementation, precision)
        theirs = self.find(baseline, baseline_precision or precision)
        if mine is None or theirs is None:
            return None
        key = f"{what}_img_s"
        return getattr(mine, key) / getattr(theirs, key)

    def find(self, implementation: str, precision: str) -> Result | None:
        for result in self.results:
            if result.implementation == implementation and result.precision == precision:
                return result
        return None

    def ratios(self) -> dict[str, float]:
        out = {}
        for r in self.results:
            for what in ("train", "inference"):
                value = self.ratio(r.implementation, r.precision, what)
                if value is not None:
                    out[f"{r.implementation}/timm {r.precision} {what}"] = round(value, 3)
        if self.find("timm", "fp32") is not None:
            for r in self.results:
                if r.precision == "bf16":
                    value = self.ratio(r.implementation, "bf16", "inference", "timm", "fp32")
                    out[f"{r.implementation} bf16 / timm fp32 inference"] = round(value, 3)
        return out

    def to_json(self) -> str:
        d = asdict(self)
        d["ratios"] = self.ratios()
        return json.dumps(d, separators=(",", ":"))

    def _executed_note(self) -> str:
        """Names the implementations that run fewer FLOPs than the full encoder (TFLOP/s and
        utilisation count what each one runs; img/s ratios are unaffected)."""
        fewer = sorted({(r.implementation.split("+")[0], r.forward_gflops_per_image) for r in self.results
                        if r.forward_gflops_per_image < self.forward_gflops_per_image - 1e-9})
        return "".join(f" ({name} runs {gflops:.3f} G forward: its last block computes [CLS] only)"
                       for name, gflops in fewer)

    def table(self) -> str:
        lines = [
            f"vitlab bench: preset {self.preset}, batch {self.batch_size}, best of {self.rounds} "
            f"round(s), {self.device_name} ({self.device}, {self.threads} threads), "
            f"torch {self.torch_version}, timm {self.timm_version}",
            "matmul peak: " + ", ".join(f"{k} {v:.3f} TFLOP/s" for k, v in self.matmul_peak_tflops.items())
            + f"; FLOPs/img: forward {self.forward_gflops_per_image:.3f} G, "
            f"training {self.training_gflops_per_image:.3f} G" + self._executed_note(),
            "",
        ]
        header = ("prec", "model", "train mode", "train img/s", "x timm", "TFLOP/s", "util",
                  "infer mode", "infer img/s", "x timm", "TFLOP/s", "util", "train MiB", "infer MiB")
        rows = [header]
        for r in self.results:
            train_ratio = self.ratio(r.implementation, r.precision, "train")
            infer_ratio = self.ratio(r.implementation, r.precision, "inference")
            rows.append((
                r.precision, r.implementation, r.train_mode, f"{r.train_img_s:.1f}",
                f"{train_ratio:.2f}x" if train_ratio is not None else "-",
                f"{r.train_tflops:.3f}", _percent(r.train_utilisation),
                r.inference_mode, f"{r.inference_img_s:.1f}",
                f"{infer_ratio:.2f}x" if infer_ratio is not None else "-",
                f"{r.inference_tflops:.3f}", _percent(r.inference_utilisation),
                f"{r.train_peak_mib:.0f}", f"{r.inference_peak_mib:.0f}",
            ))
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        for row in rows:
            lines.append("  ".join(cell.ljust(w) if i in (0, 1, 2, 7) else cell.rjust(w)
                                   for i, (cell, w) in enumerate(zip(row, widths))).rstrip())
        for name in sorted({r.implementation for r in self.results if r.precision == "bf16"}):
            value = self.ratio(name, "bf16", "inference", "timm", "fp32")
            if value is not None:
                lines.append(f"{name} bf16 inference / timm fp32 inference: {value:.2f}x")
        return "\n".join(lines)


def device_name(device: torch.device) -> str:
    """The GPU's or the CPU's marketing name."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def run_benchmark(config: BenchConfig, log=print) -> BenchReport:
    import timm

    device = resolve_device(config.device)
    for precision in config.precisions:  # notes on stderr where bf16 is emulated
        resolve_precision(precision, device, command="vitlab bench")
    model_config = preset_config(config.preset, **config.model_overrides)
    torch.manual_seed(0)
    contenders = build_contenders(build_models(model_config), config, device)
    generator = torch.Generator().manual_seed(0)
    h, w = (model_config.image_size,) * 2 if isinstance(model_config.image_size, int) else model_config.image_size
    images = torch.randn(config.batch_size, model_config.in_channels, h, w, generator=generator).to(device)
    targets = torch.randint(0, model_config.num_classes, (config.batch_size,), generator=generator).to(device)

    def train(c):
        return lambda: train_step(c, images, targets, device)

    def infer(c):
        return lambda: inference_step(c, images, device)

    # warm-up (and compilation) once, then the memory high-water marks, outside the timed rounds
    peaks = {}
    for c in contenders:
        train(c)()
        infer(c)()
        c.optimizer.zero_grad(set_to_none=True)  # so the step's gradients count, as allocated in it
        peaks[(c.name, c.precision)] = (peak_memory_bytes(train(c), device),
                                        peak_memory_bytes(infer(c), device))
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    # an emulated bf16 matmul has no meaningful peak (the square test matmul is slower than the
    # model's own) and takes minutes to time: utilisation is only reported where bf16 is native
    native_bf16 = resolve_precision("auto", device) == "bf16"
    measured = [p for p in config.precisions if p == "fp32" or native_bf16]
    peak_rounds = {p: [] for p in measured}
    train_rounds = {(c.name, c.precision): [] for c in contenders}
    infer_rounds = {(c.name, c.precision): [] for c in contenders}
    for round_index in range(config.rounds):
        for precision in measured:
            peak_rounds[precision].append(matmul_tflops(config.matmul_size, dtypes[precision], device))
        # each round starts with the next model, so none is always the one that runs first after
        # a switch of precision (or right after the matmul loop)
        shift = round_index % len(contenders)
        for c in contenders[shift:] + contenders[:shift]:
            key = (c.name, c.precision)
            train_rounds[key].append(config.batch_size / time_steps(train(c), config.train_steps, device))
            infer_rounds[key].append(config.batch_size / time_steps(infer(c), config.inference_steps, device))
        log(f"round {round_index + 1}/{config.rounds}: " + ", ".join(
            f"{name} {precision} {train_rounds[(name, precision)][-1]:.1f}/"
            f"{infer_rounds[(name, precision)][-1]:.1f}" for name, precision in train_rounds)
            + " img/s (train/inference)")

    full_forward = forward_flops(model_config)
    peak = {p: max(v) for p, v in peak_rounds.items()}
    results = []
    for c in contenders:
        key = (c.name, c.precision)
        # vitlab's forward runs the last block for [CLS] alone when it pools [CLS]
        cls_only = c.name.startswith("vitlab") and model_config.pooling == "cls"
        forward = forward_flops(model_config, cls_only=cls_only)
        training = training_flops(model_config, cls_only=cls_only)
        train_img_s, infer_img_s = max(train_rounds[key]), max(infer_rounds[key])
        train_tflops, infer_tflops = train_img_s * training / 1e12, infer_img_s * forward / 1e12
        results.append(Result(
            c.name, c.precision, c.train_mode, c.inference_mode, train_img_s, infer_img_s, forward / 1e9,
            train_tflops, infer_tflops, *((train_tflops / peak[c.precision], infer_tflops / peak[c.precision])
                                          if c.precision in peak else (None, None)),
            peaks[key][0] / 2**20, peaks[key][1] / 2**20, train_rounds[key], infer_rounds[key]))
    return BenchReport(
        preset=config.preset, batch_size=config.batch_size, rounds=config.rounds, device=str(device),
        device_name=device_name(device), threads=torch.get_num_threads(),
        torch_version=torch.__version__, timm_version=timm.__version__,
        forward_gflops_per_image=full_forward / 1e9, training_gflops_per_image=training_flops(model_config) / 1e9,
        matmul_peak_tflops=peak, results=results)
