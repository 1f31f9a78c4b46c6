"""Config dataclasses from YAML mappings: unknown keys and wrongly typed values as one-line
ValueErrors that name the option (``epochs: ten``, ``crops: {size: 64}``) and list the valid ones.

Types are read from the dataclass annotations (written as strings, ``from __future__ import
annotations``): plain scalars, ``dict``, ``list`` and ``tuple``, each possibly ``| None``, are
checked; other annotations (``Mapping[...]``, nested configs) are left to the class.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any, TypeVar

__all__ = ["check_option_types", "section_from_mapping"]

T = TypeVar("T")

_SCALAR_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "dict": (dict,),
                 "list": (list,)}


def check_option_types(cls: type, values: Mapping[str, Any], *, prefix: str = "") -> None:
    """Raise ValueError naming the first option of ``values`` whose value does not have the type
    its ``cls`` field declares (a bool is not an int; an int is a float)."""
    for item in fields(cls):
        if item.name not in values:
            continue
        declared = [part.strip() for part in str(item.type).split("|")]
        kinds = [part.split("[")[0] for part in declared]
        if not set(kinds) <= {*_SCALAR_TYPES, "None", "tuple"}:
            continue
        value = values[item.name]
        if value is None and "None" in kinds:
            continue
        accepted = tuple(t for kind in kinds if kind in _SCALAR_TYPES for t in _SCALAR_TYPES[kind])
        if "tuple" in kinds:
            accepted += (tuple, list)
        if not isinstance(value, accepted) or (isinstance(value, bool) and "bool" not in kinds):
            raise ValueError(f"training option {prefix}{item.name} must be {item.type}, got {value!r}")


def section_from_mapping(cls: type[T], values: Any, *, prefix: str, exclude: Mapping[str, str] | None = None) -> T:
    """``cls(**values)`` for a config section given as a mapping, after checking its keys and
    their types; ``prefix`` (e.g. "crops.") names the section in errors. ``exclude`` maps fields
    that the section may not set to the reason (e.g. where they are set instead)."""
    if not isinstance(values, Mapping):
        raise ValueError(f"training option {prefix.rstrip('.')} must be a mapping of options, got {values!r}")
    exclude = exclude or {}
    for name, reason in exclude.items():
        if name in values:
            raise ValueError(f"training option {prefix}{name}: {reason}")
    valid = sorted(f.name for f in fields(cls) if f.name not in exclude)
    unknown = sorted(set(values) - set(valid), key=str)
    if unknown:
        raise ValueError(
            f"unknown training options {[f'{prefix}{name}' for name in unknown]}; "
            f"valid options: {[prefix + name for name in valid]}"
        )
    check_option_types(cls, values, prefix=prefix)
    return cls(**values)
