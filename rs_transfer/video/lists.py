"""The list layout of SlowFast and mmaction2: one video per line, `path label`, in ROOT/train.csv and ROOT/val.csv
(or train.txt / val.txt, or the files named by data.train_list / data.val_list), with the class names in an
optional ROOT/classes.txt (or data.class_names_file).

The rules (docs/video.md "Your own videos"):
- A line is a path and a label, and the label is its last field: the text after the line's last comma, or, on a
  line without a comma, after its last run of spaces or tabs. SlowFast's "CSV" is space separated despite its name,
  mmaction2's list is `path label`, a spreadsheet's export is `path,label`; all read alike, and a path may hold
  spaces. Blank lines are skipped; a first line whose label reads `label` or `class` is a header.
- Paths are relative to data.root (an absolute one is used as it is). If more than half of a list's videos are
  missing, data.root is most likely not the folder the paths start from: an error naming the first. Fewer are left
  out with one warning giving the count and the first (copies of public datasets lack a few).
- An integer label is a class index counted from 0 (SlowFast, mmaction2). The names file gives the names, one per
  line in index order (or SlowFast's classids.json, {name: index}); without one, the names are the indices as text
  and the classes are 0 to the largest training label. A label that is not an integer is a class name: looked up
  in the names file, or, without one, the classes are the sorted names of the training list (as Kinetics' CSV).
- Validation labels must be training classes; mixing integers and names in one list without a names file, an
  index out of range and a malformed line are errors naming the file and line.
"""

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from rs_transfer.data.text import read_lines
from rs_transfer.errors import DataError

log = logging.getLogger(__name__)

LIST_SUFFIXES = (".csv", ".txt")
VIDEO_FILE_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov")  # the videos every layout reads (data.VIDEO_SUFFIXES)
NAMES_FILE = "classes.txt"
HEADER_LABELS = ("label", "class")
INTEGER = re.compile(r"-?[0-9]+")
KINETICS_HEADER = "label,youtube_id"


@dataclass(frozen=True)
class Row:
    """One line of a list: the video's path (data.root joined), its label as written, where it was written."""

    path: Path
    label: str
    file: Path
    line: int

    @property
    def where(self) -> str:
        return f"{self.file}, line {self.line}"


def resolve(root: Path, given: str | Path) -> Path:
    """A list or names file of the config: relative to data.root, as the paths inside the lists are."""
    return Path(root) / Path(given).expanduser()


def find_list(root: Path, split: str, given: str | None = None) -> Path | None:
    """The list file of `split`: `given` (data.train_list / data.val_list, relative to root), else ROOT/<split>.csv
    or ROOT/<split>.txt; None when there is none. Raises DataError when `given` does not exist or both defaults do
    (which one is meant cannot be told)."""
    if given is not None:
        path = resolve(root, given)
        if not path.is_file():
            raise DataError(f"video list not found: {path} (data.{split}_list; relative paths are under data.root)")
        return path
    found = [root / f"{split}{suffix}" for suffix in LIST_SUFFIXES if (root / f"{split}{suffix}").is_file()]
    if len(found) > 1:
        raise DataError(f"{found[0]} and {found[1]} are both video lists of the {split} split: give the one to read "
                        f"as data.{split}_list")
    return found[0] if found else None


def find_names_file(root: Path, given: str | None = None) -> Path | None:
    """data.class_names_file (relative to root; DataError when missing), else ROOT/classes.txt when there."""
    if given is not None:
        path = resolve(root, given)
        if not path.is_file():
            raise DataError(f"class names file not found: {path} (data.class_names_file; relative paths are under "
                            "data.root)")
        return path
    default = root / NAMES_FILE
    return default if default.is_file() else None


