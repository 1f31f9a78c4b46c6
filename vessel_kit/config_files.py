"""Reading the YAML files at the edges (training configs, inference configs), with one-line errors.

Every YAML entry point goes through ``load_yaml_mapping``, so a missing file, a syntax error or a
file of the wrong shape reads the same everywhere: one line naming the file (and, for a syntax
error, the line and column), never a traceback from inside PyYAML.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

__all__ = ["load_yaml_mapping"]


def load_yaml_mapping(path: str | os.PathLike, *, what: str = "config") -> dict[str, Any]:
    """The mapping of options a YAML file holds; an empty file (or one of only comments) is ``{}``.

    Args:
        path: the YAML file.
        what: what the file is, for error messages (e.g. "training config").

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is a folder, unreadable or not UTF-8 text; a YAML syntax error, as
            one line ``PATH:LINE:COLUMN: problem``; a document that is not a mapping; a key that
            is not a string (``1:``, ``null:``, or YAML 1.1's ``yes:``/``on:``, read as True).
    """
    path = Path(path)
    try:
        values = yaml.safe_load(_read_text(path, what))
    except yaml.YAMLError as error:
        raise ValueError(_yaml_error_line(path, error)) from error
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(
            f"{path}: {what} must be a mapping of options (key: value lines), found a value of type "
            f"{type(values).__name__}"
        )
    for key in values:
        if not isinstance(key, str):
            raise ValueError(f"{path}: {what} keys must be strings, got {key!r} ({type(key).__name__})")
    return values


def _read_text(path: Path, what: str) -> str:
    """The UTF-8 text of ``path`` (a leading byte-order mark dropped), with errors naming it."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{what} {path} does not exist") from error
    except IsADirectoryError as error:
        raise ValueError(f"{what} {path} is a folder, not a file") from error
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: {what} must be UTF-8 text (byte {error.start} is not)") from error
    except OSError as error:
        raise ValueError(f"cannot read {what} {path}: {error.strerror or error}") from error


def _yaml_error_line(path: Path, error: yaml.YAMLError) -> str:
    """``PATH:LINE:COLUMN: problem`` (1-based) for a YAML error; ``PATH: problem`` when it has no position."""
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    problem = getattr(error, "problem", None) or str(error)
    context = getattr(error, "context", None)
    message = " ".join((f"{problem} ({context})" if context else problem).split())
    if mark is None:
        return f"{path}: {message}"
    return f"{path}:{mark.line + 1}:{mark.column + 1}: {message}"
