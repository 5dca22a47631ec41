"""The `vitlab` command. Each subcommand lives in its own module under vitlab/cli/ and exposes
`register(subparsers)`; heavy imports (torch, data) happen inside the command, so
`vitlab --help` stays instant."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# module name under vitlab.cli for each subcommand, in the order `vitlab --help` lists them
COMMAND_MODULES = ["models", "train", "runs", "eval", "predict", "attention", "summary", "export", "data", "bench", "embed", "serve"]


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
    # VITLAB_DEBUG=1 lets every error through with its traceback, for a bug report
    debug = os.environ.get("VITLAB_DEBUG", "") not in ("", "0")
    prefix = f"vitlab {args.command}: error:"
    try:
        return args.func(args) or 0
    except BrokenPipeError:
        # the reader went away (`vitlab predict ... | head`): stop quietly, as Unix tools do;
        # stdout now points at /dev/null so the interpreter's final flush cannot fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (CLIError, ValueError, FileNotFoundError) as error:
        if debug:
            raise
        print(f"{prefix} {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"vitlab {args.command}: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        if debug:
            raise
        print(f"{prefix} out of memory; use a smaller --batch-size or --image-size, or a machine with "
              f"more memory", file=sys.stderr)
        return 1
    except OSError as error:  # a full disk, a permission, a vanished file: the system's words say it
        if debug:
            raise
        print(f"{prefix} {_one_line(error)}", file=sys.stderr)
        return 1
    except Exception as error:  # noqa: BLE001 - the last resort: a bug, reported in one line
        if debug:
            raise
        print(f"{prefix} {type(error).__name__}: {_one_line(error)} (unexpected: rerun with VITLAB_DEBUG=1 "
              f"for the traceback and report it)", file=sys.stderr)
        return 1


def _one_line(error: BaseException) -> str:
    """The first non-empty line of an error's message (library messages can run to pages)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
