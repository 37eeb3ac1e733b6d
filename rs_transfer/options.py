"""What every command's parser shares: one-line argument errors, `type=` checkers for numbers and paths that raise
OptionError naming the option, and the --config/--resume help texts. Standard library only, so each command
module's `add_command` (and `rs-transfer --help`) stays torch-free and fast.
"""

import argparse
import math
import sys

from rs_transfer.errors import UserError, has_control_character

CONFIG_HELP = "YAML config: a file, or a config shipped in the package by name, e.g. {example}"
RESUME_HELP = "continue the run in output_dir from its newest checkpoint (same as train.resume=auto)"


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: "error: MESSAGE (see rs-transfer COMMAND --help)" and exit code 2, for the
    top-level parser and every subcommand's (subparsers are made of the parent's class). --help is unchanged."""

    def error(self, message: str):
        usage_error(self.prog, message)


def add_run_option(parser) -> None:
    """--run RUN_DIR (also --run-dir), the finished run folder `predict`, `evaluate` and `export` read, as
    `args.run_dir`. --run-dir is the spelling torchrun lets through: its own parser takes `--run` for an abbreviation
    of its --run-path, anywhere on the line, and stops ("ambiguous option: --run could match --run-path")."""
    parser.add_argument("--run", "--run-dir", dest="run_dir", required=True,
                        help="a finished run folder (OUTPUT_DIR: config.yaml, weights.pth); under torchrun write "
                        "--run-dir (torchrun reads --run as its own --run-path)")


def usage_error(prog: str, message: str):
    print(f"error: {message} (see {prog} --help)", file=sys.stderr)
    raise SystemExit(2)


class OptionError(UserError):
    """A command-line option's value that makes no sense (a resolution of 0, a negative class count)."""


def whole(option: str, least: int):
    """An argparse `type=` for an integer option >= `least`; OptionError "OPTION must be ..." otherwise.

    A UserError (not argparse's ArgumentTypeError) so that main() turns it into its one `error:` line and returns
    2, like every other bad input; the option's name is given because argparse does not pass it to `type`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise OptionError(f"{option} must be a whole number >= {least}, got {text!r}") from None
        if value < least:
            raise OptionError(f"{option} must be at least {least}, got {value}")
        return value
    return parse


def out_path(option: str):
    """An argparse `type=` for a path the command writes (an output folder or file): one line of printable text;
    OptionError naming the option when it holds a control character (the rule config values follow: a newline in
    a folder name becomes a space when config.yaml is read back, another folder)."""
    def parse(text: str) -> str:
        if has_control_character(text):
            raise OptionError(f"{option} {text!r} holds a control character (a newline, tab, ...): a path is one "
                              "line of printable text")
        return text
    return parse


def positive_list(option: str, kind: type):
    """An argparse `type=` for a comma-separated list of positive numbers of `kind` (int or float), e.g. `200,400`;
    OptionError naming the option otherwise."""
    def parse(text: str) -> list:
        try:
            values = [kind(part) for part in text.split(",")]
        except ValueError:
            raise OptionError(f"{option} must be comma-separated {kind.__name__}s, e.g. "
                              f"{'200,400' if kind is int else '0.01,0.02'}; got {text!r}") from None
        if not all(value > 0 and math.isfinite(value) for value in values):
            raise OptionError(f"{option} values must be positive, got {text!r}")
        return values
    return parse


def real(option: str, low: float, high: float | None = None, open_low: bool = False):
    """An argparse `type=` for a finite float option in [low, high] ((low, high] with `open_low`; no upper bound
    when `high` is None); OptionError naming the option otherwise."""
    rule = f"{'>' if open_low else '>='} {low:g}" if high is None else f"in {'(' if open_low else '['}{low:g}, {high:g}]"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or (value <= low if open_low else value < low) or (high is not None and value > high):
            raise OptionError(f"{option} must be a number {rule}, got {text!r}")
        return value
    return parse


def with_resume(args) -> list:
    """The command's `key=value` overrides, plus train.resume=auto for --resume."""
    return [*args.overrides, "train.resume=auto"] if args.resume else list(args.overrides)
