"""Listing folders and telling files from folders, with errors that name the path.

``Path.iterdir`` raises a bare ``PermissionError`` for an unreadable folder, and ``Path.is_file``
answers False for a dangling or looping symbolic link, so a broken slice link would be skipped
without a word. ``list_folder`` and ``path_kind`` turn both into a ``ValueError`` that names the
path; ``existing_file`` is the one check of readers that need a file before opening it.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Literal

PathKind = Literal["file", "folder"]

__all__ = ["existing_file", "list_folder", "path_kind"]


def list_folder(folder: Path, what: str) -> list[Path]:
    """The entries of ``folder`` (``what`` names it in errors, e.g. "slice folder").

    Raises:
        FileNotFoundError: ``folder`` does not exist.
        ValueError: ``folder`` is not a folder, or cannot be listed (permissions, a link loop).
    """
    try:
        return list(folder.iterdir())
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{what} {folder} does not exist") from error
    except NotADirectoryError as error:
        raise ValueError(f"{what} {folder} is a file, not a folder") from error
    except OSError as error:
        raise ValueError(f"cannot list {what} {folder}: {error.strerror or error}") from error


def path_kind(path: Path) -> PathKind | None:
    """What ``path`` names, following links: "file", "folder", or None when nothing is there.

    Raises ValueError naming ``path`` when it is a symbolic link whose target is missing or loops,
    when it cannot be examined (permissions), or when it is a device, pipe or socket.
    """
    try:
        mode = path.stat().st_mode
    except FileNotFoundError as error:
        if path.is_symlink():
            raise ValueError(
                f"{path} is a dangling symbolic link (its target {os.readlink(path)} does not exist)"
            ) from error
        return None
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise ValueError(f"{path} is a symbolic link loop") from error
        raise ValueError(f"cannot examine {path}: {error.strerror or error}") from error
    if stat.S_ISDIR(mode):
        return "folder"
    if stat.S_ISREG(mode):
        return "file"
    raise ValueError(f"{path} is neither a file nor a folder (a device, pipe or socket)")


def existing_file(path: str | os.PathLike) -> Path:
    """``path`` as a ``Path``; FileNotFoundError naming it when it is not a file (readers whose
    library would report a missing file as some other error call this first)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    return path