def read_list(path: Path, root: Path) -> list[Row]:
    """The rows of a list file. Raises DataError naming the file (and line) when it cannot be read, is Kinetics'
    annotation CSV, or has a line without both a path and a label."""
    lines = _read_text_lines(path, "video list")
    rows = []
    for number, text in enumerate(lines, start=1):
        text = text.strip()
        if not text:
            continue
        if not rows and text.lower().startswith(KINETICS_HEADER):
            raise DataError(f"{path} is Kinetics' annotation CSV (label,youtube_id,...), not a `path label` list: put "
                            f"it in {root / 'annotations'}/ with the videos in {root}/train/ and {root}/val/ "
                            "(docs/video.md)")
        video, label = split_line(text)
        # a path with a space and no label splits into "clips/take" + "0.mp4": a class named like a file
        if not video or not label or Path(label).suffix.lower() in VIDEO_FILE_SUFFIXES:
            raise DataError(f"{path}, line {number}: expected `path label` (the label is the last field, after the "
                            f"last comma or space), found {text!r}")
        if not rows and label.lower() in HEADER_LABELS:
            continue  # a header line
        rows.append(Row(root / video, label, path, number))
    return rows


def split_line(text: str) -> tuple[str, str]:
    """(path, label) of a stripped list line: the label after the last comma, or without a comma after the last
    run of whitespace; ("", "") for a line of one field."""
    if "," in text:
        video, _, label = text.rpartition(",")
    else:
        parts = text.rsplit(None, 1)
        video, label = parts if len(parts) == 2 else ("", "")
    return video.strip(), label.strip()


def read_class_names(path: Path) -> list[str]:
    """Class names in index order: one per line (blank lines at the end ignored), or a JSON file holding a list of
    names or SlowFast's {name: index} with the indices 0..N-1 each once. Raises DataError naming the file for an
    unreadable or empty file, a blank line between names, a repeated name or indices that are not 0..N-1."""
    if path.suffix.lower() == ".json":
        names = _json_names(path)
    else:
        lines = [line.strip() for line in _read_text_lines(path, "class names file")]
        while lines and not lines[-1]:
            lines.pop()
        if "" in lines:
            raise DataError(f"{path}, line {lines.index('') + 1} is blank: each line up to the last is one class "
                            "name, in index order (a blank line would shift the indices of the names after it)")
        names = lines
    if not names:
        raise DataError(f"{path} holds no class names: expected one per line, in index order")
    first = {}
    for number, name in enumerate(names, start=1):
        if name in first:
            raise DataError(f"{path}: class {name!r} is named twice (entries {first[name]} and {number})")
        first[name] = number
    return names


def _json_names(path: Path) -> list[str]:
    try:
        content = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError, RecursionError) as error:  # UnicodeDecodeError is a ValueError
        raise DataError(f"cannot read class names file {path}: {type(error).__name__}: {error}") from None
    if isinstance(content, list) and all(isinstance(name, str) for name in content):
        return [name.strip() for name in content]
    if isinstance(content, dict) and all(isinstance(i, int) for i in content.values()):
        if sorted(content.values()) != list(range(len(content))):
            raise DataError(f"{path}: the class indices must be 0 to {len(content) - 1}, each once")
        return [name.strip() for name, _ in sorted(content.items(), key=lambda item: item[1])]
    raise DataError(f"{path}: expected a JSON list of class names or an object {{name: index}} (SlowFast's "
                    "classids.json)")


def _read_text_lines(path: Path, what: str) -> list[str]:
    try:
        return read_lines(path)
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read {what} {path}: {type(error).__name__}: {error}") from None


def class_names_of(train: list[Row], names: list | None, names_file: Path | None) -> list[str]:
    """The class names: the names file's, or from the training labels (0..largest as text when they are all
    integers, else their sorted names). Raises DataError at the first line whose label is of the other kind
    (integer among names or the reverse) when there is no names file, or a negative label."""
    if names is not None:
        return names
    if not train:
        return []
    integer = bool(INTEGER.fullmatch(train[0].label))
    for row in train:
        if bool(INTEGER.fullmatch(row.label)) != integer:
            raise DataError(
                f"{row.where}: label {row.label!r} is {'not ' if integer else ''}an integer but {train[0].where} "
                f"has {train[0].label!r}: a list's labels are all class indices or all class names; to mix them, "
                f"give the names in index order in {train[0].file.parent / NAMES_FILE}")
        if integer and int(row.label) < 0:
            raise DataError(f"{row.where}: label {row.label} is out of range: class indices count from 0")
    if integer:
        return [str(i) for i in range(max(int(row.label) for row in train) + 1)]
    return sorted({row.label for row in train})


