"""How much of an untrusted input vitlab reads into memory: per file, per image and in all.

Datasets and images are read into memory, never extracted. Without limits a 37 MB zip holding one
8 GiB member of zeros, or a 58 KB PNG of 60,000,000 x 1 pixels, costs gigabytes before anything
looks at it, and the process is killed without a word. Each limit here turns such an input into
one unreadable file (skipped and named, as a corrupt JPEG is) or a one-line error.

    VITLAB_MAX_IMAGE_MB   largest image file read (default 64); larger ones count as unreadable
    VITLAB_MAX_DATA_MB    most memory a dataset may take, read and decoded (default: half of the
                          machine's memory, or of a container's memory limit or this process's
                          address-space limit if lower)
"""

from __future__ import annotations

import math
import os

MB = 2**20
MAX_IMAGE_MB = 64  # ~20 times a 24-megapixel JPEG; the largest image file read unless changed
# The largest official batch file, CIFAR-100's `train`, is 155 MB; CIFAR batches are not images
# and get their own limit.
MAX_CIFAR_BATCH_BYTES = 256 * MB
FALLBACK_BUDGET = 8 * 2**30  # where the machine's memory cannot be asked
# a container's memory limit (cgroup v2, then v1): the machine's own memory overstates it
CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def _megabytes(variable: str) -> int | None:
    text = os.environ.get(variable, "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{variable} must be a positive number of megabytes, got {text!r}")
    return int(value * MB)


def max_image_bytes() -> int:
    """The largest image file vitlab reads: $VITLAB_MAX_IMAGE_MB megabytes, default 64."""
    return _megabytes("VITLAB_MAX_IMAGE_MB") or MAX_IMAGE_MB * MB


def memory_budget() -> int:
    """Bytes a dataset may take in memory: $VITLAB_MAX_DATA_MB, else half of the physical memory,
    of a container's memory limit or of this process's address-space limit (RLIMIT_AS), whichever
    is lowest."""
    given = _megabytes("VITLAB_MAX_DATA_MB")
    if given:
        return given
    limits = []
    for path in CGROUP_LIMITS:
        try:
            with open(path) as f:
                limits.append(int(f.read().strip()))  # "max" (no limit) fails here
            break
        except (OSError, ValueError):
            continue
    try:
        limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):  # not a POSIX system
        pass
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            limits.append(soft)
    except (ImportError, ValueError, OSError):
        pass
    return min(limits) // 2 if limits else FALLBACK_BUDGET


def read_at_most(stream, limit: int) -> bytes | None:
    """The stream's bytes, or None when it holds more than `limit`: never reads more than limit + 1,
    whatever a header claimed."""
    data = stream.read(limit + 1)
    return None if len(data) > limit else data


def describe_bytes(count: int) -> str:
    return f"{count / 2**30:.1f} GB" if count >= 2**30 else f"{count / MB:.0f} MB"
