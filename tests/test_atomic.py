"""atomic_output: all or nothing under the final name, flushed to disk, the mode open() would give,
symlinks written through, and temporary files of killed writers cleaned up (never a live one's)."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vessel_kit import atomic
from vessel_kit.atomic import STALE_AFTER_S, atomic_output, remove_stale_temp_files, replace_folder, temp_path


@pytest.fixture
def umask():
    """Set the process umask for a test and restore it after."""
    previous = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(previous)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def dead_pid() -> int:
    """The id of a process that has exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077], ids=oct)
def test_a_new_file_gets_the_umask_mode(tmp_path, umask, mask):
    umask(mask)
    with atomic_output(tmp_path / "out.txt") as tmp:
        tmp.write_text("hello")
    assert (tmp_path / "out.txt").read_text() == "hello"
    assert mode_of(tmp_path / "out.txt") == 0o666 & ~mask


def test_a_replaced_file_keeps_its_mode(tmp_path, umask):
    target = tmp_path / "out.txt"
    target.write_text("old")
    target.chmod(0o640)
    with atomic_output(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and mode_of(target) == 0o640


def test_the_data_is_flushed_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a))), real_replace(a, b)))
    with atomic_output(tmp_path / "out.bin") as tmp:
        tmp.write_bytes(b"data")
    assert events == [("fsync", str(tmp)), ("replace", str(tmp)), ("fsync", str(tmp_path))]


def test_a_symlink_is_written_through(tmp_path):
    real = tmp_path / "store" / "model.bin"
    real.parent.mkdir()
    real.write_bytes(b"old")
    link = tmp_path / "model.bin"
    link.symlink_to(real)
    with atomic_output(link) as tmp:
        tmp.write_bytes(b"new")
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert real.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin", "store"]  # no temporary file left
    dangling = tmp_path / "later.bin"
    dangling.symlink_to(tmp_path / "store" / "later-target.bin")
    with atomic_output(dangling) as tmp:
        tmp.write_bytes(b"first")
    assert dangling.is_symlink() and (tmp_path / "store" / "later-target.bin").read_bytes() == b"first"


def test_a_failed_block_leaves_the_old_file_and_no_temporary_file(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    for error in (RuntimeError, KeyboardInterrupt):
        with pytest.raises(error), atomic_output(target) as tmp:
            assert tmp.parent == tmp_path and tmp.name.startswith(f".out.txt.vk-{os.getpid()}-")
            tmp.write_text("half")
            raise error
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"] and target.read_text() == "old"


def test_bad_targets_are_refused_with_their_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="output folder .*missing does not exist"), \
            atomic_output(tmp_path / "missing" / "out.txt"):
        pass
    (tmp_path / "folder").mkdir()
    with pytest.raises(IsADirectoryError, match="folder.* is a folder"), atomic_output(tmp_path / "folder"):
        pass
    assert [p.name for p in tmp_path.iterdir()] == ["folder"]


def test_stale_temporary_files_of_dead_writers_are_removed(tmp_path):
    old = time.time() - STALE_AFTER_S - 10
    gone = dead_pid()
    files = {
        "stale": f".out.bin.vk-{gone}-0123abcd.tmp",  # writer gone, old: removed
        "live writer": f".out.bin.vk-{os.getpid()}-0123abcd.tmp",  # a live process: kept, however old
        "fresh": f".other.bin.vk-{gone}-89abcdef.tmp",  # writer gone but recent: kept for now
        "not ours": f".out.bin.{gone}.tmp",
        "not ours either": f"out.bin.vk-{gone}-0123abcd.tmp",
        "user file": f".out.bin.vk-{gone}-0123abcd.tmp.bak",
    }
    for kind, name in files.items():
        (tmp_path / name).write_bytes(b"x")
        if kind != "fresh":
            os.utime(tmp_path / name, (old, old))
    with atomic_output(tmp_path / "out.bin") as tmp:  # the next run into the folder cleans up
        tmp.write_bytes(b"done")
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {"out.bin", *files.values()} - {files["stale"]}
    assert remove_stale_temp_files(tmp_path, min_age_s=0) == [tmp_path / files["fresh"]]


def test_the_folder_is_swept_once_per_process(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(atomic, "remove_stale_temp_files", lambda folder: calls.append(folder))
    for index in range(3):
        with atomic_output(tmp_path / f"{index}.txt") as tmp:
            tmp.write_text("x")
    assert calls == [str(tmp_path)]


def make_folder(path: Path, content: str) -> Path:
    path.mkdir()
    (path / "version.txt").write_text(content)
    return path


def test_replace_folder_swaps_without_a_moment_of_absence(tmp_path, monkeypatch):
    target = make_folder(tmp_path / "bundle", "old")
    new = make_folder(temp_path(target), "new")
    seen_while_deleting = []
    real_rmtree = shutil.rmtree

    def rmtree(path, **kwargs):
        seen_while_deleting.append((target / "version.txt").read_text())
        real_rmtree(path, **kwargs)

    def no_rename(*args):
        raise AssertionError("renaming the old folder aside leaves a moment without it")

    monkeypatch.setattr(shutil, "rmtree", rmtree)
    monkeypatch.setattr(os, "rename", no_rename)
    replace_folder(new, target)
    assert (target / "version.txt").read_text() == "new" and seen_while_deleting == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


def test_replace_folder_without_the_swap_puts_the_old_folder_back_on_failure(tmp_path, monkeypatch):
    target = make_folder(tmp_path / "bundle", "old")
    new = make_folder(temp_path(target), "new")
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)  # an OS or file system without it
    real_rename, calls = os.rename, []

    def failing_second_rename(source, destination):
        calls.append(source)
        if len(calls) == 2:
            raise OSError(errno.EIO, "injected failure", str(destination))
        real_rename(source, destination)

    monkeypatch.setattr(os, "rename", failing_second_rename)
    with pytest.raises(OSError, match="injected failure"):
        replace_folder(new, target)
    assert (target / "version.txt").read_text() == "old" and (new / "version.txt").read_text() == "new"
    monkeypatch.setattr(os, "rename", real_rename)
    replace_folder(new, target)
    assert (target / "version.txt").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["bundle"]


def test_replace_folder_moves_into_a_new_place_and_refuses_non_folders(tmp_path):
    new = make_folder(tmp_path / "staging", "new")
    replace_folder(new, tmp_path / "bundle")
    assert (tmp_path / "bundle" / "version.txt").read_text() == "new" and not new.exists()
    (tmp_path / "file").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "bundle")
    for target in ("file", "link"):
        with pytest.raises(ValueError, match="is a symlink or a file"):
            replace_folder(make_folder(tmp_path / f"new-{target}", "new"), tmp_path / target)
    assert (tmp_path / "file").read_text() == "x" and (tmp_path / "link").is_symlink()


def test_stale_temporary_folders_are_removed_too(tmp_path):
    gone = dead_pid()
    stale = make_folder(tmp_path / f".bundle.vk-{gone}-0123abcd.tmp", "half")
    live = make_folder(temp_path(tmp_path / "bundle"), "in progress")
    for folder in (stale, live):
        os.utime(folder, (0, 0))
    assert remove_stale_temp_files(tmp_path) == [stale]
    assert [p.name for p in tmp_path.iterdir()] == [live.name]
