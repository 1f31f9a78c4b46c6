"""``InferConfig``: every inference setting in one frozen, validated, YAML-friendly object.

It is the one schema of inference options: the Python API (``Predictor``, ``infer_volume``,
``predict_submission``), the CLI (``vessel-kit infer`` flags are generated from its fields),
``configs/infer/*.yaml``, the Kaggle bundle's manifest and the inference notebook all go through
``InferConfig.from_dict``, so an unknown or bad option gets the same one error everywhere.

What is per volume (the volume, its voxel size, a deadline, where the accumulator or the mask
goes) is not in the config: those are arguments of ``Predictor.logits`` / ``predict``.

Presets ship in ``vessel_kit/configs/infer/`` (``list_infer_presets``); ``InferConfig.load``
takes a preset name or a YAML path.

Example::

    config = InferConfig(axes=("xy",), tta="none", tile_size=256)
    config = InferConfig.load("fast").replace(threshold=0.3)
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from .axes import AXES
from .hull import HullGate
from .infer_options import check_infer_options

__all__ = ["InferConfig", "list_infer_presets"]

PRESET_PACKAGE = "vessel_kit.configs.infer"


@dataclass(frozen=True)
class InferConfig:
    """How to predict a volume (see ``infer_volume`` for what each option does).

    Geometry: ``axes``, ``axis_weights``, ``tile_size`` (an int, or one side per dimension for 3D
    patches), ``overlap``, ``min_plane_side``, ``pad_planes_to`` (whole planes, when there is no
    tile size, are padded up to at least this side, e.g. the training crop; None: to the stride).
    Test-time augmentation: ``tta``, ``reverse_slices``. Resampling: ``model_voxel_size_um``
    (default: the checkpoints'). Runtime: ``batch_size``, ``device``, ``amp``,
    ``compile`` (``torch.compile`` each model replica: a slower start, then faster tiles on GPUs;
    off by default), ``prefetch`` (True: a background
    thread prepares the next batch while the model runs; False: batches are prepared in the
    model's thread, so a process keeps one core busy, not ~1.1; None, the default: True, except
    in the one-thread dask workers of ``infer_blocks`` on the CPU, where it is False; the
    results are bit-identical either way), ``progress``. Output: ``threshold`` (default: the
    checkpoints' calibrated one), ``hysteresis``, ``top_fraction``, ``min_component_size`` (default:
    the checkpoints' calibrated one, scaled to the volume's voxel size; 0 keeps all) and its
    ``connectivity`` (None: 8 neighbours in a slice plus the voxels above and below; 6, 18 or
    26: the 3D neighbourhoods, e.g. 26 for the 2nd-place pipeline). Ensemble rule (2D + 3D
    ensembles only): ``hull_gate``, a ``hull.HullGate`` (or its dilation as an int, or a mapping
    of its fields): each rank is averaged and thresholded on its own and the 2D mask's hull gates
    the 3D one (the 4th-place rule: ``{"dilation": 10, "shape": "convex", "rule": "sum",
    "threshold_3d": 0.5}``). Intensity: ``polarity`` (``vessel_kit.polarity``): "as_given",
    "inverted" (the scan's intensities mirrored: a model of bright vessels on a scan of dark
    ones) or "auto" (the mirrored scan too, only when the scan as read gives an almost empty
    mask, or a sparse one of speckle: ``polarity.asks_for_mirrored``); None, the default: "auto"
    for whole volumes, "as_given" block by block.

    Lists given for tuple fields are stored as tuples and numpy numbers as Python ones, so two
    equal configs compare equal and ``to_dict`` gives plain YAML/JSON values.

    Example::

        config = InferConfig.from_dict({"axes": ["xy"], "tta": "none", "threshold": 0.3})
        config.to_dict()["axes"]  # ["xy"]
    """

    # geometry
    axes: tuple[str, ...] = AXES
    axis_weights: Mapping[str, float] | None = None
    tile_size: int | tuple[int, ...] | None = None
    overlap: float = 0.5
    min_plane_side: int = 16
    pad_planes_to: int | None = None
    # test-time augmentation
    tta: str = "flips"
    reverse_slices: bool = False
    # resampling
    model_voxel_size_um: float | None = None
    # runtime
    batch_size: int = 8
    device: str | tuple[str, ...] | None = None
    amp: bool | None = None
    compile: bool = False
    prefetch: bool | None = None
    progress: bool = True
    # output
    threshold: float | None = None
    hysteresis: tuple[float, float] | None = None
    top_fraction: float | None = None
    min_component_size: int | None = None
    connectivity: int | None = None
    hull_gate: HullGate | None = None
    # intensity
    polarity: str | None = None

    def __post_init__(self) -> None:
        # numpy numbers (a tile side from an array's shape) become Python ones first, so the checks
        # treat them as the ints, floats and bools they are; lists and strings are checked as given
        for name in self.field_names():
            object.__setattr__(self, name, _python_scalars(getattr(self, name)))
        check_infer_options(self._options())
        if isinstance(self.axes, str):
            object.__setattr__(self, "axes", (self.axes,))
        for name in ("axes", "tile_size", "device", "hysteresis"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if isinstance(self.axis_weights, Mapping):
            object.__setattr__(self, "axis_weights", dict(self.axis_weights))
        if self.hull_gate is not None:
            object.__setattr__(self, "hull_gate", HullGate.parse(self.hull_gate))

    @classmethod
    def field_names(cls) -> list[str]:
        """The option names, in declaration order."""
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> InferConfig:
        """A config from options (a YAML mapping, a manifest, CLI flags). Raises ValueError naming
        unknown keys and listing the valid ones."""
        if not isinstance(values, Mapping):
            raise ValueError(f"inference options must be a mapping of option: value, got {type(values).__name__}")
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise ValueError(f"unknown inference options {unknown}; valid: {cls.field_names()}")
        return cls(**values)

    @classmethod
    def load(cls, name_or_path: str | os.PathLike) -> InferConfig:
        """A preset by name (``list_infer_presets``) or a YAML file by path."""
        preset = resources.files(PRESET_PACKAGE) / f"{name_or_path}.yaml"
        if isinstance(name_or_path, str) and "/" not in name_or_path and preset.is_file():
            with resources.as_file(preset) as path:
                return cls.from_yaml(path)
        if not Path(name_or_path).is_file():
            raise ValueError(f"{name_or_path} is neither an inference preset ({', '.join(list_infer_presets())}) "
                             "nor a YAML file")
        return cls.from_yaml(name_or_path)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> InferConfig:
        """A config from a YAML file of options (errors name the file); a ``description:`` key
        is allowed and ignored."""
        from .config_files import load_yaml_mapping

        values = dict(load_yaml_mapping(path, what="inference config"))
        values.pop("description", None)
        try:
            return cls.from_dict(values)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None

    def to_dict(self) -> dict[str, Any]:
        """The options as plain YAML/JSON values (tuples as lists)."""
        return {name: _plain(getattr(self, name)) for name in self.field_names()}

    def replace(self, **changes: Any) -> InferConfig:
        """A copy with ``changes`` (validated; unknown names raise ValueError)."""
        unknown = sorted(set(changes) - set(self.field_names()))
        if unknown:
            raise ValueError(f"unknown inference options {unknown}; valid: {self.field_names()}")
        return dataclasses.replace(self, **changes)

    def _options(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.field_names()}


def _python_scalars(value: Any) -> Any:
    """``value`` with its numpy scalars (also inside tuples, lists and mappings) as Python ones."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (tuple, list)):
        return type(value)(_python_scalars(v) for v in value)
    if isinstance(value, Mapping):
        return {key: _python_scalars(v) for key, v in value.items()}
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, HullGate):
        return value.to_dict()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def list_infer_presets() -> dict[str, str]:
    """Preset name -> its one-line description, sorted by name."""
    from .config_files import load_yaml_mapping

    presets = {}
    for entry in sorted(resources.files(PRESET_PACKAGE).iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            with resources.as_file(entry) as path:
                presets[entry.name[: -len(".yaml")]] = str(load_yaml_mapping(path, what="inference preset").get("description", ""))
    return presets
