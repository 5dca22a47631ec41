"""`vitlab bench`: training and inference speed of vitlab beside timm and the tutorial's model."""

from __future__ import annotations

from .arguments import positive_int


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="time training and inference against timm and the tutorial's model",
        description="Times a training step (forward, backward, AdamW) and inference for vitlab, "
                    "timm's VisionTransformer and the tutorial's model with the same weights, taking "
                    "turns round by round in one process; prints a table, then one JSON line.")
    p.add_argument("--preset", default="seed", help="model preset (see `vitlab models`; default seed)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per step (default 64)")
    p.add_argument("--precision", choices=["fp32", "bf16", "both", "auto"], default="auto",
                   help="auto (default): both where the device has native bf16, else fp32; "
                        "bf16 and both also run where bf16 is emulated (slowly)")
    p.add_argument("--rounds", type=positive_int, default=3, help="interleaved rounds; the best counts (default 3)")
    p.add_argument("--steps", type=positive_int, default=2, help="timed steps per model per round (default 2)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd vitlab and timm")
    p.add_argument("--device", default="auto", help="auto (default: cuda if available), cpu, cuda")
    p.add_argument("--matmul-size", type=positive_int, default=2048,
                   help="side of the square matmul that measures the peak (default 2048)")
    p.set_defaults(func=run)


def run(args) -> int:
    import sys

    from ..bench import BenchConfig, run_benchmark
    from ..precision import bf16_supported
    from ..runtime import resolve_device
    from .errors import CLIError

    if args.precision == "auto":
        precisions = ("fp32", "bf16") if bf16_supported(resolve_device(args.device)) else ("fp32",)
    elif args.precision == "both":
        precisions = ("fp32", "bf16")
    else:
        precisions = (args.precision,)
    if args.batch_size < 1 or args.rounds < 1 or args.steps < 1 or args.matmul_size < 1:
        raise CLIError("--batch-size, --rounds, --steps and --matmul-size must be positive")
    config = BenchConfig(preset=args.preset, batch_size=args.batch_size, precisions=precisions,
                         rounds=args.rounds, train_steps=args.steps, inference_steps=args.steps,
                         compile=args.compile, device=args.device, matmul_size=args.matmul_size)
    report = run_benchmark(config, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(report.table())
    print(report.to_json())
    return 0
