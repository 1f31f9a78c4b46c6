"""The offline Kaggle dataset (the "bundle"): wheels, checkpoints and a manifest, built and read.

``build_dataset.sh`` runs ``main``: it checks the inference options with ``infer_volume``'s own
validator and that every checkpoint rebuilds (``load_checkpoint``), downloads the pinned
dependency wheels (``wheels/requirements-kaggle.txt``, plus ``wheels/requirements-kaggle-3d.txt``,
i.e. MONAI, when a checkpoint is 3D) for Kaggle's Python, builds the vessel_kit wheel from the
checkout, and writes one flat folder:

    vessel_kit-<version>-py3-none-any.whl, <dependency wheels>   installed offline by the notebook
    requirements.txt              exactly what the notebook installs (``--no-index --no-deps``)
    <name>.safetensors            the checkpoints (the ensemble)
    vessel_kit_manifest.json      versions, sha256 of every file, what each checkpoint is, and
                                  the inference options the notebook passes to predict_submission
    dataset-metadata.json         for the ``kaggle`` CLI

The folder is flat because the ``kaggle`` CLI uploads subfolders only as archives. Nothing is
uploaded (``--upload``) unless the whole folder was built and re-verified. It is built under a
temporary name beside the output folder and swapped in whole (``atomic.replace_folder``), so an
interrupted or failed build leaves the previous bundle as it was. The inference notebook
calls ``read_bundle`` to check the sha256s and get the checkpoints and options.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .atomic import remove_stale_temp_files, replace_folder, temp_path
from .config_files import load_yaml_mapping
from .runs import read_member_checkpoints

__all__ = ["MANIFEST_NAME", "Bundle", "build_bundle", "collect_checkpoints", "main", "read_bundle", "requirement_files",
           "upload_bundle"]

MANIFEST_NAME = "vessel_kit_manifest.json"
REQUIREMENTS_NAME = "requirements.txt"
METADATA_NAME = "dataset-metadata.json"
MANIFEST_FORMAT = 1
KAGGLE_PYTHON = "3.11"  # taken to be Kaggle's current image; the pinned wheels also fit 3.10 and 3.12
KAGGLE_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
PLACEHOLDER_ID = "your-kaggle-username/vessel-kit"


@dataclass(frozen=True)
class Bundle:
    """A built dataset folder: ``checkpoints`` (paths) and ``infer_options`` for ``predict_submission``."""

    root: Path
    manifest: dict[str, Any]

    @property
    def checkpoints(self) -> list[Path]:
        return [self.root / item["file"] for item in self.manifest["checkpoints"]]

    @property
    def infer_options(self) -> dict[str, Any]:
        return dict(self.manifest["infer_options"])

    def summary(self) -> str:
        """One line per checkpoint: what it is and what it was trained on."""
        lines = [f"vessel_kit {self.manifest['vessel_kit']} bundle built {self.manifest['created']}"]
        for item in self.manifest["checkpoints"]:
            trained = item["trained_on"].get("train_volumes", "?")
            score = item["metrics"].get("val_surface_dice")
            lines.append(
                f"  {item['file']}: {item['arch']}/{item['encoder']}, {item['in_chans']} ch, tile {item['tile_size']}, "
                f"{item['voxel_size_um']} µm, trained on {trained}"
                + (f", validation surface Dice {score:.4f} (epoch {item['metrics'].get('epoch')})" if score is not None else "")
            )
        lines.append(f"  inference options: {self.manifest['infer_options']}")
        return "\n".join(lines)


def collect_checkpoints(paths: Sequence[str | os.PathLike]) -> dict[str, Path]:
    """The checkpoints named by files and folders, keyed by their (unique) name in the bundle.

    A ``.safetensors`` file is taken as is; a folder with ``best.safetensors`` is a training run
    and gives that file, named after the folder; a multi-member run (``members.json``) the
    checkpoints of its ensemble, each named after its member; any other folder gives its ``.safetensors``
    files, or, when it has none, the best checkpoint of each run folder inside it (``runs/``).
    """
    found: dict[str, Path] = {}

    def add(name: str, path: Path) -> None:
        if name in found:
            raise ValueError(f"two checkpoints would both be named {name} in the bundle: {found[name]} and {path}")
        found[name] = path

    for path in map(Path, paths):
        if path.is_file():
            if path.suffix != ".safetensors":
                raise ValueError(f"checkpoint {path} is not a .safetensors file")
            add(path.name, path)
        elif (path / "best.safetensors").is_file():
            add(f"{path.resolve().name}.safetensors", path / "best.safetensors")
        elif (members := read_member_checkpoints(path)) is not None:  # a multi-member run: its ensemble
            for file in members:
                add(f"{file.parent.name}.safetensors", file)
        elif path.is_dir():
            files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*/best.safetensors"))
            if not files:
                raise FileNotFoundError(f"no checkpoints in {path} (no *.safetensors, no */best.safetensors)")
            for file in files:
                add(f"{file.parent.name}.safetensors" if file.name == "best.safetensors" else file.name, file)
        else:
            raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not found:
        raise ValueError("no checkpoints given")
    return found


def build_bundle(
    out: str | os.PathLike,
    checkpoints: Sequence[str | os.PathLike],
    *,
    source_dir: str | os.PathLike,
    requirements: str | os.PathLike,
    wheelhouse: str | os.PathLike,
    requirements_3d: str | os.PathLike | None = None,
    download: bool = True,
    kaggle_id: str | None = None,
    title: str | None = None,
    infer_options: Mapping[str, Any] | None = None,
    python_version: str = KAGGLE_PYTHON,
    log: Callable[[str], None] = print,
) -> Bundle:
    """Build the dataset folder ``out`` (replacing a previous bundle there) and return it verified.

    Every check runs before ``out`` is touched: ``infer_options`` must be valid ``InferConfig``
    options (names and values; the options ``predict_submission`` sets itself are refused),
    checkpoints must rebuild, every pinned wheel must be in ``wheelhouse`` (downloaded there
    first unless ``download`` is False) and the vessel_kit wheel must build. The pins are
    ``requirements``, plus ``requirements_3d`` when a checkpoint is 3D (``requirement_files``). The folder is built
    and verified under a temporary name beside ``out`` (removed on any error or interrupt), then
    swapped in for the previous bundle, so ``out`` always holds one whole bundle.
    """
    out = _bundle_folder(out)
    options = _check_infer_options(infer_options or {})
    named = collect_checkpoints(checkpoints)
    described = {name: _describe_checkpoint(path) for name, path in named.items()}
    log(f"{len(named)} checkpoints rebuild: {', '.join(named)}")
    files = requirement_files(requirements, requirements_3d, [item["spatial_dims"] for item in described.values()])
    pins = [pin for file in files for pin in _read_pins(file)]
    if download:
        for file in files:
            _download_wheels(file, wheelhouse, python_version, log)
    wheels = [_find_wheel(wheelhouse, name, version) for name, version in pins]
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(out.parent)  # staging folders of killed builds
    staging = temp_path(out)
    staging.mkdir()
    try:
        manifest = _write_staging(staging, source_dir, named, described, wheels, pins, options,
                                  kaggle_id=kaggle_id, title=title, python_version=python_version)
        _verify(staging)
        _move_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log(f"bundle written to {out}: {len(manifest['files'])} files, {_folder_mb(out):.1f} MB")
    return Bundle(out, manifest)


def read_bundle(root: str | os.PathLike, *, verify: bool = True) -> Bundle:
    """Read a bundle's manifest; with ``verify``, check that every file is there with its sha256."""
    root = Path(root)
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{root} is not a vessel_kit bundle: {MANIFEST_NAME} is missing")
    try:
        manifest = json.loads(manifest_path.read_text())
        if manifest["format"] > MANIFEST_FORMAT:
            raise ValueError(f"manifest format {manifest['format']} is newer than this vessel_kit reads")
        files, checkpoints = manifest["files"], manifest["checkpoints"]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{manifest_path}: not a readable manifest ({error})") from None
    missing = sorted(set(files) - {p.name for p in root.iterdir()})
    if missing:
        raise FileNotFoundError(f"bundle {root} lacks files its manifest lists: {', '.join(missing)}")
    unlisted = [c["file"] for c in checkpoints if c["file"] not in files]
    if unlisted:
        raise ValueError(f"{manifest_path}: checkpoints {unlisted} are not among its files")
    if verify:
        for name, record in files.items():
            if _sha256(root / name) != record["sha256"]:
                raise ValueError(f"bundle file {root / name} does not match its sha256 in the manifest (corrupt upload?)")
    return Bundle(root, manifest)


