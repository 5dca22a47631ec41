"""The bf16 probe and the precision rule: the same answer for train, eval, predict and bench."""

import pytest
import torch

from vitlab import precision
from vitlab.precision import bf16_supported, packed_bf16_linear_supported, resolve_precision


@pytest.fixture
def fresh_probes():
    """The probes are cached per process; each test starts and ends with them empty."""
    cached = (precision.cpu_flags, precision.packed_bf16_linear_supported)
    for probe in cached:
        probe.cache_clear()
    yield
    for probe in cached:
        probe.cache_clear()


def _pretend_cpu(monkeypatch, capability: str, flags: set[str]) -> None:
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset(flags))


def test_auto_is_bf16_only_on_a_cpu_with_native_bf16(monkeypatch, fresh_probes):
    _pretend_cpu(monkeypatch, "AVX512", {"avx2", "avx512f", "avx512_bf16"})
    assert bf16_supported("cpu") and resolve_precision("auto", "cpu") == "bf16"
    _pretend_cpu(monkeypatch, "AVX2", {"avx2", "fma"})
    assert not bf16_supported("cpu") and resolve_precision("auto", "cpu") == "fp32"
    _pretend_cpu(monkeypatch, "AMX", set())
    assert resolve_precision("auto", "cpu") == "bf16"


def test_an_explicit_choice_is_kept_and_emulated_bf16_is_announced(monkeypatch, capsys, fresh_probes):
    _pretend_cpu(monkeypatch, "AVX2", {"avx2"})
    assert resolve_precision("fp32", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu", command="vitlab eval") == "bf16"
    assert "no native bf16" in capsys.readouterr().err
    _pretend_cpu(monkeypatch, "AVX512_BF16", set())
    resolve_precision("bf16", "cpu")
    assert capsys.readouterr().err == ""


def test_unknown_precision_is_a_one_line_error():
    with pytest.raises(ValueError, match="precision must be one of auto, bf16, fp32"):
        resolve_precision("fp16", "cpu")


def test_this_machines_answer_matches_its_cpu_flags(fresh_probes):
    flags = precision.cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo flags on this platform")
    native = bool(flags & {"avx512_bf16", "amx_bf16"})
    assert bf16_supported("cpu") == (native or torch.backends.cpu.get_cpu_capability() in ("AVX512_BF16", "AMX"))


def test_packed_linear_probe_agrees_with_what_the_op_does(fresh_probes):
    """Where the probe says yes the private op runs and is right; where it says no the op refuses
    (this is the AVX2-only case that broke the suite) or does not exist."""
    weight = torch.randn(16, 8).to(torch.bfloat16)
    x = torch.randn(4, 8).to(torch.bfloat16)
    if packed_bf16_linear_supported():
        packed = torch.ops.mkldnn._reorder_linear_weight(weight)
        out = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        torch.testing.assert_close(out.float(), (x.float() @ weight.float().T), rtol=2e-2, atol=2e-2)
    elif torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        with pytest.raises(RuntimeError):
            torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(weight), None,
                                               "none", [], "")


def test_packed_linear_probe_says_no_without_onednn(monkeypatch, fresh_probes):
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert packed_bf16_linear_supported() is False
