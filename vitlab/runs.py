"""Comparing training runs: one RunSummary per run directory (recipe, model, length, best validation
top-1, training time, machine), as `vitlab runs` prints it as a table or CSV and as the model card of
`vitlab export --format folder` quotes it.

Run directories are read defensively: a folder a run is still writing, one whose files were cut
short or edited, or an older vitlab's, gives a summary with what could be read (None elsewhere, shown
as "-") and a note per file that could not be; a folder that holds no run at all is refused with
one line (NotARun), never a traceback.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .budget import format_duration
from .checkpoint import WEIGHT_FILES, read_safetensors_metadata
from .rundir import CONFIG_FILE, ENVIRONMENT_FILE, METRICS_FILE, read_metrics

COLUMNS = ("run", "recipe", "model", "params", "length", "epochs", "best val top-1", "train time", "machine")
CSV_COLUMNS = ("run", "recipe", "model", "parameters", "time_budget_s", "epochs_planned", "epochs_done",
               "best_val_top1", "best_epoch", "train_seconds", "machine", "notes")


class NotARun(ValueError):
    """A path that holds no vitlab run: not a directory, or none of a run's files in it."""


@dataclass
class RunSummary:
    path: str
    recipe: str | None = None  # the training preset (--preset), e.g. "budget"
    model: str | None = None  # the model preset, e.g. "nano"
    parameters: int | None = None
    time_budget_s: float | None = None  # a --time-budget run's budget; None for a run of fixed epochs
    epochs_planned: int | None = None
    epochs_done: int | None = None
    best_val_top1: float | None = None  # of the model or its EMA, whichever the run kept as best
    best_epoch: int | None = None
    train_seconds: float | None = None  # the training steps of every finished epoch (evaluation excluded)
    machine: str | None = None  # "NVIDIA H200", "2x NVIDIA H100 80GB HBM3", "2-core AVX2"
    data: str | None = None
    command: list[str] | None = None
    config: dict = field(default_factory=dict, repr=False)
    environment: dict = field(default_factory=dict, repr=False)
    metrics: list[dict] = field(default_factory=list, repr=False)
    notes: list[str] = field(default_factory=list)  # files that were there but could not be read

    @property
    def length(self) -> str | None:
        if self.time_budget_s is not None:
            return f"{format_duration(self.time_budget_s)} budget"
        return f"{self.epochs_planned} epochs" if self.epochs_planned is not None else None

    @property
    def epochs(self) -> str | None:
        """Finished epochs, "3/5" while a run is short of its plan."""
        if self.epochs_done is None:
            return None
        if self.epochs_planned is not None and self.epochs_done < self.epochs_planned:
            return f"{self.epochs_done}/{self.epochs_planned}"
        return str(self.epochs_done)

    def cells(self) -> list[str]:
        top1 = f"{self.best_val_top1:.2%}" if self.best_val_top1 is not None else None
        if top1 is not None and self.best_epoch is not None:
            top1 += f" (ep {self.best_epoch})"
        time = format_duration(self.train_seconds) if self.train_seconds is not None else None
        params = _short_count(self.parameters) if self.parameters is not None else None
        values = [self.path, self.recipe, self.model, params, self.length, self.epochs, top1, time, self.machine]
        return [value if value else "-" for value in values]

    def csv_row(self) -> list:
        values = [self.path, self.recipe, self.model, self.parameters, self.time_budget_s, self.epochs_planned,
                  self.epochs_done, self.best_val_top1, self.best_epoch,
                  round(self.train_seconds, 2) if self.train_seconds is not None else None, self.machine,
                  "; ".join(self.notes)]
        return ["" if value is None else value for value in values]


