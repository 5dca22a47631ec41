import json
import subprocess
import sys

import pytest

import vitlab
from vitlab.cli import main


def test_version(capsys):
    try:
        main(["--version"])
    except SystemExit as exit:
        assert exit.code == 0
    assert capsys.readouterr().out.strip() == f"vitlab {vitlab.__version__}"


def test_models_table_lists_presets_with_measured_numbers(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    seed_line = next(line for line in out.splitlines() if line.startswith("seed"))
    assert "18,979,338" in seed_line and " 65 " in seed_line and "2.509" in seed_line
    for name in vitlab.list_models():
        assert any(line.startswith(name) for line in out.splitlines())


def test_models_json(capsys):
    assert main(["models", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {r["name"]: r["parameters"] for r in rows}["seed"] == 18_979_338


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "vitlab", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("vitlab ")


def test_inference_commands_take_a_precision(capsys):
    from vitlab.cli import build_parser

    parser = build_parser()
    for command in (["predict", "run", "a.png"], ["embed", "run", "a.png", "--out", "f.npy"],
                    ["eval", "run", "--data", "images"]):
        assert parser.parse_args(command).precision == "auto"  # the machine's fastest by default
        assert parser.parse_args(command + ["--precision", "bf16"]).precision == "bf16"
        with pytest.raises(SystemExit, match="2"):
            parser.parse_args(command + ["--precision", "fp16"])
        assert "invalid choice: 'fp16'" in capsys.readouterr().err


def test_output_into_a_closed_pipe_ends_quietly():
    """`vitlab models | head -1`: the reader leaves early; no traceback, exit status 141 as `yes`."""
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-m", "vitlab", "models"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    process.stdout.close()  # nobody reads: the first write fails with EPIPE
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=120) in (0, 141)
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr
