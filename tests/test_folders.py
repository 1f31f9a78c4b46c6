"""list_folder and path_kind: what a path names, and errors that name the path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vessel_kit.folders import list_folder, path_kind


def test_path_kinds_follow_links(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "folder").mkdir()
    (tmp_path / "link_to_file").symlink_to(tmp_path / "file")
    (tmp_path / "link_to_folder").symlink_to(tmp_path / "folder")
    kinds = {name: path_kind(tmp_path / name) for name in ("file", "folder", "link_to_file", "link_to_folder", "nothing")}
    assert kinds == {"file": "file", "folder": "folder", "link_to_file": "file", "link_to_folder": "folder", "nothing": None}
    assert sorted(p.name for p in list_folder(tmp_path, "test folder")) == ["file", "folder", "link_to_file", "link_to_folder"]


def test_broken_links_and_odd_files_are_named(tmp_path):
    dangling, loop, fifo = tmp_path / "dangling", tmp_path / "loop", tmp_path / "fifo"
    dangling.symlink_to(tmp_path / "gone")
    loop.symlink_to(loop)
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match=f"{dangling} is a dangling symbolic link \\(its target {tmp_path / 'gone'} does not exist\\)"):
        path_kind(dangling)
    with pytest.raises(ValueError, match=f"{loop} is a symbolic link loop"):
        path_kind(loop)
    with pytest.raises(ValueError, match=f"{fifo} is neither a file nor a folder"):
        path_kind(fifo)


def test_unexaminable_path_is_named(tmp_path, monkeypatch):
    target = tmp_path / "secret"

    def stat(self, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "stat", stat)
    with pytest.raises(ValueError, match=f"cannot examine {target}: Permission denied"):
        path_kind(target)


def test_list_folder_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=f"slice folder {tmp_path / 'nowhere'} does not exist"):
        list_folder(tmp_path / "nowhere", "slice folder")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=f"slice folder {tmp_path / 'file'} is a file, not a folder"):
        list_folder(tmp_path / "file", "slice folder")

    def iterdir(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "iterdir", iterdir)
    with pytest.raises(ValueError, match=f"cannot list slice folder {tmp_path}: Permission denied"):
        list_folder(tmp_path, "slice folder")
