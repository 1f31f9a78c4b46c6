"""Atomic file output: write to a temporary file beside the target, rename it into place on success.

An interrupted or failed write never leaves a truncated file under the real name, and a reader
never sees a half-written one (``os.replace`` is atomic within a file system). The data is
fsynced before the rename and the folder after it, so a power cut cannot leave an empty file
under the real name either.

- **Temporary files** are named ``.<name>.vk-<pid>-<8 hex>.tmp`` in the target's folder. One
  left behind by a killed writer (SIGKILL, power cut) is deleted by the next ``atomic_output``
  into that folder once its writer process is gone and it is older than ``STALE_AFTER_S``; a
  live writer's file is never touched.
- **Mode**: a new file gets ``0o666 & ~umask``, a replaced file keeps its mode, as with ``open()``.
- **Symlinks** are written through: the link stays and its target gets the new content (the
  temporary file lies beside the target, so the rename stays within one file system).

``replace_folder`` does the same for a folder built under a ``temp_path`` name: the new folder
takes the old one's place with no moment when neither is there.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["STALE_AFTER_S", "TEMP_NAME", "atomic_output", "remove_stale_temp_files", "replace_folder", "temp_path"]

# A temporary file whose writer is gone is removed only after this many seconds without a
# change, in case its writer runs in another PID namespace (container) or host on a shared folder.
STALE_AFTER_S = 120.0
# The names temp_path gives (``TEMP_NAME.fullmatch(name)``): never a final output.
TEMP_NAME = re.compile(r"\..+\.vk-(?P<pid>\d+)-[0-9a-f]{8}\.tmp")
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2  # Linux <fcntl.h>, <linux/fs.h>


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s content to; it becomes ``path`` when the block
    ends without an error and is removed otherwise.

    Raises FileNotFoundError when ``path``'s folder does not exist, IsADirectoryError when
    ``path`` is a folder.
    """
    target = _resolve_target(Path(path))
    _sweep_folder_once(str(target.parent))
    tmp, mode = _create_temp(target)
    try:
        yield tmp
        _commit(tmp, target, mode)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def temp_path(target: str | os.PathLike) -> Path:
    """A fresh temporary name beside ``target``: ``.<name>.vk-<pid>-<8 hex>.tmp``. A file or
    folder left under it by a killed process is removed by ``remove_stale_temp_files``."""
    target = Path(target)
    return target.with_name(f".{target.name}.vk-{os.getpid()}-{secrets.token_hex(4)}.tmp")


def replace_folder(new: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move the finished folder ``new`` (built under ``temp_path(target)``) to ``target``; a folder
    already there is replaced with no moment when ``target`` is missing, then deleted.

    Linux swaps the two atomically (``renameat2(RENAME_EXCHANGE)``). Where the OS or file system
    cannot, the old folder is renamed aside and the new one in (a moment without ``target``),
    and the old one is put back if that fails. An old folder that cannot be deleted is left
    under its temporary name for ``remove_stale_temp_files``.

    Raises ValueError when ``target`` is a symlink or not a folder; OSError when the move fails
    (``target`` is then as it was).
    """
    new, target = Path(new), Path(target)
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise ValueError(f"{target} is a symlink or a file; replace_folder replaces a folder")
    if not target.exists():
        os.rename(new, target)
    elif _exchange(new, target):
        shutil.rmtree(new, ignore_errors=True)  # new now holds the old folder
    else:
        _replace_by_renames(new, target)
    _fsync_folder(target.parent)


def remove_stale_temp_files(folder: str | os.PathLike, *, min_age_s: float = STALE_AFTER_S) -> list[Path]:
    """Delete the temporary files and folders (``temp_path`` names) in ``folder`` whose writer
    process is gone and that have not changed for ``min_age_s`` seconds; return them."""
    removed = []
    now = time.time()
    with os.scandir(folder) as entries:
        stale = [entry for entry in entries if _is_stale(entry, now, min_age_s)]
    for entry in stale:
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
        except FileNotFoundError:  # another process removed it first
            continue
        removed.append(Path(entry.path))
    return removed


# --- helpers ------------------------------------------------------------------------------------


def _is_stale(entry: os.DirEntry, now: float, min_age_s: float) -> bool:
    """A ``temp_path`` name whose process is gone and that has not changed for ``min_age_s``."""
    match = TEMP_NAME.fullmatch(entry.name)
    if not match or _process_alive(int(match["pid"])):
        return False
    try:
        return now - entry.stat(follow_symlinks=False).st_mtime >= min_age_s
    except FileNotFoundError:
        return False


def _resolve_target(path: Path) -> Path:
    """The file that will get the content: ``path``, or the file its symlink chain points to."""
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    if not target.parent.is_dir():
        via = f" (the target of {path})" if target != path else ""
        raise FileNotFoundError(f"output folder {target.parent} does not exist{via}")
    if target.is_dir():
        raise IsADirectoryError(f"output {path} is a folder, not a file")
    return target


@functools.lru_cache(maxsize=256)
def _sweep_folder_once(folder: str) -> None:
    """Remove stale temporary files from ``folder``, once per process (writers of many slices
    into one folder would otherwise list it for every slice). Best effort: an unreadable folder
    is left as it is."""
    try:
        remove_stale_temp_files(folder)
    except OSError:
        pass


def _create_temp(target: Path) -> tuple[Path, int]:
    """Create the empty temporary file; return it and the mode the final file must get."""
    while True:
        tmp = temp_path(target)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the kernel applies the umask
        except FileExistsError:
            continue
        break
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
    try:
        mode = stat.S_IMODE(target.stat().st_mode)  # a replaced file keeps its mode
    except FileNotFoundError:
        pass
    return tmp, mode


def _commit(tmp: Path, target: Path, mode: int) -> None:
    """Give ``tmp`` its mode, flush it to disk, rename it to ``target``, flush the folder."""
    os.chmod(tmp, mode)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, target)
    _fsync_folder(target.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically; False where the OS or the file system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError, TypeError):  # not glibc >= 2.28 / not Linux
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _replace_by_renames(new: Path, target: Path) -> None:
    """Rename ``target`` aside and ``new`` in; put ``target`` back if the second rename fails."""
    old = temp_path(target)
    os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _fsync_folder(folder: Path) -> None:
    """Flush a folder's entries (the rename) to disk, where the OS allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
