"""Text files as datasets ship them: UTF-8 with or without a byte-order mark (Windows tools write one), and
any line ending (\\n, \\r\\n, \\r). Every list, CSV and label file of every task is read through here."""

import csv
from pathlib import Path

ENCODING = "utf-8-sig"  # UTF-8; a leading BOM is dropped instead of becoming part of the first name


def read_lines(path: str | Path) -> list[str]:
    """The lines of `path` without their endings (blank lines kept; callers skip them).

    Raises OSError when the file cannot be read and UnicodeDecodeError when it is not UTF-8.
    """
    return Path(path).read_text(encoding=ENCODING).splitlines()


def open_csv(path: str | Path):
    """An open text file for `csv.reader` / `csv.DictReader`: BOM dropped, line endings left to the csv module."""
    return open(path, encoding=ENCODING, newline="")


def dict_rows(path: str | Path) -> tuple[list, list]:
    """(column names, rows as dicts) of a CSV file with a header line."""
    with open_csv(path) as file:
        reader = csv.DictReader(file)
        return list(reader.fieldnames or ()), list(reader)
