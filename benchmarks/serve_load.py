"""`vitlab serve` under load on loopback: requests/s, p50/p99 latency and errors at several
concurrency levels, with batching on (--max-batch 32 --max-wait-ms 5) and off (--max-batch 1),
for the BENCHMARKS.md "Serving" section.

    python benchmarks/serve_load.py [CHECKPOINT] [--requests 320] [--concurrency 1,8,32]
                                    [--image docs/ship.png] [--max-batch 32] [--max-wait-ms 5]
                                    [--batching on,off] [--threads N] [--model-seconds 3]

CHECKPOINT defaults to the model vitlab ships. Each setting starts its own `vitlab serve` on a free
127.0.0.1 port; each concurrency level sends exactly --requests one-image POST /v1/predict
requests from that many clients on kept-alive connections (after an untimed warm-up round), then
the server is stopped with Ctrl-C (SIGINT). Before the servers start, the model alone is timed at
batch 1 and at --max-batch in this process: how much cheaper an image is inside a batch, the part of
batching's gain that comes from the arithmetic (the rest is per-pass overhead: Python dispatch and
the GIL shared with the event loop). Prints a table, then one JSON line with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

import vitlab
from vitlab.serve import default_threads

IMAGE = Path(__file__).resolve().parents[1] / "docs" / "ship.png"


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines()
                    if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def forward_ms_per_image(classifier, batch_size: int, threads: int, seconds: float) -> float:
    """Median milliseconds per image of Classifier.probabilities on a uint8 batch, called as the
    server calls it: same precision ("auto"), same intra-op threads, and from a thread other than
    the main one (on this busy 2-core machine the main thread's 2-thread passes ran about 25x
    slower than a worker's)."""
    shape = (batch_size, classifier.in_channels, *classifier.image_size)
    pixels = torch.randint(0, 256, shape, dtype=torch.uint8)

    def timed() -> float:
        classifier.probabilities(pixels)  # warm-up
        times: list[float] = []
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline or len(times) < 3:
            start = time.perf_counter()
            classifier.probabilities(pixels)
            times.append(time.perf_counter() - start)
        return 1000 * sorted(times)[len(times) // 2] / batch_size

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with ThreadPoolExecutor(max_workers=1) as worker:
            return worker.submit(timed).result()
    finally:
        torch.set_num_threads(previous)


class Server:
    """`vitlab serve` in a child process on a free loopback port; stopped with SIGINT on exit."""

    def __init__(self, checkpoint: str | None, max_batch: int, max_wait_ms: float, threads: int):
        command = [sys.executable, "-m", "vitlab", "serve", *([checkpoint] if checkpoint else []),
                   "--port", "0", "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms),
                   "--threads", str(threads)]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.output: list[str] = []
        for line in self.process.stdout:  # until the address line: the port is bound, the model loaded
            self.output.append(line)
            if found := re.search(r"http://\S+/", line):
                self.url = found[0]
                break
        else:
            raise RuntimeError(f"vitlab serve did not start:\n{''.join(self.output)}")
        # keep reading, so a chatty server never blocks on a full pipe
        threading.Thread(target=self.output.extend, args=(self.process.stdout,), daemon=True).start()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


async def load(url: str, body: bytes, requests: int, concurrency: int) -> dict:
    """Sends exactly `requests` requests from `concurrency` clients; latencies and errors."""
    latencies: list[float] = []
    batch_sizes: list[int] = []
    errors: list[str] = []
    remaining = requests
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        async def one() -> None:
            start = time.perf_counter()
            try:
                response = await client.post("v1/predict", files={"image": ("ship.png", body, "image/png")})
                if response.status_code == 200:
                    batch_sizes.append(response.json()["results"][0]["batch_size"])
                else:
                    errors.append(f"HTTP {response.status_code}: {response.text[:200]}")
            except httpx.HTTPError as error:
                errors.append(f"{type(error).__name__}: {error}")
            latencies.append(time.perf_counter() - start)

        async def client_loop() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1  # no await between the test and the decrement: no overshoot
                await one()

        await asyncio.gather(*(one() for _ in range(concurrency)))  # warm-up: connections, threads
        latencies.clear(), batch_sizes.clear()
        start = time.perf_counter()
        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    ms = sorted(1000 * t for t in latencies)
    return {
        "concurrency": concurrency, "requests": len(ms), "seconds": round(elapsed, 3),
        "requests_per_s": round(len(ms) / elapsed, 2),
        "p50_ms": round(ms[len(ms) // 2], 1), "p99_ms": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 1),
        "errors": len(errors), "first_error": errors[0] if errors else None,
        "mean_batch": round(sum(batch_sizes) / len(batch_sizes), 2) if batch_sizes else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?",
                        help="a run directory or .safetensors file (default: the shipped model)")
    parser.add_argument("--requests", type=int, default=320, help="requests per concurrency level")
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated client counts")
    parser.add_argument("--image", type=Path, default=IMAGE)
    parser.add_argument("--max-batch", type=int, default=32, help="the server's --max-batch with batching on")
    parser.add_argument("--max-wait-ms", type=float, default=5.0,
                        help="the server's --max-wait-ms with batching on")
    parser.add_argument("--batching", default="on,off", help="which servers to start: on, off or both")
    parser.add_argument("--threads", type=int, help="the server's --threads (default: its own default)")
    parser.add_argument("--model-seconds", type=float, default=3.0,
                        help="time spent timing the model alone, per batch size")
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    body = args.image.read_bytes()

    threads = args.threads or default_threads()
    classifier = vitlab.load(args.checkpoint)
    model_ms = {b: round(forward_ms_per_image(classifier, b, threads, args.model_seconds), 2)
                for b in (1, args.max_batch)}

    settings = {"on": (args.max_batch, args.max_wait_ms), "off": (1, 0.0)}
    rows, precision = [], None
    for batching in args.batching.split(","):
        max_batch, max_wait_ms = settings[batching]
        with Server(args.checkpoint, max_batch, max_wait_ms, threads) as server:
            precision = httpx.get(server.url + "v1/model", timeout=60).json()["precision"]
            for concurrency in levels:
                row = asyncio.run(load(server.url, body, args.requests, concurrency))
                rows.append({"batching": batching, "max_batch": max_batch, "max_wait_ms": max_wait_ms, **row})

    print(f"serve_load: {cpu_model()}, {threads} model thread{'s' if threads > 1 else ''}, "
          f"torch {torch.__version__}, "
          f"{precision}; {args.requests} requests per row, image {args.image.name}")
    batch_gain = model_ms[1] / model_ms[args.max_batch]
    print(f"model alone: {model_ms[1]:.1f} ms/image at batch 1, {model_ms[args.max_batch]:.1f} ms/image at "
          f"batch {args.max_batch} ({batch_gain:.2f}x cheaper in a batch)")
    print(f"{'batching':>8}  {'clients':>7}  {'req/s':>8}  {'p50 ms':>8}  {'p99 ms':>8}  {'errors':>6}  "
          f"{'mean batch':>10}")
    for r in rows:
        print(f"{r['batching']:>8}  {r['concurrency']:>7}  {r['requests_per_s']:>8.1f}  {r['p50_ms']:>8.1f}  "
              f"{r['p99_ms']:>8.1f}  {r['errors']:>6}  {r['mean_batch'] or 0:>10.2f}")
    speedup = {}
    if {r["batching"] for r in rows} == set(settings):
        rate = {(r["batching"], r["concurrency"]): r["requests_per_s"] for r in rows}
        speedup = {c: round(rate["on", c] / rate["off", c], 2) for c in levels}
        print("batching on / off, requests/s: " + ", ".join(f"{s:.2f}x at {c}" for c, s in speedup.items()))
    print(json.dumps({"cpu": cpu_model(), "threads": threads, "torch": torch.__version__,
                      "precision": precision, "checkpoint": args.checkpoint, "image": str(args.image),
                      "model_ms_per_image": model_ms, "model_batch_gain": round(batch_gain, 2),
                      "runs": rows, "speedup": speedup}))
    return 0 if all(r["errors"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
