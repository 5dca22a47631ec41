"""Which number format runs where: the one bf16 capability probe and the one precision rule.

Training (autocast), evaluation, prediction, embedding and `vitlab bench` all ask here, so a
machine gets the same answer everywhere:

    precision   meaning
    "auto"      bf16 where the hardware computes it natively, else fp32
    "bf16"      bf16 even where it is emulated (slower than fp32 there, but it runs)
    "fp32"      fp32

Native bf16 means AVX512-BF16 or AMX on a CPU, Ampere or later on CUDA. Without it oneDNN
emulates bf16 matmuls and they are several times slower than fp32, so "auto" never picks it.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch

PRECISIONS = ("auto", "bf16", "fp32")


def bf16_supported(device: torch.device | str) -> bool:
    """Whether `device` runs bf16 matmuls natively (AVX512-BF16/AMX on CPU; Ampere+ on CUDA)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    if torch.backends.cpu.get_cpu_capability() in ("AVX512_BF16", "AMX"):
        return True
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def resolve_precision(precision: str, device: torch.device | str, *, command: str = "vitlab") -> str:
    """"auto" | "bf16" | "fp32" -> "bf16" or "fp32" for `device` (see the table above)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    native = bf16_supported(device)
    if precision == "auto":
        return "bf16" if native else "fp32"
    if precision == "bf16" and not native:
        print(f"{command}: note: bf16 requested but this {torch.device(device).type} has no native bf16; "
              f"it runs emulated and slower than fp32", file=sys.stderr)
    return precision


@functools.cache
def packed_bf16_linear_supported() -> bool:
    """Whether oneDNN's prepacked bf16 linear (a private torch op) runs on this CPU.

    `vitlab.inference.PackedLinear` uses torch.ops.mkldnn._reorder_linear_weight and
    _linear_pointwise. They exist in every CPU build of PyTorch but refuse to run without
    AVX512 (BW/VL/DQ) or AVX-NE-CONVERT ("bf16 path needs the cpu support ..."), so the probe
    runs them once on a tiny layer instead of reading flags; anything else falls back to plain
    bf16 nn.Linear.
    """
    if not torch.backends.mkldnn.is_available():
        return False
    ops = torch.ops.mkldnn
    if not (hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise")):
        return False
    try:
        weight = torch.ones(8, 8, dtype=torch.bfloat16)
        packed = ops._reorder_linear_weight(weight)
        out = ops._linear_pointwise(torch.ones(2, 8, dtype=torch.bfloat16), packed, None, "none", [], "")
        return bool(torch.allclose(out.float(), torch.full((2, 8), 8.0)))
    except (RuntimeError, NotImplementedError):
        return False
