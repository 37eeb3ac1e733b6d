"""`rs-transfer runs FOLDER` and `runs --diff RUN_A RUN_B`: the parser and handler of runs.py's command.

Apart from runs.py because that module imports the config system (omegaconf), and every parser stays light so
that `rs-transfer --help` starts fast.
"""

import json

from rs_transfer.errors import UserError


def add_command(commands) -> None:
    """The `runs` subcommand on cli.py's subparsers."""
    runs = commands.add_parser("runs", help="list the runs under a folder: task, backbone, metric, wall time; or "
                               "--diff two runs' configs")
    runs.add_argument("folder", nargs="?", help="searched recursively for run folders (those holding config.yaml)")
    runs.add_argument("--diff", nargs=2, metavar=("RUN_A", "RUN_B"),
                      help="the config keys whose values differ between two run folders, and what each changes")
    runs.add_argument("--sort", choices=("metric", "time", "name"), default="metric",
                      help="metric (highest first, default), time (longest first) or name")
    runs.add_argument("--json", action="store_true", help="print JSON for scripts")
    runs.set_defaults(run=run_command)


def run_command(args) -> int:
    from rs_transfer.runs import MISSING, config_differences, find_runs, format_differences, format_runs, sort_runs

    if (args.folder is None) == (args.diff is None):
        raise UserError("rs-transfer runs: give a FOLDER to list, or --diff RUN_A RUN_B")
    if args.diff:
        rows = config_differences(*args.diff)
        if args.json:
            print(json.dumps([{"key": k, "a": None if a is MISSING else a, "b": None if b is MISSING else b,
                               "kind": kind} for k, a, b, kind in rows], indent=2))
        else:
            print(format_differences(rows, *args.diff))
        return 0

    rows = sort_runs(find_runs(args.folder), args.sort)
    if args.json:
        print(json.dumps(rows, indent=2))
    elif rows:
        print(format_runs(rows))
    else:
        print(f"no runs under {args.folder} (a run folder holds config.yaml)")
    return 0
