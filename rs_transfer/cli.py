"""The `rs-transfer` command (also `python -m rs_transfer`, which torchrun needs): parse, load config, call.

Each command group's parser sits beside its handler, in the module that owns the command (`add_command(commands)`
adds its subparsers, each with `run=` its handler): a package's commands.py, a light top-level module itself
(predict.py, evaluate.py), or X_command.py beside a module X.py that imports torch or the config system. This
file only assembles them (COMMANDS) and turns errors into one line. Those modules import nothing heavy until a
handler runs, so `rs-transfer --help` and `rs-transfer models` start fast, without torch. A `UserError` becomes one
`error:` line and exit code 2.
"""

import errno
import importlib
import logging
import os
import sys

from rs_transfer.errors import StoppedBySignal, UserError, one_line
from rs_transfer.options import OptionError, Parser, usage_error

COMMANDS = (  # "module" (its add_command) or "module:function", in the order of `rs-transfer --help`
    "rs_transfer.models.commands",  # models, info
    "rs_transfer.pretrain.commands",  # index, pretrain, pseudo-label
    "rs_transfer.video.commands",  # video train | eval
    "rs_transfer.downstream.commands",  # finetune, sweep, demo
    "rs_transfer.config_command",  # config show
    "rs_transfer.runs_command",  # runs
    "rs_transfer.predict",
    "rs_transfer.export_command",  # export
    "rs_transfer.evaluate",
    "rs_transfer.reproduce.commands",  # reproduce TABLE
    "rs_transfer.bench.commands",  # bench latency | table7 | flops | data | index | video-data
    "rs_transfer.reproduce.commands:add_scale_command",  # scale plan | run | report | suggest
)


def build_parser() -> Parser:
    parser = Parser(prog="rs-transfer", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for entry in COMMANDS:
        module, _, function = entry.partition(":")
        getattr(importlib.import_module(module), function or "add_command")(commands)
    return parser


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
    except OptionError as error:  # a nonsense number, from the `type=` checkers (options.py)
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    # `key=value` overrides may follow options (`finetune ... --resume train.steps=2`): argparse leaves those over
    if extra and hasattr(args, "overrides") and all("=" in item and not item.startswith("-") for item in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        command = [args.command, getattr(args, "video_command", None), getattr(args, "bench_command", None)]
        usage_error(" ".join(["rs-transfer", *filter(None, command)]), f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.run(args)
    except StoppedBySignal as stop:  # not an error: the run saved its checkpoint and can be resumed
        print(f"stopped: {one_line(stop)}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:  # Ctrl-C outside a run's steps (importing torch, building the model): no traceback
        print("stopped: Ctrl-C (outside a training run's steps: no checkpoint written)", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `rs-transfer models | head`: the reader has what it wanted (Python's docs, "Note on
        # SIGPIPE"): stdout goes to /dev/null so the interpreter's final flush raises nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except UserError as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    except OSError as error:  # the machine's answer (a full disk, a read-only or missing folder): not a bug
        if error.errno is None:
            raise
        where = f"{error.filename}: " if error.filename else ""
        print(f"error: {where}{error.strerror} (errno {errno.errorcode.get(error.errno, error.errno)})",
              file=sys.stderr)
        return 2