def upload_bundle(root: str | os.PathLike, *, message: str, log: Callable[[str], None] = print) -> None:
    """Create the Kaggle dataset, or a new version of it, with the ``kaggle`` CLI."""
    bundle = read_bundle(root)
    dataset_id = json.loads((bundle.root / METADATA_NAME).read_text())["id"]
    if dataset_id == PLACEHOLDER_ID:
        raise ValueError("give --kaggle-id USER/SLUG to upload (dataset-metadata.json holds a placeholder id)")
    kaggle = shutil.which("kaggle")
    if kaggle is None:
        raise FileNotFoundError("the kaggle CLI is not on PATH (pip install kaggle; put your token in ~/.kaggle/kaggle.json)")
    exists = subprocess.run([kaggle, "datasets", "status", dataset_id], capture_output=True, text=True).returncode == 0
    command = ["datasets", "version", "-m", message] if exists else ["datasets", "create"]
    log(f"{'new version of' if exists else 'creating'} kaggle dataset {dataset_id}")
    result = subprocess.run([kaggle, *command, "-p", str(bundle.root)], capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"kaggle {' '.join(command)} failed: {(result.stderr or result.stdout).strip()}")
    log(result.stdout.strip())


def requirement_files(requirements: str | os.PathLike, requirements_3d: str | os.PathLike | None,
                      spatial_dims: Sequence[int]) -> list[Path]:
    """The pinned-requirement files a bundle of checkpoints with these ``spatial_dims`` installs:
    ``requirements``, plus ``requirements_3d`` (MONAI) when one checkpoint is 3D."""
    files = [Path(requirements)]
    if 3 in spatial_dims:
        if requirements_3d is None:
            raise ValueError("a 3D checkpoint needs the MONAI wheel: give requirements_3d "
                             "(--requirements-3d wheels/requirements-kaggle-3d.txt)")
        files.append(Path(requirements_3d))
    return files


