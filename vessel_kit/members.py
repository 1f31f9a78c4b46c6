"""Multi-member training runs: an ensemble recipe's members trained in turn, with pseudo-label steps.

A training config may list ``members:``, steps run in order into ``<out_dir>/<name>/``:

    members:
      - {name: maxvit, model: {encoder: tu-maxvit_base_tf_512}}      # a model: options over the shared ones
      - {name: dpn68, model: {encoder: dpn68}, crops: {crop_size: 256}}
      - name: pseudo                                                 # a pseudo-label step
        pseudo: {from: [maxvit, dpn68], volumes: [kidney_3_sparse], kind: soft}
      - {name: maxvit_pl, model: {encoder: tu-maxvit_base_tf_512}}   # trains on the pseudo-labels too

A model member is the config's own options (all but ``members``) with the member's merged over
them as ``base:`` merges a child (``recipes.merge_config``: sections option by option). A pseudo
step predicts its ``volumes`` with the ``from`` members' best checkpoints (``make_pseudo_labels``:
logits averaged over ``axes`` and ``tta``) and writes ``<out_dir>/<name>/<volume>.npy``:
``kind: soft`` keeps the uint8 probabilities (the 5th place: never hardened); ``kind: densify``
adds the most probable unlabelled voxels to the volume's sparse label until it covers
``coverage`` (one share, or one per volume) of its vessels (``densify_label``: the 3rd place).
Every member after a pseudo step trains on those volumes with those soft labels (they join its
``train_volumes`` unless they validate it).

Every step is resumable: a finished member is recorded in ``<out_dir>/members.json`` and not
trained again (its run folder must still hold the same config, ``runs.claim_run_dir``), an
interrupted one resumes at its epoch (``train``), and a pseudo-label file already written
(atomically) is kept (a step whose options changed since is refused). Each member's config is
checked against its folder, and each pseudo volume and validation split against the data, before
anything is trained, so a changed recipe is refused at once, not after hours of the members
before it.

The ensemble the run makes, ``MembersResult.checkpoints`` and the manifest's ``checkpoints``, is
the best checkpoint of every member no pseudo step reads from (the teachers made labels; the
students are submitted); ``bundle.collect_checkpoints`` (``build_dataset.sh``) takes those from
the run folder.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_output
from .axes import AXES
from .layout import check_no_shared_images, named_volumes
from .pseudo import densify_label, make_pseudo_labels
from .recipes import merge_config
from .runs import MEMBERS_MANIFEST as MANIFEST
from .runs import claim_run_dir, read_members_manifest
from .train_config import TrainConfig
from .training import TrainResult, canonical_config, train
from .tta import TTA_MODES
from .values import is_finite_real

__all__ = ["MembersResult", "ModelMember", "PseudoStep", "member_steps", "train_members"]

PSEUDO_KINDS = ("soft", "densify")
_PSEUDO_OPTIONS = ("from", "volumes", "kind", "coverage", "axes", "tta")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class ModelMember:
    """A member that trains a model: its ``name`` and full ``config`` (out_dir its folder)."""

    name: str
    config: TrainConfig


@dataclass(frozen=True)
class PseudoStep:
    """A pseudo-label step: ``volumes`` predicted by the ``teachers`` (earlier members' names),
    written as soft labels (``kind`` "soft") or densified sparse labels ("densify", to the
    ``coverage`` share of each volume's vessels its label annotates) into ``folder``."""

    name: str
    folder: Path
    teachers: tuple[str, ...]
    volumes: tuple[str, ...]
    kind: str = "soft"
    coverage: Mapping[str, float] = field(default_factory=dict)
    axes: tuple[str, ...] = AXES
    tta: str = "flips"

    def options(self) -> dict[str, Any]:
        """The options that decide what the step writes, as JSON values (kept in the manifest)."""
        return {"from": list(self.teachers), "volumes": list(self.volumes), "kind": self.kind,
                "coverage": dict(self.coverage), "axes": list(self.axes), "tta": self.tta}

    def outputs(self) -> dict[str, str]:
        """Volume name -> the soft-label file this step writes for it."""
        return {volume: str(self.folder / f"{volume}.npy") for volume in self.volumes}


@dataclass
class MembersResult:
    """What a multi-member run made: each model member's ``TrainResult``, each pseudo step's
    files, the ensemble ``checkpoints`` (members no pseudo step reads from) and the ``manifest``."""

    members: dict[str, TrainResult]
    pseudo_labels: dict[str, dict[str, Path]]
    checkpoints: list[Path]
    manifest: Path


def member_steps(config: TrainConfig) -> list[ModelMember | PseudoStep]:
    """``config.members`` as steps, each model member's config built and checked; a ValueError
    names the member and the problem (a bad option, a repeated or bad name, a pseudo step reading
    from a member not trained before it)."""
    if not isinstance(config.members, list):
        raise ValueError(f"training option members must be a list of mappings, got {config.members!r}")
    shared = {key: value for key, value in config.to_dict().items() if key != "members"}
    root = Path(config.out_dir)
    steps: list[ModelMember | PseudoStep] = []
    trained: list[str] = []
    soft_labels: dict[str, str] = {}
    for index, entry in enumerate(config.members):
        name = _member_name(entry, index, [step.name for step in steps])
        where = f"members[{index}] ({name})"
        if "pseudo" in entry:
            extra = sorted(set(entry) - {"name", "pseudo"}, key=str)
            if extra:
                raise ValueError(f"{where}: a pseudo step takes name and pseudo only, got also {extra}")
            step = _pseudo_step(name, entry["pseudo"], root / name, trained, where)
            steps.append(step)
            soft_labels.update(step.outputs())
            continue
        steps.append(ModelMember(name, _member_config(shared, entry, root / name, soft_labels, where)))
        trained.append(name)
    if not trained:
        raise ValueError("training option members lists no model member (only pseudo steps)")
    return steps


def train_members(config: TrainConfig, *, overwrite: bool = False) -> MembersResult:
    """Run ``config.members`` in turn (see the module docstring); ``overwrite`` retrains every
    member and remakes every pseudo-label file."""
    steps = member_steps(config)
    root = Path(config.out_dir)
    pseudo_volumes = sorted({v for step in steps if isinstance(step, PseudoStep) for v in step.volumes})
    # What would stop a later member is an error now, not after the members before it trained.
    named_volumes(config.data_root, pseudo_volumes)
    modes = {}
    for step in steps:
        if isinstance(step, ModelMember):
            member = step.config
            check_no_shared_images(member.data_root, member.train_volumes, member.val_volumes)
            if not overwrite:
                modes[step.name] = claim_run_dir(member.out_dir, member.to_dict(), canonical=canonical_config)
    manifest_path = root / MANIFEST
    recorded = {} if overwrite else read_members_manifest(manifest_path)
    done = recorded.get("members", {})
    for step in steps:
        made = recorded.get("pseudo_options", {}).get(step.name)
        if isinstance(step, PseudoStep) and made is not None and made != step.options():
            raise ValueError(f"pseudo step {step.name!r} made its labels in {step.folder} with other options ({made} -> "
                             f"{step.options()}); remove that folder or train with --overwrite")
    results: dict[str, TrainResult] = {}
    pseudo: dict[str, dict[str, Path]] = {}
    for step in steps:
        if isinstance(step, PseudoStep):
            pseudo[step.name] = _make_pseudo_labels(step, config, results, overwrite=overwrite)
        elif step.name in done and modes.get(step.name) == "resume":
            results[step.name] = _result_from_record(done[step.name], root)
        else:
            results[step.name] = train(step.config, overwrite=overwrite)
        _write_manifest(manifest_path, steps, results, pseudo)
    return MembersResult(results, pseudo, _ensemble(steps, results), manifest_path)


def _member_name(entry: Any, index: int, taken: list[str]) -> str:
    if not isinstance(entry, Mapping):
        raise ValueError(f"members[{index}] must be a mapping with a name, got {entry!r}")
    name = entry.get("name")
    if not isinstance(name, str) or not _NAME.match(name) or name == MANIFEST:
        raise ValueError(f"members[{index}] needs a name usable as a folder name (letters, digits, _ . -), got {name!r}")
    if name in taken:
        raise ValueError(f"members[{index}]: the name {name!r} is used twice; members: {taken}")
    return name


def _member_config(shared: dict, entry: Mapping, out_dir: Path, pseudo_labels: Mapping[str, str], where: str) -> TrainConfig:
    """A model member's config: its options over the shared ones, in its folder, with the soft
    labels (and volumes) of the pseudo steps before it."""
    options = {key: value for key, value in entry.items() if key != "name"}
    for key in ("members", "out_dir", "base", "recipe"):
        if key in options:
            raise ValueError(f"{where}: a member cannot set {key} (members train into <out_dir>/<name>, "
                             "from the shared options)")
    values = merge_config(shared, options)
    values["out_dir"] = str(out_dir)
    values["soft_labels"] = {**values.get("soft_labels", {}), **pseudo_labels}
    val = set(values.get("val_volumes", []))
    train_volumes = list(values.get("train_volumes", []))
    values["train_volumes"] = train_volumes + [v for v in pseudo_labels if v not in train_volumes and v not in val]
    try:
        return TrainConfig.from_dict(values)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{where}: {error}") from None


def _pseudo_step(name: str, options: Any, folder: Path, trained: list[str], where: str) -> PseudoStep:
    if not isinstance(options, Mapping):
        raise ValueError(f"{where}: pseudo must be a mapping of {list(_PSEUDO_OPTIONS)}, got {options!r}")
    unknown = sorted(set(options) - set(_PSEUDO_OPTIONS), key=str)
    if unknown:
        raise ValueError(f"{where}: unknown pseudo options {unknown}; valid: {list(_PSEUDO_OPTIONS)}")
    teachers = _names(options.get("from"), f"{where}: pseudo.from")
    missing = [t for t in teachers if t not in trained]
    if missing:
        raise ValueError(f"{where}: pseudo.from names {missing}, which are not model members before it; "
                         f"those are: {trained}")
    volumes = _names(options.get("volumes"), f"{where}: pseudo.volumes")
    kind = options.get("kind", "soft")
    if kind not in PSEUDO_KINDS:
        raise ValueError(f"{where}: pseudo.kind must be one of {PSEUDO_KINDS}, got {kind!r}")
    coverage = _coverage(options.get("coverage"), volumes, kind, where)
    axes = tuple(_names(options.get("axes", list(AXES)), f"{where}: pseudo.axes"))
    if not set(axes) <= set(AXES):
        raise ValueError(f"{where}: pseudo.axes must be some of {AXES}, got {list(axes)}")
    tta = options.get("tta", "flips")
    if tta not in TTA_MODES:
        raise ValueError(f"{where}: pseudo.tta must be one of {TTA_MODES}, got {tta!r}")
    return PseudoStep(name, folder, tuple(teachers), tuple(volumes), kind, coverage, axes, tta)


def _names(value: Any, what: str) -> list[str]:
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{what} must be a non-empty list of names, got {value!r}")
    if len(set(value)) != len(value):
        raise ValueError(f"{what} names something twice: {list(value)}")
    return list(value)


def _coverage(value: Any, volumes: list[str], kind: str, where: str) -> dict[str, float]:
    """Volume -> annotated share of its vessels, for ``densify`` (one number for every volume, or
    one per volume); none for ``soft``."""
    if kind == "soft":
        if value is not None:
            raise ValueError(f"{where}: pseudo.coverage is for kind densify, not soft")
        return {}
    shares = dict.fromkeys(volumes, value) if isinstance(value, (int, float)) else value
    if not isinstance(shares, Mapping) or set(shares) != set(volumes):
        raise ValueError(f"{where}: pseudo.coverage must be a share in (0, 1) or one per volume of {volumes}, "
                         f"got {value!r}")
    for volume, share in shares.items():
        if not (is_finite_real(share) and 0.0 < share < 1.0):
            raise ValueError(f"{where}: pseudo.coverage of {volume} must be in (0, 1) (the share of its vessels "
                             f"its label annotates), got {share!r}")
    return {volume: float(share) for volume, share in shares.items()}


def _make_pseudo_labels(step: PseudoStep, config: TrainConfig, results: Mapping[str, TrainResult], *,
                        overwrite: bool) -> dict[str, Path]:
    """Write the step's soft-label file of every volume that has none yet (all with ``overwrite``)."""
    checkpoints = [results[name].best_checkpoint for name in step.teachers]
    written = {}
    for info, (volume, out) in zip(named_volumes(config.data_root, step.volumes), step.outputs().items(), strict=True):
        out = Path(out)
        written[volume] = out
        if out.is_file() and not overwrite:
            continue
        step.folder.mkdir(parents=True, exist_ok=True)
        soft = out if step.kind == "soft" else step.folder / f"{volume}.probability.npy"
        if overwrite or not soft.is_file():
            make_pseudo_labels(checkpoints, info.read_images(progress=config.progress), soft, axes=step.axes,
                               tta=step.tta, batch_size=config.val_batch_size, device=config.device,
                               progress=config.progress)
        if step.kind == "densify":
            densify_label(info.read_labels(progress=config.progress), np.load(soft, mmap_mode="r"), out,
                          coverage=step.coverage[volume], progress=config.progress)
    return written


def _ensemble(steps: Sequence[ModelMember | PseudoStep], results: Mapping[str, TrainResult]) -> list[Path]:
    teachers = {t for step in steps if isinstance(step, PseudoStep) for t in step.teachers}
    return [results[s.name].best_checkpoint for s in steps if isinstance(s, ModelMember) and s.name not in teachers]


def _write_manifest(path: Path, steps, results: Mapping[str, TrainResult], pseudo: Mapping[str, Mapping[str, Path]]) -> None:
    """The finished steps and, once all are, the ensemble, as JSON (paths relative to the run)."""
    root = path.parent

    def rel(file: Path) -> str:
        return str(Path(file).relative_to(root)) if Path(file).is_relative_to(root) else str(file)

    values = {
        "members": {name: {"best_score": r.best_score, "best_epoch": r.best_epoch, "best_checkpoint": rel(r.best_checkpoint),
                           "last_checkpoint": rel(r.last_checkpoint), "history": r.history}
                    for name, r in results.items()},
        "pseudo_labels": {name: {volume: rel(file) for volume, file in files.items()} for name, files in pseudo.items()},
        "pseudo_options": {s.name: s.options() for s in steps if isinstance(s, PseudoStep) and s.name in pseudo},
        "checkpoints": [rel(file) for file in _ensemble(steps, results)] if len(results) + len(pseudo) == len(steps) else [],
    }
    root.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(values, indent=1))


def _result_from_record(record: Mapping[str, Any], root: Path) -> TrainResult:
    """A finished member's ``TrainResult`` as the manifest recorded it."""
    return TrainResult(best_score=record["best_score"], best_epoch=record["best_epoch"],
                       best_checkpoint=root / record["best_checkpoint"], last_checkpoint=root / record["last_checkpoint"],
                       history=list(record["history"]))
