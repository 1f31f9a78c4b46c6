"""Run folders of ``train``: decide, before anything is written, whether ``out_dir`` starts a new
run, resumes the same one, or must be refused.

A run folder holds ``config.yaml`` (the options, written when the run starts), ``state.pt`` (for
resuming), ``best.safetensors`` and ``last.safetensors``, ``metrics.jsonl`` and ``curves.png``.
Training into a folder that holds another run's files would silently replace its checkpoints and
append to its metrics, so ``claim_run_dir`` refuses that unless ``overwrite=True``.

A run that fails before its first epoch leaves only ``config.yaml``; such a folder is not a run
(no state, checkpoint or metrics) and counts as fresh, so a corrected config can start there.

Configs compare option by option, nested sections included (``model.encoder``), so a refusal
names the options that differ.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path

from .config_files import load_yaml_mapping

__all__ = ["IGNORED_KEYS", "MEMBERS_MANIFEST", "RUN_FILES", "claim_run_dir", "read_member_checkpoints", "read_members_manifest"]

# The files a training run writes; ``overwrite=True`` removes these and nothing else.
RUN_FILES = ("config.yaml", "state.pt", "best.safetensors", "last.safetensors", "metrics.jsonl", "curves.png")
# Options that do not change what a run computes: they may differ when it is resumed.
IGNORED_KEYS = frozenset({"resume", "progress", "num_workers", "out_dir", "cache_dir", "device", "compile"})
# A multi-member run (members.py) lists its finished members and its ensemble here.
MEMBERS_MANIFEST = "members.json"
_SHOWN_DIFFERENCES = 4


class _Absent:
    """A key one of two configs lacks (older config files have fewer options)."""

    def __repr__(self) -> str:
        return "(absent)"


_ABSENT = _Absent()


def claim_run_dir(
    out_dir: str | os.PathLike,
    config: Mapping[str, object],
    *,
    overwrite: bool = False,
    canonical: Callable[[Mapping[str, object]], Mapping[str, object]] | None = None,
) -> str:
    """"fresh" or "resume": what training with ``config`` (a ``TrainConfig.to_dict()``) into
    ``out_dir`` must do. Nothing is written, except that ``overwrite=True`` first removes the
    ``RUN_FILES`` a previous run left. ``canonical`` rewrites the stored ``config.yaml`` in the
    current form before comparing (the options of a run written by an older version).

    - absent, empty, or holding no run output (at most a ``config.yaml``): "fresh";
    - a run whose ``config.yaml`` equals ``config`` (ignoring ``IGNORED_KEYS``) and that has a
      ``state.pt``: "resume" (a ValueError when ``config`` says ``resume: false``);
    - a run with another config, with no ``config.yaml``, or with checkpoints but no
      ``state.pt``: ValueError naming the problem, suggesting ``--overwrite`` or another out_dir.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir {out_dir} is a file, not a folder")
    if overwrite:
        _remove_run_files(out_dir)
        return "fresh"
    outputs = _run_outputs(out_dir)
    if not outputs:
        return "fresh"
    refuse = "; train with --overwrite (overwrite=True) to replace it, or choose another out_dir"
    config_path = out_dir / "config.yaml"
    if not config_path.is_file():
        raise ValueError(f"{out_dir} holds run files ({', '.join(outputs)}) but no config.yaml: "
                         f"they are not known to be this run's{refuse}")
    differences = _differences(_read_config(config_path, canonical), _comparable(config))
    if differences:
        raise ValueError(f"{out_dir} holds a run with another config ({differences}){refuse}")
    if "state.pt" not in outputs:
        raise ValueError(f"{out_dir} holds {', '.join(outputs)} but no state.pt to resume from{refuse}")
    if config.get("resume") is False:
        raise ValueError(f"{out_dir} holds this run already and the config says resume: false{refuse}")
    return "resume"


def read_members_manifest(path: str | os.PathLike) -> dict:
    """A multi-member run's ``members.json`` (``members.py``) as a dict; {} when there is none."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} is not a readable members manifest ({error}); remove it or train with --overwrite") from None
    if not isinstance(values, dict) or not isinstance(values.get("checkpoints", []), list):
        raise ValueError(f"{path} is not a members manifest; remove it or train with --overwrite")
    return values


def read_member_checkpoints(run_dir: str | os.PathLike) -> list[Path] | None:
    """The ensemble checkpoints a multi-member run folder lists (None: not such a folder); a run
    not finished yet lists none, which is a ValueError."""
    path = Path(run_dir) / MEMBERS_MANIFEST
    if not path.is_file():
        return None
    files = [Path(run_dir) / name for name in read_members_manifest(path).get("checkpoints", [])]
    if not files:
        raise ValueError(f"{run_dir} is a multi-member run that has not finished (its {MEMBERS_MANIFEST} lists no "
                         "ensemble yet): train it to the end first")
    return files


def _run_outputs(out_dir: Path) -> list[str]:
    """The names of the files in ``out_dir`` that only a run that got going writes."""
    if not out_dir.is_dir():
        return []
    found = {"state.pt", "metrics.jsonl", "curves.png"} & {p.name for p in out_dir.iterdir()}
    found |= {p.name for p in out_dir.glob("*.safetensors")}
    return sorted(found)


def _remove_run_files(out_dir: Path) -> None:
    for name in RUN_FILES:
        (out_dir / name).unlink(missing_ok=True)


def _read_config(path: Path, canonical: Callable[[Mapping[str, object]], Mapping[str, object]] | None) -> dict:
    """The options a run folder's ``config.yaml`` holds, as compared."""
    try:
        values = load_yaml_mapping(path, what="run config")
    except ValueError as error:
        raise ValueError(f"{error}; remove it or train with --overwrite") from None
    return _comparable(canonical(values) if canonical else values)


def _comparable(config: Mapping[str, object]) -> dict:
    """``config`` without the ``IGNORED_KEYS``, as plain JSON values (tuples become lists, as
    they read back from YAML), nested mappings flattened to dotted keys."""
    kept = {key: value for key, value in config.items() if key not in IGNORED_KEYS}
    return _flatten(json.loads(json.dumps(kept)))


def _flatten(values: dict, prefix: str = "") -> dict:
    """``{"model": {"encoder": x}}`` as ``{"model.encoder": x}``; an empty mapping stays a value."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _differences(old: dict, new: dict) -> str:
    """The first few keys whose values differ, as ``key: old -> new``; "" when none."""
    keys = sorted(key for key in old.keys() | new.keys() if old.get(key, _ABSENT) != new.get(key, _ABSENT))
    shown = [f"{key}: {old.get(key, _ABSENT)!r} -> {new.get(key, _ABSENT)!r}" for key in keys[:_SHOWN_DIFFERENCES]]
    if len(keys) > _SHOWN_DIFFERENCES:
        shown.append(f"and {len(keys) - _SHOWN_DIFFERENCES} more")
    return "; ".join(shown)
