"""Data pipeline speed on this machine: decoding the shared 50,000-image archive (first time and
from the cache) and augmented-batch throughput per preset, against the small model's bf16
training throughput (the loader should feed at least 5x that).

    python benchmarks/bench_data.py [--archive PATH] [--batch-size 128] [--seconds 5] [--small-steps 4]

Prints a table, then one JSON line with every figure.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from vitlab.data import BatchLoader, augment_preset, load_data
from vitlab.data.cpu import one_cpu_thread

ARCHIVE = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "cifar10-jpeg-train.tar.gz"


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def loader_throughput(splits, preset: str, batch_size: int, seconds: float, **overrides) -> float:
    """Images per second the training loader yields, timed over whole batches for ~`seconds`."""
    loader = BatchLoader(splits.train, batch_size, mean=splits.mean, std=splits.std, train=True,
                         augment=augment_preset(preset, **overrides))
    batches = iter(loader)
    next(batches)  # first batch builds the policy and warms the allocator
    images, start = 0, time.perf_counter()
    for x, _ in batches:
        images += x.shape[0]
        if time.perf_counter() - start > seconds:
            break
    return images / (time.perf_counter() - start)


def _policy_per_image(args):
    images, seed = args
    from vitlab.data.augment import AugmentConfig, apply_policy, build_policy

    torch.default_generator.manual_seed(seed)
    return apply_policy(images, build_policy(AugmentConfig(policy="randaugment")), chunk=1)


def policy_throughput(splits, batch_size: int, seconds: float, workers: int) -> float:
    """RandAugment alone, every image its own draw: in this process (workers=0) or split over a
    pool of worker processes, as a DataLoader would. img/s."""
    import multiprocessing

    batches = (splits.train.images[i:i + batch_size] for i in range(0, len(splits.train), batch_size))
    pool = multiprocessing.get_context("fork").Pool(workers, torch.set_num_threads, (1,)) if workers else None
    try:
        def run(batch, seed):
            if pool is None:
                with one_cpu_thread():
                    return _policy_per_image((batch, seed))
            per_worker = math.ceil(len(batch) / workers)
            return torch.cat(pool.map(_policy_per_image, [(batch[i:i + per_worker], seed + i)
                                                          for i in range(0, len(batch), per_worker)]))

        run(next(batches), 0)  # warm-up (and worker start-up)
        images, start = 0, time.perf_counter()
        for seed, batch in enumerate(batches):
            images += run(batch, seed).shape[0]
            if time.perf_counter() - start > seconds:
                break
        return images / (time.perf_counter() - start)
    finally:
        if pool is not None:
            pool.close()


def small_training_throughput(batch_size: int, steps: int) -> float:
    """The small preset's training speed (forward + backward + AdamW step, bf16 autocast), img/s."""
    import vitlab

    model = vitlab.create_model("small")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = torch.randn(batch_size, 3, 32, 32), torch.randint(0, 10, (batch_size,))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archive", type=Path, default=ARCHIVE)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=5.0, help="timing window per preset")
    parser.add_argument("--small-steps", type=int, default=4, help="training steps timed for the small model")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        splits = load_data(args.archive, cache_dir=cache)
        decode_first = time.perf_counter() - start
        start = time.perf_counter()
        splits = load_data(args.archive, cache_dir=cache)
        decode_cached = time.perf_counter() - start

    results = {"decode_first_s": round(decode_first, 2), "decode_cached_s": round(decode_cached, 2)}
    for preset in ("none", "light", "strong"):
        results[f"loader_{preset}_img_s"] = round(loader_throughput(splits, preset, args.batch_size, args.seconds))
    # the per-sample policy alone, with every image its own draw vs chunks of 16 sharing one
    for chunk in (1, 16):
        results[f"loader_randaugment_chunk{chunk}_img_s"] = round(loader_throughput(
            splits, "light", args.batch_size, args.seconds, policy="randaugment", policy_chunk=chunk))
    for workers in (0, 2):
        results[f"randaugment_only_{workers}_workers_img_s"] = round(
            policy_throughput(splits, args.batch_size, args.seconds, workers))
    results["small_train_bf16_img_s"] = round(small_training_throughput(args.batch_size, args.small_steps), 1)
    slowest = min(results[f"loader_{p}_img_s"] for p in ("none", "light", "strong"))
    results["slowest_preset_over_small_training"] = round(slowest / results["small_train_bf16_img_s"], 1)
    results.update(cpu=cpu_model(), threads=torch.get_num_threads(), torch=torch.__version__,
                   batch_size=args.batch_size, images=len(splits.train) + len(splits.val),
                   date=time.strftime("%Y-%m-%d"))

    print(f"{results['cpu']}, {results['threads']} threads, torch {results['torch']}, batch {args.batch_size}")
    print(f"decode {results['images']:,} images: first {decode_first:.1f} s, from cache {decode_cached:.2f} s")
    print(f"{'loader':32}{'img/s':>10}")
    for key, value in results.items():
        if key.startswith(("loader_", "randaugment_only")):
            print(f"{key.removeprefix('loader_')[:-6]:32}{value:>10,}")
    print(f"{'small model training (bf16)':32}{results['small_train_bf16_img_s']:>10,}")
    print(f"slowest preset / small training: {results['slowest_preset_over_small_training']}x")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
