"""The non-local mask rules of block-wise inference: a second, global pass over the stored logits.

``Predictor.to_mask`` makes a mask in two steps: a voxel rule (probability > threshold, the
exact ``top_fraction`` of voxels, or ``hysteresis``: the components of the low mask that hold a
voxel above the high one), then the removal of components under ``min_component_size``
(``connectivity``). A block alone can't apply the non-local ones, so ``infer_blocks`` runs its
first pass with them unset, storing the float16 logits (``logits=True`` is implied: the second
pass reads them), and then this pass rewrites every block's mask so that it equals the in-memory
``to_mask`` of the whole volume, voxel for voxel:

- **top fraction**: a histogram of the float16 bit patterns of the stored logits, block by block
  (the in-memory rule's own ``postprocess.top_fraction_key``), gives the same cut key, so the same voxels, ties
  included (every voxel of the cut value is kept, as in memory).
- **components** (hysteresis seeds, sizes): each block's mask is labelled alone
  (``scipy.ndimage.label`` with the neighbourhood of ``postprocess``); its per-label sizes, seed
  flags and the labels on its six faces are saved. Labels that touch across a face, an edge or
  a corner of two blocks (every neighbourhood offset that crosses, 13 block directions) are
  merged (``scipy.sparse.csgraph.connected_components``), the sizes and seed flags summed per
  merged component, and a keep flag stored per block label. Hysteresis with a size rule of
  another connectivity is two such stages (in memory the hysteresis uses the default
  connectivity, then the size rule its own on the result).
- **rewrite**: each block's mask is made again (voxel rule, relabelled, keep flags) and written.

Memory per block stays bounded (a block's logits and labels; no whole-volume label array); the
tables hold one entry per block label. The pass runs in this process, one block at a time.
It is resumable: every block's stage result and rewrite is recorded (atomically, after its data)
under ``.vessel_kit/rules/<rules key>/`` in the store, so a rerun after an interrupt skips what is
done and finishes with the same result; only an interrupted top-fraction histogram is redone.
The rules a store's mask was made with are its ``vessel_kit_rules`` attribute: a rerun with
other rules (or none) rewrites the masks from the logits again, never mixing two rule sets.

``hull_gate`` stays refused: its 2D mask is dilated by a 3D ball over the whole volume and the 2D
and 3D ranks' logits are kept apart, which the output store (one logits image) does not hold.
``polarity="auto"`` is refused too: it chooses between the whole volume's masks as read and
mirrored (a block alone cannot tell a region without vessels from a scan of the other polarity).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .atomic import atomic_output
from .blocks import block_regions
from .calibration import logit
from .postprocess import neighbourhood_structure, order_keys, top_fraction_key
from .regions import Region

__all__ = ["MaskRules", "finish_masks", "split_rules"]

_RECORD = "vessel_kit_rules"  # the store attribute: the rules its mask was made with (None: the threshold)
_FOLDER = (".vessel_kit", "rules")
# block directions with the first nonzero step positive: each pair of touching blocks once
_DIRECTIONS = [d for d in itertools.product((-1, 0, 1), repeat=3) if any(d) and next(s for s in d if s) > 0]


@dataclass(frozen=True)
class MaskRules:
    """The mask rules of ``Predictor.to_mask`` (its config's fields and its threshold)."""

    threshold: float
    hysteresis: tuple[float, float] | None = None
    top_fraction: float | None = None
    min_component_size: int = 0
    connectivity: int | None = None

    @property
    def stages(self) -> list[tuple[int | None, bool, int]]:
        """The component stages, in order: (connectivity, keep seeded only, minimum size)."""
        sized = self.min_component_size if self.min_component_size > 1 else 0
        if self.hysteresis is None:
            return [(self.connectivity, False, sized)] if sized else []
        if self.connectivity is None:  # the same components: one stage does both
            return [(None, True, sized)]
        return [(None, True, 0)] + ([(self.connectivity, False, sized)] if sized else [])

    @property
    def key(self) -> str:
        """A short name of these rules, for their records in the store."""
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def split_rules(config: Any) -> tuple[Any, dict[str, Any] | None]:
    """``config`` without its non-local mask rules (for the first pass), and those rules (the
    ``MaskRules`` fields but the threshold), or None when it has none. ``min_component_size``
    None (the checkpoints' calibrated size) stays None in the rules: ``with_component_size``
    fills it in once the volume's voxel size is known.

    Raises:
        ValueError: ``hull_gate`` or ``polarity="auto"``, which have no block-wise form (see the
            module doc).
    """
    if config.polarity == "auto":
        raise ValueError("polarity='auto' has no block-wise form: it compares the whole volume's masks as read and "
                         "mirrored; give polarity 'as_given' or 'inverted' (None: as given), or run infer_volume")
    if config.hull_gate is not None:
        raise ValueError(f"hull_gate={config.hull_gate} has no block-wise form: it dilates the 2D mask by a 3D ball over "
                         "the whole volume and needs the 2D and 3D logits apart; unset it, or run infer_volume")
    hysteresis = None if config.hysteresis is None else tuple(config.hysteresis)
    rules = {"hysteresis": hysteresis, "top_fraction": config.top_fraction,
             "min_component_size": config.min_component_size, "connectivity": config.connectivity}
    sized = config.min_component_size is None or config.min_component_size > 1
    if config.hysteresis is None and config.top_fraction is None and not sized:
        return config, None
    return config.replace(hysteresis=None, top_fraction=None, min_component_size=0), rules


def with_component_size(rules: dict[str, Any] | None, calibrated: int) -> dict[str, Any] | None:
    """``rules`` with a calibrated ``min_component_size`` (None in them) set to ``calibrated``
    (in the volume's voxels), or None when no rule is left to run."""
    if rules is None or rules["min_component_size"] is not None:
        return rules
    rules = {**rules, "min_component_size": calibrated}
    if rules["hysteresis"] is None and rules["top_fraction"] is None and calibrated <= 1:
        return None
    return rules


def finish_masks(store: Any, rules: dict[str, Any] | None, threshold: float, block: tuple[int, int, int],
                 progress: bool = True) -> None:
    """Rewrite the mask of the finished first pass in ``store`` (an ``OutputStore`` with logits)
    by ``rules`` (from ``split_rules``) at probability ``threshold``, block by block.

    With no rules it only acts when the store's mask was made with rules: it thresholds it again.
    """
    recorded = store.root.attrs.get(_RECORD)
    if rules is None and recorded is None:
        return
    rules_now = MaskRules(threshold, **(rules or {}))
    folder = store.path.joinpath(*_FOLDER)
    if folder.is_dir():
        for old in folder.iterdir():
            if old.name != rules_now.key:
                shutil.rmtree(old)
    store.root.update_attributes({_RECORD: asdict(rules_now)})  # before any mask is rewritten
    _SecondPass(store, rules_now, block, folder / rules_now.key, progress).run()
    if rules is None:  # thresholded again: the mask is the first pass' once more
        store.root.update_attributes({_RECORD: None})
        shutil.rmtree(folder / rules_now.key, ignore_errors=True)


# --- the second pass -------------------------------------------------------------------------


class _SecondPass:
    """The records and steps of one rules pass over a store (see the module doc)."""

    def __init__(self, store: Any, rules: MaskRules, block: tuple[int, int, int], folder: Path, progress: bool) -> None:
        self.store, self.rules, self.folder, self.progress = store, rules, folder, progress
        self.grid = dict(block_regions(store.shape, block))
        self.grid_shape = tuple(max(index[a] for index in self.grid) + 1 for a in range(3))
        self.keeps: list[tuple[np.ndarray, np.ndarray]] = []  # per finished stage: label offsets, keep flags
        self.cut_key: int | None = None

    def run(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.rules.hysteresis is None and self.rules.top_fraction is not None:
            self.cut_key = self._top_fraction_key()
        for number, stage in enumerate(self.rules.stages):
            self.keeps.append(self._stage(number, *stage))
        written = self.folder / "written"
        written.mkdir(exist_ok=True)
        todo = [(i, r) for i, r in self.grid.items() if not (written / _name(i)).exists()]
        for index, region in tqdm(todo, desc="mask rules: write", unit="block", disable=not self.progress):
            self.store.mask[region] = self._mask(index, region)[0].astype(np.uint8)
            _mark(written / _name(index))

    # a block's masks

    def _voxels(self, region: Region) -> tuple[np.ndarray, np.ndarray | None]:
        """The voxel rule's mask of a block, and its hysteresis seeds (voxels above high)."""
        logits = np.asarray(self.store.logits[region])
        if self.rules.hysteresis is not None:
            high, low = self.rules.hysteresis
            return logits > logit(low), logits > logit(high)  # as hysteresis_threshold compares them
        if self.cut_key is not None:
            return order_keys(logits) >= self.cut_key, None
        return logits > np.float16(logit(self.rules.threshold)), None

    def _mask(self, index: tuple[int, ...], region: Region, stages: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """A block's mask after the voxel rule and the first ``stages`` (default: all) stages,
        and its hysteresis seeds."""
        mask, seeds = self._voxels(region)
        for (connectivity, _, _), (offsets, keep) in zip(self.rules.stages, self.keeps[:stages]):
            labels, count = _label(mask, connectivity)
            start = offsets[self._position(index)]
            mask = np.concatenate([[False], keep[start:start + count]])[labels]
        return mask, seeds

    # a top fraction's cut

    def _top_fraction_key(self) -> int:
        """The float16 order key of the cut, as the in-memory rule finds it (``top_fraction_key``)."""
        record = self.folder / "top_fraction.json"
        if record.exists():
            return json.loads(record.read_text())["key"]
        regions = tqdm(self.grid.values(), desc="mask rules: top fraction", unit="block", disable=not self.progress)
        key = top_fraction_key((np.asarray(self.store.logits[region]) for region in regions),
                               int(np.prod(self.store.shape)), self.rules.top_fraction)
        with atomic_output(record) as tmp:
            tmp.write_text(json.dumps({"key": key}))
        return key

    # a component stage

    def _stage(self, number: int, connectivity: int | None, seeded: bool, min_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Label every block, merge across blocks, and return (label offsets per block in C
        order, keep flag per block label); the result is recorded, and so is every block's labelling."""
        folder = self.folder / f"stage{number}"
        result = folder / "keep.npz"
        if result.exists():
            with np.load(result) as saved:
                return saved["offsets"], saved["keep"]
        folder.mkdir(exist_ok=True)
        for index, region in tqdm(self.grid.items(), desc=f"mask rules: components {number + 1}/{len(self.rules.stages)}",
                                  unit="block", disable=not self.progress):
            if not (folder / f"{_name(index)}.npz").exists():
                self._label_block(folder, index, region, number, connectivity)
        counts = np.zeros(len(self.grid), dtype=np.int64)
        sizes, seeds = [], []
        for index in self.grid:
            with np.load(folder / f"{_name(index)}.npz") as saved:
                counts[self._position(index)] = len(saved["sizes"])
                sizes.append(saved["sizes"])
                seeds.append(saved["seeds"])
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
        component = self._merge(folder, offsets, connectivity, int(counts.sum()))
        keep = np.ones(int(counts.sum()), dtype=bool)
        if min_size:
            keep &= np.bincount(component, weights=np.concatenate(sizes))[component] >= min_size
        if seeded:
            keep &= np.bincount(component, weights=np.concatenate(seeds).astype(np.float64))[component] > 0
        with atomic_output(result) as tmp:
            with open(tmp, "wb") as file:
                np.savez(file, offsets=offsets, keep=keep)
        return offsets, keep

    def _label_block(self, folder: Path, index: tuple[int, ...], region: Region, number: int, connectivity: int | None) -> None:
        """One block's labels: sizes, seed flags and its six faces, saved atomically."""
        mask, seeds = self._mask(index, region, number)
        labels, count = _label(mask, connectivity)
        sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
        seeded = np.zeros(count, dtype=bool)
        if seeds is not None and number == 0:  # hysteresis: the first stage's labels hold a voxel above high
            seeded = np.bincount(labels[seeds], minlength=count + 1)[1:] > 0
        faces = {f"{side}{axis}": np.take(labels, 0 if side == "lo" else -1, axis=axis)
                 for axis in range(3) for side in ("lo", "hi")}
        with atomic_output(folder / f"{_name(index)}.npz") as tmp:
            with open(tmp, "wb") as file:
                np.savez_compressed(file, sizes=sizes, seeds=seeded, **faces)

    def _merge(self, folder: Path, offsets: np.ndarray, connectivity: int | None, total: int) -> np.ndarray:
        """The merged component of every block label: labels touching across block faces, edges
        and corners (every ``connectivity`` offset that crosses) are one component."""
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components

        steps = _offsets(connectivity)
        pairs = []  # per block, its distinct (label, neighbour's label) pairs: one per touching component
        for index in tqdm(self.grid, desc="mask rules: merge", unit="block", disable=not self.progress, leave=False):
            with np.load(folder / f"{_name(index)}.npz") as saved:
                mine = {name: saved[name] for name in saved.files if name[:2] in ("lo", "hi")}
            touching = []
            for direction in _DIRECTIONS:
                other = tuple(i + d for i, d in zip(index, direction))
                if other not in self.grid:
                    continue
                with np.load(folder / f"{_name(other)}.npz") as saved:
                    theirs = _contact(saved, direction, near=False)
                ours = _contact(mine, direction, near=True)
                for a, b in _touching(ours, theirs, direction, steps):
                    touching.append(np.stack([a - 1 + offsets[self._position(index)], b - 1 + offsets[self._position(other)]]))
            if touching:
                pairs.append(np.unique(np.concatenate(touching, axis=1), axis=1))
        if total == 0:
            return np.zeros(0, dtype=np.int64)
        edges = np.concatenate(pairs, axis=1) if pairs else np.zeros((2, 0), dtype=np.int64)
        graph = coo_matrix((np.ones(edges.shape[1], dtype=np.int8), (edges[0], edges[1])), shape=(total, total))
        return connected_components(graph, directed=False)[1]

    def _position(self, index: tuple[int, ...]) -> int:
        """A block's position in C order (``block_regions``' order)."""
        return int(np.ravel_multi_index(index, self.grid_shape))


# --- helpers ---------------------------------------------------------------------------------


def _offsets(connectivity: int | None) -> list[tuple[int, int, int]]:
    return [tuple(int(i) - 1 for i in step) for step in np.argwhere(neighbourhood_structure(connectivity)) if (step != 1).any()]


def _label(mask: np.ndarray, connectivity: int | None) -> tuple[np.ndarray, int]:
    from scipy.ndimage import label

    labels, count = label(mask, structure=neighbourhood_structure(connectivity))
    return labels, int(count)


def _contact(faces: Any, direction: tuple[int, ...], near: bool) -> np.ndarray:
    """The labels of a block where it touches its neighbour in ``direction`` (``near``: this
    block's side; else the neighbour's, seen from the first block): over the axes where the
    direction is 0; a face, an edge line or a corner voxel."""
    moving = [axis for axis in range(3) if direction[axis]]
    first = moving[0]
    upper = (direction[first] > 0) == near
    plane = faces[f"{'hi' if upper else 'lo'}{first}"]
    index = []
    for axis in (a for a in range(3) if a != first):
        if direction[axis]:
            index.append(-1 if (direction[axis] > 0) == near else 0)
        else:
            index.append(slice(None))
    return plane[tuple(index)]


def _touching(ours: np.ndarray, theirs: np.ndarray, direction: tuple[int, ...],
              steps: list[tuple[int, int, int]]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(our label, their label) of every pair of labelled voxels one neighbourhood step apart."""
    free = [axis for axis in range(3) if not direction[axis]]
    for step in steps:
        if any(step[axis] != direction[axis] for axis in range(3) if direction[axis]):
            continue
        mine, other = [], []
        for axis, length in zip(free, ours.shape):
            shift = step[axis]
            mine.append(slice(max(0, -shift), length - max(0, shift)))
            other.append(slice(max(0, shift), length + min(0, shift)))
        a, b = ours[tuple(mine)], theirs[tuple(other)]
        both = (a > 0) & (b > 0)
        if both.any():
            yield a[both].astype(np.int64), b[both].astype(np.int64)


def _name(index: tuple[int, ...]) -> str:
    return ".".join(map(str, index))


def _mark(path: Path) -> None:
    with atomic_output(path) as tmp:
        tmp.write_bytes(b"")
