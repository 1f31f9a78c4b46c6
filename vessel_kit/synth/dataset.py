"""``make_synthetic_dataset``: synthetic volumes written in the Kaggle layout, atomically."""

from __future__ import annotations

import csv
import itertools
import json
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..atomic import atomic_output, remove_stale_temp_files, temp_path
from ..layout import KNOWN_VOXEL_SIZES_UM, VOXEL_SIZES_FILE
from ..metric import SOLUTION_COLUMNS
from ..rle import rle_encode, slice_id, write_submission
from ..values import is_finite_real
from ..volume import write_volume
from .styles import STYLES, resolve_style
from .synthesize import MIN_SIDE, synthesize

SPLITS = ("train", "test")


@dataclass(frozen=True)
class SyntheticVolumeSpec:
    """One volume of a synthetic dataset, its shape at ``scale=1``.

    ``labelled_fraction`` is None for test volumes (no labels written). ``stem_digits`` is the
    zero-padded width of the slice file names. ``style`` names a family of ``STYLES``.
    ``voxel_size_um`` defaults to the Kaggle volume's of the same name
    (``layout.KNOWN_VOXEL_SIZES_UM``), so ``find_volumes`` reports what was generated; any other
    name must give it.

    Raises ValueError for an unknown split or style, or a missing voxel size.
    """

    name: str
    split: str
    shape: tuple[int, int, int]
    labelled_fraction: float | None
    stem_digits: int = 4
    style: str = "hipct"
    voxel_size_um: float | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.name, str) and re.fullmatch(r"[A-Za-z0-9_.-]+", self.name)):
            raise ValueError(f"volume name must be letters, digits, '_', '.' or '-', got {self.name!r}")
        if self.split not in SPLITS:
            raise ValueError(f"volume {self.name!r}: split must be one of {SPLITS}, got {self.split!r}")
        if not isinstance(self.style, str):
            raise ValueError(f"volume {self.name!r}: style must be a style name, one of {sorted(STYLES)}")
        resolve_style(self.style)
        if self.voxel_size_um is None:
            if self.name not in KNOWN_VOXEL_SIZES_UM:
                raise ValueError(
                    f"volume {self.name!r} is not a Kaggle volume ({sorted(KNOWN_VOXEL_SIZES_UM)}): give its voxel_size_um"
                )
            object.__setattr__(self, "voxel_size_um", KNOWN_VOXEL_SIZES_UM[self.name])


LOOKS_PER_FAMILY = 6
SYNTHETIC_VOLUMES: tuple[SyntheticVolumeSpec, ...] = (
    SyntheticVolumeSpec("kidney_1_dense", "train", (96, 256, 256), 1.0),
    SyntheticVolumeSpec("kidney_2", "train", (64, 256, 224), 0.65),
    SyntheticVolumeSpec("kidney_3_sparse", "train", (80, 224, 256), 0.85),
    SyntheticVolumeSpec("kidney_5", "test", (64, 256, 240), None),
    SyntheticVolumeSpec("kidney_6", "test", (48, 224, 224), None, stem_digits=5),
    # Small extra volumes of the other families at 50 µm, LOOKS_PER_FAMILY each: every one a fresh
    # draw of its family's look (the synthetic_cpu recipe trains on the first five and validates on
    # the last). Not "faint": its vessels are fainter than the texture and blurred, not visible
    # in a slice, so as training labels they teach a 2.5D model to mark texture; the style stays
    # for benchmarks and users.
    *(
        SyntheticVolumeSpec(f"synth_{family}_{look}", "train", (40, 160, 160), 1.0, style=family, voxel_size_um=50.0)
        for family in ("wall", "bright", "random")
        for look in range(LOOKS_PER_FAMILY)
    ),
)

# kidney_3_dense ships dense labels only, for a consecutive sub-range of kidney_3_sparse's slices
# (the real one: slices 496-995 of 1035); its images are kidney_3_sparse's same-named files.
DENSE_SUBSET_NAME = "kidney_3_dense"
DENSE_SUBSET_SOURCE = "kidney_3_sparse"
DENSE_SUBSET_RANGE = (3 / 8, 7 / 8)  # as fractions of the source's slices


def make_synthetic_dataset(
    root: str | os.PathLike,
    *,
    scale: float = 1.0,
    seed: int = 0,
    styles: str | Mapping[str, str] | None = None,
    volumes: Sequence[SyntheticVolumeSpec] = SYNTHETIC_VOLUMES,
    progress: bool = True,
) -> Path:
    """Write a synthetic dataset in the Kaggle layout under ``root`` and return ``root``.

    Writes ``train/<volume>/{images,labels}`` and ``test/<volume>/images`` for ``volumes``
    (every side multiplied by ``scale``, at least 8), labels only for ``train/kidney_3_dense``
    when ``kidney_3_sparse`` is a training volume, ``sample_submission.csv`` (``1 0`` for every
    test slice), ``solution.csv`` (the test labels: ``id,rle,width,height,image,slice``) and
    ``voxel_sizes.json`` (every volume's voxel size, which ``layout.find_volumes`` reads, so a
    model trained on the dataset records its resolution).
    Volume ``name`` is generated with seed ``dataset_volume_seed(seed, name)`` in its spec's
    style, unless ``styles`` overrides it: one style name for every volume, or a mapping from
    volume names to style names.

    The dataset is written into a hidden folder beside ``root`` and renamed to ``root`` when
    complete, so an interrupted run never leaves a partial dataset under ``root``; such folders
    left by a killed run are removed by a later run (``atomic.remove_stale_temp_files``).

    Raises FileExistsError if ``root`` exists and is not an empty folder (datasets never mix),
    ValueError for a ``scale`` that is not a positive number, an unknown style, a ``styles``
    mapping naming no volume, or volumes with duplicate names.
    """
    if not (is_finite_real(scale) and scale > 0):
        raise ValueError(f"scale must be a positive number, got {scale!r}")
    root = Path(root)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(f"{root} already exists and is not empty; pick a new or empty folder")
    volume_styles = _volume_styles(volumes, styles)
    parent = root.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(parent)
    partial = temp_path(root.absolute())
    partial.mkdir()
    try:
        _write_dataset(partial, volumes, volume_styles, scale, seed, progress)
        if root.exists():
            root.rmdir()  # empty, checked above
        partial.rename(root)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return root


