"""Training config files: recipes, ``base:`` inheritance and the flat keys of older configs.

A recipe is a YAML file shipped in ``vessel_kit/configs/recipes/`` (so the offline Kaggle wheel has
it): a named starting point with a one-line ``description:``. ``vessel-kit recipes`` and
``list_recipes()`` list them. Any config (a recipe, a user's YAML, a dict) may start from another
with ``base:`` (``recipe:`` is an alias), and so on up a chain:

    base: synthetic_cpu          # a recipe name, or a YAML path (relative to the file saying it)
    data_root: demo_out/data
    crops: {crop_size: 96}       # the other crops.* options stay the recipe's
    optim: {lr: 1.0e-3}

The child wins. The sections ``model``, ``crops``, ``patches``, ``optim`` and ``infer`` merge
option by option; every other value, mappings included (``axes``, ``volume_weights``,
``model_kwargs``, ``loss``), is replaced whole, as a recipe's were before sections existed
(``model_kwargs: {}`` clears the recipe's). A cycle, an unknown recipe or ``base`` beside ``recipe`` is a ValueError.
An ensemble recipe lists ``members:`` (``members.py``), each merged over the recipe's other options
the same way; ``recipe_members`` names them.

Older configs set the section options at the top (``crop_size: 128``, ``lr: 1.0e-3``); they still
load, each file's flat keys moved into their section with one FutureWarning naming the new keys.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config_files import load_yaml_mapping

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

__all__ = ["LEGACY_KEYS", "SECTIONS", "list_recipes", "load_recipe", "merge_config", "recipe_members", "resolve_config"]

RECIPE_PACKAGE = "vessel_kit.configs.recipes"
SECTIONS = ("model", "crops", "patches", "optim", "infer")
# The flat options of older configs -> the section that holds them now.
LEGACY_KEYS: dict[str, str] = {
    **dict.fromkeys(("arch", "encoder", "encoder_weights", "in_chans", "model_kwargs", "normalization"), "model"),
    **dict.fromkeys(("crop_size", "axes", "foreground_fraction", "crops_per_epoch", "augment", "rotate_p",
                     "rotate_max_deg", "zoom_p", "zoom_range", "lowres_p", "intensity_p", "invert_p"), "crops"),
    **dict.fromkeys(("lr", "weight_decay", "max_grad_norm", "accumulate_steps", "ema_decay"), "optim"),
}
_YAML_SUFFIXES = (".yaml", ".yml")


def list_recipes() -> dict[str, str]:
    """Recipe name -> its one-line description, sorted by name."""
    return {name: str(_read_recipe(name).get("description", "")).strip() for name in sorted(_recipe_files())}


def recipe_members(name: str) -> list[str]:
    """The names of a recipe's ``members:`` (``members.py``), pseudo-label steps as
    ``name (pseudo)``; empty for a one-model recipe."""
    entries = load_recipe(name).get("members") or []
    return [f"{e.get('name')} (pseudo)" if "pseudo" in e else str(e.get("name")) for e in entries if isinstance(e, Mapping)]


def load_recipe(name: str) -> dict[str, Any]:
    """A recipe's options, with its bases merged in (``description`` dropped)."""
    return resolve_config({"base": name})


def resolve_config(values: Mapping[str, Any], *, origin: str | os.PathLike | None = None) -> dict[str, Any]:
    """``values`` with its ``base:`` chain merged in and flat keys moved into their sections.

    ``origin`` is the file ``values`` came from: relative base paths start from its folder (else
    from the working folder), and it is named in warnings and errors.
    """
    origin = None if origin is None else Path(origin)
    chain = () if origin is None else (str(origin.resolve()),)
    return _resolve(values, origin, str(origin or "training config"), chain)


def _resolve(values: Mapping[str, Any], origin: Path | None, where: str, chain: tuple[str, ...]) -> dict[str, Any]:
    values = dict(values)
    if "base" in values and "recipe" in values:
        raise ValueError(f"{where}: give base or recipe (an alias of base), not both")
    base = values.pop("base", values.pop("recipe", None))
    values.pop("description", None)
    values = _nest_legacy_keys(values, where)
    if base is None:
        return values
    key, parent, parent_origin, parent_where = _load_base(base, origin, where)
    if key in chain:
        names = [*chain[chain.index(key):], key]
        raise ValueError(f"{where}: base cycle: {' -> '.join(names)}")
    return merge_config(_resolve(parent, parent_origin, parent_where, (*chain, key)), values)


def _load_base(base: Any, origin: Path | None, where: str) -> tuple[str, dict[str, Any], Path | None, str]:
    """(identity for cycle detection, options, file, name for messages) of what ``base`` names."""
    if not isinstance(base, (str, os.PathLike)) or not str(base):
        raise ValueError(f"{where}: base must be a recipe name or a YAML path, got {base!r}")
    text = str(base)
    if text.endswith(_YAML_SUFFIXES) or "/" in text or os.sep in text:
        path = Path(text).expanduser()
        if not path.is_absolute() and origin is not None:
            path = origin.parent / path
        return str(path.resolve()), load_yaml_mapping(path, what="base config"), path, str(path)
    return f"recipe {text}", _read_recipe(text), None, f"recipe {text}"


def _nest_legacy_keys(values: dict[str, Any], where: str) -> dict[str, Any]:
    """``values`` with its flat section options moved into their sections, warning once."""
    flat = [key for key in values if key in LEGACY_KEYS]
    if not flat:
        return values
    warnings.warn(
        f"{where}: deprecated flat training options: "
        + ", ".join(f"{key} is now {LEGACY_KEYS[key]}.{key}" for key in flat),
        FutureWarning, stacklevel=5,
    )
    nested = {key: value for key, value in values.items() if key not in LEGACY_KEYS}
    for key in flat:
        section = LEGACY_KEYS[key]
        options = nested.setdefault(section, {})
        if not isinstance(options, Mapping):
            raise ValueError(f"{where}: training option {section} must be a mapping of options, got {options!r}")
        if key in options:
            raise ValueError(f"{where}: {key} and {section}.{key} are both given; keep {section}.{key}")
        nested[section] = {**options, key: values[key]}
    return nested


def merge_config(parent: Mapping[str, Any], child: Mapping[str, Any]) -> dict[str, Any]:
    """``child`` over ``parent``: sections merged option by option, other values replaced (as a
    config merges over its ``base:``, and a member over its recipe's shared options)."""
    merged = {**parent, **child}
    for section in SECTIONS:
        if isinstance(parent.get(section), Mapping) and isinstance(child.get(section), Mapping):
            merged[section] = {**parent[section], **child[section]}
    return merged


def _recipe_files() -> dict[str, Traversable]:
    folder = resources.files(RECIPE_PACKAGE)
    return {
        entry.name.rsplit(".", 1)[0]: entry
        for entry in folder.iterdir()
        if entry.is_file() and entry.name.endswith(_YAML_SUFFIXES)
    }


def _read_recipe(name: str) -> dict[str, Any]:
    files = _recipe_files()
    if name not in files:
        raise ValueError(f"unknown recipe {name!r}; recipes: {sorted(files)}")
    with resources.as_file(files[name]) as path:
        return load_yaml_mapping(path, what=f"recipe {name}")
