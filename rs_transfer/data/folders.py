"""Class-folder datasets (ImageNet's and Kinetics' `SPLIT/<class>/<files>` layout): which folders are classes."""

from pathlib import Path


def class_folders(split_dir: Path) -> list[str]:
    """The sorted names of the class folders in `split_dir`; hidden folders (.ipynb_checkpoints, .DS_Store-like
    tool folders) are left out. The sort order is the class index, as torchvision's ImageFolder and timm number
    them. Raises OSError (FileNotFoundError, NotADirectoryError) as `Path.iterdir` does: callers name the split."""
    return sorted(p.name for p in Path(split_dir).iterdir() if p.is_dir() and not p.name.startswith("."))
