"""argparse types for counts: a bad value is a one-line usage error (exit status 2) before any work,
never a batch size of -1 that classifies nothing and exits 0, or a top-k that fails deep in torch."""

from __future__ import annotations

import argparse


def _whole_number_at_least(minimum: int, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
    return value


def positive_int(text: str) -> int:
    """A whole number >= 1 (batch sizes, top-k, samples per class, image sizes)."""
    return _whole_number_at_least(1, text)


def non_negative_int(text: str) -> int:
    """A whole number >= 0 (seeds)."""
    return _whole_number_at_least(0, text)
