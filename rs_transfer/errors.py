"""The one exception type the CLI turns into a single `error: ...` line and exit code 2.

Anything a user can cause (a typo in a model name, a missing file, a checkpoint that does not fit) raises a
subclass of `UserError` with a message that names the file or key; everything else is a bug and keeps its traceback.
"""

import re
import signal

ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class UserError(Exception):
    pass


class DataError(UserError):
    """Input data that cannot be used as it is: a dataset folder, list, image, label, annotation, tar shard,
    shard index or video that is missing, unreadable or not in the layout or format its reader expects (also an
    evaluation set with nothing to measure, and a run folder `reproduce` reads that holds no result).

    The message names the file (or data.root) and what was expected. One class for every reader (pretraining
    folders and shards, the transfer tasks, Kinetics), so callers catch one type whatever the data.
    """


class WeightsError(UserError):
    """A weights file or name that cannot be used: missing, unreadable, corrupted, not a checkpoint, or not fitting
    the model (models/weights.py)."""


class StoppedBySignal(UserError):
    """A run saved a checkpoint and stopped because of a stop signal (SLURM preemption, torchrun shutdown).

    Not an input error: the CLI prints a `stopped:` line and exits with `exit_code`, 128 + the signal number (the
    shell's code for a process ended by that signal), so job scripts can tell it from a finished run.
    """

    def __init__(self, message: str, signal_name: str | None = None):
        super().__init__(message)
        self.exit_code = 128 + int(signal.Signals[signal_name or "SIGTERM"])


def one_line(error: BaseException | str) -> str:
    """A message as one clean line: ANSI colour codes removed, lines joined, runs of spaces collapsed.

    torch's loader errors arrive coloured and over several lines; an exception re-raised from a DataLoader worker
    carries the worker's whole traceback, of which only the original message (after the last frame) is kept.
    """
    text = ANSI_ESCAPE.sub("", str(error))
    if "Original Traceback (most recent call last)" in text:
        lines = [line for line in text.strip().splitlines() if line.strip()]
        last_frame = max(i for i, line in enumerate(lines) if line.startswith(" ") or line.startswith("Original"))
        text = " ".join(lines[last_frame + 1:]) or lines[-1]
        kind, sep, message = text.partition(": ")
        if sep and kind.split(".")[-1].isidentifier():
            text = message
    return " ".join(text.split())


def has_control_character(text: str) -> bool:
    """Whether `text` holds a control character (a newline, tab, escape, DEL). Paths, names and choices a user gives
    (config values, output folders on the command line) are one line of printable text: a newline in a folder name
    is folded into a space when YAML reads config.yaml back, and splits every log line that names the folder."""
    return any(ord(c) < 32 or c == "\x7f" for c in text)
