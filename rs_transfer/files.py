"""Writing result files so that a kill at any moment leaves the old file or the new one, never half of one.

Every file the toolkit writes (configs, metrics, tables, checkpoints, exported weights) goes through `atomic_open`:
the bytes go to a hidden temp file in the same folder (`.NAME.tmp.PID`), are flushed to disk, and the temp file is
renamed over NAME. A full disk or a read-only folder is one `FileWriteError` naming the file, with the old file
intact and the temp file removed; a temp file left by a killed writer is removed by `remove_stale_temp_files`
(called only by the holder of the folder's lock, `folder_lock`, so no live writer's temp file is ever removed).
JSON is written without NaN or Infinity, which are not JSON (other tools refuse to read them), and read back with
`read_json`: whatever a file holds (cut short, hand-edited, not JSON at all), reading it is one error naming it.
"""

import errno
import fcntl
import json
import math
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from rs_transfer.errors import DataError, UserError, WeightsError, one_line

TEMP_MARK = ".tmp."
LOCK_NAME = ".lock"


class FolderInUseError(UserError):
    """Another live process holds the folder's lock (`folder_lock`): a run, pseudo-labelling or predict writing
    there now. The message names the folder and the holder's host and pid."""


class FileWriteError(UserError):
    """The disk refused a write (full, read-only, no permission, a file in the way), or a value cannot be written
    (NaN in JSON). One class for every writer: checkpoints, result files, run folders, pseudo-label shards and the
    generated datasets of engine/write_once.py. The message names the file or folder."""


def make_dir(path: str | Path, what: str, hint: str = "") -> Path:
    """Create folder `path` (and its parents) if missing: the one way the toolkit makes a folder. Raises
    FileWriteError "cannot create WHAT PATH: reason" (+ `hint`) when the disk refuses (read-only, full, no
    permission) or a file is in the way (the reason then names that file, not the OS's "File exists")."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        in_the_way = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
        reason = f"{in_the_way} is a file, not a folder" if in_the_way else error.strerror or error
        raise FileWriteError(f"cannot create {what} {path}: {reason}{hint}") from None
    return path


@contextmanager
def folder_lock(folder: str | Path, what: str):
    """Hold FOLDER/.lock for the with-block: one live writer per folder (a run's output_dir, pseudo-label's --out,
    predict's --out). Creates the folder (`make_dir`).

    An advisory POSIX lock (`lockf`), so the OS releases it when the holder dies in any way (SIGKILL, node loss on a
    local disk): a killed run never leaves a stale lock, and `--resume` after a kill just works. The file keeps the
    holder's host, pid and start time for the message of whoever is refused; it is not deleted on release (deleting
    a lock file races with the next holder). NFS servers arbitrate POSIX locks between hosts (NLM / NFSv4). One
    process holds one folder once: a second `folder_lock` of the same folder in the same process is not refused.
    Raises FolderInUseError naming the folder and the holder, FileWriteError when the folder cannot be made or the
    lock file written or locked."""
    folder = make_dir(folder, what)
    path = folder / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise FileWriteError(f"cannot write {path}: {error.strerror or error}") from None
    try:
        try:
            # a POSIX record lock (lockf), not flock: forked DataLoader workers do not inherit it, so a SIGKILLed
            # run's folder is free at once, not when its orphaned workers exit
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as problem:
            if problem.errno not in (errno.EACCES, errno.EAGAIN):
                raise FileWriteError(f"cannot lock {path}: {problem.strerror or problem}") from None
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            raise FolderInUseError(f"{what} {folder} is in use by a live process ({holder}): wait for it to end, "
                                   "or use another folder") from None
        os.ftruncate(fd, 0)
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        os.pwrite(fd, f"host {socket.gethostname()}, pid {os.getpid()}, since {started}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def checkpoint_format(path: str | Path) -> str | None:
    """What a weights file is, from its first bytes: "zip" (torch.save since PyTorch 1.6, TorchScript),
    "pickle" (the legacy torch.save format), "safetensors" (an 8-byte header length, then a JSON header), or None
    for anything else (a text file, an image, an empty file). Reads 9 bytes; no torch. OSError when unreadable."""
    with open(path, "rb") as file:
        head = file.read(9)
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head.startswith(b"\x80") and len(head) > 1 and 2 <= head[1] <= 5:  # pickle's PROTO opcode and version
        return "pickle"
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    return None


ZIP_ENCRYPTED = 0x1  # general-purpose flag bit 0
MSDOS_DIRECTORY = 0x10  # external attribute bit: the entry is a folder


def zip_damage(path: str | Path) -> str | None:
    """What is wrong with torch.save zip `path` ("its record R fails its CRC-32 check", ...), or None when nothing is.

    torch.save writes a zip with a CRC-32 per record (one per tensor storage, plus the pickle), but torch.load never
    checks them: a bit flipped on disk or in a copy loads silently as different weights. The CRCs cover the bytes
    of the records, not the zip's directory entries, some of whose bits change what torch's reader returns without
    an error (a record marked a folder loads as zeros or as uninitialised memory): torch writes every record
    stored, unencrypted, as a file, so an entry marked otherwise is damage too. Reading every record once costs
    about 0.06 s per 100 MB. Raises OSError when the file cannot be read."""
    import zipfile
    import zlib

    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                encrypted = info.flag_bits & ZIP_ENCRYPTED
                if encrypted or info.external_attr & MSDOS_DIRECTORY or info.is_dir():
                    return f"its zip entry {info.filename} is marked {'encrypted' if encrypted else 'a folder'}"
            bad = archive.testzip()
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, ValueError, RuntimeError) as error:
        return f"it is not a readable zip ({type(error).__name__}: {error})"  # RuntimeError: zipfile's "encrypted"
    return None if bad is None else f"its record {bad} fails its CRC-32 check"


def temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}")


@contextmanager
def atomic_open(path: str | Path, mode: str = "w"):
    """Open a temp file beside `path` for writing ("w" text or "wb" bytes); on success it replaces `path`.

    Raises FileWriteError (one line: the file and the OS's reason) when the folder cannot be written or the disk
    fills; `path` is then untouched and no temp file is left.
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, mode) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        cause = os_error_in(error)
        if cause is None:
            raise
        raise FileWriteError(f"cannot write {path}: {cause.strerror or cause} (the previous file, if any, is "
                             "intact)") from None


