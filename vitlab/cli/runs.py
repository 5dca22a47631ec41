"""`vitlab runs RUN_DIR...`: one table comparing training runs (recipe, model, length, best validation
top-1, training time, machine), or CSV for a spreadsheet."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "runs", help="compare run directories in one table (or CSV)",
        description="One row per run directory: training recipe, model preset and parameters, length (time "
                    "budget or epochs), finished epochs, best validation top-1 (model or EMA) and its epoch, "
                    "training time (the epochs' training steps, evaluation excluded) and the machine. A folder "
                    "of run directories stands for the runs in it. Folders that hold no run are skipped with a "
                    "note on stderr; a run still being written shows what it has so far.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (vitlab train --out), e.g. runs/*")
    p.add_argument("--csv", action="store_true", help="CSV on stdout instead of a table (raw numbers, seconds)")
    p.set_defaults(func=run)


def run(args) -> int:
    import sys

    from ..runs import NotARun, expand_run_dirs, format_csv, format_table, read_run
    from .errors import CLIError

    summaries = []
    for path in expand_run_dirs(args.run_dirs):
        try:
            summary = read_run(path)
        except NotARun as error:
            print(f"vitlab runs: skipped {error}", file=sys.stderr)
            continue
        except OSError as error:  # a folder we may not list, a file that vanished mid-read
            print(f"vitlab runs: skipped {path}: {error.strerror or error}", file=sys.stderr)
            continue
        for note in summary.notes:
            print(f"vitlab runs: note: {path}: {note}; its columns show what the other files say",
                  file=sys.stderr)
        summaries.append(summary)
    if not summaries:
        raise CLIError(f"none of the {len(args.run_dirs)} path(s) given is a vitlab run directory; pass "
                       f"vitlab train --out directories, e.g. vitlab runs runs/*")
    print(format_csv(summaries) if args.csv else format_table(summaries), end="" if args.csv else "\n")
    return 0
