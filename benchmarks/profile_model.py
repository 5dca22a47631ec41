"""Where a training step or a forward pass spends its time: torch.profiler tables for vitlab and
timm side by side (same weights, same batch), for the BENCHMARKS.md "Model speed" section.

    python benchmarks/profile_model.py [--preset seed] [--batch-size 64] [--precision bf16]
                                       [--what train|inference] [--rows 15]

bf16 means: training under autocast for both; inference under autocast for timm and through
vitlab.inference_model (bf16 weights) for vitlab, as `vitlab bench` measures them.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from vitlab.bench import BenchConfig, build_contenders, build_models, inference_step, train_step
from vitlab.model import to_2tuple
from vitlab.presets import preset_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="seed")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--what", choices=["train", "inference"], default="train")
    parser.add_argument("--rows", type=int, default=15)
    args = parser.parse_args()

    torch.manual_seed(0)
    config = preset_config(args.preset)
    device = torch.device("cpu")
    models = build_models(config)
    models.pop("seed", None)
    bench = BenchConfig(preset=args.preset, batch_size=args.batch_size, precisions=(args.precision,))
    images = torch.randn(args.batch_size, config.in_channels, *to_2tuple(config.image_size))
    targets = torch.randint(0, config.num_classes, (args.batch_size,))
    for contender in build_contenders(models, bench, device):
        if args.what == "train":
            def step():
                train_step(contender, images, targets, device)
        else:
            def step():
                inference_step(contender, images, device)
        step()  # warm-up: optimizer state, oneDNN kernel selection
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        mode = contender.train_mode if args.what == "train" else contender.inference_mode
        print(f"\n### {contender.name}, {args.what}, {args.precision} ({mode}), preset {args.preset}, "
              f"batch {args.batch_size}\n")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows,
                                        max_name_column_width=36))


if __name__ == "__main__":
    main()
