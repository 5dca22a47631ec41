"""Running small tensor work on one CPU thread."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def one_cpu_thread(device: torch.device | str = "cpu"):
    """Runs the block with one intra-op thread on CPU. Batches and dataset bookkeeping are
    memory-bound work of a few hundred kilobytes to a few hundred megabytes: split over threads they
    gain little, and on a busy machine (training in the same process, other jobs) threads waiting
    for each other made them 3x (load_data) to 30x (a batch) slower than one thread. The thread
    count is process-wide: iterate a BatchLoader in the thread that trains, not a prefetch thread."""
    if torch.device(device).type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
