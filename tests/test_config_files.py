"""load_yaml_mapping: the mapping a YAML file holds, or one line naming the file and the problem."""

from __future__ import annotations

import pytest

from vessel_kit.config_files import load_yaml_mapping


def _yaml(tmp_path, text: str | bytes):
    path = tmp_path / "config.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def test_mapping_and_empty_files(tmp_path):
    assert load_yaml_mapping(_yaml(tmp_path, "epochs: 3\nlosses: [dice, bce]\n")) == {"epochs": 3, "losses": ["dice", "bce"]}
    assert load_yaml_mapping(_yaml(tmp_path, "\ufeffepochs: 3\n")) == {"epochs": 3}  # byte-order mark
    assert load_yaml_mapping(_yaml(tmp_path, "")) == {}
    assert load_yaml_mapping(str(_yaml(tmp_path, "# only a comment\n"))) == {}


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"training config {tmp_path / 'nope.yaml'} does not exist"):
        load_yaml_mapping(tmp_path / "nope.yaml", what="training config")
    with pytest.raises(ValueError, match=f"inference config {tmp_path} is a folder, not a file"):
        load_yaml_mapping(tmp_path, what="inference config")


@pytest.mark.parametrize(
    ("text", "position", "problem"),
    [
        ("epochs: 3\nlr: [1, 2\n", "3:1", "expected ',' or ']', but got '<stream end>' \\(while parsing a flow sequence\\)"),
        ("epochs: 3\n  lr: 2\n", "2:5", "mapping values are not allowed here"),
        ("epochs: 3\n---\nlr: 2\n", "2:1", "but found another document"),
        ("epochs: *undefined\n", "1:9", "found undefined alias 'undefined'"),
    ],
)
def test_syntax_error_is_one_line_with_its_position(tmp_path, text, position, problem):
    path = _yaml(tmp_path, text)
    with pytest.raises(ValueError, match=f"^{path}:{position}: {problem}") as caught:
        load_yaml_mapping(path)
    assert "\n" not in str(caught.value)


def test_unsafe_tag_is_refused(tmp_path):
    path = _yaml(tmp_path, "model: !!python/object/apply:os.system [echo hi]\n")
    with pytest.raises(ValueError, match=f"^{path}:1:8: could not determine a constructor for the tag"):
        load_yaml_mapping(path)


@pytest.mark.parametrize(("text", "kind"), [("- epochs\n- 3\n", "list"), ("42\n", "int"), ("just words\n", "str")])
def test_not_a_mapping(tmp_path, text, kind):
    path = _yaml(tmp_path, text)
    with pytest.raises(ValueError, match=f"{path}: training config must be a mapping of options \\(key: value lines\\), found a value of type {kind}$"):
        load_yaml_mapping(path, what="training config")


@pytest.mark.parametrize(("text", "key"), [("1: x\n", "1 \\(int\\)"), ("yes: x\n", "True \\(bool\\)"), ("~: x\n", "None \\(NoneType\\)")])
def test_keys_must_be_strings(tmp_path, text, key):
    path = _yaml(tmp_path, text)
    with pytest.raises(ValueError, match=f"{path}: config keys must be strings, got {key}"):
        load_yaml_mapping(path)


def test_not_text(tmp_path):
    path = _yaml(tmp_path, b"epochs: \xff\n")
    with pytest.raises(ValueError, match=f"{path}: config must be UTF-8 text \\(byte 8 is not\\)"):
        load_yaml_mapping(path)
    path = _yaml(tmp_path, b"epochs: \x00\n")
    with pytest.raises(ValueError, match=f"^{path}: unacceptable character #x0000"):
        load_yaml_mapping(path)


def test_unreadable_file(tmp_path, monkeypatch):
    path = _yaml(tmp_path, "epochs: 3\n")

    def read_text(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(type(path), "read_text", read_text)
    with pytest.raises(ValueError, match=f"cannot read config {path}: Permission denied"):
        load_yaml_mapping(path)