# --- the command line (build_dataset.sh) --------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    source = Path(os.environ.get("VESSEL_KIT_SOURCE", Path(__file__).resolve().parents[1]))
    parser = argparse.ArgumentParser(prog="build_dataset.sh", description="Build (and upload) the Kaggle dataset.")
    parser.add_argument("--checkpoints", nargs="+", default=[str(source / "runs")],
                        help="checkpoint files or training-run folders (default: every runs/*/best.safetensors)")
    parser.add_argument("--out", type=Path, default=source / "dist" / "kaggle-dataset", help="the dataset folder")
    parser.add_argument("--kaggle-id", help="USER/SLUG of the Kaggle dataset")
    parser.add_argument("--title", help="dataset title (default: the slug)")
    parser.add_argument("--infer-config", type=Path, help="YAML of infer_volume options the notebook will use")
    parser.add_argument("--upload", action="store_true", help="create the dataset, or a new version, with the kaggle CLI")
    parser.add_argument("--message", default="vessel_kit bundle", help="version notes for --upload")
    parser.add_argument("--requirements", type=Path, default=source / "wheels" / "requirements-kaggle.txt")
    parser.add_argument("--requirements-3d", type=Path, default=source / "wheels" / "requirements-kaggle-3d.txt",
                        help="wheels added when a checkpoint is 3D (MONAI)")
    parser.add_argument("--wheels", type=Path, default=source / "wheels", help="where the wheels are downloaded to")
    parser.add_argument("--no-download", action="store_true", help="use the wheels already in --wheels; no network")
    parser.add_argument("--python-version", default=KAGGLE_PYTHON, help=f"Kaggle's Python (default {KAGGLE_PYTHON})")
    args = parser.parse_args(argv)
    try:
        if args.kaggle_id is not None and not re.fullmatch(r"[\w-]+/[a-z0-9][a-z0-9-]{2,49}", args.kaggle_id):
            raise ValueError(
                f"--kaggle-id must be USER/SLUG (slug: 3-50 lowercase letters, digits, dashes), got {args.kaggle_id!r}"
            )
        if args.upload and args.kaggle_id is None:
            raise ValueError("--upload needs --kaggle-id USER/SLUG")
        bundle = build_bundle(
            args.out, args.checkpoints, source_dir=source, requirements=args.requirements,
            requirements_3d=args.requirements_3d, wheelhouse=args.wheels,
            download=not args.no_download, kaggle_id=args.kaggle_id,
            title=args.title or (args.kaggle_id.split("/")[1] if args.kaggle_id else None),
            infer_options=load_yaml_mapping(args.infer_config, what="inference config") if args.infer_config else None,
            python_version=args.python_version,
        )
        print(bundle.summary())
        if args.upload:
            upload_bundle(bundle.root, message=args.message)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted (no partial bundle is left in {args.out})", file=sys.stderr)
        return 130
    return 0


