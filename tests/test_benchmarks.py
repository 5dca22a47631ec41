"""The scripts under benchmarks/ run and print what BENCHMARKS.md quotes (tiny settings)."""

import importlib.util
import json
import platform
import shutil
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(platform.machine() != "x86_64" or not (shutil.which("cc") or shutil.which("gcc")),
                    reason="the instruction probe is x86-64 C")
def test_cpu_peak_prints_a_table_then_one_json_line(capsys):
    cpu_peak = load_script("cpu_peak")
    assert cpu_peak.main(["--iterations", "20000", "--matmul-sizes", "64"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("cpu_peak: ")
    assert lines[1].split()[:3] == ["prec", "instruction", "peak"]
    report = json.loads(lines[-1])
    assert report["instruction_peak_gflops"]["fp32"] > 0
    per_core = report["instruction_per_core_gflops"]
    assert all(len(values) == report["cores"] for values in per_core.values())
    assert set(report["matmul_gflops"]) == set(report["instruction_peak_gflops"])
    if "bf16" in report["instruction_peak_gflops"]:
        expected = report["instruction_peak_gflops"]["bf16"] / report["instruction_peak_gflops"]["fp32"]
        assert report["bf16_over_fp32_instruction_peak"] == pytest.approx(expected, rel=1e-2)
