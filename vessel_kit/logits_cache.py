"""The logits ``predict_submission(logits_dir=...)`` keeps, made safe to interrupt and to reuse.

Each volume's float16 logits are written to a temporary file beside their final name
(``atomic_output``: ``.<volume>.npy.vk-<pid>-<hex>.tmp``) and renamed to ``<volume>.npy`` only
when the volume is complete, so an interrupted run never leaves a partly filled ``.npy`` under
the real name. A fully predicted volume then gets a record, ``<volume>.json``: a digest of what
made it (the inference options, the checkpoints' sha256, the vessel_kit version, the volume's slice
file names, sizes and modification times, its voxel size) and its submission rows. A later run
whose digest is the same reuses the volume instead of predicting it again; any difference
recomputes it. Temporary files left by a killed run are removed when a later run starts
(``atomic.remove_stale_temp_files``: once their process is gone and they are a few minutes old,
so a concurrent run's files are never touched).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from .atomic import atomic_output, remove_stale_temp_files
from .layout import VolumeInfo

__all__ = ["LogitsCache"]

RECORD_VERSION = 1
# Options that cannot change a prediction; they may differ between a run and its rerun.
UNRECORDED_OPTIONS = frozenset({"progress"})


class LogitsCache:
    """The logits folder of one ``predict_submission`` call."""

    def __init__(
        self,
        folder: str | os.PathLike,
        checkpoints: Sequence[str | os.PathLike],
        options: Mapping[str, object],
        log: Callable[[str], None],
    ) -> None:
        from . import __version__

        self.folder, self.log = Path(folder), log
        recorded = {key: value for key, value in options.items() if key not in UNRECORDED_OPTIONS}
        self._run = {
            "version": RECORD_VERSION, "vessel_kit": __version__,
            "options": json.loads(json.dumps(recorded, sort_keys=True, default=repr)),
            "checkpoints": [_sha256(Path(path)) for path in checkpoints],
        }

    def remove_stale_temps(self) -> None:
        """Delete the temporary logits and records a killed run left behind."""
        for path in sorted(remove_stale_temp_files(self.folder)):
            self.log(f"removed {path}, left by an interrupted run")

    def reusable_rows(self, volume: VolumeInfo) -> list[str] | None:
        """The volume's submission rows (RLEs in slice order) when its logits were completed by
        a run with the same digest, else None."""
        record_path, logits_path = self._paths(volume)
        if not (record_path.is_file() and logits_path.is_file()):
            return None
        try:
            record = json.loads(record_path.read_text())
        except (OSError, ValueError):
            return None
        if record.get("digest") != self._digest(volume) or len(record.get("rows", ())) != len(volume.stems):
            return None
        self.log(f"{volume.name}: reusing {logits_path} and its masks (same options, checkpoints and slices)")
        return record["rows"]

    @contextmanager
    def writing(self, volume: VolumeInfo) -> Iterator[Path]:
        """Yield the temporary path to write the volume's logits to; it becomes
        ``<volume>.npy`` when the block ends without an error and is removed otherwise. The
        volume's old record goes first, so it never describes the new file."""
        record_path, logits_path = self._paths(volume)
        record_path.unlink(missing_ok=True)
        with atomic_output(logits_path) as tmp:
            yield tmp

    def record(self, volume: VolumeInfo, rows: Sequence[str]) -> None:
        """Mark the volume's logits complete, with its submission rows, for later runs."""
        record_path, _ = self._paths(volume)
        with atomic_output(record_path) as tmp:
            tmp.write_text(json.dumps({"digest": self._digest(volume), "rows": list(rows)}))

    def _paths(self, volume: VolumeInfo) -> tuple[Path, Path]:
        return self.folder / f"{volume.name}.json", self.folder / f"{volume.name}.npy"

    def _digest(self, volume: VolumeInfo) -> str:
        slices = [(path.name, *_size_and_mtime(path)) for path in volume.image_paths]
        described = {**self._run, "volume": volume.name, "voxel_size_um": volume.voxel_size_um, "slices": slices}
        return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def _size_and_mtime(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def _sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(chunk):
            digest.update(block)
    return digest.hexdigest()