# --- helpers ------------------------------------------------------------------------------------


def _describe_checkpoint(path: Path) -> dict[str, Any]:
    """What the manifest says of a checkpoint; rebuilding it (weights included) is the check."""
    from .models import load_checkpoint, read_checkpoint_metadata

    try:
        header = read_checkpoint_metadata(path)
        load_checkpoint(path)
    except Exception as error:  # any failure to rebuild disqualifies the checkpoint
        raise ValueError(f"checkpoint {path} cannot be rebuilt: {error}") from None
    config = header["config"]
    return {
        "arch": config.arch, "encoder": config.encoder, "in_chans": config.in_chans, "tile_size": config.tile_size,
        "spatial_dims": config.spatial_dims,
        "voxel_size_um": config.voxel_size_um, "normalization": config.normalization.to_dict(),
        "metrics": header["metrics"], "trained_on": header["extra"], "written_by": header["versions"],
        "source": str(path),
    }


def _bundle_folder(out: str | os.PathLike) -> Path:
    """``out`` (the folder a symlink points to), checked to be new, empty or a previous bundle."""
    out = Path(os.path.realpath(out)) if Path(out).is_symlink() else Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is a file, not a bundle folder")
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST_NAME).is_file():
        raise FileExistsError(f"{out} exists and is not a vessel_kit bundle; give an empty or new folder")
    return out


