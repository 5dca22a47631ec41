"""The run directory: what `vitlab train --out DIR` writes besides the checkpoints, and the rule for
training into a directory that already holds a run.

    config.json        the resolved TrainConfig plus what was derived from it ("resolved")
    environment.json   versions, machine, device, command, git commit (vitlab.runtime)
    metrics.jsonl      one JSON object per finished epoch
    curves.png         loss and accuracy per epoch
    model-card.md      what the best weights are and how they were made, at the end of a run
    teacher.safetensors  --distill: the CNN teacher and its label for every training image (vitlab.teacher)
    best.safetensors, last.safetensors, last.state.pt    (vitlab.checkpoint)

Every file is written atomically except metrics.jsonl, which is appended a line at a time (and
rewritten atomically when a resumed run drops the rows of epochs it redoes). The state file keeps
every row too, so a resumed run rebuilds metrics.jsonl from it: a kill between the state write and
the append, or a torn last line, loses nothing.

One run directory has one writer: `open_run_dir` takes an exclusive lock on the directory for the
whole run, refuses a folder that holds something other than a vitlab run, and removes the
temporary files a killed writer left behind.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; one writer per run directory is then up to the user
    fcntl = None

from .checkpoint import STATE_FILE, WEIGHT_FILES
from .files import atomic_write_text

CONFIG_FILE = "config.json"
ENVIRONMENT_FILE = "environment.json"
METRICS_FILE = "metrics.jsonl"
METRICS_CSV_FILE = "metrics.csv"  # the same rows for spreadsheets, rewritten whole after each epoch
CURVES_FILE = "curves.png"
CARD_FILE = "model-card.md"  # what the run's best weights are and how they were made, at the end of a run
CONFUSION_FILE = "confusion-val.png"  # the saved weights' validation confusion matrix, at the end of a run
TENSORBOARD_DIR = "tensorboard"  # event files of --log tensorboard
TEACHER_FILE = "teacher.safetensors"  # --distill: the CNN teacher and its label for every training image
RUN_FILES = (CONFIG_FILE, ENVIRONMENT_FILE, METRICS_FILE, METRICS_CSV_FILE, CURVES_FILE, CONFUSION_FILE,
             CARD_FILE, TEACHER_FILE, *WEIGHT_FILES, STATE_FILE)


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


class NotARunDirectory(ValueError):
    """--out names a file, or a folder that holds something other than a vitlab run."""


class RunLocked(ValueError):
    """Another process is writing to this run directory."""


def _is_temporary(name: str) -> bool:
    """A temporary file vitlab.files.atomic_write makes for a run file (.NAME.XXXX.tmp)."""
    return name.endswith(".tmp") and any(name.startswith(f".{run_file}.") for run_file in RUN_FILES)


def _is_vitlab_config(path: Path) -> bool:
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(values, dict) and "resolved" in values  # what vitlab.train writes beside the fields


def foreign_entries(run_dir: Path) -> list[str]:
    """What in `run_dir` vitlab did not write: anything but the run files and their temporary files
    (and config.json must be vitlab's own, not another tool's)."""
    return sorted(p.name for p in run_dir.iterdir()
                  if not (_is_temporary(p.name) or (p.name == TENSORBOARD_DIR and p.is_dir())
                          or (p.name in RUN_FILES and p.is_file() and (
                              p.name != CONFIG_FILE or _is_vitlab_config(p)))))


def check_not_foreign(run_dir: Path) -> None:
    """A new run goes into a missing or empty folder, or one that holds only a vitlab run's files."""
    if run_dir.exists() and not run_dir.is_dir():
        raise NotARunDirectory(f"--out {run_dir} is a file, not a directory; choose another --out")
    foreign = foreign_entries(run_dir) if run_dir.is_dir() else []
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise NotARunDirectory(f"{run_dir} is not empty and is not a vitlab run directory (it holds {shown}); "
                               f"choose another --out, or pass --overwrite to train into it anyway (vitlab then "
                               f"replaces only its own files there: {', '.join(RUN_FILES)})")


