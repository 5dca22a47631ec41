"""Where code runs: the one device rule, the machine's description, and torchrun's process group.

`resolve_device` is used by train, eval, predict, embed and bench alike, so "auto" means the
same everywhere: the first CUDA device when there is one, else the CPU.
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """"auto" | "cpu" | "cuda" | "cuda:N" -> a torch.device this machine has, or a one-line error."""
    if isinstance(device, torch.device):
        device = str(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; use auto, cpu or cuda") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but this machine has no CUDA GPU; use --device cpu")
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not supported; use auto, cpu or cuda")
    return resolved


def cpu_name() -> str:
    """The processor's marketing name ("AMD EPYC 9R14 96-Core Processor"), as /proc/cpuinfo says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"