def dataset_volume_seed(seed: int, name: str) -> int:
    """The seed ``make_synthetic_dataset(seed=seed)`` generates volume ``name`` with.

    It depends on ``seed`` and ``name`` only, so
    ``make_synthetic_volume(shape, dataset_volume_seed(seed, spec.name), spec.voxel_size_um,
    labelled_fraction=..., style=spec.style)`` reproduces a volume, e.g. to get a test volume's
    labels back.
    """
    if not (isinstance(name, str) and name):
        raise ValueError(f"name must be a non-empty volume name, got {name!r}")
    return int(np.random.SeedSequence([seed, *name.encode()]).generate_state(1)[0])


# --- helpers --------------------------------------------------------------------------------------


def _volume_styles(
    volumes: Sequence[SyntheticVolumeSpec], styles: str | Mapping[str, str] | None
) -> dict[str, str]:
    """The style of each volume by name: its spec's, overridden by ``styles``; checked."""
    names = [spec.name for spec in volumes]
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"volumes must be a non-empty sequence with unique names, got {names}")
    chosen = {spec.name: spec.style for spec in volumes}
    if isinstance(styles, str):
        chosen = dict.fromkeys(names, styles)
    elif styles is not None:
        unknown = sorted(set(styles) - set(names))
        if unknown:
            raise ValueError(f"styles names volumes {unknown} that are not in the dataset; volumes: {names}")
        chosen.update(styles)
    for style in chosen.values():
        if not isinstance(style, str):
            raise ValueError(f"styles must be style names, one of {sorted(STYLES)}, got {style!r}")
        resolve_style(style)
    return chosen


def _write_dataset(
    root: Path,
    volumes: Sequence[SyntheticVolumeSpec],
    styles: dict[str, str],
    scale: float,
    seed: int,
    progress: bool,
) -> None:
    """Synthesize and write every volume, the dense subset and the two CSVs into ``root``."""
    test_volumes, voxel_sizes = {}, {}
    for spec in tqdm(volumes, desc="synthesize", unit="volume", disable=not progress):
        shape = tuple(max(MIN_SIDE, round(side * scale)) for side in spec.shape)
        image, dense, labels = synthesize(
            shape, dataset_volume_seed(seed, spec.name), spec.voxel_size_um,
            spec.labelled_fraction or 1.0, styles[spec.name],
        )
        stems = [f"{i:0{spec.stem_digits}d}" for i in range(shape[0])]
        voxel_sizes[spec.name] = spec.voxel_size_um
        folder = root / spec.split / spec.name
        write_volume(image, folder / "images", stems)
        if spec.split == "test":
            test_volumes[spec.name] = (stems, labels)
            continue
        write_volume(labels, folder / "labels", stems)
        if spec.name == DENSE_SUBSET_SOURCE:
            _write_dense_subset(root / "train" / DENSE_SUBSET_NAME / "labels", dense, stems)
            voxel_sizes[DENSE_SUBSET_NAME] = spec.voxel_size_um
    (root / VOXEL_SIZES_FILE).write_text(json.dumps(voxel_sizes, indent=1) + "\n")
    _write_sample_submission(root / "sample_submission.csv", test_volumes)
    _write_solution(root / "solution.csv", test_volumes)


def _write_dense_subset(folder: Path, dense: np.ndarray, stems: list[str]) -> None:
    """kidney_3_dense's labels: the dense labels of a consecutive sub-range of the source slices."""
    first, stop = (round(len(stems) * fraction) for fraction in DENSE_SUBSET_RANGE)
    write_volume(dense[first:stop], folder, stems[first:stop])


def _write_sample_submission(
    path: Path, test_volumes: dict[str, tuple[list[str], np.ndarray]]
) -> None:
    """``id,rle`` with the empty mask ``1 0`` for every test slice, in volume and slice order."""
    empty = np.zeros((1, 1), dtype=bool)
    predictions = {
        name: (stems, itertools.repeat(empty, len(stems)))
        for name, (stems, _) in test_volumes.items()
    }
    write_submission(predictions, path)


def _write_solution(path: Path, test_volumes: dict[str, tuple[list[str], np.ndarray]]) -> None:
    """The test labels as ``id,rle,width,height,image,slice``, written atomically."""
    with atomic_output(path) as tmp, open(tmp, "w", newline="") as file:
        writer = csv.writer(file, lineterminator="\n")
        writer.writerow(SOLUTION_COLUMNS)
        for name, (stems, labels) in test_volumes.items():
            height, width = labels.shape[1:]
            for index, (stem, mask) in enumerate(zip(stems, labels, strict=True)):
                writer.writerow((slice_id(name, stem), rle_encode(mask), width, height, name, index))
