"""Where code runs: the one device rule, the machine's description, and torchrun's process group.

`resolve_device` is used by train, eval, predict, embed and bench alike, so "auto" means the
same everywhere: the first CUDA device when there is one, else the CPU. `setup_runtime` adds
torchrun (one process per device, DDP) and the precision rule; `describe_environment` is what
a run directory's environment.json records.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .precision import resolve_precision

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


# ---------------------------------------------------------------- torchrun's processes
@dataclass(frozen=True)
class Runtime:
    """Where this process runs: device, number format and its place among torchrun's processes."""

    device: torch.device
    precision: str = "fp32"  # "bf16" (autocast) | "fp32", as vitlab.precision.resolve_precision says
    rank: int = 0
    world_size: int = 1

    @property
    def bf16(self) -> bool:
        return self.precision == "bf16"

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that prints and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_runtime(device: str = "auto", precision: str = "auto", *, command: str = "vitlab train") -> Runtime:
    """The device rule plus torchrun: with WORLD_SIZE > 1 in the environment each process joins the
    process group (NCCL on CUDA, gloo on CPU) and takes GPU LOCAL_RANK."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    resolved = resolve_device(device)
    if resolved.type == "cuda":
        resolved = torch.device("cuda", local_rank if world_size > 1 else (resolved.index or 0))
        torch.cuda.set_device(resolved)
    if world_size > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if resolved.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return Runtime(resolved, resolve_precision(precision, resolved, command=command), rank, world_size)


def shutdown(runtime: Runtime) -> None:
    """Leaves the process group (a no-op for a single process)."""
    if runtime.distributed and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def barrier(runtime: Runtime) -> None:
    if runtime.distributed:
        torch.distributed.barrier()


def all_reduce_sum(values: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """The sum of `values` over all processes (a copy; `values` itself is left alone)."""
    if runtime.distributed:
        values = values.clone()
        torch.distributed.all_reduce(values)
    return values


def all_gather_object(value, runtime: Runtime) -> list:
    """[value of rank 0, value of rank 1, ...]: every process gets every process's value."""
    if not runtime.distributed:
        return [value]
    gathered = [None] * runtime.world_size
    torch.distributed.all_gather_object(gathered, value)
    return gathered


# ---------------------------------------------------------------- the environment record
def describe_environment(runtime: Runtime) -> dict:
    """Versions, machine, device and command: written as environment.json beside every run."""
    import numpy
    import torchvision

    from .version import __version__

    return {
        "vitlab": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "torchvision": torchvision.__version__, "numpy": numpy.__version__,
        "platform": platform.platform(), "machine": platform.machine(), "processor": cpu_name(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "device": str(runtime.device),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
        "cuda": torch.version.cuda, "bf16_autocast": runtime.bf16, "world_size": runtime.world_size,
        "command": sys.argv, "git_commit": git_commit(),
    }


def git_commit() -> str | None:
    """HEAD of the source tree vitlab runs from, "+dirty" with uncommitted changes; None outside git."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("+dirty" if dirty else "")) or None
