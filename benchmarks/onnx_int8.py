"""int8 ONNX against fp32 ONNX and PyTorch fp32: size, images per second at batch 1 and 64, and
validation top-1 of each, for the shipped model (or any checkpoint).

    python benchmarks/onnx_int8.py [--checkpoint PATH] [--data ARCHIVE] [--threads 2,1] [--repeats 5] [--seconds 2]

Exports fp32 and int8 ONNX with vitlab.export_model (the int8 export runs its own accuracy check
on the checkpoint's validation split of --data, which gives the two ONNX top-1 figures), scores
PyTorch on the same images (vitlab.evaluate, the fp32 network `vitlab predict --precision fp32`
runs), then times each model: per batch size, one warm-up call, then --repeats timings of about
--seconds each; the median is reported, since other work on a shared machine slows some timings.
Each thread count in --threads (default: all cores, then 1) is timed for both runtimes: with every
core in use, a busy machine's other work stalls the threads that wait on each other, PyTorch's
OpenMP threads worst of all, so one thread is the steadier comparison there. Prints a table, then
one JSON line with every figure.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ARCHIVE = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "cifar10-jpeg-train.tar.gz"


def cpu_features() -> list[str]:
    """Which of the instruction sets that matter here the CPU has (/proc/cpuinfo flags)."""
    from vitlab.precision import cpu_flags

    return sorted(cpu_flags() & {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8"})


def images_per_second(run, batch: np.ndarray, repeats: int, seconds: float) -> tuple[float, list[float]]:
    """Median img/s over `repeats` timings, each of as many calls as fit in ~`seconds`."""
    run(batch)  # warm-up: first-call allocation and kernel selection
    start = time.perf_counter()
    run(batch)
    calls = max(1, int(seconds / max(time.perf_counter() - start, 1e-6)))
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            run(batch)
        rates.append(calls * batch.shape[0] / (time.perf_counter() - start))
    return statistics.median(rates), rates


def main(argv: list[str] | None = None) -> int:
    import onnxruntime

    import vitlab
    from vitlab.data import BatchLoader
    from vitlab.evaluate import evaluate
    from vitlab.export import export_model, validation_images
    from vitlab.runtime import cpu_name

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="run directory or .safetensors file (default: the shipped model)")
    parser.add_argument("--data", default=str(ARCHIVE), help="labelled data whose validation split is scored")
    parser.add_argument("--batch-sizes", default="1,64")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0, help="length of one timing")
    parser.add_argument("--threads", help="thread counts to time, comma-separated (default: all cores, then 1)")
    args = parser.parse_args(argv)
    sizes = [int(n) for n in args.batch_sizes.split(",")]
    cores = torch.get_num_threads()
    thread_counts = [int(n) for n in args.threads.split(",")] if args.threads else sorted({cores, 1}, reverse=True)

    classifier = vitlab.load(args.checkpoint, precision="fp32")
    network = classifier.inference_network()
    with tempfile.TemporaryDirectory() as tmp:
        fp32_path, int8_path = Path(tmp) / "model.onnx", Path(tmp) / "model.int8.onnx"
        start = time.perf_counter()
        export_model(classifier, fp32_path)
        int8 = export_model(classifier, int8_path, quantize="int8", data=args.data, progress=True)
        export_s = time.perf_counter() - start
        images, split = validation_images(classifier, args.data)
        loader = BatchLoader(images, 500, mean=classifier.mean, std=classifier.std, train=False)
        pytorch_top1 = evaluate(network, loader, len(classifier.class_names), progress=True).top1
        models = {"onnx_fp32": fp32_path.read_bytes(), "onnx_int8": int8_path.read_bytes()}
    sizes_bytes = {name: len(data) for name, data in models.items()}

    def torch_runner(threads):
        torch.set_num_threads(threads)

        def run(x):
            with torch.no_grad():
                return network(torch.from_numpy(x))
        return run

    def onnx_runner(data):
        def make(threads):
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
            session = onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])
            return lambda x: session.run(["logits"], {"images": x})[0]
        return make

    # One runtime at a time, the others' thread pools gone: ONNX Runtime's threads spin for a
    # while after each call and would take the cores from PyTorch's if both lived at once.
    runs = {"pytorch_fp32": torch_runner, **{name: onnx_runner(data) for name, data in models.items()}}
    parameters = sum(p.numel() for p in classifier.model.parameters())
    report = {
        "date": time.strftime("%Y-%m-%d"), "cpu": cpu_name(), "cores": cores, "threads": thread_counts,
        "cpu_features": cpu_features(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(), "model": args.checkpoint or "shipped (vit-lite-cifar10)",
        "parameters": parameters, "data": args.data, "split": split, "val_images": len(images.labels),
        "repeats": args.repeats, "seconds_per_timing": args.seconds, "export_seconds": round(export_s, 1),
        "size_bytes": {"pytorch_fp32": parameters * 4, **sizes_bytes},
        "val_top1": {"pytorch_fp32": pytorch_top1, "onnx_fp32": int8.accuracy["fp32_top1"],
                     "onnx_int8": int8.accuracy["int8_top1"]},
        "img_per_s": {}, "img_per_s_all": {},
    }
    rng = np.random.default_rng(0)
    height, width = classifier.image_size
    batches = {n: rng.standard_normal((n, classifier.in_channels, height, width)).astype(np.float32) for n in sizes}
    for threads in thread_counts:
        for name, make in runs.items():
            run = make(threads)
            for batch_size, batch in batches.items():
                median, rates = images_per_second(run, batch, args.repeats, args.seconds)
                key = f"{threads}t_b{batch_size}"  # e.g. 2t_b64: 2 threads, batch 64
                report["img_per_s"].setdefault(name, {})[key] = round(median, 1)
                report["img_per_s_all"].setdefault(name, {})[key] = [round(r, 1) for r in rates]
            del run
    torch.set_num_threads(cores)

    print(f"onnx_int8: {report['cpu']}, {report['cores']} cores, {', '.join(report['cpu_features'])}; "
          f"torch {report['torch']}, onnxruntime {report['onnxruntime']}; {report['model']}; "
          f"img/s: median of {args.repeats} timings")
    keys = [f"{t}t_b{n}" for t in thread_counts for n in sizes]
    header = ["model", "size MB", *[f"img/s {t} thr, batch {n}" for t in thread_counts for n in sizes],
              f"val top-1 ({len(images.labels):,} {split})"]
    rows = [[name, f"{report['size_bytes'][name] / 1e6:.1f}",
             *[f"{report['img_per_s'][name][key]:,.1f}" for key in keys], f"{report['val_top1'][name]:.2%}"]
            for name in runs]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