def _write_staging(staging: Path, source_dir, named: Mapping[str, Path], described: Mapping[str, dict],
                   wheels: Sequence[Path], pins: Sequence[tuple[str, str]], options: dict[str, Any], *,
                   kaggle_id: str | None, title: str | None, python_version: str) -> dict[str, Any]:
    """Write every file of the bundle into ``staging``, the manifest last; return the manifest."""
    own_wheel = _build_own_wheel(source_dir, staging)
    version = _wheel_version(own_wheel)
    for wheel in wheels:
        shutil.copyfile(wheel, staging / wheel.name)
    for name, path in named.items():
        shutil.copyfile(path, staging / name)
    requirement_lines = [f"vessel_kit=={version}", *(f"{name}=={v}" for name, v in pins)]
    (staging / REQUIREMENTS_NAME).write_text("\n".join(requirement_lines) + "\n")
    metadata = {"title": title or "vessel_kit bundle", "id": kaggle_id or PLACEHOLDER_ID, "licenses": [{"name": "CC0-1.0"}]}
    (staging / METADATA_NAME).write_text(json.dumps(metadata, indent=2) + "\n")
    manifest = {
        "format": MANIFEST_FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),  # noqa: UP017 (3.10)
        "vessel_kit": version,
        "git_commit": _git_commit(source_dir),
        "python": python_version,
        "requirements": requirement_lines,
        "built_with": _versions(("torch", "numpy", "segmentation_models_pytorch", "timm")),
        "checkpoints": [{"file": name, **described[name]} for name in named],
        "infer_options": options,
        "files": {p.name: _file_record(p) for p in sorted(staging.iterdir())},
    }
    (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _verify(folder: Path) -> None:
    """Re-read the written folder: every file matches its sha256 and nothing is unlisted."""
    bundle = read_bundle(folder)
    if bundle.manifest["files"].keys() != {p.name for p in folder.iterdir()} - {MANIFEST_NAME}:
        raise RuntimeError(f"{folder}: the folder and its manifest disagree")


def _move_into_place(staging: Path, out: Path) -> None:
    """Swap the verified ``staging`` folder in for ``out``; on failure ``out`` is left as it was."""
    try:
        replace_folder(staging, out)
    except OSError as error:
        raise RuntimeError(f"could not move the new bundle into {out} ({error}); {out} is left as it was") from None


def _check_infer_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The options ``predict_submission`` will pass on, checked as an ``InferConfig`` (the one
    schema of inference options), as plain JSON values for the manifest."""
    from .infer_config import InferConfig
    from .submit import RESERVED_OPTIONS

    reserved = sorted(set(options) & RESERVED_OPTIONS.keys())
    if reserved:
        raise ValueError("inference options set by predict_submission, not the bundle: "
                         + ", ".join(f"{o} (its {RESERVED_OPTIONS[o]})" for o in reserved))
    InferConfig.from_dict(options)
    try:
        return json.loads(json.dumps(dict(options)))
    except TypeError as error:
        raise ValueError(f"inference options must be plain values: {error}") from None


def _read_pins(requirements: str | os.PathLike) -> list[tuple[str, str]]:
    """``name==version`` lines (comments and blank lines skipped); anything else is an error."""
    path = Path(requirements)
    if not path.is_file():
        raise FileNotFoundError(f"pinned requirements {path} do not exist")
    pins = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!-]+)", line)
        if not match:
            raise ValueError(f"{path}:{number}: {line!r} is not pinned as name==version")
        pins.append((match[1], match[2]))
    return pins


def _download_wheels(requirements, wheelhouse, python_version: str, log) -> None:
    Path(wheelhouse).mkdir(parents=True, exist_ok=True)
    platforms = [arg for platform in KAGGLE_PLATFORMS for arg in ("--platform", platform)]
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--implementation", "cp",
        "--python-version", python_version, *platforms, "--dest", str(wheelhouse), "--requirement", str(requirements),
    ]
    log(f"downloading the pinned wheels for Python {python_version} into {wheelhouse}")
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
        raise RuntimeError(f"pip download of {requirements} failed:\n{tail}")


def _find_wheel(wheelhouse, name: str, version: str) -> Path:
    wanted = (_normalise(name), version)
    for wheel in Path(wheelhouse).glob("*.whl"):
        parts = wheel.name.split("-")
        if (_normalise(parts[0]), parts[1]) == wanted:
            return wheel
    raise FileNotFoundError(f"no wheel for {name}=={version} in {wheelhouse} (was it downloaded?)")


def _build_own_wheel(source_dir, dest: Path) -> Path:
    """vessel_kit's wheel from the checkout, built with the installed setuptools (no network)."""
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", tmp, str(source_dir)],
            capture_output=True, text=True,
        )
        wheels = list(Path(tmp).glob("vessel_kit-*.whl"))
        if result.returncode or len(wheels) != 1:
            raise RuntimeError(f"building the vessel_kit wheel from {source_dir} failed: {result.stderr.strip()[-2000:]}")
        return Path(shutil.copyfile(wheels[0], dest / wheels[0].name))


def _wheel_version(wheel: Path) -> str:
    return wheel.name.split("-")[1]


def _file_record(path: Path) -> dict[str, Any]:
    return {"sha256": _sha256(path), "bytes": path.stat().st_size}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _versions(modules: Sequence[str]) -> dict[str, str]:
    from importlib import import_module

    return {name: str(getattr(import_module(name), "__version__", "?")) for name in modules}


def _git_commit(source_dir) -> str | None:
    result = subprocess.run(["git", "-C", str(source_dir), "rev-parse", "HEAD"], capture_output=True, text=True)
    if result.returncode:
        return None
    dirty = subprocess.run(["git", "-C", str(source_dir), "status", "--porcelain"], capture_output=True, text=True).stdout
    return result.stdout.strip() + ("+dirty" if dirty.strip() else "")


def _folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.iterdir()) / 1e6


if __name__ == "__main__":
    raise SystemExit(main())
