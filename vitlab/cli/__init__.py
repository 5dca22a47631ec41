"""The `vitlab` command. Each subcommand lives in its own module under vitlab/cli/ and exposes
`register(subparsers)`; heavy imports (torch, data) happen inside the command, so
`vitlab --help` stays instant."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# module name under vitlab.cli for each subcommand, in the order `vitlab --help` lists them
COMMAND_MODULES = ["models", "train", "eval", "predict", "attention", "summary", "export", "data", "bench", "embed"]


from .errors import CLIError  # noqa: F401  (re-exported: vitlab.cli.CLIError)


def build_parser() -> argparse.ArgumentParser:
    from ..version import __version__

    parser = argparse.ArgumentParser(
        prog="vitlab", description="Train, evaluate and use Vision Transformers."
    )
    parser.add_argument("--version", action="version", version=f"vitlab {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except (CLIError, ValueError, FileNotFoundError) as error:
        print(f"vitlab {args.command}: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader went away (`vitlab predict ... | head`): stop quietly, as Unix tools do;
        # stdout now points at /dev/null so the interpreter's final flush cannot fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
