"""The run directory: what `vitlab train --out DIR` writes besides the checkpoints, and the rule for
training into a directory that already holds a run.

    config.json        the resolved TrainConfig plus what was derived from it ("resolved")
    environment.json   versions, machine, device, command, git commit (vitlab.runtime)
    metrics.jsonl      one JSON object per finished epoch
    curves.png         loss and accuracy per epoch
    best.safetensors, last.safetensors, last.state.pt    (vitlab.checkpoint)

Every file is written atomically except metrics.jsonl, which is appended a line at a time (and
rewritten atomically when a resumed run drops the rows of epochs it redoes).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .checkpoint import STATE_FILE, WEIGHT_FILES
from .files import atomic_write_text

CONFIG_FILE = "config.json"
ENVIRONMENT_FILE = "environment.json"
METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
RUN_FILES = (CONFIG_FILE, ENVIRONMENT_FILE, METRICS_FILE, CURVES_FILE, *WEIGHT_FILES, STATE_FILE)


class RunExists(ValueError):
    """--out names a directory that already holds a run (it has a training state file).

    `complete` tells a finished run (every epoch of its config done) from an unfinished one; the
    message says what to do either way: --resume to continue, --overwrite to start over."""

    def __init__(self, run_dir: Path, complete: bool, message: str):
        super().__init__(message)
        self.run_dir, self.complete = run_dir, complete


# ---------------------------------------------------------------- the "already holds a run" rule
def check_out_dir(run_dir: str | Path, *, overwrite: bool = False) -> Path:
    """The rule for a new run into `run_dir`: fine when it holds no run (no state file) or when
    `overwrite` says to start it over; else RunExists."""
    run_dir = Path(run_dir)
    if overwrite or not (run_dir / STATE_FILE).exists():
        return run_dir
    rows = read_metrics(run_dir)
    planned = _saved_epochs(run_dir)
    if rows and planned is not None and rows[-1]["epoch"] >= planned:
        best = rows[-1].get("best_val_top1")
        scored = f", best val top-1 {best:.4f}" if isinstance(best, float) else ""
        raise RunExists(run_dir, True,
                        f"{run_dir} already holds a completed run ({rows[-1]['epoch']} epochs{scored}). "
                        f"Start it over with --overwrite, train it longer with --resume {run_dir} "
                        f"--epochs N, or choose another --out")
    raise RunExists(run_dir, False,
                    f"{run_dir} already holds a run; continue it with --resume {run_dir}, start it over "
                    f"with --overwrite, or choose another --out")


def clear(run_dir: str | Path) -> None:
    """Removes the files a run writes (only those: anything else in the directory stays)."""
    for name in RUN_FILES:
        (Path(run_dir) / name).unlink(missing_ok=True)


def _saved_epochs(run_dir: Path) -> int | None:
    try:
        return int(read_config(run_dir)["epochs"])
    except (FileNotFoundError, KeyError, TypeError, ValueError):
        return None


# ---------------------------------------------------------------- config.json, environment.json
def read_config(run_dir: str | Path) -> dict:
    """The config.json a run saved (TrainConfig fields plus "resolved")."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no {CONFIG_FILE}); pass the --out "
                                f"directory of an earlier vitlab train")
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path} does not hold a training config")
    return values


def write_config(run_dir: str | Path, values: dict) -> Path:
    return atomic_write_text(Path(run_dir) / CONFIG_FILE, json.dumps(values, indent=2) + "\n")


def write_environment(run_dir: str | Path, environment: dict) -> Path:
    return atomic_write_text(Path(run_dir) / ENVIRONMENT_FILE, json.dumps(environment, indent=2) + "\n")


# ---------------------------------------------------------------- metrics.jsonl, curves.png
def read_metrics(run_dir: str | Path, up_to_epoch: int | None = None) -> list[dict]:
    """The rows of metrics.jsonl ([] when there is none), those of epochs <= up_to_epoch if given."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if up_to_epoch is None or r["epoch"] <= up_to_epoch]


def append_metrics(run_dir: str | Path, row: dict) -> None:
    with open(Path(run_dir) / METRICS_FILE, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def rewrite_metrics(run_dir: str | Path, rows: list[dict]) -> None:
    atomic_write_text(Path(run_dir) / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in rows))


def write_curves(run_dir: str | Path, rows: list[dict]) -> Path:
    from .plots import plot_curves

    return plot_curves(rows, Path(run_dir) / CURVES_FILE)