def os_error_in(error: BaseException) -> OSError | None:
    """The OSError behind `error`, itself or in its chain of causes: torch's zip writer turns a full disk
    (ENOSPC) into a RuntimeError raised while handling the OSError."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def remove_stale_temp_files(folder: str | Path) -> list:
    """Delete temp files that killed writers left in `folder` (not this process's own); returns their paths."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    mine = f"{TEMP_MARK}{os.getpid()}"
    stale = [p for p in folder.glob(f".*{TEMP_MARK}*") if p.is_file() and not p.name.endswith(mine)]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_open(path, "w") as file:
        file.write(text)
    return Path(path)


def to_json(obj, indent: int | None = None, where: str = "") -> str:
    """`json.dumps` that refuses NaN and Infinity with a FileWriteError naming the key that holds one."""
    bad = _non_finite_key(obj)
    if bad is not None:
        raise FileWriteError(f"{where or 'JSON output'}: {bad} is not a finite number; NaN and Infinity are not "
                             "JSON, so the result was not written")
    return json.dumps(obj, indent=indent)


def atomic_write_json(path: str | Path, obj) -> Path:
    return atomic_write_text(path, to_json(obj, indent=2, where=str(path)) + "\n")


def read_json(path: str | Path, what: str):
    """The JSON value in `path` (any type: the caller checks the shape it expects). Raises DataError naming the file
    and `what` it should hold when it cannot be read, is not UTF-8 JSON (a write cut short, a hand edit), nests
    deeper than Python's recursion limit (RecursionError inside json) or holds an integer of over 4300 digits (a
    ValueError from int()): one `error:` line, never a traceback from inside json."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:  # JSONDecodeError, UnicodeDecodeError: ValueErrors
        reason = ("nested too deeply" if isinstance(error, RecursionError)
                  else "a number of over 4300 digits" if str(error).startswith("Exceeds the limit") else one_line(error))
        raise DataError(f"{path} is not readable JSON ({reason}); it should hold {what}") from None


def _non_finite_key(obj, key: str = "value") -> str | None:
    if isinstance(obj, float) and not math.isfinite(obj):
        return f"{key} = {obj}"
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return None
    for k, v in items:
        found = _non_finite_key(v, f"{key}[{k!r}]" if key != "value" else repr(k))
        if found:
            return found
    return None


def check_file(path: str | Path, what: str = "weights file", error: type[UserError] = WeightsError) -> str:
    """The format of weights file `path` ("zip" or "pickle": torch.save; "safetensors"), from its first bytes.

    Raises `error` (one line naming the file) when it is missing, unreadable, or neither format (a text file would
    otherwise fail inside torch.load as "KeyError: 101")."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} not found: {path}")
    try:
        kind = checkpoint_format(path)
    except OSError as problem:
        raise error(f"cannot read {what} {path}: {problem.strerror or problem}") from None
    if kind is None:
        raise error(f"cannot read {what} {path}: not a PyTorch checkpoint (torch.save: .pt, .pth, .bin) nor a "
                    "safetensors file")
    return kind
