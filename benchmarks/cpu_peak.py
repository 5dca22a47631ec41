"""The CPU's arithmetic ceiling: instruction peak per precision against what PyTorch's matmul gets.

Compiles benchmarks/cpu_peak.c (needs a C compiler: cc/gcc/clang; x86-64 only), runs one copy
on every core at once, and sums them: that is the most FLOP/s any fp32 or bf16 kernel can reach
on this machine. Then times PyTorch's square matmuls of the same precisions in this process. The
ratio bf16 / fp32 of the instruction peaks bounds how much faster bf16 inference can be than an
fp32 model that already runs near the fp32 peak.

    python benchmarks/cpu_peak.py [--iterations 50000000] [--matmul-sizes 1024 2048 4096]

Prints a table, then one JSON line with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from vitlab.bench import matmul_tflops
from vitlab.runtime import cpu_name

SOURCE = Path(__file__).with_name("cpu_peak.c")


def compiler() -> str:
    for name in ("cc", "gcc", "clang"):
        if shutil.which(name):
            return name
    raise SystemExit("cpu_peak: no C compiler found (cc, gcc or clang); install one, e.g. apt install gcc")


def instruction_peaks(iterations: int, cores: int) -> dict[str, list[float]]:
    """GFLOP/s per instruction kind, one figure per core, all cores running at once."""
    with tempfile.TemporaryDirectory() as tmp:
        binary = Path(tmp) / "cpu_peak"
        # -O3 keeps the accumulators in registers (at -O2 GCC spills them and halves the rate)
        subprocess.run([compiler(), "-O3", str(SOURCE), "-o", str(binary)], check=True)
        procs = [subprocess.Popen([str(binary), str(iterations)], stdout=subprocess.PIPE, text=True)
                 for _ in range(cores)]
        per_kind: dict[str, list[float]] = {}
        for proc in procs:
            out, _ = proc.communicate()
            if proc.returncode != 0:
                raise SystemExit(f"cpu_peak: the compiled probe failed with exit status {proc.returncode}")
            for line in out.split("\n"):
                if line.strip():
                    name, gflops = line.split()
                    per_kind.setdefault(name, []).append(float(gflops))
    return per_kind


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=50_000_000,
                        help="loop trips per instruction kind and core (default 5e7, ~1-2 s each)")
    parser.add_argument("--matmul-sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    args = parser.parse_args(argv)
    if platform.machine() not in ("x86_64", "AMD64"):
        print(f"cpu_peak: the probe uses x86-64 instructions; this machine is {platform.machine()}",
              file=sys.stderr)
        return 2
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    peaks = instruction_peaks(args.iterations, cores)
    instruction = {("bf16" if name.startswith("bf16") else "fp32"): (name, sum(values))
                   for name, values in peaks.items()}
    matmul = {}
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        if precision in instruction:
            matmul[precision] = {size: 1e3 * matmul_tflops(size, dtype, torch.device("cpu"))
                                 for size in args.matmul_sizes}

    cpu = cpu_name()
    print(f"cpu_peak: {cpu}, {cores} cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)")
    header = ("prec", "instruction", "peak GFLOP/s", "per core") + tuple(
        f"matmul {n}" for n in args.matmul_sizes) + ("best/peak",)
    rows = [header]
    for precision, (name, total) in instruction.items():
        sizes = matmul.get(precision, {})
        best = max(sizes.values()) if sizes else float("nan")
        rows.append((precision, name, f"{total:.1f}", f"{total / cores:.1f}")
                    + tuple(f"{sizes[n]:.1f}" for n in args.matmul_sizes) + (f"{100 * best / total:.0f}%",))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    ratio = None
    if "bf16" in instruction and "fp32" in instruction:
        ratio = instruction["bf16"][1] / instruction["fp32"][1]
        print(f"bf16 / fp32 instruction peak: {ratio:.2f}x")
    print(json.dumps({
        "cpu": cpu, "cores": cores, "torch_version": torch.__version__,
        "instruction_peak_gflops": {p: round(v, 1) for p, (_, v) in instruction.items()},
        "instruction_per_core_gflops": {n: [round(x, 1) for x in v] for n, v in peaks.items()},
        "matmul_gflops": {p: {str(n): round(v, 1) for n, v in s.items()} for p, s in matmul.items()},
        "bf16_over_fp32_instruction_peak": None if ratio is None else round(ratio, 3),
    }, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
