"""Training for a wall-clock budget instead of an epoch count.

`vitlab train --time-budget 10m` measures how fast this machine trains during the first steps,
then fixes the run's length in optimizer steps so that training, the per-epoch evaluations and
the final saves end when the budget does. The schedule (warmup, decay to the floor at the last
step, EMA horizon) is then laid over those steps, so the same command gives the best model this
machine can train in that time, on any CPU or GPU. The step count is saved with the run, so a
resumed run keeps the original budget's schedule however fast the machine it resumes on is.
"""

from __future__ import annotations

import math
import re

# Optimizer steps are timed from step 5 (the first ones warm caches up) to the end of warmup,
# where the decay, the only part of the schedule that depends on the run's length, begins: the
# longest window that changes nothing already done. At least 20 steps; at most a quarter of the
# budget, estimated from the first 20.
CALIBRATION_START, CALIBRATION_MIN_STEPS, CALIBRATION_MAX_FRACTION = 5, 20, 0.25


def calibration_end(warmup_steps: int, step_s: float, budget_s: float) -> int:
    """The optimizer step at which timing stops and the run's length is fixed."""
    first = CALIBRATION_START + CALIBRATION_MIN_STEPS
    affordable = int(CALIBRATION_MAX_FRACTION * budget_s / step_s)
    return max(first, min(warmup_steps, affordable))
# After that, the length is fitted again from the recent pace every REFIT_EVERY steps or every
# REFIT_FRACTION of the budget, whichever comes first (at a host sync, at least REFIT_MIN_STEPS
# steps apart), and at every epoch's end from the epoch's pace and its evaluation's and
# checkpoint's real cost: a machine that slows down overruns by at most about one such window.
REFIT_EVERY, REFIT_FRACTION, REFIT_MIN_STEPS = 50, 0.02, 5
RESERVE_FRACTION = 0.02  # of the budget, for the last checkpoint, curves and process exit

_UNITS = {"s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_duration(text: str | float | int) -> float:
    """"10m", "1h", "150m", "90s", "1h30m" (or a bare number of minutes) -> seconds."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text) * 60.0
    else:
        parts = re.findall(r"(\d+(?:\.\d+)?)\s*(h|min|m|s)", str(text).strip().lower())
        rest = re.sub(r"(\d+(?:\.\d+)?)\s*(h|min|m|s)", "", str(text).strip().lower()).strip()
        if not parts and re.fullmatch(r"\d+(\.\d+)?", rest):
            parts, rest = [(rest, "m")], ""
        if not parts or rest:
            raise ValueError(f"cannot read {text!r} as a duration: write e.g. 10m, 1h, 90s or 1h30m")
        seconds = sum(float(value) * _UNITS[unit] for value, unit in parts)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"a time budget must be a positive duration, got {text!r}")
    return seconds


def format_duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return (f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s")


def low_res_end(total_steps: int, fraction: float) -> int:
    """The first full-size optimizer step of a run of `total_steps` with --low-res `fraction`."""
    return round(fraction * total_steps)


def evaluations(epochs: int, eval_every: int) -> int:
    """How many of a run's first `epochs` epochs end with an evaluation (and checkpoint) when it
    evaluates every `eval_every` epochs and after its last one, `epochs` being the last."""
    return math.ceil(epochs / eval_every)


def fit_total_steps(budget_s: float, elapsed_s: float, steps_done: int, step_s: float,
                    steps_per_epoch: int, eval_s_per_epoch: float, evaluations_done: int = 0,
                    low_res: tuple[float, float] | None = None, eval_every: int = 1) -> int:
    """How many optimizer steps the whole run can take so that it ends within `budget_s`.

    elapsed_s: wall time spent so far (data loading, the steps_done steps); step_s: measured
    seconds per optimizer step; eval_s_per_epoch: seconds of one evaluation (and checkpoint),
    which ends every `eval_every`-th epoch and the last, partial one; evaluations_done of them
    are inside elapsed_s already. low_res: (fraction, seconds per half-size step) when the first low_res_end(total,
    fraction) steps train at half size; step_s is then a full-size step's time. Never fewer
    steps than already done plus one.
    """
    remaining = budget_s * (1.0 - RESERVE_FRACTION) - elapsed_s
    fraction, low_step_s = low_res or (0.0, step_s)
    # a half-size step has a quarter of the tokens: never count it below a sixteenth of a full one
    # (a noisy measurement must not make cost() shrink or the bracket below collapse)
    low_step_s = min(step_s, max(low_step_s, step_s / 16))

    def cost(total: int) -> float:  # seconds from now until a run of `total` steps has ended
        pending = max(0, evaluations(math.ceil(total / steps_per_epoch), eval_every) - evaluations_done)
        cheap = max(0, low_res_end(total, fraction) - steps_done)  # grows slower than total: monotone
        return (total - steps_done) * step_s - cheap * (step_s - low_step_s) + pending * eval_s_per_epoch

    # cost() only grows with `total`, so the longest run that fits is found by bisection (a fixed
    # point of steps -> epochs -> evaluations can oscillate when an epoch's end costs more than
    # its steps, as a checkpoint of a small model on a fast GPU does)
    low, high = steps_done + 1, steps_done + 1 + max(0, math.floor(remaining / min(step_s, low_step_s)))
    if cost(low) > remaining:
        return low
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if cost(middle) <= remaining else (low, middle - 1)
    return low


def ema_decay_for(total_steps: int, configured: float) -> float:
    """The configured EMA decay, shortened so the average spans at most the last ~10% of the run:
    on a short budget a long average would still carry the early, poor weights at the end."""
    return min(configured, 1.0 - 10.0 / max(total_steps, 20))