class RunDirectory:
    """The run directory of one `vitlab train`, held for the whole run (`open_run_dir`)."""

    def __init__(self, path: Path, fd: int | None, created: bool):
        self.path, self._fd, self._created = path, fd, created

    def close(self, failed: bool = False) -> None:
        """Releases the lock; after a run that failed before writing anything, removes the
        directory again if this run created it."""
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None
        if failed and self._created:
            try:
                self.path.rmdir()  # only if still empty
            except OSError:
                pass


def open_run_dir(run_dir: str | Path, *, new: bool, overwrite: bool = False) -> RunDirectory:
    """Opens `run_dir` for writing by this process alone: creates it for a new run, takes an
    exclusive lock on it (RunLocked if another `vitlab train` holds it), refuses a folder that is
    not a vitlab run (NotARunDirectory, unless `overwrite`) or already holds one (RunExists), and
    removes temporary files a killed writer left. The lock is an flock on the directory itself:
    the kernel drops it when the process ends however it ends, so no stale lock survives a kill."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise NotARunDirectory(f"--out {run_dir} is a file, not a directory; choose another --out")
    created = new and not run_dir.exists()
    if new:
        run_dir.mkdir(parents=True, exist_ok=True)
    elif not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} is not a run directory; pass the --out directory of an earlier "
                                f"vitlab train")
    fd = None
    if fcntl is not None:
        fd = os.open(run_dir, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise RunLocked(f"{run_dir} is in use by another vitlab train (one writer per run directory); "
                            f"wait for it to finish, or choose another --out") from None
    opened = RunDirectory(run_dir, fd, created)
    try:
        if new:
            check_out_dir(run_dir, overwrite=overwrite)  # a run (its state file) first: RunExists
            if not overwrite:
                check_not_foreign(run_dir)
        for path in run_dir.iterdir():
            if _is_temporary(path.name):
                path.unlink(missing_ok=True)  # a writer killed between its write and its rename
    except BaseException:
        opened.close(failed=True)
        raise
    return opened


def clear(run_dir: str | Path) -> None:
    """Removes the files a run writes (only those: anything else in the directory stays)."""
    for name in RUN_FILES:
        (Path(run_dir) / name).unlink(missing_ok=True)
    import shutil

    shutil.rmtree(Path(run_dir) / TENSORBOARD_DIR, ignore_errors=True)  # old events would mix with new ones


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
    except RecursionError:
        raise ValueError(f"{path} is nested too deeply to be a training config") from None
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
    rows = [row for row in map(_metrics_row, path.read_text(errors="replace").splitlines()) if row is not None]
    return [r for r in rows if up_to_epoch is None or r["epoch"] <= up_to_epoch]


def _metrics_row(line: str) -> dict | None:
    """A line's row, or None for a line that is not one: the torn last line of a killed append (the
    state file keeps every row, and a resumed run rebuilds the file from it)."""
    try:
        row = json.loads(line)
    except (ValueError, RecursionError):
        return None
    ok = isinstance(row, dict) and isinstance(row.get("epoch"), int) and not isinstance(row["epoch"], bool)
    return row if ok else None


def append_metrics(run_dir: str | Path, row: dict) -> None:
    with open(Path(run_dir) / METRICS_FILE, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def rewrite_metrics(run_dir: str | Path, rows: list[dict]) -> None:
    atomic_write_text(Path(run_dir) / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in rows))


def write_metrics_csv(run_dir: str | Path, rows: list[dict]) -> Path:
    """metrics.csv: one row per epoch, a column per metric (in the order they first appear; a
    metric an epoch lacks is an empty cell), written atomically."""
    import csv
    import io

    columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    return atomic_write_text(Path(run_dir) / METRICS_CSV_FILE, buffer.getvalue())


def write_curves(run_dir: str | Path, rows: list[dict]) -> Path:
    from .plots import plot_curves

    return plot_curves(rows, Path(run_dir) / CURVES_FILE)