# ---------------------------------------------------------------- reading one run directory
def _number(value) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def _count(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _read_json_object(path: Path, notes: list[str]) -> dict:
    """The JSON object in `path`; {} (and a note) when it is missing, unreadable or not an object."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(errors="replace"))
    except (OSError, ValueError, RecursionError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else "not valid JSON"
        notes.append(f"{path.name} unreadable ({reason})")
        return {}
    if not isinstance(value, dict):
        notes.append(f"{path.name} holds no JSON object")
        return {}
    return value


def _is_train_config(config: dict) -> bool:
    # what vitlab.train writes beside the TrainConfig fields; an exported model folder's config.json
    # (or another tool's) has no "resolved"
    return isinstance(config.get("resolved"), dict)


def _recipe(config: dict, command: list[str] | None) -> str | None:
    """The training preset: the run's record of it where there is one, else the command's --preset,
    else the preset `vitlab train` falls back to, else the preset the config matches field by field."""
    from .config import TRAIN_PRESETS

    for source in (config, config.get("resolved") or {}):
        if isinstance(source.get("preset"), str):
            return source["preset"]
    args = [str(a) for a in command] if command else []
    for i, arg in enumerate(args):
        if arg == "--preset" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--preset="):
            return arg.split("=", 1)[1]
    if "train" in args and not any(a.split("=")[0] in ("--config", "--resume") for a in args):
        return "nano"  # vitlab train's default preset
    # a resumed run's environment.json holds the resume command: match the saved config instead
    for name, values in TRAIN_PRESETS.items():
        if config and all(config.get(k) == v for k, v in values.items() if k not in ("out", "epochs")):
            return name
    return None


def _parameters(model_config) -> int | None:
    """Parameter count of the architecture in config.json, built on the meta device (no memory)."""
    if not isinstance(model_config, dict):
        return None
    import torch

    from .model import VisionTransformer, ViTConfig

    try:
        with torch.device("meta"):
            model = VisionTransformer.from_config(ViTConfig.from_dict(model_config))
    except Exception:  # noqa: BLE001 - an older or edited config: the column shows "-"
        return None
    return sum(p.numel() for p in model.parameters())


def _machine(environment: dict) -> str | None:
    device = str(environment.get("device") or "")
    if device.startswith("cuda"):
        gpus = environment.get("gpus") if isinstance(environment.get("gpus"), list) else []
        name = str(gpus[0]) if gpus else "GPU"
        processes = _count(environment.get("world_size")) or 1
        return f"{processes}x {name}" if processes > 1 else name
    capability = environment.get("cpu_capability")
    if not isinstance(capability, str) or not capability:
        return None
    capability = capability.replace("_", "-")  # torch says AVX512_BF16; people write AVX512-BF16
    cores = _count(environment.get("cpu_count"))
    return f"{cores}-core {capability}" if cores else capability


def _checkpoint_top1(run_dir: Path) -> tuple[float | None, int | None]:
    """Validation top-1 and epoch recorded in the run's best (else last) checkpoint."""
    for name in WEIGHT_FILES:
        if (run_dir / name).is_file():
            try:
                raw = read_safetensors_metadata(run_dir / name)
                return _number(json.loads(raw.get("val_top1", "null"))), _count(json.loads(raw.get("epoch", "null")))
            except (ValueError, RecursionError):
                return None, None
    return None, None


def read_run(path: str | Path) -> RunSummary:
    """The summary of one run directory; NotARun when `path` holds none of a run's files."""
    run_dir = Path(path)
    if not run_dir.is_dir():
        raise NotARun(f"{path}: not a directory")
    summary = RunSummary(str(path))
    notes = summary.notes
    config = _read_json_object(run_dir / CONFIG_FILE, notes)
    if config and not _is_train_config(config):
        config = {}  # another tool's config.json (or an exported model folder's)
    environment = _read_json_object(run_dir / ENVIRONMENT_FILE, notes)
    try:
        rows = read_metrics(run_dir)  # skips a torn last line by itself
    except OSError as error:
        notes.append(f"{METRICS_FILE} unreadable ({error.strerror or error})")
        rows = []
    has_weights = any((run_dir / name).is_file() for name in WEIGHT_FILES)
    if not (config or environment or rows or has_weights):
        raise NotARun(f"{path}: not a vitlab run directory (no {CONFIG_FILE}, {METRICS_FILE} or checkpoint)")
    summary.config, summary.environment, summary.metrics = config, environment, rows

    resolved = config.get("resolved") if isinstance(config.get("resolved"), dict) else {}
    command = environment.get("command")
    summary.command = [str(a) for a in command] if isinstance(command, list) else None
    summary.recipe = _recipe(config, summary.command)
    summary.model = config.get("model") if isinstance(config.get("model"), str) else None
    summary.parameters = _parameters(resolved.get("model_config"))
    summary.data = config.get("data") if isinstance(config.get("data"), str) else None
    summary.machine = _machine(environment)

    summary.time_budget_s = _number(config.get("time_budget"))
    if summary.time_budget_s is not None:
        steps, per_epoch = _count(resolved.get("total_steps")), _count(resolved.get("steps_per_epoch"))
        summary.epochs_planned = -(-steps // per_epoch) if steps and per_epoch else None
    else:
        summary.epochs_planned = _count(config.get("epochs"))

    if rows:
        summary.epochs_done = max(row["epoch"] for row in rows)
        seconds = [s for s in (_number(row.get("epoch_seconds")) for row in rows) if s is not None]
        summary.train_seconds = sum(seconds) if seconds else None
        for row in rows:
            # the better of the model and its EMA, as training keeps it; the first epoch to reach it
            scores = [v for v in (_number(row.get("val_top1")), _number(row.get("ema_val_top1"))) if v is not None]
            if scores and (summary.best_val_top1 is None or max(scores) > summary.best_val_top1):
                summary.best_val_top1, summary.best_epoch = max(scores), row["epoch"]
    if summary.best_val_top1 is None:
        summary.best_val_top1, summary.best_epoch = _checkpoint_top1(run_dir)
    return summary


def expand_run_dirs(paths: list[str | Path]) -> list[Path]:
    """The paths as given, except that a folder holding no run but run folders stands for those
    (`vitlab runs runs` is `vitlab runs runs/*`)."""
    out: list[Path] = []
    for item in paths:
        path = Path(item)
        if path.is_dir() and not _looks_like_run(path):
            children = sorted(child for child in path.iterdir() if child.is_dir() and _looks_like_run(child))
            if children:
                out.extend(children)
                continue
        out.append(path)
    return out


def _looks_like_run(path: Path) -> bool:
    return any((path / name).is_file() for name in (CONFIG_FILE, METRICS_FILE, *WEIGHT_FILES))


# ---------------------------------------------------------------- the table and the CSV
def format_table(summaries: list[RunSummary]) -> str:
    rows = [list(COLUMNS)] + [s.cells() for s in summaries]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def format_csv(summaries: list[RunSummary]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for s in summaries:
        writer.writerow(s.csv_row())
    return buffer.getvalue()


def _short_count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K" if n >= 1e3 else str(n)


def run_dir_of(checkpoint: str | Path | None) -> Path | None:
    """The run directory a checkpoint (run directory or .safetensors file) belongs to, if any: the
    folder holding it when that folder has a run's config.json or metrics.jsonl."""
    from .checkpoint import resolve_checkpoint

    folder = resolve_checkpoint(checkpoint).parent
    return folder if any((folder / name).is_file() for name in (CONFIG_FILE, METRICS_FILE)) else None