def labeller(names: list, from_file: Path | None, train_file: Path):
    """row -> the class index of its label among `names` (from `from_file`, or else from the training list
    `train_file`); the returned function raises DataError naming the row's file and line for an index out of range
    or an unknown name."""
    positions = {name: i for i, name in enumerate(names)}

    def label_index(row: Row) -> int:
        if INTEGER.fullmatch(row.label):
            index = int(row.label)
            if 0 <= index < len(names):
                return index
            source = (f"{from_file} names {len(names)} classes" if from_file is not None
                      else f"the labels of {train_file} go up to {len(names) - 1}; give every class's name, in index "
                           f"order, in {train_file.parent / NAMES_FILE} for more classes than they show")
            raise DataError(f"{row.where}: label {index} is out of range (0 to {len(names) - 1}): {source}")
        if row.label in positions:
            return positions[row.label]
        source = (f"is not one of the {len(names)} names in {from_file}" if from_file is not None
                  else f"has no training videos in {train_file}")
        raise DataError(f"{row.where}: class {row.label!r} {source}")

    return label_index


def read_splits(root: Path, splits, list_files: dict, names_file: str | None) -> tuple[dict, list]:
    """({split: [(video path, class index)]}, class names) of the list layout under `root`; the training split is
    always read (it gives the classes without a names file). `list_files`: {split: data.<split>_list} given in the
    config; `names_file`: data.class_names_file. Raises DataError naming the file (and line) for every problem of
    the module docstring, and for a split without a list or without videos."""
    files = {}
    for split in dict.fromkeys(("train", *splits)):
        files[split] = find_list(root, split, list_files.get(split))
        if files[split] is None:
            raise DataError(f"video list of the {split} split not found: expected {root / split}.csv or "
                            f"{root / split}.txt, or give data.{split}_list (`path label` per line)")
    rows = {split: read_list(file, root) for split, file in files.items()}
    for split, split_rows in rows.items():
        if not split_rows:
            raise DataError(f"{files[split]} lists no videos: expected one `path label` per line")
    names_path = find_names_file(root, names_file)
    names = class_names_of(rows["train"], read_class_names(names_path) if names_path else None, names_path)
    label_index = labeller(names, names_path, files["train"])
    labelled = {split: [(row, label_index(row)) for row in split_rows] for split, split_rows in rows.items()}
    warn_untaught_classes(names, [index for _, index in labelled["train"]], files["train"])
    videos = {}
    for split in files:
        videos[split] = [(row.path, index) for row, index in present(labelled[split], files[split], root)]
    return videos, names


def present(labelled: list, list_file: Path, root: Path) -> list:
    """The (Row, index) pairs whose video exists. Raises DataError naming the first missing video when more than
    half are missing (data.root is then most likely not the folder the paths start from); fewer are left out with
    one warning."""
    kept = [(row, index) for row, index in labelled if row.path.is_file()]
    missing = len(labelled) - len(kept)
    if not missing:
        return kept
    first = next(row for row, _ in labelled if not row.path.is_file())
    if 2 * missing > len(labelled):
        raise DataError(f"{first.where}: video not found: {first.path} ({missing} of the {len(labelled)} listed "
                        f"videos are missing: paths are relative to data.root={root}; is that the folder they start "
                        "from?)")
    log.warning("%s: %d of %d listed videos are missing and left out (the first: %s, line %d)", list_file, missing,
                len(labelled), first.path, first.line)
    return kept


def warn_untaught_classes(names: list, train_labels: list, train_file: Path) -> None:
    """Log the classes no training video has: each keeps its output, which nothing teaches. Labels starting at 1
    (UCF-101's own lists) show up here as class 0 without videos."""
    untaught = sorted(set(range(len(names))) - set(train_labels))
    if not untaught:
        return
    hint = " (labels counted from 1? class indices count from 0)" if untaught[0] == 0 and len(untaught) == 1 else ""
    log.warning("%s: %d of %d classes have no training video, the first %r%s: each keeps its output, which no "
                "video teaches", train_file, len(untaught), len(names), names[untaught[0]], hint)
